"""SCAFFOLD removes client drift: on heterogeneous quadratics it reaches the global optimum
(closed form) where FedAvg with many local steps stops at a biased point."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_sim.aggregators import weighted_mean
from fedjax_sim.algorithms import fedavg, scaffold
from fedjax_sim.core import Engine, EngineConfig, FederatedData, LocalConfig, Model

D, CLIENTS, PER_CLIENT = 3, 8, 4


def quadratic_model() -> Model:
  """Per-example loss 0.5 * sum_j a_j (w_j - b_j)^2: client i's objective is its (a_i, b_i)."""
  def init(key):
    del key
    return {"w": jnp.zeros(D)}

  def apply(params, batch, *, train=False, key=None):
    return jnp.broadcast_to(params["w"], batch["a"].shape)

  def loss(out, batch):
    return 0.5 * jnp.sum(batch["a"] * (out - batch["b"]) ** 2, axis=-1)

  return Model(init, apply, loss, lambda out, batch: {})


@pytest.fixture(scope="module")
def problem():
  rng = np.random.default_rng(0)
  a = rng.uniform(0.5, 2.0, size=(CLIENTS, D)).astype(np.float32)
  b = rng.normal(0.0, 2.0, size=(CLIENTS, D)).astype(np.float32)
  data = FederatedData.from_offsets(
      {"a": np.repeat(a, PER_CLIENT, 0), "b": np.repeat(b, PER_CLIENT, 0)},
      np.arange(CLIENTS + 1) * PER_CLIENT)
  optimum = (a * b).sum(0) / a.sum(0)  # argmin of mean_i f_i, coordinate by coordinate
  return data, optimum


def _train(alg, data, rounds=80):
  engine = Engine(alg, data, weighted_mean(), lambda r: np.arange(CLIENTS), seed=0,
                  config=EngineConfig(block_size=4))
  model = quadratic_model()
  state = engine.init(model.init(jax.random.key(0)))
  for result in engine.rounds(state, 0, rounds):
    state = result.state
  return np.asarray(state.server.params["w"]), engine, state


def test_scaffold_reaches_the_global_optimum_where_fedavg_drifts(problem):
  data, optimum = problem
  local = LocalConfig(batch_size=PER_CLIENT, epochs=10, shuffle=False)  # 10 full-batch steps
  model = quadratic_model()
  w_scaffold, engine, state = _train(scaffold(model, 0.1, local, CLIENTS), data)
  w_fedavg, _, _ = _train(fedavg(model, optax.sgd(0.1), optax.sgd(1.0), local,
                                 weighting="uniform"), data)
  err_scaffold = np.abs(w_scaffold - optimum).max()
  err_fedavg = np.abs(w_fedavg - optimum).max()
  assert err_scaffold < 1e-3, (w_scaffold, optimum)
  assert err_fedavg > 0.05 and err_fedavg > 50 * err_scaffold
  # With full participation the server variate is the mean of the client variates.
  c_i = engine.client_state(state, np.arange(CLIENTS))["w"]
  np.testing.assert_allclose(state.server.control["w"], c_i.mean(0), rtol=1e-4, atol=1e-6)
  # At the optimum, c_i tends to client i's gradient there: a_i (w* - b_i).
  a = data.features["a"][::PER_CLIENT]
  b = data.features["b"][::PER_CLIENT]
  np.testing.assert_allclose(c_i, a * (optimum - b), rtol=0, atol=5e-3)


def test_scaffold_rejects_bad_arguments():
  local = LocalConfig(batch_size=4)
  with pytest.raises(ValueError, match="client_learning_rate"):
    scaffold(quadratic_model(), 0.0, local, 10)
  with pytest.raises(ValueError, match="num_clients"):
    scaffold(quadratic_model(), 0.1, local, 0)


def test_feddyn_reaches_the_global_optimum(problem):
  from fedjax_sim.algorithms import feddyn
  data, optimum = problem
  local = LocalConfig(batch_size=PER_CLIENT, epochs=10, shuffle=False)
  w, engine, state = _train(feddyn(quadratic_model(), optax.sgd(0.1), local, alpha=0.5,
                                   num_clients=CLIENTS), data, rounds=150)
  assert np.abs(w - optimum).max() < 1e-3, (w, optimum)
  # Its client states tend to the clients' gradients at the optimum, a_i (w* - b_i).
  g = engine.client_state(state, np.arange(CLIENTS))["w"]
  a = data.features["a"][::PER_CLIENT]
  b = data.features["b"][::PER_CLIENT]
  np.testing.assert_allclose(g, a * (optimum - b), atol=5e-3)


def test_scaffold_server_variate_counts_only_clients_that_trained(problem):
  """An empty client (no step taken) must not inflate the |S|/N factor of the c update."""
  data, _ = problem
  feats = {k: np.concatenate([v, v[:0]]) for k, v in data.features.items()}
  offsets = np.concatenate([np.arange(CLIENTS + 1) * PER_CLIENT, [CLIENTS * PER_CLIENT]])
  with_empty = FederatedData.from_offsets(feats, offsets)  # client CLIENTS has no example
  local = LocalConfig(batch_size=PER_CLIENT, epochs=3, shuffle=False)
  alg = scaffold(quadratic_model(), 0.1, local, CLIENTS + 1)
  engine = Engine(alg, with_empty, weighted_mean(), lambda r: np.arange(CLIENTS + 1), seed=0,
                  config=EngineConfig(block_size=4))
  state = engine.init(quadratic_model().init(jax.random.key(0)))
  for res in engine.rounds(state, 0, 5):
    state = res.state
  c_i = engine.client_state(state, np.arange(CLIENTS + 1))["w"]
  assert np.all(c_i[-1] == 0)
  # c = (1/N) sum_i c_i over the whole population, as in the paper.
  np.testing.assert_allclose(state.server.control["w"], c_i.mean(0), rtol=1e-4, atol=1e-6)


def test_scaffold_and_feddyn_need_a_stage_that_releases_the_total_weight(problem):
  """A DP stage releases no exact participant count: the server step says so when traced."""
  from fedjax_sim.algorithms import feddyn
  from fedjax_sim.privacy import gaussian_sum
  data, _ = problem
  local = LocalConfig(batch_size=PER_CLIENT, shuffle=False)
  for alg in (scaffold(quadratic_model(), 0.1, local, CLIENTS),
              feddyn(quadratic_model(), optax.sgd(0.1), local, alpha=0.5, num_clients=CLIENTS)):
    engine = Engine(alg, data, gaussian_sum(1.0, 0.0, float(CLIENTS)), lambda r: np.arange(4),
                    seed=0, config=EngineConfig(block_size=4))
    with pytest.raises(ValueError, match="releases the exact total weight"):
      next(engine.rounds(engine.init(quadratic_model().init(jax.random.key(0))), 0, 1))


def _partial_rounds(alg, data, stage, rounds=6):
  cohorts = [np.arange(CLIENTS)[r % 2::2][:3] for r in range(rounds)]  # 3 of 8 clients a round
  engine = Engine(alg, data, stage, lambda r: cohorts[r], seed=0,
                  config=EngineConfig(block_size=2))
  results = list(engine.rounds(engine.init(quadratic_model().init(jax.random.key(0))), 0, rounds))
  return engine, results


def test_scaffold_server_variate_through_a_compressing_stage(problem):
  """|S| comes from the stage's total_weight: through a lossless compressor (the top 2D of
  2D coordinates) c stays the population mean of the c_i under partial participation."""
  from fedjax_sim.compression import compressed_mean, top_k
  data, _ = problem
  local = LocalConfig(batch_size=PER_CLIENT, epochs=3, shuffle=False)
  alg = scaffold(quadratic_model(), 0.1, local, CLIENTS)
  engine, results = _partial_rounds(alg, data, compressed_mean(top_k(2 * D)))
  state = results[-1].state
  c_i = engine.client_state(state, np.arange(CLIENTS))["w"]
  np.testing.assert_allclose(state.server.control["w"], c_i.mean(0), rtol=1e-4, atol=1e-6)
  _, plain = _partial_rounds(alg, data, weighted_mean())
  np.testing.assert_allclose(state.server.params["w"], plain[-1].state.server.params["w"],
                             rtol=1e-5, atol=1e-6)
  # The upload is the whole message, delta and control: 2D values and 2D indices of 3 bits.
  assert results[-1].metrics["bits_per_client"] == 2 * D * (32 + 3)
  assert plain[-1].metrics["bits_per_client"] == 2 * D * 32


def test_error_feedback_residuals_are_sized_by_the_message(problem):
  """SCAFFOLD's message is 2D long (control, then delta): so is each client's residual."""
  from fedjax_sim.compression import compressed_mean, top_k
  data, _ = problem
  local = LocalConfig(batch_size=PER_CLIENT, epochs=3, shuffle=False)
  alg = scaffold(quadratic_model(), 0.1, local, CLIENTS)
  engine, results = _partial_rounds(alg, data, compressed_mean(top_k(D), error_feedback=True),
                                    rounds=1)
  state = results[0].state
  residual = np.asarray(jax.device_get(state.aggregator_clients))
  assert residual.shape == (engine.num_devices * engine.rows_per_device, 2 * D)
  rows = (np.arange(CLIENTS) % engine.num_devices) * engine.rows_per_device + \
      np.arange(CLIENTS) // engine.num_devices
  c_new = engine.client_state(state, np.arange(CLIENTS))["w"]  # = the control field (c_i was 0)
  for cid in range(CLIENTS):
    r = residual[rows[cid]]
    if cid in (0, 2, 4):  # took part: D coordinates sent, the other D kept
      assert np.sum(r == 0) == D
      np.testing.assert_array_equal(np.where(r[:D] == 0, c_new[cid], r[:D]), c_new[cid])
    else:
      assert not np.any(r)
  assert results[0].metrics["bits_per_client"] == D * (32 + 3)
