"""Sweeps (runner/sweep.py): every member equals a separate run of its config."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from fedjax_sim.runner.cli import main as cli_main
from fedjax_sim.runner.config import ConfigError, config_from_dict, sweep_members, to_dict
from fedjax_sim.runner.io import read_metrics
from fedjax_sim.runner.run import RunError, run_experiment
from fedjax_sim.runner.sweep import run_sweep
from tests.conftest import REPO, default_emitters, xla_flags

LR = "algorithm.client_optimizer.learning_rate"

# A tiny run: 40 clients of 8 examples, logistic regression, 3 rounds.
BASE = {"rounds": 3, "progress": False,
        "data": {"kind": "gaussian_mixture", "num_clients": 40, "examples_per_client": 8,
                 "num_features": 4, "num_classes": 3},
        "model": {"kind": "logreg"},
        "sampling": {"clients_per_round": 8},
        "engine": {"block_size": 8},
        "eval": {"every": 2},
        "checkpoint": {"every": 2}}

# Wall-clock fields: everything else in metrics.jsonl is a function of the config.
TIMING = ("round_seconds", "clients_per_second", "examples_per_second", "eval_seconds")


def _sweep_config(out, sweep, **changes):
  return config_from_dict({**BASE, **changes, "output_dir": str(out), "sweep": sweep})


def _quiet(*_):
  pass


def _comparable(records):
  return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def _assert_same_metrics(a_dir, b_dir, rounds=None, train_only=False):
  a = _comparable(read_metrics(os.path.join(a_dir, "metrics.jsonl")))
  b = _comparable(read_metrics(os.path.join(b_dir, "metrics.jsonl")))
  if rounds is not None:
    a, b = ([r for r in x if r["round"] in rounds] for x in (a, b))
  if train_only:  # evaluation rounds differ between runs of other lengths
    a, b = ([{k: v for k, v in r.items() if not k.startswith("eval_")} for r in x] for x in (a, b))
  assert [r["round"] for r in a] == [r["round"] for r in b] and a
  for ra, rb in zip(a, b):
    assert set(ra) == set(rb)
    for k in ra:
      assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-7), (ra["round"], k)


def _separate_run(tmp_path, name, sets, **changes):
  """The member's config built independently of the sweep: the base config with --set."""
  out = str(tmp_path / "separate" / name)
  raw = {**BASE, **changes, "output_dir": out}
  c = config_from_dict(raw, [f"{k}={v}" for k, v in sets.items()])
  run_experiment(c, log=_quiet)
  return out


def test_members_equal_separate_runs_and_results_are_gathered(tmp_path):
  out = tmp_path / "sweep"
  result = run_sweep(_sweep_config(out, {"seeds": [1, 2], "grid": {LR: [0.05, 0.2]},
                                        "mode": "loop"}), log=_quiet)
  names = ["seed=1,algorithm.client_optimizer.learning_rate=0.05",
           "seed=1,algorithm.client_optimizer.learning_rate=0.2",
           "seed=2,algorithm.client_optimizer.learning_rate=0.05",
           "seed=2,algorithm.client_optimizer.learning_rate=0.2"]
  assert [r["name"] for r in result["results"]] == names
  assert sorted(os.listdir(out / "members")) == sorted(names)
  for name in names:  # a complete run folder each
    assert {"config.yaml", "metrics.jsonl", "summary.json", "checkpoints", "convergence.png",
            "tensorboard"} <= set(os.listdir(out / "members" / name))
  # Members of one learning rate share the model, algorithm and stage (so their programs).
  assert result["sharing"]["groups"] == [[names[0], names[2]], [names[1], names[3]]]
  assert result["mode"] == "loop" and result["mode_reason"] == "sweep.mode = 'loop'"

  # The second seed of a learning rate (objects shared with the first) and the first of the
  # other, each against a separate run of its config.
  for name, sets in ((names[2], {"seed": 2, LR: 0.05}), (names[1], {"seed": 1, LR: 0.2})):
    member = str(out / "members" / name)
    separate = _separate_run(tmp_path, name, sets)
    _assert_same_metrics(member, separate)
    saved = yaml.safe_load(open(os.path.join(member, "config.yaml")))
    alone = yaml.safe_load(open(os.path.join(separate, "config.yaml")))
    assert saved.pop("output_dir") == member and alone.pop("output_dir") == separate
    assert saved == alone and "sweep" not in saved
  # The seeds and rates really differ.
  finals = {r["name"]: r["final_eval"]["eval_loss"] for r in result["results"]}
  assert len(set(finals.values())) == 4

  # sweep.json holds each member's values and its summary's numbers; the table and the plot.
  assert json.loads((out / "sweep.json").read_text()) == json.loads(json.dumps(result))
  for row in result["results"]:
    summary = json.loads((out / "members" / row["name"] / "summary.json").read_text())
    assert row["values"] == {"seed": int(row["name"][5]), LR: float(row["name"].split("=")[-1])}
    assert row["status"] == "completed" and row["rounds"] == 3
    assert row["final_eval"] == summary["final_eval"]
    assert row["best_eval_accuracy"] == summary["best_eval_accuracy"]
    assert row["wall_seconds"] == summary["wall_seconds"] > 0
  table = (out / "sweep.md").read_text()
  for row in result["results"]:
    assert f"| `{row['name']}` | {row['values']['seed']} | {row['values'][LR]} | completed | 3 |" \
        in table
  assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  saved = yaml.safe_load((out / "config.yaml").read_text())
  assert saved["sweep"] == {"seeds": [1, 2], "grid": {LR: [0.05, 0.2]}, "mode": "loop"}


@pytest.mark.parametrize("mode", ["loop", "vmap"])
def test_dp_members_have_their_own_privacy_report_equal_to_a_separate_run(tmp_path, mode):
  dp = {"privacy": {"mechanism": "dp_fedavg", "noise_multiplier": 1.0, "clip_norm": 0.5},
        "algorithm": {"weighting": "uniform"}, "telemetry": {"tensorboard": False}}
  out = tmp_path / "sweep"
  result = run_sweep(_sweep_config(out, {"seeds": [3, 4], "mode": mode}, **dp), log=_quiet)
  assert result["mode"] == mode
  name = "seed=4"
  member = str(out / "members" / name)
  separate = _separate_run(tmp_path, name, {"seed": 4}, **dp)
  _assert_same_metrics(member, separate)
  a, b = (json.load(open(os.path.join(d, "privacy_report.json"))) for d in (member, separate))
  assert a["epsilon"] == pytest.approx(b["epsilon"]) and a["epsilon"] > 0
  assert a["noise_multiplier"] == b["noise_multiplier"] == 1.0
  assert [r["epsilon"] for r in result["results"]] == pytest.approx([a["epsilon"]] * 2)
  assert "| epsilon |" in (out / "sweep.md").read_text()


@pytest.mark.parametrize("mode", ["loop", "vmap"])
@default_emitters  # bit-for-bit across two programs: XLA's default machine code
def test_resume_skips_completed_members_and_resumes_the_interrupted_one(tmp_path, mode):
  out = tmp_path / "sweep"
  c = _sweep_config(out, {"seeds": [1, 2, 3], "mode": mode}, rounds=4,
                    telemetry={"tensorboard": False})
  run_sweep(c, log=_quiet)
  members = out / "members"
  reference = {n: (members / n / "metrics.jsonl").read_text() for n in os.listdir(members)}
  # seed=2 "killed" after its round-2 checkpoint; seed=3 never started.
  shutil.rmtree(members / "seed=2" / "checkpoints" / "4")
  os.remove(members / "seed=2" / "summary.json")
  shutil.rmtree(members / "seed=3")
  done_before = os.stat(members / "seed=1" / "summary.json").st_mtime_ns
  lines = []
  result = run_sweep(c, resume=True, log=lambda *a: lines.append(" ".join(map(str, a))))
  assert any("seed=1: already done, skipped" in line for line in lines)
  assert any("seed=2: resuming" in line for line in lines)
  assert any("resuming" in line and "after round 2" in line for line in lines)
  assert any("seed=3: starting" in line for line in lines)
  assert os.stat(members / "seed=1" / "summary.json").st_mtime_ns == done_before
  assert [r["this_process"] for r in result["results"]] == ["skipped", "ran", "ran"]
  assert [r["rounds"] for r in result["results"]] == [4, 4, 4]
  for name, text in reference.items():  # a resumed member repeats its rounds exactly
    assert _comparable([json.loads(x) for x in text.splitlines()]) == _comparable(
        read_metrics(str(members / name / "metrics.jsonl"))), name

  # A fresh start refuses the folder; a resume with another sweep is refused too.
  with pytest.raises(RunError, match="already holds a sweep"):
    run_sweep(c, log=_quiet)
  with pytest.raises(RunError, match="sweep.seeds"):
    run_sweep(_sweep_config(out, {"seeds": [1, 2], "mode": mode}, rounds=4,
                            telemetry={"tensorboard": False}), resume=True, log=_quiet)


@pytest.mark.parametrize("grid,message", [
    ({"sampling.clients_per_rond": [4]},
     "sweep.grid: Unknown config key 'sampling.clients_per_rond' for sampling.scheme = "
     "'uniform'. Did you mean 'clients_per_round'?"),
    ({"modle.kind": ["mlp"]}, "sweep.grid: Unknown config key 'modle'. Did you mean 'model'?"),
    ({"seed": [1, 2]}, "sweep.grid['seed']: 'seed' cannot be swept in the grid: list the seeds "
                       "in sweep.seeds."),
    ({"model.hidden": [[4]]}, "sweep.grid['model.hidden']: [4] is not a scalar"),
    ({LR: [0.1, 0.1]}, "sweep.grid['algorithm.client_optimizer.learning_rate'] lists a value "
                       "twice"),
    ({LR: 0.1}, "sweep.grid['algorithm.client_optimizer.learning_rate']: expected a non-empty "
                "list of values"),
    ({LR: [0.1, -1]}, "sweep.grid: algorithm.client_optimizer.learning_rate = -1.0 must be > 0."),
    ({"data.num_clients": [40, 5]},
     "sweep member seed=0,data.num_clients=5: sampling.clients_per_round = 8 but only 5 clients "
     "train"),
])
def test_bad_sweep_keys_fail_validation_naming_the_grid(tmp_path, grid, message):
  with pytest.raises(ConfigError) as e:
    _sweep_config(tmp_path / "s", {"grid": grid})
  assert str(e.value).startswith(message), str(e.value)


def test_bad_seeds_mode_and_refusals(tmp_path, capsys):
  with pytest.raises(ConfigError, match="sweep.seeds = .* must be distinct seeds"):
    _sweep_config(tmp_path / "s", {"seeds": [1, 1]})
  with pytest.raises(ConfigError, match="sweep.mode: 'fast' is not allowed"):
    _sweep_config(tmp_path / "s", {"seeds": [1], "mode": "fast"})
  with pytest.raises(RunError, match="has a sweep: section"):
    run_experiment(_sweep_config(tmp_path / "r", {"seeds": [1, 2]}), log=_quiet)
  with pytest.raises(RunError, match="holds no sweep"):
    run_sweep(_sweep_config(tmp_path / "none", {"seeds": [1]}), resume=True, log=_quiet)
  # `fedjax-sim validate` reports the members, or the bad key.
  path = tmp_path / "s.yaml"
  path.write_text(yaml.safe_dump({**BASE, "sweep": {"seeds": [1, 2], "grid": {LR: [0.1, 0.2]}}}))
  assert cli_main(["validate", str(path)]) == 0
  assert "valid (a sweep of 4 members)" in capsys.readouterr().out
  path.write_text(yaml.safe_dump({**BASE, "sweep": {"grid": {"algorithm.lr": [0.1]}}}))
  assert cli_main(["validate", str(path)]) == 2
  assert "error: sweep.grid: Unknown config key 'algorithm.lr'" in capsys.readouterr().err


def test_members_are_named_and_validated_like_config_files():
  c = config_from_dict({**BASE, "output_dir": "o", "sweep": {
      "grid": {LR: ["1e-3", 0.5], "algorithm.name": ["fedavg", "fedprox"],
               "data.kind": ["gaussian_mixture"]}}})
  members = sweep_members(c)
  assert len(members) == 4 and {m.config.seed for m in members} == {0}
  first = members[0]
  assert first.values == {"seed": 0, LR: 0.001, "algorithm.name": "fedavg",
                          "data.kind": "gaussian_mixture"}
  assert first.name == ("seed=0,algorithm.client_optimizer.learning_rate=0.001,"
                        "algorithm.name=fedavg,data.kind=gaussian_mixture")
  assert first.config.output_dir == os.path.join("o", "members", first.name)
  assert members[1].config.algorithm.name == "fedprox" and members[1].config.algorithm.mu == 0.01
  # A member's config is a plain config, the same as the base with --set.
  alone = config_from_dict({**BASE, "output_dir": first.config.output_dir},
                           [f"{LR}=1e-3", "algorithm.name=fedavg"])
  assert to_dict(first.config) == to_dict(alone) and "sweep" not in to_dict(alone)
  # Strings that are not file-name safe are replaced.
  c = config_from_dict({**BASE, "sweep": {"grid": {"telemetry.mlflow.run_name": ["a/b c"]}}})
  assert sweep_members(c)[0].name == "seed=0,telemetry.mlflow.run_name=a_b_c"


def test_the_readme_sweep_example_and_error_are_what_the_code_does():
  readme = open(os.path.join(REPO, "README.md")).read()
  (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "sweep:" in b]
  c = config_from_dict({**BASE, **yaml.safe_load(block)})
  assert len(sweep_members(c)) == 12
  (shown,) = [line for line in readme.splitlines() if line.startswith("error: sweep.grid")]
  with pytest.raises(ConfigError) as e:
    _sweep_config("s", {"grid": {"sampling.clients_per_rond": [5]}})
  assert shown == f"error: {e.value}"
  assert "python experiments/benchmarks/sweep.py" in readme


@pytest.mark.slow
def test_sweep_benchmark_runs_small(tmp_path):
  out = tmp_path / "b.json"
  env = dict(os.environ)
  env["XLA_FLAGS"] = xla_flags()
  proc = subprocess.run([sys.executable, "experiments/benchmarks/sweep.py", "--members", "2",
                         "--rounds", "2", "--cases", "small", "--matmul-n", "256", "--copy-mib",
                         "8", "--out", str(out)], capture_output=True, text=True, cwd=REPO,
                        env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout)
  assert json.loads(out.read_text()) == report
  (case,) = report["results"]
  assert case["case"] == "small" and case["members"] == 2 and case["seeds"] == [0, 1]
  assert case["members_match_separate_runs"] and case["max_relative_difference"] <= 1e-5
  assert case["sweep"]["mode"] == "loop" and case["sweep"]["sharing_groups"] == 1
  assert case["vmap"]["mode"] == "vmap" and case["vmap"]["members_match_separate_runs"]
  assert case["vmap_speedup"] == pytest.approx(case["separate"]["wall_seconds"]
                                               / case["vmap"]["wall_seconds"])
  assert len(case["sweep"]["member_seconds"]) == len(case["separate"]["process_seconds"]) == 2
  assert case["separate"]["wall_seconds"] == pytest.approx(sum(case["separate"]["process_seconds"]))
  assert case["speedup"] == pytest.approx(case["separate"]["wall_seconds"]
                                          / case["sweep"]["wall_seconds"])
  assert case["separate"]["compiled_programs"][1] == 0  # the second run found the first's
  assert report["ceilings"]["matmul_gflops"] > 0 and report["machine"]["cpu_count"] > 0


def _interrupted_sweep(tmp_path, monkeypatch, owner, name: str, mode: str, rounds: int):
  """A 2-seed sweep whose `owner.name` sends SIGINT to this process after it returns;
  returns (its config, the raised Interrupted's info), checked to name the folder and the
  signal. The patch stays: `monkeypatch.undo()` removes it."""
  import signal

  from fedjax_sim.runner.run import Interrupted

  real = getattr(owner, name)

  def then_signal(*args, **kwargs):
    result = real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGINT)
    return result

  monkeypatch.setattr(owner, name, then_signal)
  out = tmp_path / "sweep"
  c = _sweep_config(out, {"seeds": [1, 2], "mode": mode}, rounds=rounds,
                    telemetry={"tensorboard": False})
  with pytest.raises(Interrupted) as e:
    run_sweep(c, log=_quiet)
  assert e.value.output_dir == str(out) and e.value.signal_number == signal.SIGINT
  return c, e


def test_a_signal_between_members_stops_the_sweep_and_resume_finishes_it(tmp_path, monkeypatch):
  from fedjax_sim.runner import sweep as sweep_mod

  # SIGINT arrives after the member's run returned.
  c, e = _interrupted_sweep(tmp_path, monkeypatch, sweep_mod, "run_experiment", "loop",
                            rounds=2)
  assert "before member 2 of 2 (seed=2)" in str(e.value)
  out = tmp_path / "sweep"
  gathered = json.loads((out / "sweep.json").read_text())
  assert [r["status"] for r in gathered["results"]] == ["completed", "not started"]
  monkeypatch.undo()
  result = run_sweep(c, resume=True, log=_quiet)
  assert [(r["this_process"], r["status"]) for r in result["results"]] == [
      ("skipped", "completed"), ("ran", "completed")]


# -- vmap mode -----------------------------------------------------------------------


def _final_state(folder):
  import orbax.checkpoint as ocp
  ckpts = os.path.join(folder, "checkpoints")
  last = max(int(n) for n in os.listdir(ckpts) if n.isdigit())
  return ocp.StandardCheckpointer().restore(os.path.join(ckpts, str(last), "state"))


def _assert_same_state(a_dir, b_dir):
  import jax
  import numpy as np
  a, b = _final_state(a_dir), _final_state(b_dir)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)


def test_vmap_members_equal_separate_runs_and_resume_as_separate_runs(tmp_path):
  # FedProx with 4 local steps (mu acts; traced mu values are tested in tests/core), dropouts
  # and stragglers that stop early (step limits) planned by each member's engine.
  prox = {"algorithm": {"name": "fedprox", "batch_size": 2, "mu": 0.3},
          "system": {"dropout": 0.2, "straggler_fraction": 0.4, "straggler_policy": "partial"}}
  out = tmp_path / "sweep"
  grid = {LR: [0.05, 0.2]}
  result = run_sweep(_sweep_config(out, {"seeds": [1, 2], "grid": grid, "mode": "vmap"},
                                   telemetry={"tensorboard": False}, **prox), log=_quiet)
  assert result["mode"] == "vmap" and result["mode_reason"] == "sweep.mode = 'vmap'"
  assert result["vmap"]["members_in_program"] == 4
  assert result["vmap"]["traced_hyperparameters"] == [LR]
  assert [r["status"] for r in result["results"]] == ["completed"] * 4
  finals = {r["final_eval"]["eval_loss"] for r in result["results"]}
  assert len(finals) == 4  # every member trained its own model
  name = "seed=1,algorithm.client_optimizer.learning_rate=0.05"
  member = str(out / "members" / name)
  assert {"config.yaml", "metrics.jsonl", "summary.json", "checkpoints", "convergence.png"} <= \
      set(os.listdir(member))
  separate = _separate_run(tmp_path, name, {"seed": 1, LR: 0.05}, **prox)
  _assert_same_metrics(member, separate)
  _assert_same_state(member, separate)
  summary = json.loads(open(os.path.join(member, "summary.json")).read())
  assert summary["sweep_mode"] == "vmap" and summary["vmap_members"] == 4
  # Another member, against a separate run of five rounds; its folder then resumes as a
  # separate run (two more rounds), equal to that uninterrupted run.
  sets = {"seed": 2, LR: 0.2}
  member = str(out / "members" / ",".join(f"{k}={v}" for k, v in sets.items()))
  longer = _separate_run(tmp_path, "five", sets, rounds=5, **prox)
  _assert_same_metrics(member, longer, rounds={1, 2, 3}, train_only=True)
  config = config_from_dict(yaml.safe_load(open(os.path.join(member, "config.yaml"))),
                            ["rounds=5"])
  run_experiment(config, resume=True, log=_quiet)
  _assert_same_metrics(member, longer, rounds={4, 5})
  _assert_same_state(member, longer)


def test_forced_vmap_on_members_of_other_shapes_is_refused_and_auto_falls_back(tmp_path):
  from fedjax_sim.runner.sweep import choose_mode
  out = tmp_path / "vmap"
  for grid, why in (({"sampling.clients_per_round": [4, 8]},
                     "sweep.grid key 'sampling.clients_per_round' changes what the compiled "
                     "program is (the sampling section shapes the program or the population)"),
                    ({"algorithm.local_epochs": [1, 2]},
                     "sweep.grid key 'algorithm.local_epochs' changes what the compiled program "
                     "is (its values are not floats)")):
    with pytest.raises(RunError) as e:
      run_sweep(_sweep_config(out, {"grid": grid, "mode": "vmap"}), log=_quiet)
    assert str(e.value).startswith("sweep.mode = 'vmap' cannot run these members as one "
                                   f"compiled program: {why}"), str(e.value)
    assert "Use sweep.mode = 'loop'" in str(e.value) and not out.exists()  # nothing written
    if "sampling" in why:  # the README shows this one
      readme = open(os.path.join(REPO, "README.md")).read().splitlines()
      assert str(e.value) in readme
    c = _sweep_config(out, {"grid": grid})
    mode, reason = choose_mode(c, sweep_members(c))
    assert mode == "loop" and reason.startswith(f"auto: not eligible for vmap ({why}; only "), \
        reason
  # Host-only keys (dropouts and stragglers are planned by each member's engine) may vary.
  c = _sweep_config(out, {"grid": {"system.dropout": [0.0, 0.3], LR: [0.1, 0.2]}}, rounds=200)
  assert choose_mode(c, sweep_members(c)) == ("vmap", "auto: eligible for vmap")
  with pytest.raises(RunError, match="a sweep of one member has nothing to vmap over"):
    run_sweep(_sweep_config(out, {"seeds": [1], "mode": "vmap"}), log=_quiet)


# The DP stage's clip norm and noise multiplier as traced member values: DP-FedAvg, adaptive
# clipping (members start from other clip norms) and DP-FTRL's tree, whose members calibrate
# their noise multipliers for their target epsilon on the host (quick for the tree's events).
_DP_CASES = {
    "dp_fedavg": ({"privacy": {"mechanism": "dp_fedavg", "noise_multiplier": 1.0}},
                  {"privacy.clip_norm": [0.3, 1.0], "privacy.noise_multiplier": [0.5, 1.0]}),
    "adaptive": ({"privacy": {"mechanism": "dp_fedavg", "noise_multiplier": 1.0,
                              "adaptive_clipping": True, "clip_count_stddev": 1.0}},
                 {"privacy.clip_norm": [0.3, 1.0], "privacy.noise_multiplier": [0.5, 1.0]}),
    "dp_ftrl": ({"privacy": {"mechanism": "dp_ftrl", "target_epsilon": 10.0},
                 "sampling": {"scheme": "shuffle", "clients_per_round": 8}},
                {"privacy.clip_norm": [0.3, 1.0], "privacy.target_epsilon": [5.0, 20.0]}),
}


@pytest.mark.parametrize("case", list(_DP_CASES))
def test_vmap_members_of_a_dp_grid_equal_separate_runs(tmp_path, case):
  changes, grid = _DP_CASES[case]
  changes = {**changes, "rounds": 2, "algorithm": {"weighting": "uniform"},
             "telemetry": {"tensorboard": False}}
  out = tmp_path / "sweep"
  result = run_sweep(_sweep_config(out, {"grid": grid, "mode": "vmap"}, **changes), log=_quiet)
  assert json.loads((out / "sweep.json").read_text())["mode"] == result["mode"] == "vmap"
  assert result["vmap"]["members_in_program"] == 4
  assert result["vmap"]["traced_hyperparameters"] == ["privacy.clip_norm",
                                                      "privacy.noise_multiplier"]
  reports = [json.loads((out / "members" / r["name"] / "privacy_report.json").read_text())
             for r in result["results"]]
  assert len({r["noise_multiplier"] for r in reports}) == 2  # given, or calibrated per member
  assert [r["clip_norm"] for r in reports] == [0.3, 0.3, 1.0, 1.0]
  assert len({r["final_eval"]["eval_loss"] for r in result["results"]}) == 4
  # The last member differs from the first (whose stage settings the program is built from) in
  # both values.
  row = result["results"][-1]
  member = str(out / "members" / row["name"])
  separate = _separate_run(tmp_path, row["name"], row["values"], **changes)
  _assert_same_metrics(member, separate)
  _assert_same_state(member, separate)
  a, b = (json.load(open(os.path.join(d, "privacy_report.json"))) for d in (member, separate))
  assert a == b and a["epsilon"] > 0
  if case == "adaptive":  # the clip norm adapted from its own start
    assert a["clip_norm_trajectory"][0] == pytest.approx(row["values"]["privacy.clip_norm"])


def test_vmap_refuses_privacy_keys_that_change_the_program_and_auto_falls_back(tmp_path):
  from fedjax_sim.runner.sweep import choose_mode
  out = tmp_path / "vmap"
  dp = {"privacy": {"mechanism": "dp_fedavg", "noise_multiplier": 0.5},
        "algorithm": {"weighting": "uniform"}}
  local = {**dp, "privacy": {"mechanism": "local_dp_sgd", "noise_multiplier": 0.5}}
  for changes, grid, why in (
      (dp, {"privacy.adaptive_clipping": [False, True]},
       "sweep.grid key 'privacy.adaptive_clipping' changes what the compiled program is (it "
       "sets the DP mechanism or the form of its stage); of the privacy section only "
       "privacy.clip_norm and privacy.noise_multiplier (or privacy.target_epsilon, calibrated "
       "per member) of dp_fedavg and dp_ftrl enter it"),
      (local, {"privacy.mechanism": ["local_dp_sgd", "dp_fedavg"]},
       "sweep.grid key 'privacy.mechanism' changes what the compiled program is"),
      (dp, {"privacy.delta": [1e-5, 1e-6]},
       "sweep.grid key 'privacy.delta' is not varied in vmap mode"),
      (local, {"privacy.clip_norm": [0.5, 1.0]},
       "sweep.grid key 'privacy.clip_norm' varies local DP-SGD, whose clip norm and noise "
       "multiplier are static settings of the clients' local training")):
    with pytest.raises(RunError) as e:
      run_sweep(_sweep_config(out, {"grid": grid, "mode": "vmap"}, **changes), log=_quiet)
    assert str(e.value).startswith("sweep.mode = 'vmap' cannot run these members as one "
                                   f"compiled program: {why}"), str(e.value)
    assert not out.exists()
    c = _sweep_config(out, {"grid": grid}, rounds=200, **changes)
    mode, reason = choose_mode(c, sweep_members(c))
    assert mode == "loop" and reason.startswith(f"auto: not eligible for vmap ({why}"), reason
  # The DP stage's scalars may vary (a target epsilon through each member's calibration).
  grid = {"privacy.clip_norm": [0.5, 1.0], "privacy.noise_multiplier": [0.5, 1.0]}
  c = _sweep_config(out, {"grid": grid}, rounds=200, **dp)
  assert choose_mode(c, sweep_members(c)) == ("vmap", "auto: eligible for vmap")
  target = {**dp, "privacy": {"mechanism": "dp_fedavg", "target_epsilon": 5.0}}
  c = _sweep_config(out, {"grid": {"privacy.target_epsilon": [5.0, 9.0]}}, rounds=200, **target)
  assert choose_mode(c, sweep_members(c)) == ("vmap", "auto: eligible for vmap")


def test_auto_chooses_vmap_only_for_many_small_rounds_and_records_why(tmp_path, monkeypatch):
  from fedjax_sim.core.keys import Purpose, run_key
  from fedjax_sim.runner.build import build_experiment
  from fedjax_sim.runner import sweep_vmap
  from fedjax_sim.runner.sweep import choose_mode
  small = r"a round of all 2 members trains about [0-9.]+ MFLOP \(at most the 1e\+03 MFLOP " \
          r"up to which rounds are dispatch-bound on cpu devices\), and "
  few = r"its 1 shared member-rounds would save about 0.0052 s of dispatch, "
  c = _sweep_config(tmp_path / "few", {"seeds": [1, 2]}, rounds=1,
                    telemetry={"tensorboard": False})
  result = run_sweep(c, log=_quiet)
  assert result["mode"] == "loop"
  assert json.loads((tmp_path / "few" / "sweep.json").read_text())["mode"] == "loop"
  assert re.fullmatch("auto: eligible for vmap, but " + few + r"less than the about 1 s vmap "
                      r"costs once \(compiling the member program\)",
                      result["mode_reason"]), result["mode_reason"]
  # Enough rounds pass the first test; the built members' round size decides.
  many = _sweep_config(tmp_path / "many", {"seeds": [1, 2]}, rounds=200)
  assert choose_mode(many, sweep_members(many)) == ("vmap", "auto: eligible for vmap")
  # The same members with many rounds (here: a rule whose one-off cost is paid), or
  # compute-bound rounds.
  exps = [build_experiment(m.config) for m in sweep_members(c)]
  for e in exps:
    e.engine.init(e.model.init(run_key(e.config.seed, Purpose.INIT)))
  monkeypatch.setattr(sweep_vmap, "AUTO_EXTRA_SECONDS", 0.0)
  faster, why = sweep_vmap.expected_faster(exps, [1, 1])
  assert faster and re.fullmatch(small + few + r"at least the about 0 s vmap costs once "
                                 r"\(compiling the member program\)", why), why
  monkeypatch.setitem(sweep_vmap.AUTO_MAX_FLOPS, "cpu", 1.0)
  faster, why = sweep_vmap.expected_faster(exps, [1, 1])
  assert not faster and re.fullmatch(
      r"a round of all 2 members trains about [0-9.]+ MFLOP \(more than the 1e-06 MFLOP up to "
      r"which rounds are dispatch-bound on cpu devices\)", why), why


def test_a_signal_stops_a_vmap_sweep_after_the_round_and_resume_finishes_it(tmp_path,
                                                                            monkeypatch):
  from fedjax_sim.core.members import MemberRounds

  # SIGINT arrives during the first round.
  c, e = _interrupted_sweep(tmp_path, monkeypatch, MemberRounds, "run_round", "vmap",
                            rounds=3)
  out = tmp_path / "sweep"
  gathered = json.loads((out / "sweep.json").read_text())
  assert [(r["status"], r["rounds"]) for r in gathered["results"]] == [
      ("interrupted by SIGINT", 1)] * 2
  for name in ("seed=1", "seed=2"):  # each member checkpointed the round it finished
    assert os.listdir(out / "members" / name / "checkpoints") == ["1"]
  monkeypatch.undo()
  result = run_sweep(c, resume=True, log=_quiet)
  assert [(r["status"], r["rounds"]) for r in result["results"]] == [("completed", 3)] * 2
