"""Compression stages inside the engine, and composed with DP's clip and noise."""

import jax
import numpy as np
import optax

from fedjax_sim.algorithms import fedavg
from fedjax_sim.compression import (apply_to_tree, compressed_mean, majority_vote, rotated,
                                    stochastic_quantizer, top_k)
from fedjax_sim.core import Engine, EngineConfig, LocalConfig
from fedjax_sim.core.aggregation import global_norm
from fedjax_sim.core.algorithm import ClientData
from fedjax_sim.core.keys import Purpose, run_key
from fedjax_sim.models import logistic_regression
from fedjax_sim.privacy import gaussian_sum
from tests.conftest import packed_dataset

SIZES = np.full(10, 4)
DATA = packed_dataset(SIZES, num_features=4, num_classes=3)
MODEL = logistic_regression((4,), 3)
ALG = fedavg(MODEL, optax.sgd(0.5), optax.sgd(1.0), LocalConfig(batch_size=4, shuffle=False),
             weighting="uniform")
P0 = MODEL.init(jax.random.key(0))
D = 4 * 3 + 3


def _deltas(ids):
  out = []
  for cid in ids:
    ex, mask = DATA.gather([cid], 4)
    out.append(ALG.client_update(P0, ClientData(jax.tree.map(lambda a: a[0], ex), mask[0]), None,
                                 jax.random.key(0)).update)
  return out


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def test_error_feedback_residuals_live_in_the_store_and_bits_are_exact():
  stage = compressed_mean(top_k(2), error_feedback=True)
  cohorts = [np.arange(0, 10, 2), np.arange(0, 10, 2)]
  engine = Engine(ALG, DATA, stage, lambda r: cohorts[r], seed=0,
                  config=EngineConfig(block_size=2))
  state = engine.init(P0)
  results = list(engine.rounds(state, 0, 1))
  res = results[0]
  deltas = _deltas(cohorts[0])
  residual = np.asarray(jax.device_get(res.state.aggregator_clients))
  rows = (np.arange(10) % engine.num_devices) * engine.rows_per_device + \
      np.arange(10) // engine.num_devices
  for cid, delta in zip(cohorts[0], deltas):
    x = _flat(delta)
    kept = np.argsort(-np.abs(x))[:2]
    expected = x.copy()
    expected[kept] = 0.0  # the residual is what was not sent
    np.testing.assert_allclose(residual[rows[cid]], expected, rtol=1e-5, atol=1e-7)
  for cid in range(1, 10, 2):  # clients that did not take part keep a zero residual
    assert not np.any(residual[rows[cid]])
  # 2 values x (32 bits + a 4-bit index into 15 coordinates), exactly, for 5 clients.
  assert res.metrics["bits_per_client"] == 72 and res.metrics["bits"] == 5 * 72


def test_cache_sized_encode_sub_blocks_change_nothing_but_the_schedule():
  # 15 parameters pad to 16 floats (64 B): 128 B of cache gives sub-blocks of
  # 2 clients inside blocks of 8 (a remainder included); 0 turns them off.
  stage = compressed_mean(rotated(stochastic_quantizer(4)), error_feedback=True)
  assert stage.multi_pass_encode and not compressed_mean(top_k(2)).multi_pass_encode
  outs = []
  for cache in (0, 128, 64 * 3):
    engine = Engine(ALG, DATA, stage, lambda r: np.arange(10), seed=3,
                    config=EngineConfig(block_size=8, encode_cache_bytes=cache))
    res = list(engine.rounds(engine.init(P0), 0, 2))[-1]
    outs.append((_flat(res.state.server), np.asarray(res.state.aggregator_clients),
                 res.metrics["bits"]))
  for params, residual, bits in outs[1:]:
    np.testing.assert_allclose(params, outs[0][0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(residual, outs[0][1], rtol=1e-6, atol=1e-7)
    assert bits == outs[0][2]


def test_majority_vote_moves_by_the_sign_of_the_vote():
  engine = Engine(ALG, DATA, majority_vote(0.01), lambda r: np.arange(10), seed=0,
                  config=EngineConfig(block_size=4))
  res = next(engine.rounds(engine.init(P0), 0, 1))
  votes = sum(np.where(_flat(d) >= 0, 1.0, -1.0) for d in _deltas(range(10)))
  np.testing.assert_allclose(_flat(res.server_state.params) - _flat(P0), 0.01 * np.sign(votes),
                             atol=1e-7)
  assert res.metrics["bits_per_client"] == D


def test_clip_compress_noise_equals_the_stages_by_hand():
  """gaussian_sum(compressor=...) = clip -> compress -> clip -> sum -> noise -> / D."""
  c, z, denom = 0.05, 0.0, 8.0
  compressor = rotated(stochastic_quantizer(8))
  engine = Engine(ALG, DATA, gaussian_sum(c, z, denom, compressor=compressor),
                  lambda r: np.arange(10), seed=3, config=EngineConfig(block_size=4))
  res = next(engine.rounds(engine.init(P0), 0, 1))
  encode_root = jax.random.fold_in(run_key(3, Purpose.ENCODE), 0)  # the engine's encode key of round 0
  total = np.zeros(D)
  for cid, delta in zip(range(10), _deltas(range(10))):
    clip = lambda t: jax.tree.map(lambda u: u * min(1.0, c / float(global_norm(t))), t)
    sent = clip(apply_to_tree(compressor, clip(delta), key=jax.random.fold_in(encode_root, cid)))
    total += _flat(sent)
  np.testing.assert_allclose(_flat(res.server_state.params) - _flat(P0), total / denom,
                             rtol=1e-4, atol=1e-6)
  assert res.metrics["bits_per_client"] == compressor.bits(D)
  # With noise, the difference from the noiseless aggregate is N(0, (zC/D)^2) per coordinate.
  noisy = Engine(ALG, DATA, gaussian_sum(c, 3.0, denom, compressor=compressor),
                 lambda r: np.arange(10), seed=3, config=EngineConfig(block_size=4))
  res_noisy = next(noisy.rounds(noisy.init(P0), 0, 1))
  diff = _flat(res_noisy.server_state.params) - _flat(res.server_state.params)
  assert 0.3 < diff.std() / (3.0 * c / denom) < 2.0  # 15 coordinates: a loose, sure bound
