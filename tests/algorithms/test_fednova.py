"""FedNova on a hand-computed case: quadratic clients with 1, 2 and 4 local steps."""

import jax
import numpy as np
import optax

from fedjax_sim.aggregators import weighted_mean
from fedjax_sim.algorithms import fedavg, fednova
from fedjax_sim.core import Engine, EngineConfig, FederatedData, LocalConfig
from tests.algorithms.test_scaffold import quadratic_model

SIZES = np.array([1, 2, 4])  # batch 1: tau_i = 1, 2, 4 steps


def _data():
  rng = np.random.default_rng(3)
  a = rng.uniform(0.5, 2.0, size=(3, 3)).astype(np.float32)
  b = rng.normal(0.0, 2.0, size=(3, 3)).astype(np.float32)
  feats = {"a": np.repeat(a, SIZES, 0), "b": np.repeat(b, SIZES, 0)}
  return FederatedData.from_offsets(feats, np.concatenate([[0], np.cumsum(SIZES)])), a, b


def _one_round(alg, data):
  engine = Engine(alg, data, weighted_mean(), lambda r: np.arange(3), seed=0,
                  config=EngineConfig(block_size=2))
  state = engine.init(quadratic_model().init(jax.random.key(0)))
  return np.asarray(next(engine.rounds(state, 0, 1)).server_state.params["w"])


def test_fednova_aggregate_equals_the_paper_formula():
  data, a, b = _data()
  lr = 0.1
  local = LocalConfig(batch_size=1, epochs=1, shuffle=False)
  got = _one_round(fednova(quadratic_model(), optax.sgd(lr), optax.sgd(1.0), local), data)
  # By hand: client i runs tau_i steps of w <- w - lr * a_i (w - b_i) from w = 0.
  x = np.zeros(3)
  deltas, taus = [], SIZES.astype(float)
  for i, tau in enumerate(SIZES):
    w = x.copy()
    for _ in range(tau):
      w = w - lr * a[i] * (w - b[i])
    deltas.append(w - x)
  p = SIZES / SIZES.sum()
  tau_eff = (p * taus).sum()
  expected = x + tau_eff * sum(p[i] * deltas[i] / taus[i] for i in range(3))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  # FedAvg's (example-weighted) average differs when step counts differ.
  fedavg_w = _one_round(fedavg(quadratic_model(), optax.sgd(lr), optax.sgd(1.0), local), data)
  np.testing.assert_allclose(fedavg_w, sum(p[i] * deltas[i] for i in range(3)), rtol=1e-5,
                             atol=1e-6)
  assert np.abs(fedavg_w - got).max() > 1e-3
