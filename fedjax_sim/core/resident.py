"""Training data resident on the devices: placed once, gathered inside the compiled round.

Streaming (the default when data is large) gathers every round's clients on
the host and copies them to the devices. When the packed dataset fits in
device memory it is placed there once instead, each device holding the
clients it owns (a contiguous id range, `id // rows_per_device`, the layout
of the per-client store); each round the host sends only client ids and
plans, and the chunk program gathers every block's example slots from its
device's shard (`program.gather_resident`) with the same padding as
`FederatedData.gather`, so the clients' data, and hence the round, is the
streamed one.

    shard d (device d): clients [d * R, (d + 1) * R)   (R = rows_per_device)
      features[k]: [shard_examples, ...]   the range's examples (and maybe more)
      starts, sizes: [R] int32             local windows, by row id % R

Where the packed store holds a device's clients contiguously (the usual
case), its shard is a window of the store's arrays, `shard_examples` rows
from the range's first example; on CPU devices JAX then aliases the host
array instead of copying it when the window starts 64-byte aligned (arrays
memory-mapped from `.npy` files, or built with `data.aligned_empty`), so the
resident copy costs no memory. Otherwise (scattered windows, unaligned
arrays, accelerators) the shard is copied, one device at a time.

Shared layout (CPU devices, no per-client state): when every feature array
can be aliased whole (64-byte aligned, C-contiguous), each CPU device's shard
is the *whole* population (the same host memory, no copy), so any device can
train any client and the planner deals blocks to balance the devices' work
instead of running each client where it is stored (`Planner.by_owner`):

    shard d (every device): clients [0, N)
      features[k]: the store's whole arrays (aliased)
      starts, sizes: [N] int32             the store's own offsets

The chunk program indexes a shard by `id % rows`, `rows` being the shard's own
row count, so the same program code serves both layouts.

The placement is chosen by `choose_placement` ("auto": resident when the
copy fits in a fraction of the memory it would take) and reported by the
engine (`Engine.placement`, written to summary.json, with the layout).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedjax_sim.core.data import FederatedData

PLACEMENTS = ("auto", "device", "host")

# "auto" keeps the data on the devices when its copy takes at most this
# fraction of the memory available to it (free device memory on an
# accelerator; available host memory for CPU devices, which also hold the
# host's own copy, the model and the compiled programs).
RESIDENT_FRACTION = 0.5


@dataclasses.dataclass(frozen=True)
class ResidentData:
  """The population's shards on the devices.

  Attributes:
    arrays: `(features, starts, sizes)` as global arrays sharded over the
      mesh axis: features `{name: [n * shard_examples, ...]}`, starts and
      sizes `[n * rows_per_device]` int32 (a device's rows are its clients in
      id order; starts are offsets into its own shard).
    nbytes: bytes the shards take on all devices together.
  """

  arrays: tuple[dict[str, jax.Array], jax.Array, jax.Array]
  nbytes: int
  shared: bool = False  # every device holds the whole population (see the module doc)


def _layout(data: FederatedData, num_devices: int, rows_per_device: int):
  """Per device: (first client, end client, first example, examples in its range)."""
  out = []
  for d in range(num_devices):
    lo, hi = min(d * rows_per_device, data.num_clients), min((d + 1) * rows_per_device,
                                                              data.num_clients)
    out.append((lo, hi, int(data.starts[lo]) if hi > lo else 0, int(data.sizes[lo:hi].sum())))
  return out


def _contiguous(data: FederatedData, lo: int, hi: int) -> bool:
  """Clients lo..hi-1 are stored back to back, in id order."""
  if hi - lo <= 1:
    return True
  return bool(np.array_equal(data.starts[lo + 1:hi], data.starts[lo:hi - 1] + data.sizes[lo:hi - 1]))


def _aliases(array: np.ndarray, first: int, rows: int) -> bool:
  """Whether a CPU device can alias `array[first:first + rows]` (64-byte aligned, in bounds)."""
  if not isinstance(array, np.ndarray) or not array.flags.c_contiguous:
    return False
  if first + rows > len(array):
    return False
  row_bytes = array.dtype.itemsize * int(np.prod(array.shape[1:], dtype=np.int64))
  return (array.ctypes.data + first * row_bytes) % 64 == 0


def shareable(data: FederatedData, mesh: Mesh) -> bool:
  """Whether every device of `mesh` can hold the whole population at no cost: CPU
  devices that alias every feature array whole (the shared layout)."""
  if not all(d.platform == "cpu" for d in mesh.devices.flat):
    return False
  total = int(data.sizes.sum()) if data.num_clients else 0
  return (0 < total < 2**31 and all(_aliases(v, 0, len(v)) and len(v) < 2**31
                                    for v in data.features.values()))


def shard_nbytes(data: FederatedData, num_devices: int, rows_per_device: int | None = None,
                 on_cpu: bool = False, shared: bool = False) -> int:
  """Bytes a resident copy adds on all devices together.

  Shards are padded to the largest; on CPU devices, windows the device can
  alias (`_aliases`) add nothing. `shared`: the shared layout (`shareable`),
  which adds only every device's offsets and sizes.
  """
  if shared:
    return num_devices * 8 * data.num_clients
  rows = rows_per_device or -(-data.num_clients // num_devices)
  layout = _layout(data, num_devices, rows)
  shard = max(max(n for *_, n in layout), 1)
  total = num_devices * 8 * rows  # starts and sizes
  for v in data.features.values():
    row_bytes = v.dtype.itemsize * int(np.prod(v.shape[1:], dtype=np.int64))
    for lo, hi, first, _ in layout:
      if not (on_cpu and _contiguous(data, lo, hi) and _aliases(v, first, shard)):
        total += shard * row_bytes
  return total


def available_bytes(mesh: Mesh) -> tuple[int, str]:
  """Memory a resident copy may use: (bytes, where it was read)."""
  devices = list(mesh.devices.flat)
  if all(d.platform == "cpu" for d in devices):
    try:
      with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
      return int(info["MemAvailable"].split()[0]) * 1024, "host MemAvailable"
    except (OSError, KeyError, ValueError):
      return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "host free pages"
  free = []
  for d in devices:
    stats = d.memory_stats() or {}
    if "bytes_limit" not in stats:
      return 0, f"{d.platform} reports no memory limit"
    free.append(int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))
  return min(free) * len(devices), "free device memory"


def choose_placement(setting: str, data: FederatedData, mesh: Mesh,
                     shared: bool = False) -> dict[str, Any]:
  """Where the training data lives: {"data": "device" | "host", "reason": ..., ...}.

  `shared`: resident data would take the shared layout (`shareable`); the
  report's `layout` says which layout a resident copy takes.
  """
  if setting not in PLACEMENTS:
    raise ValueError(f"engine.data_placement must be one of {PLACEMENTS}; got {setting!r}.")
  n = mesh.devices.size
  on_cpu = all(d.platform == "cpu" for d in mesh.devices.flat)
  need = shard_nbytes(data, n, on_cpu=on_cpu, shared=shared)
  report: dict[str, Any] = {"setting": setting, "resident_bytes": need,
                            "layout": "shared" if shared else "by owner"}
  if setting != "auto":
    return {**report, "data": setting, "reason": "forced by engine.data_placement"}
  have, source = available_bytes(mesh)
  report["available_bytes"] = have
  if need <= RESIDENT_FRACTION * have:
    return {**report, "data": "device",
            "reason": f"the copy ({need / 2**20:.1f} MiB) fits in {RESIDENT_FRACTION:.0%} of "
                      f"{source} ({have / 2**20:.0f} MiB)"}
  return {**report, "data": "host",
          "reason": f"the copy ({need / 2**20:.1f} MiB) exceeds {RESIDENT_FRACTION:.0%} of "
                    f"{source} ({have / 2**20:.0f} MiB): streamed from the host"}


def place(data: FederatedData, mesh: Mesh, rows_per_device: int,
          shared: bool = False) -> ResidentData:
  """Puts the population on the devices, one device's shard at a time.

  A device whose clients are stored contiguously gets the window of the
  store's arrays that starts at their first example (aliased, not copied, by
  a CPU device when 64-byte aligned); otherwise its examples are gathered
  into one host buffer of a shard's size and copied. `shared` (only where
  `shareable`): every device's shard is the whole store, aliased.
  """
  from fedjax_sim.core.program import AXIS
  n = mesh.devices.size
  if shared:
    return _place_shared(data, mesh)
  if data.num_clients > n * rows_per_device:
    raise ValueError(f"{data.num_clients} clients do not fit {n} x {rows_per_device} rows.")
  layout = _layout(data, n, rows_per_device)
  shard = max(max(count for *_, count in layout), 1)
  if shard >= 2**31:
    raise ValueError(f"A device's shard would hold {shard} examples; resident data indexes "
                     "with int32 (at most 2^31 - 1). Use engine.data_placement: host, or more "
                     "devices.")
  sharding = NamedSharding(mesh, P(AXIS))
  row_shape = (n * rows_per_device,)
  features = {k: [] for k in data.features}
  starts_parts, sizes_parts = [], []
  for device, idx in sharding.addressable_devices_indices_map(row_shape).items():
    d = (idx[0].start or 0) // rows_per_device
    lo, hi, first, count = layout[d]
    sizes = np.zeros(rows_per_device, np.int32)
    sizes[:hi - lo] = data.sizes[lo:hi]
    window = _contiguous(data, lo, hi)
    if window:
      starts = np.zeros(rows_per_device, np.int32)
      starts[:hi - lo] = data.starts[lo:hi] - first
    else:  # scattered windows: pack the range's examples in id order
      starts = np.zeros(rows_per_device, np.int32)
      starts[:hi - lo] = np.concatenate([[0], np.cumsum(data.sizes[lo:hi])[:-1]])
      index = (np.repeat(data.starts[lo:hi] - starts[:hi - lo], data.sizes[lo:hi])
               + np.arange(count, dtype=np.int64))
    starts_parts.append(jax.device_put(starts, device))
    sizes_parts.append(jax.device_put(sizes, device))
    for k, v in data.features.items():
      if window and first + shard <= len(v):
        part = v[first:first + shard]  # a view: CPU devices alias it when aligned
      else:
        part = np.zeros((shard,) + v.shape[1:], v.dtype)
        if window:
          part[:len(v) - first] = v[first:first + shard]
        else:
          np.take(v, index, axis=0, out=part[:count])
      features[k].append(jax.device_put(np.asarray(part), device))
  arrays = ({k: jax.make_array_from_single_device_arrays((n * shard,) + data.features[k].shape[1:],
                                                         sharding, parts)
             for k, parts in features.items()},
            jax.make_array_from_single_device_arrays(row_shape, sharding, starts_parts),
            jax.make_array_from_single_device_arrays(row_shape, sharding, sizes_parts))
  jax.block_until_ready(arrays)
  nbytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(arrays))
  return ResidentData(arrays, nbytes)


def _place_shared(data: FederatedData, mesh: Mesh) -> ResidentData:
  """The shared layout: every device's shard is the whole store (aliased on CPU)."""
  from fedjax_sim.core.program import AXIS
  if not shareable(data, mesh):
    raise ValueError("The shared resident layout needs CPU devices and 64-byte aligned, "
                     "C-contiguous feature arrays (see resident.shareable).")
  n, rows = mesh.devices.size, data.num_clients
  sharding = NamedSharding(mesh, P(AXIS))
  starts = np.asarray(data.starts, np.int32)
  sizes = np.asarray(data.sizes, np.int32)
  features = {k: [] for k in data.features}
  starts_parts, sizes_parts = [], []
  for device in sharding.addressable_devices_indices_map((n * rows,)):
    starts_parts.append(jax.device_put(starts, device))
    sizes_parts.append(jax.device_put(sizes, device))
    for k, v in data.features.items():
      features[k].append(jax.device_put(v, device))  # aliased: aligned and contiguous
  arrays = ({k: jax.make_array_from_single_device_arrays((n * len(v),) + v.shape[1:], sharding,
                                                         features[k])
             for k, v in data.features.items()},
            jax.make_array_from_single_device_arrays((n * rows,), sharding, starts_parts),
            jax.make_array_from_single_device_arrays((n * rows,), sharding, sizes_parts))
  jax.block_until_ready(arrays)
  nbytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(arrays))
  return ResidentData(arrays, nbytes, shared=True)


__all__ = ["PLACEMENTS", "ResidentData", "available_bytes", "choose_placement",
           "place", "shard_nbytes", "shareable"]
