"""Every command the README gives is exercised here (the quickstart itself, with tiny
settings, in tests/runner/test_cli.py)."""

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from fedjax_sim.runner.config import ConfigError, config_from_dict
from tests.conftest import REPO, run_python, xla_flags

README = open(os.path.join(REPO, "README.md")).read()


def _blocks(lang):
  return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def test_readme_gives_exactly_two_setup_commands_and_ci_runs_the_test_one():
  setup = [line for line in _blocks("bash")[0].splitlines() if line and not line.startswith("#")]
  assert len(setup) == 2
  quickstart, tests = setup
  assert "fedjax-sim run experiments/configs/quickstart.yaml" in quickstart
  with open(os.path.join(REPO, ".ci", "run")) as f:
    assert tests in f.read()
  assert os.path.exists(os.path.join(REPO, "experiments", "configs", "quickstart.yaml"))


def _run_block(code, cwd):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = xla_flags()  # the script splits the CPU itself (use_cpu_devices)
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                        cwd=cwd, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_python_api_simulation_example_runs_with_the_cli_machinery(tmp_path):
  code = _blocks("python")[0]
  assert "fs.Simulation(" in code and "flax_classifier" in code
  last = _run_block(code, tmp_path).splitlines()[-1].split()
  assert last[0] == "completed"
  accuracy, epsilon = float(last[1]), float(last[2])
  assert accuracy > 0.6  # three well-separated classes; chance is 1/3
  assert 0 < epsilon <= 10.0 + 1e-6  # calibrated for the target
  out = tmp_path / "runs" / "api_example"
  for name in ("metrics.jsonl", "summary.json", "config.yaml", "privacy_report.json",
               "privacy_report.md", "convergence.png"):
    assert (out / name).exists(), name
  saved = yaml.safe_load((out / "config.yaml").read_text())
  assert saved["data"]["kind"] == "script" and saved["model"]["kind"] == "script"
  assert saved["compression"]["method"] == "quantize"
  summary = json.loads((out / "summary.json").read_text())
  assert summary["versions"]["fedjax_sim"] and len(summary["devices"]) == (os.cpu_count() or 1)


def test_python_api_own_algorithm_example_runs(tmp_path):
  code = _blocks("python")[1]
  assert "ALGORITHMS.register" in code
  assert _run_block(code, tmp_path).splitlines()[-1] == "completed"
  saved = yaml.safe_load((tmp_path / "runs" / "api_capped" / "config.yaml").read_text())
  assert saved["algorithm"]["name"] == "capped_fedavg" and saved["algorithm"]["max_step"] == 0.5


def test_python_api_engine_loop_example_runs():
  code = _blocks("python")[2]
  out = run_python(code, {"JAX_PLATFORMS": "cpu"})
  accuracy = [line for line in out.splitlines() if "eval_accuracy" in line][-1]
  assert "'eval_clients': 10000.0" in accuracy


def test_every_docs_file_the_readme_cites_is_committed():
  # Results and figures the README quotes must be in the repository; paths given as the
  # --out of a command are where a rerun writes, and need not exist yet.
  cited = set(re.findall(r"docs/[\w./-]+\.(?:json|png|md)", README))
  outputs = set(re.findall(r"--out\s+(docs/[\w./-]+\.json)", README))
  assert cited, "the README cites no docs/ files"
  missing = sorted(p for p in cited - outputs if not os.path.exists(os.path.join(REPO, p)))
  assert not missing, missing
  assert not re.search(r"docs/figures/[\w.-]+\.json", README), "raw JSON belongs in docs/results/"


def _readme_config_keys():
  """Dotted keys named in the first cell of the README's config-reference rows."""
  keys = set()
  for line in README.splitlines():
    m = re.match(r"\| (`[\w.]+`(?:, `[\w.]+`)*) \|", line)
    if not m:
      continue
    names = re.findall(r"`([\w.]+)`", m.group(1))
    section = names[0].rsplit(".", 1)[0] if "." in names[0] else ""
    keys |= {n if "." in n or not section else f"{section}.{n}" for n in names}
  return keys


def test_the_config_reference_lists_every_key():
  import dataclasses

  from fedjax_sim.core.registry import FAMILIES
  from fedjax_sim.runner.config import Config
  expected = set()
  for f in dataclasses.fields(Config):
    family = FAMILIES.get(f.name)
    if family is not None:  # every key of every registered component, and the selector
      expected.add(f"{f.name}.{family.selector}")
      for name in family.names():
        component = family.get(name)
        # The package's own (not a test's plugin), but not `script`: objects a script
        # supplies, documented under Python API.
        if name != "script" and component.build.__module__.startswith("fedjax_sim."):
          # An open section's `extra_keys` field is not a key: it collects the others.
          open_field = getattr(component.config, "extra_keys", None)
          expected |= {f"{f.name}.{g.name}" for g in dataclasses.fields(component.config)
                       if g.name != open_field}
      continue
    section = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
    if dataclasses.is_dataclass(section):
      expected |= {f"{f.name}.{g.name}" for g in dataclasses.fields(section)}
    else:
      expected.add(f.name)
  # An optimizer is one row (its keys are optax's).
  expected = {k for k in expected if not any(
      k.startswith(f"algorithm.{o}.") for o in ("client_optimizer", "server_optimizer"))}
  assert expected - _readme_config_keys() == set()


@pytest.mark.parametrize("raw,shown", [
    ({"sampling": {"clients_per_rond": 5}},
     "Unknown config key 'sampling.clients_per_rond' for sampling.scheme = 'uniform'. Did you "
     "mean 'clients_per_round'? Allowed keys in sampling: clients_per_round, scheme."),
    ({"algorithm": {"client_optimizer": {"name": "sgd", "learning_rate": -0.1}}},
     "algorithm.client_optimizer.learning_rate = -0.1 must be > 0."),
    ({"data": {"num_clients": 100}, "sampling": {"clients_per_round": 500}},
     "sampling.clients_per_round = 500 but only 100 clients train (data.num_clients = 100, "),
    ({"privacy": {"mechanism": "dp_ftrl", "noise_multiplier": 1.0},
      "algorithm": {"weighting": "uniform"}},
     "privacy.mechanism = 'dp_ftrl' is accounted for shuffled epochs (every client at most once "
     "per epoch); dp-accounting has no tree-aggregation event with uniform sampling. Set "
     "sampling.scheme = 'shuffle'."),
])
def test_error_messages_shown_in_the_readme(raw, shown):
  with pytest.raises(ConfigError) as e:
    config_from_dict(raw)
  assert str(e.value).startswith(shown.rstrip(".").split("...")[0].rstrip(" ,("))
  readme_line = [line for line in README.splitlines() if line.startswith("error: ") and
                 shown[:40] in line]
  assert readme_line, f"README does not show: {shown[:40]}"


def _bench(*args, timeout=600):
  env = dict(os.environ)
  env["XLA_FLAGS"] = xla_flags()
  proc = subprocess.run([sys.executable, "experiments/benchmarks/throughput.py", *args],
                        capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout)


# Small ceiling measurements: the tests check fields, never speeds.
_TINY_CEILINGS = ("--matmul-n", "256", "--copy-mib", "8")


def _check_ceilings(c):
  assert c["matmul_gflops"] == max(c["matmul_gflops_one_device"], c["matmul_gflops_all_devices"])
  assert c["copy_gbps"] == max(c["copy_gbps_one_device"], c["copy_gbps_all_devices"])
  assert c["matmul_gflops"] > 0 and c["copy_gbps"] > 0 and c["devices"] == os.cpu_count()


@pytest.mark.slow
def test_throughput_benchmark_one_cell_with_references(tmp_path):
  out = tmp_path / "b.json"
  report = _bench("--model", "logreg", "--clients-per-round", "300", "--rounds", "2",
                  "--reference-rounds", "2", "--ref-blocks", "16,64", *_TINY_CEILINGS,
                  "--out", str(out))
  assert json.loads(out.read_text()) == report
  _check_ceilings(report["ceilings"])
  cell = report["results"][0]
  assert cell["clients_per_round"] == 300 and cell["devices"] == os.cpu_count()
  assert cell["ceilings"] == report["ceilings"]
  for key in ("median_round_seconds", "clients_per_second", "examples_per_second", "gflops",
              "fraction_of_measured_matmul", "padding_efficiency", "peak_rss_gib"):
    assert cell["engine"][key] > 0
  assert cell["engine"]["fraction_of_measured_matmul"] == pytest.approx(
      cell["engine"]["gflops"] / report["ceilings"]["matmul_gflops"])
  refs = cell["references"]
  expected = {"loop", "jit_vmap", "scan_vmap_1dev"} | (
      {"scan_vmap_sharded", "scan_vmap_sharded_unrolled"} if os.cpu_count() > 1 else set())
  assert set(refs) == expected
  for name, ref in refs.items():
    assert ref["clients_per_second"] > 0
    # Apples to apples: every reference's model after round 1 is the engine's.
    assert ref["matches_engine"], (name, ref["max_relative_diff_vs_engine"])
    assert cell["speedup_vs"][name] == pytest.approx(
        cell["engine"]["clients_per_second"] / ref["clients_per_second"])
  for name in expected - {"loop", "jit_vmap"}:
    ref = refs[name]
    assert set(ref["tuning"]) == {"16", "64"} and ref["block_size"] in (16, 64)
    assert ref["tuning"][str(ref["block_size"])]["seconds"] == min(
        t["seconds"] for t in ref["tuning"].values())
  assert refs["scan_vmap_1dev"]["devices"] == 1
  if os.cpu_count() > 1:
    assert refs["scan_vmap_sharded"]["devices"] == os.cpu_count()
    assert refs["scan_vmap_sharded"]["clients_per_device"] == 300 // os.cpu_count()
    assert refs["scan_vmap_sharded_unrolled"]["small_contractions"] == 16
    for name in ("scan_vmap_sharded", "scan_vmap_sharded_unrolled"):  # alternating with the engine
      assert refs[name]["interleaved_with_engine"] and refs[name]["paired_speedup"] > 0
      assert refs[name]["rounds"] == 2  # as many as the engine's
  # The best reference is the best plain one: the unrolled one borrows the engine's rule.
  plain = {n: r for n, r in refs.items() if n != "scan_vmap_sharded_unrolled"}
  best = cell["best_reference"]
  assert refs[best]["clients_per_second"] == max(r["clients_per_second"] for r in plain.values())
  assert cell["speedup_vs_best_reference"] == cell["speedup_vs"][best] == min(
      v for n, v in cell["speedup_vs"].items() if n in plain)


@pytest.mark.slow
def test_throughput_benchmark_heterogeneous_variant():
  report = _bench("--model", "logreg", "--clients-per-round", "300", "--rounds", "2",
                  "--heterogeneous", *_TINY_CEILINGS)
  cell = report["results"][0]
  assert cell["engine"]["fraction_of_measured_matmul"] > 0 and "references" not in cell
  assert cell["heterogeneous"] and 0 < cell["engine"]["padding_efficiency"] <= 1
  assert cell["without_bucketing"]["padding_efficiency"] < cell["engine"]["padding_efficiency"]
  assert cell["examples_per_second_vs_equal_size"] > 0


@pytest.mark.slow
def test_stateful_scale_benchmark_runs_small(tmp_path):
  env = dict(os.environ)
  env["XLA_FLAGS"] = xla_flags()
  proc = subprocess.run([sys.executable, "experiments/benchmarks/stateful_scale.py", "--clients",
                         "500", "--per-round", "100", "--rounds", "2", *_TINY_CEILINGS],
                        capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout)
  assert report["population"] == 500 and len(report["round_seconds"]) == 2
  assert report["store_gib"] > 0 and report["clients_per_second"] > 0
  _check_ceilings(report["ceilings"])


@pytest.mark.slow
def test_fedprox_reproduction_script_runs_small(tmp_path):
  assert "experiments/reproduce/fedprox_synthetic.py" in README
  env = dict(os.environ)
  env["XLA_FLAGS"] = xla_flags()
  proc = subprocess.run([sys.executable, "experiments/reproduce/fedprox_synthetic.py", "--rounds",
                         "2", "--datasets", "1,1", "--stragglers", "0.5", "--local-epochs", "2",
                         "--out", str(tmp_path)], capture_output=True, text=True, cwd=REPO,
                        env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((tmp_path / "results.json").read_text())["results"]
  assert set(results) == {"1,1|0.5|FedAvg", "1,1|0.5|FedProx (mu=0)", "1,1|0.5|FedProx (mu=1)"}
  for curve in results.values():
    assert curve["round"] == [0, 2] and len(curve["train_loss"]) == 2
  assert (tmp_path / "training_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "| Synthetic(1,1) | 50% | FedAvg |" in (tmp_path / "results.md").read_text()


def _script(path, *args, timeout=600):
  env = dict(os.environ)
  env["XLA_FLAGS"] = xla_flags()
  proc = subprocess.run([sys.executable, path, *args], capture_output=True, text=True, cwd=REPO,
                        env=env, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


@pytest.mark.slow
def test_privacy_benchmark_runs_small(tmp_path):
  assert "experiments/benchmarks/privacy.py" in README
  out = tmp_path / "p.json"
  report = json.loads(_script("experiments/benchmarks/privacy.py", "--clients-per-round", "64",
                              "--dpsgd-clients", "16", "--rounds", "2", *_TINY_CEILINGS,
                              "--out", str(out)))
  assert json.loads(out.read_text()) == report
  user = report["user_level"]["variants"]
  assert set(user) == {"plain", "dp_fedavg", "dp_adaptive", "dp_ftrl"}
  assert user["plain"]["ratio_to_plain"] == 1.0 and user["dp_ftrl"]["ratio_to_plain"] > 0
  assert report["example_level"]["variants"]["local_dp_sgd"]["ratio_to_plain"] > 0
  _check_ceilings(report["ceilings"])


def _config_differences(a, b):
  from fedjax_sim.runner.config import config_differences, load_config, to_dict
  path = lambda name: os.path.join(REPO, "experiments", "configs", name)
  return {k for k, _, _ in config_differences(to_dict(load_config(path(a))),
                                              to_dict(load_config(path(b))))}


def test_example_configs_differ_from_the_quickstart_only_in_what_they_show(monkeypatch):
  monkeypatch.syspath_prepend(os.path.join(REPO, "experiments", "benchmarks"))
  dp = _config_differences("quickstart.yaml", "dp_fedavg.yaml")
  # DP-FedAvg's two requirements (equal weights; Poisson sampling for add/remove
  # accounting, which has a rate where uniform sampling has a cohort size).
  assert {k for k in dp if not k.startswith("privacy.")} == {
      "output_dir", "algorithm.weighting", "sampling.scheme", "sampling.rate",
      "sampling.clients_per_round"}
  compressed = _config_differences("quickstart.yaml", "compressed_8bit.yaml")
  assert {k for k in compressed if not k.startswith("compression.")} == {"output_dir"}


@pytest.mark.slow
def test_privacy_benchmark_compares_configs_small(tmp_path):
  out = tmp_path / "c.json"
  report = json.loads(_script(
      "experiments/benchmarks/privacy.py", "--configs", "experiments/configs/quickstart.yaml",
      "experiments/configs/dp_fedavg.yaml", "--set", "rounds=2", "--set", "data.num_clients=1000",
      "--set", "data.size_sigma=0", "--set", "model.hidden=[8]", "--set", "eval.every=0",
      "--set", "eval.max_clients=20", "--runs-dir", str(tmp_path / "runs"),
      *_TINY_CEILINGS, "--out", str(out)))
  assert json.loads(out.read_text()) == report
  # Resolved configs list only the keys that apply: uniform sampling has a
  # cohort size, Poisson a rate.
  assert report["non_tested_differences"] == [
      "algorithm.weighting", "sampling.clients_per_round", "sampling.rate", "sampling.scheme"]
  keys = {d["key"] for d in report["differences"]}
  assert {k for k in keys if not k.startswith("privacy.")} == set(
      report["non_tested_differences"])
  assert {"privacy.mechanism", "privacy.clip_norm", "privacy.target_epsilon",
          "privacy.adaptive_clipping"} <= keys
  runs = report["runs"]
  assert list(runs) == ["baseline", "ablation", "treatment"]
  assert all(r["rounds"] == 2 and r["median_round_seconds"] > 0 and
             0 <= r["eval_accuracy"] <= 1 for r in runs.values())
  assert "epsilon" not in runs["ablation"]
  assert runs["treatment"]["epsilon"] == pytest.approx(3.0, rel=1e-3)
  assert runs["treatment"]["eval_accuracy_change_vs_ablation"] == pytest.approx(
      runs["treatment"]["eval_accuracy"] - runs["ablation"]["eval_accuracy"])
  assert runs["treatment"]["median_round_seconds_ratio_to_baseline"] > 0
  _check_ceilings(report["ceilings"])


@pytest.mark.slow
def test_dp_tradeoff_reproduction_runs_small(tmp_path):
  assert "experiments/reproduce/dp_fedavg_tradeoff.py" in README
  _script("experiments/reproduce/dp_fedavg_tradeoff.py", "--clients", "200",
          "--clients-per-round", "20", "--rounds", "3", "--noise", "2", "--out", str(tmp_path))
  points = json.loads((tmp_path / "results.json").read_text())
  assert [(p["mechanism"], p["noise_multiplier"]) for p in points] == [
      ("dp_fedavg", None), ("dp_fedavg", 2.0), ("dp_ftrl", None), ("dp_ftrl", 2.0)]
  private = [p for p in points if p["noise_multiplier"]]
  assert all(0 < p["epsilon"] < float("inf") and 0 <= p["accuracy"] <= 1 for p in private)
  report = json.loads((tmp_path / "runs" / "dp_ftrl_z2.0" / "privacy_report.json").read_text())
  assert report["epsilon"] == private[1]["epsilon"]
  assert (tmp_path / "accuracy_vs_epsilon.png").read_bytes()[:4] == b"\x89PNG"
  assert "| dp_ftrl | 2 |" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
def test_compression_benchmark_runs_small(tmp_path):
  assert "experiments/benchmarks/compression.py" in README
  out = tmp_path / "c.json"
  report = json.loads(_script("experiments/benchmarks/compression.py", "--d", "1000", "--reps",
                              "1", "--no-target", "--out", str(out)))
  assert json.loads(out.read_text()) == report
  keys = {"compressor", "bits_per_coordinate", "d", "clients", "nmse", "nmse_theory",
          "encode_gbps", "decode_gbps", "memcpy_gbps"}
  assert all(keys <= set(r) for r in report["records"])
  by_name = {r["compressor"]: r for r in report["records"]}
  assert by_name["sq8"]["nmse"] == pytest.approx(by_name["sq8"]["nmse_theory"], rel=0.2)
  assert by_name["top0.01"]["nmse_theory"] is None
  assert all(r["encode_gbps"] > 0 and r["memcpy_gbps"] > 0 for r in report["records"])


def test_compression_target_streams_every_client_in_blocks(monkeypatch):
  monkeypatch.syspath_prepend(os.path.join(REPO, "experiments", "benchmarks"))
  import compression
  rec = compression.target(clients=40, d=1000, block=8, reps=1, chunk=16)
  assert rec["clients"] == 40 and rec["block_clients"] == 8 and rec["d"] == 1000
  assert rec["encode_gbps"] > 0 and rec["memcpy_gbps"] > 0
  assert rec["fraction_of_memcpy"] == pytest.approx(rec["encode_gbps"] / rec["memcpy_gbps"])
  assert rec["met"] == (rec["fraction_of_memcpy"] >= 0.25)


@pytest.mark.slow
def test_compression_convergence_reproduction_runs_small(tmp_path):
  assert "experiments/reproduce/compression_convergence.py" in README
  _script("experiments/reproduce/compression_convergence.py", "--rounds", "2", "--eval-every", "1",
          "--clients", "200", "--clients-per-round", "20", "--only", "none,q8,top1%_ef",
          "--out", str(tmp_path))
  results = json.loads((tmp_path / "results.json").read_text())
  assert [r["setting"] for r in results] == ["none", "q8", "top1%_ef"]
  assert results[0]["bits_per_coordinate"] == 32.0
  assert results[1]["total_bits"] == pytest.approx(results[0]["total_bits"] * 8 / 32, rel=1e-3)
  assert (tmp_path / "accuracy_vs_bits.png").read_bytes()[:4] == b"\x89PNG"


def test_drive_bias_benchmark_runs_small(tmp_path):
  out = tmp_path / "d.json"
  report = json.loads(_script("experiments/benchmarks/drive_bias.py", "--draws", "64",
                              "--out", str(out), timeout=300))
  assert json.loads(out.read_text()) == report
  assert report["benchmark"] == "drive_bias" and report["machine"]["cpu_count"] > 0
  records = report["records"]
  assert len(records) == 3 * 3 * 6  # d x k x inputs
  assert {(r["d"], r["k"]) for r in records} == {(d, k) for d in (64, 256, 1024)
                                                 for k in (1, 2, 3)}
  for r in records:
    assert r["draws"] >= 64 and len(r["mean_head"]) == 4 and r["norm_x"] > 0
    assert r["bias"] >= 0 and r["bias_se"] >= 0 and 0 <= r["bias_excess"] <= r["bias"]
    assert r["resolved"] == (r["bias"] > 3 * r["bias_se"])
    assert 0 < r["nmse"] < 1
    assert r["inner_product_max_rel_dev"] < 1e-4  # <x_hat, x> = ||x||^2 on every draw
  for r in (r for r in records if r["input"] == "e1+0.5e2" and r["k"] == 1):
    # One block: every draw is 1.25 e1, a bias of exactly 50 % of ||x||, at every d.
    assert r["bias"] == pytest.approx(0.5, abs=1e-4) and r["resolved"]
    assert r["mean_head"][:2] == pytest.approx([1.25, 0.0], abs=1e-5)


@pytest.mark.slow
def test_emnist_benchmark_runs_small_and_every_program_computes_the_same_round():
  env = dict(os.environ)
  env["XLA_FLAGS"] = xla_flags()
  proc = subprocess.run([sys.executable, "experiments/benchmarks/emnist.py", "--clients-per-round",
                         "3", "--num-clients", "12", "--mean-size", "5", "--rounds", "2",
                         "--ref-rounds", "2", "--block-size", "2", "--programs", "engine",
                         "engine_vmap", "loop", "jit_map", *_TINY_CEILINGS],
                        capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  cell = json.loads(proc.stdout)["cells"][0]
  assert cell["engine"]["client_loop"] == "map" and cell["engine_vmap"]["client_loop"] == "vmap"
  for name in ("engine_vmap", "loop", "jit_map"):
    assert cell[name]["max_relative_diff_vs_engine"] < 1e-3, name
    assert cell[name]["round_seconds"] > 0 and name in cell["speedup_vs"]
  assert cell["best_reference"] == "jit_map" and cell["peak_rss_gib"] > 0


@pytest.mark.slow
def test_the_gpu_script_runs_tiny_on_cpu_and_writes_every_json(tmp_path):
  assert "experiments/benchmarks/gpu.sh" in README
  env = dict(os.environ, PYTHON=sys.executable)
  env["XLA_FLAGS"] = xla_flags()
  proc = subprocess.run(["bash", "experiments/benchmarks/gpu.sh", str(tmp_path), "--tiny"],
                        capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  names = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".json")
  assert names == ["compression.json", "emnist.json", "throughput_logreg_100.json",
                   "throughput_mlp_100.json"]
  cell = json.loads((tmp_path / "throughput_logreg_100.json").read_text())["results"][0]
  assert cell["clients_per_round"] == 100 and cell["engine"]["clients_per_second"] > 0
  assert cell["devices"] == 1 and cell["references"]["scan_vmap_1dev"]["matches_engine"]
  assert not list(tmp_path.glob("*.err"))
