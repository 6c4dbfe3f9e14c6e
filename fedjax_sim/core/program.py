"""The compiled chunk program: one call trains and encodes a chunk of clients on every device.

    shard_map over the mesh axis 'clients' (every local device gets a slice):
      fori_loop over the device's used blocks of `block_size` clients:
        [resident data: gather the block's examples from the device's shard]
        gather per-client state -> vmap(client_update) -> vmap(encode)
        (or lax.map(client_update): one client at a time, see `client_loop`)
        -> scatter per-client state -> masked sums, added to the carry
      -> one partial sum per device (no collective), plus a few statistics
         per client slot (`CLIENT_RECORD`: telemetry)

The examples come either with the chunk (streamed: the host gathered them)
or from the `ResidentData` shards already on the devices (`core/resident.py`):
then the host sends only client ids and plans.

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
from fedjax_sim.core.distributed import global_devices

AXIS = "clients"

# Per-client statistics returned slot by slot beside the sums (the round's
# per-client record: histograms, anomaly checks, the cost model).
CLIENT_RECORD = ("examples", "loss_sum", "steps", "update_norm")

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
  return lowered_flops(jax.jit(fn).lower(*args))


def lowered_flops(lowered) -> float:
  """`step_flops` of an already lowered program (one lowering serves FLOPs and compiling)."""
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float((cost or {}).get("flops", 0.0))


def default_mesh(devices=None) -> Mesh:
  """A 1-D mesh with axis 'clients' over the given devices (default: every process's
  devices, in process order; on one process, its local devices)."""
  devices = global_devices() if devices is None else devices
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


def client_stats(metrics, update, bits, weight, mask, norm=None) -> dict[str, jax.Array]:
  """One client's statistics: its own metrics plus the engine's (for round metrics only).

  `norm` is the update's global norm when the caller has it already.
  """
  stats = dict(metrics)
  stats["bits"] = bits
  stats["clients"] = jnp.ones_like(weight)
  stats["clients_with_data"] = jnp.any(mask).astype(jnp.float32)
  stats["uploads"] = (weight > 0).astype(jnp.float32)  # clients that sent an update
  norm = global_norm(update) if norm is None else norm
  # A diverged client must not hide the others.
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
                   encode_cache_bytes: int, loop: str = "vmap",
                   resident_pad_to: int | None = None) -> tuple[Callable, TraceCounter]:
  """The compiled chunk program, shared by every engine with the same pieces.

  Each device loops over its *used* blocks (a dynamic count), each block
  running its own dynamic number of local steps; devices return their partial
  sums (no collective). Traced once per input shape.

  The program's data argument is `(examples, mask)` gathered by the host
  (`resident_pad_to` None), or the `ResidentData.arrays` shards, from which
  each block gathers its clients' `resident_pad_to` example slots.

  Returns:
    (the jitted program, its trace counter). The program returns
    `((message sums, statistic sums), per-client record, stores)`: the sums
    one per device, the record `{name: [capacity]}` (`CLIENT_RECORD`, zeros
    in unused slots).
  """
  counter = TraceCounter()
  per_device = device_program(alg, agg, num_blocks, block, rows_per_device, encode_cache_bytes,
                              loop, resident_pad_to, counter)
  fn = jax.jit(jax.shard_map(
      per_device, mesh=mesh,
      in_specs=(P(), P(), P(AXIS), P(AXIS), P(AXIS), P(AXIS), P(AXIS), P(AXIS), P(AXIS), P(), P()),
      out_specs=(P(AXIS), P(AXIS), P(AXIS)), check_vma=False), donate_argnums=(2,))
  return fn, counter


def device_program(alg: Algorithm, agg: Aggregator, num_blocks: int, block: int,
                   rows_per_device: int, encode_cache_bytes: int, loop: str,
                   resident_pad_to: int | None, counter: TraceCounter) -> Callable:
  """One device's part of the chunk program (the function `chunk_program` shard_maps).

  `per_device(bcast, stage_state, store, ids, valid, data, limits, blocks_used,
  block_steps, train_key, encode_key) -> (sums, record, store)` on this
  device's slices. Pure in its arguments, so `core/members.py` vmaps it over
  sweep members, building `alg` and `agg` from traced hyperparameters.
  """
  data_axes = ClientData(0, 0, None, 0)
  stateful = alg.client_state_init is not None
  agg_stateful = agg.client_state_init is not None

  def per_device(bcast, stage_state, store, ids, valid, data, limits, blocks_used,
                 block_steps, train_key, encode_key):
    counter.count += 1
    train_key = jax.random.wrap_key_data(train_key)
    encode_key = jax.random.wrap_key_data(encode_key)
    per_slot = (ids, valid, limits) if resident_pad_to else (ids, valid, limits) + tuple(data)
    blocks = jax.tree.map(lambda a: a.reshape((num_blocks, block) + a.shape[1:]), per_slot)

    def one_block(blk, steps, stores):
      if resident_pad_to:
        ids_b, valid_b, limits_b = blk
        # A shard's rows: this device's id range (by owner) or every client (the shared
        # layout, see core/resident.py); either way a client's row is id % rows.
        ex_b, mask_b = gather_resident(data, ids_b % data[1].shape[0], valid_b,
                                       resident_pad_to)
      else:
        ids_b, valid_b, limits_b, ex_b, mask_b = blk
      alg_store, agg_store = stores
      train_keys = jax.vmap(jax.random.fold_in, (None, 0))(train_key, ids_b)
      enc_keys = jax.vmap(jax.random.fold_in, (None, 0))(encode_key, ids_b)
      # This device owns the clients of its slots (a contiguous id range):
      # local row = id % rows_per_device; padded slots write nowhere (an
      # out-of-range row, dropped).
      rows = ids_b % rows_per_device
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
        masked = jnp.where(v, x, jnp.zeros_like(x))  # padded slots may hold anything
        if x.ndim >= 2 and x.dtype == jnp.float32:
          # The block's parameter-shaped messages summed as a product with a vector of
          # ones: XLA:CPU runs this vector-matrix product faster than its reduction over
          # the leading axis (the MLP's round, compared with the throughput benchmark's
          # unrolled reference in interleaved rounds). Same sum, another order.
          return jnp.tensordot(jnp.ones(x.shape[0], x.dtype), masked, axes=1)
        return jnp.sum(masked, axis=0)

      norms = jax.vmap(global_norm)(out.update)
      stats = jax.vmap(client_stats)(out.metrics, out.update, bits, weight, mask_b, norms)
      sums = (jax.tree.map(masked_sum, message), {k: masked_sum(v) for k, v in stats.items()})
      record = {k: stats[k] for k in CLIENT_RECORD if k in stats}
      record["update_norm"] = norms  # raw: NaN or inf kept for a diverged client
      record = {k: jnp.where(valid_b, v, 0.0).astype(jnp.float32) for k, v in record.items()}
      return sums, record, store

    def body(i, carry):
      (msg_acc, stats_acc), records, store = carry
      blk = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), blocks)
      (msg, stats), record, store = one_block(blk, block_steps[i], store)
      records = jax.tree.map(
          lambda r, v: jax.lax.dynamic_update_slice_in_dim(r, v, i * block, 0), records, record)
      return (agg.combine(msg_acc, msg), tree_add(stats_acc, stats)), records, store

    first = jax.tree.map(lambda a: a[0], blocks)
    shapes, record_shapes, _ = jax.eval_shape(one_block, first, block_steps[0], store)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    records = {k: jnp.zeros((num_blocks * block,), jnp.float32) for k in record_shapes}
    total, records, store = jax.lax.fori_loop(0, blocks_used[0], body, (zeros, records, store))
    # Each device returns its own partial sum: no cross-device collective runs
    # inside the program (XLA:CPU all-reduces can starve on few cores).
    return jax.tree.map(lambda x: x[None], total), records, store

  return per_device


def gather_resident(data, rows, valid, pad_to: int):
  """A block's examples from a device's resident shard, exactly as `FederatedData.gather`.

  Args:
    data: `(features, starts, sizes)`: this device's shard of `ResidentData.arrays`
      (features `[examples, ...]`, starts and sizes `[rows]` int32).
    rows: `[block]` local rows of the block's clients (padded slots: any row).
    valid: `[block]` bool, real clients.
    pad_to: example slots per client.

  Returns:
    (examples `{name: [block, pad_to, ...]}`, mask `[block, pad_to]`): a
    client's padding slots repeat its last example; invalid slots are zeros.
  """
  features, starts, sizes = data
  rows = jnp.clip(rows, 0, starts.shape[0] - 1)
  size = jnp.where(valid, jnp.minimum(sizes[rows], pad_to), 0)
  pos = jnp.arange(pad_to, dtype=jnp.int32)
  mask = pos[None, :] < size[:, None]
  last = jnp.maximum(size - 1, 0)
  index = starts[rows][:, None] + jnp.minimum(pos[None, :], last[:, None])
  out = {}
  for k, v in features.items():
    x = v[jnp.clip(index, 0, v.shape[0] - 1)]
    keep = valid.reshape((-1,) + (1,) * (x.ndim - 1))
    out[k] = jnp.where(keep, x, jnp.zeros((), x.dtype))
  return out, mask
