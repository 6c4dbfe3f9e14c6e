"""Round planning: sampled clients -> fixed-shape chunks of step-homogeneous blocks.

Two kinds of padding are kept apart:

* Buffer padding (shapes). A chunk's arrays have a static shape
  `[capacity, pad_to, ...]`: `pad_to` is the client's step count rounded up to
  a power of two (times the batch size), and `capacity` comes from a short
  ladder (powers of two). Only these pairs are compiled, so a cohort whose size
  (Poisson sampling) or composition (heterogeneous sizes) changes every round
  reuses a handful of programs. Unused slots are zeros and are never computed.
* Compute padding (work). Inside a chunk, clients are sorted by step count and
  cut into blocks of `block_size`; each block runs only as many local steps as
  its largest client (a dynamic count), and each device runs only its used
  blocks (also dynamic). The only wasted work is the difference between a
  client's steps and its block's maximum, and the empty lanes of a device's
  last block.

`padding_efficiency` = real examples / example slots computed (both over all
epochs): the fraction of the round's work that is real.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Chunk:
  """A fixed-shape slice of a round, laid out device-major.

  Slot `d * (capacity // num_devices) + j` belongs to device `d`. Device `d`
  processes its first `blocks_used[d]` blocks, block `i` for
  `block_steps[d, i]` local steps per epoch.
  """

  client_ids: np.ndarray  # [capacity] int64 (unused slots: 0)
  valid: np.ndarray  # [capacity] bool
  pad_to: int  # example slots per client
  num_blocks: int  # blocks per device (static)
  block_size: int
  blocks_used: np.ndarray  # [num_devices] int32
  block_steps: np.ndarray  # [num_devices, num_blocks] int32
  real_examples: int
  computed_examples: int
  step_limits: np.ndarray  # [capacity] int32, local steps allowed per client

  @property
  def capacity(self) -> int:
    return len(self.client_ids)

  @property
  def num_clients(self) -> int:
    return int(self.valid.sum())

  @property
  def computed(self) -> np.ndarray:
    """[capacity] bool: slots inside a used block (computed, so must be finite)."""
    per_device = self.capacity // len(self.blocks_used)
    slot = np.arange(per_device)
    inside = slot[None, :] < (self.blocks_used[:, None] * self.block_size)
    return inside.reshape(-1)


@dataclasses.dataclass(frozen=True)
class RoundPlan:
  round_num: int
  client_ids: np.ndarray  # the clients that train, sorted
  chunks: tuple[Chunk, ...]
  real_examples: int  # summed over epochs
  computed_examples: int  # summed over epochs
  sampled: int = -1  # the sampled cohort's size (-1: = len(client_ids))
  dropped: int = 0  # sampled clients that failed to report
  stragglers: int = 0  # sampled clients that straggled

  @property
  def num_clients(self) -> int:
    return len(self.client_ids)

  @property
  def padding_efficiency(self) -> float:
    return self.real_examples / self.computed_examples if self.computed_examples else 1.0


def _pow2_at_least(x: np.ndarray) -> np.ndarray:
  x = np.maximum(np.asarray(x, np.int64), 1)
  return (1 << np.ceil(np.log2(x)).astype(np.int64)).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class Planner:
  """Turns a cohort into chunks.

  Attributes:
    batch_size: local batch size; a client with n examples runs
      `ceil(n / batch_size)` steps per epoch (at least 1).
    block_size: clients vmapped together on one device.
    num_devices: devices a chunk is sharded over.
    max_chunk_examples: example slots in one chunk at most (bounds host and
      device buffers); a chunk holds at least one block per device.
    bucketing: sort clients into step-homogeneous blocks (True), or keep the
      sampled order and run every block for the round's largest step count
      (False: the naive baseline).
    min_block: the smallest block, used for small groups of clients.
    full_block_steps: classes of up to this many steps use full blocks;
      longer classes use proportionally smaller ones. 16: a block then holds
      at most `block_size x 16 x batch_size` example slots (64 x 128 at the
      default sizes), so a class of long clients does not gather a block of
      64 clients' whole padded examples (16 MiB at 1,024 examples) and read
      it step by step from memory. It replaced 8 after comparing 4, 8, 16
      and 32 with the heterogeneous cell of `experiments/benchmarks/
      throughput.py` (its rounds alternating with the equal-size cell's, W1,
      10,000 log-normal clients per round, resident data, 2 CPU devices; a
      script around the benchmark, so no figure is quoted): 16 gave the
      highest examples/s ratio for logistic regression in every run, a
      slightly lower one (about the run-to-run spread) for the MLP. The
      benchmark's figures are in the README (Round throughput,
      heterogeneous sizes).
    by_owner: run every client on the device that owns its per-client state
      and its resident data (`id // owner_rows`); otherwise blocks are dealt
      to balance the devices' summed steps (`_deal`).
    owner_rows: clients per device in the by-owner layout (contiguous id
      ranges: device d owns ids `[d * owner_rows, (d + 1) * owner_rows)`).
    min_chunk_fraction: a chunk has at least `max_chunk_examples /
      min_chunk_fraction` example slots (unless its class's top rung is
      smaller). Unused slots cost buffer space, never compute, so small
      classes whose client counts change every round keep one static shape:
      on the quickstart this takes the programs compiled over 150 rounds from
      13 to 7 for 17 MiB more buffer per round.
    small_class_block: a class of at most half a block per device uses the
      smallest block (one shape whatever its size). Right for CPU devices,
      where a narrow block costs no more per client; an accelerator runs the
      blocks one after another, so the engine turns it off there.
  """

  batch_size: int
  block_size: int
  num_devices: int = 1
  max_chunk_examples: int = 1 << 18
  bucketing: bool = True
  min_block: int = 8
  full_block_steps: int = 16
  by_owner: bool = False
  owner_rows: int = 0
  min_chunk_fraction: int = 4
  small_class_block: bool = True

  def __post_init__(self):
    for name in ("batch_size", "block_size", "num_devices", "max_chunk_examples"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}.")
    if self.by_owner and self.owner_rows < 1:
      raise ValueError("by_owner planning needs owner_rows >= 1 (clients per device).")

  @property
  def quantum(self) -> int:
    """Clients in one full block on every device."""
    return self.num_devices * self.block_size

  def round_block(self, num_clients: int) -> int:
    """The block size for a cohort: `block_size`, smaller for tiny cohorts."""
    per_device = -(-max(num_clients, 1) // self.num_devices)
    return int(min(self.block_size, max(min(self.min_block, self.block_size),
                                        _pow2_at_least(per_device))))

  def blocks_per_device(self, pad_to: int, block: int) -> list[int]:
    """The ladder of static blocks-per-device counts for a size class (x2 steps).

    Unused blocks cost buffer space but no compute (their count is dynamic),
    so the ladder can be coarse: it starts at the rung that fills
    `1 / min_chunk_fraction` of a chunk, and its top is bounded by
    `max_chunk_examples`.
    """
    per_block = pad_to * block * self.num_devices
    top = max(1, self.max_chunk_examples // per_block)
    floor = min(top, max(1, self.max_chunk_examples // self.min_chunk_fraction // per_block))
    ladder = [floor]
    while ladder[-1] * 2 <= top:
      ladder.append(ladder[-1] * 2)
    if ladder[-1] < top:
      ladder.append(top)
    return ladder

  def class_block(self, step_class: int, num_clients: int) -> int:
    """Block size for a size class of `num_clients` clients.

    A block costs `block x steps` whatever its members' own step counts, so
    classes above `full_block_steps` steps use proportionally smaller blocks
    (the tail of a heavy-tailed size distribution then wastes little), and a
    class of at most half a block per device uses the smallest block (one
    shape for every such class, whatever its size this round).
    """
    smallest = min(self.min_block, self.block_size)
    if self.small_class_block and num_clients <= self.quantum // 2:
      return smallest  # a small class: one block shape, however many it holds
    shrink = max(1, step_class // self.full_block_steps)
    return int(max(smallest, self.round_block(num_clients) // shrink))

  def plan(self, round_num: int, client_ids, sizes, epochs: int = 1,
           step_limits=None) -> RoundPlan:
    """Plans one round.

    Clients are grouped by the power-of-two class of their step count, sorted
    by step count (most first) within a class, and cut into blocks of
    consecutive clients; each block runs its first (largest) client's step
    count. Blocks are dealt to the devices to balance their summed steps
    (`_deal`), or (`by_owner`) every client runs on the device that owns its
    state or data (`id // owner_rows`);
    chunks take up to a ladder count (powers of two) of blocks per device.

    Args:
      round_num: the round index.
      client_ids: the sampled cohort.
      sizes: the number of training examples of each sampled client.
      epochs: local epochs (scales the example counts).
      step_limits: optional local-step budget of each client (stragglers).
    """
    ids = np.asarray(client_ids, np.int64)
    sizes = np.asarray(sizes, np.int64)
    n = len(ids)
    limits = (np.full(n, np.iinfo(np.int32).max, np.int32) if step_limits is None
              else np.asarray(step_limits, np.int32))
    if n == 0:
      return RoundPlan(round_num, ids, (), 0, 0)
    steps = np.maximum(1, -(-sizes // self.batch_size))
    if self.bucketing:
      step_class = _pow2_at_least(steps)
      order = np.lexsort((ids, -steps))  # most steps first, ties by id
    else:  # the naive baseline: sampled order, everyone padded to the round's maximum
      step_class = np.full(n, _pow2_at_least(steps.max()))
      order = np.arange(n)
    owner = ids // max(self.owner_rows, 1)
    step_of = (lambda b: int(steps[b[0]])) if self.bucketing else (lambda b: int(steps.max()))
    chunks = []
    for cls in np.unique(step_class)[::-1]:
      members = order[step_class[order] == cls]
      pad_to = int(cls) * self.batch_size
      block = self.class_block(int(cls), len(members)) if self.bucketing else self.round_block(n)
      if self.by_owner:
        # Each client runs on the device that owns it (id // owner_rows), where
        # its per-client state (or resident data) lives; sampled ids are random,
        # so this balances, at the cost of one partial block per device and class.
        per_dev = []
        for d in range(self.num_devices):
          mine = members[owner[members] == d]
          per_dev.append([(b, step_of(b)) for b in
                          (mine[i:i + block] for i in range(0, len(mine), block))])
      else:  # one partial block per class, dealt to balance the devices' work
        blocks = [members[i:i + block] for i in range(0, len(members), block)]
        per_dev = self._deal([(b, step_of(b)) for b in blocks])
      ladder = self.blocks_per_device(pad_to, block)
      first = 0
      most = max(len(b) for b in per_dev)
      while first < most:
        per_device = next((c for c in ladder if c >= most - first), ladder[-1])
        take = [b[first:first + per_device] for b in per_dev]
        first += per_device
        chunks.append(self._chunk(take, ids, sizes, limits, pad_to, block, per_device))
    real = int(sizes.sum()) * epochs
    computed = sum(c.computed_examples for c in chunks) * epochs
    return RoundPlan(round_num, ids, tuple(chunks), real, computed)

  def _deal(self, blocks: list) -> list[list]:
    """Deals `(block, steps)` pairs, most steps first, each to the device with the least
    work (summed steps) so far, ties to the lowest index: the devices of a chunk run
    in step with each other (a chunk ends when its slowest device does), so this
    keeps them busy alike. Blocks of equal steps alternate, as round-robin would."""
    load = [0] * self.num_devices
    per_dev: list[list] = [[] for _ in range(self.num_devices)]
    for b, steps in blocks:
      d = load.index(min(load))
      per_dev[d].append((b, steps))
      load[d] += steps
    return per_dev

  def _chunk(self, dev_blocks, ids, sizes, limits, pad_to, block, per_device) -> Chunk:
    n_dev = self.num_devices
    capacity = n_dev * per_device * block
    slot_ids = np.zeros(capacity, np.int64)
    slot_limits = np.zeros(capacity, np.int32)
    valid = np.zeros(capacity, bool)
    used = np.zeros(n_dev, np.int32)
    steps_out = np.zeros((n_dev, per_device), np.int32)
    computed = real = 0
    for d, blocks in enumerate(dev_blocks):
      used[d] = len(blocks)
      for i, (who, step_count) in enumerate(blocks):
        at = (d * per_device + i) * block
        slot_ids[at:at + len(who)] = ids[who]
        slot_limits[at:at + len(who)] = limits[who]
        valid[at:at + len(who)] = True
        steps_out[d, i] = step_count
        computed += block * step_count * self.batch_size
        real += int(np.minimum(sizes[who], pad_to).sum())
    return Chunk(slot_ids, valid, pad_to, per_device, block, used, steps_out, real, computed,
                 slot_limits)
