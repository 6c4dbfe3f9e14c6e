"""The compiled chunk program: one call trains and encodes a chunk of clients on every device.

    shard_map over the mesh axis 'clients' (every local device gets a slice):
      fori_loop over the device's used blocks of `block_size` clients:
        gather per-client state -> vmap(client_update) -> vmap(encode)
        (or lax.map(client_update): one client at a time, see `client_loop`)
        -> scatter per-client state -> masked sums, added to the carry
      -> one partial sum per device (no collective)

Programs are cached by their pieces (`chunk_program` is an lru_cache over the
algorithm, stage, mesh and shapes), so engines built from the same objects
share them; each program owns a `TraceCounter`.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from fedjax_sim.core.aggregation import Aggregator, global_norm, tree_add
from fedjax_sim.core.algorithm import Algorithm, ClientData

AXIS = "clients"

def _primitives(jaxpr) -> set[str]:
  """Names of every primitive in a jaxpr, nested calls, loops and branches included."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      names |= _primitives(sub)
  return names


# A local step (or an evaluation block) costing at least this many FLOPs, by
# XLA's cost analysis of the unoptimized program, keeps a CPU busy on its own.
MAP_MIN_FLOPS = 10e6


def client_loop(setting: str, jaxpr, on_cpu: bool, flops=None) -> str:
  """How a device runs a block of clients: "vmap" (one batched program) or "map"
  (a loop, one client at a time, inside the same compiled program).

  "auto" picks "map" on CPU devices when the client's computation has a
  convolution, or when one step costs at least `MAP_MIN_FLOPS` (`flops()`,
  called only then). XLA:CPU lowers a convolution vmapped over clients (each
  with its own weights) to a grouped convolution that its fast kernels do
  not cover (the EMNIST CNN trained 4.3-4.8x slower vmapped,
  `experiments/benchmarks/emnist.py`), and a large matrix product vmapped
  over clients to a batched product that is no faster than one client at a
  time, while a loop lets each client run only its own steps (no padding to
  the block's longest client). Small models (logistic regression, the W1
  MLP: 0.02-0.4 MFLOP a step) keep vmap, which amortizes the per-client
  overhead; every accelerator vmaps.
  """
  if setting != "auto":
    return setting
  if not on_cpu:
    return "vmap"
  if "conv_general_dilated" in _primitives(jaxpr.jaxpr):
    return "map"
  return "map" if flops is not None and (flops() or 0.0) >= MAP_MIN_FLOPS else "vmap"


def step_flops(fn, *args) -> float:
  """FLOPs of `fn(*args)` by XLA's cost analysis of the lowered, unoptimized program
  (a loop body counted once); 0 when the backend gives none."""
  cost = jax.jit(fn).lower(*args).cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float((cost or {}).get("flops", 0.0))


def default_mesh(devices=None) -> Mesh:
  """A 1-D mesh with axis 'clients' over the given (default: all local) devices."""
  devices = jax.local_devices() if devices is None else devices
  return Mesh(np.asarray(devices), (AXIS,))



def _encode_sub_block(update_like, block: int, cache_bytes: int) -> int:
  """Clients per encode sub-block: as many padded float32 updates as fit in cache_bytes."""
  n = sum(math.prod(a.shape[1:]) for a in jax.tree.leaves(update_like))
  padded = 1 << max(0, int(n - 1).bit_length())
  if cache_bytes <= 0:
    return block
  return int(min(block, max(1, cache_bytes // (4 * padded))))


def _encode_block(agg: Aggregator, stage_state, per_client, cache_bytes: int):
  """`vmap(agg.encode)` over a block, in cache-sized sub-blocks (same values, in order)."""
  encode = lambda args: agg.encode(stage_state, *args)
  block = per_client[1].shape[0]
  sub = _encode_sub_block(per_client[0], block, cache_bytes)
  if sub >= block:
    return jax.vmap(encode)(per_client)
  return jax.lax.map(encode, per_client, batch_size=sub)


def client_stats(metrics, update, bits, weight, mask) -> dict[str, jax.Array]:
  """One client's statistics: its own metrics plus the engine's (for round metrics only)."""
  stats = dict(metrics)
  stats["bits"] = bits
  stats["clients"] = jnp.ones_like(weight)
  stats["clients_with_data"] = jnp.any(mask).astype(jnp.float32)
  stats["uploads"] = (weight > 0).astype(jnp.float32)  # clients that sent an update
  norm = global_norm(update)  # a diverged client must not hide the others
  stats["update_norm_sum"] = jnp.where(jnp.isfinite(norm), norm, 0.0)
  return stats


class TraceCounter:
  """How many times one compiled program's function was traced (each trace compiles).

  Owned by the program (`chunk_program` returns it beside the jitted
  function); engines sum the counters of the programs they ran.
  """

  def __init__(self):
    self.count = 0


@functools.lru_cache(maxsize=64)
def chunk_program(alg: Algorithm, agg: Aggregator, mesh: Mesh, num_blocks: int,
                   block: int, rows_per_device: int,
                   encode_cache_bytes: int, loop: str = "vmap") -> tuple[Callable, TraceCounter]:
  """The compiled chunk program, shared by every engine with the same pieces.

  Each device loops over its *used* blocks (a dynamic count), each block
  running its own dynamic number of local steps; devices return their partial
  sums (no collective). Traced once per input shape.

  Returns:
    (the jitted program, its trace counter).
  """
  counter = TraceCounter()
  data_axes = ClientData(0, 0, None, 0)
  n_dev = mesh.devices.size
  stateful = alg.client_state_init is not None
  agg_stateful = agg.client_state_init is not None

  def per_device(bcast, stage_state, store, ids, valid, examples, mask, limits, blocks_used,
                 block_steps, train_key, encode_key):
    counter.count += 1
    train_key = jax.random.wrap_key_data(train_key)
    encode_key = jax.random.wrap_key_data(encode_key)
    blocks = jax.tree.map(lambda a: a.reshape((num_blocks, block) + a.shape[1:]),
                          (ids, valid, examples, mask, limits))

    def one_block(blk, steps, stores):
      ids_b, valid_b, ex_b, mask_b, limits_b = blk
      alg_store, agg_store = stores
      train_keys = jax.vmap(jax.random.fold_in, (None, 0))(train_key, ids_b)
      enc_keys = jax.vmap(jax.random.fold_in, (None, 0))(encode_key, ids_b)
      # This device owns the clients of its slots: local row = id // n_dev;
      # padded slots write nowhere (an out-of-range row, dropped).
      rows = ids_b // n_dev
      put = jnp.where(valid_b, rows, rows_per_device)
      gather = lambda store: jax.tree.map(
          lambda s: s[jnp.minimum(rows, rows_per_device - 1)], store)
      scatter = lambda store, new: jax.tree.map(
          lambda s, v: s.at[put].set(v.astype(s.dtype), mode="drop"), store, new)
      client_state = gather(alg_store) if stateful else None
      if loop == "map":
        batch_size = alg.local.batch_size

        def train_one(a):
          # One client at a time runs only its own steps: the block's extra steps
          # would see no real example and change nothing.
          own = jnp.minimum(steps, (jnp.sum(a[1]) + batch_size - 1) // batch_size)
          return alg.client_update(bcast, ClientData(a[0], a[1], own, a[2]), a[3], a[4])

        def skip(a):  # a padded slot: no work (its results are masked out below)
          return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(train_one, a))

        out = jax.lax.map(lambda a: jax.lax.cond(a[5], train_one, skip, a),
                          (ex_b, mask_b, limits_b, client_state, train_keys, valid_b))
      else:
        out = jax.vmap(alg.client_update, (None, data_axes, 0, 0))(
            bcast, ClientData(ex_b, mask_b, steps, limits_b), client_state, train_keys)
      if stateful:
        alg_store = scatter(alg_store, out.client_state)
      weight = jnp.where(valid_b, out.weight, 0.0)
      message, agg_client_state, bits = _encode_block(
          agg, stage_state, (out.update, weight, gather(agg_store) if agg_stateful else None,
                             enc_keys), encode_cache_bytes)
      if agg_stateful:
        agg_store = scatter(agg_store, agg_client_state)
      store = (alg_store, agg_store)

      def masked_sum(x):
        v = valid_b.reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.sum(jnp.where(v, x, jnp.zeros_like(x)), axis=0)

      stats = jax.vmap(client_stats)(out.metrics, out.update, bits, weight, mask_b)
      sums = (jax.tree.map(masked_sum, message), {k: masked_sum(v) for k, v in stats.items()})
      return sums, store

    def body(i, carry):
      (msg_acc, stats_acc), store = carry
      blk = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), blocks)
      (msg, stats), store = one_block(blk, block_steps[i], store)
      return (agg.combine(msg_acc, msg), tree_add(stats_acc, stats)), store

    first = jax.tree.map(lambda a: a[0], blocks)
    shapes, _ = jax.eval_shape(one_block, first, block_steps[0], store)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    total, store = jax.lax.fori_loop(0, blocks_used[0], body, (zeros, store))
    # Each device returns its own partial sum: no cross-device collective runs
    # inside the program (XLA:CPU all-reduces can starve on few cores).
    return jax.tree.map(lambda x: x[None], total), store

  fn = jax.jit(jax.shard_map(
      per_device, mesh=mesh,
      in_specs=(P(), P(), P(AXIS), P(AXIS), P(AXIS), P(AXIS), P(AXIS), P(AXIS), P(AXIS), P(AXIS),
                P(), P()),
      out_specs=(P(AXIS), P(AXIS)), check_vma=False), donate_argnums=(2,))
  return fn, counter
