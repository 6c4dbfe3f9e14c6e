import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_sim.algorithms import fedavg
from fedjax_sim.core import Engine, EngineConfig, LocalConfig
from fedjax_sim.core.algorithm import ClientData
from fedjax_sim.models import logistic_regression
from fedjax_sim.privacy import PrivacyError, gaussian_sum
from tests.conftest import packed_dataset


def test_every_contribution_is_bounded_by_the_clip_norm():
  stage = gaussian_sum(clip_norm=0.5, noise_multiplier=0.0, expected_participants=1.0)
  rng = np.random.default_rng(0)
  updates = {"a": jnp.asarray(rng.normal(size=(64, 7)) * rng.uniform(0.01, 5, (64, 1))),
             "b": jnp.asarray(rng.normal(size=(64, 3)))}
  msgs, _, _ = jax.vmap(stage.encode, (None, 0, 0, None, 0))(
      stage.init(updates), updates, jnp.ones(64), None, jax.random.split(jax.random.key(0), 64))
  norms = np.sqrt(sum(np.sum(np.asarray(x) ** 2, axis=1) for x in jax.tree.leaves(msgs.clipped_sum)))
  original = np.sqrt(sum(np.sum(np.asarray(x) ** 2, axis=1) for x in jax.tree.leaves(updates)))
  assert np.all(norms <= 0.5 * (1 + 1e-6))
  small = original <= 0.5  # updates inside the ball pass unchanged
  np.testing.assert_allclose(norms[small], original[small], rtol=1e-6)
  assert float(msgs.clipped.sum()) == (~small).sum()
  zero, _, _ = stage.encode(jnp.float32(0.5), updates, 0.0, None, jax.random.key(1))  # padded slot
  assert all(float(jnp.abs(x).sum()) == 0 for x in jax.tree.leaves(zero.clipped_sum))


def test_noise_has_std_z_times_c_over_the_denominator():
  z, c, d = 1.5, 0.2, 4.0
  stage = gaussian_sum(c, z, d)
  shape = {"w": jnp.zeros((20_000,))}
  agg, _, _ = stage.finalize(stage.init(shape), stage.zeros(shape), 0, jax.random.key(3))
  sample = np.asarray(agg["w"])
  expected = z * c / d
  # 20,000 draws: the sample std has relative sd 1/sqrt(2 n) = 0.5 %; allow 5 sd.
  assert abs(sample.std() / expected - 1) < 5 / np.sqrt(2 * sample.size)
  assert abs(sample.mean()) < 5 * expected / np.sqrt(sample.size)
  other, _, _ = stage.finalize(stage.init(shape), stage.zeros(shape), 0, jax.random.key(4))
  assert not np.allclose(other["w"], sample)  # fresh noise for a fresh key


def test_composition_in_the_engine_equals_clipping_by_hand():
  """z = 0: the engine's aggregate is the sum of clipped client deltas over D."""
  data = packed_dataset(np.full(12, 5), num_features=4, num_classes=3)
  model = logistic_regression((4,), 3)
  local = LocalConfig(batch_size=5, epochs=3, shuffle=False)
  alg = fedavg(model, optax.sgd(0.5), optax.sgd(1.0), local)
  c, d = 0.05, 10.0
  engine = Engine(alg, data, gaussian_sum(c, 0.0, d), lambda r: np.arange(12), seed=0,
                  config=EngineConfig(block_size=4))
  p0 = model.init(jax.random.key(0))
  res = next(engine.rounds(engine.init(p0), 0, 1))
  total = jax.tree.map(jnp.zeros_like, p0)
  for cid in range(12):
    ex, mask = data.gather([cid], 5)
    delta = alg.client_update(p0, ClientData(jax.tree.map(lambda a: a[0], ex), mask[0]), None,
                              jax.random.key(0)).update
    norm = float(np.sqrt(sum(np.sum(np.asarray(x) ** 2) for x in jax.tree.leaves(delta))))
    total = jax.tree.map(lambda t, x: t + x * min(1.0, c / norm), total, delta)
  jax.tree.map(lambda new, old, t: np.testing.assert_allclose(new - old, t / d, rtol=1e-4,
                                                               atol=1e-7),
               res.server_state.params, p0, total)
  assert res.metrics["dp_participants"] == 12 and 0 <= res.metrics["dp_clipped_fraction"] <= 1


@pytest.mark.parametrize("args,needle", [((0.0, 1.0, 1.0), "clip_norm"), ((1.0, -1.0, 1.0),
                                         "noise_multiplier"), ((1.0, 1.0, 0.0), "expected")])
def test_bad_settings_are_rejected(args, needle):
  with pytest.raises(PrivacyError, match=needle):
    gaussian_sum(*args)


def _adapt(stage, norms, rounds, seed=0):
  """Runs the clip-norm update `rounds` times on clients with the given update norms."""
  updates = {"w": jnp.asarray(norms[:, None] * np.eye(1, 3)[0][None, :], jnp.float32)}
  weights = jnp.ones(len(norms))

  @jax.jit
  def one_round(clip, key):
    msgs, _, _ = jax.vmap(stage.encode, (None, 0, 0, None, 0))(
        clip, updates, weights, None, jax.random.split(key, len(norms)))
    combined = jax.tree.map(lambda x: x.sum(0), msgs)
    return stage.finalize(clip, combined, len(norms), key)[1]

  clip = stage.init(updates)
  for t in range(rounds):
    clip = one_round(clip, jax.random.fold_in(jax.random.key(seed), t))
  return float(clip)


@pytest.mark.parametrize("quantile", [0.5, 0.9])
def test_adaptive_clipping_moves_c_to_the_target_quantile(quantile):
  norms = np.random.default_rng(0).lognormal(0.0, 1.0, 400)
  target = np.quantile(norms, quantile)
  for start in (target * 20, target / 20):
    stage = gaussian_sum(start, 0.0, 400.0, target_quantile=quantile, clip_learning_rate=0.2,
                         count_stddev=0.0)
    clip = _adapt(stage, norms, 400)  # |log C| moves at most eta * max(q, 1 - q) a round
    # Within the norms' neighbourhood of the target: its quantile is within 2.5 points.
    assert abs(np.mean(norms <= clip) - quantile) < 0.025, (start, clip, target)


def test_adaptive_clipping_with_noise_still_tracks_the_quantile():
  norms = np.random.default_rng(1).lognormal(0.0, 0.5, 400)
  stage = gaussian_sum(50.0, 1.0, 400.0, target_quantile=0.5)  # sigma_b = 400 / 20 = 20
  clip = _adapt(stage, norms, 200, seed=3)
  assert abs(np.mean(norms <= clip) - 0.5) < 0.1


def test_adaptive_clipping_rejects_a_count_noise_that_spends_the_budget():
  with pytest.raises(PrivacyError, match="must exceed"):
    gaussian_sum(1.0, 1.0, 100.0, target_quantile=0.5, count_stddev=0.3)
  with pytest.raises(PrivacyError, match="target_quantile"):
    gaussian_sum(1.0, 1.0, 100.0, target_quantile=1.5)


def test_a_round_without_participants_still_releases_noise():
  """Nobody sampled: a DP stage adds noise (the model moves); a plain mean leaves it."""
  from fedjax_sim.aggregators import weighted_mean
  from fedjax_sim.privacy import tree_sum
  data = packed_dataset(np.full(6, 5), num_features=4, num_classes=3)
  model = logistic_regression((4,), 3)
  alg = fedavg(model, optax.sgd(0.5), optax.sgd(1.0), LocalConfig(batch_size=5),
               weighting="uniform")
  p0 = model.init(jax.random.key(0))
  empty = lambda r: np.zeros(0, np.int64)
  moved = {}
  for name, stage in [("dp", gaussian_sum(0.1, 1.0, 3.0)), ("tree", tree_sum(0.1, 1.0, 3.0)),
                      ("plain", weighted_mean())]:
    engine = Engine(alg, data, stage, empty, seed=0)
    results = list(engine.rounds(engine.init(p0), 0, 2))
    moved[name] = any(not np.allclose(a, b) for a, b in zip(
        jax.tree.leaves(results[-1].server_state.params), jax.tree.leaves(p0)))
    assert results[-1].metrics["round_failed"] == 1.0
    if name == "tree":
      assert results[-1].metrics["dp_tree_step"] == 2.0  # the tree advanced in empty rounds
  assert moved == {"dp": True, "tree": True, "plain": False}
