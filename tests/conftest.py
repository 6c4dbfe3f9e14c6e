"""Shared test configuration: strict numerics, tiny shapes, shared fixtures."""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile

# The suite compiles hundreds of small programs and runs them on tiny shapes, so
# compiling dominates its time. XLA:CPU's LLVM backend at optimization level 0
# compiles them with about a quarter less CPU time (measured on
# the engine, config and README tests); XLA's HLO passes (fusion, simplification)
# still run, so the programs compute the same operations, only less optimized
# machine code. Runs, benchmarks and users keep XLA's default. Subprocesses get
# the same flags (`xla_flags`).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

import jax  # noqa: E402  (after XLA_FLAGS)
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


def xla_flags(devices: int | None = None) -> str:
  """XLA_FLAGS for a test's subprocess: the suite's flags, plus `devices` CPU devices
  (None: leave the count to the program, e.g. the CLI's --cpu-devices)."""
  if devices is None:
    return TEST_XLA_FLAGS
  return f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}"

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One persistent compilation cache for the session (runs enable it by default):
# never the user's own cache, shared by the subprocesses tests start, removed
# at the end.
if "FEDJAX_SIM_COMPILE_CACHE" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="fedjax_sim_test_xla_")
  os.environ["FEDJAX_SIM_COMPILE_CACHE"] = _CACHE
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
# Dataset conversions cache into a session folder, never the user's ~/.cache.
if "FEDJAX_SIM_DATA_CACHE" not in os.environ:
  _DATA_CACHE = tempfile.mkdtemp(prefix="fedjax_sim_test_data_")
  os.environ["FEDJAX_SIM_DATA_CACHE"] = _DATA_CACHE
  atexit.register(shutil.rmtree, _DATA_CACHE, ignore_errors=True)
# Tests build many identical small programs from fresh closures; the persistent
# cache (keyed by the compiled program, not the Python function) serves repeats.
from fedjax_sim.runner.compile_cache import enable_compilation_cache  # noqa: E402

enable_compilation_cache()


def packed_dataset(sizes, num_features=5, num_classes=3, seed=0):
  """A small FederatedData with the given client sizes and random x, y."""
  from fedjax_sim.core.data import FederatedData
  rng = np.random.default_rng(seed)
  total = int(np.sum(sizes))
  x = rng.normal(size=(total, num_features)).astype(np.float32)
  y = rng.integers(0, num_classes, size=total).astype(np.int32)
  return FederatedData.from_offsets({"x": x, "y": y}, np.concatenate([[0], np.cumsum(sizes)]))


def run_python(code: str, env_extra: dict | None = None, timeout: int = 300) -> str:
  """Runs `code` in a fresh interpreter (e.g. with other XLA_FLAGS); returns stdout."""
  env = dict(os.environ)
  env.update(env_extra or {})
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                        timeout=timeout, cwd=REPO)
  if proc.returncode != 0:
    raise AssertionError(f"subprocess failed:\n{proc.stdout}\n{proc.stderr}")
  return proc.stdout


def free_port() -> int:
  """A TCP port free on loopback now (for a jax.distributed coordinator)."""
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_together(commands: list[list[str]], env: dict, timeout: int = 300,
                 returncode: int = 0) -> list[subprocess.CompletedProcess]:
  """Starts every command at once (e.g. the processes of one jax.distributed run) and
  returns them finished (stdout, stderr); any exit status other than `returncode` (or
  a timeout, after which all are killed) fails."""
  procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for cmd in commands]
  outs = []
  for p in procs:
    try:
      stdout, stderr = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    assert p.returncode == returncode, stderr[-3000:]
    outs.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
  return outs


@pytest.fixture
def tmp_out(tmp_path):
  return str(tmp_path / "out")
