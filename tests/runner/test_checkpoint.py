"""Checkpoint and resume: a killed run resumes to exactly the uninterrupted result."""

import dataclasses
import hashlib
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fedjax_sim.core.keys import Purpose, run_key
from fedjax_sim.runner.checkpoint import CheckpointError, Checkpointer
from fedjax_sim.runner.config import config_from_dict
from fedjax_sim.runner.io import read_metrics
from fedjax_sim.runner.run import RunError, build_experiment, run_experiment
from tests.conftest import REPO, xla_flags

CONFIG = os.path.join(REPO, "experiments", "configs", "quickstart.yaml")
SETS = ["rounds=8", "checkpoint.every=2", "eval.every=3", "data.num_clients=3000",
        "sampling.clients_per_round=600", "algorithm.name=scaffold", "model.hidden=[32]"]
TIMING = {"round_seconds", "clients_per_second", "examples_per_second", "eval_seconds"}


def _cli(*args):
  script = os.path.join(os.path.dirname(sys.executable), "fedjax-sim")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = xla_flags()
  return [script, *args], env


def _run(out, *extra):
  sets = [a for s in SETS for a in ("--set", s)]
  cmd, env = _cli("run", CONFIG, *sets, "--set", f"output_dir={out}", "--no-progress", *extra)
  return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _final_state(out):
  config = config_from_dict({}, [*SETS, f"output_dir={out}"])
  exp = build_experiment(config)
  like = exp.engine.init(exp.model.init(run_key(config.seed, Purpose.INIT)))
  state, step = Checkpointer(out).restore(like)
  assert step == 8
  return state


def _strip(records):
  return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


@pytest.mark.slow
def test_resume_after_a_kill_is_bit_identical(tmp_path):
  full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
  proc = _run(full)
  assert proc.returncode == 0, proc.stderr
  # The same run, killed (SIGKILL) as soon as its third round is on disk.
  sets = [a for s in SETS for a in ("--set", s)]
  cmd, env = _cli("run", CONFIG, *sets, "--set", f"output_dir={killed}", "--no-progress")
  p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  metrics = os.path.join(killed, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and p.poll() is None:
    if os.path.exists(metrics) and len(read_metrics(metrics)) >= 3:
      p.send_signal(signal.SIGKILL)
      break
    time.sleep(0.005)
  p.wait()
  assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
  assert 3 <= len(read_metrics(metrics)) < 8
  proc = _run(killed, "--resume", killed)
  assert proc.returncode == 0, proc.stderr
  assert "resuming" in proc.stdout
  assert _strip(read_metrics(metrics)) == _strip(read_metrics(os.path.join(full, "metrics.jsonl")))
  a, b = _final_state(full), _final_state(killed)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bit for bit


def _tiny(out, **changes):
  raw = {"seed": 0, "rounds": 2, "output_dir": out, "progress": False,
         "data": {"num_clients": 40, "num_features": 6, "num_classes": 3,
                  "examples_per_client": 8},
         "model": {"kind": "mlp", "hidden": [8]}, "algorithm": {"batch_size": 4},
         "sampling": {"clients_per_round": 8}, "engine": {"block_size": 4},
         "checkpoint": {"every": 1}, "eval": {"every": 0}}
  for key, value in changes.items():
    section, name = key.split("__")
    raw.setdefault(section, {})[name] = value
  return config_from_dict(raw)


def _digest(folder):
  h = hashlib.sha256()
  for root, _, files in sorted(os.walk(folder)):
    for f in sorted(files):
      h.update(f.encode())
      h.update(open(os.path.join(root, f), "rb").read())
  return h.hexdigest()


def test_corrupt_checkpoint_gives_a_clear_error_and_is_left_alone(tmp_path):
  out = str(tmp_path / "run")
  run_experiment(_tiny(out), log=lambda *a: None)
  latest = os.path.join(out, "checkpoints", "2")
  for root, _, files in os.walk(latest):
    for f in files:
      if "state" in root and not f.startswith("_"):
        with open(os.path.join(root, f), "r+b") as fh:
          fh.write(b"\0garbage\0" * 4)
  before = _digest(os.path.join(out, "checkpoints"))
  with pytest.raises(CheckpointError, match="cannot be restored.*left as it is"):
    run_experiment(_tiny(out, checkpoint__every=1), resume=True, log=lambda *a: None)
  assert _digest(os.path.join(out, "checkpoints")) == before


def test_resume_with_another_config_or_without_a_run_is_refused(tmp_path):
  out = str(tmp_path / "run")
  run_experiment(_tiny(out), log=lambda *a: None)
  with pytest.raises(RunError, match="sampling.clients_per_round: the run has 8, now 4"):
    run_experiment(_tiny(out, sampling__clients_per_round=4), resume=True, log=lambda *a: None)
  with pytest.raises(RunError, match="holds no run"):
    run_experiment(_tiny(str(tmp_path / "nothing")), resume=True, log=lambda *a: None)
  with pytest.raises(RunError, match="--resume"):  # a fresh run will not overwrite it
    run_experiment(_tiny(out), log=lambda *a: None)


def test_resume_can_extend_a_finished_run(tmp_path):
  out = str(tmp_path / "run")
  run_experiment(_tiny(out), log=lambda *a: None)
  cfg = _tiny(out)
  import dataclasses
  run_experiment(dataclasses.replace(cfg, rounds=4), resume=True, log=lambda *a: None)
  assert [r["round"] for r in read_metrics(os.path.join(out, "metrics.jsonl"))] == [1, 2, 3, 4]


def test_a_checkpoint_from_another_store_layout_is_refused_by_a_plain_restore(tmp_path):
  out = str(tmp_path / "run")
  config = _tiny(out)
  exp = build_experiment(config)
  state = exp.engine.init(exp.model.init(run_key(0, Purpose.INIT)))
  ck = Checkpointer(out)
  ck.save(1, state, layout={"num_devices": 2, "rows_per_device": 20})
  with pytest.raises(CheckpointError, match="re-lay it out"):
    ck.restore(state, layout={"num_devices": 1, "rows_per_device": 40})
  assert ck.saved_layout() == {"num_devices": 2, "rows_per_device": 20}
  restored, step = ck.restore(state, layout={"num_devices": 2, "rows_per_device": 20})
  assert step == 1
  ck.close()


def _to_layout(store_rows_1dev: np.ndarray, num_devices: int, rows_per_device: int):
  """Client c's row under the engine's layout formula, written out independently."""
  out = np.full((num_devices * rows_per_device,) + store_rows_1dev.shape[1:], -7.0, np.float32)
  for c in range(store_rows_1dev.shape[0]):
    out[(c % num_devices) * rows_per_device + c // num_devices] = store_rows_1dev[c]
  return out


def test_resume_re_lays_out_a_store_written_on_another_device_count(tmp_path):
  # SCAFFOLD keeps a control variate per client. A run checkpointed on 3
  # devices (39 clients -> 3 x 13 rows, client c at row (c % 3) * 13 + c // 3)
  # resumes on this process's 1 device exactly as the uninterrupted run.
  full, moved = str(tmp_path / "full"), str(tmp_path / "moved")
  kw = dict(algorithm__name="scaffold", data__num_clients=39)
  run_experiment(dataclasses.replace(_tiny(full, **kw), rounds=4), log=lambda *a: None)
  run_experiment(_tiny(moved, **kw), log=lambda *a: None)  # 2 rounds, 1 device
  config = _tiny(moved, **kw)
  exp = build_experiment(config)
  like = exp.engine.init(exp.model.init(run_key(0, Purpose.INIT)))
  ck = Checkpointer(moved)
  state, step = ck.restore(like)
  assert step == 2
  variates = jax.tree.map(np.asarray, state.clients)
  assert any(np.any(v != 0) for v in jax.tree.leaves(variates))  # rounds 1-2 wrote them
  three = dataclasses.replace(state, clients=jax.tree.map(lambda v: _to_layout(v, 3, 13),
                                                          variates))
  import shutil
  ck.close()
  shutil.rmtree(os.path.join(moved, "checkpoints"))
  ck = Checkpointer(moved)
  ck.save(2, jax.device_get(three), layout={"num_devices": 3, "rows_per_device": 13})
  ck.close()
  run_experiment(dataclasses.replace(config, rounds=4), resume=True, log=lambda *a: None)
  a = Checkpointer(full).restore(like)[0]
  b = Checkpointer(moved).restore(like)[0]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_stateless_run_resumes_whatever_layout_its_checkpoint_records(tmp_path):
  out = str(tmp_path / "run")
  run_experiment(_tiny(out), log=lambda *a: None)
  exp = build_experiment(_tiny(out))
  like = exp.engine.init(exp.model.init(run_key(0, Purpose.INIT)))
  ck = Checkpointer(out)
  state, _ = ck.restore(like)
  ck.save(3, state, layout={"num_devices": 4, "rows_per_device": 10})  # as if run on 4 devices
  ck.close()
  metrics = os.path.join(out, "metrics.jsonl")
  with open(metrics, "a") as f:  # the metrics that run would have written for round 3
    f.write(open(metrics).read().splitlines()[-1].replace('"round": 2', '"round": 3') + "\n")
  run_experiment(dataclasses.replace(_tiny(out), rounds=4), resume=True, log=lambda *a: None)
  assert [r["round"] for r in read_metrics(metrics)] == [1, 2, 3, 4]
