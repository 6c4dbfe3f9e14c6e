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
