import numpy as np
from hypothesis import given, settings, strategies as st

from fedjax_sim.core.sampling import round_rng, sample_poisson, sample_uniform, rounds_per_epoch, sample_shuffled


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 5000), frac=st.floats(0.0, 1.0), seed=st.integers(0, 2**31), r=st.integers(0, 10**6))
def test_uniform_never_repeats_a_client(n, frac, seed, r):
  k = max(1, int(frac * n))
  ids = sample_uniform(round_rng(seed, r), n, k)
  assert len(ids) == k == len(np.unique(ids))
  assert ids.min() >= 0 and ids.max() < n


def test_uniform_is_uniform_over_clients():
  n, k, draws = 50, 10, 4000
  counts = np.zeros(n)
  for r in range(draws):
    counts[sample_uniform(round_rng(0, r), n, k)] += 1
  p = k / n
  sd = np.sqrt(draws * p * (1 - p))
  assert np.all(np.abs(counts - draws * p) < 5 * sd)


def test_poisson_cohort_size_has_binomial_mean_and_variance():
  n, q, draws = 200, 0.1, 4000
  sizes = np.array([len(sample_poisson(round_rng(3, r), n, q)) for r in range(draws)])
  mean, var = n * q, n * q * (1 - q)
  # 5 standard errors: the mean's SE is sqrt(var/draws), the variance's ~ var*sqrt(2/draws).
  assert abs(sizes.mean() - mean) < 5 * np.sqrt(var / draws)
  assert abs(sizes.var(ddof=1) - var) < 5 * var * np.sqrt(2 / draws)


def test_poisson_includes_each_client_independently_with_probability_q():
  n, q, draws = 30, 0.2, 5000
  inc = np.zeros((draws, n), bool)
  for r in range(draws):
    inc[r, sample_poisson(round_rng(5, r), n, q)] = True
  tol = 5 * np.sqrt(q * (1 - q) / draws)
  assert np.all(np.abs(inc.mean(0) - q) < tol)
  # Pairwise independence: P(i and j) = q^2.
  joint = (inc[:, 0] & inc[:, 1]).mean()
  assert abs(joint - q * q) < 5 * np.sqrt(q * q * (1 - q * q) / draws)
  # Never a repeated id within a round.
  assert all(len(np.unique(np.nonzero(row)[0])) == row.sum() for row in inc[:10])


def test_rounds_have_independent_reproducible_streams():
  a = sample_uniform(round_rng(7, 3), 1000, 10)
  np.testing.assert_array_equal(a, sample_uniform(round_rng(7, 3), 1000, 10))
  assert not np.array_equal(a, sample_uniform(round_rng(7, 4), 1000, 10))


def test_shuffled_epochs_partition_the_population():
  n, m = 103, 10  # 10 rounds per epoch; 3 clients sit out each epoch
  per_epoch = rounds_per_epoch(n, m)
  assert per_epoch == 10
  for epoch in range(3):
    cohorts = [sample_shuffled(7, epoch * per_epoch + i, n, m) for i in range(per_epoch)]
    seen = np.concatenate(cohorts)
    assert all(len(c) == m and np.all(np.diff(c) > 0) for c in cohorts)
    assert len(np.unique(seen)) == n - 3  # nobody twice within an epoch
  assert not np.array_equal(sample_shuffled(7, 0, n, m), sample_shuffled(7, 10, n, m))
  np.testing.assert_array_equal(sample_shuffled(7, 12, n, m), sample_shuffled(7, 12, n, m))
