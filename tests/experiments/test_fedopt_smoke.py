"""experiments/reproduce/fedopt.py: presets, the missing-data message and the smoke run.

The smoke run generates tiny files in TFF's SQLite schema and runs them through
the real loader, the presets and the runner; it checks the outputs' shape,
never the (meaningless) accuracies.
"""

import glob
import importlib.util
import json
import math
import os

import pytest

from tests.conftest import REPO

SCRIPT = os.path.join(REPO, "experiments", "reproduce", "fedopt.py")


@pytest.fixture(scope="module")
def fedopt():
  spec = importlib.util.spec_from_file_location("fedopt_reproduction", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_presets_on_disk_are_the_scripts_and_validate(fedopt):
  from fedjax_sim.runner.config import load_config
  paths = sorted(glob.glob(os.path.join(fedopt.PRESETS, "*.yaml")))
  assert len(paths) == len(fedopt.TASKS) * len(fedopt.OPTIMIZERS) == 20
  for task in fedopt.TASKS:
    for opt in fedopt.OPTIMIZERS:
      path = os.path.join(fedopt.PRESETS, f"{task}_{opt}.yaml")
      with open(path) as f:
        assert f.read() == fedopt.preset_text(task, opt), f"{path} differs; --write-presets"
      c = load_config(path)
      eta_l, eta, tau = fedopt.HPARAMS[task][opt]
      a = c.algorithm
      assert a.client_optimizer.name == "sgd" and a.local_epochs == 1
      assert a.client_optimizer.learning_rate == pytest.approx(10 ** eta_l, rel=1e-12)
      assert a.server_optimizer.learning_rate == pytest.approx(10 ** eta, rel=1e-12)
      assert a.batch_size == fedopt.SETUP[task]["batch"]
      assert c.sampling.clients_per_round == fedopt.SETUP[task]["clients"]
      assert c.rounds == fedopt.SETUP[task]["rounds"]
      if opt in ("fedavg", "fedavgm"):
        assert a.name == "fedavg" and a.server_optimizer.name == "sgd"
        assert a.server_optimizer.kwargs == ({"momentum": 0.9} if opt == "fedavgm" else {})
      else:
        assert a.name == opt and a.tau == pytest.approx(10 ** tau, rel=1e-12)
        assert a.server_optimizer.kwargs == (
            {"b1": 0.0} if opt == "fedadagrad" else {"b1": 0.9, "b2": 0.99})


def test_missing_data_is_named_with_its_url_and_nothing_runs(fedopt, tmp_path, capsys):
  data = tmp_path / "data"
  data.mkdir()
  (data / "emnist_all.sqlite").write_bytes(b"")  # a decompressed copy counts
  out = tmp_path / "out"
  code = fedopt.main(["--data-dir", str(data), "--tasks", "emnist,stackoverflow_nwp",
                      "--out", str(out)])
  err = capsys.readouterr().err
  assert code != 0
  assert "stackoverflow.sqlite.lzma" in err and "stackoverflow.word_count" in err
  assert fedopt.BUCKET + "stackoverflow.sqlite.lzma" in err
  assert fedopt.BUCKET + "stackoverflow.word_count.tar.bz2" in err
  assert "emnist_all" not in err and "nothing was run" in err
  assert not out.exists()


@pytest.mark.slow
# CIFAR-100's ResNet (its compile alone takes about a minute on 2 cores) and Stack
# Overflow's word LSTM are left out of the smoke test: the contract suite builds and
# differentiates both models, the preset test validates their configs, and
# tests/datasets/test_tff_sqlite.py converts their files.
@pytest.mark.parametrize("tasks", ["emnist,shakespeare"])
def test_smoke_run_writes_every_task_with_finite_metrics(fedopt, tmp_path, tasks):
  # One optimizer per task, and the ResNet (whose programs take most of the compile
  # time) apart, keep each case under a minute on 2 cores; the script's default smoke
  # grid is all 20 presets.
  out = tmp_path / "smoke"
  assert fedopt.main(["--smoke", "--tasks", tasks, "--optimizers", "fedyogi",
                      "--out", str(out)]) == 0
  for name in ("results.md", "results.json", "accuracy.png"):
    assert (out / name).stat().st_size > 0
  report = json.loads((out / "results.json").read_text())
  assert report["smoke"] is True and "meaningless" in report["note"]
  assert "SMOKE RUN" in (out / "results.md").read_text()
  runs = {(r["task"], r["optimizer"]): r for r in report["results"]}
  assert set(runs) == {(t, "fedyogi") for t in tasks.split(",")}
  for r in runs.values():
    assert r["status"] == "completed" and r["rounds_run"] == 2
    for key in ("final_accuracy", "best_accuracy", "mean_accuracy_last_100_rounds", "final_loss",
                "seconds_per_round"):
      assert math.isfinite(r[key]), (r["task"], key)
    assert 0 <= r["final_accuracy"] <= 100 and r["eval_examples"] > 0
    assert r["curve"]["round"] == [1, 2]
