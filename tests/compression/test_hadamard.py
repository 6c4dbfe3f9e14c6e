import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim.compression import fwht, next_power_of_two, rotate, unrotate


def _dense_hadamard(n):
  """Sylvester's construction by repeated Kronecker products with [[1, 1], [1, -1]]."""
  h = np.array([[1.0]])
  while h.shape[0] < n:
    h = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), h)
  return h


@pytest.mark.parametrize("d", [1, 2, 8, 64, 128, 1024, 8192])  # 2^13: a 64-block matmul, three radix-4 passes and one radix-2
def test_fwht_equals_the_dense_hadamard_matrix(d):
  x = np.random.default_rng(d).normal(size=(3, d))
  got = np.asarray(fwht(jnp.asarray(x, jnp.float32)))
  np.testing.assert_allclose(got, x @ _dense_hadamard(d).T, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("d", [1, 5, 100, 1000, 4096])
def test_rotation_is_orthonormal_and_exactly_invertible(d):
  x = jnp.asarray(np.random.default_rng(0).normal(size=d), jnp.float32)
  key = jax.random.key(7)
  y = rotate(x, key)
  assert y.shape == (next_power_of_two(d),)
  np.testing.assert_allclose(np.linalg.norm(y), np.linalg.norm(x), rtol=1e-5)
  np.testing.assert_allclose(unrotate(y, key, d), x, rtol=1e-5, atol=1e-5)
  # Orthonormal as a matrix: the rotation of every basis vector, stacked.
  if d <= 128:
    p = next_power_of_two(d)
    basis = jnp.eye(p, dtype=jnp.float32)
    r = np.asarray(jax.vmap(lambda e: rotate(e, key))(basis))
    np.testing.assert_allclose(r @ r.T, np.eye(p), atol=1e-5)


def test_different_keys_rotate_differently():
  x = jnp.ones(64)
  assert not np.allclose(rotate(x, jax.random.key(1)), rotate(x, jax.random.key(2)))
