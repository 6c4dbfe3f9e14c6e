"""One XLA CPU device per core: the engine shards clients over devices, so a
multi-core CPU host runs best split into several CPU devices."""

from __future__ import annotations

import os


def use_cpu_devices(count: int | str = "auto") -> int:
  """Splits the host CPU into `count` XLA devices (`"auto"`: one per core).

  Call it before the first JAX computation (JAX fixes its devices when its
  backends start). An `XLA_FLAGS` that already sets
  `--xla_force_host_platform_device_count` wins. Returns the count asked for.

  Raises:
    ValueError: `count` is not "auto" or a positive integer.
    RuntimeError: JAX has started with a different number of CPU devices.
  """
  import jax
  from jax._src import xla_bridge

  if count == "auto":
    n = os.cpu_count() or 1
  elif isinstance(count, int) and not isinstance(count, bool) and count >= 1:
    n = count
  elif isinstance(count, str) and count.isdigit() and int(count) >= 1:
    n = int(count)
  else:
    raise ValueError(f"CPU device count must be 'auto' or a positive integer; got {count!r}.")
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return n
  if xla_bridge.backends_are_initialized():
    have = len(jax.devices("cpu"))
    if have != n:
      raise RuntimeError(f"JAX already runs with {have} CPU device(s); call "
                         f"fedjax_sim.use_cpu_devices({count!r}) before any JAX computation "
                         "(at the top of the script).")
    return n
  jax.config.update("jax_num_cpu_devices", n)
  return n
