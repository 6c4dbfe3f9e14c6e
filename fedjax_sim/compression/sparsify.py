"""Sparsifiers and sign compression.

top-k keeps the k largest magnitudes (biased; meant for error feedback);
random-k keeps k coordinates chosen from the client's key, scaled by d/k to
be unbiased (NMSE exactly d/k - 1) or unscaled for error feedback; the
scaled sign sends sign(x) and ||x||_1 / d (EF-signSGD's compressor,
Karimireddy et al. 2019).

Bit counts: top-k sends k float32 values and k indices of ceil(log2 d) bits;
random-k sends k values and the 32-bit seed its indices derive from; the
scaled sign sends d bits and one float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.compression.compressor import CompressionError, Compressor
from fedjax_sim.compression.quantize import SCALE_BITS, SEED_BITS


def _k(d: int, k: int | None, fraction: float | None) -> int:
  if (k is None) == (fraction is None):
    raise CompressionError("give exactly one of k and fraction.")
  if fraction is not None:
    if not 0 < fraction <= 1:
      raise CompressionError(f"fraction must be in (0, 1]; got {fraction}.")
    return max(1, int(round(fraction * d)))
  if k < 1:
    raise CompressionError(f"k must be >= 1; got {k}.")
  return min(k, d)


def index_bits(d: int) -> int:
  return max(1, math.ceil(math.log2(d)))


def top_k(k: int | None = None, fraction: float | None = None) -> Compressor:
  """Keeps the k coordinates of largest magnitude (ties: lowest index first)."""
  _k(10**9, k, fraction)  # validates the arguments

  def encode(x, key):
    del key
    d = x.shape[0]
    _, idx = jax.lax.top_k(jnp.abs(x), _k(d, k, fraction))
    return jnp.zeros_like(x).at[idx].set(x[idx])

  def num_bits(d):
    kk = _k(d, k, fraction)
    return kk * (32 + index_bits(d))

  name = f"top{k}" if k is not None else f"top{fraction:g}"
  return Compressor(encode, num_bits, name, lambda x: None, unbiased=False)


def random_k(k: int | None = None, fraction: float | None = None,
             unbiased: bool = True) -> Compressor:
  """Keeps k coordinates drawn uniformly without replacement (scaled by d/k if unbiased)."""
  _k(10**9, k, fraction)

  def encode(x, key):
    d = x.shape[0]
    kk = _k(d, k, fraction)
    idx = jax.random.permutation(key, d)[:kk]
    scale = d / kk if unbiased else 1.0
    return jnp.zeros_like(x).at[idx].set(scale * x[idx])

  def num_bits(d):
    return _k(d, k, fraction) * 32 + SEED_BITS

  def nmse_theory(x):
    d = np.asarray(x).shape[0]
    return d / _k(d, k, fraction) - 1 if unbiased else None

  name = (f"rand{k}" if k is not None else f"rand{fraction:g}") + ("" if unbiased else "_raw")
  return Compressor(encode, num_bits, name, nmse_theory, unbiased=unbiased)


def scaled_sign() -> Compressor:
  """(||x||_1 / d) sign(x): one bit per coordinate plus a float32 scale (biased)."""

  def encode(x, key):
    del key
    return jnp.mean(jnp.abs(x)) * jnp.where(x >= 0, 1.0, -1.0)

  return Compressor(encode, lambda d: d + SCALE_BITS, "sign", lambda x: None, unbiased=False)
