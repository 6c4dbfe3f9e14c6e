"""The DP-FedAvg aggregation stage: clip each client's update, sum, add Gaussian noise.

encode (per client, vmapped): `u -> u * min(1, C / ||u||_2)`, so every
  participating client contributes a vector of norm at most C (its
  sensitivity), whatever its example count; a client with weight 0 (padded
  slot, no data) contributes nothing. An update with a NaN or infinite entry
  (a client whose training diverged) also contributes zero: the plain formula
  would give NaN, which would poison the whole noisy sum and break the bound
  ||contribution|| <= C. Such clients are counted (`nonfinite_updates`).
finalize (server, once per round): `(sum + N(0, (z_v C)^2 I)) / D`, with the
  fixed denominator D = the expected number of participants (q N for Poisson
  sampling, m for fixed-size sampling), so the denominator reveals nothing.

Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy 2021): each client also
reports whether its update norm was at most the current C, centred as
`b - 1/2` (sensitivity 1/2); the server releases that count with Gaussian
noise of std sigma_b and moves C geometrically toward the target quantile
gamma of the update norms:

    b_mean = (sum(b - 1/2) + N(0, sigma_b^2)) / D + 1/2
    C     <- C * exp(-eta * (b_mean - gamma))

The two releases together are one Gaussian mechanism with the run's noise
multiplier z when the update sum uses z_v = (z^-2 - (2 sigma_b)^-2)^(-1/2)
(`accounting.adaptive_clip_noise`), so accounting with z covers both.

The guarantee (user-level DP for the released sums, accounted by
`fedjax_sim.privacy.accounting`) assumes the server is trusted to clip and to
draw the noise with a key the clients do not control.

References:
  McMahan, Ramage, Talwar, Zhang. "Learning Differentially Private Recurrent
  Language Models", ICLR 2018 (Algorithm 1, fixed-denominator estimator).
  Andrew, Thakkar, McMahan, Ramaswamy. "Differentially Private Learning with
  Adaptive Clipping", NeurIPS 2021 (Algorithm 1).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from fedjax_sim.core.aggregation import Aggregator, dense_bits, global_norm, tree_add, tree_zeros_like
from fedjax_sim.core.types import PyTree
from fedjax_sim.compression.compressor import apply_to_tree, num_params
from fedjax_sim.privacy.accounting import PrivacyError, adaptive_clip_noise


class ClippedSum(NamedTuple):
  clipped_sum: PyTree
  participants: jax.Array
  clipped: jax.Array  # how many updates were scaled down (non-finite ones included)
  below_centered: jax.Array  # sum over clients of 1[norm <= C] - 1/2
  nonfinite: jax.Array | float = 0.0  # how many updates had a NaN or infinite entry


def clip_update(update: PyTree, clip_norm) -> tuple[PyTree, jax.Array, jax.Array]:
  """`u * min(1, C / ||u||_2)`, and zero for an update with a NaN or infinite entry.

  Returns:
    (clipped, norm, finite): the clipped update (norm <= C whatever the
    input), the input's L2 norm (NaN or inf for a non-finite update, which
    thus counts as clipped) and whether that norm is finite: false for a NaN
    or infinite entry, and for entries so large (~1e19) that the squared norm
    overflows float32; either way the contribution is zero.
  """
  norm = global_norm(update)
  finite = jnp.isfinite(norm)
  scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-30))
  # where, not a product: 0 * NaN is NaN.
  clipped = jax.tree.map(lambda u: jnp.where(finite, scale * u, jnp.zeros_like(u)), update)
  return clipped, norm, finite


def clip_message(update: PyTree, weight, clip_norm, compressor=None,
                 key=None) -> tuple[ClippedSum, jax.Array]:
  """One client's clipped contribution (zero for a weight-0 slot), and its bit count.

  With a compressor: clip -> compress (on the client) -> clip again (on the
  server, to the decoded vector, which the trusted server sees), so the
  sensitivity stays C whatever the compressor's error. A non-finite update
  (or decoded vector) contributes zero and counts in `nonfinite`.
  """
  clipped, norm, finite = clip_update(update, clip_norm)
  present = (jnp.asarray(weight) > 0).astype(jnp.float32)
  below = (norm <= clip_norm).astype(jnp.float32)
  if compressor is None:
    bits = dense_bits(update)
  else:
    clipped, _, decoded_finite = clip_update(apply_to_tree(compressor, clipped, key=key), clip_norm)
    finite = finite & decoded_finite
    bits = compressor.bits(num_params(update))
  nonfinite = 1.0 - finite.astype(jnp.float32)
  message = ClippedSum(jax.tree.map(lambda u: present * u, clipped), present,
                       present * (1.0 - below), present * (below - 0.5), present * nonfinite)
  return message, present * float(bits)


def clipped_zeros(update_like) -> ClippedSum:
  z = jnp.zeros((), jnp.float32)
  return ClippedSum(tree_zeros_like(update_like), z, z, z, z)


def clip_metrics(combined: ClippedSum, clip_norm) -> dict[str, jax.Array]:
  """The round metrics every clipping stage reports."""
  return {"dp_participants": combined.participants,
          "dp_clipped_fraction": combined.clipped / jnp.maximum(combined.participants, 1.0),
          "dp_clip_norm": jnp.asarray(clip_norm, jnp.float32),
          "nonfinite_updates": jnp.asarray(combined.nonfinite, jnp.float32)}


def gaussian_noise(tree: PyTree, std, *, key) -> PyTree:
  """`tree + N(0, std^2)` per coordinate, one key per leaf."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [x + std * jax.random.normal(k, x.shape, x.dtype)
                                      for x, k in zip(leaves, keys)])


def traced(x) -> bool:
  """Whether `x` is an abstract value of a trace (a vmap sweep's member scalar), not a number."""
  return isinstance(x, jax.core.Tracer)


def check_clip_and_noise(clip_norm, noise_multiplier, expected_participants: float) -> None:
  """Refuses settings without a guarantee; traced values are checked where they were numbers.

  A vmap sweep builds each member's stage inside its program from traced
  scalars (`runner/sweep_vmap.py`); every member's own plan first built the
  same stage from its numbers on the host, where these checks ran.
  """
  if not traced(clip_norm) and not clip_norm > 0:
    raise PrivacyError(f"clip_norm must be > 0; got {clip_norm}.")
  if not traced(noise_multiplier) and not noise_multiplier >= 0:
    raise PrivacyError(f"noise_multiplier must be >= 0; got {noise_multiplier}.")
  if not expected_participants > 0:
    raise PrivacyError(f"expected_participants must be > 0; got {expected_participants}.")


def gaussian_sum(clip_norm: ArrayLike, noise_multiplier: ArrayLike,
                 expected_participants: float, *,
                 target_quantile: float | None = None, clip_learning_rate: float = 0.2,
                 count_stddev: float | None = None, compressor=None) -> Aggregator:
  """Builds the clip -> sum -> Gaussian noise -> fixed-denominator stage.

  Args:
    clip_norm: C > 0, the L2 bound of one client's contribution (the initial
      bound under adaptive clipping). It may be a traced scalar (a vmap
      sweep's member value): it only initialises the stage state.
    noise_multiplier: z >= 0, the multiplier the run is accounted with; the
      update noise std is z * C per coordinate (z_v * C under adaptive
      clipping, see the module docstring). It may be a traced scalar; the
      checks then are those its member's own plan ran on the number.
    expected_participants: D > 0, the fixed denominator (a Python number).
    target_quantile: gamma in [0, 1] turns on adaptive clipping; None keeps C
      fixed.
    clip_learning_rate: eta > 0 of the geometric update.
    count_stddev: sigma_b, the noise std of the unclipped-client count
      (default D / 20, Andrew et al.'s choice).
    compressor: a `fedjax_sim.compression.Compressor` for the upload: clip ->
      compress -> (server) clip -> sum -> noise.

  The stage state is the current clip norm; metrics report it
  (`dp_clip_norm`, the value used this round), the participants, the
  fraction of them whose update was clipped, and `nonfinite_updates`, how
  many updates had a NaN or infinite entry and were replaced by zero.
  """
  check_clip_and_noise(clip_norm, noise_multiplier, expected_participants)
  adaptive = target_quantile is not None
  update_multiplier = noise_multiplier
  if adaptive:
    if not 0 <= target_quantile <= 1:
      raise PrivacyError(f"target_quantile must be in [0, 1]; got {target_quantile}.")
    if not clip_learning_rate > 0:
      raise PrivacyError(f"clip_learning_rate must be > 0; got {clip_learning_rate}.")
    count_stddev = expected_participants / 20 if count_stddev is None else count_stddev
    if traced(noise_multiplier):
      # adaptive_clip_noise's formula in float32 (z = 0 gives inf^-0.5 = 0: no noise).
      z = jnp.asarray(noise_multiplier, jnp.float32)
      update_multiplier = (z ** -2 - (2 * count_stddev) ** -2) ** -0.5
    elif noise_multiplier > 0:
      update_multiplier = adaptive_clip_noise(noise_multiplier, count_stddev)
    elif count_stddev < 0:
      raise PrivacyError(f"count_stddev must be >= 0; got {count_stddev}.")

  def init(update_like):
    del update_like
    return jnp.asarray(clip_norm, jnp.float32)

  def encode(clip, update, weight, client_state, key):
    message, bits = clip_message(update, weight, clip, compressor, key)
    return message, client_state, bits

  def finalize(clip, combined: ClippedSum, num_clients, key):
    del num_clients
    update_key, count_key = jax.random.split(key)
    noisy = gaussian_noise(combined.clipped_sum, update_multiplier * clip, key=update_key)
    aggregate = jax.tree.map(lambda x: x / expected_participants, noisy)
    metrics = clip_metrics(combined, clip)
    new_clip = clip
    if adaptive:
      noisy_count = combined.below_centered + count_stddev * jax.random.normal(count_key)
      below = noisy_count / expected_participants + 0.5
      new_clip = clip * jnp.exp(-clip_learning_rate * (below - target_quantile))
      metrics["dp_unclipped_fraction_estimate"] = below
    return aggregate, new_clip, metrics

  upload_bits = dense_bits if compressor is None else (
      lambda update_like: compressor.bits(num_params(update_like)))
  return Aggregator(init, encode, tree_add, finalize, clipped_zeros, upload_bits=upload_bits,
                    always_finalize=True, released=(),  # counts are diagnostics only
                    multi_pass_encode=compressor is not None and compressor.multi_pass)
