import functools

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.aggregators import weighted_mean

PARAMS_LIKE = {"w": jnp.zeros((2, 3)), "b": jnp.zeros((3,))}
UPDATES = [
    {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1.0, 0.0, -1.0], np.float32)},
    {"w": np.full((2, 3), -2.0, np.float32), "b": np.array([4.0, 4.0, 4.0], np.float32)},
    {"w": np.eye(2, 3, dtype=np.float32), "b": np.array([0.5, -0.5, 2.0], np.float32)},
]


def _aggregate(agg, updates, weights):
  stage = agg.init(PARAMS_LIKE)
  messages, bits = [], []
  for i, (u, w) in enumerate(zip(updates, weights)):
    m, client_state, b = agg.encode(stage, jax.tree.map(jnp.asarray, u), w, None,
                                    jax.random.key(i))
    assert client_state is None
    messages.append(m)
    bits.append(float(b))
  combined = functools.reduce(agg.combine, messages, agg.zeros(PARAMS_LIKE))
  mean, new_stage, metrics = agg.finalize(stage, combined, len(updates), jax.random.key(9))
  return mean, new_stage, metrics, bits


def test_weighted_mean_of_hand_values():
  weights = [1.0, 3.0, 0.5]
  mean, stage, metrics, _ = _aggregate(weighted_mean(), UPDATES, weights)
  for k in ("w", "b"):
    expected = sum(w * u[k].astype(np.float64) for w, u in zip(weights, UPDATES)) / 4.5
    np.testing.assert_allclose(mean[k], expected, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(metrics["total_weight"], 4.5)
  assert stage == ()
  # By hand for one entry: b[0] = (1*1 + 3*4 + 0.5*0.5) / 4.5.
  np.testing.assert_allclose(mean["b"][0], 13.25 / 4.5, rtol=1e-6)


def test_combine_order_does_not_matter_and_zeros_is_the_identity():
  agg = weighted_mean()
  weights = [2.0, 1.0, 1.0]
  a, _, _, _ = _aggregate(agg, UPDATES, weights)
  b, _, _, _ = _aggregate(agg, UPDATES[::-1], weights[::-1])
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), a, b)
  m, _, _ = agg.encode((), UPDATES[0], 2.0, None, jax.random.key(0))
  both = agg.combine(agg.zeros(PARAMS_LIKE), m)
  jax.tree.map(np.testing.assert_array_equal, both, m)


def test_zero_total_weight_gives_zeros_not_nan():
  mean, _, metrics, _ = _aggregate(weighted_mean(), UPDATES, [0.0, 0.0, 0.0])
  for k in ("w", "b"):
    np.testing.assert_array_equal(mean[k], np.zeros_like(UPDATES[0][k]))
  assert float(metrics["total_weight"]) == 0.0
  # Nobody at all: the identity message alone.
  agg = weighted_mean()
  mean, _, _ = agg.finalize((), agg.zeros(PARAMS_LIKE), 0, jax.random.key(0))
  assert all(not np.any(leaf) for leaf in jax.tree.leaves(mean))


def test_zero_weight_client_contributes_nothing():
  with_zero, _, _, _ = _aggregate(weighted_mean(), UPDATES, [1.0, 0.0, 2.0])
  without, _, _, _ = _aggregate(weighted_mean(), [UPDATES[0], UPDATES[2]], [1.0, 2.0])
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), with_zero, without)


def test_bits_count_the_parameters_at_their_width_and_nothing_for_an_empty_client():
  num_params = 2 * 3 + 3
  _, _, _, bits = _aggregate(weighted_mean(), UPDATES, [1.0, 0.0, 1.0])
  assert bits == [32.0 * num_params, 0.0, 32.0 * num_params]  # weight 0: nothing uploaded
  # bf16 updates upload 16 bits per entry.
  _, _, b = weighted_mean().encode((), {"w": jnp.zeros((5,), jnp.bfloat16)}, 1.0, None,
                                   jax.random.key(0))
  assert float(b) == 16 * 5


def test_encode_is_vmappable_over_clients():
  agg = weighted_mean()
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *UPDATES)
  weights = jnp.array([1.0, 3.0, 0.5])
  msgs, _, bits = jax.vmap(agg.encode, (None, 0, 0, None, 0))(
      (), stacked, weights, None, jax.random.split(jax.random.key(0), 3))
  summed = jax.tree.map(lambda x: x.sum(0), msgs)
  mean, _, _ = agg.finalize((), summed, 3, jax.random.key(1))
  ref, _, _, _ = _aggregate(agg, UPDATES, [1.0, 3.0, 0.5])
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), mean, ref)
  np.testing.assert_array_equal(bits, [32.0 * 9] * 3)
