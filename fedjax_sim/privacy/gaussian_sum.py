"""The DP-FedAvg aggregation stage: clip each client's update, sum, add Gaussian noise.

encode (per client, vmapped): `u -> u * min(1, C / ||u||_2)`, so every
  participating client contributes a vector of norm at most C (its
  sensitivity), whatever its example count; a client with weight 0 (padded
  slot, no data) contributes nothing.
finalize (server, once per round): `(sum + N(0, (z C)^2 I)) / D`, with the
  fixed denominator D = the expected number of participants (q N for Poisson
  sampling, m for fixed-size sampling), so the denominator reveals nothing.

The guarantee (user-level DP for the release of the noisy sum, accounted by
`fedjax_sim.privacy.accounting`) assumes the server is trusted to clip and to
draw the noise with a key the clients do not control.

References:
  McMahan, Ramage, Talwar, Zhang. "Learning Differentially Private Recurrent
  Language Models", ICLR 2018 (Algorithm 1, fixed-denominator estimator).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_sim.core.aggregation import Aggregator, global_norm, tree_add, tree_zeros_like
from fedjax_sim.core.types import PyTree
from fedjax_sim.privacy.accounting import PrivacyError


class ClippedSum(NamedTuple):
  clipped_sum: PyTree
  participants: jax.Array
  clipped: jax.Array  # how many updates were scaled down


def gaussian_sum(clip_norm: float, noise_multiplier: float,
                 expected_participants: float) -> Aggregator:
  """Builds the clip -> sum -> Gaussian noise -> fixed-denominator stage.

  Args:
    clip_norm: C > 0, the L2 bound of one client's contribution.
    noise_multiplier: z >= 0; the noise std is z * C per coordinate.
    expected_participants: D > 0, the fixed denominator.
  """
  if not clip_norm > 0:
    raise PrivacyError(f"clip_norm must be > 0; got {clip_norm}.")
  if not noise_multiplier >= 0:
    raise PrivacyError(f"noise_multiplier must be >= 0; got {noise_multiplier}.")
  if not expected_participants > 0:
    raise PrivacyError(f"expected_participants must be > 0; got {expected_participants}.")

  def init(params_like):
    del params_like
    return ()

  def encode(stage_state, update, weight, client_state, key):
    del stage_state, key
    norm = global_norm(update)
    scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-30))
    present = (jnp.asarray(weight) > 0).astype(jnp.float32)
    message = ClippedSum(jax.tree.map(lambda u: (present * scale) * u, update), present,
                         present * (norm > clip_norm).astype(jnp.float32))
    bits = sum(x.size * x.dtype.itemsize * 8 for x in jax.tree.leaves(update))
    return message, client_state, jnp.asarray(bits, jnp.float32)

  def finalize(stage_state, combined: ClippedSum, num_clients, key):
    del num_clients
    leaves, treedef = jax.tree.flatten(combined.clipped_sum)
    keys = jax.random.split(key, len(leaves))
    noisy = [x + noise_multiplier * clip_norm * jax.random.normal(k, x.shape, x.dtype)
             for x, k in zip(leaves, keys)]
    aggregate = jax.tree.map(lambda x: x / expected_participants,
                             jax.tree.unflatten(treedef, noisy))
    metrics = {"dp_participants": combined.participants,
               "dp_clipped_fraction": combined.clipped / jnp.maximum(combined.participants, 1.0)}
    return aggregate, stage_state, metrics

  def zeros(params_like):
    return ClippedSum(tree_zeros_like(params_like), jnp.zeros(()), jnp.zeros(()))

  return Aggregator(init, encode, tree_add, finalize, zeros)
