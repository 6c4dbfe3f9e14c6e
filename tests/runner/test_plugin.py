"""Acceptance check for "a component is one file": an algorithm registered by a
module outside the package runs from a YAML config through the whole runner."""

import os

import pytest
import yaml

from fedjax_sim.runner.config import ConfigError, load_config
from fedjax_sim.runner.io import read_metrics
from fedjax_sim.runner.run import run_experiment

PLUGIN = "tests.runner.plugin_algorithm"

_COMMON = {
    "seed": 4, "rounds": 3, "progress": False,
    "data": {"kind": "gaussian_mixture", "num_clients": 24, "num_features": 5, "num_classes": 3,
             "examples_per_client": 8},
    "model": {"kind": "logreg"},
    "sampling": {"clients_per_round": 6}, "engine": {"block_size": 4},
    "eval": {"every": 0}, "checkpoint": {"every": 0},
}


def _write(tmp_path, name, algorithm, **top):
  raw = {**_COMMON, "output_dir": str(tmp_path / name), "algorithm": algorithm, **top}
  path = tmp_path / f"{name}.yaml"
  path.write_text(yaml.safe_dump(raw))
  return str(path)


def test_a_plugin_algorithm_runs_from_yaml_and_equals_its_independent_equivalent(tmp_path):
  path = _write(tmp_path, "plugin", {"name": "scaled_fedavg", "scale": 0.5, "batch_size": 4},
                imports=[PLUGIN])
  config = load_config(path)
  assert config.algorithm.name == "scaled_fedavg" and config.algorithm.scale == 0.5
  summary = run_experiment(config, log=lambda *a: None)
  assert summary["status"] == "completed" and summary["rounds"] == 3
  # FedAvg with server SGD at learning rate 0.5 takes the same steps.
  ref = load_config(_write(tmp_path, "ref", {
      "name": "fedavg", "batch_size": 4, "server_optimizer": {"learning_rate": 0.5}}))
  run_experiment(ref, log=lambda *a: None)
  mine = read_metrics(os.path.join(config.output_dir, "metrics.jsonl"))
  theirs = read_metrics(os.path.join(ref.output_dir, "metrics.jsonl"))
  for a, b in zip(mine, theirs):
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
  assert mine[-1]["eval_loss"] == pytest.approx(theirs[-1]["eval_loss"], rel=1e-5)
  # The resolved config.yaml names the plugin module, so --resume finds it again.
  saved = yaml.safe_load(open(os.path.join(config.output_dir, "config.yaml")))
  assert saved["imports"] == [PLUGIN] and saved["algorithm"]["scale"] == 0.5


def test_a_plugin_config_is_validated_like_a_builtin(tmp_path):
  with pytest.raises(ConfigError, match=r"algorithm.scale = -1.0 must be > 0"):
    load_config(_write(tmp_path, "a", {"name": "scaled_fedavg", "scale": -1}, imports=[PLUGIN]))
  with pytest.raises(ConfigError, match=r"Did you mean 'scale'\?"):
    load_config(_write(tmp_path, "b", {"name": "scaled_fedavg", "scael": 1}, imports=[PLUGIN]))
  with pytest.raises(ConfigError, match="refused with privacy"):  # its own declared rule
    load_config(_write(tmp_path, "c", {"name": "scaled_fedavg", "scale": 3.0}, imports=[PLUGIN],
                       privacy={"mechanism": "local_dp_sgd", "noise_multiplier": 1.0}))


def test_a_missing_plugin_module_names_the_module(tmp_path):
  with pytest.raises(ConfigError, match="cannot import 'no_such_plugin_module'"):
    load_config(_write(tmp_path, "m", {"name": "fedavg"}, imports=["no_such_plugin_module"]))
