"""Round planning: sampled clients -> padded, bucketed, fixed-shape chunks.

A round's clients are grouped by how many local steps they run (bucketing);
each group is padded only to its own ladder level, and split into chunks whose
sizes come from a short ladder of powers of two. Every chunk shape the engine
sees is therefore one of a small, bounded set: compiled programs are reused
round after round even when the cohort size (Poisson sampling) or the client
sizes vary. Padded client slots carry `valid=False` and weigh nothing.

Padding efficiency = real examples / example slots processed (padded clients
included), reported per round.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class Chunk:
  """A fixed-shape slice of a round: `num_blocks x block_size` clients per device."""

  client_ids: np.ndarray  # [C] int64, padded slots repeat a real id
  valid: np.ndarray  # [C] bool
  pad_to: int  # examples per client slot
  num_blocks: int  # blocks per device
  block_size: int  # clients per block
  real_examples: int

  @property
  def size(self) -> int:
    return len(self.client_ids)


@dataclasses.dataclass(frozen=True)
class RoundPlan:
  round_num: int
  client_ids: np.ndarray  # the sampled cohort, sorted
  chunks: tuple[Chunk, ...]
  real_examples: int
  processed_examples: int

  @property
  def num_clients(self) -> int:
    return len(self.client_ids)

  @property
  def padding_efficiency(self) -> float:
    return self.real_examples / self.processed_examples if self.processed_examples else 1.0


def step_ladder(max_steps: int, ratio: float) -> np.ndarray:
  """Geometric ladder of step counts 1, 2, 3, ..., each at most `ratio` x the previous."""
  levels = [1]
  while levels[-1] < max_steps:
    levels.append(max(levels[-1] + 1, math.floor(levels[-1] * ratio)))
  return np.asarray(levels, np.int64)


@dataclasses.dataclass(frozen=True)
class Planner:
  """Turns a cohort into chunks.

  Attributes:
    batch_size: local batch size; a client with n examples runs ceil(n / b)
      steps per epoch.
    block_size: clients vmapped together (per device, per block).
    num_devices: devices the chunk is sharded over.
    max_chunk_clients: the largest chunk, in clients (a multiple of
      num_devices * block_size after rounding).
    bucket_ratio: width of a step bucket; `None` pads every client of the round
      to one shared level (no bucketing).
    min_block: smallest block used for small remainders.
  """

  batch_size: int
  block_size: int
  num_devices: int = 1
  max_chunk_clients: int = 8192
  bucket_ratio: float | None = 1.25
  min_block: int = 8

  def __post_init__(self):
    if self.batch_size < 1 or self.block_size < 1 or self.num_devices < 1:
      raise ValueError("batch_size, block_size and num_devices must be >= 1.")

  @property
  def quantum(self) -> int:
    return self.num_devices * self.block_size

  def chunk_sizes(self) -> list[int]:
    """The ladder of chunk sizes, smallest first (all multiples of num_devices)."""
    sizes = []
    b = min(self.min_block, self.block_size)
    while b < self.block_size:
      sizes.append(self.num_devices * b)
      b *= 2
    s = self.quantum
    top = max(self.quantum, self.max_chunk_clients)
    while s <= top:
      sizes.append(s)
      s *= 2
    return sizes

  def _split(self, count: int) -> list[int]:
    """Splits `count` clients into ladder sizes, wasting little padding."""
    ladder = self.chunk_sizes()
    out = []
    remaining = count
    while remaining > 0:
      if remaining >= ladder[-1]:
        out.append(ladder[-1])
        remaining -= ladder[-1]
        continue
      up = next(s for s in ladder if s >= remaining)
      down = [s for s in ladder if s <= remaining]
      if not down or up - remaining <= 0.15 * remaining:
        out.append(up)
        remaining = 0
      else:
        out.append(down[-1])
        remaining -= down[-1]
    return out

  def _shape(self, size: int) -> tuple[int, int]:
    per_device = size // self.num_devices
    if per_device <= self.block_size:
      return 1, per_device
    return per_device // self.block_size, self.block_size

  def plan(self, round_num: int, client_ids: np.ndarray, sizes: np.ndarray,
           epochs: int = 1) -> RoundPlan:
    """Plans one round.

    Args:
      round_num: the round index (carried into the plan).
      client_ids: the sampled cohort.
      sizes: the number of training examples of each sampled client.
      epochs: local epochs (scales the example counts used for efficiency).
    """
    ids = np.asarray(client_ids, np.int64)
    sizes = np.asarray(sizes, np.int64)
    steps = np.maximum(1, -(-sizes // self.batch_size))
    if len(ids) == 0:
      return RoundPlan(round_num, ids, (), 0, 0)
    ladder = step_ladder(int(steps.max()), self.bucket_ratio or 2.0)
    if self.bucket_ratio is None:
      level_of = np.full(len(ids), np.searchsorted(ladder, steps.max()))
    else:
      level_of = np.searchsorted(ladder, steps)
    chunks = []
    processed = 0
    for level in np.unique(level_of):
      members = np.nonzero(level_of == level)[0]
      pad_to = int(ladder[level]) * self.batch_size
      start = 0
      for size in self._split(len(members)):
        take = members[start:start + size]
        start += len(take)
        slot_ids = np.empty(size, np.int64)
        slot_ids[:len(take)] = ids[take]
        slot_ids[len(take):] = ids[take[-1]]
        valid = np.zeros(size, bool)
        valid[:len(take)] = True
        num_blocks, block = self._shape(size)
        real = int(np.minimum(sizes[take], pad_to).sum())
        chunks.append(Chunk(slot_ids, valid, pad_to, num_blocks, block, real))
        processed += size * pad_to
    real_total = int(sizes.sum())
    return RoundPlan(round_num, ids, tuple(chunks), real_total * epochs, processed * epochs)
