"""`fedjax-sim run --distributed`: two processes on loopback write the one-process run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from fedjax_sim.runner.cli import main
from fedjax_sim.runner.io import read_metrics
from tests.conftest import REPO, free_port, run_together, xla_flags

_CONFIG = {
    "seed": 4, "rounds": 3, "progress": False,
    "data": {"num_clients": 40, "num_features": 6, "num_classes": 3, "examples_per_client": 8},
    "model": {"kind": "mlp", "hidden": [8]},
    "algorithm": {"name": "scaffold", "batch_size": 4},
    "sampling": {"clients_per_round": 10},
    "engine": {"block_size": 2},
    "checkpoint": {"every": 1},
    "eval": {"every": 2},
    "telemetry": {"cost_model": False},
}


def _cli(*args):
  return [sys.executable, "-c", "import sys; from fedjax_sim.runner.cli import main; "
          "sys.exit(main(sys.argv[1:]))", *args]


def _strip(records):
  timing = ("seconds", "per_second", "compile")
  return [{k: v for k, v in r.items() if not any(t in k for t in timing)} for r in records]


@pytest.mark.slow
def test_two_processes_write_what_one_process_of_four_devices_writes(tmp_path):
  config = tmp_path / "c.yaml"
  config.write_text(yaml.safe_dump(_CONFIG))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = xla_flags()
  one = tmp_path / "one"
  proc = subprocess.run(_cli("run", str(config), "--set", f"output_dir={one}", "--cpu-devices",
                             "4", "--no-progress"), cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  two = tmp_path / "two"
  # Two rounds on two processes, then a resume on two processes to round 3.
  first = None
  for args in (["--set", f"output_dir={two}", "--set", "rounds=2"], ["--resume", str(two)]):
    port = free_port()
    run_together([_cli("run", str(config), *args, "--cpu-devices", "2", "--no-progress",
                       "--distributed",
                       f"coordinator=127.0.0.1:{port},num_processes=2,process_id={i}")
                  for i in range(2)], env)
    first = first or read_metrics(str(two / "metrics.jsonl"))
  a, b = read_metrics(str(one / "metrics.jsonl")), read_metrics(str(two / "metrics.jsonl"))
  assert [r["round"] for r in b] == [1, 2, 3]  # one line per round: process 0 alone writes
  for ra, rb in zip(_strip(a), _strip(b)):
    assert ra.keys() == rb.keys()
    for k in ra:
      np.testing.assert_allclose(rb[k], ra[k], rtol=1e-5, atol=1e-6, err_msg=k)
  summary = json.loads((two / "summary.json").read_text())
  assert summary["status"] == "completed" and len(summary["devices"]) == 4
  # Checkpoints were written by both processes into the one folder, and the resumed
  # run continued from round 2's: rounds 1-2 are the first run's lines, timings included.
  assert sorted(os.listdir(two / "checkpoints"))[-1] == "3"
  assert len(first) == 2 and b[:2] == first
  assert not any(name.startswith(".") and "tmp" in name for name in os.listdir(two))


def test_a_bad_spec_is_refused_before_anything_runs(tmp_path, capsys):
  config = tmp_path / "c.yaml"
  config.write_text(yaml.safe_dump({**_CONFIG, "output_dir": str(tmp_path / "out")}))
  assert main(["run", str(config), "--cpu-devices", "1", "--distributed",
               "coordinator=h:1,processes=2"]) == 2
  assert "expected comma-separated key=value" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()


def test_auto_outside_a_cluster_says_what_auto_needs(tmp_path):
  # A fresh process: jax.distributed must start before JAX's backends do.
  config = tmp_path / "c.yaml"
  config.write_text(yaml.safe_dump({**_CONFIG, "output_dir": str(tmp_path / "out")}))
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "SLURM",
                                                                   "OMPI_"))}
  proc = subprocess.run(_cli("run", str(config), "--cpu-devices", "1", "--distributed", "auto"),
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert "JAX_COORDINATOR_ADDRESS" in proc.stderr and "coordinator=HOST:PORT" in proc.stderr
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("differ", ["config", "devices"])
def test_processes_that_disagree_stop_with_an_error_that_names_the_difference(tmp_path, differ):
  config = tmp_path / "c.yaml"
  config.write_text(yaml.safe_dump(_CONFIG))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = xla_flags()
  port = free_port()
  commands = []
  for i in range(2):
    args = ["run", str(config), "--set", f"output_dir={tmp_path / 'out'}", "--no-progress",
            "--distributed", f"coordinator=127.0.0.1:{port},num_processes=2,process_id={i}"]
    # Process 1 runs one more round, or has one device instead of two.
    if differ == "config":
      args += ["--cpu-devices", "2"] + (["--set", "rounds=4"] if i else [])
    else:
      args += ["--cpu-devices", "1" if i else "2"]
    commands.append(_cli(*args))
  errs = [p.stderr for p in run_together(commands, env, timeout=180, returncode=2)]
  what = "config" if differ == "config" else "number of local devices"
  for err in errs:
    assert f"The 2 processes disagree on the {what}: process(es) [1] differ" in err, err[-3000:]
    assert "same config with the same number of devices each" in err
  assert not (tmp_path / "out").exists()  # nothing was written


@pytest.mark.slow
def test_a_sweep_on_two_processes_writes_what_one_process_of_four_devices_writes(tmp_path):
  # A loop sweep of two seeds: each member is a two-process run; process 0 writes the
  # sweep's files, and the members' folders equal a one-process sweep's.
  config = tmp_path / "c.yaml"
  config.write_text(yaml.safe_dump({**_CONFIG, "rounds": 2, "checkpoint": {"every": 0},
                                    "sweep": {"seeds": [4, 5], "mode": "loop"}}))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = xla_flags()
  one, two = tmp_path / "one", tmp_path / "two"
  proc = subprocess.run(_cli("run", str(config), "--set", f"output_dir={one}", "--cpu-devices",
                             "4", "--no-progress"), cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  port = free_port()
  run_together([_cli("run", str(config), "--set", f"output_dir={two}", "--cpu-devices", "2",
                     "--no-progress", "--distributed",
                     f"coordinator=127.0.0.1:{port},num_processes=2,process_id={i}")
                for i in range(2)], env)
  for member in ("seed=4", "seed=5"):
    a = read_metrics(str(one / "members" / member / "metrics.jsonl"))
    b = read_metrics(str(two / "members" / member / "metrics.jsonl"))
    assert [r["round"] for r in b] == [1, 2]  # one line per round: process 0 alone writes
    for ra, rb in zip(_strip(a), _strip(b)):
      assert ra.keys() == rb.keys()
      for k in ra:
        np.testing.assert_allclose(rb[k], ra[k], rtol=1e-5, atol=1e-6, err_msg=f"{member} {k}")
    summary = json.loads((two / "members" / member / "summary.json").read_text())
    assert summary["status"] == "completed" and len(summary["devices"]) == 4
  sweep_a, sweep_b = (json.loads((d / "sweep.json").read_text()) for d in (one, two))
  assert sweep_b["mode"] == "loop" and sweep_b["members"] == 2
  assert [r["status"] for r in sweep_b["results"]] == ["completed", "completed"]
  for ra, rb in zip(sweep_a["results"], sweep_b["results"]):
    assert ra["name"] == rb["name"] and ra["rounds"] == rb["rounds"] == 2
    np.testing.assert_allclose(rb["final_train_loss"], ra["final_train_loss"], rtol=1e-5)
  assert (two / "sweep.md").exists() and (two / "sweep.png").exists()
  assert not any(name.startswith(".") and "tmp" in name for name in os.listdir(two))
