"""A diverged client (NaN or inf update, NaN example) contributes zero and is counted."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_sim.aggregators import weighted_mean
from fedjax_sim.algorithms import fedavg
from fedjax_sim.core import Engine, EngineConfig, LocalConfig
from fedjax_sim.core.algorithm import ClientData
from fedjax_sim.core.data import FederatedData
from fedjax_sim.core.local import local_train
from fedjax_sim.models import logistic_regression
from fedjax_sim.privacy import gaussian_sum, tree_sum

C, D = 0.5, 4.0


def _updates():
  """Five clients' updates (numpy); client 1 has a NaN entry, client 3 an inf one."""
  rng = np.random.default_rng(0)
  a = rng.normal(size=(5, 4, 3)).astype(np.float32) * np.array([0.05, 2, 0.1, 3, 1],
                                                                np.float32)[:, None, None]
  b = rng.normal(size=(5, 3)).astype(np.float32)
  a[1, 2, 0] = np.nan
  b[3, 1] = np.inf
  return {"a": a, "b": b}


def _clip_by_hand(u, bad):
  """Sum over the finite clients of u * min(1, C / ||u||), in float64."""
  total = {k: np.zeros(v.shape[1:]) for k, v in u.items()}
  for i in range(5):
    if i in bad:
      continue
    norm = np.sqrt(sum(np.sum(v[i].astype(np.float64) ** 2) for v in u.values()))
    for k in u:
      total[k] += u[k][i] * min(1.0, C / norm)
  return total


def _round(stage, updates, weights, key):
  state = stage.init(jax.tree.map(lambda x: x[0], updates))
  msgs, _, _ = jax.vmap(stage.encode, (None, 0, 0, None, 0))(
      state, jax.tree.map(jnp.asarray, updates), jnp.asarray(weights), None,
      jax.random.split(jax.random.key(0), len(weights)))
  combined = jax.tree.map(lambda x: x.sum(0), msgs)
  aggregate, _, metrics = stage.finalize(state, combined, len(weights), key)
  return msgs, aggregate, metrics


@pytest.mark.parametrize("make", [lambda z: gaussian_sum(C, z, D),
                                  lambda z: gaussian_sum(C, z, D, target_quantile=0.5,
                                                         count_stddev=2.0),
                                  lambda z: tree_sum(C, z, D)])
def test_a_nonfinite_update_contributes_zero_and_is_counted(make):
  u = _updates()
  msgs, agg, metrics = _round(make(0.0), u, np.ones(5), jax.random.key(1))
  expected = _clip_by_hand(u, bad={1, 3})
  for k in u:
    np.testing.assert_allclose(agg[k], expected[k] / D, rtol=1e-5, atol=1e-7)
  norms = np.sqrt(sum(np.sum(np.asarray(x).reshape(5, -1) ** 2, axis=1)
                      for x in jax.tree.leaves(msgs.clipped_sum)))
  assert np.all(np.isfinite(norms)) and np.all(norms <= C * (1 + 1e-6))
  assert norms[1] == 0 and norms[3] == 0
  assert float(metrics["nonfinite_updates"]) == 2.0
  assert float(metrics["dp_participants"]) == 5.0
  # With noise: the same key gives the same noise, so the round equals one in
  # which the two diverged clients sent zeros.
  zeroed = {k: v.copy() for k, v in u.items()}
  zeroed["a"][[1, 3]] = 0
  zeroed["b"][[1, 3]] = 0
  _, noisy, m = _round(make(1.0), u, np.ones(5), jax.random.key(2))
  _, reference, m0 = _round(make(1.0), zeroed, np.ones(5), jax.random.key(2))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), noisy,
               reference)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(noisy))
  assert float(m["nonfinite_updates"]) == 2.0 and float(m0["nonfinite_updates"]) == 0.0


def test_a_nonfinite_update_is_zero_after_compression_too():
  from fedjax_sim.compression import stochastic_quantizer
  u = _updates()
  stage = gaussian_sum(C, 0.0, D, compressor=stochastic_quantizer(8))
  msgs, agg, metrics = _round(stage, u, np.ones(5), jax.random.key(1))
  assert float(metrics["nonfinite_updates"]) == 2.0
  expected = _clip_by_hand(u, bad={1, 3})
  # 8-bit min-max levels: each coordinate of a clipped update (range <= 2C) moves by less than
  # one level, 2C / 255, in each of the 3 finite clients; z = 0 adds no noise.
  quantization = 3 * 2 * C / 255 / D
  for k in u:
    np.testing.assert_array_equal(np.asarray(msgs.clipped_sum[k])[[1, 3]], 0.0)
    np.testing.assert_allclose(agg[k], np.asarray(msgs.clipped_sum[k]).sum(0) / D, rtol=1e-6)
    np.testing.assert_allclose(agg[k], expected[k] / D, rtol=0, atol=quantization)


def test_a_padded_slot_with_a_nonfinite_update_is_not_counted():
  u = _updates()
  _, agg, metrics = _round(gaussian_sum(C, 0.0, D), u, np.array([1, 0, 1, 1, 1.0]),
                           jax.random.key(1))
  assert float(metrics["nonfinite_updates"]) == 1.0  # client 3 only; slot 1 has weight 0
  assert float(metrics["dp_participants"]) == 4.0
  expected = _clip_by_hand(u, bad={1, 3})  # slot 1 sends nothing, client 3 a zero
  for k in u:
    np.testing.assert_allclose(agg[k], expected[k] / D, rtol=1e-5, atol=1e-7)


def test_the_plain_mean_counts_nonfinite_updates_without_changing_its_value():
  u = _updates()
  mean = weighted_mean()
  like = jax.tree.map(lambda x: jnp.asarray(x[0]), u)
  messages = [mean.encode((), jax.tree.map(lambda x: jnp.asarray(x[i]), u), 1.0, None, None)[0]
              for i in range(5)]
  combined = functools.reduce(mean.combine, messages, mean.zeros(like))
  agg, _, metrics = mean.finalize((), combined, 5, None)
  assert float(metrics["nonfinite_updates"]) == 2.0
  assert np.isnan(np.asarray(agg["a"])).any()  # the formula's NaN, not hidden
  clean = [mean.encode((), jax.tree.map(lambda x: jnp.asarray(x[i]), u), 1.0, None, None)[0]
           for i in (0, 2, 4)]
  _, _, m = mean.finalize((), functools.reduce(mean.combine, clean, mean.zeros(like)), 3, None)
  assert float(m["nonfinite_updates"]) == 0.0


def _data_with_a_nan_client(sizes, bad_client, seed=0):
  rng = np.random.default_rng(seed)
  total = int(np.sum(sizes))
  x = rng.normal(size=(total, 4)).astype(np.float32)
  y = rng.integers(0, 3, size=total).astype(np.int32)
  offsets = np.concatenate([[0], np.cumsum(sizes)])
  x[offsets[bad_client]] = np.nan
  return FederatedData.from_offsets({"x": x, "y": y}, offsets)


def test_one_diverged_client_does_not_poison_an_engine_round():
  """Client 5's data holds a NaN: DP-FedAvg's round equals the round without it (z = 0)."""
  data = _data_with_a_nan_client(np.full(12, 5), bad_client=5)
  model = logistic_regression((4,), 3)
  alg = fedavg(model, optax.sgd(0.5), optax.sgd(1.0), LocalConfig(batch_size=5, shuffle=False),
               weighting="uniform")
  p0 = model.init(jax.random.key(0))
  results = {}
  for name, ids in [("all", np.arange(12)), ("without", np.delete(np.arange(12), 5))]:
    engine = Engine(alg, data, gaussian_sum(0.05, 0.0, 10.0), lambda r, ids=ids: ids, seed=0,
                    config=EngineConfig(block_size=4))
    results[name] = next(engine.rounds(engine.init(p0), 0, 1))
  with_bad, without = results["all"], results["without"]
  assert with_bad.metrics["nonfinite_updates"] == 1.0
  assert without.metrics["nonfinite_updates"] == 0.0
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7),
               with_bad.server_state.params, without.server_state.params)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(with_bad.server_state.params))
  plain = Engine(alg, data, weighted_mean(), lambda r: np.arange(12), seed=0,
                 config=EngineConfig(block_size=4))
  assert next(plain.rounds(plain.init(p0), 0, 1)).metrics["nonfinite_updates"] == 1.0


# -- per-example clipping (local DP-SGD) -------------------------------------------


def _per_example_grad(model, params, x, y):
  ex = {"x": x[None], "y": y[None]}
  g = jax.grad(lambda p: model.loss(model.apply(p, ex, train=True, key=None), ex)[0])(params)
  return np.concatenate([np.ravel(a) for a in jax.tree.leaves(g)])


def test_a_nan_example_contributes_zero_to_the_dp_sgd_step():
  """5 real examples, one with a NaN feature, padded to 8 with NaN too; z = 0, one step."""
  model = logistic_regression((4,), 3)
  rng = np.random.default_rng(2)
  x = rng.normal(size=(8, 4)).astype(np.float32)
  y = rng.integers(0, 3, 8).astype(np.int32)
  x[2, 1] = np.nan
  x[5:] = np.nan  # padding content must not matter either
  data = ClientData({"x": jnp.asarray(x), "y": jnp.asarray(y)}, jnp.asarray(np.arange(8) < 5))
  clip, lr = 0.3, 0.5
  local = LocalConfig(batch_size=8, epochs=1, dp_clip_norm=clip, dp_noise_multiplier=0.0)
  params = model.init(jax.random.key(0))
  trained, stats = jax.jit(lambda p: local_train(model, optax.sgd(lr), p, data, local,
                                                 key=jax.random.key(9)))(params)
  flat = lambda t: np.concatenate([np.ravel(a) for a in jax.tree.leaves(t)])
  good = [i for i in range(5) if i != 2]
  grads = np.stack([_per_example_grad(model, params, x[i], y[i]) for i in good])
  clipped = grads * np.minimum(1.0, clip / np.linalg.norm(grads, axis=1))[:, None]
  expected = -lr * clipped.sum(0) / 5  # the denominator is the batch's example count
  step = flat(trained) - flat(params)
  assert np.all(np.isfinite(step))
  np.testing.assert_allclose(step, expected, rtol=1e-5, atol=1e-7)
  assert float(stats["nonfinite_examples"]) == 1.0
  assert float(stats["examples"]) == 5.0


def test_nonfinite_examples_reach_the_round_metrics():
  data = _data_with_a_nan_client(np.full(6, 5), bad_client=2)
  model = logistic_regression((4,), 3)
  local = LocalConfig(batch_size=8, epochs=2, dp_clip_norm=1.0, dp_noise_multiplier=1.0)
  alg = fedavg(model, optax.sgd(0.1), optax.sgd(1.0), local, weighting="uniform")
  engine = Engine(alg, data, weighted_mean(), lambda r: np.arange(6), seed=0)
  res = next(engine.rounds(engine.init(model.init(jax.random.key(0))), 0, 1))
  assert res.metrics["nonfinite_examples"] == 2.0  # one NaN example, one batch per epoch
  assert res.metrics["nonfinite_updates"] == 0.0
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(res.server_state.params))
