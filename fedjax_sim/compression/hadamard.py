"""The randomized Hadamard rotation of Suresh et al. 2017, by a fast Walsh-Hadamard transform.

For d = 2^k, the normalised Hadamard matrix H / sqrt(d) is orthonormal and
symmetric, and H = H_2 (x) H_2 (x) ... (x) H_2 (k Kronecker factors): bit j
of the index is transformed by the factor at stride 2^j. `fwht` never forms
a d x d matrix; it makes a few passes over the vector, each reading and
writing every value once:

  * the lowest `LOW_BITS` bits (contiguous runs of 64 values) in one matmul
    by the dense 64 x 64 Sylvester matrix, contracting the last axis, which
    needs no transpose;
  * the highest `TOP_BITS` bits in one matmul `H_32 @ Y` with Y the vector
    as a (32, d / 32) matrix: the matrix on the left, the vector's own
    layout on the right and in the result, again no transpose. For a batch
    of vectors the 32 x 32 block is broadcast over the batch (32 x 32
    values per vector) and the matmul is batched;
  * the bits in between two at a time, by radix-4 butterflies over
    contiguous runs of 64 or more values (four input slices, four sums and
    differences stacked back in place): vectorized loops of additions.

Why this shape, measured on the 2-core CPU for d = 2^17: a matmul that
contracts a middle axis makes XLA write a transposed copy first (or, batched,
a broadcast Hadamard block as large as the data), and a copy costs as much
as a pass; radix-8 butterflies read each value 8 times per 3 bits (XLA
evaluates each stacked output from the inputs) against 4 times per 2 bits
for radix 4; a matmul's cost doubles with every bit it covers (64 measured
faster than 16, 32 or 128 for the low bits). Every pass streams the whole
batch, so the transform runs from the cache only when the batch fits in it:
16 clients of 2^17 values (8 MB) encode at twice the speed of 32.

Callers transform one vector and `vmap`; under `vmap` the batched matmul
needs the batch axis explicit, so `fwht` carries a `custom_vmap` rule that
hands the whole batch to the same code, and a `custom_jvp` (the transform
is linear) so that forward and reverse differentiation still work.

The random rotation is `R x = H D x / sqrt(d)` with D a diagonal of random
signs drawn from the client's key; R is orthonormal and `R^-1 y = D H y /
sqrt(d)`. A vector whose length is not a power of two is zero-padded. It is
not a uniformly random rotation: for a vector with one dominant coordinate
the signs of R x do not depend on D at all (see `quantize.drive`).
`rounds=k` chains k such blocks, `(H D_k / sqrt(d)) ... (H D_1 / sqrt(d))`,
the D_i from keys split from the client's key (Yu et al. 2016 use three),
at k transform passes each way.

References:
  Suresh, Yu, Kumar, McMahan. "Distributed Mean Estimation with Limited
  Communication", ICML 2017.
  Yu, Suresh, Choromanski, Holtmann-Rice, Kumar. "Orthogonal Random
  Features", NeurIPS 2016.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

LOW_BITS = 6  # bits done by one matmul with a dense 64 x 64 block
TOP_BITS = 5  # bits done by one matmul with a dense 32 x 32 block from the left


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


def _transform(x: jax.Array) -> jax.Array:
  """`H x` along the last axis, every leading axis a batch axis."""
  d = x.shape[-1]
  k = d.bit_length() - 1
  if d != 1 << k:
    raise ValueError(f"the Hadamard transform needs a power-of-two length; got {d}.")
  lead = x.shape[:-1]
  low = min(k, LOW_BITS)
  top = min(k - low, TOP_BITS)
  h = jnp.asarray(sylvester(1 << low), x.dtype)
  y = jnp.matmul(x.reshape(lead + (d >> low, 1 << low)), h, precision="highest")
  done = low
  while done < k - top:
    bits = min(2, k - top - done)
    y = _butterfly(y.reshape(lead + (d >> (done + bits), 1 << bits, 1 << done)), bits)
    done += bits
  if top:
    r = 1 << top
    h = jnp.broadcast_to(jnp.asarray(sylvester(r), x.dtype), lead + (r, r))
    y = jnp.matmul(h, y.reshape(lead + (r, d >> top)), precision="highest")
  return y.reshape(lead + (d,))


@jax.custom_batching.custom_vmap
def _batchable(x: jax.Array) -> jax.Array:
  return _transform(x)


@_batchable.def_vmap
def _batched(axis_size, in_batched, x):
  del axis_size, in_batched  # x arrives with the batch as its leading axis
  return _batchable(x), True


@jax.custom_jvp
def fwht(x: jax.Array) -> jax.Array:
  """Unnormalised Walsh-Hadamard transform `H x` along the last axis (length 2^k)."""
  return _batchable(x)


@fwht.defjvp
def _fwht_jvp(primals, tangents):
  # Linear: the tangent is transformed too, by the plain ops, which JAX can
  # also transpose for reverse mode (H is symmetric).
  return fwht(primals[0]), _transform(tangents[0])


def random_signs(key, d: int, dtype=jnp.float32) -> jax.Array:
  """d independent fair signs, 32 from each random 32-bit word."""
  words = jax.random.bits(key, (-(-d // 32),), jnp.uint32)
  bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)[None, :]) & 1
  return (1 - 2 * bits.reshape(-1)[:d].astype(jnp.int32)).astype(dtype)


def _scaled_signs(key, p: int, dtype) -> jax.Array:
  """D / sqrt(p): the signs with the transform's normalisation folded in (one pass fewer)."""
  return random_signs(key, p, dtype) * jnp.asarray(1 / np.sqrt(p), dtype)


def _round_keys(key, rounds: int):
  """One key per HD block: the key itself for one block (the historical bitstream), else a split."""
  if rounds < 1:
    raise ValueError(f"rounds must be >= 1; got {rounds}.")
  return [key] if rounds == 1 else list(jax.random.split(key, rounds))


def rotate(x: jax.Array, *, key, rounds: int = 1) -> jax.Array:
  """`R x` for a 1-D x of any length: pad to a power of two, then `rounds` HD blocks.

  Each block flips signs (and scales by 1 / sqrt(p)) and transforms, so
  `R = (H D_k / sqrt(p)) ... (H D_1 / sqrt(p))`, the k sign diagonals drawn
  from independent keys split from `key` (for k = 1, `key` itself). Computed
  in x's dtype: pass float32 (as every compressor here does) for a rotation
  that `unrotate` inverts to float32 rounding.
  """
  d = x.shape[-1]
  p = next_power_of_two(d)
  y = jnp.pad(x, (0, p - d)) if p != d else x
  for k in _round_keys(key, rounds):
    y = fwht(y * _scaled_signs(k, p, x.dtype))
  return y


def unrotate(y: jax.Array, d: int, *, key, rounds: int = 1) -> jax.Array:
  """`R^-1 y` (the blocks inverted in reverse order), cut back to the original length d."""
  p = y.shape[-1]
  for k in reversed(_round_keys(key, rounds)):
    y = fwht(y) * _scaled_signs(k, p, y.dtype)
  return y[:d]
