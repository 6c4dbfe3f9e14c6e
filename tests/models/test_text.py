"""The text benchmark models: parameter counts derived by hand, the shared next-token loss
and token accuracies, the Stack Overflow bag of words and tag metrics against numpy,
transformer causality and dropout from the training key only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim.core.data import FederatedData
from fedjax_sim.core.local import metric_sums
from fedjax_sim.core.registry import MODELS, Context
from fedjax_sim.core.schema import ConfigError
from fedjax_sim.models import (bag_of_words, char_lstm, next_token_loss, next_token_metrics,
                               num_params, so_tag_lr, transformer_lm, word_lstm)
from fedjax_sim.runner.config import config_from_dict


def _random_params(model, seed=0):
  """Parameters of the model's shapes drawn by numpy: no initializer is compiled (Flax's
  truncated-normal initializers compile slowly on CPU; `model.init` is the contract suite's)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype), shapes)


def _lstm(inputs, units):
  """Keras-style LSTM: input kernel [in, 4u], recurrent kernel [u, 4u], one bias [4u]."""
  return 4 * units * (inputs + units + 1)


def _dense(inputs, units):
  return inputs * units + units


def test_recurrent_parameter_counts_are_keras_counts():
  # Shakespeare (TFF: 86 characters + pad/oov/bos/eos = 90): embedding 8, 2 x LSTM 256, dense.
  v = 90
  expected = v * 8 + _lstm(8, 256) + _lstm(256, 256) + _dense(256, v)
  assert expected == 820_522
  assert num_params(char_lstm(v)) == expected
  # Stack Overflow NWP (10,000 words + 4): embedding 96, LSTM 670, dense 96, dense V.
  v = 10_004
  expected = v * 96 + _lstm(96, 670) + _dense(670, 96) + _dense(96, v)
  assert expected == 4_050_748
  assert num_params(word_lstm(v)) == expected
  assert num_params(word_lstm(50, embed_dim=4, hidden=6, layers=2)) == (
      50 * 4 + 2 * (_lstm(4, 6) + _dense(6, 4)) + _dense(4, 50))


def test_transformer_parameter_count_by_hand():
  def count(v, layers, d, m, max_len):
    attention = 4 * _dense(d, d)  # query, key, value, output projections
    block = 2 * d + attention + 2 * d + _dense(d, m) + _dense(m, d)  # two LayerNorms
    return v * d + max_len * d + layers * block + 2 * d + _dense(d, v)

  assert num_params(transformer_lm(10_004)) == count(10_004, 2, 128, 512, 256) == 3_000_596
  assert num_params(transformer_lm(30, layers=3, d_model=8, heads=2, mlp_dim=12, max_len=9)) == (
      count(30, 3, 8, 12, 9))


def test_so_tag_lr_parameter_count():
  # TFF's create_logistic_model on 10,000 words and 500 tags.
  assert num_params(so_tag_lr(10_000, 500)) == 10_000 * 500 + 500 == 5_000_500


def _np_log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_next_token_loss_and_accuracies_by_hand():
  # V = 7: pad 0, words 1..3, oov 4, bos 5, eos 6.
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 4, 7)).astype(np.float32)
  targets = np.array([[1, 4, 6, 0],   # a word, oov, eos, pad
                      [2, 3, 0, 0],   # two words
                      [0, 0, 0, 0]],  # nothing counted
                     np.int32)
  # Predictions: right on the word and the oov of row 0, wrong on its eos; right on
  # the first word of row 1 only.
  logits[0, 0, 1] = logits[0, 1, 4] = logits[1, 0, 2] = 10.0
  logits[0, 2, 3] = logits[1, 1, 1] = 10.0
  log_p = _np_log_softmax(logits)
  loss = np.asarray(next_token_loss(jnp.asarray(logits), jnp.asarray(targets)))
  expected = [-(log_p[0, 0, 1] + log_p[0, 1, 4] + log_p[0, 2, 6]) / 3,
              -(log_p[1, 0, 2] + log_p[1, 1, 3]) / 2, 0.0]
  np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
  metrics = next_token_metrics(jnp.asarray(logits), jnp.asarray(targets))
  # accuracy counts words only (not pad/oov/bos/eos); accuracy_with_oov masks pad only.
  np.testing.assert_array_equal(metrics["accuracy"][0], [1, 1, 0])
  np.testing.assert_array_equal(metrics["accuracy"][1], [1, 2, 0])
  np.testing.assert_array_equal(metrics["accuracy_with_oov"][0], [2, 1, 0])
  np.testing.assert_array_equal(metrics["accuracy_with_oov"][1], [3, 2, 0])
  # The engine reports sum(numerator) / sum(denominator) over real examples:
  # token accuracy 2/3, not the mean of per-example accuracies (1/2 + 1/1) / 2.
  sums = metric_sums(metrics, jnp.array([True, True, False]))
  assert float(sums["accuracy_sum"]) / float(sums["accuracy_count"]) == pytest.approx(2 / 3)


def _tokens(n, length, vocab, seed=0):
  """[bos, words..., eos] rows, 0-padded, split into x and next-token y."""
  rng = np.random.default_rng(seed)
  seq = np.zeros((n, length + 1), np.int32)
  for i in range(n):
    words = rng.integers(1, vocab - 2, size=rng.integers(1, length))
    row = np.concatenate([[vocab - 2], words, [vocab - 1]])
    seq[i, :len(row)] = row
  return {"x": jnp.asarray(seq[:, :-1]), "y": jnp.asarray(seq[:, 1:])}


def test_lstms_predict_every_position_and_start_with_keras_forget_bias():
  model = char_lstm(12, embed_dim=4, hidden=5)
  params = model.init(jax.random.key(0))
  forget = [b for path, b in jax.tree_util.tree_leaves_with_path(params)
            if "hf" in jax.tree_util.keystr(path) and "bias" in jax.tree_util.keystr(path)]
  assert len(forget) == 2 and all(np.all(np.asarray(b) == 1.0) for b in forget)
  batch = _tokens(3, 6, 12)
  logits = model.apply(params, batch, train=False)
  assert logits.shape == (3, 6, 12)
  # Recurrent, hence causal: a later token leaves earlier predictions unchanged.
  changed = {"x": batch["x"].at[:, 4].set(3), "y": batch["y"]}
  np.testing.assert_allclose(model.apply(params, changed, train=False)[:, :4], logits[:, :4],
                             rtol=1e-6)


def test_transformer_is_causal():
  model = transformer_lm(12, layers=2, d_model=8, heads=2, mlp_dim=16, dropout=0.0, max_len=8)
  params = _random_params(model)
  apply = jax.jit(lambda p, b: model.apply(p, b, train=False))
  batch = _tokens(2, 6, 12)
  logits = np.asarray(apply(params, batch))
  for t in (0, 3, 5):
    changed = {"x": batch["x"].at[:, t].set((batch["x"][:, t] % 8) + 1), "y": batch["y"]}
    out = np.asarray(apply(params, changed))
    np.testing.assert_allclose(out[:, :t], logits[:, :t], rtol=1e-5, atol=1e-6)
    assert not np.allclose(out[:, t], logits[:, t])


def test_transformer_dropout_draws_from_the_key_only_in_training():
  model = transformer_lm(12, layers=1, d_model=8, heads=2, mlp_dim=16, dropout=0.3, max_len=8)
  params = _random_params(model)
  train = jax.jit(lambda p, b, k: model.apply(p, b, train=True, key=k))
  evaluate = jax.jit(lambda p, b, k: model.apply(p, b, train=False, key=k))
  batch = _tokens(2, 6, 12, seed=1)
  k1, k2 = jax.random.key(1), jax.random.key(2)
  a = train(params, batch, k1)
  np.testing.assert_array_equal(a, train(params, batch, k1))
  assert not np.allclose(a, train(params, batch, k2))
  evaluation = evaluate(params, batch, k1)
  np.testing.assert_array_equal(evaluation, evaluate(params, batch, k2))
  assert not np.allclose(a, evaluation)


def test_bag_of_words_matches_numpy():
  w = 5  # words 1..5, oov 6, pad 0
  ids = np.array([[1, 1, 3, 6, 0, 0],  # 4 tokens, one of them oov
                  [0, 0, 0, 0, 0, 0],  # padding only
                  [5, 2, 9, 0, 0, 0]],  # 9 > W + 1 counts as oov
                 np.int32)
  expected = np.zeros((3, w))
  for i, row in enumerate(ids):
    tokens = np.minimum(row[row != 0], w + 1)
    if len(tokens):
      one_hot = np.eye(w + 2)[tokens]  # TFF: one_hot(ids, W + 1 with oov), reduce_mean, slice
      expected[i] = one_hot.mean(0)[1:w + 1]
  np.testing.assert_allclose(bag_of_words(jnp.asarray(ids), w), expected, rtol=1e-6)
  assert expected[0].tolist() == [0.5, 0.0, 0.25, 0.0, 0.0]  # the oov counts in the mean


def test_so_tag_lr_logits_loss_and_top5_metrics_by_hand():
  w, c = 5, 7
  model = so_tag_lr(w, c)
  params = _random_params(model)
  ids = np.array([[1, 2, 6, 0], [4, 4, 0, 0]], np.int32)
  tags = np.array([[0, 3, -1], [6, -1, -1]], np.int32)
  batch = {"x": jnp.asarray(ids), "y": jnp.asarray(tags)}
  logits = np.asarray(model.apply(params, batch, train=False))
  kernel = np.asarray(params["Dense_0"]["kernel"], np.float64)
  bias = np.asarray(params["Dense_0"]["bias"], np.float64)
  bags = np.asarray(bag_of_words(jnp.asarray(ids), w), np.float64)
  np.testing.assert_allclose(logits, bags @ kernel + bias, rtol=1e-5, atol=1e-6)
  targets = np.zeros((2, c))
  targets[0, [0, 3]] = targets[1, 6] = 1
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  bce = -(targets * np.log(p) + (1 - targets) * np.log(1 - p)).mean(-1)
  np.testing.assert_allclose(model.loss(jnp.asarray(logits), batch), bce, rtol=1e-5)
  # Metrics on chosen logits: row 0 ranks tags 3, 1, 2, 4, 5 highest (tag 0 is
  # not among the top 5); row 1 ranks tag 6 first.
  chosen = jnp.asarray([[0.0, 6, 5, 7, 4, 3, -1], [0, 1, 2, 3, 4, 5, 9]], jnp.float32)
  metrics = model.metrics(chosen, batch)
  np.testing.assert_array_equal(metrics["recall_at_5"][0], [1, 1])
  np.testing.assert_array_equal(metrics["recall_at_5"][1], [2, 1])
  np.testing.assert_array_equal(metrics["precision_at_5"][0], [1, 1])
  np.testing.assert_array_equal(metrics["precision_at_5"][1], [5, 5])


def _sequences(n=4, length=6, vocab=12, x_dtype=np.int32):
  batch = _tokens(n, length, vocab)
  return FederatedData.from_offsets({"x": np.asarray(batch["x"]).astype(x_dtype),
                                     "y": np.asarray(batch["y"])}, np.array([0, n]))


def test_built_from_the_config_with_the_data_vocabulary():
  data = _sequences()
  for kind, section in (("char_lstm", {"hidden": 4}), ("word_lstm", {"hidden": 4}),
                        ("transformer", {"d_model": 4, "heads": 2, "max_len": 6})):
    cfg = config_from_dict({"model": {"kind": kind, **section}}).model
    model = MODELS.get(kind).build(cfg, Context(train=data, num_classes=12))
    batch = {k: jnp.asarray(v) for k, v in data.features.items()}
    out = jax.eval_shape(lambda: model.apply(model.init(jax.random.key(0)), batch))
    assert out.shape == (4, 6, 12)


def test_config_errors():
  with pytest.raises(ConfigError, match="model.d_model = 10 must be a multiple of model.heads"):
    config_from_dict({"model": {"kind": "transformer", "d_model": 10, "heads": 4}})
  with pytest.raises(ConfigError, match="model.dropout = 1.5 must be in"):
    config_from_dict({"model": {"kind": "transformer", "dropout": 1.5}})

  def build(kind, section, data, num_classes=12, config=None):
    cfg = config_from_dict({"model": {"kind": kind, **section}}).model
    return MODELS.get(kind).build(cfg, Context(config=config, train=data,
                                               num_classes=num_classes))

  with pytest.raises(ConfigError, match="model.max_len = 4 is shorter than the data's sequences"):
    build("transformer", {"max_len": 4}, _sequences())
  with pytest.raises(ConfigError, match="integer token ids"):
    build("char_lstm", {}, _sequences(x_dtype=np.float32))
  with pytest.raises(ConfigError, match="must be >= 5"):
    build("word_lstm", {}, _sequences(), num_classes=4)
  tags = FederatedData.from_offsets({"x": np.ones((2, 3), np.int32),
                                     "y": np.zeros((2, 2), np.int32)}, np.array([0, 2]))

  class Data:  # a data section declaring its word vocabulary (as tff_sqlite does)
    vocab_size = 50

  class Run:
    data = Data()

  with pytest.raises(ConfigError, match="model.vocab_size = 40 differs from data.vocab_size"):
    build("so_tag_lr", {"vocab_size": 40}, tags, 6, Run())
  # Without model.vocab_size the data's is used; without either, 10,000.
  assert num_params(build("so_tag_lr", {}, tags, 6, Run())) == 50 * 6 + 6
  assert num_params(build("so_tag_lr", {}, tags, 6)) == 10_000 * 6 + 6
