"""FedAdam / FedYogi / FedAdagrad follow Reddi et al. 2021, Algorithm 2, to the letter.

The reference is a direct numpy (float64) transcription of Algorithm 2's
server step, fed the same average client deltas; optax's adam / yogi /
adagrad, which differ from it, stay available under their own names.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_sim.algorithms import (FedOptState, fed_adagrad, fed_adam, fed_yogi, fedadagrad,
                                   fedadam, fedavg, fedyogi)
from fedjax_sim.core.algorithm import LocalConfig
from fedjax_sim.models import logistic_regression

MODEL = logistic_regression((4,), 3)
LOCAL = LocalConfig(batch_size=2)
# Round-to-round scales of the average delta: large then tiny, so that Yogi's
# v_{t-1} - Delta_t^2 takes both signs; each coordinate's sign varies as well.
SCALES = (1.0, 0.01, 0.5, 0.001, 2.0, 0.05, 0.3, 0.002)


def algorithm2(kind, x0, deltas, eta, b1, b2, tau):
  """Reddi et al. 2021, Algorithm 2 (server side), in numpy float64.

  Returns the models x_1..x_T and how often Yogi's sign was +1 and -1.
  """
  x = np.asarray(x0, np.float64)
  m = np.zeros_like(x)       # m_{-1} = 0
  v = np.full_like(x, tau**2)  # v_{-1} = tau^2
  xs, signs = [], {1: 0, -1: 0}
  for t, delta in enumerate(deltas):
    delta = np.asarray(delta, np.float64)
    m = b1 * m + (1 - b1) * delta
    if kind == "adagrad":
      v = v + delta**2
    elif kind == "yogi":
      s = np.sign(v - delta**2)
      signs[1] += int(np.sum(s > 0))
      signs[-1] += int(np.sum(s < 0))
      v = v - (1 - b2) * delta**2 * s
    elif kind == "adam":
      v = b2 * v + (1 - b2) * delta**2
    step = eta(t) if callable(eta) else eta
    x = x + step * m / (np.sqrt(v) + tau)
    xs.append(x)
  return xs, signs


def _deltas(params, seed=0):
  rng = np.random.default_rng(seed)
  return [jax.tree.map(lambda p, s=s: jnp.asarray(s * rng.normal(size=p.shape), jnp.float32),
                       params) for s in SCALES]


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


# kind, algorithm builder, hyperparameters given to it (None: its defaults), the
# hyperparameters Algorithm 2 then runs with.
CASES = [
    ("adam", lambda **k: fedadam(MODEL, optax.sgd(0.1), LOCAL, 0.05, **k), None,
     dict(b1=0.9, b2=0.99, tau=1e-3)),
    ("adam", lambda **k: fedadam(MODEL, optax.sgd(0.1), LOCAL, 0.05, **k),
     dict(b1=0.5, b2=0.8, tau=1e-2), dict(b1=0.5, b2=0.8, tau=1e-2)),
    ("yogi", lambda **k: fedyogi(MODEL, optax.sgd(0.1), LOCAL, 0.05, **k), None,
     dict(b1=0.9, b2=0.99, tau=1e-3)),
    ("yogi", lambda **k: fedyogi(MODEL, optax.sgd(0.1), LOCAL, 0.05, **k),
     dict(b1=0.5, b2=0.8, tau=1e-2), dict(b1=0.5, b2=0.8, tau=1e-2)),
    ("adagrad", lambda **k: fedadagrad(MODEL, optax.sgd(0.1), LOCAL, 0.05, **k), None,
     dict(b1=0.0, b2=None, tau=1e-3)),
    ("adagrad", lambda **k: fedadagrad(MODEL, optax.sgd(0.1), LOCAL, 0.05, **k),
     dict(b1=0.7, tau=1e-2), dict(b1=0.7, b2=None, tau=1e-2)),
]


@pytest.mark.parametrize("kind,build,given,paper", CASES,
                         ids=[f"{c[0]}-{'defaults' if c[2] is None else 'custom'}" for c in CASES])
def test_server_moves_as_algorithm_2_over_several_rounds(kind, build, given, paper):
  alg = build(**(given or {}))
  params = MODEL.init(jax.random.key(0))
  deltas = _deltas(params)
  expected, signs = algorithm2(kind, _flat(params), [_flat(d) for d in deltas], 0.05, **paper)
  if kind == "yogi":
    assert signs[1] > 0 and signs[-1] > 0  # both branches of Yogi's update are exercised
  server_update = jax.jit(alg.server_update)
  state = alg.server_init(params)
  for t, delta in enumerate(deltas):
    state = server_update(state, delta, {})
    np.testing.assert_allclose(_flat(state.params), expected[t], rtol=2e-5, atol=1e-6,
                               err_msg=f"round {t + 1}")


@pytest.mark.parametrize("kind,transform", [
    ("adam", fed_adam(0.3, b1=0.6, b2=0.9, tau=1e-3)),
    ("yogi", fed_yogi(0.3, b1=0.6, b2=0.9, tau=1e-3)),
    ("adagrad", fed_adagrad(0.3, b1=0.6, tau=1e-3)),
])
def test_transform_composed_as_fedavg_does(kind, transform):
  """The transform alone, on -Delta, then optax.apply_updates: x + eta m / (sqrt(v) + tau)."""
  x = {"w": jnp.array([0.5, -1.0, 2.0, 0.0], jnp.float32)}
  deltas = [{"w": jnp.asarray(d, jnp.float32)} for d in
            ([0.1, -0.2, 0.0, 1e-4], [-0.3, 0.2, 5e-4, -1e-4], [1e-3, 0.4, -0.2, 2.0],
             [0.05, -1e-3, 0.3, -0.5], [-2e-4, 0.1, -0.1, 1e-3], [0.2, 0.2, -0.2, -0.2])]
  expected, _ = algorithm2(kind, x["w"], [d["w"] for d in deltas], 0.3, b1=0.6,
                           b2=None if kind == "adagrad" else 0.9, tau=1e-3)
  state = transform.init(x)
  assert isinstance(state[0], FedOptState)
  np.testing.assert_array_equal(state[0].mu["w"], 0.0)
  np.testing.assert_allclose(state[0].nu["w"], 1e-6)
  update = jax.jit(transform.update)
  for t, delta in enumerate(deltas):
    updates, state = update(jax.tree.map(jnp.negative, delta), state, x)
    x = optax.apply_updates(x, updates)
    assert x["w"].dtype == jnp.float32
    np.testing.assert_allclose(x["w"], expected[t], rtol=2e-5, atol=1e-6)
  # The stored moments are Algorithm 2's, mu with the pseudo-gradient's sign.
  ref_m = np.zeros(4)
  for d in deltas:
    ref_m = 0.6 * ref_m + 0.4 * np.asarray(d["w"], np.float64)
  np.testing.assert_allclose(state[0].mu["w"], -ref_m, rtol=1e-5, atol=1e-8)


def test_a_learning_rate_schedule_is_followed_round_by_round():
  schedule = optax.linear_schedule(0.1, 0.01, transition_steps=5)
  params = MODEL.init(jax.random.key(1))
  deltas = _deltas(params, seed=3)
  alg = fedavg(MODEL, optax.sgd(0.1), fed_adam(schedule), LOCAL)
  expected, _ = algorithm2("adam", _flat(params), [_flat(d) for d in deltas],
                           lambda t: float(schedule(t)), b1=0.9, b2=0.99, tau=1e-3)
  state = alg.server_init(params)
  for t, delta in enumerate(deltas):
    state = alg.server_update(state, delta, {})
    np.testing.assert_allclose(_flat(state.params), expected[t], rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("paper,plain,factor", [
    (fed_adam(1.0, tau=1e-3), optax.adam(1.0, b1=0.9, b2=0.99, eps=1e-3), 5),
    (fed_yogi(1.0, tau=1e-3), optax.yogi(1.0, b1=0.9, b2=0.99, eps=1e-3), 1.5),
    (fed_adagrad(1.0, tau=1e-3), optax.adagrad(1.0, eps=1e-3), 50),
], ids=["adam", "yogi", "adagrad"])
def test_optax_twins_take_a_different_first_step(paper, plain, factor):
  """Why the paper's step is its own transform: at tau = 1e-3 optax's first step is far off.

  For Delta = 1e-3, Algorithm 2's first step is eta (1 - b1) Delta / (sqrt(tau^2 + c Delta^2)
  + tau): 0.05 for FedAdam (optax.adam: 0.5, bias-corrected), 0.41 for FedAdagrad
  (optax.adagrad: 0.003, its accumulator starts at 0.1).
  """
  g = {"w": jnp.full((3,), -1e-3, jnp.float32)}  # the pseudo-gradient of Delta = 1e-3
  x = {"w": jnp.zeros((3,), jnp.float32)}
  paper_step, _ = paper.update(g, paper.init(x), x)
  plain_step, _ = plain.update(g, plain.init(x), x)
  ratio = np.asarray(plain_step["w"]) / np.asarray(paper_step["w"])
  assert np.all(ratio > 0)  # the same direction, a different size
  assert np.all(np.maximum(ratio, 1 / ratio) > factor)


@pytest.mark.parametrize("bad", [
    lambda: fed_adam(0.1, b1=1.0), lambda: fed_adam(0.1, b2=-0.1), lambda: fed_adam(0.1, tau=0.0),
    lambda: fed_yogi(0.1, b2=1.0), lambda: fed_adagrad(0.1, b1=-0.5),
    lambda: fed_adagrad(0.1, tau=-1e-3),
])
def test_hyperparameters_outside_algorithm_2_are_refused(bad):
  with pytest.raises(ValueError, match="Reddi"):
    bad()


def test_plain_optax_server_optimizers_stay_available_through_fedavg():
  params = MODEL.init(jax.random.key(0))
  delta = _deltas(params)[0]
  alg = fedavg(MODEL, optax.sgd(0.1), optax.adam(0.05, b1=0.9, b2=0.99, eps=1e-3), LOCAL)
  ref = optax.adam(0.05, b1=0.9, b2=0.99, eps=1e-3)
  updates, _ = ref.update(jax.tree.map(jnp.negative, delta), ref.init(params), params)
  state = alg.server_update(alg.server_init(params), delta, {})
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), state.params,
               optax.apply_updates(params, updates))
