"""Several processes (hosts) on `jax.distributed`: start-up, agreement, and host <-> device moves.

Every process runs the same program on the same config: it samples and plans
the same rounds (sampling is seeded, never process-dependent), and the mesh
spans every process's devices in process order, so client c runs on mesh
position `c % n` whatever the number of processes: a run on 2 processes of
2 devices is the run on 1 process of 4 devices. Host values enter the
devices through `to_devices` (each process supplies the slices of its own
devices) and leave through `to_host` (per-device partial sums are gathered
from every process, then summed in device order as on one process).

On CPU the cross-process collectives are gloo's (`jax_cpu_collectives_implementation`);
only all-gathers are used (no psum_scatter, which has had CPU bugs).
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

_KEYS = {"coordinator": str, "num_processes": int, "process_id": int, "local_device_ids": str}


class DistributedError(RuntimeError):
  """Processes could not start together, or disagree on what they run."""


def parse_spec(spec: str) -> dict[str, Any]:
  """`coordinator=HOST:PORT,num_processes=N,process_id=I[,local_device_ids=0;1]` -> kwargs.

  An empty spec or "auto" leaves everything to JAX (its environment variables,
  e.g. JAX_COORDINATOR_ADDRESS, or cluster detection: SLURM, Open MPI, ...).
  """
  spec = spec.strip()
  if spec in ("", "auto"):
    return {}
  out: dict[str, Any] = {}
  for part in spec.split(","):
    key, sep, value = part.partition("=")
    key = key.strip()
    if not sep or key not in _KEYS:
      raise DistributedError(
          f"--distributed: cannot read {part!r}; expected comma-separated key=value with keys "
          f"{sorted(_KEYS)}, e.g. coordinator=10.0.0.1:1234,num_processes=2,process_id=0 "
          "(or 'auto' to use JAX's environment variables / cluster detection).")
    try:
      out[key] = _KEYS[key](value.strip())
    except ValueError as e:
      raise DistributedError(f"--distributed: {key}={value!r} is not a valid {_KEYS[key].__name__}."
                             ) from e
  if "local_device_ids" in out:
    out["local_device_ids"] = [int(i) for i in out["local_device_ids"].split(";")]
  if "num_processes" in out and not 1 <= out.get("process_id", 0) + 1 <= out["num_processes"]:
    raise DistributedError(f"--distributed: process_id must be in [0, {out['num_processes']}); "
                           f"got {out.get('process_id')}.")
  return out


def initialize(spec: str, *, timeout_s: int = 120) -> None:
  """Joins the processes of a run (call before anything touches a JAX device).

  Raises:
    DistributedError: a bad spec, or the processes did not all connect within
      `timeout_s` (e.g. a wrong coordinator address, a process not started).
  """
  kwargs = parse_spec(spec)
  # Gloo's collectives for CPU devices across processes (must precede backend start-up).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if "coordinator" in kwargs:
    kwargs["coordinator_address"] = kwargs.pop("coordinator")
  try:
    jax.distributed.initialize(**kwargs, initialization_timeout=timeout_s,
                               heartbeat_timeout_seconds=max(30, timeout_s))
  except Exception as e:  # XLA raises plain RuntimeErrors/XlaRuntimeErrors
    hint = ("With 'auto', JAX reads JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
            "JAX_PROCESS_ID, or detects a cluster (SLURM, Open MPI, ...); outside one, pass "
            "coordinator=HOST:PORT,num_processes=N,process_id=I. " if not kwargs else "")
    raise DistributedError(
        f"jax.distributed could not start ({type(e).__name__}: {e}). {hint}Check that every "
        "process got the same coordinator address and num_processes, distinct process_ids, and "
        f"that all started within {timeout_s} s.") from e


def is_multiprocess() -> bool:
  return jax.process_count() > 1


def global_devices() -> list:
  """Every process's devices, in process order (a process's own devices by id)."""
  return sorted(jax.devices(), key=lambda d: (d.process_index, d.id))


def agree(what: str, value: str) -> None:
  """Raises DistributedError unless every process passes the same `value` (compared by digest).

  The digests travel through an all-gather over one device per process, so
  the check works whatever each process's device count (a process started
  with the wrong `--cpu-devices` must get this error, not a collective's
  shape failure).
  """
  if not is_multiprocess():
    return
  digest = np.frombuffer(hashlib.sha256(value.encode()).digest()[:8], np.int32)
  digests = _gather_rows(digest)
  differ = [p for p in range(len(digests)) if not np.array_equal(digests[p], digests[0])]
  if differ:
    raise DistributedError(
        f"The {jax.process_count()} processes disagree on the {what}: process(es) {differ} "
        "differ from process 0. Every process must run the same config with the same number "
        f"of devices each. (process {jax.process_index()}: {value[:200]!r})")


def _gather_rows(row: np.ndarray) -> np.ndarray:
  """`[num_processes, len(row)]`: every process's `row`, on every process."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  firsts = {}
  for d in sorted(jax.devices(), key=lambda d: (d.process_index, d.id)):
    firsts.setdefault(d.process_index, d)
  mesh = Mesh(np.asarray([firsts[p] for p in sorted(firsts)]), ("p",))
  local = jax.device_put(np.asarray(row)[None], firsts[jax.process_index()])
  rows = jax.make_array_from_single_device_arrays(
      (len(firsts),) + row.shape, NamedSharding(mesh, P("p")), [local])
  everywhere = jax.jit(lambda x: x, out_shardings=NamedSharding(mesh, P()))(rows)
  return np.asarray(everywhere.addressable_data(0))


def to_devices(tree, sharding):
  """Host (or single-device) arrays -> global arrays with `sharding` (each process holds
  the full values)."""
  if not is_multiprocess():
    return jax.device_put(tree, sharding)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree)


def to_host(tree):
  """Global arrays -> numpy, gathering the shards other processes hold."""
  if not is_multiprocess():
    return jax.device_get(tree)

  def get(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return np.asarray(x)
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(get, tree)


__all__ = ["DistributedError", "agree", "global_devices", "initialize", "is_multiprocess",
           "parse_spec", "to_devices", "to_host"]
