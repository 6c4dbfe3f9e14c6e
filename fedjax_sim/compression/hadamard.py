"""The randomized Hadamard rotation of Suresh et al. 2017, by a fast Walsh-Hadamard transform.

For d = 2^k, the normalised Hadamard matrix H / sqrt(d) is orthonormal and
symmetric, and H = H_2 (x) H_2 (x) ... (x) H_2 (k Kronecker factors): bit j
of the index is transformed by the factor at stride 2^j. `fwht` never forms
a d x d matrix; it makes a few passes over the vector, each reading and
writing every value once:

  * the lowest `LOW_BITS` bits (contiguous runs of 64 values) in one matmul
    by the dense 64 x 64 Sylvester matrix, contracting the last axis, which
    needs no transpose;
  * the other bits two at a time, by radix-4 butterflies over contiguous
    runs of 64 or more values (four input slices, four sums and differences
    stacked back in place): vectorized loops of additions.

Why this shape, measured on the 2-core CPU for d = 2^17: a matmul on any
axis but the last makes XLA write a transposed copy first, and a copy costs
as much as a pass; radix-8 butterflies read each value 8 times per 3 bits
(XLA evaluates each stacked output from the inputs) against 4 times per 2
bits for radix 4; a matmul's cost doubles with every bit it covers (64
measured faster than 16, 32 or 128). Every pass streams the whole batch, so
the transform runs from the cache only when the batch fits in it: 16
clients of 2^17 values (8 MB) encode at twice the speed of 32.

The random rotation is `R x = H D x / sqrt(d)` with D a diagonal of random
signs drawn from the client's key; R is orthonormal and `R^-1 y = D H y /
sqrt(d)`. A vector whose length is not a power of two is zero-padded.

References:
  Suresh, Yu, Kumar, McMahan. "Distributed Mean Estimation with Limited
  Communication", ICML 2017.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

LOW_BITS = 6  # bits done by one matmul with a dense 64 x 64 block


def next_power_of_two(d: int) -> int:
  return 1 << max(0, int(d - 1).bit_length())


@functools.lru_cache(maxsize=None)
def sylvester(n: int) -> np.ndarray:
  """The n x n Sylvester-Hadamard matrix (entries +-1), n a power of two."""
  h = np.ones((1, 1), np.float32)
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return h


def _butterfly(y: jax.Array, bits: int) -> jax.Array:
  """H_{2^bits} along axis -2 of y (..., 2^bits, s), by sums and differences."""
  parts = [y[..., i, :] for i in range(1 << bits)]
  for level in range(bits):
    h = 1 << level
    for i in range(1 << bits):
      if not i & h:
        parts[i], parts[i + h] = parts[i] + parts[i + h], parts[i] - parts[i + h]
  return jnp.stack(parts, axis=-2)


def fwht(x: jax.Array) -> jax.Array:
  """Unnormalised Walsh-Hadamard transform `H x` along the last axis (length 2^k)."""
  d = x.shape[-1]
  k = d.bit_length() - 1
  if d != 1 << k:
    raise ValueError(f"the Hadamard transform needs a power-of-two length; got {d}.")
  lead = x.shape[:-1]
  low = min(k, LOW_BITS)
  h = jnp.asarray(sylvester(1 << low), x.dtype)
  y = jnp.matmul(x.reshape(lead + (d >> low, 1 << low)), h, precision="highest")
  done = low
  while done < k:
    bits = min(2, k - done)
    y = _butterfly(y.reshape(lead + (d >> (done + bits), 1 << bits, 1 << done)), bits)
    done += bits
  return y.reshape(lead + (d,))


def random_signs(key, d: int, dtype=jnp.float32) -> jax.Array:
  """d independent fair signs, 32 from each random 32-bit word."""
  words = jax.random.bits(key, (-(-d // 32),), jnp.uint32)
  bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)[None, :]) & 1
  return (1 - 2 * bits.reshape(-1)[:d].astype(jnp.int32)).astype(dtype)


def _scaled_signs(key, p: int, dtype) -> jax.Array:
  """D / sqrt(p): the signs with the transform's normalisation folded in (one pass fewer)."""
  return random_signs(key, p, dtype) * jnp.asarray(1 / np.sqrt(p), dtype)


def rotate(x: jax.Array, key) -> jax.Array:
  """`R x` for a 1-D x of any length: pad to a power of two, flip signs and scale, transform."""
  d = x.shape[-1]
  p = next_power_of_two(d)
  padded = jnp.pad(x, (0, p - d)) if p != d else x
  return fwht(padded * _scaled_signs(key, p, x.dtype))


def unrotate(y: jax.Array, key, d: int) -> jax.Array:
  """`R^-1 y`, cut back to the original length d."""
  p = y.shape[-1]
  return (fwht(y) * _scaled_signs(key, p, y.dtype))[:d]
