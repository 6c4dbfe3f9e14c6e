"""The weighted mean of client updates (FedAvg's aggregation)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_sim.core.aggregation import (Aggregator, dense_bits, global_norm, tree_add,
                                         tree_zeros_like)
from fedjax_sim.core.types import PyTree


class WeightedSum(NamedTuple):
  weighted_update: PyTree
  weight: jax.Array
  nonfinite: jax.Array | float = 0.0  # updates with a NaN or infinite entry


def weighted_mean() -> Aggregator:
  """`sum_k w_k u_k / sum_k w_k`; a round with zero total weight yields zeros.

  Messages are summable, so the round streams in O(block x model) memory.
  `bits` counts the update in its dtype (no compression); the weight, the
  client's example count, is metadata and is not counted by any stage.
  Metrics: `total_weight`, and `nonfinite_updates`, the clients whose update
  has a NaN or infinite entry (the mean is then NaN or inf, as the formula
  says; the count tells a diverged client from a diverged model).
  """

  def init(update_like):
    del update_like
    return ()

  def encode(stage_state, update, weight, client_state, key):
    del stage_state, key
    weight = jnp.asarray(weight, jnp.float32)
    nonfinite = (weight > 0) & ~jnp.isfinite(global_norm(update))
    message = WeightedSum(jax.tree.map(lambda u: weight * u, update), weight,
                          nonfinite.astype(jnp.float32))
    bits = jnp.where(weight > 0, float(dense_bits(update)), 0.0)
    return message, client_state, bits

  def finalize(stage_state, combined: WeightedSum, num_clients, key):
    del num_clients, key
    total = combined.weight
    scale = jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)
    mean = jax.tree.map(lambda s: s * scale, combined.weighted_update)
    return mean, stage_state, {"total_weight": total,
                               "nonfinite_updates": jnp.asarray(combined.nonfinite, jnp.float32)}

  def zeros(update_like):
    z = jnp.zeros((), jnp.float32)
    return WeightedSum(tree_zeros_like(update_like), z, z)

  return Aggregator(init, encode, tree_add, finalize, zeros, upload_bits=dense_bits)
