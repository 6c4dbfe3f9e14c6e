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


@pytest.mark.parametrize("d", [1, 2, 8, 64, 128, 1024, 8192, 1 << 17])  # 2^7..2^10: low + top matmuls only; 2^13: one radix-4 pass; 2^17: three
def test_fwht_equals_the_dense_hadamard_matrix(d):
  x = np.random.default_rng(d).normal(size=(3, d))
  got = np.asarray(fwht(jnp.asarray(x, jnp.float32)))
  if d <= 8192:
    want = x @ _dense_hadamard(d).T
  else:  # H_ab = H_a (x) H_b: with X = x as an (a, b) matrix, H x = H_a X H_b^T, flattened
    a = b = 1 << ((d.bit_length() - 1) // 2)
    a = d // b
    want = (_dense_hadamard(a) @ x.reshape(3, a, b) @ _dense_hadamard(b).T).reshape(3, d)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-3 * np.sqrt(d / 1024))


@pytest.mark.parametrize("d", [1, 5, 100, 1000, 4096])
def test_rotation_is_orthonormal_and_exactly_invertible(d):
  x = jnp.asarray(np.random.default_rng(0).normal(size=d), jnp.float32)
  key = jax.random.key(7)
  y = rotate(x, key=key)
  assert y.shape == (next_power_of_two(d),)
  np.testing.assert_allclose(np.linalg.norm(y), np.linalg.norm(x), rtol=1e-5)
  np.testing.assert_allclose(unrotate(y, d, key=key), x, rtol=1e-5, atol=1e-5)
  # Orthonormal as a matrix: the rotation of every basis vector, stacked.
  if d <= 128:
    p = next_power_of_two(d)
    basis = jnp.eye(p, dtype=jnp.float32)
    r = np.asarray(jax.vmap(lambda e: rotate(e, key=key))(basis))
    np.testing.assert_allclose(r @ r.T, np.eye(p), atol=1e-5)


def test_different_keys_rotate_differently():
  x = jnp.ones(64)
  assert not np.allclose(rotate(x, key=jax.random.key(1)), rotate(x, key=jax.random.key(2)))


def test_batched_and_vmapped_transforms_agree_and_derivatives_are_the_transform():
  # fwht batches through its custom_vmap rule; every route must give H x.
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 1 << 12)), jnp.float32)
  want = np.asarray(x) @ _dense_hadamard(1 << 12).T
  np.testing.assert_allclose(fwht(x), want, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(jax.vmap(jax.vmap(fwht))(x), want, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(jax.jit(jax.vmap(fwht))(x[0]), want[0], rtol=1e-4, atol=1e-3)
  # H is symmetric, so the gradient of <c, H x> is H c.
  c = jnp.asarray(np.random.default_rng(2).normal(size=1 << 12), jnp.float32)
  g = jax.grad(lambda v: jnp.vdot(c, fwht(v)))(x[0, 0])
  np.testing.assert_allclose(g, np.asarray(c) @ _dense_hadamard(1 << 12), rtol=1e-4, atol=1e-3)
  # Forward mode: the tangent is transformed like the point.
  _, t = jax.jvp(fwht, (x[0, 0],), (c,))
  np.testing.assert_allclose(t, np.asarray(c) @ _dense_hadamard(1 << 12).T, rtol=1e-4, atol=1e-3)
  gb = jax.vmap(jax.grad(lambda v, w: jnp.vdot(w, fwht(v))))(x[0], jnp.stack([c, -c, 2 * c]))
  np.testing.assert_allclose(gb[1], -np.asarray(g), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("d", [5, 100, 1024])
def test_repeated_blocks_compose_single_blocks_and_invert(d):
  """rotate(x, key=key, rounds=k) = R_k ... R_1 x with R_i the one-block rotation under key i of split(key, k)."""
  x = jnp.asarray(np.random.default_rng(d).normal(size=d), jnp.float32)
  key = jax.random.key(11)
  p = next_power_of_two(d)
  y = jnp.pad(x, (0, p - d))
  for k in jax.random.split(key, 3):
    y = rotate(y, key=k)
  np.testing.assert_allclose(rotate(x, key=key, rounds=3), y, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(y), np.linalg.norm(x), rtol=1e-5)
  np.testing.assert_allclose(unrotate(rotate(x, key=key, rounds=3), d, key=key, rounds=3), x, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(rotate(x, key=key, rounds=1), rotate(x, key=key))  # one block: the default
  with pytest.raises(ValueError, match="rounds"):
    rotate(x, key=key, rounds=0)
