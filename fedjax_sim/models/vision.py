"""The standard federated image benchmarks' models: the FedAvg CNN, the EMNIST CNN with
dropout and ResNet-18 with GroupNorm for CIFAR-100.

Classifiers: `batch["x"]` images (`[H, W]` or `[H, W, C]`; integer pixels are
scaled to [0, 1] except by the ResNet, see `resnet18_gn`), `batch["y"]`
integer labels, softmax cross-entropy, metric `accuracy`. Randomness
(dropout, random crops and flips) draws from the per-client, per-step key the
engine passes when training and is off at evaluation.

References:
  McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks
    from Decentralized Data" (AISTATS): the CNN, 1,663,370 parameters.
  Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR), and their
    code, google-research/federated `utils/models/emnist_models.py`
    (`create_conv_dropout_model`), `resnet_models.py` (`create_resnet18`,
    GroupNorm) and `utils/datasets/cifar100_dataset.py` (crops, flips,
    per-image standardization).
  Hsieh et al. 2020, "The Non-IID Data Quagmire of Decentralized Machine
    Learning" (ICML): GroupNorm in place of BatchNorm.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.core.model import Model
from fedjax_sim.core.registry import MODELS, ModelSection
from fedjax_sim.core.schema import ConfigError, option, positive, rate
from fedjax_sim.models.conv import conv_general_dilated
from fedjax_sim.models.flax_models import classifier_io, flax_classifier

# Every convolution here keeps XLA:CPU's fast weight gradient inside loops (see models.conv).
_Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)


def _as_images(x: jax.Array, *, scale_integers: bool = True) -> jax.Array:
  """`[n, H, W]`, `[n, H, W, C]` or flat square `[n, H*W]` -> float32 `[n, H, W, C]`."""
  if jnp.issubdtype(x.dtype, jnp.integer):
    x = x.astype(jnp.float32) / (255.0 if scale_integers else 1.0)
  x = x.astype(jnp.float32)
  if x.ndim == 2:  # TFF's older EMNIST pipeline stores 784 flat pixels
    side = math.isqrt(x.shape[1])
    x = x.reshape((x.shape[0], side, side))
  if x.ndim == 3:
    x = x[..., None]
  return x


def _image_shape(ctx, kind: str) -> tuple[tuple[int, ...], int]:
  shape, classes = classifier_io(ctx)
  flat_square = len(shape) == 1 and math.isqrt(shape[0]) ** 2 == shape[0]
  if len(shape) not in (2, 3) and not flat_square:
    raise ConfigError(f"model.kind = {kind!r} needs images [H, W] or [H, W, C]; the data's x has "
                      f"per-example shape {shape}.")
  return shape, classes


# -- McMahan et al. 2017 -----------------------------------------------------------


class _FedAvgCNN(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x):
    x = _as_images(x)
    for channels in (32, 64):
      x = nn.relu(_Conv(channels, (5, 5), padding="SAME")(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
    x = nn.relu(nn.Dense(512)(x.reshape((x.shape[0], -1))))
    return nn.Dense(self.num_classes)(x)


def fedavg_cnn(input_shape: Sequence[int], num_classes: int) -> Model:
  """The CNN of McMahan et al. 2017 (TFF's `create_original_fedavg_cnn_model`).

  Conv 5x5 (32, ReLU, 'SAME'), 2x2 max-pool, conv 5x5 (64, ReLU), 2x2
  max-pool, dense 512 (ReLU), dense `num_classes`: 1,663,370 parameters for
  28x28 inputs and 10 classes, the count the paper states.
  """
  return flax_classifier(_FedAvgCNN(num_classes), input_shape)


# -- Reddi et al. 2021, EMNIST -------------------------------------------------------


class _DropoutCNN(nn.Module):
  num_classes: int
  conv_dropout: float
  dense_dropout: float
  dense: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = _as_images(x)
    x = nn.relu(_Conv(32, (3, 3), padding="VALID")(x))
    x = nn.relu(_Conv(64, (3, 3), padding="VALID")(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = nn.Dropout(self.conv_dropout, deterministic=not train)(x)
    x = nn.relu(nn.Dense(self.dense)(x.reshape((x.shape[0], -1))))
    x = nn.Dropout(self.dense_dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


def emnist_cnn(input_shape: Sequence[int], num_classes: int, *, conv_dropout: float = 0.25,
               dense_dropout: float = 0.5, dense: int = 128) -> Model:
  """The EMNIST CNN with dropout of Reddi et al. 2021 (TFF's `create_conv_dropout_model`).

  Conv 3x3 (32, ReLU, 'VALID'), conv 3x3 (64, ReLU), 2x2 max-pool, dropout
  0.25, dense 128 (ReLU), dropout 0.5, dense `num_classes`: 1,206,590
  parameters for 28x28 inputs and 62 classes (1,199,882 for 10, TFF's stated
  count). Dropout draws from the training key.
  """
  return flax_classifier(_DropoutCNN(num_classes, conv_dropout, dense_dropout, dense),
                         input_shape, train_argument="train")


# -- Reddi et al. 2021, CIFAR-100: ResNet-18 with GroupNorm -------------------------


def per_image_standardization(images: jax.Array) -> jax.Array:
  """`tf.image.per_image_standardization`: each image minus its mean, over
  max(its standard deviation, 1 / sqrt(number of its values))."""
  axes = tuple(range(1, images.ndim))
  mean = jnp.mean(images, axis=axes, keepdims=True)
  std = jnp.sqrt(jnp.mean(jnp.square(images - mean), axis=axes, keepdims=True))
  count = int(np.prod(images.shape[1:]))
  return (images - mean) / jnp.maximum(std, 1.0 / math.sqrt(count))


def central_crop(images: jax.Array, size: int) -> jax.Array:
  """The central `size x size` crop (`tf.image.resize_with_crop_or_pad` when cropping)."""
  top = (images.shape[1] - size) // 2
  left = (images.shape[2] - size) // 2
  return images[:, top:top + size, left:left + size]


def random_crop_flip(key: jax.Array, images: jax.Array, size: int, flip: bool) -> jax.Array:
  """Per image, a uniformly placed `size x size` crop (`tf.image.random_crop`) and, if
  `flip`, a left-right flip with probability 1/2 (`tf.image.random_flip_left_right`)."""
  n, height, width, channels = images.shape
  k_top, k_left, k_flip = jax.random.split(key, 3)
  top = jax.random.randint(k_top, (n,), 0, height - size + 1)
  left = jax.random.randint(k_left, (n,), 0, width - size + 1)
  crops = jax.vmap(lambda im, t, l: jax.lax.dynamic_slice(im, (t, l, 0), (size, size, channels)))(
      images, top, left)
  if flip:
    flipped = jax.random.bernoulli(k_flip, 0.5, (n,))
    crops = jnp.where(flipped[:, None, None, None], crops[:, :, ::-1], crops)
  return crops


class _BasicBlock(nn.Module):
  """A pre-activation (ResNet v2) basic block, as TFF's `_basic_block`."""

  filters: int
  strides: int
  pre_activation: bool  # False for the network's first block (TFF's `avoid_norm`)
  groups: int

  @nn.compact
  def __call__(self, x):
    norm = functools.partial(nn.GroupNorm, num_groups=self.groups, epsilon=1e-3)
    conv = functools.partial(_Conv, use_bias=False, padding="SAME")
    y = nn.relu(norm()(x)) if self.pre_activation else x
    y = conv(self.filters, (3, 3), strides=self.strides)(y)
    y = conv(self.filters, (3, 3))(nn.relu(norm()(y)))
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.filters:
      shortcut = norm()(conv(self.filters, (1, 1), strides=self.strides, padding="VALID")(x))
    return shortcut + y


class _ResNetGN(nn.Module):
  num_classes: int
  width: int
  groups: int
  crop: int
  flip: bool
  downsample: bool
  stages: tuple[int, ...] = (2, 2, 2, 2)

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = _as_images(x, scale_integers=False)
    if train:
      x = random_crop_flip(self.make_rng("augment"), x, self.crop, self.flip)
    else:
      x = central_crop(x, self.crop)
    x = per_image_standardization(x)
    norm = functools.partial(nn.GroupNorm, num_groups=self.groups, epsilon=1e-3)
    x = _Conv(self.width, (7, 7), strides=2, padding="SAME", use_bias=False)(x)
    x = nn.relu(norm()(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for i, blocks in enumerate(self.stages):
      for j in range(blocks):
        strides = 2 if self.downsample and i > 0 and j == 0 else 1
        x = _BasicBlock(self.width * 2 ** i, strides, pre_activation=(i, j) != (0, 0),
                        groups=self.groups)(x)
    x = nn.relu(norm()(x))
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def resnet18_gn(input_shape: Sequence[int], num_classes: int, *, groups: int = 2,
                width: int = 64, crop: int = 24, flip: bool = True,
                downsample: bool = False, stages: Sequence[int] = (2, 2, 2, 2)) -> Model:
  """ResNet-18 with GroupNorm, as Reddi et al. 2021 trained on CIFAR-100.

  TFF's `create_resnet18(norm='group')`: ResNet v2 (pre-activation) basic
  blocks [2, 2, 2, 2] of `width` x 1, 2, 4, 8 channels after a 7x7 stride-2
  convolution and a 3x3 stride-2 max-pool, GroupNorm (`groups` = 2, epsilon
  1e-3, tfa's defaults) in place of BatchNorm, no convolution biases, global
  average pooling and a dense output layer. As in TFF, every stage runs at
  stride 1 (TFF never passes its stage strides on); `downsample=True` puts
  He et al.'s stride 2 in the first block of stages 2-4 instead (the same
  parameters). 11,227,812 parameters for 100 classes.

  Preprocessing inside `apply`, as TFF's CIFAR-100 pipeline: images
  `[H, W, C]` (32x32x3) are cast to float (integer pixels are not rescaled:
  the standardization removes the scale, and TFF applies its 1/sqrt(N)
  floor to 0..255 values), cropped to `crop x crop` (a uniformly placed
  crop and, if `flip`, a random left-right flip from the training key; the
  central crop at evaluation), then standardized per image
  (`tf.image.per_image_standardization`). TFF's L2 kernel regularization
  (1e-4) is not part of the loss. `stages` (blocks per stage) is ResNet-18's
  (2, 2, 2, 2) unless changed (e.g. a shallower network for quick tests).
  """
  return flax_classifier(_ResNetGN(num_classes, width, groups, crop, flip, downsample,
                                   tuple(stages)),
                         input_shape, train_argument="train", rng_collection="augment")


# -- registered as model.kind = fedavg_cnn | emnist_cnn | resnet18_gn ----------------



@dataclasses.dataclass(frozen=True, kw_only=True)
class FedAvgCNNConfig(ModelSection):
  """The CNN of McMahan et al. 2017 (exact; 'cnn' is the configurable variant)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class EmnistCNNConfig(ModelSection):
  """The EMNIST CNN with dropout of Reddi et al. 2021."""

  conv_dropout: float = option(0.25, check=(rate, "must be in [0, 1)"))
  dense_dropout: float = option(0.5, check=(rate, "must be in [0, 1)"))
  dense: int = option(128, check=(positive, "must be >= 1"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResNet18GNConfig(ModelSection):
  """ResNet-18 with GroupNorm and 24x24 crops (Reddi et al. 2021, CIFAR-100)."""

  groups: int = option(2, check=(positive, "must be >= 1"), help="GroupNorm groups")
  width: int = option(64, check=(positive, "must be >= 1"), help="channels of the first stage")
  crop: int = option(24, check=(positive, "must be >= 1"), help="side of the square crop")
  flip: bool = option(True, help="random left-right flips in training")
  downsample: bool = option(False, help="stride 2 at stages 2-4 (TFF: false)")
  stages: tuple[int, ...] = option((2, 2, 2, 2), check=(
      lambda t: len(t) >= 1 and all(v >= 1 for v in t), "must list blocks per stage, each >= 1"),
      help="blocks per stage (ResNet-18: 2, 2, 2, 2)")

  def __post_init__(self):
    if self.width % self.groups:
      raise ConfigError(f"model.width = {self.width} must be a multiple of model.groups = "
                        f"{self.groups} (GroupNorm splits the channels into groups).")


@MODELS.register("fedavg_cnn", FedAvgCNNConfig, example={"input_shape": (8, 8)})
def _build_fedavg_cnn(cfg, ctx) -> Model:
  """The FedAvg CNN (McMahan et al. 2017)."""
  return fedavg_cnn(*_image_shape(ctx, "fedavg_cnn"))


@MODELS.register("emnist_cnn", EmnistCNNConfig, example={"input_shape": (8, 8, 1)})
def _build_emnist_cnn(cfg, ctx) -> Model:
  """The EMNIST CNN with dropout (Reddi et al. 2021)."""
  shape, classes = _image_shape(ctx, "emnist_cnn")
  return emnist_cnn(shape, classes, conv_dropout=cfg.conv_dropout,
                    dense_dropout=cfg.dense_dropout, dense=cfg.dense)


def _images_example(rng: np.random.Generator, n: int) -> dict:
  return {"x": rng.integers(0, 256, size=(n, 10, 10, 3)).astype(np.uint8),
          "y": rng.integers(0, 3, size=n).astype(np.int32)}


@MODELS.register("resnet18_gn", ResNet18GNConfig, example={
    "batch": _images_example, "num_classes": 3,
    "config": {"width": 4, "crop": 8, "stages": [1]}})
def _build_resnet18_gn(cfg, ctx) -> Model:
  """ResNet-18 with GroupNorm (Reddi et al. 2021)."""
  shape, classes = classifier_io(ctx)
  if len(shape) not in (2, 3):
    raise ConfigError(f"model.kind = 'resnet18_gn' needs images [H, W] or [H, W, C]; the data's "
                      f"x has per-example shape {shape}.")
  if cfg.crop > min(shape[0], shape[1]):
    raise ConfigError(f"model.crop = {cfg.crop} is larger than the images ({shape[0]}x"
                      f"{shape[1]}); use model.crop <= {min(shape[0], shape[1])}.")
  return resnet18_gn(shape, classes, groups=cfg.groups, width=cfg.width, crop=cfg.crop,
                     flip=cfg.flip, downsample=cfg.downsample, stages=cfg.stages)
