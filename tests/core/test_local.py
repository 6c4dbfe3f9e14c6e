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
  fn = jax.jit(lambda p, d: local_train(model, opt, p, d, local, key=jax.random.key(9)))
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


# -- local DP-SGD ----------------------------------------------------------------


def _per_example_grads_by_hand(model, params, data, n):
  """One jax.grad per example, in a Python loop (independent of the vmapped path)."""
  out = []
  for i in range(n):
    ex = {k: v[i:i + 1] for k, v in data.examples.items()}
    g = jax.grad(lambda p: model.loss(model.apply(p, ex, train=True, key=None), ex)[0])(params)
    out.append(np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]))
  return np.stack(out)


def test_dp_sgd_step_is_the_mean_of_clipped_per_example_gradients():
  """n <= batch: the sampled batch is the whole client, so one step is deterministic at z = 0."""
  model = logistic_regression((6,), 4)
  data = _client(5, 8)
  clip, lr = 0.3, 0.5
  local = LocalConfig(batch_size=8, epochs=1, dp_clip_norm=clip, dp_noise_multiplier=0.0)
  params = model.init(jax.random.key(0))
  trained, stats = _train(model, data, local, optax.sgd(lr))
  grads = _per_example_grads_by_hand(model, params, data, 5)
  norms = np.linalg.norm(grads, axis=1)
  clipped = grads * np.minimum(1.0, clip / norms)[:, None]
  expected = -lr * clipped.sum(0) / 5
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
  np.testing.assert_allclose(flat(trained) - flat(params), expected, rtol=1e-5, atol=1e-7)
  assert np.linalg.norm(expected) <= lr * clip + 1e-7  # the step is bounded by lr * C
  assert float(stats["clipped_examples"]) == float(np.sum(norms > clip))
  assert float(stats["steps"]) == 1.0


def test_dp_sgd_noise_has_std_sigma_c_over_the_batch():
  model = logistic_regression((100,), 20)  # 2,020 parameters
  rng = np.random.default_rng(1)
  data = ClientData({"x": jnp.asarray(rng.normal(size=(8, 100)), jnp.float32),
                     "y": jnp.asarray(rng.integers(0, 20, 8), jnp.int32)}, jnp.ones(8, bool))
  z, clip = 2.0, 0.5
  noisy, _ = _train(model, data, LocalConfig(8, 1, dp_clip_norm=clip, dp_noise_multiplier=z),
                    optax.sgd(1.0))
  clean, _ = _train(model, data, LocalConfig(8, 1, dp_clip_norm=clip, dp_noise_multiplier=0.0),
                    optax.sgd(1.0))
  diff = np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree.leaves(noisy),
                                                         jax.tree.leaves(clean))])
  expected = z * clip / 8
  assert abs(diff.std() / expected - 1) < 5 / np.sqrt(2 * diff.size)  # 5 sd of the sample std


def test_dp_sgd_runs_the_clients_own_steps_on_sampled_batches():
  """n = 10, batch 4: ceil(10/4) = 3 steps an epoch even when the block runs 6."""
  model = logistic_regression((6,), 4)
  data = _client(10, 24)._replace(num_steps=6)
  local = LocalConfig(batch_size=4, epochs=2, dp_clip_norm=1.0, dp_noise_multiplier=1.0)
  _, stats = _train(model, data, local, optax.sgd(0.1))
  assert float(stats["steps"]) == 6.0  # 3 per epoch
  assert float(stats["examples"]) == 24.0  # every step sees min(4, 10) = 4 real examples


def test_ratio_metrics_sum_numerator_and_denominator_over_real_examples():
  from fedjax_sim.core.local import masked_loss
  from fedjax_sim.core.model import Model
  # Per example: a count of "tokens" and of correct ones; the third example is padding.
  model = Model(init=lambda k: {}, apply=lambda p, b, *, train, key: b["x"],
                loss=lambda out, b: out[:, 0],
                metrics=lambda out, b: {"acc": (out[:, 1], out[:, 2]), "plain": out[:, 0]})
  x = jnp.array([[1.0, 2.0, 5.0], [3.0, 1.0, 4.0], [100.0, 100.0, 100.0]])
  loss, stats = masked_loss(model, {}, {"x": x}, jnp.array([True, True, False]), key=None)
  assert float(loss) == 2.0
  assert float(stats["acc_sum"]) == 3.0 and float(stats["acc_count"]) == 9.0
  assert float(stats["plain_sum"]) == 4.0 and "plain_count" not in stats
