import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from fedjax_sim.runner import run as run_mod
from fedjax_sim.runner.config import config_from_dict, load_config
from fedjax_sim.runner.io import read_metrics
from tests.conftest import REPO, xla_flags

QUICKSTART = os.path.join("experiments", "configs", "quickstart.yaml")
# The quickstart command with tiny settings.
QUICK_SETS = ["--set", "rounds=2", "--set", "data.num_clients=200",
              "--set", "sampling.clients_per_round=20", "--set", "eval.every=1"]
# Even smaller, for the runs that only check the CLI's plumbing.
TINY_SETS = ["--set", "rounds=1", "--set", "data.num_clients=40",
             "--set", "sampling.clients_per_round=8", "--set", "eval.every=0",
             "--set", "engine.block_size=8", "--set", "engine.bucketing=false",
             "--set", "model.hidden=[8]"]
ROUND_KEYS = ("round", "train_loss", "train_accuracy", "clients_per_second",
              "examples_per_second", "padding_efficiency", "participating_clients",
              "update_norm", "eval_accuracy")


def _cli(*args, timeout=300):
  script = os.path.join(os.path.dirname(sys.executable), "fedjax-sim")
  cmd = [script] if os.path.exists(script) else [sys.executable, "-m", "fedjax_sim.runner.cli"]
  env = dict(os.environ)
  env["XLA_FLAGS"] = xla_flags()  # the CLI must set the device count itself
  env["JAX_PLATFORMS"] = "cpu"
  return subprocess.run(cmd + list(args), capture_output=True, text=True, env=env, cwd=REPO,
                        timeout=timeout)


def _check(proc, rc=0):
  assert proc.returncode == rc, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
  return proc


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("cli") / "quick")
  _check(_cli("run", QUICKSTART, *QUICK_SETS, "--set", f"output_dir={out}", "--no-progress"))
  return out


# -- (a) the quickstart --------------------------------------------------------------


def test_quickstart_writes_every_output_file(quick_run):
  assert sorted(os.listdir(quick_run)) == ["checkpoints", "config.yaml", "convergence.png",
                                           "metrics.jsonl",
                                           "summary.json", "tensorboard"]
  (events,) = os.listdir(os.path.join(quick_run, "tensorboard"))  # telemetry's event file
  assert events.startswith("events.out.tfevents.")
  with open(os.path.join(quick_run, "convergence.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_quickstart_config_yaml_is_the_resolved_config(quick_run):
  path = os.path.join(quick_run, "config.yaml")
  with open(path) as f:
    assert isinstance(yaml.safe_load(f), dict)
  sets = [s for s in QUICK_SETS if s != "--set"] + [f"output_dir={quick_run}"]
  expected = dataclasses.replace(load_config(os.path.join(REPO, QUICKSTART), sets),
                                 progress=False)
  assert load_config(path) == expected


def test_quickstart_metrics_have_one_line_per_round(quick_run):
  with open(os.path.join(quick_run, "metrics.jsonl")) as f:
    lines = f.read().splitlines()
  assert len(lines) == 2
  records = [json.loads(line) for line in lines]
  assert [r["round"] for r in records] == [1, 2]
  for r in records:
    missing = [k for k in ROUND_KEYS if k not in r]
    assert not missing, missing
    assert r["participating_clients"] == 20
    assert 0 < r["padding_efficiency"] <= 1
    assert 0 <= r["eval_accuracy"] <= 1 and 0 <= r["train_accuracy"] <= 1


def test_quickstart_summary(quick_run):
  with open(os.path.join(quick_run, "summary.json")) as f:
    summary = json.load(f)
  records = read_metrics(os.path.join(quick_run, "metrics.jsonl"))
  assert summary["rounds"] == 2
  assert summary["final"] == records[-1]
  assert summary["best_eval_accuracy"] == max(r["eval_accuracy"] for r in records)
  assert len(summary["devices"]) == (os.cpu_count() or 1)  # --cpu-devices auto
  placement = summary["data_placement"]  # the quickstart's data fits: resident, and why
  assert placement["data"] == "device" and placement["setting"] == "auto"
  assert "fits" in placement["reason"] and 0 < placement["resident_bytes"]


# -- (b) an existing run is protected ---------------------------------------------------


def test_rerun_into_the_same_output_dir_needs_overwrite(quick_run, tmp_path):
  out = str(tmp_path / "again")
  shutil.copytree(quick_run, out)
  metrics = os.path.join(out, "metrics.jsonl")
  with open(metrics, "rb") as f:
    before = f.read()
  proc = _check(_cli("run", QUICKSTART, *TINY_SETS, "--set", f"output_dir={out}",
                     "--no-progress"), rc=2)
  assert "output_dir" in proc.stderr and "--overwrite" in proc.stderr
  assert "Traceback" not in proc.stderr
  with open(metrics, "rb") as f:
    assert f.read() == before
  # --overwrite replaces the run (one round now, not appended to the two old ones); an
  # explicit device count that differs from 'auto' on a multi-core host is honoured.
  _check(_cli("run", QUICKSTART, *TINY_SETS, "--set", f"output_dir={out}", "--no-progress",
              "--overwrite", "--cpu-devices", "1"))
  assert [r["round"] for r in read_metrics(metrics)] == [1]
  with open(os.path.join(out, "summary.json")) as f:
    assert len(json.load(f)["devices"]) == 1
  assert load_config(os.path.join(out, "config.yaml")).rounds == 1


# -- (c) validate ---------------------------------------------------------------------


def test_validate_reports_an_unknown_key(tmp_path):
  path = tmp_path / "typo.yaml"
  path.write_text("rounds: 2\ndata:\n  num_clients: 10\n  colour: red\n")
  proc = _check(_cli("validate", str(path)), rc=2)
  assert "data.colour" in proc.stderr and "Traceback" not in proc.stderr
  proc = _check(_cli("validate", QUICKSTART, "--set", "rounds=3"))
  assert "valid" in proc.stdout


def test_bad_cpu_devices_value_is_an_error():
  proc = _check(_cli("run", QUICKSTART, "--cpu-devices", "two"), rc=2)
  assert "--cpu-devices" in proc.stderr


# -- (e) device count -------------------------------------------------------------------


def test_cpu_devices_splits_the_host(tmp_path):
  out = str(tmp_path / "two")
  _check(_cli("run", QUICKSTART, *TINY_SETS, "--set", f"output_dir={out}", "--no-progress",
              "--cpu-devices", "2"))
  with open(os.path.join(out, "summary.json")) as f:
    assert len(json.load(f)["devices"]) == 2


# -- (d) an interrupted run keeps its completed rounds ------------------------------------


def _tiny_config(out, rounds):
  return config_from_dict({
      "rounds": rounds, "output_dir": out, "progress": False,
      "data": {"kind": "gaussian_mixture", "num_clients": 20, "examples_per_client": 8,
               "num_features": 4, "num_classes": 3},
      "model": {"kind": "mlp", "hidden": [8]},
      "algorithm": {"batch_size": 4},
      "sampling": {"clients_per_round": 4},
      "engine": {"block_size": 4, "bucketing": False},
      "eval": {"every": 1}})


def test_interrupted_run_keeps_every_completed_round(tmp_path, monkeypatch):
  out = str(tmp_path / "interrupted")
  from fedjax_sim.core import Evaluator
  real_call = Evaluator.__call__
  calls = []

  def dies_at_round_3(self, params):
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt("killed during round 3")
    return real_call(self, params)

  monkeypatch.setattr(Evaluator, "__call__", dies_at_round_3)
  with pytest.raises(KeyboardInterrupt, match="round 3"):
    run_mod.run_experiment(_tiny_config(out, 5), log=lambda *a: None)
  with open(os.path.join(out, "metrics.jsonl"), "rb") as f:
    data = f.read()
  assert data.endswith(b"\n") and data.count(b"\n") == 2
  records = read_metrics(os.path.join(out, "metrics.jsonl"))
  assert [r["round"] for r in records] == [1, 2]
  assert all("eval_accuracy" in r and "train_loss" in r for r in records)
  assert not os.path.exists(os.path.join(out, "summary.json"))


def test_run_after_a_torn_first_line_starts_a_clean_log(tmp_path):
  out = tmp_path / "torn"
  out.mkdir()
  (out / "metrics.jsonl").write_text('{"round": 1, "train_lo')  # machine died mid-write
  run_mod.run_experiment(_tiny_config(str(out), 1), log=lambda *a: None)
  assert [r["round"] for r in read_metrics(str(out / "metrics.jsonl"))] == [1]


def test_components_lists_every_registered_component_with_its_keys(capsys):
  from fedjax_sim.runner.cli import main
  assert main(["components", "algorithm", "--import", "tests.runner.plugin_algorithm"]) == 0
  out = capsys.readouterr().out
  assert out.startswith("algorithm.name:\n")
  assert "  fedprox: FedProx (Li et al. 2020)" in out and "      mu: a number = 0.01" in out
  assert "  scaled_fedavg: FedAvg with the server step scaled by `scale`." in out  # a plugin's
  assert "client_optimizer: OptimizerConfig = {name: sgd, learning_rate: 0.1}" in out
  assert main(["components", "compression"]) == 0
  assert "      bits: an integer = 8" in capsys.readouterr().out
  assert main(["components", "optimizer"]) == 2
  assert "No component section 'optimizer'" in capsys.readouterr().err
