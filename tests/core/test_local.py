import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim.core.algorithm import ClientData, LocalConfig
from fedjax_sim.core.local import local_train
from fedjax_sim.models import logistic_regression, mlp


def _client(n, pad_to, seed=0):
  rng = np.random.default_rng(seed)
  x = np.zeros((pad_to, 6), np.float32)
  y = np.zeros((pad_to,), np.int32)
  x[:n] = rng.normal(size=(n, 6))
  y[:n] = rng.integers(0, 4, n)
  x[n:] = 1e3  # padding content must not matter
  mask = np.arange(pad_to) < n
  return ClientData({"x": jnp.asarray(x), "y": jnp.asarray(y)}, jnp.asarray(mask))


def _train(model, data, local, opt):
  params = model.init(jax.random.key(0))
  fn = jax.jit(lambda p, d: local_train(model, opt, p, d, local, jax.random.key(9)))
  return fn(params, data)


def test_padded_client_gives_exactly_the_unpadded_update():
  """3 real examples padded to 32 slots: the same update, bit for bit, as unpadded (8 slots)."""
  model = mlp((6,), 4, hidden=(8,))
  for shuffle in (False, True):
    local = LocalConfig(batch_size=8, epochs=2, shuffle=shuffle)
    for opt in (optax.sgd(0.1), optax.adam(0.01)):
      short, s_stats = _train(model, _client(3, 8), local, opt)
      padded, p_stats = _train(model, _client(3, 32), local, opt)
      jax.tree.map(np.testing.assert_array_equal, short, padded)  # bit for bit
      assert float(p_stats["examples"]) == 6.0 and float(p_stats["steps"]) == 2.0
      np.testing.assert_allclose(p_stats["loss_sum"], s_stats["loss_sum"], rtol=1e-6)


def test_one_full_batch_sgd_step_matches_numpy_gradient():
  model = logistic_regression((6,), 4)
  data = _client(5, 8, seed=3)
  params, _ = _train(model, data, LocalConfig(batch_size=8, epochs=1, shuffle=False),
                     optax.sgd(0.5))
  p0 = model.init(jax.random.key(0))
  w, b = np.asarray(p0["Dense_0"]["kernel"]), np.asarray(p0["Dense_0"]["bias"])
  x, y = np.asarray(data.examples["x"])[:5], np.asarray(data.examples["y"])[:5]
  logits = x @ w + b
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  p[np.arange(5), y] -= 1
  np.testing.assert_allclose(params["Dense_0"]["kernel"], w - 0.5 * x.T @ p / 5, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(params["Dense_0"]["bias"], b - 0.5 * p.mean(0), rtol=1e-5, atol=1e-6)
