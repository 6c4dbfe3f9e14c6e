"""Members as one program (core/members.py): each member equals a separate engine run."""

import functools

import jax
import numpy as np
import optax
import pytest

from fedjax_sim.aggregators import weighted_mean
from fedjax_sim.algorithms import fedprox
from fedjax_sim.core import Engine, EngineConfig, LocalConfig, round_rng, sample_uniform
from fedjax_sim.core.members import MemberError, MemberRounds, merge_chunks
from fedjax_sim.core.plan import Planner
from fedjax_sim.models import logistic_regression
from tests.conftest import packed_dataset, run_python, xla_flags

# At batch 4: one local step (a chunk of pad_to 4), or two (pad_to 8).
ONE_STEP = np.random.default_rng(4).integers(1, 5, size=30)
TWO_STEPS = np.random.default_rng(3).integers(5, 9, size=30)
SIZES = np.concatenate([ONE_STEP[:15], TWO_STEPS[:15]])
MODEL = logistic_regression((5,), 3)
LOCAL = LocalConfig(batch_size=4, epochs=1, shuffle=True)
STAGE = weighted_mean()


def _build(lr, server_lr, mu):
  """FedProx with server momentum; the values may be traced (the member program's build)."""
  return fedprox(MODEL, optax.sgd(lr), optax.sgd(server_lr, momentum=0.5), LOCAL, mu)


@functools.lru_cache
def _algorithm(lr, server_lr, mu):
  # Equal hyperparameters, one object: separate engines then share compiled programs.
  return _build(lr, server_lr, mu)


def _engine(data, seed, lr, server_lr, mu, placement):
  return Engine(_algorithm(lr, server_lr, mu), data, STAGE,
                lambda r: sample_uniform(round_rng(seed, r), data.num_clients, 7), seed=seed,
                config=EngineConfig(block_size=4, max_chunk_bytes=64 * 24,
                                    data_placement=placement))


MEMBERS = [  # (seed, client lr, server lr, mu): seeds and traced hyperparameters
    (0, 0.1, 1.0, 0.0), (1, 0.1, 1.0, 0.0), (0, 0.3, 0.5, 0.5)]


@pytest.mark.parametrize("placement,shared", [("device", True), ("host", False)])
def test_members_equal_separate_runs(placement, shared):
  """Resident data: one population; streamed: each seed its own, one of one-step clients and
  one of two-step clients, so every round merges chunks of two `pad_to`s."""
  if shared:
    populations = [packed_dataset(ONE_STEP)] * len(MEMBERS)
  else:
    populations = [packed_dataset(TWO_STEPS if s else ONE_STEP, seed=s) for s, *_ in MEMBERS]
  rounds = 2

  def init(engine, seed):
    return engine.init(MODEL.init(jax.random.key(seed)))

  # Separate runs, each its own engine (an independent computation).
  separate, separate_traces = [], 0
  for (seed, lr, slr, mu), data in zip(MEMBERS, populations):
    engine = _engine(data, seed, lr, slr, mu, placement)
    results = list(engine.rounds(init(engine, seed), 0, rounds))
    separate.append(results)
    separate_traces += engine.traces

  engines = [_engine(data, seed, lr, slr, mu, placement)
             for (seed, lr, slr, mu), data in zip(MEMBERS, populations)]
  states = [init(e, seed) for e, (seed, *_) in zip(engines, MEMBERS)]
  hp = {"lr": [m[1] for m in MEMBERS], "server_lr": [m[2] for m in MEMBERS],
        "mu": [m[3] for m in MEMBERS]}
  build = lambda h: (_build(h["lr"], h["server_lr"], h["mu"]), STAGE)
  driver = MemberRounds(engines, build, hp)
  assert (driver.resident is not None) == shared
  stacked = driver.stack(states)
  for r in range(rounds):
    stacked, results = driver.run_round(stacked, [r] * len(MEMBERS))
    for m, result in enumerate(results):
      alone = separate[m][r]
      assert result.round_num == r
      assert set(result.metrics) == set(alone.metrics)
      for k, v in alone.metrics.items():
        if k not in ("round_seconds", "clients_per_second", "examples_per_second"):
          assert result.metrics[k] == pytest.approx(v, rel=2e-5, abs=1e-6), (m, r, k)
      order = np.argsort(result.clients["client_id"])
      other = np.argsort(alone.clients["client_id"])
      for k in alone.clients:
        np.testing.assert_allclose(result.clients[k][order], alone.clients[k][other], rtol=2e-5)
  final = driver.unstack(stacked)
  for m, state in enumerate(final):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6),
                 jax.device_get(state.server), jax.device_get(separate[m][-1].state.server))
  # The members really differ, and one program per chunk shape served them all.
  losses = {round(results[m].metrics["train_loss"], 6) for m in range(len(MEMBERS))}
  assert len(losses) == len(MEMBERS)
  assert 0 < driver.traces <= separate_traces


def test_merge_chunks_keeps_each_members_blocks_steps_and_devices():
  planner = Planner(batch_size=4, block_size=8, num_devices=2, max_chunk_examples=4096)
  a = planner.plan(0, np.arange(0, 12), np.full(12, 4))  # 1 step
  b = planner.plan(0, np.arange(20, 50), np.full(30, 16))  # 4 steps, larger blocks
  (ca,), (cb,) = a.chunks, b.chunks
  merged = merge_chunks([ca, None, cb], 2)
  assert merged["pad_to"] == max(ca.pad_to, cb.pad_to)
  # As many blocks as the busiest member uses (a power of two), not the planner's buffer.
  assert merged["num_blocks"] == 2 < max(ca.num_blocks, cb.num_blocks)
  for i, c in ((0, ca), (2, cb)):
    assert sorted(merged["ids"][i][merged["valid"][i]]) == sorted(c.client_ids[c.valid])
    np.testing.assert_array_equal(merged["blocks_used"][i], c.blocks_used)
    used = c.blocks_used.max()
    steps = merged["block_steps"][i].reshape(2, -1)[:, :used]
    np.testing.assert_array_equal(steps, c.block_steps[:, :used])
    # Each client stays on its device.
    per_dev = merged["ids"][i].reshape(2, -1), merged["valid"][i].reshape(2, -1)
    for d in range(2):
      mine = c.client_ids.reshape(2, -1)[d][c.valid.reshape(2, -1)[d]]
      assert sorted(per_dev[0][d][per_dev[1][d]]) == sorted(mine)
  assert not merged["valid"][1].any() and not merged["blocks_used"][1].any()


def test_engines_of_other_shapes_are_refused():
  small = packed_dataset(SIZES[:20])
  engines = [_engine(packed_dataset(SIZES), 0, 0.1, 1.0, 0.0, "host"),
             _engine(small, 1, 0.1, 1.0, 0.0, "host")]
  for e in engines:
    e.init(MODEL.init(jax.random.key(0)))
  with pytest.raises(MemberError, match="differs from member 0 in its clients"):
    MemberRounds(engines, lambda h: (engines[0].algorithm, STAGE), {})


@pytest.mark.slow
def test_members_equal_separate_runs_on_two_devices():
  """The member axis inside a shard_map over two devices (a fresh interpreter)."""
  out = run_python(
      "import sys, jax, pytest\n"
      "assert jax.device_count() == 2, jax.devices()\n"
      "sys.exit(pytest.main(['-q', '-n', '0', '-p', 'no:cacheprovider',"
      " 'tests/core/test_members.py::test_members_equal_separate_runs']))\n",
      {"XLA_FLAGS": xla_flags(2)}, timeout=900)
  assert "2 passed" in out, out
