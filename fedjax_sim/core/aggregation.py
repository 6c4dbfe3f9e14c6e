"""The aggregation contract: the joint where DP, compression and robust rules meet.

A stage is a NamedTuple of pure functions built by a factory that closes over
its hyperparameters (optax-style). The engine calls `encode` per client,
vmapped over a block; sums messages with `combine` block by block (streaming,
so memory is O(block x model)); and calls `finalize` once per round on the
server.

The stage is the only channel from clients to the server: `finalize`'s
aggregate and its metrics dict are all that `Algorithm.server_update`
receives. Any sum an algorithm's server step needs (a normalizer, a count)
must travel inside the client's update (an extra field of its pytree), so that
clipping, noise and compression apply to it like to the rest of the message.
The engine also sums raw client statistics (loss, examples, steps, bits), but
only for the round's metrics: they never reach the server.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_sim.core.types import Params, PRNGKey, PyTree


class Aggregator(NamedTuple):
  """A streaming aggregation stage.

  Every `*_like` argument is shaped like one client's message, the
  `ClientOutput.update` pytree (model-shaped for FedAvg, `{"delta",
  "control"}` for SCAFFOLD, ...); the engine derives it once with
  `jax.eval_shape` of the algorithm's `client_update` and passes zero arrays
  of that structure (`upload_bits` gets `jax.ShapeDtypeStruct`s).

  Attributes:
    init: `init(update_like) -> stage_state` (server-side state, a pytree).
    encode: `encode(stage_state, update, weight, client_state, key) ->
      (message, new_client_state, bits)` for one client. `message` is what the
      server reconstructs from this client; `bits` is the exact upload size.
    combine: `combine(message_a, message_b) -> message`, associative and
      commutative (the streamed sum over clients and blocks).
    finalize: `finalize(stage_state, combined, num_clients, key) ->
      (aggregate, new_stage_state, metrics)` on the server, once per round.
      `aggregate` has the structure of one client's update; `metrics` (name
      -> scalar) are reported in the round's metrics, and those named in
      `released` are also handed to `Algorithm.server_update` as its `info`.
    zeros: `zeros(update_like) -> the identity message of combine`.
    client_state_init: `client_state_init(update_like) -> one client's
      initial state` for stages that keep per-client state (error-feedback
      residuals); the engine keeps it in a per-client store next to the
      algorithm's and hands `encode` the client's row. None: stateless
      (`encode` receives and returns None).
    upload_bits: `upload_bits(update_like) -> int`, the exact bits one client
      uploads when the encoding has a fixed length (shapes only); the engine
      then reports exact integer bit counts instead of float32 sums.
    always_finalize: finalize even a round in which nobody took part (with
      `zeros` as the sum). DP stages need it: an empty round must still
      release noise (and advance noise trees and clip norms), or "the model
      did not move" would reveal that nobody, e.g. not a given client, was
      sampled. Other stages leave the model unchanged in such a round.
    released: the metric names the server step may use. Stages without DP
      release `total_weight`, the exact sum of the participants' weights
      (`TOTAL_WEIGHT`); DP stages release nothing but the noisy aggregate
      (their exact participant and clipping counts are diagnostics, not part
      of the accounted release).
    multi_pass_encode: `encode` makes several passes over each update (a
      Hadamard rotation makes about five), so the engine runs it over
      cache-sized sub-blocks of a block (`EngineConfig.encode_cache_bytes`).
      Single-pass stages (a weighted mean) are faster vmapped over the whole
      block.
  """

  init: Callable[[Params], Any]
  encode: Callable[..., tuple[PyTree, PyTree, jax.Array]]
  combine: Callable[[PyTree, PyTree], PyTree]
  finalize: Callable[..., tuple[Params, Any, dict[str, jax.Array]]]
  zeros: Callable[[Params], PyTree]
  client_state_init: Callable[[Params], PyTree] | None = None
  upload_bits: Callable[[PyTree], int] | None = None
  always_finalize: bool = False
  multi_pass_encode: bool = False
  released: tuple[str, ...] = ("total_weight",)


TOTAL_WEIGHT = "total_weight"


def total_weight(info: dict[str, jax.Array], algorithm: str) -> jax.Array:
  """The exact total weight a stage released, for algorithms whose server step needs it.

  Args:
    info: the `metrics` dict of the stage's `finalize` (`server_update`'s
      `info`).
    algorithm: the caller's name, for the error message.

  Raises:
    ValueError: the stage does not release `total_weight` (a DP stage, whose
      releases are noisy; or a stage that does not average). Raised while the
      server step is traced, before any round runs.
  """
  if TOTAL_WEIGHT not in info:
    raise ValueError(
        f"{algorithm} needs an aggregation stage that releases the exact total weight "
        f"('{TOTAL_WEIGHT}' in its finalize metrics, e.g. weighted_mean or compressed_mean); "
        f"this stage released only {sorted(info)}. DP stages do not release it.")
  return info[TOTAL_WEIGHT]


def dense_bits(update_like: PyTree) -> int:
  """Bits of an uncompressed upload: every leaf at its own dtype's width."""
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize * 8
             for x in jax.tree.leaves(update_like))


def tree_add(a: PyTree, b: PyTree) -> PyTree:
  return jax.tree.map(jnp.add, a, b)


def tree_zeros_like(a: PyTree) -> PyTree:
  return jax.tree.map(jnp.zeros_like, a)


def global_norm(tree: PyTree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


__all__ = ["Aggregator", "TOTAL_WEIGHT", "total_weight", "dense_bits", "tree_add",
           "tree_zeros_like", "global_norm", "PRNGKey"]
