"""Tests of the scalable Gaussian-mixture task and log-normal client sizes."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest

from fedjax_sim.datasets import gaussian_mixture, lognormal_sizes


def _client_stats(data):
  x = data.features["x"].astype(np.float64)
  means = np.stack([x[s:s + n].mean(0) for s, n in zip(data.starts, data.sizes)])
  within = np.concatenate([x[s:s + n] - x[s:s + n].mean(0)
                           for s, n in zip(data.starts, data.sizes)])
  return means, within.var(0) * len(within) / (len(within) - data.num_clients)


def test_shapes_and_dtypes():
  data = gaussian_mixture(50, 8, 12, 5, seed=0)
  assert data.num_clients == 50 and np.all(data.sizes == 8)
  x, y = data.features["x"], data.features["y"]
  assert x.dtype == np.float32 and x.shape == (400, 12)
  assert y.dtype == np.int32 and y.min() >= 0 and y.max() < 5
  assert np.all(np.isfinite(x))


def test_deterministic_by_seed_and_seeds_differ():
  a = gaussian_mixture(30, 4, 6, seed=1)
  b = gaussian_mixture(30, 4, 6, seed=1)
  c = gaussian_mixture(30, 4, 6, seed=2)
  np.testing.assert_array_equal(a.features["x"], b.features["x"])
  np.testing.assert_array_equal(a.features["y"], b.features["y"])
  assert not np.array_equal(a.features["x"], c.features["x"])


def test_sizes_are_honored_including_empty_clients():
  sizes = np.array([3, 0, 17, 1, 0, 40])
  data = gaussian_mixture(6, num_features=4, seed=0, sizes=sizes)
  np.testing.assert_array_equal(data.sizes, sizes)
  assert data.features["x"].shape == (61, 4)
  het = lognormal_sizes(200, seed=3)
  data = gaussian_mixture(200, num_features=4, seed=0, sizes=het)
  np.testing.assert_array_equal(data.sizes, het)


def test_tiny_label_skew_makes_clients_nearly_single_class():
  data = gaussian_mixture(100, 64, 4, 10, seed=0, label_skew=1e-3)
  counts = np.stack([np.bincount(data.client(k)["y"], minlength=10) for k in range(100)])
  assert (counts.max(1) / 64).mean() > 0.95
  # ... but different clients get different classes.
  assert len(np.unique(counts.argmax(1))) >= 5


def test_iid_and_huge_label_skew_are_near_uniform():
  for skew in (None, 1e4):
    data = gaussian_mixture(500, 64, 4, 10, seed=1, label_skew=skew)
    freq = np.bincount(data.features["y"], minlength=10) / data.num_examples
    assert np.all(np.abs(freq - 0.1) < 0.01)
    counts = np.stack([np.bincount(data.client(k)["y"], minlength=10) for k in range(500)])
    assert (counts.max(1) / 64).mean() < 0.3


def test_class_means_have_norm_class_sep_and_noise_has_given_std():
  data = gaussian_mixture(200, 64, 64, 4, seed=2, label_skew=None, client_shift=0.0,
                          class_sep=10.0, noise=0.5)
  x, y = data.features["x"].astype(np.float64), data.features["y"]
  class_means = np.stack([x[y == c].mean(0) for c in range(4)])
  assert np.all(np.abs(np.linalg.norm(class_means, axis=1) / 10.0 - 1.0) < 0.25)
  residual = x - class_means[y]
  np.testing.assert_allclose(residual.var(0), 0.25, rtol=0.1)


def test_client_shift_moves_client_means():
  shifted = gaussian_mixture(300, 64, 64, 4, seed=3, label_skew=None, class_sep=0.0,
                             client_shift=8.0)
  means, within_var = _client_stats(shifted)
  # ||s_k|| ~= 8; a 64-example mean adds noise of squared norm 64/64 = 1.
  assert math.sqrt(64 + 1) * 0.85 < np.linalg.norm(means, axis=1).mean() < math.sqrt(65) * 1.15
  np.testing.assert_allclose(within_var, 1.0, rtol=0.1)
  unshifted = gaussian_mixture(300, 64, 64, 4, seed=3, label_skew=None, class_sep=0.0,
                               client_shift=0.0)
  means, _ = _client_stats(unshifted)
  assert 0.85 < np.linalg.norm(means, axis=1).mean() < 1.15


def test_chunks_have_their_own_streams_whatever_the_thread_count():
  # 2.5 chunks of 16,384 clients: equal bytes on 1 and 3 threads, and the first two chunks
  # are the population of 32,768 clients (chunk k's stream depends on the seed and k only).
  n, chunk = 40_000, 16_384
  one = gaussian_mixture(n, 2, 3, 4, seed=5, sizes=np.arange(n) % 3, threads=1)
  three = gaussian_mixture(n, 2, 3, 4, seed=5, sizes=np.arange(n) % 3, threads=3)
  for k in ("x", "y"):
    np.testing.assert_array_equal(one.features[k], three.features[k])
  prefix = gaussian_mixture(2 * chunk, 2, 3, 4, seed=5, sizes=np.arange(2 * chunk) % 3,
                            threads=2)
  end = int(one.starts[2 * chunk])
  for k in ("x", "y"):
    np.testing.assert_array_equal(one.features[k][:end], prefix.features[k])
  # Chunks differ from one another (each its own stream, not one stream restarted).
  x = one.features["x"]
  first, second = x[:50], x[int(one.starts[chunk]):int(one.starts[chunk]) + 50]
  assert first.shape == second.shape and not np.array_equal(first, second)
  with pytest.raises(ValueError, match="threads"):
    gaussian_mixture(10, 2, 3, 4, seed=5, threads=0)


@pytest.mark.parametrize("threads", [1, 2])
def test_many_clients_in_bounded_extra_memory(threads):
  num_clients, per_client, dim = 200_000, 16, 16
  tracemalloc.start()
  try:
    tracemalloc.reset_peak()
    data = gaussian_mixture(num_clients, per_client, dim, seed=0, threads=threads)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  output = data.features["x"].nbytes + data.features["y"].nbytes
  assert data.num_clients == num_clients
  assert data.features["x"].shape == (num_clients * per_client, dim)
  assert output > 200e6
  # Temporaries are per chunk and thread, not per population: far less than the output.
  assert peak - output < 150e6 * threads, (peak - output) / 1e6
  # The last chunk was filled too (np.empty would leave arbitrary bytes).
  tail = data.features["x"][-1000:].astype(np.float64)
  assert np.all(np.isfinite(tail)) and 0.5 < tail.std() < 3.0


def test_lognormal_sizes_law_and_clipping():
  sizes = lognormal_sizes(20000, median=32, sigma=1.0, max_size=100000, min_size=1, seed=0)
  assert sizes.dtype == np.int64 and sizes.shape == (20000,)
  assert abs(np.median(sizes) - 32) <= 1
  # P(size <= round(32 e)) ~= Phi(1).
  assert abs(np.mean(sizes <= 32 * math.e) - 0.8413) < 0.02
  clipped = lognormal_sizes(5000, median=32, sigma=3.0, max_size=200, min_size=5, seed=1)
  assert clipped.min() == 5 and clipped.max() == 200
  flat = lognormal_sizes(10, median=17, sigma=0.0, seed=2)
  assert np.all(flat == 17)
  assert not np.array_equal(lognormal_sizes(50, seed=3), lognormal_sizes(50, seed=4))
  np.testing.assert_array_equal(lognormal_sizes(50, seed=3), lognormal_sizes(50, seed=3))


@pytest.mark.parametrize("kwargs, name", [
    (dict(num_clients=0), "num_clients"),
    (dict(examples_per_client=0), "examples_per_client"),
    (dict(num_classes=1), "num_classes"),
    (dict(label_skew=0.0), "label_skew"),
    (dict(client_shift=-1.0), "client_shift"),
    (dict(noise=float("inf")), "noise"),
    (dict(seed=-1), "seed"),
    (dict(sizes=np.array([1, 2])), "sizes"),
    (dict(sizes=np.array([1, -2, 3])), "sizes"),
    (dict(sizes=np.array([1.0, 2.0, 3.0])), "sizes"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
  args = dict(num_clients=3, seed=0)
  args.update(kwargs)
  with pytest.raises(ValueError, match=name):
    gaussian_mixture(**args)


@pytest.mark.parametrize("kwargs, name", [
    (dict(median=0), "median"),
    (dict(sigma=-0.1), "sigma"),
    (dict(max_size=0), "max_size"),
    (dict(min_size=10, max_size=5), "max_size"),
])
def test_lognormal_sizes_bad_arguments(kwargs, name):
  args = dict(num_clients=3, seed=0)
  args.update(kwargs)
  with pytest.raises(ValueError, match=name):
    lognormal_sizes(**args)
