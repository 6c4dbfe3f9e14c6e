import numpy as np
import pytest

from fedjax_sim.core.plan import Planner
from fedjax_sim.datasets import lognormal_sizes


def _check_plan(plan, planner, ids, sizes):
  """Independent checks of a plan's layout and of its computed-work count."""
  b = planner.batch_size
  steps_of = dict(zip(ids.tolist(), np.maximum(1, -(-sizes // b)).tolist()))
  seen, computed = [], 0
  for c in plan.chunks:
    per_device = c.capacity // planner.num_devices
    assert c.capacity % planner.num_devices == 0 and per_device == c.num_blocks * c.block_size
    assert c.pad_to % b == 0
    for d in range(planner.num_devices):
      valid = c.valid[d * per_device:(d + 1) * per_device]
      n = int(valid.sum())
      assert valid[:n].all() and not valid[n:].any()  # real clients first on each device
      assert c.blocks_used[d] == -(-n // c.block_size)
      dev_ids = c.client_ids[d * per_device:d * per_device + n]
      assert np.all(np.maximum(1, -(-sizes[np.searchsorted(ids, dev_ids)] // b)) * b <= c.pad_to)
      for i in range(c.blocks_used[d]):
        blk = dev_ids[i * c.block_size:(i + 1) * c.block_size]
        need = max(steps_of[x] for x in blk)
        assert need <= c.block_steps[d, i] <= c.pad_to // b
        if planner.bucketing:
          assert c.block_steps[d, i] == need
        computed += c.block_size * int(c.block_steps[d, i]) * b
      assert not c.block_steps[d, c.blocks_used[d]:].any()
      seen.extend(dev_ids)
  np.testing.assert_array_equal(np.sort(seen), ids)
  assert plan.computed_examples == computed
  assert plan.real_examples == sizes.sum()
  assert plan.padding_efficiency == pytest.approx(sizes.sum() / computed)


@pytest.mark.parametrize("by_owner", [False, True])
@pytest.mark.parametrize("bucketing", [True, False])
@pytest.mark.parametrize("devices,block", [(1, 16), (2, 8), (4, 32)])
def test_every_client_is_planned_once_in_a_consistent_layout(bucketing, devices, block, by_owner):
  rng = np.random.default_rng(0)
  ids = np.sort(rng.choice(10_000, 777, replace=False))
  sizes = rng.integers(0, 300, size=777)
  rows = -(-10_000 // devices)  # a population of 10,000 in contiguous ranges per device
  planner = Planner(batch_size=8, block_size=block, num_devices=devices,
                    max_chunk_examples=8192, bucketing=bucketing, by_owner=by_owner,
                    owner_rows=rows if by_owner else 0)
  plan = planner.plan(0, ids, sizes)
  _check_plan(plan, planner, ids, sizes)
  if by_owner:  # every client sits on its owner device: ids [d * rows, (d + 1) * rows)
    for c in plan.chunks:
      device_of_slot = np.repeat(np.arange(devices), c.capacity // devices)
      np.testing.assert_array_equal((c.client_ids // rows)[c.valid], device_of_slot[c.valid])


def test_owner_planning_needs_the_rows_per_device():
  with pytest.raises(ValueError, match="owner_rows"):
    Planner(batch_size=8, block_size=8, num_devices=2, by_owner=True)


def test_bucketing_keeps_padding_efficiency_high_on_lognormal_sizes():
  sizes = lognormal_sizes(10_000, median=32, sigma=1.0, max_size=1024, seed=1)
  ids = np.arange(10_000)
  kw = dict(batch_size=8, block_size=64, num_devices=2)
  bucketed = Planner(**kw).plan(0, ids, sizes)
  flat = Planner(**kw, bucketing=False).plan(0, ids, sizes)
  assert bucketed.padding_efficiency >= 0.8
  assert flat.padding_efficiency < 0.2
  assert bucketed.real_examples == flat.real_examples == sizes.sum()


def test_varying_cohorts_reuse_a_small_set_of_chunk_shapes():
  planner = Planner(batch_size=8, block_size=32, num_devices=2, max_chunk_examples=1 << 16)
  rng = np.random.default_rng(2)
  shapes = set()
  for k in rng.integers(64, 5000, size=60):  # cohorts of at least one full block per device
    sizes = lognormal_sizes(int(k), median=32, sigma=1.0, max_size=1024, seed=int(k))
    plan = planner.plan(0, np.arange(k), sizes)
    shapes |= {(c.num_blocks, c.block_size, c.pad_to) for c in plan.chunks}
  classes = {p for _, _, p in shapes}
  assert len(classes) <= 8  # powers of two from 1 to 128 steps
  for nb, b, pad_to in shapes:  # one block size per class, block counts from the ladder
    assert b <= planner.class_block(pad_to // 8, 10_000) and b & (b - 1) == 0
    assert nb in planner.blocks_per_device(pad_to, b)


def test_block_ladder_respects_the_chunk_budget():
  planner = Planner(batch_size=8, block_size=64, num_devices=2, max_chunk_examples=1 << 18)
  for pad_to in (8, 32, 256, 1024, 8192):
    ladder = planner.blocks_per_device(pad_to, 64)
    assert ladder == sorted(ladder) and ladder[0] >= 1
    assert ladder[-1] * 2 * 64 * pad_to <= max(1 << 18, 2 * 64 * pad_to)
    # The smallest rung fills a quarter of a chunk (if the top allows): small,
    # varying classes share it.
    assert ladder[0] == max(1, min(ladder[-1], (1 << 18) // 4 // (2 * 64 * pad_to)))


def test_small_classes_share_one_shape_whatever_their_size():
  planner = Planner(batch_size=8, block_size=64, num_devices=2, max_chunk_examples=1 << 16)
  shapes = set()
  for n in (1, 3, 17, 40, 64):  # up to half a block per device
    plan = planner.plan(0, np.arange(n), np.full(n, 16))
    shapes |= {(c.num_blocks, c.block_size, c.pad_to) for c in plan.chunks}
    assert plan.num_clients == n and sum(c.num_clients for c in plan.chunks) == n
  assert shapes == {((1 << 16) // 4 // (2 * 8 * 16), 8, 16)}


def test_long_clients_use_smaller_blocks():
  planner = Planner(batch_size=8, block_size=64, num_devices=2, full_block_steps=8)
  assert [planner.class_block(c, 10_000) for c in (1, 8, 16, 64, 128)] == [64, 64, 32, 8, 8]
  default = Planner(batch_size=8, block_size=64, num_devices=2)  # full blocks up to 16 steps
  assert [default.class_block(c, 10_000) for c in (1, 16, 32, 64, 256)] == [64, 64, 32, 16, 8]


def test_blocks_are_dealt_to_balance_the_devices_work():
  # One class (steps 9..16, block 2): blocks of 16, 12, 11 and 10 steps. Round-robin would
  # give device 0 16 + 11 = 27 steps and device 1 12 + 10 = 22 (the chunk lasts 27);
  # dealing each block to the least-loaded device gives 16 + 10 = 26 and 12 + 11 = 23 ...
  sizes = 8 * np.array([16, 16, 12, 12, 11, 11, 10, 10])
  planner = Planner(batch_size=8, block_size=2, num_devices=2, small_class_block=False)
  (chunk,) = planner.plan(0, np.arange(8), sizes).chunks
  loads = [int(chunk.block_steps[d, :chunk.blocks_used[d]].sum()) for d in range(2)]
  assert loads == [16 + 10, 12 + 11]
  assert list(chunk.blocks_used) == [2, 2]
  # ... and equal steps alternate devices, as round-robin would.
  (even,) = planner.plan(0, np.arange(8), np.full(8, 8 * 12)).chunks
  assert [int(even.block_steps[d, :even.blocks_used[d]].sum()) for d in range(2)] == [24, 24]
  # The same clients by owner (ids 0-3 on device 0): 16 + 12 against 11 + 10.
  owner = Planner(batch_size=8, block_size=2, num_devices=2, small_class_block=False,
                  by_owner=True, owner_rows=4)
  (chunk,) = owner.plan(0, np.arange(8), sizes).chunks
  assert [int(chunk.block_steps[d, :chunk.blocks_used[d]].sum()) for d in range(2)] == [28, 21]


def test_tiny_cohorts_use_small_blocks():
  planner = Planner(batch_size=8, block_size=64, num_devices=2)
  assert planner.round_block(3) == 8 and planner.round_block(40) == 32
  assert planner.round_block(10_000) == 64


def test_empty_cohort_plans_nothing():
  plan = Planner(batch_size=8, block_size=4).plan(3, np.zeros(0, np.int64), np.zeros(0, np.int64))
  assert plan.chunks == () and plan.padding_efficiency == 1.0
