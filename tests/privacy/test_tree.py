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


# -- end to end: the engine, the tree stage and a FedAvgM server -------------------------


def _dp_ftrl_fedavgm_run(num_clients, m, rounds, clip, z, client_lr, local_steps, eta, gamma,
                         seed=5):
  """Runs DP-FTRL with FedAvgM through the Engine, the stage built as runner/privacy.py does.

  Returns the data (a, b), the cohorts, and per round the model and the tree's key and step.
  """
  from fedjax_sim.algorithms import fedavg
  from fedjax_sim.core import Engine, EngineConfig, FederatedData, LocalConfig
  from fedjax_sim.core.sampling import rounds_per_epoch, sample_shuffled
  from tests.algorithms.test_scaffold import quadratic_model

  rng = np.random.default_rng(seed)
  a = rng.uniform(0.5, 2.0, size=(num_clients, 3)).astype(np.float32)
  b = rng.normal(0.0, 2.0, size=(num_clients, 3)).astype(np.float32)
  data = FederatedData.from_offsets({"a": np.repeat(a, 2, 0), "b": np.repeat(b, 2, 0)},
                                    np.arange(num_clients + 1) * 2)
  per_epoch = rounds_per_epoch(num_clients, m)
  # privacy.mechanism = dp_ftrl, tree_restart = epoch: tree_sum(C, z, m, rounds per epoch).
  stage = tree_sum(clip, z, float(m), per_epoch)
  # algorithm.name = fedavgm, weighting = uniform: SGD with momentum on the server.
  local = LocalConfig(batch_size=2, epochs=local_steps)  # 2 identical examples: 1 step/epoch
  alg = fedavg(quadratic_model(), optax.sgd(client_lr), optax.sgd(eta, momentum=gamma), local,
               weighting="uniform")
  sampler = lambda r: sample_shuffled(seed, r, num_clients, m)
  engine = Engine(alg, data, stage, sampler, seed=seed, config=EngineConfig(block_size=2))
  state = engine.init(quadratic_model().init(jax.random.key(0)))
  models, keys, steps = [], [], []
  for result in engine.rounds(state, 0, rounds):
    models.append(np.asarray(result.server_state.params["w"], np.float64))
    keys.append(np.asarray(result.state.aggregator.key))
    steps.append(int(result.state.aggregator.step))
  cohorts = [sampler(r) for r in range(rounds)]
  return a.astype(np.float64), b.astype(np.float64), cohorts, models, keys, steps, per_epoch


def _clipped_sum(theta, cohort, a, b, clip, client_lr, local_steps):
  """x_t: the sum over the cohort of each client's local-GD delta clipped to norm C (numpy)."""
  total, clipped = np.zeros(3), 0
  for i in cohort:
    w = theta.copy()
    for _ in range(local_steps):
      w = w - client_lr * a[i] * (w - b[i])
    delta = w - theta
    norm = np.linalg.norm(delta)
    clipped += norm > clip
    total += delta * min(1.0, clip / norm)
  return total, clipped


def _prefix_noise(tree_key, s, std):
  """The noise of released prefix s: one node N(0, std^2) per set bit l of s, the node
  (level l, index s >> l) covering rounds ((s >> l) - 1) 2^l + 1 .. (s >> l) 2^l."""
  from fedjax_sim.privacy.tree import node_noise
  key = jax.random.wrap_key_data(jnp.asarray(tree_key))
  like = {"w": jnp.zeros(3, jnp.float32)}
  return sum(np.asarray(node_noise(key, level, s >> level, like, std)["w"], np.float64)
             for level in range(s.bit_length()) if s >> level & 1)


def test_engine_dp_ftrl_with_fedavgm_is_ftrl_with_momentum_within_the_first_tree():
  """The README's claim, end to end: DP-FTRL's tree stage + FedAvgM in the Engine gives

      theta_t = theta_0 + eta / m * sum_{s <= t} gamma^(t - s) S~_s,

  Kairouz et al. 2021's FTRL with momentum (their DPFTRLM: m_t = gamma m_{t-1} + S~_t,
  theta = theta_0 - eta m_t, with S~ the noisy prefix sums of -delta / m), S~_s the noisy
  prefix sum of the clipped deltas: sum_{u <= s} x_u plus the tree nodes covering [1, s].
  Local training, clipping, prefix sums and the FTRL-M model are computed here in numpy;
  only the Gaussian node draws are read from the stage (its tree key, via `node_noise`).
  """
  n, m, clip, z, client_lr, steps, eta, gamma = 24, 3, 0.6, 0.5, 0.1, 2, 0.7, 0.9
  a, b, cohorts, models, keys, tree_steps, per_epoch = _dp_ftrl_fedavgm_run(
      n, m, 8, clip, z, client_lr, steps, eta, gamma)
  assert per_epoch == 8 and tree_steps == list(range(1, 9))  # one tree, 8 releases
  assert all(np.array_equal(k, keys[0]) for k in keys)
  theta0, theta = np.zeros(3), np.zeros(3)
  prefix, released, clipped = np.zeros(3), [], 0
  for t in range(8):
    x, c = _clipped_sum(theta, cohorts[t], a, b, clip, client_lr, steps)
    clipped += c
    prefix = prefix + x
    released.append(prefix + _prefix_noise(keys[0], t + 1, z * clip))
    theta = theta0 + eta / m * sum(gamma ** (t - s) * released[s] for s in range(t + 1))
    np.testing.assert_allclose(models[t], theta, rtol=2e-4, atol=2e-5, err_msg=f"round {t}")
  assert 0 < clipped < 8 * m  # the run clips some updates and not others
  noiseless = eta / m * sum(gamma ** (7 - s) * (released[s] - _prefix_noise(keys[0], s + 1,
                                                                             z * clip))
                            for s in range(8))
  assert np.abs(noiseless - theta).max() > 1e-2  # the noise matters at this tolerance


def test_engine_dp_ftrl_with_fedavgm_carries_momentum_across_a_tree_restart():
  """After a restart (tree_restart = epoch) the engine is NOT Kairouz et al.'s restarted FTRL-M.

  Their DPFTRLM restart (restart_dp_tree) starts FTRL-M afresh from the current model
  theta_T with a zero momentum buffer:

      theta_{T+k} = theta_T + eta / m * sum_{j <= k} gamma^(k - j) S~'_j   (new tree S~').

  FedAvgM's heavy-ball velocity v_T is not reset, so the engine adds
  eta * v_T * gamma (1 - gamma^k) / (1 - gamma), with v_T = sum_{s <= T} gamma^(T - s) g_s
  and g_s = (S~_s - S~_{s-1}) / m the increments of the first tree.
  """
  n, m, clip, z, client_lr, steps, eta, gamma = 12, 3, 0.6, 0.5, 0.1, 2, 0.7, 0.9
  a, b, cohorts, models, keys, tree_steps, per_epoch = _dp_ftrl_fedavgm_run(
      n, m, 8, clip, z, client_lr, steps, eta, gamma)
  assert per_epoch == 4 and tree_steps == [1, 2, 3, 4, 1, 2, 3, 4]
  assert not np.array_equal(keys[3], keys[4])  # a fresh tree key
  theta, start, released, velocity = np.zeros(3), np.zeros(3), [], np.zeros(3)
  reference = []  # Kairouz et al.'s restarted FTRL-M
  for t in range(8):
    k = t % per_epoch
    if k == 0:
      if t:  # the restart: FTRL-M from the current model; the engine keeps v_T
        v_restart = velocity
      start, released, prefix = theta.copy(), [], np.zeros(3)
    x, _ = _clipped_sum(theta, cohorts[t], a, b, clip, client_lr, steps)
    prefix = prefix + x
    released.append(prefix + _prefix_noise(keys[t], k + 1, z * clip))
    increment = (released[k] - (released[k - 1] if k else 0.0)) / m
    velocity = gamma * velocity + increment
    ftrl_m = start + eta / m * sum(gamma ** (k - j) * released[j] for j in range(k + 1))
    reference.append(ftrl_m)
    carried = (0.0 if t < per_epoch else
               eta * v_restart * gamma * (1 - gamma ** (k + 1)) / (1 - gamma))
    theta = ftrl_m + carried
    np.testing.assert_allclose(models[t], theta, rtol=2e-4, atol=2e-5, err_msg=f"round {t}")
  # The carried velocity moves the second tree's models away from restarted FTRL-M.
  assert np.abs(models[-1] - reference[-1]).max() > 1e-2
