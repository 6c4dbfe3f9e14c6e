"""FedNova on hand-computed cases: quadratic clients with 1, 2 and 4 local steps per epoch,
vanilla local SGD and local SGD with heavy-ball momentum, against numpy transcriptions."""

import jax
import numpy as np
import optax
import pytest

from fedjax_sim.aggregators import weighted_mean
from fedjax_sim.algorithms import fedavg, fednova
from fedjax_sim.core import Engine, EngineConfig, FederatedData, LocalConfig
from tests.algorithms.test_scaffold import quadratic_model

SIZES = np.array([1, 2, 4])  # batch 1: tau_i = 1, 2, 4 steps per epoch
LR = 0.1


def _data():
  rng = np.random.default_rng(3)
  a = rng.uniform(0.5, 2.0, size=(3, 3)).astype(np.float32)
  b = rng.normal(0.0, 2.0, size=(3, 3)).astype(np.float32)
  feats = {"a": np.repeat(a, SIZES, 0), "b": np.repeat(b, SIZES, 0)}
  return FederatedData.from_offsets(feats, np.concatenate([[0], np.cumsum(SIZES)])), a, b


def _run(alg, data, rounds=1):
  engine = Engine(alg, data, weighted_mean(), lambda r: np.arange(3), seed=0,
                  config=EngineConfig(block_size=2))
  state = engine.init(quadratic_model().init(jax.random.key(0)))
  for result in engine.rounds(state, 0, rounds):
    pass
  return np.asarray(result.server_state.params["w"])


def _numpy_fednova(a, b, taus, rho, rounds, x=None):
  """FedNova with local heavy-ball SGD, transcribed from the paper in float64.

  Client i runs tau_i steps of `u <- rho u + g; w <- w - LR u` (u = 0 at the start
  of every round; g is the exact gradient a_i (w - b_i) of its quadratic), and its
  delta is normalized by ||a_i||_1 = sum_j (1 - rho^(tau_i - j)) / (1 - rho), the
  weights the paper gives the gradient of step j (tau_i for rho = 0).
  """
  x = np.zeros(3) if x is None else x
  p = SIZES / SIZES.sum()
  for _ in range(rounds):
    normalized, norms = [], []
    for i, tau in enumerate(taus):
      w, u = x.copy(), np.zeros(3)
      for _ in range(tau):
        u = rho * u + a[i] * (w - b[i])
        w = w - LR * u
      norm = float(tau) if rho == 0 else sum((1 - rho ** (tau - j)) / (1 - rho)
                                             for j in range(tau))
      normalized.append((w - x) / norm)
      norms.append(norm)
    tau_eff = float(np.dot(p, norms))
    x = x + tau_eff * sum(p[i] * normalized[i] for i in range(3))
  return x


def test_fednova_aggregate_equals_the_paper_formula():
  data, a, b = _data()
  local = LocalConfig(batch_size=1, epochs=1, shuffle=False)
  got = _run(fednova(quadratic_model(), LR, optax.sgd(1.0), local), data)
  expected = _numpy_fednova(a.astype(np.float64), b.astype(np.float64), SIZES, 0.0, 1)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  # FedAvg's (example-weighted) average of the same deltas differs when step counts differ.
  fedavg_w = _run(fedavg(quadratic_model(), optax.sgd(LR), optax.sgd(1.0), local), data)
  assert np.abs(fedavg_w - got).max() > 1e-3


@pytest.mark.parametrize("rho,epochs,rounds", [(0.9, 1, 1), (0.5, 2, 2), (0.9, 2, 3)])
def test_fednova_with_local_momentum_matches_numpy(rho, epochs, rounds):
  """Unequal step counts (1, 2, 4 per epoch); momentum carries across epochs, not rounds."""
  data, a, b = _data()
  local = LocalConfig(batch_size=1, epochs=epochs, shuffle=False)
  got = _run(fednova(quadratic_model(), LR, optax.sgd(1.0), local, momentum=rho), data, rounds)
  expected = _numpy_fednova(a.astype(np.float64), b.astype(np.float64), SIZES * epochs, rho,
                            rounds)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
  # Normalizing by the step count instead (the old behaviour) gives another point.
  wrong_norm = _numpy_fednova_step_count(a.astype(np.float64), b.astype(np.float64),
                                         SIZES * epochs, rho)
  if rounds == 1:
    assert np.abs(wrong_norm - got).max() > 1e-3


def _numpy_fednova_step_count(a, b, taus, rho):
  """One round of momentum SGD clients normalized by tau_i (not FedNova's ||a_i||_1)."""
  x, p = np.zeros(3), SIZES / SIZES.sum()
  deltas = []
  for i, tau in enumerate(taus):
    w, u = x.copy(), np.zeros(3)
    for _ in range(tau):
      u = rho * u + a[i] * (w - b[i])
      w = w - LR * u
    deltas.append((w - x) / tau)
  return x + float(np.dot(p, taus)) * sum(p[i] * deltas[i] for i in range(3))


def test_fednova_refuses_an_optimizer_it_cannot_normalize():
  local = LocalConfig(batch_size=1)
  with pytest.raises(ValueError, match="builds its own client optimizer"):
    fednova(quadratic_model(), optax.sgd(LR, momentum=0.9, nesterov=True), optax.sgd(1.0), local)
  with pytest.raises(ValueError, match="momentum must be in"):
    fednova(quadratic_model(), LR, optax.sgd(1.0), local, momentum=1.0)
  with pytest.raises(ValueError, match="client_learning_rate"):
    fednova(quadratic_model(), 0.0, optax.sgd(1.0), local)
