import numpy as np
import pytest

from fedjax_sim.core.plan import Planner, step_ladder


def _check_plan(plan, ids, sizes, batch):
  seen = []
  for chunk in plan.chunks:
    assert chunk.size % 1 == 0 and chunk.size == len(chunk.valid)
    assert chunk.pad_to % batch == 0
    real = chunk.client_ids[chunk.valid]
    for cid in real:
      assert sizes[np.searchsorted(ids, cid)] <= chunk.pad_to
    seen.extend(real)
  np.testing.assert_array_equal(np.sort(seen), ids)


def test_every_client_is_planned_exactly_once_and_fits_its_bucket():
  rng = np.random.default_rng(0)
  ids = np.sort(rng.choice(10_000, 777, replace=False))
  sizes = rng.integers(1, 300, size=777)
  planner = Planner(batch_size=8, block_size=16, num_devices=2, max_chunk_clients=128)
  plan = planner.plan(0, ids, sizes)
  _check_plan(plan, ids, sizes, 8)
  for chunk in plan.chunks:
    assert chunk.size % 2 == 0  # divisible over devices
    assert chunk.size == 2 * chunk.num_blocks * chunk.block_size
  processed = sum(c.size * c.pad_to for c in plan.chunks)
  assert plan.padding_efficiency == pytest.approx(sizes.sum() / processed)


def test_bucketing_keeps_padding_efficiency_high_on_lognormal_sizes():
  rng = np.random.default_rng(1)
  sizes = np.clip(np.round(np.exp(rng.normal(np.log(32), 1.0, 5000))), 1, 1024).astype(int)
  ids = np.arange(5000)
  bucketed = Planner(batch_size=8, block_size=64, bucket_ratio=1.25).plan(0, ids, sizes)
  flat = Planner(batch_size=8, block_size=64, bucket_ratio=None).plan(0, ids, sizes)
  _check_plan(bucketed, ids, sizes, 8)
  _check_plan(flat, ids, sizes, 8)
  assert bucketed.padding_efficiency >= 0.8
  assert flat.padding_efficiency < 0.2
  assert bucketed.real_examples == flat.real_examples == sizes.sum()


def test_cohort_sizes_reuse_a_small_set_of_chunk_shapes():
  planner = Planner(batch_size=8, block_size=32, num_devices=1, max_chunk_clients=1024)
  shapes = set()
  for k in range(1, 3000, 7):
    plan = planner.plan(0, np.arange(k), np.full(k, 32))
    shapes |= {(c.num_blocks, c.block_size, c.pad_to) for c in plan.chunks}
    assert plan.padding_efficiency > 0.5 or k < 8
  assert len(shapes) <= len(planner.chunk_sizes())


def test_step_ladder_is_geometric():
  ladder = step_ladder(1000, 1.25)
  assert ladder[0] == 1 and ladder[-1] >= 1000
  assert np.all(np.diff(ladder) >= 1)
  assert np.all(ladder[1:] <= np.maximum(ladder[:-1] + 1, ladder[:-1] * 1.25))
