"""What every benchmark script records about the machine, and how it emits its JSON.

`ceilings()` measures, in the calling process, the two figures a result is
judged against: the GFLOP/s of a large float32 matmul and the bandwidth of a
jitted copy, each on one XLA device and on all local devices at once (one
independent matmul or copy per device, run concurrently by one sharded
program). Nothing about the hardware is typed in.
"""

from __future__ import annotations

import json
import os
import platform
import time

MATMUL_N = 2048      # float32 matmul side: 17.2 GFLOP per product
COPY_MIB = 256       # float32 bytes per copy (per device in the all-device figure)
REPS = 5             # timed calls per figure; the best one counts


def machine() -> dict:
  import jax
  try:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  except (ValueError, OSError, AttributeError):
    mem = None
  return {"platform": platform.platform(), "processor": platform.processor(),
          "cpu_count": os.cpu_count(), "memory_gib": mem, "backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()], "jax": jax.__version__,
          "python": platform.python_version()}


def _best_seconds(fn, arg, reps: int) -> float:
  import jax
  jax.block_until_ready(fn(arg))  # compile and warm up
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(arg))
    best = min(best, time.perf_counter() - t)
  return best


def _per_device(f, devices):
  """`f` applied to each device's own slice of a [n_devices, ...] array, all devices at once."""
  import jax
  import numpy as np
  from jax.sharding import Mesh, PartitionSpec as P
  mesh = Mesh(np.asarray(devices), ("d",))
  return jax.jit(jax.shard_map(lambda a: f(a[0])[None], mesh=mesh, in_specs=P("d"),
                               out_specs=P("d"), check_vma=False)), mesh


def _ones(shape, sharding):
  """float32 ones created where `sharding` puts them (no staging copy on device 0)."""
  import jax
  import jax.numpy as jnp
  return jax.jit(lambda: jnp.ones(shape, jnp.float32), out_shardings=sharding)()


def ceilings(matmul_n: int = MATMUL_N, copy_mib: float = COPY_MIB, reps: int = REPS) -> dict:
  """Measured float32 matmul GFLOP/s and copy GB/s, on one device and on all local devices.

  Matmul: `a @ b` on [n, n] float32 (2 n^3 FLOPs per product); best of `reps`
  calls after a warm-up. Copy: `-x` on `copy_mib` MiB of float32, counted as
  one read plus one write of every byte. The all-device figures run one
  product (one copy) per local device concurrently in one sharded program and
  count all of them. `matmul_gflops` (`copy_gbps`) is the larger of the one-
  and all-device figures: on CPU one XLA device may already use every core
  for a large matmul, so neither figure alone is the machine's ceiling.
  """
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding
  devices = jax.local_devices()
  nd = len(devices)
  flops = 2.0 * matmul_n ** 3
  a = _ones((2, matmul_n, matmul_n), SingleDeviceSharding(devices[0]))
  one_mm = flops / _best_seconds(jax.jit(lambda a: a[0] @ a[1]), a, reps) / 1e9
  del a
  mm, mesh = _per_device(lambda a: a[0] @ a[1], devices)
  a = _ones((nd, 2, matmul_n, matmul_n), NamedSharding(mesh, P("d")))
  all_mm = nd * flops / _best_seconds(mm, a, reps) / 1e9
  del a
  n = int(copy_mib * 2**20 // 4)
  x = _ones((n,), SingleDeviceSharding(devices[0]))
  one_copy = 2 * 4 * n / _best_seconds(jax.jit(lambda x: -x), x, reps) / 1e9
  del x
  cp, mesh = _per_device(lambda x: -x, devices)
  x = _ones((nd, n), NamedSharding(mesh, P("d")))
  all_copy = 2 * 4 * n * nd / _best_seconds(cp, x, reps) / 1e9
  del x
  return {
      "matmul_gflops": max(one_mm, all_mm),
      "matmul_gflops_one_device": one_mm,
      "matmul_gflops_all_devices": all_mm,
      "copy_gbps": max(one_copy, all_copy),
      "copy_gbps_one_device": one_copy,
      "copy_gbps_all_devices": all_copy,
      "devices": nd,
      "how": (f"float32 {matmul_n}x{matmul_n} matmul (2n^3 FLOPs) and a jitted -x over "
              f"{copy_mib:g} MiB (read + write bytes), best of {reps} calls, on one device and "
              f"on all {nd} devices concurrently (one per device, one sharded program); each "
              "ceiling is the larger of the two"),
  }


def emit(result: dict, out: str | None) -> dict:
  """Prints the result as JSON and, if `out` is given, writes it there too (atomically)."""
  text = json.dumps(result, indent=2)
  print(text)
  if out:
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
      f.write(text + "\n")
    os.replace(tmp, out)
  return result
