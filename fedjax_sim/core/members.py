"""Rounds of several runs ("members" of a sweep) as one compiled program over a member axis.

M members share the structure of a round: the same model, the same
algorithm and aggregation stage *up to scalar hyperparameters*, equal client
counts and feature shapes, and the same engine settings. They differ in
their seed (cohorts, training, encoding and noise keys, the initial model,
possibly the population's contents) and in scalars that enter the program
as traced values, never as Python constants (an algorithm's
hyperparameters, a DP stage's clip norm and noise multiplier): `build(h)`
makes the `(Algorithm, Aggregator)` of one member from a dict of float32
scalars `h` *inside* the traced function, so one compilation serves every
member, and every grid value.

Each member keeps its own `Engine` for everything on the host: it samples
and plans its round exactly as a separate run does (`Engine.plan`), holds
its population (streamed data is gathered from it) and its keys. A round of
all members is then:

    for each chunk index k (the members' k-th chunks, padded to one shape):
      shard_map over the mesh axis 'clients':
        vmap over members (states, plans, keys, hyperparameters; resident data shared):
          alg, stage = build(h)
          program.device_program(alg, stage, ...)   # the single-run chunk body
    per-device partial sums -> summed on the host, per member
    vmap over members: finalize + server_update (engine.finish_round)

Padding to one shape changes buffers, not work: a member's block of `b`
clients sits in the first `b` slots of a block of the common size, its
`num_blocks` blocks in the first rows of the common count, its `pad_to`
example slots in the first of the common `pad_to` (local training is exact
under padding, `core/local.py`), and every block keeps its own dynamic step
count. Under `vmap` the dynamic loops run to the largest member's count,
the others' extra iterations masked out. Clients train with the keys a
separate run gives them (`fold_in(fold_in(key, round), id)`), on the same
device (the planner's layout is kept), so a member equals a separate run of
it up to the order of float32 summation. Members may even be at different
rounds (a resumed sweep): each call takes one round number per member.

References: the member axis is `jax.vmap` over the single-run program, the
"vmap over hyperparameters" of e.g. Flax/optax examples, applied to whole FL
rounds; the sharding is the engine's (`core/program.py`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from fedjax_sim.core import contractions
from fedjax_sim.core.aggregation import Aggregator, tree_add
from fedjax_sim.core.algorithm import Algorithm
from fedjax_sim.core.distributed import to_devices, to_host
from fedjax_sim.core.engine import (Engine, RoundResult, SimState, _client_records,
                                    _derived_metrics, finish_round)
from fedjax_sim.core.plan import Chunk
from fedjax_sim.core.program import AXIS, TraceCounter, device_program

Build = Callable[[dict], tuple[Algorithm, Aggregator]]


class MemberError(ValueError):
  """The engines cannot run as one program (the message says what differs)."""


@dataclasses.dataclass(frozen=True)
class _Slots:
  """One member's part of a merged chunk, as `engine._client_records` reads it."""

  client_ids: np.ndarray
  valid: np.ndarray


def merge_chunks(chunks: Sequence[Chunk | None], num_devices: int) -> dict[str, np.ndarray]:
  """The members' chunks (None: no chunk) laid out in one common shape.

  The common shape takes the largest block size and `pad_to`, and as many
  blocks per device as the busiest member uses (rounded up to a power of
  two). Member m's block i of device d fills the first slots of block i of
  device d; its block steps and used-block counts are kept, so it does the
  same work as alone.

  Returns:
    `ids` int64, `valid` bool, `limits` int32 (each `[M, capacity]`),
    `blocks_used` int32 `[M, num_devices]`, `block_steps` int32
    `[M, num_devices * num_blocks]`, and the shape `num_blocks`, `block`,
    `pad_to` (ints).
  """
  present = [c for c in chunks if c is not None]
  # Only used blocks are computed, so the common count is the most any member uses (a power
  # of two, bounding the compiled shapes), not the planner's ladder rung: a chunk's unused
  # buffer would cost M times its bytes here, gathered and transferred.
  used_max = max(int(c.blocks_used.max()) for c in present)
  nb = max(1, min(max(c.num_blocks for c in present), 1 << max(0, used_max - 1).bit_length()))
  block = max(c.block_size for c in present)
  pad_to = max(c.pad_to for c in present)
  m, d = len(chunks), num_devices
  ids = np.zeros((m, d, nb, block), np.int64)
  valid = np.zeros((m, d, nb, block), bool)
  limits = np.zeros((m, d, nb, block), np.int32)
  used = np.zeros((m, d), np.int32)
  steps = np.zeros((m, d, nb), np.int32)
  for i, c in enumerate(chunks):
    if c is None:
      continue
    shape = (d, c.num_blocks, c.block_size)
    k = min(c.num_blocks, nb)  # blocks from k on are unused
    ids[i, :, :k, :c.block_size] = c.client_ids.reshape(shape)[:, :k]
    valid[i, :, :k, :c.block_size] = c.valid.reshape(shape)[:, :k]
    limits[i, :, :k, :c.block_size] = c.step_limits.reshape(shape)[:, :k]
    used[i] = c.blocks_used
    steps[i, :, :k] = c.block_steps[:, :k]
  return {"ids": ids.reshape(m, -1), "valid": valid.reshape(m, -1),
          "limits": limits.reshape(m, -1), "blocks_used": used,
          "block_steps": steps.reshape(m, -1), "num_blocks": nb, "block": block,
          "pad_to": pad_to}


class MemberRounds:
  """Runs rounds of M members in lockstep, one compiled program call per chunk index.

  Args:
    engines: one per member, each built as for a separate run (its sampler,
      planner, population, keys and system model are used on the host; its
      algorithm and stage give the message structure, which must be equal).
      `Engine.init` must have run on each (it learns that structure).
    build: `build(h) -> (algorithm, stage)` for one member's hyperparameters
      `h` (a dict of float32 scalars, traced inside the program). It must
      build what the member's engine holds when `h` is that member's values.
    hyperparameters: name -> `[M]` values (may be empty: members differing
      only in their seed).

  Raises:
    MemberError: the engines differ in something the program's shape or
      layout depends on.
  """

  def __init__(self, engines: Sequence[Engine], build: Build,
               hyperparameters: dict[str, Sequence[float]]):
    if not engines:
      raise MemberError("no members")
    self.engines = list(engines)
    self.build = build
    self.num_members = len(engines)
    self.hyperparameters = {k: np.asarray(v, np.float32) for k, v in hyperparameters.items()}
    for k, v in self.hyperparameters.items():
      if v.shape != (self.num_members,):
        raise MemberError(f"hyperparameter {k!r} has {v.shape} values for "
                          f"{self.num_members} members")
    e0 = self.engines[0]
    self.mesh = e0.mesh
    for i, e in enumerate(self.engines):
      if e.update_like is None:
        raise MemberError(f"member {i}'s engine has not run init()")
    for i, e in enumerate(self.engines[1:], 1):
      for what, a, b in (
          ("device mesh", e.mesh, e0.mesh), ("clients", e.data.num_clients, e0.data.num_clients),
          ("feature shapes", e.data.feature_specs, e0.data.feature_specs),
          ("message structure", jax.tree.structure(e.update_like),
           jax.tree.structure(e0.update_like)),
          ("message shapes", [(x.shape, x.dtype) for x in jax.tree.leaves(e.update_like)],
           [(x.shape, x.dtype) for x in jax.tree.leaves(e0.update_like)]),
          ("client loop", e.client_loop, e0.client_loop),
          ("batch size", e.algorithm.local.batch_size, e0.algorithm.local.batch_size),
          ("encode sub-blocks", e._encode_cache_bytes, e0._encode_cache_bytes)):
        if a != b:
          raise MemberError(f"member {i} differs from member 0 in its {what} ({b} vs {a})")
    # One population for all: the resident shards of the first engine serve every member.
    self.shared_data = all(e.data is e0.data for e in self.engines)
    self.resident = e0.resident if self.shared_data else None
    self._rep = NamedSharding(self.mesh, P())
    self._members_sharded = NamedSharding(self.mesh, P(None, AXIS))
    self._programs: dict[tuple, tuple[Callable, TraceCounter]] = {}
    h = self.hyperparameters
    key_data = lambda attr: np.stack([np.asarray(getattr(e, attr)) for e in self.engines])
    self._keys = (key_data("_train_key"), key_data("_encode_key"),
                  np.stack([np.asarray(jax.random.key_data(e._finalize_key))
                            for e in self.engines]))
    self._h = to_devices(h, self._rep)

    def round_keys(keys, rounds):
      fold = jax.vmap(lambda k, r: jax.random.key_data(
          jax.random.fold_in(jax.random.wrap_key_data(k), r)))
      return tuple(fold(k, rounds) for k in keys)

    def broadcast(hp, server):
      return jax.vmap(lambda h1, s: build(h1)[0].broadcast(s))(hp, server)

    always = e0.aggregator.always_finalize

    def finish(hp, server, stage, acc, num_clients, keys, active):
      def one(h1, server, stage, acc, n, key, act):
        alg, agg = build(h1)
        new_server, new_stage, stats = finish_round(alg, agg, server, stage, acc, n, key)
        if always:  # every member finalizes every round (DP: noise is due even when empty)
          return new_server, new_stage, stats
        # A member nobody trained in keeps its state (as the engine skips finalize).
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(act, a, b), new, old)
        return keep(new_server, server), keep(new_stage, stage), stats
      return jax.vmap(one)(hp, server, stage, acc, num_clients, keys, active)

    combine = e0.aggregator.combine  # a sum: no hyperparameter enters it
    self._round_keys = jax.jit(round_keys)
    self._broadcast = jax.jit(broadcast)
    self._finish = jax.jit(finish)
    self._accumulate = jax.jit(jax.vmap(
        lambda acc, part: (combine(acc[0], part[0]), tree_add(acc[1], part[1]))),
        donate_argnums=(0,))
    self._stack_fn = None
    self._unstack_fn = None

  def subset(self, members: Sequence[int]) -> "MemberRounds":
    """A driver over some of the members (their engines, build and hyperparameters)."""
    return MemberRounds([self.engines[i] for i in members], self.build,
                        {k: v[list(members)] for k, v in self.hyperparameters.items()})

  # -- states -----------------------------------------------------------------

  def _state_shardings(self, state: SimState, sharded) -> SimState:
    return SimState(server=jax.tree.map(lambda _: self._rep, state.server),
                    aggregator=jax.tree.map(lambda _: self._rep, state.aggregator),
                    clients=jax.tree.map(lambda _: sharded, state.clients),
                    aggregator_clients=jax.tree.map(lambda _: sharded, state.aggregator_clients))

  def stack(self, states: Sequence[SimState]) -> SimState:
    """The members' states as one state with a leading member axis (on the devices)."""
    if len(states) != self.num_members:
      raise MemberError(f"{len(states)} states for {self.num_members} members")
    if self._stack_fn is None:
      out = self._state_shardings(states[0], self._members_sharded)
      self._stack_fn = jax.jit(lambda ss: jax.tree.map(lambda *xs: jnp.stack(xs), *ss),
                               out_shardings=out)
    return self._stack_fn(list(states))

  def unstack(self, stacked: SimState) -> list[SimState]:
    """Each member's state, laid out as its own engine lays out a run's state."""
    if self._unstack_fn is None:
      one = self._state_shardings(stacked, NamedSharding(self.mesh, P(AXIS)))
      self._unstack_fn = jax.jit(
          lambda s: [jax.tree.map(lambda x: x[m], s) for m in range(self.num_members)],
          out_shardings=[one] * self.num_members)
    return self._unstack_fn(stacked)

  # -- the compiled program -----------------------------------------------------

  def _program(self, num_blocks: int, block: int, pad_to: int) -> Callable:
    resident_pad_to = pad_to if self.resident is not None else None
    key = (num_blocks, block, resident_pad_to)
    if key in self._programs:
      return self._programs[key][0]
    e0 = self.engines[0]
    counter = TraceCounter()
    build = self.build
    args = (num_blocks, block, e0.rows_per_device, e0._encode_cache_bytes, e0.client_loop,
            resident_pad_to, counter)

    def per_device(hp, bcast, stage, store, ids, valid, data, limits, used, steps, tk, ek):
      def one(h1, bcast, stage, store, ids, valid, data, limits, used, steps, tk, ek):
        alg, agg = build(h1)
        return device_program(alg, agg, *args)(bcast, stage, store, ids, valid, data, limits,
                                               used, steps, tk, ek)
      data_axis = None if resident_pad_to else 0
      return jax.vmap(one, in_axes=(0,) * 6 + (data_axis,) + (0,) * 5)(
          hp, bcast, stage, store, ids, valid, data, limits, used, steps, tk, ek)

    m = P(None, AXIS)
    fn = jax.jit(jax.shard_map(
        per_device, mesh=self.mesh,
        in_specs=(P(), P(), P(), m, m, m, P(AXIS) if resident_pad_to else m, m, m, m, P(), P()),
        out_specs=(m, m, m), check_vma=False), donate_argnums=(3,))
    self._programs[key] = (fn, counter)
    return fn

  @property
  def traces(self) -> int:
    """Member programs traced (= compiled) so far."""
    return sum(c.count for _, c in self._programs.values())

  # -- rounds -------------------------------------------------------------------

  def run_round(self, stacked: SimState, rounds: Sequence[int]
                ) -> tuple[SimState, list[RoundResult]]:
    """Runs round `rounds[m]` of every member m.

    Returns:
      The stacked state after the round and one `RoundResult` per member
      whose `state` is None (`unstack` gives the states; reading them costs a
      dispatch, so the runner does it only on evaluation and checkpoint
      rounds). `round_seconds` is the time of the whole lockstep round.
    """
    t0 = time.perf_counter()
    e0, m_count = self.engines[0], self.num_members
    plans = [e.plan(r) for e, r in zip(self.engines, rounds)]
    train_keys, encode_keys, finalize_keys = self._round_keys(
        self._keys, np.asarray(rounds, np.uint32))
    server, stage = stacked.server, stacked.aggregator
    store = (stacked.clients, stacked.aggregator_clients)
    bcast = self._broadcast(self._h, server)
    acc, records = None, []
    for k in range(max(len(p.chunks) for p in plans)):
      merged = merge_chunks([p.chunks[k] if k < len(p.chunks) else None for p in plans],
                            e0.num_devices)
      arrays = [merged["ids"].astype(np.int32), merged["valid"]]
      if self.resident is None:  # streamed: each member's clients from its own population
        gathered = [e.data.gather(merged["ids"][i], merged["pad_to"], valid=merged["valid"][i])
                    for i, e in enumerate(self.engines)]
        arrays.append(jax.tree.map(lambda *xs: np.stack(xs), *gathered))
      arrays += [merged["limits"], merged["blocks_used"], merged["block_steps"]]
      arrays = to_devices(tuple(arrays), self._members_sharded)
      if self.resident is not None:
        arrays = arrays[:2] + (self.resident.arrays,) + arrays[2:]
      fn = self._program(merged["num_blocks"], merged["block"], merged["pad_to"])
      with contractions.unrolled_small_contractions(e0.small_contractions):
        part, record, store = fn(self._h, bcast, stage, store, *arrays, train_keys,
                                 encode_keys)
      acc = part if acc is None else self._accumulate(acc, part)
      records.append((merged, record))
    always = e0.aggregator.always_finalize
    active = np.asarray([p.num_clients > 0 or always for p in plans])
    metrics = [{"clients": 0.0} for _ in plans]
    if acc is None and always:  # nobody took part, yet noise is due
      zeros = (e0.aggregator.zeros(e0._update_zeros()),
               {k: jnp.zeros(s.shape, s.dtype) for k, s in e0.stats_like.items()})
      acc = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (m_count, 1) + x.shape),
                         jax.device_get(zeros))
    if acc is not None:
      # Per-device partials -> one sum per member, added on the host in device order.
      summed = jax.tree.map(lambda a: np.sum(a, axis=1), to_host(acc))
      server, stage, stats = self._finish(
          self._h, server, stage, to_devices(summed, self._rep),
          np.asarray([p.num_clients for p in plans], np.float32), finalize_keys, active)
      stats = to_host(stats)
      for i in np.flatnonzero(active):
        metrics[i] = {k: float(v[i]) for k, v in stats.items()}
        if e0.upload_bits is not None:
          metrics[i]["bits"] = float(e0.upload_bits * int(round(metrics[i].get("uploads", 0.0))))
    host_records = to_host([r for _, r in records])
    seconds = time.perf_counter() - t0
    results = []
    for i, (plan, r) in enumerate(zip(plans, rounds)):
      mine = [(_Slots(mg["ids"][i], mg["valid"][i]), {k: v[i] for k, v in rec.items()})
              for (mg, _), rec in zip(records, host_records)]
      clients = _client_records(mine)  # records already on the host: no transfer
      metrics[i].update(_derived_metrics(metrics[i], plan, seconds))
      results.append(RoundResult(r, None, metrics[i], clients))
    new = SimState(server=server, aggregator=stage, clients=store[0],
                   aggregator_clients=store[1])
    return new, results


__all__ = ["MemberError", "MemberRounds", "merge_chunks"]
