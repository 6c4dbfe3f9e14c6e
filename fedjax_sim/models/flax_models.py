"""Flax models wrapped as pure `Model` records.

Classification models take `batch["x"]` and integer labels `batch["y"]`; the
loss is softmax cross-entropy and the metric is accuracy.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedjax_sim.core.model import Model


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
      x = nn.relu(nn.Conv(c, (5, 5), padding="SAME")(x))
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
