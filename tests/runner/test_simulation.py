"""The Python API: `fedjax_sim.Simulation` with a script's own data, model, algorithm."""

import dataclasses
import hashlib
import json
import os

import dp_accounting
import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
import yaml
from dp_accounting import rdp
from flax import nnx

import fedjax_sim as fs
from fedjax_sim.runner.io import read_metrics
from tests.conftest import run_python, xla_flags

# Keys of a round record that are wall-clock measurements (differ between equal runs).
TIMING = {"round_seconds", "clients_per_second", "examples_per_second", "eval_seconds"}


def _quiet(*a, **k):
  pass


def _blobs(n=480, features=6, classes=3, sep=4.0, seed=0):
  """Well-separated Gaussian blobs: x float32 `[n, features]`, y int `[n]`."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, classes, n)
  x = (rng.normal(size=(n, features)) + sep * np.eye(classes, features)[y]).astype(np.float32)
  return x, y


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))


class NnxNet(nnx.Module):
  def __init__(self, *, rngs):
    self.hidden = nnx.Linear(6, 8, rngs=rngs)
    self.out = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


def _config(out, rounds=2, **sections):
  """A tiny config: 6 clients a round, blocks of 4, eval and checkpoint every round."""
  base = dict(rounds=rounds, output_dir=str(out), progress=False, seed=3,
              algorithm=fs.FedAvgConfig(batch_size=4),
              sampling=fs.CohortConfig(clients_per_round=6),
              engine=fs.EngineSection(block_size=4), eval=fs.EvalConfig(every=1),
              checkpoint=fs.CheckpointSection(every=1))
  base.update(sections)
  return fs.Config(**base)


def _metrics(out):
  return read_metrics(os.path.join(str(out), "metrics.jsonl"))


def _without_timing(records):
  return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def _fingerprint_by_hand(data):
  """The documented data fingerprint (sizes, then each feature's name:dtype:shape and bytes)."""
  h = hashlib.sha256(np.asarray(data.sizes, np.int64).tobytes())
  for name in sorted(data.features):
    a = np.ascontiguousarray(np.asarray(data.features[name]))
    h.update(f"{name}:{a.dtype}:{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]


# -- 1. a script's data and linen model: the CLI's output folder ------------------------


def test_script_data_and_linen_model_write_the_cli_output_folder(tmp_path):
  x, y = _blobs()
  data = fs.dirichlet_partition(x, y, num_clients=24, alpha=1.0, seed=0, min_size=4)
  model = fs.flax_classifier(LinenNet(), (6,))
  out = tmp_path / "run"
  sim = fs.Simulation(_config(out), data=data, model=model)
  summary = sim.run(log=_quiet)

  assert sorted(os.listdir(out)) == ["checkpoints", "config.yaml", "convergence.png",
                                     "metrics.jsonl", "summary.json", "tensorboard"]
  with open(out / "convergence.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert "2" in os.listdir(out / "checkpoints")
  records = _metrics(out)
  assert [r["round"] for r in records] == [1, 2]
  assert all(np.isfinite(r["train_loss"]) and "eval_accuracy" in r for r in records)
  assert all(r["participating_clients"] == 6 for r in records)
  saved_summary = json.load(open(out / "summary.json"))
  assert saved_summary["status"] == summary["status"] == "completed"
  assert saved_summary["rounds"] == 2
  assert saved_summary["versions"]["fedjax_sim"] == fs.__version__

  saved = yaml.safe_load(open(out / "config.yaml"))
  assert saved["data"]["kind"] == "script" and saved["model"]["kind"] == "script"
  assert saved["data"]["fingerprint"] == _fingerprint_by_hand(data)
  assert saved["data"]["description"].startswith(f"24 clients, {len(y)} examples")
  n_params = 6 * 8 + 8 + 8 * 3 + 3
  assert saved["model"]["description"] == f"4 parameter arrays, {n_params} parameters"
  assert len(saved["model"]["fingerprint"]) == 16
  # The evaluation split follows the config's data section (the default test_fraction).
  assert saved["data"]["test_fraction"] == fs.Config().data.test_fraction
  # config.yaml reads back (validates) to the run's config.
  assert fs.load_config(str(out / "config.yaml")) == sim.config


def test_script_objects_equal_to_the_registry_ones_give_the_registry_run(tmp_path):
  gm = fs.GaussianMixtureConfig(num_clients=24, examples_per_client=8, num_features=6,
                                num_classes=3)
  registry = _config(tmp_path / "registry", data=gm, model=fs.MLPConfig(hidden=(8,)))
  fs.Simulation(registry).run(log=_quiet)
  # What the registry builds for that data and model section, made by the script.
  data = fs.gaussian_mixture(24, 8, 6, 3, seed=registry.seed, label_skew=gm.label_skew)
  model = fs.mlp((6,), 3, hidden=(8,))
  script = dataclasses.replace(registry, output_dir=str(tmp_path / "script"))
  fs.Simulation(script, data=data, model=model).run(log=_quiet)

  theirs, mine = _metrics(tmp_path / "registry"), _metrics(tmp_path / "script")
  assert [r["round"] for r in mine] == [r["round"] for r in theirs] == [1, 2]
  for a, b in zip(mine, theirs):
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
    assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-6)
  assert yaml.safe_load(open(tmp_path / "registry" / "config.yaml"))["data"]["kind"] == \
      "gaussian_mixture"


# -- 2. resume with the same objects; different data is refused -------------------------


def test_resume_with_the_same_objects_equals_an_uninterrupted_run(tmp_path):
  x, y = _blobs(n=240)
  data = fs.iid_partition(x, y, num_clients=20, seed=1)
  model = fs.flax_classifier(LinenNet(), (6,))
  part, whole = tmp_path / "part", tmp_path / "whole"
  fs.Simulation(_config(part, rounds=2), data=data, model=model).run(log=_quiet)
  assert [r["round"] for r in _metrics(part)] == [1, 2]
  summary = fs.Simulation(_config(part, rounds=4), data=data, model=model).run(
      resume=True, log=_quiet)
  assert summary["status"] == "completed" and summary["rounds"] == 4
  fs.Simulation(_config(whole, rounds=4), data=data, model=model).run(log=_quiet)
  resumed, straight = _metrics(part), _metrics(whole)
  assert [r["round"] for r in resumed] == [1, 2, 3, 4]
  assert _without_timing(resumed) == _without_timing(straight)

  # One label changed: the fingerprint differs and resume refuses, naming it.
  y2 = y.copy()
  y2[17] = (y2[17] + 1) % 3
  other = fs.iid_partition(x, y2, num_clients=20, seed=1)
  with pytest.raises(fs.RunError, match=r"data\.fingerprint"):
    fs.Simulation(_config(part, rounds=6), data=other, model=model).run(resume=True, log=_quiet)
  # Another architecture: the model fingerprint differs.
  wider = fs.mlp((6,), 3, hidden=(9,))
  with pytest.raises(fs.RunError, match=r"model\.fingerprint"):
    fs.Simulation(_config(part, rounds=6), data=data, model=wider).run(resume=True, log=_quiet)
  assert [r["round"] for r in _metrics(part)] == [1, 2, 3, 4]  # nothing touched


# -- 3. a Flax NNX model through a factory ------------------------------------------------


def test_nnx_factory_model_inits_from_the_key_and_trains(tmp_path):
  model = fs.flax_classifier(lambda rngs: NnxNet(rngs=rngs), (6,))
  p0, p0_again, p1 = (model.init(jax.random.key(k)) for k in (0, 0, 1))
  leaves0, leaves0_again, leaves1 = (jax.tree.leaves(p) for p in (p0, p0_again, p1))
  assert len(leaves0) == 4
  assert all(np.array_equal(a, b) for a, b in zip(leaves0, leaves0_again))
  kernels = [a for a in leaves1 if a.ndim == 2]
  assert kernels and all(not np.array_equal(a, b) for a, b in zip(
      [a for a in leaves0 if a.ndim == 2], kernels))
  # apply is the module's forward pass with those parameters, computed here by hand.
  xb = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)
  h, o = (jax.tree.map(np.asarray, p0[k]) for k in ("hidden", "out"))
  by_hand = np.maximum(xb @ h["kernel"] + h["bias"], 0) @ o["kernel"] + o["bias"]
  np.testing.assert_allclose(model.apply(p0, {"x": xb}), by_hand, rtol=1e-5, atol=1e-6)

  x, y = _blobs(n=480, sep=6.0, seed=5)
  data = fs.iid_partition(x, y, num_clients=24, seed=0)
  config = _config(tmp_path / "nnx", rounds=3, sampling=fs.CohortConfig(clients_per_round=12),
                   algorithm=fs.FedAvgConfig(batch_size=4,
                                             client_optimizer=fs.OptimizerConfig("sgd", 0.1)))
  fs.Simulation(config, data=data, model=model).run(log=_quiet)
  records = _metrics(tmp_path / "nnx")
  train = [r["train_loss"] for r in records]
  evals = [r["eval_loss"] for r in records]
  assert len(records) == 3
  assert train[0] > train[1] > train[2], train
  assert evals[0] > evals[1] > evals[2], evals
  assert records[-1]["eval_accuracy"] > 0.9


# -- 4. DP-FedAvg calibrated to a target epsilon ---------------------------------------


def test_dp_fedavg_with_a_target_epsilon_from_a_script(tmp_path):
  x, y = _blobs(n=400)
  data = fs.iid_partition(x, y, num_clients=40, seed=2)
  target = 2.0
  out = tmp_path / "dp"
  config = _config(out, rounds=3, sampling=fs.PoissonConfig(rate=0.3),
                   algorithm=fs.FedAvgConfig(batch_size=4, weighting="uniform"),
                   privacy=fs.DPFedAvgConfig(target_epsilon=target, clip_norm=0.5))
  summary = fs.Simulation(config, data=data, model=fs.flax_classifier(LinenNet(), (6,))).run(
      log=_quiet)
  report = json.load(open(out / "privacy_report.json"))
  assert report["noise_multiplier"] > 0 and report["rounds"] == 3
  assert 0.99 * target <= report["epsilon"] <= target
  # What dp-accounting says for that noise, rate and number of rounds.
  by_hand = rdp.RdpAccountant().compose(dp_accounting.PoissonSampledDpEvent(
      0.3, dp_accounting.GaussianDpEvent(report["noise_multiplier"])), 3).get_epsilon(
          report["delta"])
  assert report["epsilon"] == pytest.approx(by_hand, rel=1e-9)
  per_round = [r["dp_epsilon"] for r in _metrics(out)]
  assert len(per_round) == 3 and all(a < b for a, b in zip(per_round, per_round[1:]))
  assert per_round[-1] == report["epsilon"] == summary["privacy"]["epsilon"]
  assert os.path.exists(out / "privacy_report.md")


# -- 5. validation from Python ------------------------------------------------------------


def test_sections_built_in_python_are_validated_like_yaml(tmp_path):
  with pytest.raises(fs.ConfigError, match=r"algorithm\.mu"):
    fs.Simulation(fs.Config(algorithm=fs.FedProxConfig(mu=-1.0)))
  with pytest.raises(fs.ConfigError, match=r"engine\.block_size"):
    fs.validate(fs.Config(engine=fs.EngineSection(block_size=0)))
  # A script's population is known when the run builds it: refused then, before any write.
  sim = fs.Simulation(_config(tmp_path / "v", sampling=fs.CohortConfig(clients_per_round=30)),
                      data=fs.iid_partition(*_blobs(n=100), num_clients=10, seed=0))
  with pytest.raises(fs.ConfigError, match=r"clients_per_round = 30 but the data has only 10"):
    sim.run(log=_quiet)
  assert not os.path.exists(tmp_path / "v")


def test_objects_that_cannot_combine_with_the_config_are_refused(tmp_path):
  model = fs.flax_classifier(LinenNet(), (6,))
  algorithm = fs.fedavg(model, optax.sgd(0.1), optax.sgd(1.0), fs.LocalConfig(batch_size=4))
  local_dp = fs.Config(output_dir=str(tmp_path / "a"),
                       privacy=fs.LocalDPSGDConfig(noise_multiplier=1.0, clip_norm=1.0))
  fs.validate(local_dp)  # fine with a registered algorithm
  with pytest.raises(fs.ConfigError, match=r"(?s)local_dp_sgd.*Register the algorithm"):
    fs.Simulation(local_dp, algorithm=algorithm)

  dp = fs.Config(output_dir=str(tmp_path / "b"), sampling=fs.PoissonConfig(rate=0.2),
                 algorithm=fs.FedAvgConfig(weighting="uniform"),
                 privacy=fs.DPFedAvgConfig(noise_multiplier=1.0))
  fs.validate(dp)
  with pytest.raises(fs.ConfigError, match="aggregator object"):
    fs.Simulation(dp, aggregator=fs.weighted_mean())
  with pytest.raises(fs.ConfigError, match="aggregator object"):
    fs.Simulation(fs.Config(compression=fs.QuantizeConfig(bits=8)), aggregator=fs.weighted_mean())
  alone = fs.Simulation(fs.Config(), aggregator=fs.weighted_mean())  # alone it is accepted
  assert alone.config.compression.method == "script"  # and recorded in config.yaml
  # The object's declared weighting is what the DP rules read.
  with pytest.raises(fs.ConfigError, match="weighting = 'uniform'"):
    fs.Simulation(dp, algorithm=algorithm, weighting="examples")
  with pytest.raises(TypeError, match="FederatedData"):
    fs.Simulation(fs.Config(), data=_blobs())
  with pytest.raises(TypeError, match="Model"):
    fs.Simulation(fs.Config(), model=LinenNet())
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("case", ["population", "weighting"])
def test_rules_read_the_script_objects_not_the_sections_they_replace(tmp_path, case):
  if case == "population":
    # 150 clients, 120 a round; the config's (replaced) default data section says 100 clients.
    data = fs.iid_partition(*_blobs(n=600), num_clients=150, seed=0)
    sim = fs.Simulation(fs.Config(sampling=fs.CohortConfig(clients_per_round=120)), data=data)
    assert sim.config.data.kind == "script"
  else:
    # The object weights uniformly; the config's own (replaced) FedAvg section says "examples".
    model = fs.logistic_regression((6,), 3)
    algorithm = fs.fedavg(model, optax.sgd(0.1), optax.sgd(1.0), fs.LocalConfig(batch_size=4),
                          weighting="uniform")
    dp = fs.Config(sampling=fs.PoissonConfig(rate=0.2),
                   privacy=fs.DPFedAvgConfig(noise_multiplier=1.0))
    sim = fs.Simulation(dp, algorithm=algorithm, weighting="uniform")
    assert sim.config.algorithm.name == "script"


# -- 6. a ready Algorithm object ------------------------------------------------------


def test_algorithm_object_runs_and_its_config_yaml_cannot_be_rebuilt_from_a_file(tmp_path):
  gm = fs.GaussianMixtureConfig(num_clients=24, examples_per_client=8, num_features=6,
                                num_classes=3)
  out = tmp_path / "alg"
  config = _config(out, data=gm, model=fs.LogRegConfig(),
                   algorithm=fs.FedAvgConfig(batch_size=8))  # replaced by the object
  model = fs.logistic_regression((6,), 3)  # what the registry builds for this data
  algorithm = fs.fedavg(model, optax.sgd(0.1), optax.sgd(1.0),
                        fs.LocalConfig(batch_size=4, epochs=2, shuffle=False))
  summary = fs.Simulation(config, algorithm=algorithm).run(log=_quiet)
  assert summary["status"] == "completed" and len(_metrics(out)) == 2

  saved = yaml.safe_load(open(out / "config.yaml"))
  assert saved["algorithm"]["name"] == "script"
  assert (saved["algorithm"]["batch_size"], saved["algorithm"]["local_epochs"],
          saved["algorithm"]["shuffle"]) == (4, 2, False)
  assert saved["data"]["kind"] == "gaussian_mixture"  # built from the registry
  # The same run from the registry's fedavg with those local settings: the same metrics.
  same = _config(tmp_path / "fedavg", data=gm, model=fs.LogRegConfig(),
                 algorithm=fs.FedAvgConfig(batch_size=4, local_epochs=2, shuffle=False))
  fs.Simulation(same).run(log=_quiet)
  for a, b in zip(_metrics(out), _metrics(tmp_path / "fedavg")):
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)

  # config.yaml validates (as `fedjax-sim validate` does), but cannot be run from the file.
  loaded = fs.load_config(str(out / "config.yaml"))
  assert loaded.algorithm.name == "script" and loaded.algorithm.batch_size == 4
  again = dataclasses.replace(loaded, output_dir=str(tmp_path / "again"))
  with pytest.raises(fs.ConfigError, match=r"(?s)algorithm\.name = 'script'.*"
                                           r"Simulation\(config, algorithm=\.\.\.\)"):
    fs.run_experiment(again, log=_quiet)
  assert not os.path.exists(tmp_path / "again" / "metrics.jsonl")


# -- 7. use_cpu_devices --------------------------------------------------------------------


def test_use_cpu_devices_splits_the_cpu_before_jax_starts():
  code = "\n".join([
      "import fedjax_sim as fs, jax, jax.numpy as jnp",
      "print('asked', fs.use_cpu_devices(3))",
      "print('devices', len(jax.devices()))",
      "print('sum', int(jnp.arange(4).sum()))",
      "print('same', fs.use_cpu_devices(3))",
      "try:",
      "  fs.use_cpu_devices(5)",
      "except RuntimeError as e:",
      "  print('error', e)",
  ])
  lines = run_python(code, env_extra={"XLA_FLAGS": xla_flags(), "JAX_PLATFORMS": "cpu"}).splitlines()
  assert lines[:4] == ["asked 3", "devices 3", "sum 6", "same 3"]
  assert lines[4].startswith("error ") and "before any JAX computation" in lines[4]
  assert "3 CPU device" in lines[4]


@pytest.mark.parametrize("count", [0, -2, "x", "0", True, 2.0])
def test_use_cpu_devices_rejects_what_is_not_a_positive_count(count):
  with pytest.raises(ValueError, match="positive integer"):
    fs.use_cpu_devices(count)


def test_run_experiment_checks_a_config_built_in_python_like_a_file(tmp_path):
  # DP with example weights breaks the sensitivity bound; the rule must run even
  # when the Config never went through a file.
  dp = fs.Config(output_dir=str(tmp_path / "dp"), progress=False,
                 sampling=fs.PoissonConfig(rate=0.2),
                 privacy=fs.DPFedAvgConfig(noise_multiplier=1.0))
  with pytest.raises(fs.ConfigError, match="set algorithm.weighting = 'uniform'"):
    fs.run_experiment(dp, log=lambda *a: None)
  with pytest.raises(fs.ConfigError, match="algorithm.mu = -1.0 must be >= 0"):
    fs.run_experiment(fs.Config(algorithm=fs.FedProxConfig(mu=-1.0)), log=lambda *a: None)
  assert not os.listdir(tmp_path)
