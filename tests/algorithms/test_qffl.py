"""q-FedAvg against its update rule computed by hand on quadratic clients."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_sim.aggregators import weighted_mean
from fedjax_sim.algorithms import fedavg, qffl
from fedjax_sim.core import ClientData, Engine, EngineConfig, FederatedData, LocalConfig
from fedjax_sim.core.sampling import make_sampler
from tests.algorithms.test_scaffold import quadratic_model

LR, STEPS = 0.1, 3


def _data():
  rng = np.random.default_rng(5)
  a = rng.uniform(0.5, 2.0, size=(4, 3)).astype(np.float32)
  b = rng.normal(0.0, 2.0, size=(4, 3)).astype(np.float32)
  feats = {"a": np.repeat(a, 2, 0), "b": np.repeat(b, 2, 0)}
  return FederatedData.from_offsets(feats, np.arange(5) * 2), a, b


def _one_round(alg, data):
  engine = Engine(alg, data, weighted_mean(), lambda r: np.arange(4), seed=0,
                  config=EngineConfig(block_size=2))
  state = engine.init(quadratic_model().init(jax.random.key(0)))
  return np.asarray(next(engine.rounds(state, 0, 1)).server_state.params["w"])


@pytest.mark.parametrize("q", [0.5, 2.0])
def test_qffl_step_matches_the_paper_rule(q):
  data, a, b = _data()
  local = LocalConfig(batch_size=2, epochs=STEPS, shuffle=False)  # 3 full-batch steps
  got = _one_round(qffl(quadratic_model(), LR, local, q), data)
  w = np.zeros(3)
  L = 1 / LR
  deltas, hs = [], []
  for i in range(4):
    f = 0.5 * np.sum(a[i] * (w - b[i]) ** 2)  # the global model's loss on client i
    y = w.copy()
    for _ in range(STEPS):
      y = y - LR * a[i] * (y - b[i])
    dw = L * (w - y)
    deltas.append(f ** q * dw)
    hs.append(q * f ** (q - 1) * np.sum(dw ** 2) + L * f ** q)
  expected = w - np.sum(deltas, 0) / np.sum(hs)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_q_zero_is_fedavg_with_uniform_weights():
  data, _, _ = _data()
  local = LocalConfig(batch_size=2, epochs=STEPS, shuffle=False)
  a = _one_round(qffl(quadratic_model(), LR, local, 0.0), data)
  b = _one_round(fedavg(quadratic_model(), optax.sgd(LR), optax.sgd(1.0), local,
                        weighting="uniform"), data)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bad_q_is_rejected():
  with pytest.raises(ValueError, match="q must be"):
    qffl(quadratic_model(), LR, LocalConfig(batch_size=2), -1.0)


def test_paper_sampling_then_unweighted_sum_on_unequal_clients():
  """q-FedAvg as the paper runs it: a data-proportional cohort, then sum Delta / sum h."""
  rng = np.random.default_rng(9)
  sizes = np.array([1, 6, 2, 5, 3, 4, 0, 7])
  n = len(sizes)
  a = rng.uniform(0.5, 2.0, size=(n, 3)).astype(np.float32)
  b = rng.normal(0.0, 2.0, size=(n, 3)).astype(np.float32)
  data = FederatedData.from_offsets({"a": np.repeat(a, sizes, 0), "b": np.repeat(b, sizes, 0)},
                                    np.concatenate([[0], np.cumsum(sizes)]))
  q = 1.5
  sampler = make_sampler("data_proportional", 11, n, 4, 0.1, sizes)
  local = LocalConfig(batch_size=8, epochs=STEPS, shuffle=False)  # one full batch per epoch
  engine = Engine(qffl(quadratic_model(), LR, local, q), data, weighted_mean(), sampler, seed=0,
                  config=EngineConfig(block_size=2))
  state = engine.init(quadratic_model().init(jax.random.key(0)))
  got = [np.asarray(r.server_state.params["w"]) for r in engine.rounds(state, 0, 2)]
  w = np.zeros(3)
  for r in range(2):
    cohort = sampler(r)
    assert len(cohort) == 4 and sizes[cohort].min() > 0
    deltas, hs = _paper_messages(a[cohort], b[cohort], q, w)
    w = w - np.sum(deltas, 0) / np.sum(hs)
    np.testing.assert_allclose(got[r], w, rtol=1e-4, atol=1e-5)


def test_loss_evaluation_and_training_use_different_keys(monkeypatch):
  """One key per purpose: the key of the global-loss evaluation is not local training's."""
  # The package exports the function under the module's name.
  qffl_module = importlib.import_module("fedjax_sim.algorithms.qffl")
  seen = {}
  real_loss, real_train = qffl_module.masked_loss, qffl_module.local_train

  def loss(*args, **kwargs):
    seen["eval"] = np.asarray(jax.random.key_data(kwargs["key"]))
    return real_loss(*args, **kwargs)

  def train(*args, **kwargs):
    seen["train"] = np.asarray(jax.random.key_data(kwargs["key"]))
    return real_train(*args, **kwargs)

  monkeypatch.setattr(qffl_module, "masked_loss", loss)
  monkeypatch.setattr(qffl_module, "local_train", train)
  _, a, b = _data()
  alg = qffl(quadratic_model(), LR, LocalConfig(batch_size=2), 1.0)
  key = jax.random.key(3)
  client = ClientData({"a": jnp.asarray(a[:2]), "b": jnp.asarray(b[:2])}, jnp.ones(2, bool))
  alg.client_update(quadratic_model().init(key), client, None, key)
  given = np.asarray(jax.random.key_data(key))
  assert not np.array_equal(seen["eval"], seen["train"])
  assert not np.array_equal(seen["eval"], given) and not np.array_equal(seen["train"], given)


def _recording(alg):
  """`alg` whose server state also keeps the last aggregate it received."""
  def server_init(params):
    return {"inner": alg.server_init(params),
            "aggregate": {"delta": jax.tree.map(jnp.zeros_like, params), "h": jnp.zeros(())}}

  def server_update(state, aggregate, info):
    return {"inner": alg.server_update(state["inner"], aggregate, info), "aggregate": aggregate}

  return alg._replace(server_init=server_init, broadcast=lambda s: alg.broadcast(s["inner"]),
                      server_update=server_update, params_of=lambda s: alg.params_of(s["inner"]))


def _paper_messages(a, b, q, w):
  """Each client's (Delta_k, h_k) of one round from w, as in the paper (float64)."""
  deltas, hs = [], []
  for i in range(len(a)):
    f = 0.5 * np.sum(a[i] * (w - b[i]) ** 2)
    y = w.copy()
    for _ in range(STEPS):
      y = y - LR * a[i] * (y - b[i])
    dw = (w - y) / LR
    deltas.append(f ** q * dw)
    hs.append(q * f ** (q - 1) * np.sum(dw ** 2) + f ** q / LR)
  return np.asarray(deltas), np.asarray(hs)


def test_the_sums_the_server_divides_travel_through_the_compressor():
  """q-FFL's mean(h) is the stage's: exact through a lossless channel, the
  compressed one through a 1-bit channel (and the server divides by that one)."""
  from fedjax_sim.compression import compressed_mean, stochastic_quantizer, top_k
  data, a, b = _data()
  q = 1.0
  local = LocalConfig(batch_size=2, epochs=STEPS, shuffle=False)
  alg = _recording(qffl(quadratic_model(), LR, local, q))
  deltas, hs = _paper_messages(a.astype(np.float64), b.astype(np.float64), q, np.zeros(3))
  exact_step = -deltas.sum(0) / hs.sum()

  def one_round(stage):
    engine = Engine(alg, data, stage, lambda r: np.arange(4), seed=0,
                    config=EngineConfig(block_size=2))
    state = engine.init(quadratic_model().init(jax.random.key(0)))
    server = jax.device_get(next(engine.rounds(state, 0, 1)).server_state)
    return server["aggregate"], server["inner"].params["w"]

  # Lossless (the top 4 of 4 coordinates): the exact means, the paper's step.
  aggregate, w = one_round(compressed_mean(top_k(4)))
  np.testing.assert_allclose(aggregate["h"], hs.mean(), rtol=1e-5)
  np.testing.assert_allclose(aggregate["delta"]["w"], deltas.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(w, exact_step, rtol=1e-4, atol=1e-6)

  # 1 bit per coordinate, norm scaling: client k's whole message (delta and h, one
  # vector) is sent as +-||m_k|| per coordinate, so the released mean(h) is one of
  # the 16 values mean_k(s_k ||m_k||), far from the exact mean.
  aggregate, w = one_round(compressed_mean(stochastic_quantizer(1, scaling="norm")))
  norms = np.sqrt(np.sum(deltas ** 2, 1) + hs ** 2)
  signs = np.array(np.meshgrid(*[[-1.0, 1.0]] * 4)).reshape(4, -1).T
  candidates = signs @ norms / 4
  assert np.min(np.abs(candidates - aggregate["h"])) < 1e-4 * norms.max()
  assert abs(aggregate["h"] - hs.mean()) > 0.05 * hs.mean()
  assert aggregate["h"] > 0  # (for this seed) so the step below is finite
  # The server divided the compressed mean(Delta) by the compressed mean(h).
  np.testing.assert_allclose(w, -aggregate["delta"]["w"] / aggregate["h"], rtol=1e-5, atol=1e-6)
  assert np.abs(w - exact_step).max() > 1e-3
