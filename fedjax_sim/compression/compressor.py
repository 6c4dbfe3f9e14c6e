"""The compressor protocol and the aggregation stages built from compressors.

A `Compressor` is a lossy channel for one client's update, flattened to a
vector x of length d:

    compress(x, key) -> payload          on the client: the wire format (integer
                                         codes, scales, indices) as arrays
    decompress(payload, key, d) -> x_hat on the server (the key stands for the
                                         shared seed: rotation signs, random indices)
    bits(d) -> int                       the exact upload size of the fixed-length
                                         encoding (values, indices, scales and seeds)

`encode(x, key)` = decompress(compress(x, key)): the engine sums the
server's reconstructions (see DESIGN's aggregation contract), per client,
vmapped over its blocks; the benchmarks time the two halves apart.
Compressors compose: `rotated(c)` rotates, applies c, and rotates back.

Stages:
  compressed_mean(c, error_feedback=False)  weighted mean of reconstructions; with
      error feedback each client keeps its residual e in the per-client store
      and sends C(x + e), keeping e' = x + e - C(x + e) (Seide et al. 2014;
      Karimireddy et al. 2019), so the store scales with the population.
  majority_vote(step)   signSGD with majority vote (Bernstein et al. 2018): the
      server steps by `step * sign(sum_i sign(x_i))`.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from fedjax_sim.core.aggregation import TOTAL_WEIGHT, Aggregator, tree_add
from fedjax_sim.core.types import Params


class CompressionError(ValueError):
  """A compressor setting is impossible (bits out of range, k > d, ...)."""


class Compressor(NamedTuple):
  """A per-client lossy channel on flat float32 vectors.

  Attributes:
    compress: `compress(x [d], key) -> payload` (a pytree of arrays).
    decompress: `decompress(payload, key, d) -> x_hat [d]`.
    bits: `bits(d) -> int`, the exact number of bits one client uploads.
    name: a short label for metrics and benchmarks.
    nmse_theory: `nmse_theory(x) -> float | None` for a numpy vector x: the
      literature's value (or bound) of E||x_hat - x||^2 / ||x||^2 where one
      exists, None otherwise.
    unbiased: built to be unbiased, E[x_hat] = x (stochastic rounding: to
      2^-24 of a step; `drive`: exactly only for a uniformly random rotation,
      with its Hadamard rotation approximately, see there for when).
    multi_pass: makes several passes over the vector (a rotation): stages
      built on it ask the engine for cache-sized encode sub-blocks.
  """

  compress: Callable[[jax.Array, jax.Array], object]
  decompress: Callable[[object, jax.Array, int], jax.Array]
  bits: Callable[[int], int]
  name: str
  nmse_theory: Callable[..., float | None] = lambda x: None
  unbiased: bool = True
  multi_pass: bool = False

  def encode(self, x: jax.Array, key) -> jax.Array:
    """The server's reconstruction of x: decompress(compress(x))."""
    return self.decompress(self.compress(x, key), key, x.shape[0])


def num_params(params_like: Params) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params_like))


def apply_to_tree(compressor: Compressor, tree: Params, *, key) -> Params:
  """Compresses a pytree as one flat float32 vector and returns it in the tree's shape."""
  flat, unravel = ravel_pytree(tree)
  return unravel(compressor.encode(flat.astype(jnp.float32), key).astype(flat.dtype))


class CompressedSum(NamedTuple):
  weighted_sum: Params
  total_weight: jax.Array


def compressed_mean(compressor: Compressor, error_feedback: bool = False) -> Aggregator:
  """The weighted mean of compressed client updates (FedAvg's aggregation over a channel).

  Args:
    compressor: the channel every client's update goes through.
    error_feedback: keep each client's compression residual in the
      per-client store and add it to its next update.

  The whole message (every field of the update pytree) is compressed as one
  vector. Metrics: `total_weight`, the exact sum of the weights (metadata,
  sent uncompressed beside the payload), which algorithms may read.
  """

  def init(update_like):
    del update_like
    return ()

  def encode(stage_state, update, weight, residual, key):
    del stage_state
    flat, unravel = ravel_pytree(update)
    x = flat.astype(jnp.float32)
    if error_feedback:
      x = x + residual
    sent = compressor.encode(x, key)
    present = (jnp.asarray(weight) > 0)
    if error_feedback:  # an absent (padded) slot keeps its residual; it is never stored anyway
      residual = jnp.where(present, x - sent, residual)
    message = CompressedSum(jax.tree.map(lambda u: weight * u, unravel(sent.astype(flat.dtype))),
                            jnp.asarray(weight, jnp.float32))
    bits = jnp.where(present, float(compressor.bits(x.shape[0])), 0.0)
    return message, residual, bits

  def finalize(stage_state, combined: CompressedSum, num_clients, key):
    del num_clients, key
    mean = jax.tree.map(lambda s: s / jnp.maximum(combined.total_weight, 1e-30),
                        combined.weighted_sum)
    return mean, stage_state, {TOTAL_WEIGHT: combined.total_weight}

  def zeros(update_like):
    return CompressedSum(jax.tree.map(jnp.zeros_like, update_like), jnp.zeros((), jnp.float32))

  client_state_init = None
  if error_feedback:  # one residual per coordinate of the whole message
    client_state_init = lambda update_like: jnp.zeros((num_params(update_like),), jnp.float32)
  return Aggregator(init, encode, tree_add, finalize, zeros, client_state_init,
                    upload_bits=lambda update_like: compressor.bits(num_params(update_like)),
                    multi_pass_encode=compressor.multi_pass)


def majority_vote(step: float) -> Aggregator:
  """signSGD with majority vote: 1 bit per coordinate up, `step * sign(sum of signs)` back.

  The aggregate is handed to the algorithm as its mean update, so with
  FedAvg's server (SGD, lr eta) the model moves by `eta * step * vote`.
  It releases no `total_weight`: the vote is not a mean, so algorithms whose
  server step scales a mean by the participant count refuse it.
  With a 1-bit code a zero coordinate must still be sent as a sign: it is
  sent as a random one (from the client's key), so a coordinate no client
  changes gets a zero-mean vote instead of drifting one way every round; a
  tied vote moves nothing.
  """
  if not step > 0:
    raise CompressionError(f"majority_vote step must be > 0; got {step}.")

  def init(params_like):
    del params_like
    return ()

  def encode(stage_state, update, weight, client_state, key):
    del stage_state
    present = (jnp.asarray(weight) > 0).astype(jnp.float32)
    leaves, treedef = jax.tree.flatten(update)
    coins = [jax.random.bernoulli(k, 0.5, u.shape)
             for u, k in zip(leaves, jax.random.split(key, len(leaves)))]
    votes = jax.tree.unflatten(treedef, [
        present * jnp.where(u > 0, 1.0, jnp.where(u < 0, -1.0, jnp.where(c, 1.0, -1.0))).astype(
            u.dtype) for u, c in zip(leaves, coins)])
    bits = present * float(num_params(update))
    return votes, client_state, bits

  def finalize(stage_state, votes, num_clients, key):
    del num_clients, key
    return jax.tree.map(lambda v: step * jnp.sign(v), votes), stage_state, {}

  return Aggregator(init, encode, tree_add, finalize, lambda p: jax.tree.map(jnp.zeros_like, p),
                    upload_bits=num_params, released=())  # a vote, not a weighted mean
