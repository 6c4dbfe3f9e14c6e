"""Flax models wrapped as pure `Model` records.

Classification models take `batch["x"]` and integer labels `batch["y"]`; the
loss is softmax cross-entropy and the metric is accuracy.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedjax_sim.core.model import Model
from fedjax_sim.models.conv import conv_general_dilated
from fedjax_sim.core.registry import MODELS, ModelSection
from fedjax_sim.core.schema import ConfigError, option, positive


class _LogReg(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


class _MLP(nn.Module):
  hidden: Sequence[int]
  num_classes: int

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


class _CNN(nn.Module):
  """Two conv(5x5)+maxpool layers then a dense layer: the FedAvg-paper shape, scaled down."""

  channels: Sequence[int]
  dense: int
  num_classes: int

  @nn.compact
  def __call__(self, x):
    if x.ndim == 3:
      x = x[..., None]
    for c in self.channels:
      x = nn.relu(nn.Conv(c, (5, 5), padding="SAME", conv_general_dilated=conv_general_dilated)(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.dense)(x))
    return nn.Dense(self.num_classes)(x)


def _classifier(module: nn.Module, input_shape: Sequence[int]) -> Model:
  def init(key):
    return module.init(key, jnp.zeros((1, *input_shape), jnp.float32))["params"]

  def apply(params, batch, *, train=False, key=None):
    del train, key  # none of these models has dropout
    return module.apply({"params": params}, batch["x"])

  def loss(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

  def metrics(logits, batch):
    return {"accuracy": (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)}

  return Model(init, apply, loss, metrics)


def flax_classifier(module, input_shape: Sequence[int], *, train_argument: str | None = None,
                    rng_collection: str = "dropout") -> Model:
  """A classifier `Model` from your own Flax module (linen or nnx).

  Inputs are `batch["x"]` (per-example shape `input_shape`), labels the
  integer `batch["y"]`; the loss is softmax cross-entropy, the metric
  accuracy.

  Args:
    module: a `flax.linen.Module` instance, or for Flax NNX a factory
      `rngs -> nnx.Module` (e.g. `lambda rngs: MyNet(rngs=rngs)`), so that
      `init(key)` builds fresh parameters from the run's key. NNX modules
      are treated as pure functions of all their state (use parameters only:
      no batch statistics).
    input_shape: per-example input shape.
    train_argument: linen only: the name of the module's boolean argument that
      turns training behaviour (dropout) on, e.g. "train"; the per-client,
      per-step key then feeds the `rng_collection` RNG stream. None: the
      module has no such argument.
    rng_collection: the linen RNG collection dropout draws from.
  """
  if isinstance(module, nn.Module):
    def init(key):
      x = jnp.zeros((1, *input_shape), jnp.float32)
      extra = {train_argument: False} if train_argument else {}
      return module.init(key, x, **extra)["params"]

    def apply(params, batch, *, train=False, key=None):
      extra = {train_argument: train} if train_argument else {}
      rngs = {rng_collection: key} if train and key is not None and train_argument else None
      return module.apply({"params": params}, batch["x"], rngs=rngs, **extra)
  elif callable(module):
    from flax import nnx
    abstract = nnx.eval_shape(lambda: module(nnx.Rngs(0)))
    if not isinstance(abstract, nnx.Module):
      raise TypeError(f"flax_classifier: the factory returned {type(abstract).__name__}, not an "
                      "nnx.Module; pass `lambda rngs: MyNet(rngs=rngs)`.")
    graphdef, abstract_state = nnx.split(abstract)

    def init(key):
      _, state = nnx.split(module(nnx.Rngs(key)))
      return nnx.to_pure_dict(state)

    def apply(params, batch, *, train=False, key=None):
      del train, key
      state = jax.tree.map(lambda a: a, abstract_state)
      nnx.replace_by_pure_dict(state, params)
      return nnx.merge(graphdef, state)(batch["x"])
  else:
    raise TypeError(f"flax_classifier: expected a flax.linen.Module or a factory `rngs -> "
                    f"nnx.Module`; got {type(module).__name__}.")

  def loss(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

  def metrics(logits, batch):
    return {"accuracy": (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)}

  return Model(init, apply, loss, metrics)


def logistic_regression(input_shape: Sequence[int], num_classes: int) -> Model:
  """Multinomial logistic regression."""
  return _classifier(_LogReg(num_classes), input_shape)


def mlp(input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (128,)) -> Model:
  """A ReLU multilayer perceptron."""
  return _classifier(_MLP(tuple(hidden), num_classes), input_shape)


def cnn(input_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (16, 32),
        dense: int = 128) -> Model:
  """A small CNN for `[H, W]` or `[H, W, C]` images."""
  return _classifier(_CNN(tuple(channels), dense, num_classes), input_shape)


def num_params(model: Model) -> int:
  params = jax.eval_shape(model.init, jax.random.key(0))
  return sum(x.size for x in jax.tree.leaves(params))


# -- registered as model.kind = logreg | mlp | cnn ---------------------------------


def classifier_io(ctx) -> tuple[tuple[int, ...], int]:
  """`(per-example input shape, number of classes)` of a classification population."""
  features = ctx.train.features
  if "x" not in features or "y" not in features:
    raise ConfigError(f"The classifier models need features 'x' and 'y'; the data has "
                      f"{sorted(features)}.")
  return tuple(features["x"].shape[1:]), int(ctx.num_classes)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LogRegConfig(ModelSection):
  """Multinomial logistic regression."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class MLPConfig(ModelSection):
  """A ReLU MLP."""

  hidden: tuple[int, ...] = option((128,), check=(lambda t: all(v >= 1 for v in t),
                                                  "must list layer widths >= 1"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class CNNConfig(ModelSection):
  """Conv (5x5, ReLU, 2x2 max-pool) blocks and one dense layer."""

  channels: tuple[int, ...] = option((16, 32), check=(lambda t: len(t) >= 1 and all(
      v >= 1 for v in t), "must list at least one channel count, each >= 1"))
  dense: int = option(128, check=(positive, "must be >= 1"))


@MODELS.register("logreg", LogRegConfig)
def _build_logreg(cfg, ctx) -> Model:
  """Multinomial logistic regression."""
  return logistic_regression(*classifier_io(ctx))


@MODELS.register("mlp", MLPConfig)
def _build_mlp(cfg, ctx) -> Model:
  """A ReLU MLP with `hidden` layer widths."""
  shape, classes = classifier_io(ctx)
  return mlp(shape, classes, cfg.hidden)


@MODELS.register("cnn", CNNConfig, example={"input_shape": (8, 8)})
def _build_cnn(cfg, ctx) -> Model:
  """A small CNN for images [H, W] or [H, W, C]."""
  shape, classes = classifier_io(ctx)
  if len(shape) not in (2, 3):
    raise ConfigError(f"model.kind = 'cnn' needs image inputs [H, W] or [H, W, C]; the data's x "
                      f"has per-example shape {shape}. Use 'mlp' or 'logreg'.")
  return cnn(shape, classes, cfg.channels, cfg.dense)
