"""Tests of the FedProx Synthetic(alpha, beta) generator."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedjax_sim.datasets import leaf_synthetic
from fedjax_sim.datasets.synthetic import _draw_sizes


def _client_means(data) -> np.ndarray:
  x = data.features["x"].astype(np.float64)
  return np.stack([x[s:s + n].mean(0) for s, n in zip(data.starts, data.sizes)])


def test_shapes_dtypes_and_reference_defaults():
  data = leaf_synthetic(0.5, 0.5, seed=0, max_size=200)
  assert data.num_clients == 30
  x, y = data.features["x"], data.features["y"]
  assert x.dtype == np.float32 and x.shape == (data.num_examples, 60)
  assert y.dtype == np.int32 and y.shape == (data.num_examples,)
  assert y.min() >= 0 and y.max() < 10
  assert np.all(np.isfinite(x))


def test_sizes_at_least_fifty_and_capped():
  data = leaf_synthetic(1.0, 1.0, 40, seed=3, max_size=120)
  assert data.sizes.min() >= 50 and data.sizes.max() <= 120
  small = leaf_synthetic(1.0, 1.0, 40, seed=3, max_size=120, min_size=0)
  assert small.sizes.min() >= 0


def test_size_law_is_floor_of_lognormal_4_2_plus_50():
  # P(floor(L) + 50 <= 50 + k) = P(L < k + 1) = Phi((log(k + 1) - 4) / 2).
  rng = np.random.default_rng(123)
  sizes = _draw_sizes(rng, 20000, 4.0, 2.0, 50, None)
  assert sizes.dtype == np.int64 and sizes.min() >= 50
  phi = lambda z: 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))
  for k in [0, 5, 54, 400, 3000]:
    expected = phi((math.log(k + 1) - 4.0) / 2.0)
    assert abs(np.mean(sizes - 50 <= k) - expected) < 0.02, k


def test_labels_are_argmax_of_the_clients_teacher():
  data, params = leaf_synthetic(1.0, 1.0, 8, seed=1, max_size=100, return_params=True)
  for k in range(data.num_clients):
    c = data.client(k)
    logits = c["x"].astype(np.float64) @ params.W[k] + params.b[k]
    np.testing.assert_array_equal(c["y"], np.argmax(logits, axis=1))
  # The teachers differ between clients in the non-IID setting.
  assert not np.allclose(params.W[0], params.W[1])


def test_alpha_is_a_standard_deviation_and_w_b_share_u():
  _, params = leaf_synthetic(3.0, 0.0, 300, seed=2, max_size=51, return_params=True)
  # Reference code: np.random.normal(0, alpha) -> Var(u_k) = alpha^2 = 9 (not 3).
  assert 9.0 * 0.75 < np.var(params.u) < 9.0 * 1.25
  w_means = params.W.reshape(300, -1).mean(1)
  assert np.max(np.abs(w_means - params.u)) < 0.25  # 600 entries ~ N(u_k, 1)
  assert np.corrcoef(params.b.mean(1), params.u)[0, 1] > 0.95
  assert np.allclose(params.B, 0.0)


def test_beta_is_a_standard_deviation_seen_in_the_features():
  data = leaf_synthetic(0.0, 3.0, 300, seed=4, max_size=55)
  # Mean over features of a client's mean is B_k + O(1/sqrt(60)): variance beta^2 + ~1/60.
  centers = _client_means(data).mean(1)
  assert 9.0 * 0.75 < np.var(centers) < 9.0 * 1.25


def test_zero_heterogeneity_client_means_are_standard_normal():
  data = leaf_synthetic(0.0, 0.0, 200, seed=5, max_size=60)
  means = _client_means(data)  # v_k + noise of variance <= 1/50
  assert abs(means.mean()) < 0.05
  assert 0.9 < means.var() < 1.12
  # Between-client variance is the same in every feature (v_k ~ N(0, I)).
  per_feature = means.var(0)
  assert per_feature[:5].mean() == pytest.approx(per_feature[-5:].mean(), rel=0.3)


def test_within_client_covariance_is_diag_j_power_minus_1_2():
  data = leaf_synthetic(0.5, 0.5, 200, seed=6, max_size=60)
  x = data.features["x"].astype(np.float64)
  centered = np.concatenate([x[s:s + n] - x[s:s + n].mean(0)
                             for s, n in zip(data.starts, data.sizes)])
  dof = data.num_examples - data.num_clients
  var = (centered ** 2).sum(0) / dof
  expected = np.arange(1, 61) ** -1.2
  np.testing.assert_allclose(var, expected, rtol=0.08)
  corr = np.corrcoef(centered[:, 0], centered[:, 1])[0, 1]
  assert abs(corr) < 0.05


def test_iid_shares_one_teacher_and_zero_feature_mean():
  data, params = leaf_synthetic(0.0, 0.0, 20, seed=7, iid=True, max_size=80,
                                return_params=True)
  assert np.all(params.W == params.W[0]) and np.all(params.b == params.b[0])
  assert np.all(params.v == 0)
  x = data.features["x"].astype(np.float64)
  sd = np.sqrt(np.arange(1, 61) ** -1.2 / data.num_examples)
  assert np.all(np.abs(x.mean(0)) < 5 * sd)
  for k in range(data.num_clients):
    c = data.client(k)
    np.testing.assert_array_equal(
        c["y"], np.argmax(c["x"].astype(np.float64) @ params.W[0] + params.b[0], axis=1))
  # alpha and beta are ignored for IID.
  other = leaf_synthetic(5.0, 5.0, 20, seed=7, iid=True, max_size=80)
  np.testing.assert_array_equal(other.features["x"], data.features["x"])


def test_deterministic_by_seed_and_seeds_differ():
  a = leaf_synthetic(0.5, 0.5, 5, seed=11, max_size=80)
  b = leaf_synthetic(0.5, 0.5, 5, seed=11, max_size=80)
  c = leaf_synthetic(0.5, 0.5, 5, seed=12, max_size=80)
  np.testing.assert_array_equal(a.features["x"], b.features["x"])
  np.testing.assert_array_equal(a.features["y"], b.features["y"])
  np.testing.assert_array_equal(a.sizes, b.sizes)
  assert not (a.sizes.shape == c.sizes.shape and np.array_equal(a.sizes, c.sizes)
              and np.array_equal(a.features["x"], c.features["x"]))


def test_other_dimensions():
  data = leaf_synthetic(1.0, 1.0, 4, seed=0, num_features=7, num_classes=3, max_size=60)
  assert data.features["x"].shape[1] == 7
  assert data.features["y"].max() < 3


@pytest.mark.parametrize("kwargs, name", [
    (dict(alpha=-1.0), "alpha"),
    (dict(beta=float("nan")), "beta"),
    (dict(num_clients=0), "num_clients"),
    (dict(seed=-1), "seed"),
    (dict(num_classes=1), "num_classes"),
    (dict(num_features=0), "num_features"),
    (dict(max_size=10), "max_size"),
    (dict(min_size=-1), "min_size"),
    (dict(num_clients=2.5), "num_clients"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
  args = dict(alpha=1.0, beta=1.0, num_clients=3, seed=0)
  args.update(kwargs)
  with pytest.raises(ValueError, match=name):
    leaf_synthetic(**args)
