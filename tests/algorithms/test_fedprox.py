import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_sim.algorithms import fedprox, proximal_term
from fedjax_sim.core.algorithm import ClientData, LocalConfig
from fedjax_sim.models import logistic_regression


def _client(seed=0, n=6):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 5)).astype(np.float32)
  y = rng.integers(0, 3, n).astype(np.int32)
  return ClientData({"x": jnp.asarray(x), "y": jnp.asarray(y)}, jnp.ones(n, bool))


def _np_grad(w, b, x, y):
  logits = x @ w + b
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  p[np.arange(len(y)), y] -= 1
  return x.T @ p / len(y), p.mean(0)


def test_proximal_gradient_is_mu_times_distance():
  anchor = {"w": jnp.array([1.0, -2.0]), "b": jnp.array(0.5)}
  params = {"w": jnp.array([0.0, 1.0]), "b": jnp.array(2.0)}
  grads = jax.grad(proximal_term(anchor, 0.3))(params)
  np.testing.assert_allclose(grads["w"], 0.3 * np.array([-1.0, 3.0]), rtol=1e-6)
  np.testing.assert_allclose(grads["b"], 0.3 * 1.5, rtol=1e-6)


def test_fedprox_two_local_steps_match_the_hand_derived_update():
  """Step 1 is plain SGD (w = w_global); step 2 adds mu (w1 - w_global) to the gradient."""
  model = logistic_regression((5,), 3)
  data = _client()
  mu, lr = 0.7, 0.4
  local = LocalConfig(batch_size=6, epochs=2, shuffle=False)
  alg = fedprox(model, optax.sgd(lr), optax.sgd(1.0), local, mu=mu)
  p0 = model.init(jax.random.key(0))
  out = jax.jit(alg.client_update)(p0, data, None, jax.random.key(1))
  w0 = np.asarray(p0["Dense_0"]["kernel"], np.float64)
  b0 = np.asarray(p0["Dense_0"]["bias"], np.float64)
  x, y = np.asarray(data.examples["x"], np.float64), np.asarray(data.examples["y"])
  gw, gb = _np_grad(w0, b0, x, y)
  w1, b1 = w0 - lr * gw, b0 - lr * gb
  gw, gb = _np_grad(w1, b1, x, y)
  w2, b2 = w1 - lr * (gw + mu * (w1 - w0)), b1 - lr * (gb + mu * (b1 - b0))
  np.testing.assert_allclose(out.update["Dense_0"]["kernel"], w2 - w0, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(out.update["Dense_0"]["bias"], b2 - b0, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_fedprox_minibatch_epochs_match_numpy_local_sgd(mu):
  """3 epochs of 3 minibatches (batch 2, fixed order): w <- w - lr (grad_B(w) + mu (w - w0)).

  With mu = 0 this is plain local SGD (FedAvg's client), computed here in numpy, not
  by another fedjax_sim algorithm.
  """
  model = logistic_regression((5,), 3)
  data = _client(1)
  lr, b, epochs = 0.3, 2, 3
  local = LocalConfig(batch_size=b, epochs=epochs, shuffle=False)
  p0 = model.init(jax.random.key(0))
  out = jax.jit(fedprox(model, optax.sgd(lr), optax.sgd(1.0), local, mu=mu).client_update)(
      p0, data, None, jax.random.key(2))
  w0 = np.asarray(p0["Dense_0"]["kernel"], np.float64)
  b0 = np.asarray(p0["Dense_0"]["bias"], np.float64)
  x, y = np.asarray(data.examples["x"], np.float64), np.asarray(data.examples["y"])
  w, bias = w0.copy(), b0.copy()
  for _ in range(epochs):
    for start in range(0, len(y), b):
      gw, gb = _np_grad(w, bias, x[start:start + b], y[start:start + b])
      w, bias = w - lr * (gw + mu * (w - w0)), bias - lr * (gb + mu * (bias - b0))
  np.testing.assert_allclose(out.update["Dense_0"]["kernel"], w - w0, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(out.update["Dense_0"]["bias"], bias - b0, rtol=1e-4, atol=1e-6)
  assert float(out.metrics["steps"]) == epochs * len(y) // b


def test_negative_mu_is_rejected():
  with pytest.raises(ValueError, match="mu"):
    fedprox(logistic_regression((5,), 3), optax.sgd(0.1), optax.sgd(1.0),
            LocalConfig(batch_size=2), mu=-1.0)
