"""DP-FTRL's aggregation stage: tree-aggregated noise on the prefix sums of clipped updates.

Kairouz et al. 2021 release, at round t of a tree, the prefix sum
S_t = x_1 + ... + x_t of the clipped update sums plus the noise of the
dyadic nodes that cover [1, t] in an online binary tree, each node's noise
N(0, (zC)^2 I) drawn once and reused by every later prefix that contains it.
A prefix t thus carries popcount(t) node noises, and one client (present in
one round of the tree) touches at most ceil(log2(T + 1)) nodes.

This stage hands the server the increment of the released prefix sums,

    (S~_t - S~_{t-1}) / m  =  (x_t + n(t) - n(t-1)) / m,

a post-processing of the releases. With x_t the sum of clipped model deltas
(each a negative pseudo-gradient), a server that applies the increments with
SGD at learning rate eta reaches theta_0 + eta S~_t / m: FTRL with a linear
loss. With heavy-ball momentum gamma (FedAvgM) it reaches
theta_0 + eta * sum_s gamma^(t-s) S~_s / m, exactly FTRL with momentum, in the
first tree (tested end to end). After a restart the server's momentum carries
over, whereas Kairouz et al.'s DP-FTRLM restarts with zero momentum, so later
trees differ from it by the decaying old velocity. Any server optimizer may
consume the increments; the privacy is that of the releases.

Node noise is regenerated from `fold_in(fold_in(tree_key, level), index)`
rather than stored, so the state is a step counter and a key: n(t) - n(t-1)
is the new node at t's lowest set bit minus the nodes of t - 1 below it,
about two draws per round on average and at most log2(T) + 1.

A restart (every `restart_every` rounds) starts a new tree with a new key;
the accounting (`accounting.dp_ftrl_event`) needs shuffled epochs and trees
that never straddle two epochs.

References:
  Kairouz, McMahan, Song, Thakkar, Thakurta, Xu. "Practical and Private (Deep)
  Learning without Sampling or Shuffling", ICML 2021 (Algorithm 1 and
  Appendix D). Dwork, Naor, Pitassi, Rothblum 2010; Chan, Shi, Song 2011
  (the binary tree mechanism).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from fedjax_sim.core.aggregation import Aggregator, dense_bits, tree_add
from fedjax_sim.core.types import PyTree
from fedjax_sim.privacy.accounting import PrivacyError
from fedjax_sim.privacy.gaussian_sum import (ClippedSum, check_clip_and_noise, clip_message,
                                             clip_metrics, clipped_zeros)

_NEVER = 2**30


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TreeState:
  step: jax.Array  # rounds released by the current tree
  key: jax.Array  # the current tree's key data (uint32)


def node_noise(tree_key, level, index, like: PyTree, std) -> PyTree:
  """The noise of the tree node (level, index), N(0, std^2) per coordinate."""
  key = jax.random.fold_in(jax.random.fold_in(tree_key, level), index)
  leaves, treedef = jax.tree.flatten(like)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [std * jax.random.normal(k, x.shape, x.dtype)
                                      for x, k in zip(leaves, keys)])


def noise_increment(tree_key, t, like: PyTree, std) -> PyTree:
  """n(t) - n(t - 1) for t >= 1: the node noise a prefix gains minus what it drops."""
  low = jax.lax.population_count((t & -t) - 1)  # lowest set bit of t
  gained = node_noise(tree_key, low, t >> low, like, std)

  def drop(level, acc):
    old = node_noise(tree_key, level, (t - 1) >> level, like, std)
    return jax.tree.map(jnp.subtract, acc, old)

  return jax.lax.fori_loop(0, low, drop, gained)


def tree_sum(clip_norm: ArrayLike, noise_multiplier: ArrayLike, denominator: float,
             restart_every: int | None = None) -> Aggregator:
  """Builds DP-FTRL's clip -> sum -> tree noise -> increment / m stage.

  Args:
    clip_norm: C > 0, the L2 bound of one client's contribution.
    noise_multiplier: z >= 0; each tree node's noise std is z * C. Both may
      be traced scalars (a vmap sweep's member values; the checks then are
      those the member's own plan ran on its numbers).
    denominator: m, the (fixed, public) cohort size (a Python number).
    restart_every: rounds per tree; None: a single tree.

  Clipping is DP-FedAvg's (`gaussian_sum.clip_update`): an update with a NaN
  or infinite entry contributes zero and is counted in `nonfinite_updates`.
  """
  check_clip_and_noise(clip_norm, noise_multiplier, denominator)
  if restart_every is not None and restart_every < 1:
    raise PrivacyError(f"restart_every must be >= 1 or None; got {restart_every}.")
  period = _NEVER if restart_every is None else int(restart_every)
  std = noise_multiplier * clip_norm

  def init(update_like):
    del update_like  # step = period: the first round opens a tree with its own key
    return TreeState(jnp.asarray(period, jnp.int32),
                     jax.random.key_data(jax.random.key(0)))

  def encode(stage_state, update, weight, client_state, key):
    del stage_state, key
    message, bits = clip_message(update, weight, clip_norm)
    return message, client_state, bits

  def finalize(state: TreeState, combined: ClippedSum, num_clients, key):
    del num_clients
    restart = state.step >= period
    step = jnp.where(restart, 0, state.step)
    key_data = jnp.where(restart, jax.random.key_data(key), state.key)
    t = step + 1
    noise = noise_increment(jax.random.wrap_key_data(key_data), t, combined.clipped_sum, std)
    aggregate = jax.tree.map(lambda x, n: (x + n) / denominator, combined.clipped_sum, noise)
    metrics = {**clip_metrics(combined, clip_norm), "dp_tree_step": t.astype(jnp.float32)}
    return aggregate, TreeState(t, key_data), metrics

  return Aggregator(init, encode, tree_add, finalize, clipped_zeros, upload_bits=dense_bits,
                    always_finalize=True, released=())  # counts are diagnostics only
