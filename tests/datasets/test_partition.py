"""Tests of the IID, Dirichlet, shards, quantity-skew and Pachinko partitioners."""

from __future__ import annotations

import numpy as np
import pytest

from fedjax_sim.datasets import (dirichlet_partition, iid_partition, pachinko_partition,
                                 quantity_skew_partition, shards_partition)

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
    lambda x, y, seed: quantity_skew_partition(x, y, 17, exponent=1.2, seed=seed),
    lambda x, y, seed: quantity_skew_partition(x, y, 17, exponent=0.3, seed=seed, min_size=20),
    # 10 clients of 100 use every example: labels run out and are removed on the way.
    lambda x, y, seed: pachinko_partition(x, y, y // 2, 10, 100, seed=seed),
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
    (lambda x, y: quantity_skew_partition(x, y, 3, exponent=0.0, seed=0), "exponent"),
    (lambda x, y: quantity_skew_partition(x, y, 3, exponent=float("inf"), seed=0), "exponent"),
    (lambda x, y: quantity_skew_partition(x, y, 3, exponent=1.0, seed=0, min_size=400),
     "min_size"),
    (lambda x, y: quantity_skew_partition(x, y, 0, exponent=1.0, seed=0), "num_clients"),
    (lambda x, y: pachinko_partition(x, y, y // 2, 11, 100, seed=0), "examples_per_client"),
    (lambda x, y: pachinko_partition(x, y, y // 2, 3, 0, seed=0), "examples_per_client"),
    (lambda x, y: pachinko_partition(x, y, y // 2, 3, 10, alpha=-1.0, seed=0), "alpha"),
    (lambda x, y: pachinko_partition(x, y, y // 2, 3, 10, beta=0.0, seed=0), "beta"),
    (lambda x, y: pachinko_partition(x, y, (y // 2)[:-1], 3, 10, seed=0), "coarse"),
    (lambda x, y: pachinko_partition(x, y, (y // 2).astype(float), 3, 10, seed=0), "coarse"),
    (lambda x, y: pachinko_partition(x, y, np.arange(N) % 3, 3, 10, seed=0),
     "label 0 has coarse labels"),
])
def test_bad_arguments_raise_value_error_naming_them(call, name):
  x, y = _data()
  with pytest.raises(ValueError, match=name):
    call(x, y)


# -- quantity skew -------------------------------------------------------------------------


def test_quantity_skew_sizes_follow_the_power_law():
  # Sizes are proportional to Pareto(a) weights, so the Hill estimator of the tail
  # index, K / sum(log(size_k / min size)), recovers a (rounding is negligible with
  # ~100 examples per client; its standard error is a / sqrt(K), about 2%).
  n, k = 200_000, 2000
  x, y = np.zeros(n, np.int8), np.zeros(n, np.int64)
  for a in (1.0, 2.0, 4.0):
    sizes = quantity_skew_partition(x, y, k, exponent=a, seed=1, min_size=0).sizes
    assert sizes.sum() == n
    hill = k / np.sum(np.log(sizes / sizes.min()))
    assert abs(hill - a) < 0.15 * a


def test_quantity_skew_heavier_tail_for_smaller_exponent_and_min_size_kept():
  x, y = _data()
  heavy = quantity_skew_partition(x, y, 20, exponent=0.5, seed=0, min_size=5).sizes
  light = quantity_skew_partition(x, y, 20, exponent=8.0, seed=0, min_size=5).sizes
  assert heavy.min() >= 5 and light.min() >= 5
  assert heavy.sum() == light.sum() == N
  assert heavy.max() / np.median(heavy) > 2 * light.max() / np.median(light)
  # Labels are dealt IID: the largest client sees every class.
  data = quantity_skew_partition(x, y, 20, exponent=0.5, seed=0, min_size=5)
  assert (_counts(data)[np.argmax(data.sizes)] > 0).all()


# -- Pachinko allocation -------------------------------------------------------------------


def _cifar_like(per_label: int = 60):
  """100 fine labels in 20 coarse labels of 5 (CIFAR-100's shape); x[i] = i."""
  y = np.repeat(np.arange(100), per_label)
  return np.arange(len(y)), y, y // 5


def _client_labels(data, i):
  return data.client(i)["y"]


def test_pachinko_sizes_exact_examples_unique_labels_kept():
  x, y, coarse = _cifar_like()
  data = pachinko_partition(x, y, coarse, 30, 100, seed=0)
  np.testing.assert_array_equal(data.sizes, np.full(30, 100))
  used = data.features["x"]
  assert len(np.unique(used)) == len(used) == 3000  # every example at most once
  np.testing.assert_array_equal(data.features["y"], y[used])
  assert data.features["y"].dtype == np.int32


def test_pachinko_small_alpha_concentrates_clients_on_few_coarse_labels():
  # Dir(0.1) over 20 coarse labels puts most mass on one or two of them: the mean
  # largest coarse share is about 0.55 (>= 0.45 over 50 seeds); with alpha = 1000 each
  # client spreads over all 20 (mean largest share <= 0.11 over 50 seeds).
  x, y, coarse = _cifar_like()

  def stats(alpha, seed):
    data = pachinko_partition(x, y, coarse, 30, 100, alpha=alpha, seed=seed)
    counts = np.stack([np.bincount(_client_labels(data, i) // 5, minlength=20)
                       for i in range(30)])
    return (counts.max(1) / 100).mean(), (counts >= 5).sum(1).mean()

  for seed in (0, 1, 2):
    share, used = stats(0.1, seed)
    assert share > 0.3 and used < 7
    share, used = stats(1000.0, seed)
    assert share < 0.2 and used > 9


def test_pachinko_small_beta_concentrates_a_coarse_label_on_one_fine_label():
  x, y, coarse = _cifar_like()

  def fine_share(beta):
    data = pachinko_partition(x, y, coarse, 30, 100, alpha=1000.0, beta=beta, seed=0)
    shares = []
    for i in range(30):
      fine = _client_labels(data, i)
      for c in range(20):
        members = fine[fine // 5 == c]
        if len(members) >= 5:
          shares.append(np.bincount(members).max() / len(members))
    return np.mean(shares)

  assert fine_share(0.01) > 0.8  # >= 0.96 over 20 seeds
  assert fine_share(1000.0) < 0.6  # <= 0.44 over 20 seeds


def test_pachinko_exhausted_labels_are_removed_and_renormalized():
  # Coarse label 7 has one fine label with 3 examples; the others 50 each. Using every
  # example forces both removals (a fine label, then its coarse label) on the way.
  y = np.concatenate([np.full(3, 70), np.repeat([10, 11, 20], 50)])
  coarse = np.concatenate([np.full(3, 7), [1] * 100, [2] * 50])
  x = np.arange(len(y))
  for seed in range(5):
    data = pachinko_partition(x, y, coarse, 17, 9, alpha=0.05, seed=seed)
    assert np.all(data.sizes == 9)
    np.testing.assert_array_equal(np.sort(data.features["x"]), x)


def test_pachinko_reproducible_and_seed_dependent():
  x, y, coarse = _cifar_like(20)
  a, b, c = (pachinko_partition(x, y, coarse, 10, 50, seed=s) for s in (3, 3, 4))
  np.testing.assert_array_equal(a.features["x"], b.features["x"])
  assert not np.array_equal(a.features["x"], c.features["x"])


# -- data.kind = npz: the new partitions from a config -------------------------------------


def _npz_build(tmp_path, data: dict, seed: int = 3, **arrays):
  from fedjax_sim.core.registry import DATASETS, Context
  from fedjax_sim.runner.config import config_from_dict
  path = tmp_path / "d.npz"
  np.savez(path, **arrays)
  c = config_from_dict({"seed": seed, "data": {"kind": "npz", "path": str(path), **data},
                        "sampling": {"clients_per_round": 2}})
  return c, DATASETS.get("npz").build(c.data, Context(seed=seed, config=c))


def test_npz_quantity_skew_and_pachinko_are_the_partitioners(tmp_path):
  x, y, coarse = _cifar_like(10)
  x = np.stack([x, -x], 1).astype(np.float32) / 1000
  _, got = _npz_build(tmp_path, {"partition": "quantity_skew", "num_clients": 12,
                                 "quantity_exponent": 0.7}, x=x, y=y)
  want = quantity_skew_partition(x, y, 12, exponent=0.7, seed=3)
  np.testing.assert_array_equal(got.features["x"], want.features["x"])
  np.testing.assert_array_equal(got.sizes, want.sizes)

  _, got = _npz_build(tmp_path, {"partition": "pachinko", "num_clients": 8,
                                 "pachinko_alpha": 0.3, "pachinko_beta": 2.0},
                      x=x, y=y, y_coarse=coarse)
  want = pachinko_partition(x, y, coarse, 8, 1000 // 8, alpha=0.3, beta=2.0, seed=3)
  np.testing.assert_array_equal(got.features["x"], want.features["x"])
  np.testing.assert_array_equal(got.sizes, np.full(8, 125))  # examples_per_client 0: N // K

  _, got = _npz_build(tmp_path, {"partition": "pachinko", "num_clients": 8,
                                 "examples_per_client": 20}, x=x, y=y, y_coarse=coarse)
  np.testing.assert_array_equal(got.sizes, np.full(8, 20))


def test_npz_config_lists_only_the_chosen_partitions_keys(tmp_path):
  from fedjax_sim.runner.config import config_from_dict, to_dict
  for partition, own in [("iid", set()), ("quantity_skew", {"quantity_exponent"}),
                         ("pachinko", {"pachinko_alpha", "pachinko_beta", "examples_per_client"})]:
    c = config_from_dict({"data": {"kind": "npz", "path": "a.npz", "partition": partition}})
    d = to_dict(c)["data"]
    others = {"dirichlet_alpha", "shards_per_client", "quantity_exponent", "pachinko_alpha",
              "pachinko_beta", "examples_per_client"}
    assert own <= set(d) and not (others - own) & set(d)
    assert config_from_dict(to_dict(c)) == c
  # A key of another partition set away from its default stays (and reads back the same).
  c = config_from_dict({"data": {"kind": "npz", "path": "a.npz", "partition": "iid",
                                 "dirichlet_alpha": 0.3}})
  assert to_dict(c)["data"]["dirichlet_alpha"] == 0.3 and config_from_dict(to_dict(c)) == c


def test_npz_pachinko_errors_name_the_file_and_the_problem(tmp_path):
  from fedjax_sim.runner.config import ConfigError
  x, y, coarse = _cifar_like(2)
  x = x / 1000
  with pytest.raises(ConfigError, match=r"d.npz.*needs the coarse label .* 'y_coarse'"):
    _npz_build(tmp_path, {"partition": "pachinko", "num_clients": 4}, x=x, y=y)
  with pytest.raises(ConfigError, match=r"d.npz.*y_coarse has shape \(199,\)"):
    _npz_build(tmp_path, {"partition": "pachinko", "num_clients": 4}, x=x, y=y,
               y_coarse=coarse[:-1])
  with pytest.raises(ConfigError, match=r"y_coarse\[3\] = -1 is negative"):
    _npz_build(tmp_path, {"partition": "pachinko", "num_clients": 4}, x=x, y=y,
               y_coarse=np.where(np.arange(200) == 3, -1, coarse))
  with pytest.raises(ConfigError, match=r"cannot split .*d.npz.*label 0 has coarse labels"):
    _npz_build(tmp_path, {"partition": "pachinko", "num_clients": 4}, x=x, y=y,
               y_coarse=np.arange(200) % 3)
  with pytest.raises(ConfigError, match=r"cannot split .*num_clients \* examples_per_client"):
    _npz_build(tmp_path, {"partition": "pachinko", "num_clients": 4, "examples_per_client": 51},
               x=x, y=y, y_coarse=coarse)
