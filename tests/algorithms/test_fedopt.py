"""FedAdam / FedYogi / FedAdagrad server steps equal optax's own update on -mean(delta)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_sim.algorithms import fedadagrad, fedadam, fedyogi
from fedjax_sim.core.algorithm import LocalConfig
from fedjax_sim.models import logistic_regression

MODEL = logistic_regression((4,), 3)
LOCAL = LocalConfig(batch_size=2)


@pytest.mark.parametrize("factory,reference", [
    (lambda: fedadam(MODEL, optax.sgd(0.1), LOCAL, 0.05, b1=0.8, b2=0.95, tau=1e-2),
     optax.adam(0.05, b1=0.8, b2=0.95, eps=1e-2)),
    (lambda: fedyogi(MODEL, optax.sgd(0.1), LOCAL, 0.05, b1=0.8, b2=0.95, tau=1e-2),
     optax.yogi(0.05, b1=0.8, b2=0.95, eps=1e-2)),
    (lambda: fedadagrad(MODEL, optax.sgd(0.1), LOCAL, 0.05, tau=1e-2),
     optax.adagrad(0.05, 0.0, eps=1e-2)),
])
def test_server_step_equals_optax_on_the_pseudo_gradient(factory, reference):
  alg = factory()
  params = MODEL.init(jax.random.key(0))
  state = alg.server_init(params)
  ref_params, ref_state = params, reference.init(params)
  rng = np.random.default_rng(0)
  for _ in range(3):
    delta = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    state = alg.server_update(state, delta, {})
    updates, ref_state = reference.update(jax.tree.map(jnp.negative, delta), ref_state,
                                          ref_params)
    ref_params = optax.apply_updates(ref_params, updates)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), state.params, ref_params)
