"""Counter-based random words: a strong integer hash of (index, client seed).

Stochastic rounding needs a random dither per coordinate inside the
quantizer's elementwise pass. JAX's threefry makes its words in a loop of
its own, 20 rounds per pair of words, which on the 2-core CPU cost 11x the
quantizer it fed. Here word i is `mix32(i * golden ^ seed)`, the seed one
threefry word from the client's key: for a fixed i the word is uniform over
the seed (the map is a bijection of the seed), distinct indices give words
that a full-avalanche hash makes look independent, and XLA fuses the hash
into the pass that uses it. The tests check moments and correlations between
neighbours and clients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

GOLDEN = 0x9E3779B9  # 2^32 / golden ratio, odd: spreads consecutive counters


def mix32(h):
  """lowbias32 (C. Wellons' integer hash): two multiply-xorshift rounds, full avalanche."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x7FEB352D)
  h = h ^ (h >> 15)
  h = h * jnp.uint32(0x846CA68B)
  return h ^ (h >> 16)


def counter_words(key, n: int) -> jax.Array:
  """n random uint32 words for the client whose key this is."""
  seed = mix32(jax.random.bits(key, (), jnp.uint32))
  return mix32(jnp.arange(n, dtype=jnp.uint32) * jnp.uint32(GOLDEN) ^ seed)
