"""The round engine.

A round is planned on the host (sample -> bucket -> chunk), its chunks are
prepared and transferred by a background thread that runs ahead of the device
(also into the next round: sampling never depends on the model), and each
chunk is processed by one compiled program (`core/program.py`). The training
data either stays on the devices (`core/resident.py`: placed once, each
block's examples gathered inside the program, the host sends only ids and
plans) or is streamed (the thread gathers each chunk's examples on the host);
`EngineConfig.data_placement` chooses, "auto" by memory (`Engine.placement`):

    shard_map over the mesh axis 'clients' (every local device gets a slice):
      fori_loop over the device's used blocks of `block_size` clients:
        vmap(client_update) -> vmap(encode) -> masked sum, added to the carry
      -> one partial sum per device

so device memory is O(block x model), never O(clients per round x model).
A round whose cohort fits in one chunk is one program call; a larger one is
the same program streamed over chunks, the per-device partial sums added on
device; at the end of the round the per-device partials (model-sized) are
summed on the host and finalized.

One channel from clients to the server: `server_update` receives the stage's
aggregate and the scalars its `finalize` released, nothing else. The raw
client statistics (`ClientOutput.metrics`, bits, counts) are summed beside the
messages for the round's metrics only.

The structure of one client's message (`ClientOutput.update`) and of its
statistics is derived once per engine with `jax.eval_shape` of
`client_update` on a one-client dummy `ClientData`; it sizes the stage's
state, its per-client store, the zero message of an empty round and the exact
upload size.

Randomness: client c in round r trains with `fold_in(fold_in(train_key, r), c)`
and encodes with `fold_in(fold_in(agg_key, r), c)`, so nothing depends on how
clients are blocked, chunked or sharded; only the summation order does.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedjax_sim.core import contractions
from fedjax_sim.core.aggregation import Aggregator, global_norm, tree_add
from fedjax_sim.core.algorithm import Algorithm, ClientData
from fedjax_sim.core.data import FederatedData
from fedjax_sim.core.distributed import agree, to_devices, to_host
from fedjax_sim.core.heterogeneity import SystemConfig, SystemModel
from fedjax_sim.core.keys import Purpose, run_key
from fedjax_sim.core.plan import Chunk, Planner, RoundPlan
from fedjax_sim.core.program import (AXIS, CLIENT_RECORD, TraceCounter, chunk_program, client_loop,
                                     client_stats, default_mesh, step_flops)
from fedjax_sim.core.resident import ResidentData, choose_placement, place, shareable

# Streamed chunks: under glibc's 32 MiB mmap ceiling on CPU devices (see
# `EngineConfig.max_chunk_bytes`); an accelerator's transfers gain from larger ones.
CPU_CHUNK_BYTES = 24 << 20
ACCELERATOR_CHUNK_BYTES = 256 << 20

# How the per-client store maps clients to rows (recorded in checkpoints).
STORE_LAYOUT = "range"

# With resident data a chunk carries ids, not examples: chunks may hold this
# many example slots (the streamed bound is `max_chunk_bytes`), so a round of a
# million clients is a few program calls.
RESIDENT_CHUNK_SLOTS = 1 << 23

@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """Static engine settings.

  Attributes:
    block_size: clients vmapped together on one device.
    max_chunk_bytes: bytes of streamed example data per compiled call at
      most (None: per backend). It bounds host and device buffers; on CPU
      devices (`CPU_CHUNK_BYTES`, 24 MiB) keeping each buffer under glibc's
      32 MiB mmap ceiling lets freed buffers be reused instead of
      page-faulted in afresh every round (measured: 2x cheaper host
      transfers); accelerators take `ACCELERATOR_CHUNK_BYTES` (256 MiB), so
      a round is fewer, larger transfers.
    bucketing: group clients into step-homogeneous blocks (see `Planner`).
    prefetch: chunks the host may prepare ahead of the device.
    encode_cache_bytes: on CPU devices, an aggregation stage with
      `multi_pass_encode` (a rotation-based compressor) encodes a block's
      updates in sub-blocks of
      at most this many bytes of float32 update (each update counted at its
      length rounded up to a power of two, as a Hadamard rotation pads it).
      Its passes run from the cache only while the sub-block fits in it:
      16 updates of 10^5 parameters encode 1.8x faster than 64 on the 2-core
      CPU. Single-pass stages, and models small enough that the whole block
      fits, are unaffected; 0 turns sub-blocking off.
    client_loop: "vmap" (a block's clients in one batched program), "map"
      (one at a time, in the same compiled program) or "auto" (see
      `program.client_loop`: "map" for convolutional models on CPU).
    data_placement: "device" (the training data resident on the devices,
      gathered in the program), "host" (streamed each round) or "auto"
      (resident when its copy fits, see `resident.choose_placement`).
    small_contractions: vmapped products of two per-client operands that
      contract at most this many elements (a small batch's weight gradient)
      are traced as unrolled sums of products (`core/contractions.py`);
      None: `contractions.CPU_MAX_K` (16) on CPU devices, 0 (off) on
      accelerators, whose batched matrix products are fast.
  """

  block_size: int = 64
  max_chunk_bytes: int | None = None
  bucketing: bool = True
  prefetch: int = 3
  encode_cache_bytes: int = 8 << 20
  client_loop: str = "auto"
  data_placement: str = "auto"
  small_contractions: int | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class SimState:
  """Everything that evolves during a run.

  Attributes:
    server: the algorithm's server state.
    aggregator: the aggregation stage's state.
    clients: the algorithm's per-client state store: every leaf has shape
      `[num_devices * rows_per_device, ...]`, sharded over the devices, the
      state of client `c` at row `c` (device `c // rows_per_device` owns a
      contiguous range of clients; `()` for algorithms without per-client
      state).
    aggregator_clients: the aggregation stage's per-client store (e.g.
      error-feedback residuals), laid out like `clients` (`()` if none).
  """

  server: Any
  aggregator: Any
  clients: Any = ()
  aggregator_clients: Any = ()


@dataclasses.dataclass
class RoundResult:
  """One round's outcome.

  Attributes:
    round_num: the round index.
    state: the state after the round.
    metrics: the round's scalar metrics.
    clients: the per-client record of the clients that trained, in slot
      order: `client_id` (int64) and `CLIENT_RECORD`'s float32 statistics
      (`examples`, `loss_sum`, `steps`, and `update_norm`, NaN or inf kept
      for a diverged client). Empty arrays when nobody trained.
  """

  round_num: int
  state: SimState
  metrics: dict[str, float]
  clients: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

  @property
  def server_state(self):
    return self.state.server


class Engine:
  """Runs rounds of an `Algorithm` over a `FederatedData` population.

  Args:
    algorithm: the algorithm (its `local.batch_size` drives planning).
    data: the training population.
    aggregator: the aggregation stage.
    sampler: `sampler(round_num) -> sorted client ids` (host side).
    seed: the run's seed (training and encoding keys derive from it).
    config: engine settings.
    mesh: device mesh with axis 'clients' (default: all local devices).
    system: dropouts and stragglers (default: every sampled client reports
      with its full work).
  """

  def __init__(self, algorithm: Algorithm, data: FederatedData, aggregator: Aggregator,
               sampler: Callable[[int], np.ndarray], *, seed: int,
               config: EngineConfig = EngineConfig(), mesh: Mesh | None = None,
               system: SystemConfig | None = None):
    self.algorithm = algorithm
    self.data = data
    self.aggregator = aggregator
    self.sampler = sampler
    self.seed = seed
    self.system = (SystemModel(system, data.num_clients, seed)
                   if system is not None and system.active else None)
    if config.small_contractions is not None and config.small_contractions < 0:
      raise ValueError("EngineConfig.small_contractions must be >= 0 (0 = off) or None (per "
                       f"backend); got {config.small_contractions}.")
    self.config = config
    self.mesh = mesh or default_mesh()
    self.num_devices = self.mesh.devices.size
    self._on_cpu = all(d.platform == "cpu" for d in self.mesh.devices.flat)
    self.rows_per_device = -(-data.num_clients // self.num_devices)
    # Where the training data lives, and why (written to summary.json).
    stateless = algorithm.client_state_init is None and aggregator.client_state_init is None
    # Without per-client state, CPU devices can all alias the whole population, so any
    # device trains any client and the planner balances their work (core/resident.py).
    shared = stateless and shareable(data, self.mesh)
    self.placement = choose_placement(config.data_placement, data, self.mesh, shared=shared)
    # Each process measures its own memory; all must place the data alike.
    agree("data placement (set engine.data_placement to device or host)",
          f"{self.placement['data']} ({self.placement['layout']})")
    self.resident: ResidentData | None = (
        place(data, self.mesh, self.rows_per_device, shared=shared)
        if self.placement["data"] == "device" else None)
    chunk_bytes = config.max_chunk_bytes or (CPU_CHUNK_BYTES if self._on_cpu
                                             else ACCELERATOR_CHUNK_BYTES)
    streamed_slots = max(1, chunk_bytes // data.bytes_per_example)
    self.planner = Planner(batch_size=algorithm.local.batch_size, block_size=config.block_size,
                           num_devices=self.num_devices,
                           max_chunk_examples=(max(RESIDENT_CHUNK_SLOTS, streamed_slots)
                                               if self.resident else streamed_slots),
                           bucketing=config.bucketing,
                           # Per-client state, or resident data by owner: a client
                           # trains where its row is.
                           by_owner=(not stateless or (self.resident is not None
                                                       and not self.resident.shared)),
                           owner_rows=self.rows_per_device,
                           small_class_block=self._on_cpu)
    self._trace_counters: set[TraceCounter] = set()
    # The structure of one client's message and statistics (ShapeDtypeStructs)
    # and its exact upload size: derived from the server state by `init` (or
    # the first round), see `_learn_structure`.
    self.update_like: Any = None
    self.client_loop: str | None = None  # resolved with the message structure
    self.stats_like: dict[str, jax.ShapeDtypeStruct] | None = None
    self.upload_bits: int | None = None
    self.stateful = algorithm.client_state_init is not None
    self.stateful_aggregator = aggregator.client_state_init is not None
    self._sharded = NamedSharding(self.mesh, P(AXIS))
    self._replicated = NamedSharding(self.mesh, P())
    self._finish = jax.jit(self._finish_impl)
    self._accumulate = jax.jit(
        lambda acc, part: (aggregator.combine(acc[0], part[0]), tree_add(acc[1], part[1])),
        donate_argnums=(0,))
    self._train_key = jax.random.key_data(run_key(seed, Purpose.TRAIN))
    self._encode_key = jax.random.key_data(run_key(seed, Purpose.ENCODE))
    self._finalize_key = run_key(seed, Purpose.FINALIZE)

  # -- planning and host streaming --------------------------------------------

  def plan(self, round_num: int) -> RoundPlan:
    """Samples the round's cohort, applies dropouts and stragglers, and plans it."""
    ids = np.asarray(self.sampler(round_num), np.int64)
    local = self.algorithm.local
    if self.system is None:
      return self.planner.plan(round_num, ids, self.data.sizes[ids], local.epochs)
    per_epoch = np.maximum(1, -(-self.data.sizes[ids] // local.batch_size))
    part = self.system.apply(round_num, ids, per_epoch, local.epochs)
    plan = self.planner.plan(round_num, part.client_ids, self.data.sizes[part.client_ids],
                             local.epochs, part.step_limits)
    return dataclasses.replace(plan, sampled=part.sampled, dropped=part.dropped,
                               stragglers=part.stragglers)

  def _put_chunk(self, chunk: Chunk):
    """The chunk's program arguments on the devices: ids, plans and (streamed) its examples."""
    plan = (chunk.step_limits, chunk.blocks_used, chunk.block_steps.reshape(-1))
    ids = (chunk.client_ids.astype(np.int32), chunk.valid)
    if self.resident is not None:
      return to_devices(ids + plan, self._sharded)
    examples, mask = self.data.gather(chunk.client_ids, chunk.pad_to, valid=chunk.valid,
                                      finite=chunk.computed)
    return to_devices(ids + ((examples, mask),) + plan, self._sharded)

  def _arguments(self, arrays) -> tuple:
    """`_put_chunk`'s arrays in program order (the resident shards added)."""
    if self.resident is None:
      return arrays
    return arrays[:2] + (self.resident.arrays,) + arrays[2:]

  def stream(self, start: int, stop: int) -> Iterator[tuple[RoundPlan, Iterator]]:
    """Yields `(plan, chunks)` per round; a thread prepares chunks ahead.

    The thread samples, plans, gathers and transfers up to `prefetch` chunks
    ahead of the consumer, across round boundaries. Closing the generator
    stops the thread.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, self.config.prefetch))
    stop_event = threading.Event()

    def put(item):
      while not stop_event.is_set():
        try:
          q.put(item, timeout=0.1)
          return True
        except queue.Full:
          continue
      return False

    def produce():
      try:
        for r in range(start, stop):
          plan = self.plan(r)
          if not put(("plan", plan)):
            return
          for chunk in plan.chunks:
            if not put(("chunk", chunk, self._put_chunk(chunk))):
              return
      except BaseException as e:  # forwarded to the consumer
        put(("error", e))

    thread = threading.Thread(target=produce, daemon=True, name="fedjax_sim-prefetch")
    thread.start()

    def get():
      item = q.get()
      if item[0] == "error":
        raise item[1]
      return item

    try:
      for _ in range(start, stop):
        kind, plan = get()
        assert kind == "plan"

        def chunks(plan=plan):
          for _ in plan.chunks:
            _, chunk, arrays = get()
            yield chunk, arrays

        yield plan, chunks()
    finally:
      stop_event.set()
      thread.join(timeout=5)

  # -- the compiled programs ----------------------------------------------------

  def _program_key(self, num_blocks: int, block: int, pad_to: int) -> tuple:
    return (self.algorithm, self.aggregator, self.mesh, num_blocks, block, self.rows_per_device,
            self._encode_cache_bytes, self.client_loop,
            pad_to if self.resident is not None else None)

  @property
  def _encode_cache_bytes(self) -> int:
    """The encode sub-block budget where it applies: multi-pass stages on CPU devices.

    On an accelerator, sub-blocks would run one after another and leave the
    device underused; its passes stream from device memory either way.
    """
    return (self.config.encode_cache_bytes if self._on_cpu and self.aggregator.multi_pass_encode
            else 0)

  @property
  def small_contractions(self) -> int:
    """The contraction length traced as unrolled sums (0: off); see EngineConfig."""
    k = self.config.small_contractions
    return (contractions.CPU_MAX_K if self._on_cpu else 0) if k is None else k

  def _chunk_fn(self, num_blocks: int, block: int, pad_to: int) -> Callable:
    fn, counter = chunk_program(*self._program_key(num_blocks, block, pad_to))
    self._trace_counters.add(counter)
    return fn

  @property
  def traces(self) -> int:
    """Chunk programs traced (= compiled) for the shapes this engine used.

    Programs are shared by engines built from the same pieces, so a program
    another engine already traced counts here with that trace.
    """
    return sum(c.count for c in self._trace_counters)

  def _learn_structure(self, server_state) -> None:
    """Derives the message and statistics structure of one client, once per engine.

    `jax.eval_shape` of `client_update` (then the stage's `encode`) on a
    one-client dummy `ClientData` with one batch of the data's feature shapes:
    nothing runs, only shapes and dtypes are computed.
    """
    if self.update_like is not None:
      return
    alg, agg = self.algorithm, self.aggregator
    bcast, data, client_state = self.one_client_args(server_state)

    def one_client(bcast, data, client_state):
      key = jax.random.key(0)
      out = alg.client_update(bcast, data, client_state, key)
      weight = jnp.where(True, out.weight, 0.0)
      agg_client_state = agg.client_state_init(out.update) if self.stateful_aggregator else None
      _, _, bits = agg.encode(agg.init(out.update), out.update, weight, agg_client_state, key)
      return out.update, client_stats(out.metrics, out.update, bits, weight, data.mask)

    jaxpr, (self.update_like, self.stats_like) = jax.make_jaxpr(one_client, return_shape=True)(
        bcast, data, client_state)
    self.client_loop = client_loop(
        self.config.client_loop, jaxpr, self._on_cpu,
        flops=lambda: step_flops(one_client, bcast, data, client_state))  # one local step
    if agg.upload_bits is not None:  # exact integers instead of float32 sums
      self.upload_bits = int(agg.upload_bits(self.update_like))

  def one_client_args(self, server_state) -> tuple:
    """Abstract `(broadcast, data, client_state)` of one client on one batch.

    The dummy client the engine derives its message structure from (also the
    cost model's): one batch of the data's feature shapes, a dynamic step
    count and step limit, the broadcast of `server_state`, and the client
    state where the algorithm keeps one; ShapeDtypeStructs without
    shardings. Nothing runs.
    """
    alg = self.algorithm
    pad = alg.local.batch_size
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    data = ClientData(
        {k: jax.ShapeDtypeStruct((pad,) + tuple(shape), dtype)
         for k, (shape, dtype) in self.data.feature_specs.items()},
        jax.ShapeDtypeStruct((pad,), jnp.bool_), scalar, scalar)
    plain = lambda tree: jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), tree)
    bcast = plain(jax.eval_shape(alg.broadcast, server_state))
    client_state = (plain(jax.eval_shape(alg.client_state_init, alg.params_of(server_state)))
                    if self.stateful else None)
    return bcast, data, client_state

  def _update_zeros(self):
    """Zero arrays shaped like one client's message (what stage constructors receive)."""
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self.update_like)

  def _finish_impl(self, server_state, stage_state, acc, num_clients, key):
    return finish_round(self.algorithm, self.aggregator, server_state, stage_state, acc,
                        num_clients, key)

  # -- rounds ---------------------------------------------------------------

  def init(self, params) -> SimState:
    """The state of a run starting from `params`.

    The per-client store (for algorithms with `client_state_init`) is built
    on the devices, every client starting from `client_state_init(params)`;
    the stage's state and per-client store are sized by one client's message
    (`update_like`, learned here), not by the parameters.
    """
    params = jax.device_get(params)  # host values: every process starts from the same
    server = self.algorithm.server_init(params)
    self._learn_structure(server)
    update_zeros = jax.device_get(self._update_zeros())
    stage = self.aggregator.init(update_zeros)
    server, stage = to_devices(jax.device_get((server, stage)), self._replicated)
    rows = self.num_devices * self.rows_per_device

    def store(init, like):
      return jax.jit(
          lambda p: jax.tree.map(lambda x: jnp.broadcast_to(x, (rows,) + x.shape), init(p)),
          out_shardings=self._sharded)(like)

    clients = store(self.algorithm.client_state_init, params) if self.stateful else ()
    agg_clients = (store(self.aggregator.client_state_init, update_zeros)
                   if self.stateful_aggregator else ())
    return SimState(server=server, aggregator=stage, clients=clients,
                    aggregator_clients=agg_clients)

  def _store_rows(self, num_devices: int, rows_per_device: int,
                  layout: str = STORE_LAYOUT) -> np.ndarray:
    """Each client's row in a store laid out for `num_devices` devices.

    "range" (this version): client c at row c. "modulo" (checkpoints written
    before resident data): client c at `(c % n) * rows_per_device + c // n`.
    """
    ids = np.arange(self.data.num_clients, dtype=np.int64)
    if layout == "range":
      return ids
    if layout == "modulo":
      return (ids % num_devices) * rows_per_device + ids // num_devices
    raise ValueError(f"Unknown per-client store layout {layout!r} (known: range, modulo).")

  def store_like(self, state: SimState, num_devices: int, rows_per_device: int) -> SimState:
    """`state` with its per-client stores shaped for another layout (a restore target).

    The stores of a checkpoint written on `num_devices` devices have
    `num_devices * rows_per_device` rows; they are restored whole onto one
    device, then `relayout` moves each client's row to this engine's layout.
    """
    rows = num_devices * rows_per_device
    device = jax.sharding.SingleDeviceSharding(self.mesh.devices.flat[0])
    like = lambda a: jax.ShapeDtypeStruct((rows,) + a.shape[1:], a.dtype, sharding=device)
    return dataclasses.replace(state, clients=jax.tree.map(like, state.clients),
                               aggregator_clients=jax.tree.map(like, state.aggregator_clients))

  def relayout(self, state: SimState, num_devices: int, rows_per_device: int,
               layout: str = STORE_LAYOUT) -> SimState:
    """Moves per-client stores laid out for `num_devices` devices to this engine's layout.

    Client c's row on the old layout (`_store_rows`, "range" or the older
    "modulo") goes to row c of this one; server and stage states are
    re-placed replicated. The stores pass through host memory once.
    """
    old = self._store_rows(num_devices, rows_per_device, layout)
    new = self._store_rows(self.num_devices, self.rows_per_device)
    total = self.num_devices * self.rows_per_device

    def move(a):
      a = np.asarray(a)
      out = np.zeros((total,) + a.shape[1:], a.dtype)
      out[new] = a[old]
      return out

    clients, agg_clients = to_devices(
        jax.tree.map(move, (state.clients, state.aggregator_clients)), self._sharded)
    server, stage = to_devices(jax.device_get((state.server, state.aggregator)),
                               self._replicated)
    return SimState(server=server, aggregator=stage, clients=clients,
                    aggregator_clients=agg_clients)

  def client_state(self, state: SimState, client_ids) -> Any:
    """The stored per-client state of the given clients (host arrays).

    Each client's row is read on the device that holds it: only the asked
    rows travel to the host, never the whole store.
    """
    ids = np.asarray(client_ids, np.int64)
    if np.any((ids < 0) | (ids >= self.data.num_clients)):
      raise ValueError(f"client ids must be in [0, {self.data.num_clients}); got "
                       f"{ids[(ids < 0) | (ids >= self.data.num_clients)][:5].tolist()}.")
    owner, local = ids // self.rows_per_device, ids % self.rows_per_device

    def read(a):
      out = np.empty((len(ids),) + a.shape[1:], a.dtype)
      found = np.zeros(len(ids), bool)
      for shard in a.addressable_shards:
        d = (shard.index[0].start or 0) // self.rows_per_device
        mine = np.flatnonzero(owner == d)
        if len(mine):
          out[mine] = np.asarray(shard.data[jnp.asarray(local[mine])])
          found[mine] = True
      if not found.all():
        raise ValueError(f"clients {ids[~found][:5].tolist()} are stored by another process; "
                         "read them there (their owner device is id // rows_per_device).")
      return out

    return jax.tree.map(read, state.clients)

  def run_round(self, state: SimState, plan: RoundPlan, chunks) -> RoundResult:
    """Runs one planned round; `chunks` yields `(Chunk, device arrays)`."""
    t0 = time.perf_counter()
    r = plan.round_num
    server, stage = state.server, state.aggregator
    store = (state.clients, state.aggregator_clients)
    bcast = self.algorithm.broadcast(server)
    train_key = np.asarray(jax.random.key_data(
        jax.random.fold_in(jax.random.wrap_key_data(self._train_key), r)))
    encode_key = np.asarray(jax.random.key_data(
        jax.random.fold_in(jax.random.wrap_key_data(self._encode_key), r)))
    self._learn_structure(server)
    acc, records = None, []
    for chunk, arrays in chunks:
      fn = self._chunk_fn(chunk.num_blocks, chunk.block_size, chunk.pad_to)
      with contractions.unrolled_small_contractions(self.small_contractions):
        part, record, store = fn(bcast, stage, store, *self._arguments(arrays), train_key,
                                 encode_key)
      acc = part if acc is None else self._accumulate(acc, part)
      records.append((chunk, record))
    if acc is None and self.aggregator.always_finalize:  # nobody took part, yet noise is due
      # The identity message and zero statistics of the chunk programs' structure.
      acc = (self.aggregator.zeros(self._update_zeros()),
             {k: jnp.zeros(s.shape, s.dtype) for k, s in self.stats_like.items()})
      acc = jax.tree.map(lambda x: np.asarray(x)[None], jax.device_get(acc))
    if acc is None:  # nobody took part: the model is unchanged
      metrics = {"clients": 0.0}
    else:
      # Per-device partial sums -> one sum, added on the host in device order
      # (model-sized, once per round; deterministic for a given device count).
      summed = jax.tree.map(lambda a: np.sum(a, axis=0), to_host(acc))
      finalize_key = np.asarray(jax.random.key_data(jax.random.fold_in(self._finalize_key, r)))
      server, stage, stats = self._finish(
          server, stage, to_devices(summed, self._replicated), np.float32(plan.num_clients),
          finalize_key)
      metrics = {k: float(v) for k, v in to_host(stats).items()}
      if self.upload_bits is not None:  # exact integers instead of float32 sums
        metrics["bits"] = float(self.upload_bits * int(round(metrics.get("uploads", 0.0))))
    clients = _client_records(records)
    seconds = time.perf_counter() - t0
    metrics.update(_derived_metrics(metrics, plan, seconds))
    return RoundResult(r, SimState(server=server, aggregator=stage, clients=store[0],
                                   aggregator_clients=store[1]), metrics, clients)

  def rounds(self, state: SimState, start: int, stop: int) -> Iterator[RoundResult]:
    """Runs rounds `start..stop-1`, yielding each result as it completes."""
    for plan, chunks in self.stream(start, stop):
      result = self.run_round(state, plan, chunks)
      state = result.state
      yield result


def finish_round(algorithm: Algorithm, aggregator: Aggregator, server_state, stage_state, acc,
                 num_clients, key):
  """The server's end of a round: the stage's `finalize`, then `server_update`.

  Args:
    algorithm, aggregator: the round's algorithm and stage.
    server_state, stage_state: their states before the round.
    acc: `(message sum, statistic sums)` over the round's clients.
    num_clients: the clients that trained (float32 scalar).
    key: the round's finalize key data (`Purpose.FINALIZE` folded with the round).

  Returns:
    `(server_state, stage_state, stats)`: the statistics summed with the
    stage's metrics, the aggregate's norm and `model_finite`.
  """
  key = jax.random.wrap_key_data(key)
  message, stats = acc
  aggregate, stage_state, stage_metrics = aggregator.finalize(
      stage_state, message, num_clients, key)
  # The server sees what the stage releases only, never raw client statistics.
  info = {k: stage_metrics[k] for k in aggregator.released if k in stage_metrics}
  new_state = algorithm.server_update(server_state, aggregate, info)
  stats = dict(stats)
  stats.update(stage_metrics)
  stats["update_norm"] = global_norm(aggregate)
  # One scalar per round tells the runner whether the model diverged.
  stats["model_finite"] = jnp.all(jnp.asarray([
      jnp.all(jnp.isfinite(x)) for x in
      jax.tree.leaves(algorithm.params_of(new_state))])).astype(jnp.float32)
  return new_state, stage_state, stats


def _client_records(records) -> dict[str, np.ndarray]:
  """The round's per-client record (valid slots only), chunk after chunk."""
  keys = ("client_id",) + CLIENT_RECORD
  if not records:
    return {k: np.zeros(0, np.int64 if k == "client_id" else np.float32) for k in keys}
  host = to_host([r for _, r in records])
  out = {"client_id": np.concatenate([c.client_ids[c.valid] for c, _ in records])}
  for k in host[0]:
    out[k] = np.concatenate([np.asarray(h[k])[c.valid] for (c, _), h in zip(records, host)])
  return out


def _derived_metrics(m: dict[str, float], plan: RoundPlan, seconds: float) -> dict[str, float]:
  sampled = plan.num_clients if plan.sampled < 0 else plan.sampled
  out = {"round_seconds": seconds, "sampled_clients": float(sampled),
         "dropped_clients": float(plan.dropped), "straggling_clients": float(plan.stragglers),
         "round_failed": float(plan.num_clients == 0),  # nobody trained: model unchanged
         "padding_efficiency": plan.padding_efficiency,
         "clients_per_second": plan.num_clients / seconds if seconds > 0 else 0.0}
  examples = m.get("examples", 0.0)
  out["examples_per_second"] = examples / seconds if seconds > 0 else 0.0
  if examples > 0:
    out["train_loss"] = m["loss_sum"] / examples
    for k in list(m):
      if k.endswith("_sum") and k not in ("loss_sum", "update_norm_sum"):
        denominator = m.get(f"{k[:-4]}_count", examples)  # ratio metrics carry their own
        if denominator > 0:
          out[f"train_{k[:-4]}"] = m[k] / denominator
  clients = m.get("clients", 0.0)
  if clients > 0:
    out["mean_client_update_norm"] = m["update_norm_sum"] / clients
    out["bits_per_client"] = m["bits"] / max(m.get("uploads", clients), 1.0)
  return out
