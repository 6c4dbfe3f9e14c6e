import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_sim.algorithms import fedavg, fedavgm
from fedjax_sim.core import ClientData, LocalConfig
from fedjax_sim.models import logistic_regression

MODEL = logistic_regression((3,), 2)
LOCAL = LocalConfig(batch_size=4, epochs=2, shuffle=False)
PARAMS = {"Dense_0": {"kernel": jnp.asarray(np.arange(6, dtype=np.float32).reshape(3, 2) / 10),
                      "bias": jnp.array([0.5, -0.5])}}
DELTAS = [
    {"Dense_0": {"kernel": jnp.asarray(np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2)),
                 "bias": jnp.array([0.25, -0.75])}},
    {"Dense_0": {"kernel": jnp.asarray(np.linspace(2, -0.5, 6, dtype=np.float32).reshape(3, 2)),
                 "bias": jnp.array([-1.0, 0.5])}},
]


def _np(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)


def test_fedavg_with_unit_sgd_adds_the_mean_delta():
  alg = fedavg(MODEL, optax.sgd(0.1), optax.sgd(1.0), LOCAL)
  state = alg.server_init(PARAMS)
  assert int(state.round) == 0
  np.testing.assert_array_equal(alg.broadcast(state)["Dense_0"]["bias"], PARAMS["Dense_0"]["bias"])
  expected = _np(PARAMS)
  for r, delta in enumerate(DELTAS, start=1):
    state = alg.server_update(state, delta, {})
    expected = jax.tree.map(np.add, expected, _np(delta))
    _close(alg.params_of(state), expected)
    assert int(state.round) == r


def test_fedavgm_is_heavy_ball_on_the_negative_mean_delta():
  lr, beta = 0.5, 0.8
  alg = fedavgm(MODEL, optax.sgd(0.1), LOCAL, server_learning_rate=lr, server_momentum=beta)
  state = alg.server_init(PARAMS)
  # By hand: v_t = beta * v_{t-1} + g_t with g_t = -delta_t; p_t = p_{t-1} - lr * v_t.
  p = _np(PARAMS)
  v = jax.tree.map(np.zeros_like, p)
  for delta in DELTAS:
    g = jax.tree.map(np.negative, _np(delta))
    v = jax.tree.map(lambda vi, gi: beta * vi + gi, v, g)
    p = jax.tree.map(lambda pi, vi: pi - lr * vi, p, v)
    state = alg.server_update(state, delta, {})
    _close(alg.params_of(state), p)
  # The second step differs from plain averaging (momentum is really there).
  plain = jax.tree.map(lambda a, b, c: a + lr * (b + c), _np(PARAMS), _np(DELTAS[0]),
                       _np(DELTAS[1]))
  assert not np.allclose(p["Dense_0"]["bias"], plain["Dense_0"]["bias"])


@pytest.mark.parametrize("server_opt", [optax.adam(0.05), optax.sgd(0.3, momentum=0.9),
                                        optax.adagrad(0.1)], ids=["adam", "sgdm", "adagrad"])
def test_any_server_optimizer_is_applied_to_the_pseudo_gradient(server_opt):
  alg = fedavg(MODEL, optax.sgd(0.1), server_opt, LOCAL)
  state = alg.server_init(PARAMS)
  params, opt_state = PARAMS, server_opt.init(PARAMS)
  for delta in DELTAS:
    updates, opt_state = server_opt.update(jax.tree.map(jnp.negative, delta), opt_state, params)
    params = optax.apply_updates(params, updates)
    state = alg.server_update(state, delta, {})
    _close(alg.params_of(state), params)


def _two_clients():
  """Client 0 has 3 real examples (of 4 slots), client 1 has none."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 4, 3)).astype(np.float32)
  y = rng.integers(0, 2, (2, 4)).astype(np.int32)
  mask = np.array([[True, True, True, False], [False] * 4])
  return ClientData({"x": jnp.asarray(x), "y": jnp.asarray(y)}, jnp.asarray(mask))


@pytest.mark.parametrize("weighting, expected", [("uniform", [1.0, 0.0]),
                                                 ("examples", [3.0, 0.0])])
def test_client_weights(weighting, expected):
  alg = fedavg(MODEL, optax.sgd(0.1), optax.sgd(1.0), LOCAL, weighting=weighting)
  data = _two_clients()
  keys = jax.random.split(jax.random.key(0), 2)
  out = jax.jit(jax.vmap(alg.client_update, (None, 0, None, 0)))(PARAMS, data, None, keys)
  # Weight is n_k (not n_k * epochs) or 1, and 0 for a client without examples.
  np.testing.assert_array_equal(out.weight, expected)
  # The empty client uploads a zero delta; the other one trained.
  for leaf in jax.tree.leaves(out.update):
    np.testing.assert_array_equal(leaf[1], np.zeros_like(leaf[1]))
  assert np.abs(np.asarray(out.update["Dense_0"]["kernel"][0])).sum() > 0
  np.testing.assert_array_equal(out.metrics["examples"], [6.0, 0.0])  # 2 epochs x 3


def test_invalid_weighting_is_rejected():
  with pytest.raises(ValueError, match="weighting"):
    fedavg(MODEL, optax.sgd(0.1), optax.sgd(1.0), LOCAL, weighting="clients")
  with pytest.raises(ValueError, match="'nope'"):
    fedavgm(MODEL, optax.sgd(0.1), LOCAL, weighting="nope")
