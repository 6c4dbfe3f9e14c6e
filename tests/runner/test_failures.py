"""Clear failures: divergence, signals, bad .npz data, a failed start, the compile cache."""

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import yaml

from fedjax_sim.runner.config import ConfigError, config_from_dict, to_dict
from fedjax_sim.runner.io import read_metrics
from fedjax_sim.runner.run import DivergenceError, Interrupted, run_experiment
from tests.conftest import xla_flags


def _raw(out, rounds=3, **sections):
  raw = {"seed": 0, "rounds": rounds, "output_dir": out, "progress": False,
         "data": {"kind": "gaussian_mixture", "num_clients": 24, "examples_per_client": 8,
                  "num_features": 4, "num_classes": 3},
         "model": {"kind": "mlp", "hidden": [8]},
         "algorithm": {"batch_size": 4},
         "sampling": {"clients_per_round": 6},
         "engine": {"block_size": 4, "bucketing": False},
         "checkpoint": {"every": 1}, "eval": {"every": 1}}
  for name, values in sections.items():
    raw.setdefault(name, {}).update(values)
  return raw


def _quiet(*_):
  pass


# -- divergence -------------------------------------------------------------------------


def diverging_raw(folder, out, raw=None, **sections):
  """A 6-round run that diverges: inputs of size ~1e4 (an npz file written into `folder`)
  and a client learning rate of 1e6 make the model non-finite after the first round or
  soon after. `raw(out, rounds, **sections)` builds the base config (default `_raw`)."""
  path = str(folder / "big.npz")
  rng = np.random.default_rng(0)
  np.savez(path, x=(rng.normal(size=(96, 4)) * 1e4).astype(np.float32),
           y=rng.integers(0, 3, 96))
  cfg = (raw or _raw)(out, rounds=6, algorithm={"client_optimizer": {
      "name": "sgd", "learning_rate": 1e6}}, **sections)
  cfg["data"] = {"kind": "npz", "path": path, "num_clients": 12, "partition": "iid"}
  return cfg


def test_a_diverging_run_stops_at_that_round_and_keeps_what_it_wrote(tmp_path):
  out = str(tmp_path / "div")
  raw = diverging_raw(tmp_path, out)
  with pytest.warns(UserWarning, match="unscaled"):
    with pytest.raises(DivergenceError) as e:
      run_experiment(config_from_dict(raw), log=_quiet)
  records = read_metrics(os.path.join(out, "metrics.jsonl"))
  r = records[-1]["round"]
  message = str(e.value)
  assert f"Round {r} made the global model non-finite" in message
  assert "learning_rate = 1000000.0" in message and "Lower the learning rate" in message
  assert [x["round"] for x in records] == list(range(1, r + 1))
  for x in records[:-1]:
    assert math.isfinite(float(x["train_loss"]))
  summary = json.load(open(os.path.join(out, "summary.json")))
  assert summary["status"] == "diverged" and summary["rounds"] == r
  ckpts = [int(n) for n in os.listdir(os.path.join(out, "checkpoints")) if n.isdigit()] \
      if os.path.isdir(os.path.join(out, "checkpoints")) else []
  assert all(c < r for c in ckpts)  # the non-finite state is never checkpointed
  if r > 1:
    assert max(ckpts) == r - 1  # the last good round (checkpoint.every = 1)


# -- signals ----------------------------------------------------------------------------


def _signal_when(path, rounds, sig):
  def watch():
    deadline = time.time() + 120
    while time.time() < deadline:
      if os.path.exists(path) and len(read_metrics(path)) >= rounds:
        os.kill(os.getpid(), sig)
        return
      time.sleep(0.002)
  t = threading.Thread(target=watch, daemon=True)
  t.start()
  return t


def test_sigterm_stops_after_the_round_with_a_checkpoint_and_resume_continues(tmp_path):
  out = str(tmp_path / "term")
  config = config_from_dict(_raw(out, rounds=400, eval={"every": 0},
                                 checkpoint={"every": 0}))
  _signal_when(os.path.join(out, "metrics.jsonl"), 2, signal.SIGTERM)
  with pytest.raises(Interrupted, match="interrupted by SIGTERM after round") as e:
    run_experiment(config, log=_quiet)
  done = e.value.rounds_done
  assert e.value.signal_number == signal.SIGTERM and 2 <= done < 400
  records = read_metrics(os.path.join(out, "metrics.jsonl"))
  assert [r["round"] for r in records] == list(range(1, done + 1))
  assert sorted(int(n) for n in os.listdir(os.path.join(out, "checkpoints"))
                if n.isdigit()) == [done]  # checkpoint.every = 0, yet saved at the stop
  assert json.load(open(os.path.join(out, "summary.json")))["status"].startswith("interrupted")
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
  run_experiment(config_from_dict({**_raw(out, rounds=done + 2, eval={"every": 0},
                                          checkpoint={"every": 0})}), resume=True, log=_quiet)
  assert [r["round"] for r in read_metrics(os.path.join(out, "metrics.jsonl"))] == \
      list(range(1, done + 3))


def _cli(*args):
  script = os.path.join(os.path.dirname(sys.executable), "fedjax-sim")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = xla_flags()
  return [script, *args], env


def test_ctrl_c_prints_the_resume_command_and_no_traceback(tmp_path):
  out = str(tmp_path / "int")
  path = tmp_path / "c.yaml"
  path.write_text(yaml.safe_dump(_raw(out, rounds=1000, eval={"every": 0},
                                      checkpoint={"every": 0})))
  cmd, env = _cli("run", str(path), "--set", "seed=1", "--cpu-devices", "1")
  p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(out, "metrics.jsonl")
  deadline = time.time() + 120
  while time.time() < deadline and p.poll() is None:
    if os.path.exists(metrics) and len(read_metrics(metrics)) >= 2:
      p.send_signal(signal.SIGINT)
      break
    time.sleep(0.005)
  stdout, stderr = p.communicate(timeout=120)
  assert p.returncode == 128 + signal.SIGINT, stderr
  assert "Traceback" not in stderr
  assert f"fedjax-sim run {path} --set seed=1 --resume {out}" in stderr
  assert "acc=nan" not in stderr  # the progress bar shows no accuracy before an evaluation
  done = len(read_metrics(metrics))
  assert sorted(int(n) for n in os.listdir(os.path.join(out, "checkpoints"))
                if n.isdigit()) == [done]


# -- bad .npz data, and a failed start ---------------------------------------------------


def _npz_config(tmp_path, x, y):
  path = str(tmp_path / "d.npz")
  np.savez(path, x=x, y=y)
  raw = _raw(str(tmp_path / "out"), rounds=1)
  raw["data"] = {"kind": "npz", "path": path, "num_clients": 6, "partition": "iid"}
  return config_from_dict(raw)


def test_float_labels_with_fractions_are_a_clear_error_and_leave_nothing_behind(tmp_path):
  rng = np.random.default_rng(0)
  config = _npz_config(tmp_path, rng.normal(size=(60, 4)).astype(np.float32),
                       rng.normal(size=60))
  with pytest.raises(ConfigError, match=r"labels 'y' must be integer class ids.*y\[0\]"):
    run_experiment(config, log=_quiet)
  assert not os.path.exists(config.output_dir)  # nothing written: the rerun is not blocked


def test_whole_number_float_labels_are_accepted(tmp_path):
  rng = np.random.default_rng(0)
  config = _npz_config(tmp_path, rng.normal(size=(60, 4)).astype(np.float32),
                       rng.integers(0, 3, 60).astype(np.float64))
  run_experiment(config, log=_quiet)
  assert read_metrics(os.path.join(config.output_dir, "metrics.jsonl"))[0]["train_loss"] < 5


def test_uint8_images_are_scaled_to_the_unit_interval(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, size=(60, 4, 4), dtype=np.uint8)
  config = _npz_config(tmp_path, x, rng.integers(0, 3, 60))
  with pytest.warns(UserWarning, match=r"uint8.*scaled to \[0, 1\]"):
    from fedjax_sim.runner.build import build_data
    train, test = build_data(config)
  seen = np.concatenate([train.features["x"], test.features["x"]])
  assert seen.dtype == np.float32 and seen.max() <= 1.0
  np.testing.assert_allclose(seen * 255, np.round(seen * 255), atol=1e-3)  # k / 255 exactly
  assert seen.max() > 0.9


def test_an_empty_checkpoints_folder_from_a_failed_start_does_not_block_the_rerun(tmp_path):
  out = tmp_path / "out"
  (out / "checkpoints").mkdir(parents=True)  # what a crash in the first round used to leave
  run_experiment(config_from_dict(_raw(str(out), rounds=1)), log=_quiet)
  assert [r["round"] for r in read_metrics(str(out / "metrics.jsonl"))] == [1]


# -- metrics ------------------------------------------------------------------------------


def test_participating_clients_counts_only_clients_with_data(tmp_path):
  from fedjax_sim.core.data import FederatedData
  sizes = [0, 0, 4, 6, 0, 5]
  total = sum(sizes)
  rng = np.random.default_rng(0)
  data = FederatedData.from_offsets(
      {"x": rng.normal(size=(total, 4)).astype(np.float32),
       "y": rng.integers(0, 3, total).astype(np.int32)}, np.concatenate([[0], np.cumsum(sizes)]))
  data.save(str(tmp_path / "packed"))
  raw = _raw(str(tmp_path / "out"), rounds=1, sampling={"clients_per_round": 6})
  raw["data"] = {"kind": "packed", "path": str(tmp_path / "packed"), "holdout_clients": 0.0,
                 "test_fraction": 0.2}
  run_experiment(config_from_dict(raw), log=_quiet)
  r = read_metrics(str(tmp_path / "out" / "metrics.jsonl"))[0]
  assert r["sampled_clients"] == 6 and r["participating_clients"] == 3


# -- the compile cache ---------------------------------------------------------------------


def test_a_second_run_of_a_config_compiles_nothing(tmp_path):
  cache = str(tmp_path / "xla")
  path = tmp_path / "c.yaml"
  summaries = []
  for name in ("first", "second"):
    out = str(tmp_path / name)
    path.write_text(yaml.safe_dump(_raw(out, rounds=2)))
    cmd, env = _cli("run", str(path), "--no-progress", "--compile-cache", cache,
                    "--cpu-devices", "1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summaries.append(json.load(open(os.path.join(out, "summary.json"))))
  first, second = summaries
  assert first["compiled_programs"] > 0 and first["compile_cache_dir"] == cache
  # The first round compiles its programs; that time is not round time.
  assert first["train_seconds_excluding_compile"] < first["train_seconds"] - 0.05
  assert second["compiled_programs"] == 0
  assert second["programs_from_compile_cache"] >= first["compiled_programs"]
  for s in summaries:
    assert 0 < s["compile_seconds"] < s["wall_seconds"]
    assert s["train_seconds_excluding_compile"] <= s["train_seconds"]
  assert os.listdir(cache)


def test_an_old_run_folder_with_every_key_in_its_config_resumes(tmp_path):
  out = str(tmp_path / "old")
  config = config_from_dict(_raw(out, rounds=1, eval={"every": 0}))
  run_experiment(config, log=_quiet)
  path = os.path.join(out, "config.yaml")
  with open(path, "w") as f:  # as written before ignored keys were errors
    yaml.safe_dump(to_dict(config, only_applicable=False), f)
  import dataclasses
  run_experiment(dataclasses.replace(config, rounds=2), resume=True, log=_quiet)
  assert [r["round"] for r in read_metrics(os.path.join(out, "metrics.jsonl"))] == [1, 2]


def _fresh_program(scale):
  import jax
  import jax.numpy as jnp
  return jax.jit(lambda x: jnp.tanh(x * scale) @ x.T)(jnp.ones((7, 3))).block_until_ready()


def test_compile_cache_off_writes_nothing_and_a_bad_folder_is_a_clear_error(tmp_path,
                                                                            monkeypatch):
  from fedjax_sim.runner.compile_cache import (CompileCacheError, ENV,
                                               enable_compilation_cache)
  session = os.environ[ENV]
  folder = str(tmp_path / "xla")
  try:
    assert enable_compilation_cache(folder) == folder
    _fresh_program(1.25)
    written = sorted(os.listdir(folder))
    assert written
    assert enable_compilation_cache("off") is None
    _fresh_program(1.5)
    assert sorted(os.listdir(folder)) == written  # off: nothing more is cached
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(CompileCacheError, match="--compile-cache"):
      enable_compilation_cache(str(blocker / "sub"))
    monkeypatch.delenv(ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # the default folder cannot be made
    with pytest.warns(UserWarning, match="without a persistent cache"):
      assert enable_compilation_cache() is None
  finally:
    enable_compilation_cache(session)
