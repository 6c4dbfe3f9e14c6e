"""The image benchmark models: parameter counts against the papers' and TFF's, preprocessing
against numpy, and randomness (dropout, crops, flips) drawn from the training key only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim.core.registry import MODELS, Context
from fedjax_sim.core.schema import ConfigError
from fedjax_sim.models import emnist_cnn, fedavg_cnn, num_params, resnet18_gn
from fedjax_sim.models.vision import central_crop, per_image_standardization, random_crop_flip
from fedjax_sim.runner.config import config_from_dict
from tests.conftest import packed_dataset


def _images(n, shape, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  if dtype == np.uint8:
    x = rng.integers(0, 256, size=(n, *shape)).astype(np.uint8)
  else:
    x = rng.uniform(size=(n, *shape)).astype(dtype)
  return {"x": jnp.asarray(x), "y": jnp.asarray(rng.integers(0, 3, n).astype(np.int32))}


def _random_params(model, seed=0):
  """Parameters of the model's shapes drawn by numpy: no initializer is compiled (Flax's
  truncated-normal initializers compile slowly on CPU; `model.init` is the contract suite's)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype), shapes)


def _compiled(model):
  """`(train, evaluate)`: the model's apply compiled once each, `(params, batch, key)`."""
  return (jax.jit(lambda p, b, k: model.apply(p, b, train=True, key=k)),
          jax.jit(lambda p, b, k: model.apply(p, b, train=False, key=k)))


def _resnet18_gn_count(channels: int, width: int, classes: int) -> int:
  """TFF's create_resnet18(norm='group') counted by hand: convolutions without biases,
  GroupNorm = scale + offset per channel, pre-activation basic blocks [2, 2, 2, 2], a
  1x1 convolution + GroupNorm shortcut where the channels change, final GroupNorm, dense."""
  def conv(k, cin, cout):
    return k * k * cin * cout

  def gn(c):
    return 2 * c

  total = conv(7, channels, width) + gn(width)
  cin = width
  for stage in range(4):
    f = width * 2 ** stage
    for block in range(2):
      first = stage == 0 and block == 0  # no pre-activation norm (TFF's avoid_norm)
      total += (0 if first else gn(cin)) + conv(3, cin, f) + gn(f) + conv(3, f, f)
      if cin != f:
        total += conv(1, cin, f) + gn(f)
      cin = f
  return total + gn(cin) + cin * classes + classes


def test_parameter_counts_match_the_papers_and_tff():
  # McMahan et al. 2017 state 1,663,370 for the MNIST CNN (TFF's docstring repeats it).
  assert num_params(fedavg_cnn((28, 28), 10)) == 1_663_370
  assert num_params(fedavg_cnn((28, 28, 1), 62)) == 1_663_370 + 52 * 513
  # TFF's create_conv_dropout_model docstring: 1,199,882 for 10 classes; EMNIST-62
  # adds 52 outputs of 128 weights + 1 bias.
  assert num_params(emnist_cnn((28, 28, 1), 10)) == 1_199_882
  assert num_params(emnist_cnn((28, 28, 1), 62)) == 1_206_590 == 1_199_882 + 52 * 129
  # ResNet-18 (GroupNorm) for CIFAR-100, by hand; strides change no parameter.
  assert _resnet18_gn_count(3, 64, 100) == 11_227_812
  assert num_params(resnet18_gn((32, 32, 3), 100)) == 11_227_812
  assert num_params(resnet18_gn((32, 32, 3), 100, downsample=True)) == 11_227_812
  assert num_params(resnet18_gn((12, 12, 3), 7, width=4, crop=8)) == _resnet18_gn_count(3, 4, 7)


def test_cnns_take_images_in_every_layout_and_scale_integer_pixels():
  model = fedavg_cnn((8, 8), 3)
  params = _random_params(model)
  batch = _images(4, (8, 8), dtype=np.uint8)
  logits = model.apply(params, batch, train=False)
  scaled = {"x": batch["x"].astype(jnp.float32) / 255.0, "y": batch["y"]}
  np.testing.assert_allclose(model.apply(params, scaled, train=False), logits, rtol=1e-5,
                             atol=1e-6)
  for x in (scaled["x"][..., None], scaled["x"].reshape((4, 64))):  # [H, W, 1], flat 784-style
    np.testing.assert_allclose(model.apply(params, {"x": x}, train=False), logits, rtol=1e-5,
                               atol=1e-6)


def test_emnist_dropout_draws_from_the_key_only_in_training():
  model = emnist_cnn((8, 8), 3)
  params = _random_params(model)
  batch = _images(4, (8, 8), seed=1)
  k1, k2 = jax.random.key(1), jax.random.key(2)
  train, evaluate = _compiled(model)
  a = train(params, batch, k1)
  np.testing.assert_array_equal(a, train(params, batch, k1))
  assert not np.allclose(a, train(params, batch, k2))
  evaluation = evaluate(params, batch, k1)
  np.testing.assert_array_equal(evaluation, evaluate(params, batch, k2))
  np.testing.assert_allclose(evaluation, model.apply(params, batch, train=False, key=None),
                             rtol=1e-5, atol=1e-6)
  assert not np.allclose(a, evaluation)
  # Without dropout, training and evaluation agree.
  plain = emnist_cnn((8, 8), 3, conv_dropout=0.0, dense_dropout=0.0)
  np.testing.assert_allclose(plain.apply(params, batch, train=True, key=k1), evaluation,
                             rtol=1e-5, atol=1e-6)


def test_per_image_standardization_matches_tensorflows_formula():
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 255, size=(2, 4, 4, 3)).astype(np.float32)
  x[1] = 7.0  # a constant image: std 0, floored at 1/sqrt(48)
  out = np.asarray(per_image_standardization(jnp.asarray(x)))
  for i in range(2):
    mean, std = x[i].mean(), x[i].std()
    expected = (x[i] - mean) / max(std, 1 / np.sqrt(48))
    np.testing.assert_allclose(out[i], expected, rtol=1e-5, atol=1e-5)


def test_crops_central_at_evaluation_random_from_the_key_in_training():
  x = np.arange(2 * 32 * 32 * 3, dtype=np.float32).reshape((2, 32, 32, 3))
  np.testing.assert_array_equal(central_crop(jnp.asarray(x), 24), x[:, 4:28, 4:28])
  k1, k2 = jax.random.key(1), jax.random.key(2)
  crops = np.asarray(random_crop_flip(k1, jnp.asarray(x), 24, flip=True))
  np.testing.assert_array_equal(crops, random_crop_flip(k1, jnp.asarray(x), 24, flip=True))
  # Every crop is a window of its image (within the 9 x 9 offsets), flipped or not.
  seen = set()
  for i in range(16):
    key = jax.random.key(100 + i)
    crop = np.asarray(random_crop_flip(key, jnp.asarray(x[:1]), 24, flip=True))[0]
    matches = [(t, l, f) for t in range(9) for l in range(9) for f in (False, True)
               if np.array_equal(crop, (x[0, t:t + 24, l:l + 24][:, ::-1] if f
                                        else x[0, t:t + 24, l:l + 24]))]
    assert len(matches) == 1
    seen.add(matches[0])
  assert len(seen) > 8 and {f for _, _, f in seen} == {False, True}
  assert not np.array_equal(crops, random_crop_flip(k2, jnp.asarray(x), 24, flip=True))
  unflipped = np.asarray(random_crop_flip(k1, jnp.asarray(x), 24, flip=False))
  assert any(np.array_equal(unflipped[0], x[0, t:t + 24, l:l + 24])
             for t in range(9) for l in range(9))


def test_resnet_augments_from_the_key_and_is_deterministic_at_evaluation():
  model = resnet18_gn((10, 10, 3), 3, width=2, crop=8)
  params = _random_params(model)
  batch = _images(3, (10, 10, 3), dtype=np.uint8)
  k1, k2 = jax.random.key(1), jax.random.key(2)
  train, evaluate = _compiled(model)
  a = train(params, batch, k1)
  assert a.shape == (3, 3)
  np.testing.assert_array_equal(a, train(params, batch, k1))
  assert not np.allclose(a, train(params, batch, k2))
  evaluation = evaluate(params, batch, k1)
  np.testing.assert_array_equal(evaluation, evaluate(params, batch, k2))
  # Integer pixels are only cast: per-image standardization removes the scale.
  as_float = {"x": batch["x"].astype(jnp.float32), "y": batch["y"]}
  np.testing.assert_allclose(evaluate(params, as_float, k1), evaluation, rtol=1e-5, atol=1e-6)


def _build(kind, model_section, shape, num_classes=3):
  data = packed_dataset([3], num_features=int(np.prod(shape)))
  data = type(data).from_offsets({"x": data.features["x"].reshape((-1, *shape)),
                                  "y": data.features["y"]}, np.array([0, 3]))
  cfg = config_from_dict({"model": {"kind": kind, **model_section}}).model
  return MODELS.get(kind).build(cfg, Context(train=data, num_classes=num_classes))


def test_config_errors():
  with pytest.raises(ConfigError, match="model.width = 6 must be a multiple of model.groups = 4"):
    config_from_dict({"model": {"kind": "resnet18_gn", "width": 6, "groups": 4}})
  with pytest.raises(ConfigError, match="model.conv_dropout = 1.0 must be in"):
    config_from_dict({"model": {"kind": "emnist_cnn", "conv_dropout": 1.0}})
  with pytest.raises(ConfigError, match="model.crop = 24 is larger than the images"):
    _build("resnet18_gn", {}, (16, 16, 3))
  with pytest.raises(ConfigError, match="needs images"):
    _build("fedavg_cnn", {}, (5,))
  with pytest.raises(ConfigError, match="needs images"):
    _build("emnist_cnn", {}, (2, 2, 2, 2))
