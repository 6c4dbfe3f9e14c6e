import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_sim.aggregators import weighted_mean
from fedjax_sim.algorithms import fedavg
from fedjax_sim.core import Engine, EngineConfig, LocalConfig
from fedjax_sim.core.algorithm import ClientData
from fedjax_sim.core.heterogeneity import NO_LIMIT, SystemConfig, SystemModel
from fedjax_sim.core.local import local_train
from fedjax_sim.models import logistic_regression
from tests.conftest import packed_dataset


def test_dropouts_follow_their_probability():
  model = SystemModel(SystemConfig(dropout=0.3), num_clients=1000, seed=0)
  ids = np.arange(100)
  dropped = np.array([model.apply(r, ids, np.full(100, 4)).dropped for r in range(400)])
  # Binomial(100, 0.3) per round: mean 30, sd 4.6; the mean of 400 rounds has sd 0.23.
  assert abs(dropped.mean() - 30) < 5 * np.sqrt(100 * 0.3 * 0.7 / 400)
  assert abs(dropped.var() - 21) < 5 * 21 * np.sqrt(2 / 400)


def test_heterogeneous_availability_has_the_beta_mean_and_spread():
  model = SystemModel(SystemConfig(dropout=0.2, dropout_concentration=4.0), 20_000, seed=1)
  p = model.dropout_prob
  mean, var = 0.2, 0.2 * 0.8 / (4.0 + 1)  # Beta(a, b) variance: m (1 - m) / (a + b + 1)
  assert abs(p.mean() - mean) < 5 * np.sqrt(var / len(p))
  assert abs(p.var() - var) < 0.1 * var
  # Clients with a high dropout probability really drop more often.
  ids = np.arange(20_000)
  part = model.apply(0, ids, np.ones(20_000))
  stayed = np.isin(ids, part.client_ids)
  assert p[stayed].mean() < p[~stayed].mean()


@pytest.mark.parametrize("policy", ["drop", "partial"])
def test_stragglers_are_the_configured_fraction_with_uniform_budgets(policy):
  cfg = SystemConfig(dropout=0.1, straggler_fraction=0.5, straggler_policy=policy)
  model = SystemModel(cfg, num_clients=100, seed=2)
  ids = np.arange(100)
  budgets = []
  for r in range(300):
    part = model.apply(r, ids, np.full(100, 5), epochs=2)  # 10 steps in full
    alive = 100 - part.dropped
    assert part.stragglers == alive // 2
    if policy == "drop":
      assert len(part.client_ids) == alive - part.stragglers
      assert np.all(part.step_limits == NO_LIMIT)
    else:
      assert len(part.client_ids) == alive
      limited = part.step_limits[part.step_limits != NO_LIMIT]
      assert len(limited) == part.stragglers
      budgets.extend(limited)
  if policy == "partial":
    budgets = np.array(budgets)
    assert budgets.min() == 1 and budgets.max() == 10  # uniform on [1, full]
    counts = np.bincount(budgets, minlength=11)[1:]
    expected = len(budgets) / 10
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))


def test_a_straggler_stops_after_its_budget():
  model = logistic_regression((5,), 3)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 8), jnp.int32)
  local = LocalConfig(batch_size=2, epochs=3, shuffle=False)  # 12 steps in full
  p0 = model.init(jax.random.key(0))
  run = jax.jit(lambda d: local_train(model, optax.sgd(0.3), p0, d, local, key=jax.random.key(1)))
  limited, stats = run(ClientData({"x": x, "y": y}, jnp.ones(8, bool), None, 5))
  assert float(stats["steps"]) == 5 and float(stats["examples"]) == 10
  # 5 steps = the 4 steps of epoch 1, then the first batch of epoch 2.
  ref_local = LocalConfig(batch_size=2, epochs=1, shuffle=False)
  p, _ = jax.jit(lambda: local_train(model, optax.sgd(0.3), p0, ClientData({"x": x, "y": y},
                                                                        jnp.ones(8, bool)),
                                     ref_local, key=jax.random.key(1)))()
  p, _ = jax.jit(lambda q: local_train(model, optax.sgd(0.3), q, ClientData(
      {"x": x[:2], "y": y[:2]}, jnp.ones(2, bool)), ref_local, key=jax.random.key(1)))(p)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), limited, p)


def _engine(system, k=10):
  data = packed_dataset(np.full(30, 6), num_features=5, num_classes=3)
  model = logistic_regression((5,), 3)
  alg = fedavg(model, optax.sgd(0.1), optax.sgd(1.0), LocalConfig(batch_size=3))
  engine = Engine(alg, data, weighted_mean(), lambda r: np.arange(r % 3, 30, 3)[:k], seed=0,
                  config=EngineConfig(block_size=4), system=system)
  return engine, engine.init(model.init(jax.random.key(0)))


def test_a_round_where_everyone_drops_is_failed_and_changes_nothing():
  engine, state = _engine(SystemConfig(dropout=1.0))
  results = list(engine.rounds(state, 0, 2))
  for res in results:
    m = res.metrics
    assert m["round_failed"] == 1.0 and m["sampled_clients"] == 10 and m["dropped_clients"] == 10
  jax.tree.map(np.testing.assert_array_equal, results[-1].server_state.params,
               state.server.params)


def test_engine_counts_participation():
  engine, state = _engine(SystemConfig(dropout=0.3, straggler_fraction=0.5,
                                       straggler_policy="drop"))
  for res in engine.rounds(state, 0, 5):
    m = res.metrics
    alive = m["sampled_clients"] - m["dropped_clients"]
    assert m["straggling_clients"] == alive // 2
    assert m["clients"] == alive - m["straggling_clients"]
    assert m["round_failed"] == float(m["clients"] == 0)


def test_epoch_stragglers_do_whole_epochs_below_the_full_count():
  model = SystemModel(SystemConfig(straggler_fraction=1.0, straggler_policy="partial",
                                   straggler_work="epochs"), num_clients=50, seed=3)
  seen = set()
  for r in range(200):
    part = model.apply(r, np.arange(50), np.full(50, 7), epochs=5)
    assert np.all(part.step_limits % 7 == 0)
    seen |= set((part.step_limits // 7).tolist())
  assert seen == {1, 2, 3, 4}  # randint(1, E): whole epochs in [1, E - 1]


def test_per_client_capability_makes_the_same_clients_straggle():
  cfg = SystemConfig(straggler_fraction=0.3, straggler_concentration=2.0,
                     straggler_policy="partial")
  model = SystemModel(cfg, num_clients=2000, seed=4)
  s = model.straggle_prob
  var = 0.3 * 0.7 / (2.0 + 1)
  assert abs(s.mean() - 0.3) < 5 * np.sqrt(var / 2000)
  ids = np.arange(2000)
  counts = np.zeros(2000)
  rounds = 60
  for r in range(rounds):
    part = model.apply(r, ids, np.full(2000, 4))
    counts[part.client_ids[part.step_limits != NO_LIMIT]] += 1
  # Each client straggles at its own rate: frequencies track s_i (binomial noise only).
  assert np.corrcoef(counts / rounds, s)[0, 1] > 0.9
  assert abs(counts.sum() / (rounds * 2000) - 0.3) < 0.02
