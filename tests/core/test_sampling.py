import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fedjax_sim.core.sampling import (make_sampler, round_rng, rounds_per_epoch,
                                      sample_data_proportional, sample_poisson, sample_shuffled,
                                      sample_uniform)


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


# -- data-proportional sampling (q-FFL's) ------------------------------------------------

SIZES = np.array([1, 2, 3, 4, 10, 0, 20])


def test_data_proportional_single_draw_has_probability_n_k_over_n():
  draws = 20000
  counts = np.bincount([sample_data_proportional(round_rng(1, r), SIZES, 1)[0]
                        for r in range(draws)], minlength=len(SIZES))
  p = SIZES / SIZES.sum()
  sd = np.sqrt(draws * p * (1 - p))
  assert counts[5] == 0  # no data, never drawn
  assert np.all(np.abs(counts - draws * p) <= 5 * sd + 1e-9)


def test_data_proportional_cohorts_follow_successive_sampling():
  """Pairs: P({i, j}) = p_i p_j / (1 - p_i) + p_j p_i / (1 - p_j) (draw i then j, or j then i)."""
  draws = 20000
  p = SIZES / SIZES.sum()
  counts = {}
  for r in range(draws):
    ids = sample_data_proportional(round_rng(2, r), SIZES, 2)
    assert len(ids) == 2 and ids[0] < ids[1] and SIZES[ids].min() > 0
    counts[tuple(ids)] = counts.get(tuple(ids), 0) + 1
  for i, j in itertools.combinations(range(len(SIZES)), 2):
    prob = p[i] * p[j] / (1 - p[i]) + p[j] * p[i] / (1 - p[j]) if p[i] * p[j] > 0 else 0.0
    got = counts.get((i, j), 0)
    assert abs(got - draws * prob) <= 5 * np.sqrt(draws * prob * (1 - prob)) + 1e-9, (i, j)


def test_make_sampler_draws_each_scheme_from_seed_and_round():
  n, m = 40, 5
  sizes = np.arange(n) % 7 + 1
  for scheme in ("uniform", "poisson", "shuffle", "data_proportional"):
    sampler = make_sampler(scheme, 3, n, m, 0.2, sizes)
    again = make_sampler(scheme, 3, n, m, 0.2, sizes)
    np.testing.assert_array_equal(sampler(17), again(17))  # a resumed run draws the same
    ids = sampler(17)
    assert np.all(np.diff(ids) > 0) and ids.min() >= 0 and ids.max() < n
  np.testing.assert_array_equal(make_sampler("uniform", 3, n, m, 0.2)(4),
                                sample_uniform(round_rng(3, 4), n, m))
  np.testing.assert_array_equal(make_sampler("poisson", 3, n, m, 0.2)(4),
                                sample_poisson(round_rng(3, 4), n, 0.2))
  np.testing.assert_array_equal(make_sampler("shuffle", 3, n, m, 0.2)(4),
                                sample_shuffled(3, 4, n, m))
  np.testing.assert_array_equal(make_sampler("data_proportional", 3, n, m, 0.2, sizes)(4),
                                sample_data_proportional(round_rng(3, 4), sizes, m))


@pytest.mark.parametrize("args,needle", [
    (("stratified", 0, 10, 2, 0.1, None), "scheme must be one of"),
    (("data_proportional", 0, 10, 2, 0.1, None), "needs the clients' example counts"),
    (("data_proportional", 0, 3, 3, 0.1, [1, 0, 5]), "2 of 3 clients have examples"),
    (("data_proportional", 0, 3, 2, 0.1, [1, 5]), "one count per client"),
    (("uniform", 0, 3, 4, 0.1, None), "clients_per_round must be in [1, 3]"),
    (("poisson", 0, 3, 4, 0.0, None), "rate must be in (0, 1]"),
])
def test_make_sampler_refuses_what_it_cannot_draw(args, needle):
  with pytest.raises(ValueError) as e:
    make_sampler(*args)
  assert needle in str(e.value)
