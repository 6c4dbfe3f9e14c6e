"""DP-FTRL's tree stage: released prefix sums = true prefix sums + popcount(t) node noises."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_sim.privacy import PrivacyError, tree_sum
from fedjax_sim.privacy.gaussian_sum import ClippedSum

D = 4.0  # the fixed denominator


def _releases(stage, xs, seed):
  """Runs finalize over rounds; returns the prefix sums the server can rebuild, and metrics."""
  finalize = jax.jit(stage.finalize)
  state = stage.init(xs[0])
  prefix, out, steps = np.zeros_like(xs[0]), [], []
  for t, x in enumerate(xs):
    one = jnp.float32(1.0)
    agg, state, metrics = finalize(state, ClippedSum(jnp.asarray(x), one, one * 0, one * 0), one,
                                   jax.random.fold_in(jax.random.key(seed), t))
    prefix = prefix + np.asarray(agg) * D
    out.append(prefix.copy())
    steps.append(int(metrics["dp_tree_step"]))
  return np.stack(out), steps


def test_without_noise_the_prefix_sums_are_exact():
  rng = np.random.default_rng(0)
  xs = rng.normal(size=(11, 6)).astype(np.float32)
  prefix, steps = _releases(tree_sum(1.0, 0.0, D), xs, seed=0)
  np.testing.assert_allclose(prefix, np.cumsum(xs, axis=0), rtol=1e-5, atol=1e-5)
  assert steps == list(range(1, 12))


def test_noise_variance_counts_the_trees_nodes():
  """Var of prefix t's noise = popcount(t) (zC)^2; prefixes covariance = shared nodes."""
  z, c, dim, trees = 0.7, 2.0, 4000, 5
  std2 = (z * c) ** 2
  stage = tree_sum(c, z, D)
  zeros = [np.zeros(dim, np.float32)] * 8
  noise = np.concatenate([_releases(stage, zeros, seed=s)[0] for s in range(trees)], axis=1)
  n = noise.shape[1]  # 20,000 draws per round: sample variance within 5 sd = 5 sqrt(2/n)
  for t in range(1, 9):
    var = noise[t - 1].var()
    assert abs(var / (bin(t).count("1") * std2) - 1) < 5 * np.sqrt(2 / n), t
  cov = lambda a, b: np.mean(noise[a - 1] * noise[b - 1])
  assert abs(cov(2, 3) / std2 - 1) < 0.08  # both hold node [1, 2]
  assert abs(cov(6, 7) / std2 - 2) < 0.12  # both hold [1, 4] and [5, 6]
  assert abs(cov(1, 2) / std2) < 0.05  # [1] vs [1, 2]: no shared node


def test_restart_opens_a_fresh_tree():
  z, c, dim = 1.0, 1.0, 20_000
  stage = tree_sum(c, z, D, restart_every=3)
  prefix, steps = _releases(stage, [np.zeros(dim, np.float32)] * 5, seed=1)
  assert steps == [1, 2, 3, 1, 2]
  second_tree = prefix[3:] - prefix[2]  # what the server accumulated since the restart
  assert abs(second_tree[0].var() - 1) < 0.05  # one node: [1] of the new tree
  assert abs(second_tree[1].var() - 1) < 0.05  # [1, 2]
  assert abs(np.mean(second_tree[0] * prefix[2])) < 0.05  # independent of the old tree


def test_sgd_with_momentum_on_increments_is_ftrl_with_momentum():
  """theta_t = theta_0 - eta * sum_s gamma^(t-s) S_s, with S the released prefix sums."""
  eta, gamma = 0.3, 0.9
  rng = np.random.default_rng(2)
  prefix = np.cumsum(rng.normal(size=(7, 3)), axis=0)
  increments = np.diff(prefix, axis=0, prepend=0.0)
  opt = optax.sgd(eta, momentum=gamma)
  theta, state = jnp.zeros(3), opt.init(jnp.zeros(3))
  for t, g in enumerate(increments):
    updates, state = opt.update(jnp.asarray(g), state)
    theta = optax.apply_updates(theta, updates)
    ftrl = -eta * sum(gamma ** (t - s) * prefix[s] for s in range(t + 1))
    np.testing.assert_allclose(theta, ftrl, rtol=1e-5, atol=1e-6)


def test_bad_settings_are_rejected():
  with pytest.raises(PrivacyError, match="restart_every"):
    tree_sum(1.0, 1.0, 10.0, restart_every=0)
  with pytest.raises(PrivacyError, match="clip_norm"):
    tree_sum(0.0, 1.0, 10.0)
