"""q-FedAvg against its update rule computed by hand on quadratic clients."""

import jax
import numpy as np
import optax
import pytest

from fedjax_sim.aggregators import weighted_mean
from fedjax_sim.algorithms import fedavg, qffl
from fedjax_sim.core import Engine, EngineConfig, FederatedData, LocalConfig
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
