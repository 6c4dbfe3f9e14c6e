"""The standard federated text benchmarks' models: next-token prediction and tag prediction.

Next-token tasks (Shakespeare characters, Stack Overflow words) follow the
preprocessing of TensorFlow Federated's baselines (one OOV bucket): an
example is `batch["x"]` int32 `[T]` token ids and `batch["y"]` int32 `[T]`
the next-token ids; with `V = ctx.num_classes` the total vocabulary size,
0 is padding, `1 .. V-4` the real vocabulary, `V-3` OOV, `V-2` BOS and `V-1`
EOS. Every next-token model shares `next_token_loss` (per example: the mean
softmax cross-entropy over the positions whose target is not padding) and
`next_token_metrics`:

- `accuracy`: correct predictions over the targets that are not pad, OOV,
  BOS or EOS (TFF's `MaskedCategoricalAccuracy` with those tokens masked, the
  number Reddi et al. 2021 report), as the ratio of the two sums;
- `accuracy_with_oov`: the same with only padding masked.

Stack Overflow tag prediction (`so_tag_lr`): `batch["x"]` int32 `[L]` word ids
(0 pad, `1 .. W` words, `W+1` OOV, `W` = the `vocab_size` option) and
`batch["y"]` int32 `[K]` tag ids in `0 .. ctx.num_classes-1` padded with -1; a
bag-of-words logistic regression as in TFF / Reddi et al.

References:
  McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks
    from Decentralized Data" (the Shakespeare character LSTM).
  Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR), and their
    code, google-research/federated `utils/models/shakespeare_models.py`,
    `stackoverflow_models.py`, `stackoverflow_lr_models.py` and
    `utils/datasets/stackoverflow_tag_prediction.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim.core.model import Model
from fedjax_sim.core.registry import MODELS, ModelSection
from fedjax_sim.core.schema import ConfigError, option, positive, rate

PAD = 0
NUM_SPECIAL = 4  # pad, oov, bos, eos
DEFAULT_TAG_VOCAB = 10000  # Reddi et al. 2021's Stack Overflow word vocabulary


def special_tokens(vocab_size: int) -> dict[str, int]:
  """The ids of the special tokens of a next-token vocabulary of total size `vocab_size`."""
  return {"pad": PAD, "oov": vocab_size - 3, "bos": vocab_size - 2, "eos": vocab_size - 1}


# -- the shared next-token loss and metrics -------------------------------------------


def next_token_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per example, the mean softmax cross-entropy over the positions whose target is not pad.

  Args:
    logits: `[examples, T, V]`.
    targets: `[examples, T]` next-token ids (0 = padding).

  Returns:
    `[examples]`; 0 for an example without a counted position.
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  counted = targets != PAD
  total = jnp.sum(jnp.where(counted, ce, 0.0), axis=-1)
  return total / jnp.maximum(jnp.sum(counted, axis=-1), 1).astype(jnp.float32)


def next_token_metrics(logits: jax.Array, targets: jax.Array) -> dict[str, tuple[jax.Array,
                                                                                 jax.Array]]:
  """Token accuracies as `(correct counted tokens, counted tokens)` per example.

  `accuracy` counts the targets that are not pad, OOV, BOS or EOS (TFF's
  `MaskedCategoricalAccuracy(masked_tokens=[pad, oov, bos, eos])`);
  `accuracy_with_oov` counts every target but padding. A prediction is the
  argmax over the whole vocabulary (predicting a special token is wrong).
  """
  vocab_size = logits.shape[-1]
  correct = jnp.argmax(logits, axis=-1) == targets
  not_pad = targets != PAD
  in_vocabulary = not_pad & (targets < vocab_size - 3)  # the real vocabulary is 1 .. V-4

  def ratio(counted):
    return (jnp.sum(correct & counted, axis=-1).astype(jnp.float32),
            jnp.sum(counted, axis=-1).astype(jnp.float32))

  return {"accuracy": ratio(in_vocabulary), "accuracy_with_oov": ratio(not_pad)}


def _next_token_model(module: nn.Module) -> Model:
  """A `Model` of a linen module `(ids [n, T], train) -> logits [n, T, V]`; dropout, if any,
  draws from the `dropout` stream, fed by the per-client, per-step key when training."""

  def init(key):
    return module.init(key, jnp.zeros((1, 1), jnp.int32), train=False)["params"]

  def apply(params, batch, *, train=False, key=None):
    rngs = {"dropout": key} if train and key is not None else None
    return module.apply({"params": params}, batch["x"], train=train, rngs=rngs)

  def loss(logits, batch):
    return next_token_loss(logits, batch["y"])

  def metrics(logits, batch):
    return next_token_metrics(logits, batch["y"])

  return Model(init, apply, loss, metrics)


# -- recurrent language models --------------------------------------------------------


def _keras_uniform(key, shape, dtype=jnp.float32):
  """Keras' default embedding initializer, RandomUniform(-0.05, 0.05) (TFF's models use it)."""
  return jax.random.uniform(key, shape, dtype, -0.05, 0.05)


class _RecurrentLM(nn.Module):
  """Embedding, LSTM layers (each optionally projected back to the embedding size), dense
  to the vocabulary."""

  vocab_size: int
  embed_dim: int
  hidden: int
  layers: int
  project: bool  # a linear dense layer to embed_dim after every LSTM layer (TFF's NWP model)

  @nn.compact
  def __call__(self, ids, train: bool = False):
    del train  # no dropout
    h = nn.Embed(self.vocab_size, self.embed_dim, embedding_init=_keras_uniform)(ids)
    for _ in range(self.layers):
      h = nn.RNN(nn.OptimizedLSTMCell(self.hidden))(h)
      if self.project:
        h = nn.Dense(self.embed_dim)(h)
    return nn.Dense(self.vocab_size)(h)


def _unit_forget_bias(params):
  """Sets every LSTM forget-gate bias to 1, as Keras' LSTM (unit_forget_bias=True) does."""
  def visit(tree):
    if isinstance(tree, dict):
      return {k: ({**v, "bias": jnp.ones_like(v["bias"])} if k == "hf" else visit(v))
              for k, v in tree.items()}
    return tree
  return visit(params)


def _recurrent_model(module: _RecurrentLM) -> Model:
  model = _next_token_model(module)
  return model._replace(init=lambda key: _unit_forget_bias(model.init(key)))


def char_lstm(vocab_size: int, *, embed_dim: int = 8, hidden: int = 256,
              layers: int = 2) -> Model:
  """The Shakespeare character model of McMahan et al. 2017 / Reddi et al. 2021.

  Embedding (8), two LSTM layers of 256 units, dense to the `vocab_size`
  logits per position (TFF's `create_recurrent_model`; 820,522 parameters for
  TFF's 86 characters + 4 special tokens, V = 90).
  """
  return _recurrent_model(_RecurrentLM(vocab_size, embed_dim, hidden, layers, project=False))


def word_lstm(vocab_size: int, *, embed_dim: int = 96, hidden: int = 670,
              layers: int = 1) -> Model:
  """The Stack Overflow next-word model of Reddi et al. 2021.

  Embedding (96), per layer an LSTM (670 units) and a linear dense layer back
  to 96, then dense to the `vocab_size` logits (TFF's
  `stackoverflow_models.create_recurrent_model`, untied output; 4,050,748
  parameters for 10,000 words + 4 special tokens).
  """
  return _recurrent_model(_RecurrentLM(vocab_size, embed_dim, hidden, layers, project=True))


# -- a small decoder-only transformer ---------------------------------------------------


class _Block(nn.Module):
  """Pre-LayerNorm transformer block: causal self-attention and a GELU MLP, each residual."""

  heads: int
  mlp_dim: int
  dropout: float

  @nn.compact
  def __call__(self, x, mask, train: bool):
    d_model = x.shape[-1]
    h = nn.LayerNorm()(x)
    h = nn.MultiHeadDotProductAttention(num_heads=self.heads, dropout_rate=self.dropout,
                                        deterministic=not train)(h, h, mask=mask)
    x = x + nn.Dropout(self.dropout, deterministic=not train)(h)
    h = nn.LayerNorm()(x)
    h = nn.Dense(d_model)(nn.gelu(nn.Dense(self.mlp_dim)(h)))
    return x + nn.Dropout(self.dropout, deterministic=not train)(h)


class _TransformerLM(nn.Module):
  vocab_size: int
  layers: int
  d_model: int
  heads: int
  mlp_dim: int
  dropout: float
  max_len: int

  @nn.compact
  def __call__(self, ids, train: bool = False):
    positions = jnp.arange(ids.shape[1])[None, :]
    h = (nn.Embed(self.vocab_size, self.d_model, name="token_embed")(ids)
         + nn.Embed(self.max_len, self.d_model, name="position_embed")(positions))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    mask = nn.make_causal_mask(ids)
    for _ in range(self.layers):
      h = _Block(self.heads, self.mlp_dim, self.dropout)(h, mask, train)
    return nn.Dense(self.vocab_size)(nn.LayerNorm()(h))


def transformer_lm(vocab_size: int, *, layers: int = 2, d_model: int = 128, heads: int = 4,
                   mlp_dim: int = 512, dropout: float = 0.1, max_len: int = 256) -> Model:
  """A small decoder-only transformer for next-token tasks.

  Learned token and position embeddings, `layers` pre-LayerNorm blocks
  (causal multi-head self-attention, GELU MLP of width `mlp_dim`, each a
  residual branch; GPT-2's layout, Radford et al. 2019), a final LayerNorm
  and an untied dense output layer. Dropout (`dropout`: on the embeddings,
  the attention weights and both residual branches) draws from the per-client,
  per-step key and is off at evaluation. Sequences up to `max_len` tokens.
  """
  return _next_token_model(_TransformerLM(vocab_size, layers, d_model, heads, mlp_dim, dropout,
                                          max_len))


# -- Stack Overflow tag prediction ---------------------------------------------------


def bag_of_words(ids: jax.Array, vocab_size: int) -> jax.Array:
  """`[n, L]` word ids -> `[n, vocab_size]` bag of words, as TFF's tag-prediction preprocessing.

  The mean over the non-pad tokens of `one_hot(ids, vocab_size + 2)`, with the
  pad (0) and OOV (`vocab_size + 1`) columns then dropped: the denominator
  counts OOV words (TFF takes `reduce_mean` over the one-hot rows including
  the OOV bucket, then slices it off). An id above `vocab_size` counts as OOV;
  an example of padding only is all zeros (TFF would divide by zero).
  """
  n = ids.shape[0]
  counts = jnp.zeros((n, vocab_size + 2), jnp.float32).at[
      jnp.arange(n)[:, None], jnp.clip(ids, 0, vocab_size + 1)].add(1.0)
  tokens = jnp.maximum(jnp.sum(ids != PAD, axis=-1, keepdims=True), 1).astype(jnp.float32)
  return counts[:, 1:vocab_size + 1] / tokens


class _BagOfWordsLR(nn.Module):
  vocab_size: int
  num_classes: int

  @nn.compact
  def __call__(self, ids):
    return nn.Dense(self.num_classes)(bag_of_words(ids, self.vocab_size))


def tag_targets(tags: jax.Array, num_classes: int) -> jax.Array:
  """`[n, K]` tag ids padded with -1 -> `[n, num_classes]` multi-hot 0/1 targets."""
  return jnp.max(jax.nn.one_hot(tags, num_classes, dtype=jnp.float32), axis=1)


def so_tag_lr(vocab_size: int, num_classes: int) -> Model:
  """Stack Overflow tag prediction: logistic regression on a bag of words (Reddi et al. 2021).

  A dense layer from the `bag_of_words` vector (`vocab_size` words) to one
  logit per tag, sigmoid outputs (TFF's `create_logistic_model`: 5,000,500
  parameters for 10,000 words and 500 tags). Loss per example: the binary
  cross-entropy averaged over the tags (Keras' `BinaryCrossentropy`).
  Metrics: `recall_at_5` = (true tags among the 5 highest logits, true tags)
  and `precision_at_5` = (true tags among the 5 highest, 5), both ratios
  (Keras' `Recall(top_k=5)` and `Precision(top_k=5)`).
  """
  module = _BagOfWordsLR(vocab_size, num_classes)
  k = min(5, num_classes)

  def init(key):
    return module.init(key, jnp.zeros((1, 1), jnp.int32))["params"]

  def apply(params, batch, *, train=False, key=None):
    del train, key  # deterministic
    return module.apply({"params": params}, batch["x"])

  def loss(logits, batch):
    targets = tag_targets(batch["y"], num_classes)
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets), -1)

  def metrics(logits, batch):
    targets = tag_targets(batch["y"], num_classes)
    _, top = jax.lax.top_k(logits, k)
    hits = jnp.sum(jnp.take_along_axis(targets, top, axis=-1), axis=-1)
    return {"recall_at_5": (hits, jnp.sum(targets, axis=-1)),
            "precision_at_5": (hits, jnp.full_like(hits, float(k)))}

  return Model(init, apply, loss, metrics)


# -- registered as model.kind = char_lstm | word_lstm | transformer | so_tag_lr ----------


def _int_features(ctx, kind: str, what: str) -> tuple[np.ndarray, np.ndarray]:
  features = ctx.train.features
  if "x" not in features or "y" not in features:
    raise ConfigError(f"model.kind = {kind!r} needs features 'x' and 'y' ({what}); the data has "
                      f"{sorted(features)}.")
  x, y = features["x"], features["y"]
  for name, a in (("x", x), ("y", y)):
    if a.ndim != 2 or not np.issubdtype(a.dtype, np.integer):
      raise ConfigError(f"model.kind = {kind!r} needs {what}; the data's {name} is "
                        f"{a.dtype} with per-example shape {tuple(a.shape[1:])}.")
  return x, y


def sequence_io(ctx, kind: str) -> tuple[int, int]:
  """`(sequence length T, vocabulary size V)` of a next-token population, checked."""
  x, y = _int_features(ctx, kind, "integer token ids x [T] and next-token ids y [T]")
  if x.shape[1:] != y.shape[1:]:
    raise ConfigError(f"model.kind = {kind!r}: x and y must have the same length (next-token "
                      f"targets); they are {x.shape[1]} and {y.shape[1]}.")
  vocab_size = int(ctx.num_classes)
  if vocab_size < NUM_SPECIAL + 1:
    raise ConfigError(f"model.kind = {kind!r}: data.num_classes = {vocab_size} is the total "
                      "vocabulary size (pad, words, oov, bos, eos) and must be >= 5.")
  return int(x.shape[1]), vocab_size


def _tokens_example(vocab_size: int, length: int) -> Callable[[np.random.Generator, int], dict]:
  """A contract-suite batch: `[bos, words..., eos]` sequences, padded, split into x and y."""

  def make(rng: np.random.Generator, n: int) -> dict:
    tokens = special_tokens(vocab_size)
    seq = np.zeros((n, length + 1), np.int32)
    for i in range(n):
      words = rng.integers(1, vocab_size - 2, size=rng.integers(1, length))  # may hold oov
      row = np.concatenate([[tokens["bos"]], words, [tokens["eos"]]])
      seq[i, :len(row)] = row
    return {"x": seq[:, :-1], "y": seq[:, 1:]}

  return make



@dataclasses.dataclass(frozen=True, kw_only=True)
class CharLSTMConfig(ModelSection):
  """Shakespeare character LSTM (McMahan et al. 2017; Reddi et al. 2021): embed 8, 2 x LSTM 256."""

  embed_dim: int = option(8, check=(positive, "must be >= 1"))
  hidden: int = option(256, check=(positive, "must be >= 1"))
  layers: int = option(2, check=(positive, "must be >= 1"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class WordLSTMConfig(ModelSection):
  """Stack Overflow next-word LSTM (Reddi et al. 2021): embed 96, LSTM 670, dense 96."""

  embed_dim: int = option(96, check=(positive, "must be >= 1"))
  hidden: int = option(670, check=(positive, "must be >= 1"))
  layers: int = option(1, check=(positive, "must be >= 1"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerConfig(ModelSection):
  """A small decoder-only (pre-LayerNorm, causal) transformer for next-token tasks."""

  layers: int = option(2, check=(positive, "must be >= 1"))
  d_model: int = option(128, check=(positive, "must be >= 1"))
  heads: int = option(4, check=(positive, "must be >= 1"))
  mlp_dim: int = option(512, check=(positive, "must be >= 1"))
  dropout: float = option(0.1, check=(rate, "must be in [0, 1)"))
  max_len: int = option(256, check=(positive, "must be >= 1"),
                        help="longest sequence (learned position embeddings)")

  def __post_init__(self):
    if self.d_model % self.heads:
      raise ConfigError(f"model.d_model = {self.d_model} must be a multiple of model.heads = "
                        f"{self.heads}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SOTagLRConfig(ModelSection):
  """Stack Overflow tag prediction: bag-of-words logistic regression (Reddi et al. 2021)."""

  vocab_size: int | None = option(None, check=(positive, "must be >= 1"),
                                  help="words W: ids 1..W, W+1 = oov, 0 = pad (default: "
                                  "data.vocab_size if the dataset has one, else 10000)")


_TEXT_V = 12  # the contract suite's vocabulary: 8 words + 4 special tokens


@MODELS.register("char_lstm", CharLSTMConfig, example={
    "batch": _tokens_example(_TEXT_V, 6), "num_classes": _TEXT_V,
    "config": {"embed_dim": 4, "hidden": 8}})
def _build_char_lstm(cfg, ctx) -> Model:
  """Shakespeare character LSTM."""
  _, vocab_size = sequence_io(ctx, "char_lstm")
  return char_lstm(vocab_size, embed_dim=cfg.embed_dim, hidden=cfg.hidden, layers=cfg.layers)


@MODELS.register("word_lstm", WordLSTMConfig, example={
    "batch": _tokens_example(_TEXT_V, 6), "num_classes": _TEXT_V,
    "config": {"embed_dim": 4, "hidden": 8}})
def _build_word_lstm(cfg, ctx) -> Model:
  """Stack Overflow next-word LSTM."""
  _, vocab_size = sequence_io(ctx, "word_lstm")
  return word_lstm(vocab_size, embed_dim=cfg.embed_dim, hidden=cfg.hidden, layers=cfg.layers)


@MODELS.register("transformer", TransformerConfig, example={
    "batch": _tokens_example(_TEXT_V, 6), "num_classes": _TEXT_V,
    "config": {"layers": 1, "d_model": 8, "heads": 2, "mlp_dim": 16, "max_len": 8}})
def _build_transformer(cfg, ctx) -> Model:
  """A small decoder-only transformer."""
  length, vocab_size = sequence_io(ctx, "transformer")
  if length > cfg.max_len:
    raise ConfigError(f"model.max_len = {cfg.max_len} is shorter than the data's sequences "
                      f"({length} tokens); raise model.max_len.")
  return transformer_lm(vocab_size, layers=cfg.layers, d_model=cfg.d_model, heads=cfg.heads,
                        mlp_dim=cfg.mlp_dim, dropout=cfg.dropout, max_len=cfg.max_len)


def _tags_example(vocab_size: int, num_classes: int) -> Callable[[np.random.Generator, int], dict]:
  def make(rng: np.random.Generator, n: int) -> dict:
    x = rng.integers(0, vocab_size + 2, size=(n, 7)).astype(np.int32)
    y = np.full((n, 3), -1, np.int32)
    for i in range(n):
      tags = rng.choice(num_classes, size=rng.integers(1, 4), replace=False)
      y[i, :len(tags)] = tags
    return {"x": x, "y": y}
  return make


@MODELS.register("so_tag_lr", SOTagLRConfig, example={
    "batch": _tags_example(20, 6), "num_classes": 6, "config": {"vocab_size": 20}})
def _build_so_tag_lr(cfg, ctx) -> Model:
  """Stack Overflow tag prediction (bag-of-words logistic regression)."""
  _int_features(ctx, "so_tag_lr", "integer word ids x [L] and tag ids y [K] padded with -1")
  data_vocab = getattr(getattr(ctx.config, "data", None), "vocab_size", None)
  if cfg.vocab_size is not None and data_vocab is not None and cfg.vocab_size != data_vocab:
    raise ConfigError(f"model.vocab_size = {cfg.vocab_size} differs from data.vocab_size = "
                      f"{data_vocab}: the bag of words must use the data's word ids (1..W, "
                      "W+1 = oov); remove model.vocab_size or make them equal.")
  vocab_size = cfg.vocab_size or data_vocab or DEFAULT_TAG_VOCAB
  return so_tag_lr(int(vocab_size), int(ctx.num_classes))
