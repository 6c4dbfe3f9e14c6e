import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim.models import cnn, logistic_regression, mlp, num_params


def _np_cross_entropy(logits, y):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(1, keepdims=True)
  log_p = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
  return -log_p[np.arange(len(y)), y]


def _batch(n, shape, num_classes, seed=0):
  rng = np.random.default_rng(seed)
  return {"x": jnp.asarray(rng.normal(size=(n, *shape)).astype(np.float32)),
          "y": jnp.asarray(rng.integers(0, num_classes, n).astype(np.int32))}


def _count(params):
  return sum(int(np.size(x)) for x in jax.tree.leaves(params))


def test_parameter_counts():
  assert num_params(logistic_regression((64,), 10)) == 64 * 10 + 10
  assert num_params(mlp((64,), 10)) == 64 * 128 + 128 + 128 * 10 + 10
  assert num_params(mlp((8, 8), 10, hidden=(8, 4))) == 64 * 8 + 8 + 8 * 4 + 4 + 4 * 10 + 10
  # Two 5x5 SAME convs with 2x2 pooling: 8x8 -> 4x4 -> 2x2, then dense.
  c1, c2, dense, k = 2, 3, 4, 5
  expected = (25 * 1 * c1 + c1) + (25 * c1 * c2 + c2) + (2 * 2 * c2 * dense + dense) + (
      dense * k + k)
  assert num_params(cnn((8, 8), k, channels=(c1, c2), dense=dense)) == expected
  assert num_params(cnn((8, 8, 3), k, channels=(c1, c2), dense=dense)) == expected + 25 * 2 * c1
  # num_params agrees with real initialised parameters.
  model = mlp((5,), 3, hidden=(8,))
  assert _count(model.init(jax.random.key(0))) == num_params(model) == 5 * 8 + 8 + 8 * 3 + 3


def test_logistic_regression_is_an_affine_map_with_softmax_cross_entropy():
  model = logistic_regression((2, 3), 4)  # inputs are flattened
  params = model.init(jax.random.key(1))
  batch = _batch(5, (2, 3), 4)
  logits = model.apply(params, batch, train=False)
  assert logits.shape == (5, 4)
  w = np.asarray(params["Dense_0"]["kernel"], np.float64)
  b = np.asarray(params["Dense_0"]["bias"], np.float64)
  expected = np.asarray(batch["x"], np.float64).reshape(5, 6) @ w + b
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
  loss = model.loss(logits, batch)
  assert loss.shape == (5,)
  np.testing.assert_allclose(loss, _np_cross_entropy(expected, np.asarray(batch["y"])),
                             rtol=1e-5, atol=1e-6)


def test_mlp_forward_and_loss_match_numpy():
  model = mlp((4,), 3, hidden=(8,))
  params = model.init(jax.random.key(2))
  batch = _batch(6, (4,), 3, seed=1)
  logits = model.apply(params, batch, train=True, key=jax.random.key(0))
  assert logits.shape == (6, 3)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(batch["x"], np.float64)
  h = np.maximum(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"], 0.0)
  expected = h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(model.loss(logits, batch),
                             _np_cross_entropy(expected, np.asarray(batch["y"])), rtol=1e-5,
                             atol=1e-6)


def test_loss_of_hand_logits():
  model = logistic_regression((1,), 3)
  logits = jnp.array([[0.0, 0.0, 0.0], [10.0, 0.0, -10.0], [1.0, 2.0, 3.0]])
  batch = {"x": jnp.zeros((3, 1)), "y": jnp.array([1, 0, 0])}
  expected = [np.log(3.0), -10.0 + np.log(np.exp(10.0) + 1.0 + np.exp(-10.0)),
              -1.0 + np.log(np.exp(1.0) + np.exp(2.0) + np.exp(3.0))]
  np.testing.assert_allclose(model.loss(logits, batch), expected, rtol=1e-6, atol=1e-6)


def test_accuracy_metric_is_zero_or_one_per_example():
  model = logistic_regression((3,), 4)
  # Zero kernel, bias peaked at class 2: every prediction is class 2.
  params = {"Dense_0": {"kernel": jnp.zeros((3, 4)), "bias": jnp.array([0.0, 0.5, 2.0, 1.0])}}
  batch = {"x": jnp.ones((5, 3)), "y": jnp.array([2, 0, 2, 3, 1], jnp.int32)}
  metrics = model.metrics(model.apply(params, batch), batch)
  assert list(metrics) == ["accuracy"]
  np.testing.assert_array_equal(metrics["accuracy"], [1.0, 0.0, 1.0, 0.0, 0.0])
  # On random parameters it is argmax == label.
  params = model.init(jax.random.key(3))
  batch = _batch(8, (3,), 4, seed=2)
  logits = model.apply(params, batch)
  acc = np.asarray(model.metrics(logits, batch)["accuracy"])
  assert set(np.unique(acc)) <= {0.0, 1.0}
  np.testing.assert_array_equal(acc, np.argmax(np.asarray(logits), -1) == np.asarray(batch["y"]))


@pytest.fixture(scope="module")
def tiny_cnns():
  kw = dict(channels=(2, 3), dense=4)
  return cnn((8, 8), 5, **kw), cnn((8, 8, 1), 5, **kw), cnn((8, 8, 3), 5, **kw)


def test_cnn_accepts_hw_and_hwc_inputs(tiny_cnns):
  gray, gray_c, rgb = tiny_cnns
  x = _batch(3, (8, 8), 5)
  params = gray.init(jax.random.key(0))
  logits = gray.apply(params, x)
  assert logits.shape == (3, 5)
  assert np.all(np.isfinite(np.asarray(logits)))
  # [H, W] is [H, W, 1]: same parameter shapes, same outputs on x[..., None].
  params_c = gray_c.init(jax.random.key(0))
  assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, params_c)
  np.testing.assert_allclose(gray_c.apply(params, {"x": x["x"][..., None], "y": x["y"]}), logits,
                             rtol=1e-5, atol=1e-6)
  xr = _batch(2, (8, 8, 3), 5, seed=1)
  out = rgb.apply(rgb.init(jax.random.key(1)), xr)
  assert out.shape == (2, 5)
  assert rgb.loss(out, xr).shape == (2,)
  assert rgb.metrics(out, xr)["accuracy"].shape == (2,)
  # Channels are the last axis and feed the first convolution: with the gray model's weights
  # on channel 0 and zeros on channels 1, 2, the RGB model is the gray one on channel 0.
  widen = lambda g, r: g if g.shape == r.shape else jnp.concatenate(
      [g, jnp.zeros(g.shape[:2] + (2,) + g.shape[3:], g.dtype)], axis=2)
  params_rgb = jax.tree.map(widen, params, rgb.init(jax.random.key(1)))
  noise = _batch(3, (8, 8, 2), 5, seed=2)["x"]
  np.testing.assert_allclose(
      rgb.apply(params_rgb, {"x": jnp.concatenate([x["x"][..., None], noise], -1), "y": x["y"]}),
      logits, rtol=1e-5, atol=1e-6)
