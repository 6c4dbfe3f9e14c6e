"""Every algorithm name in the config schema builds and runs end to end."""

import math
import typing

import pytest

from fedjax_sim.runner.config import AlgorithmConfig, config_from_dict
from fedjax_sim.runner.io import read_metrics
from fedjax_sim.runner.run import run_experiment

NAMES = typing.get_args(typing.get_type_hints(AlgorithmConfig)["name"])


@pytest.mark.parametrize("name", NAMES)
def test_algorithm_runs_from_config(name, tmp_path):
  server_lr = 0.01 if name in ("fedadam", "fedyogi", "fedadagrad") else 1.0
  config = config_from_dict({
      "seed": 1, "rounds": 2, "output_dir": str(tmp_path / name), "progress": False,
      "data": {"kind": "gaussian_mixture", "num_clients": 40, "num_features": 6,
               "num_classes": 3, "examples_per_client": 8},
      "model": {"kind": "mlp", "hidden": [8]},
      "algorithm": {"name": name, "batch_size": 4,
                    "server_optimizer": {"learning_rate": server_lr}},
      "sampling": {"clients_per_round": 8},
      "engine": {"block_size": 4},
      "eval": {"every": 1}})
  run_experiment(config, log=lambda *a: None)
  records = read_metrics(str(tmp_path / name / "metrics.jsonl"))
  assert [r["round"] for r in records] == [1, 2]
  for r in records:
    assert r["participating_clients"] == 8
    assert math.isfinite(r["train_loss"]) and math.isfinite(r["eval_loss"])
    assert r["update_norm"] > 0


def test_ditto_reports_personalized_metrics(tmp_path):
  config = config_from_dict({
      "seed": 1, "rounds": 2, "output_dir": str(tmp_path / "d"), "progress": False,
      "data": {"kind": "gaussian_mixture", "num_clients": 40, "num_features": 6,
               "num_classes": 3, "examples_per_client": 8},
      "model": {"kind": "mlp", "hidden": [8]},
      "algorithm": {"name": "ditto", "batch_size": 4, "lam": 0.5},
      "sampling": {"clients_per_round": 8}, "engine": {"block_size": 4},
      "eval": {"every": 1, "max_clients": 10}})
  run_experiment(config, log=lambda *a: None)
  last = read_metrics(str(tmp_path / "d" / "metrics.jsonl"))[-1]
  assert last["eval_clients"] == last["eval_personal_clients"] == 10
  for key in ("eval_personal_accuracy", "eval_personal_accuracy_client_p10", "eval_accuracy"):
    assert 0 <= last[key] <= 1
