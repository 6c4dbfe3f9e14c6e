"""Shared test configuration: strict numerics, tiny shapes, shared fixtures."""

import atexit
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile

# The suite compiles hundreds of small programs and runs them on tiny shapes, so
# compiling dominates its time. XLA:CPU's LLVM backend at optimization level 0
# compiles them with about a quarter less CPU time (measured on
# the engine, config and README tests), and XLA:CPU's older LLVM IR emitters for
# fusions (`xla_cpu_use_fusion_emitters=false`, instead of the MLIR ones) take
# about half of what remains (four algorithms' chunk programs, 2026-11-30, 2-core CPU). XLA's HLO passes (fusion,
# simplification) still run, so the programs compute the same operations, only
# with other machine code. Runs, benchmarks and users keep XLA's defaults.
# Subprocesses get the same flags (`xla_flags`). An unknown XLA flag aborts the
# process, so the emitter flag is set only for the jaxlib versions it was checked
# on. Bit-for-bit equality of two different programs (say, resident and streamed
# rounds) is a property of the machine code, which the emitters change: tests of
# it run under XLA's default emitters (`default_emitters`).
_EMITTER_FLAG = "--xla_cpu_use_fusion_emitters=false"
_DEFAULT_EMITTERS = "FEDJAX_SIM_TEST_DEFAULT_EMITTERS"


def _test_xla_flags() -> str:
  from importlib.metadata import version
  flags = "--xla_backend_optimization_level=0"
  if (tuple(int(x) for x in version("jaxlib").split(".")[:2]) in {(0, 10)}
      and not os.environ.get(_DEFAULT_EMITTERS)):
    flags += f" {_EMITTER_FLAG}"
  return flags


TEST_XLA_FLAGS = _test_xla_flags()
if os.environ.get(_DEFAULT_EMITTERS):
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "").replace(_EMITTER_FLAG, "").strip()
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

import jax  # noqa: E402  (after XLA_FLAGS)
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


def default_emitters(test):
  """Runs `test` in a pytest subprocess under XLA's default fusion emitters.

  For tests of bit-for-bit equality between different programs, which holds
  for the machine code users run, not necessarily for the suite's faster-to-
  compile emitters. The subprocess keeps optimization level 0.
  """
  @functools.wraps(test)
  def wrapper(*args, **kwargs):
    if os.environ.get(_DEFAULT_EMITTERS):
      return test(*args, **kwargs)
    nodeid = os.environ["PYTEST_CURRENT_TEST"].rsplit(" ", 1)[0]
    env = dict(os.environ, **{_DEFAULT_EMITTERS: "1"})
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(_EMITTER_FLAG, "").strip()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p",
                           "no:cacheprovider", nodeid], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    assert re.search(r"^1 passed", proc.stdout, re.M), proc.stdout[-2000:]
  return wrapper


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
