"""Tests of the IID, Dirichlet and shards partitioners."""

from __future__ import annotations

import numpy as np
import pytest

from fedjax_sim.datasets import dirichlet_partition, iid_partition, shards_partition

N = 1000
NUM_CLASSES = 10


def _data(n: int = N, num_classes: int = NUM_CLASSES):
  """x[i, 0, 0] = i identifies example i; y is balanced over classes."""
  x = np.zeros((n, 3, 2), np.float64)
  x[:, 0, 0] = np.arange(n)
  x[:, 1, 1] = -np.arange(n)
  y = (np.arange(n) * 7) % num_classes
  return x, y.astype(np.int64)


def _counts(data, num_classes: int = NUM_CLASSES) -> np.ndarray:
  """[num_clients, num_classes] label counts."""
  y = data.features["y"]
  return np.stack([np.bincount(y[s:s + n], minlength=num_classes)
                   for s, n in zip(data.starts, data.sizes)])


PARTITIONERS = [
    lambda x, y, seed: iid_partition(x, y, 17, seed=seed),
    lambda x, y, seed: dirichlet_partition(x, y, 17, 0.3, seed=seed),
    lambda x, y, seed: dirichlet_partition(x, y, 17, 0.3, seed=seed, min_size=5),
    lambda x, y, seed: shards_partition(x, y, 17, 3, seed=seed),
]


@pytest.mark.parametrize("partition", PARTITIONERS)
def test_every_example_exactly_once_with_its_label(partition):
  x, y = _data()
  data = partition(x, y, 0)
  assert data.num_examples == N
  out_x, out_y = data.features["x"], data.features["y"]
  assert out_x.dtype == x.dtype and out_x.shape == x.shape
  assert out_y.dtype == np.int32
  ids = out_x[:, 0, 0].astype(np.int64)
  np.testing.assert_array_equal(np.sort(ids), np.arange(N))
  np.testing.assert_array_equal(out_y, y[ids])
  np.testing.assert_array_equal(out_x, x[ids])
  # Windows tile the arrays contiguously.
  np.testing.assert_array_equal(data.starts, np.concatenate([[0], np.cumsum(data.sizes)[:-1]]))


@pytest.mark.parametrize("partition", PARTITIONERS)
def test_deterministic_by_seed(partition):
  x, y = _data()
  a, b, c = partition(x, y, 4), partition(x, y, 4), partition(x, y, 5)
  np.testing.assert_array_equal(a.features["x"], b.features["x"])
  np.testing.assert_array_equal(a.sizes, b.sizes)
  assert not np.array_equal(a.features["x"], c.features["x"])


def test_iid_sizes_differ_by_at_most_one_and_labels_mix():
  x, y = _data()
  data = iid_partition(x, y, 30, seed=0)
  assert data.num_clients == 30 and data.sizes.max() - data.sizes.min() <= 1
  # 33-34 random examples over 10 balanced classes: every client sees several classes.
  assert (_counts(data) > 0).sum(1).min() >= 4


def test_shards_one_class_per_shard_when_shards_fit_in_classes():
  x, y = _data()  # 100 examples per class
  data = shards_partition(x, y, 50, 2, seed=0)  # 100 shards of 10
  assert np.all(data.sizes == 20)
  counts = _counts(data)
  assert (counts > 0).sum(1).max() <= 2
  assert np.all(counts % 10 == 0)  # each shard lies inside one class


def test_shards_label_count_bound_with_uneven_shards():
  x, y = _data()
  data = shards_partition(x, y, 30, 2, seed=1)  # 60 shards of 16-17 examples
  assert data.sizes.max() - data.sizes.min() <= 2
  assert (_counts(data) > 0).sum(1).max() <= 4


def test_shards_are_random_across_seeds():
  x, y = _data()
  label_sets = {tuple(np.flatnonzero(_counts(shards_partition(x, y, 50, 2, seed=s))[0]))
                for s in range(6)}
  assert len(label_sets) > 1


def test_dirichlet_huge_alpha_is_balanced():
  x, y = _data()
  counts = _counts(dirichlet_partition(x, y, 10, 1e6, seed=0))
  assert np.all(np.abs(counts - 10) <= 2)  # 100 per class / 10 clients


def test_dirichlet_tiny_alpha_gives_each_class_to_one_client():
  # Dir(a * 1_K) puts mass ~ K * a * log(1 / eps) strictly inside (eps, 1 - eps),
  # so with a = 1e-6 a class is split only with probability ~ 1e-4.
  x, y = _data()
  counts = _counts(dirichlet_partition(x, y, 20, 1e-6, seed=0))
  assert np.all(counts.max(0) >= 95)  # >= 95% of each class on one client
  assert (counts.sum(1) > 0).sum() <= NUM_CLASSES + 1


def test_dirichlet_moderate_alpha_is_skewed_but_spread():
  x, y = _data()
  counts = _counts(dirichlet_partition(x, y, 10, 0.1, seed=3))
  fractions = counts / np.maximum(counts.sum(1, keepdims=True), 1)
  balanced = _counts(dirichlet_partition(x, y, 10, 100.0, seed=3))
  bal_fractions = balanced / balanced.sum(1, keepdims=True)
  assert fractions.max(1).mean() > bal_fractions.max(1).mean() + 0.2


def test_dirichlet_min_size_is_honored_or_reported():
  x, y = _data()
  data = dirichlet_partition(x, y, 20, 0.5, seed=0, min_size=20)
  assert data.sizes.min() >= 20
  with pytest.raises(ValueError, match="min_size"):
    # With alpha this small about 10 clients (one per class) get examples.
    dirichlet_partition(x, y, 20, 1e-6, seed=0, min_size=40, max_tries=5)
  with pytest.raises(ValueError, match="min_size"):
    dirichlet_partition(x, y, 20, 0.5, seed=0, min_size=51)


def test_non_contiguous_labels_and_1d_features():
  y = np.repeat(np.array([-3, 7, 100]), 20)
  x = np.arange(60).astype(np.uint8)
  for data in (dirichlet_partition(x, y, 4, 1.0, seed=0), shards_partition(x, y, 6, seed=0),
               iid_partition(x, y, 7, seed=0)):
    assert data.features["x"].dtype == np.uint8
    np.testing.assert_array_equal(np.sort(data.features["x"]), x)
    np.testing.assert_array_equal(data.features["y"], y[data.features["x"].astype(int)])


@pytest.mark.parametrize("call, name", [
    (lambda x, y: iid_partition(x, y.astype(np.float32), 3, seed=0), "y"),
    (lambda x, y: iid_partition(x[:-1], y, 3, seed=0), "x"),
    (lambda x, y: iid_partition(x, y, N + 1, seed=0), "num_clients"),
    (lambda x, y: iid_partition(x, y, 3, seed=-2), "seed"),
    (lambda x, y: dirichlet_partition(x, y, 3, 0.0, seed=0), "alpha"),
    (lambda x, y: dirichlet_partition(x, y, 0, 1.0, seed=0), "num_clients"),
    (lambda x, y: dirichlet_partition(x, y, 3, 1.0, seed=0, max_tries=0), "max_tries"),
    (lambda x, y: shards_partition(x, y, 600, 2, seed=0), "shards_per_client"),
    (lambda x, y: shards_partition(x, y, 3, 0, seed=0), "shards_per_client"),
])
def test_bad_arguments_raise_value_error_naming_them(call, name):
  x, y = _data()
  with pytest.raises(ValueError, match=name):
    call(x, y)
