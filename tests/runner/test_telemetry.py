"""Telemetry: KPIs by hand, TensorBoard and MLflow read back after a run, a resume, a divergence."""

import glob
import json
import math
import os
import shutil
import sys

import numpy as np
import pytest

from fedjax_sim.runner.config import ConfigError, config_from_dict, to_dict
from fedjax_sim.runner.io import read_metrics
from fedjax_sim.runner.run import DivergenceError, run_experiment
from fedjax_sim.runner.telemetry import (MLFLOW_RUN_FILE, TENSORBOARD_DIR, Telemetry,
                                         TensorBoardSink, flatten, round_kpis,
                                         update_norm_anomalies)
from tests.runner.test_failures import _raw as failures_raw, diverging_raw

# Metrics that measure the simulator's own time: a recomputed round differs in them.
TIMING = {"round_seconds", "clients_per_second", "examples_per_second", "eval_seconds"}


def _quiet(*_):
  pass


def _raw(out, rounds=4, **sections):
  """test_failures' tiny run, checkpointed and evaluated every second round."""
  base = {"checkpoint": {"every": 2, "keep": 3}, "eval": {"every": 2}}
  for name, values in sections.items():
    base.setdefault(name, {}).update(values)
  return failures_raw(out, rounds, **base)


def _mlflow_section(tmp_path):
  return {"mlflow": {"enabled": True, "tracking_uri": (tmp_path / "mlruns").as_uri(),
                     "experiment": "telemetry_test"}}


@pytest.fixture
def file_store(monkeypatch):
  # MLflow 3 serves a file:// store only when asked to (it prefers a database backend).
  monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


def _accumulator(out):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  acc = EventAccumulator(os.path.join(out, TENSORBOARD_DIR),
                         size_guidance={"scalars": 0, "histograms": 0})
  acc.Reload()
  return acc


def _numeric_keys(record):
  return {k for k, v in record.items()
          if k != "round" and isinstance(v, (int, float)) and not isinstance(v, bool)}


# -- KPIs by hand ------------------------------------------------------------------------


def test_update_norm_anomalies_follow_the_median_plus_k_mad_rule_by_hand():
  # Finite norms of the clients with examples: [1, 2, 3, 4, 100]: median 3, absolute
  # deviations [2, 1, 0, 1, 97], MAD 1. With k = 6 the bound is 9: 100 is out. NaN and inf
  # always count; the client without examples (norm 1e9) is left out.
  norms = np.array([1, 2, 3, 4, 100, np.nan, np.inf, 1e9], np.float32)
  examples = np.array([5, 5, 5, 5, 5, 5, 5, 0], np.float32)
  assert update_norm_anomalies(norms, examples, 6.0) == 1 + 2
  assert update_norm_anomalies(norms, examples, 100.0) == 2  # bound 103
  # The bound itself is not an anomaly: [1, 2, 3, 4, 9] has bound 3 + 6 * 1 = 9.
  assert update_norm_anomalies(np.array([1, 2, 3, 4, 9.0]), np.ones(5), 6.0) == 0
  assert update_norm_anomalies(np.array([1, 2, 3, 4, 9.5]), np.ones(5), 6.0) == 1
  # MAD = 0 (most norms equal): anything above the median counts.
  assert update_norm_anomalies(np.array([5, 5, 5, 5, 6.0]), np.ones(5), 6.0) == 1
  assert update_norm_anomalies(np.zeros(0), np.zeros(0), 6.0) == 0


def test_the_log_scale_rule_by_hand():
  # ln of [1, 2, 4, 8, 1000]: median ln 4, absolute deviations [ln 4, ln 2, 0, ln 2, ln 250],
  # MAD ln 2: the bound is 4 * 2^k, 256 for k = 6 and 1024 for k = 8. The zero norm is never an
  # anomaly on the log scale and is left out of the median and MAD.
  norms, examples = np.array([0, 1, 2, 4, 8, 1000.0]), np.ones(6)
  assert update_norm_anomalies(norms, examples, 6.0, "log") == 1
  assert update_norm_anomalies(norms, examples, 8.0, "log") == 0
  # Linear, [0, 1, 2, 4, 8, 1000]: median 3, deviations [3, 2, 1, 1, 5, 997], MAD 2.5: bound
  # 3 + 8 * 2.5 = 23 flags 1000 still.
  assert update_norm_anomalies(norms, examples, 8.0, "linear") == 1
  with pytest.raises(ValueError, match="scale"):
    update_norm_anomalies(norms, examples, 6.0, "sqrt")


def test_round_kpis_by_hand():
  record = {"sampled_clients": 10.0, "participating_clients": 6.0, "dropped_clients": 3.0}
  clients = {"update_norm": np.array([1.0, 1.0, np.nan], np.float32),
             "examples": np.array([4, 4, 4], np.float32)}
  kpis = round_kpis(record, clients, k=6.0, successes=3, rounds=4)
  assert kpis == {"participation_rate": 0.6, "dropoff_rate": 0.3, "round_success_rate": 0.75,
                  "update_norm_anomalies": 1.0}
  empty = round_kpis({"sampled_clients": 0.0}, {}, k=6.0, successes=0, rounds=1)
  assert empty == {"participation_rate": 0.0, "dropoff_rate": 0.0, "round_success_rate": 0.0,
                   "update_norm_anomalies": 0.0}


def test_flatten_gives_dotted_keys_and_text_values():
  assert flatten({"a": 1, "b": {"c": [1, 2], "d": {"e": None}, "f": "x"}, "g": {}}) == \
      {"a": "1", "b.c": "[1, 2]", "b.d.e": "null", "b.f": "x", "g": "{}"}


# -- config ------------------------------------------------------------------------------


def test_telemetry_keys_are_validated_like_every_section():
  with pytest.raises(ConfigError, match=r"'telemetry.mlflow.tracking_ur'. Did you mean "
                                        r"'tracking_uri'"):
    config_from_dict({"telemetry": {"mlflow": {"tracking_ur": "x"}}})
  with pytest.raises(ConfigError, match=r"'telemetry.tensorbord'. Did you mean 'tensorboard'"):
    config_from_dict({"telemetry": {"tensorbord": False}})
  with pytest.raises(ConfigError, match="telemetry.device.uplink_mbps = 0.0 must be > 0"):
    config_from_dict({"telemetry": {"device": {"uplink_mbps": 0}}})
  with pytest.raises(ConfigError, match="telemetry.anomaly_mad_k = -1.0 must be > 0"):
    config_from_dict({"telemetry": {"anomaly_mad_k": -1}})
  c = config_from_dict({"telemetry": {"device": {"preset": "laptop", "gflops": 3}}})
  assert config_from_dict(to_dict(c)) == c


def test_a_missing_mlflow_package_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` fails as if not installed
  with pytest.raises(ConfigError, match=r"pip install 'fedjax_sim\[mlflow\]'"):
    config_from_dict({"telemetry": {"mlflow": {"enabled": True}}})
  config_from_dict({"telemetry": {"mlflow": {"enabled": False}}})  # off: no package needed


# -- a run, stopped after round 4 before its checkpoint, then resumed to round 5 ------------


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
  """A 4-round run (dropouts on, TensorBoard and MLflow) whose last checkpoint is then lost,
  as if killed while writing round 4's events, and its resume to 5 rounds (rounds 3 and 4
  recomputed)."""
  tmp = tmp_path_factory.mktemp("telemetry")
  mp = pytest.MonkeyPatch()
  mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
  clients = {}  # round -> the per-client record the engine returned (the resumed run's last)
  round_metrics = Telemetry.round_metrics

  def capture(self, record, round_clients):
    clients[int(record["round"])] = {k: np.array(v) for k, v in round_clients.items()}
    return round_metrics(self, record, round_clients)

  mp.setattr(Telemetry, "round_metrics", capture)
  try:
    out = str(tmp / "run")
    raw = _raw(out, rounds=4, system={"dropout": 0.25}, telemetry=_mlflow_section(tmp))
    run_experiment(config_from_dict(raw), log=_quiet)
    first = read_metrics(os.path.join(out, "metrics.jsonl"))
    first_mlflow = json.load(open(os.path.join(out, MLFLOW_RUN_FILE)))
    first_summary = json.load(open(os.path.join(out, "summary.json")))
    shutil.rmtree(os.path.join(out, "checkpoints", "4"))
    (event_file,) = glob.glob(os.path.join(out, TENSORBOARD_DIR, "events.out.tfevents.*"))
    os.truncate(event_file, os.path.getsize(event_file) - 7)  # round 4's event cut short
    raw["rounds"] = 5
    summary = run_experiment(config_from_dict(raw), resume=True, log=_quiet)
  finally:
    mp.undo()
  return {"out": out, "first": first, "records": read_metrics(os.path.join(out, "metrics.jsonl")),
          "summary": summary, "first_summary": first_summary, "first_mlflow": first_mlflow,
          "raw": raw, "tracking_uri": (tmp / "mlruns").as_uri(), "clients": clients}


def test_tensorboard_scalars_equal_metrics_jsonl_once_per_round_after_a_resume(resumed):
  records = resumed["records"]
  assert [r["round"] for r in records] == [1, 2, 3, 4, 5]
  acc = _accumulator(resumed["out"])
  tags = set(acc.Tags()["scalars"])
  keys = set().union(*(_numeric_keys(r) for r in records))
  assert {t.split("/", 1)[1] for t in tags} == keys
  for tag in tags:
    key = tag.split("/", 1)[1]
    events = acc.Scalars(tag)
    expected = {r["round"]: r[key] for r in records if key in r}
    # One value per round (the purge hid the first run's rounds 3 and 4), the recomputed
    # one: even timings equal the resumed metrics.jsonl.
    assert [e.step for e in events] == sorted(expected), tag
    for e in events:
      want = expected[e.step]
      assert e.value == pytest.approx(np.float32(want), rel=1e-6, abs=1e-30) or \
          (math.isnan(want) and math.isnan(e.value)), (tag, e.step)
  assert [e.step for e in acc.Scalars("eval/eval_accuracy")] == [2, 4, 5]
  assert "train/train_loss" in tags and "round/participation_rate" in tags
  assert "cost/client_seconds_max" in tags
  assert len(glob.glob(os.path.join(resumed["out"], TENSORBOARD_DIR, "*tfevents*"))) == 2


def test_tensorboard_histograms_count_the_participating_clients(resumed):
  acc = _accumulator(resumed["out"])
  participating = {r["round"]: r["participating_clients"] for r in resumed["records"]}
  for tag in ("clients/update_norm", "clients/mean_loss"):
    histograms = acc.Histograms(tag)
    assert [h.step for h in histograms] == [1, 2, 3, 4, 5]
    for h in histograms:
      c = resumed["clients"][h.step]
      has_data = c["examples"] > 0
      values = (c["update_norm"][has_data] if tag.endswith("norm") else
                c["loss_sum"][has_data] / c["examples"][has_data])
      assert h.histogram_value.num == participating[h.step] == len(values)
      assert sum(h.histogram_value.bucket) == participating[h.step]
      assert h.histogram_value.sum == pytest.approx(np.sum(values.astype(np.float64)),
                                                    rel=1e-6)
      assert (h.histogram_value.min, h.histogram_value.max) == \
          pytest.approx((values.min(), values.max()), rel=1e-6)
  # Participants are fewer than sampled in some round (dropouts), so the count is not
  # simply the cohort size.
  assert any(r["participating_clients"] < r["sampled_clients"] for r in resumed["records"])


def test_round_kpis_in_metrics_jsonl(resumed):
  records = resumed["records"]
  for i, r in enumerate(records):
    assert r["participation_rate"] == r["participating_clients"] / r["sampled_clients"]
    assert r["dropoff_rate"] == r["dropped_clients"] / r["sampled_clients"]
    ok = [not x["round_failed"] for x in records[:i + 1]]
    assert r["round_success_rate"] == sum(ok) / len(ok)
    # The rule by hand on the round's clients: median + 6 MAD of the norms of the clients with
    # examples (no client diverges here).
    c = resumed["clients"][r["round"]]
    norms = np.sort(c["update_norm"][c["examples"] > 0].astype(np.float64))
    n = len(norms)
    median = (norms[(n - 1) // 2] + norms[n // 2]) / 2
    deviations = np.sort(np.abs(norms - median))
    mad = (deviations[(n - 1) // 2] + deviations[n // 2]) / 2
    assert r["update_norm_anomalies"] == sum(x > median + 6 * mad for x in norms)
    assert len(c["client_id"]) == r["sampled_clients"] - r["dropped_clients"]
  assert sum(r["dropped_clients"] for r in records) > 0
  assert resumed["summary"]["round_success_rate"] == records[-1]["round_success_rate"]
  # The resumed rounds 3 and 4 equal the first run's, timings aside.
  strip = lambda r: {k: v for k, v in r.items() if k not in TIMING}
  assert [strip(r) for r in records[:4]] == [strip(r) for r in resumed["first"]]


def test_cost_figures_in_metrics_jsonl_and_summary(resumed):
  records, cost = resumed["records"], resumed["summary"]["cost_model"]
  params = 4 * 8 + 8 + 8 * 3 + 3  # the MLP 4 -> 8 -> 3, weights and biases, float32
  assert cost["broadcast_bytes"] == 4 * params
  assert cost["upload_bits"] == 32 * params  # the plain mean uploads the float32 delta
  assert cost["device"] == {"name": "phone", "gflops": 10.0, "downlink_mbps": 50.0,
                            "uplink_mbps": 10.0}
  assert cost["step_flops"] > 0 and cost["step_temp_bytes"] > 0
  for r in records:
    planned = r["sampled_clients"] - r["dropped_clients"]
    assert r["bytes_down"] == 4 * params * planned
    assert r["bytes_up"] == r["bits"] / 8
    assert r["client_gflops_total"] == pytest.approx(cost["step_flops"] * r["steps"] / 1e9)
    # Every planned client here has 6 or 7 training examples, batch 4: 2 steps each; the
    # slowest client's time by hand (download, 2 steps, upload).
    by_hand = (8 * 4 * params / 50e6 + cost["step_flops"] * 2 / 10e9 + 32 * params / 10e6)
    assert r["client_seconds_max"] == pytest.approx(by_hand, rel=1e-9)
  assert cost["total_bytes_up"] == sum(r["bytes_up"] for r in records)
  assert cost["simulated_seconds"] == pytest.approx(sum(r["client_seconds_max"]
                                                        for r in records))
  assert cost["simulator_seconds"] == pytest.approx(sum(r["round_seconds"] for r in records))
  assert cost["simulated_seconds_per_simulator_second"] == pytest.approx(
      cost["simulated_seconds"] / cost["simulator_seconds"])


def test_mlflow_run_holds_params_metrics_and_artifacts_once_per_round(resumed):
  from mlflow.tracking import MlflowClient
  client = MlflowClient(tracking_uri=resumed["tracking_uri"])
  saved = json.load(open(os.path.join(resumed["out"], MLFLOW_RUN_FILE)))
  assert saved["run_id"] == resumed["first_mlflow"]["run_id"]  # the resume reopened it
  run = client.get_run(saved["run_id"])
  assert run.info.status == "FINISHED"
  assert client.get_experiment(run.info.experiment_id).name == "telemetry_test"
  assert run.info.run_name == "run"  # the output folder's name
  # Params: the resolved config, flattened; MLflow keeps the first value of a param, the
  # resumed run's new `rounds` is a tag.
  expected = flatten(to_dict(config_from_dict(resumed["raw"])))
  assert {k: v for k, v in run.data.params.items() if k != "rounds"} == \
      {k: v for k, v in expected.items() if k != "rounds"}
  assert run.data.params["rounds"] == "4"
  assert run.data.tags["fedjax_sim.resumed.rounds"] == "5"
  assert run.data.params["sampling.clients_per_round"] == "6"
  assert run.data.params["model.hidden"] == "[8]"
  records = resumed["records"]
  for key in ("train_loss", "eval_loss", "participation_rate", "client_seconds_max", "bits"):
    history = client.get_metric_history(saved["run_id"], key)
    expected_steps = [r["round"] for r in records if key in r]
    assert sorted(m.step for m in history) == expected_steps, key  # each round once
    for m in history:
      assert m.value == pytest.approx(records[m.step - 1][key], rel=1e-12)
  artifacts = {a.path for a in client.list_artifacts(saved["run_id"])}
  assert {"summary.json", "config.yaml"} <= artifacts
  target = os.path.join(os.path.dirname(resumed["out"]), "downloaded")
  os.makedirs(target, exist_ok=True)
  local = client.download_artifacts(saved["run_id"], "summary.json", target)
  assert json.load(open(local))["rounds"] == 5
  assert resumed["summary"]["telemetry"]["mlflow"]["run_id"] == saved["run_id"]


# -- other ways a run ends -----------------------------------------------------------------


def test_divergence_closes_the_sinks_with_the_diverged_round_written(tmp_path, file_store):
  out = str(tmp_path / "div")
  raw = diverging_raw(tmp_path, out, _raw, telemetry=_mlflow_section(tmp_path))
  with pytest.warns(UserWarning, match="unscaled"):
    with pytest.raises(DivergenceError):
      run_experiment(config_from_dict(raw), log=_quiet)
  records = read_metrics(os.path.join(out, "metrics.jsonl"))
  last = records[-1]["round"]
  acc = _accumulator(out)
  assert [e.step for e in acc.Scalars("round/sampled_clients")] == list(range(1, last + 1))
  from mlflow.tracking import MlflowClient
  run_id = json.load(open(os.path.join(out, MLFLOW_RUN_FILE)))["run_id"]
  run = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri()).get_run(run_id)
  assert run.info.status == "FAILED"
  history = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri()).get_metric_history(
      run_id, "sampled_clients")
  assert sorted(m.step for m in history) == list(range(1, last + 1))
  summary = json.load(open(os.path.join(out, "summary.json")))
  assert summary["status"] == "diverged"
  # The diverged round's anomalies are its clients' non-finite or outlying norms.
  assert records[-1]["update_norm_anomalies"] >= records[-1]["nonfinite_updates"]


def test_dp_run_logs_the_privacy_report_and_epsilon(tmp_path, file_store):
  out = str(tmp_path / "dp")
  raw = _raw(out, rounds=2, model={"kind": "logreg"},
             algorithm={"weighting": "uniform"},
             privacy={"mechanism": "dp_fedavg", "clip_norm": 0.5, "noise_multiplier": 1.1},
             telemetry={**_mlflow_section(tmp_path), "cost_model": False})
  del raw["model"]["hidden"]
  run_experiment(config_from_dict(raw), log=_quiet)
  from mlflow.tracking import MlflowClient
  client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
  run_id = json.load(open(os.path.join(out, MLFLOW_RUN_FILE)))["run_id"]
  assert {"privacy_report.json", "privacy_report.md", "summary.json"} <= \
      {a.path for a in client.list_artifacts(run_id)}
  records = read_metrics(os.path.join(out, "metrics.jsonl"))
  acc = _accumulator(out)
  assert [e.value for e in acc.Scalars("privacy/dp_epsilon")] == pytest.approx(
      [r["dp_epsilon"] for r in records], rel=1e-6)
  assert "client_seconds_max" not in records[-1]  # cost_model: false
  assert "cost_model" not in json.load(open(os.path.join(out, "summary.json")))


def test_tensorboard_off_writes_no_event_files(tmp_path):
  out = str(tmp_path / "off")
  run_experiment(config_from_dict(_raw(out, rounds=1, telemetry={"tensorboard": False})),
                 log=_quiet)
  assert not os.path.exists(os.path.join(out, TENSORBOARD_DIR))
  assert json.load(open(os.path.join(out, "summary.json")))["telemetry"]["tensorboard_dir"] \
      is None


def _bare_telemetry(tmp_path, **telemetry):
  """A Telemetry without an engine (no cost model), as `run_experiment` opens it."""
  out = str(tmp_path / "bare")
  os.makedirs(out)
  c = config_from_dict(_raw(out, telemetry={"cost_model": False, **telemetry}))
  return Telemetry(c, None, None, out, resume=False, start=0, kept=[],
                   config_dict=to_dict(c), log=_quiet), out


def test_leaving_early_ends_the_mlflow_run_killed_or_failed(tmp_path, file_store):
  from mlflow.tracking import MlflowClient
  client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
  for exc, status in ((KeyboardInterrupt, "KILLED"), (RuntimeError, "FAILED")):
    shutil.rmtree(tmp_path / "bare", ignore_errors=True)
    telemetry, out = _bare_telemetry(tmp_path, **_mlflow_section(tmp_path))
    with pytest.raises(exc):
      with telemetry:
        telemetry.write({"round": 1, "sampled_clients": 3.0},
                        {"examples": np.ones(3, np.float32),
                         "loss_sum": np.ones(3, np.float32),
                         "update_norm": np.ones(3, np.float32)})
        raise exc()
    run_id = json.load(open(os.path.join(out, MLFLOW_RUN_FILE)))["run_id"]
    assert client.get_run(run_id).info.status == status
    acc = _accumulator(out)  # the event file was closed with the round in it
    assert [e.value for e in acc.Scalars("round/sampled_clients")] == [3.0]


def test_a_failing_sink_warns_once_and_the_run_goes_on(tmp_path, monkeypatch):
  telemetry, out = _bare_telemetry(tmp_path)
  messages = []
  telemetry._log = messages.append

  def broken(self, record, clients):
    raise OSError("disk full")

  monkeypatch.setattr(TensorBoardSink, "write", broken)
  with telemetry:
    for r in (1, 2):
      telemetry.write({"round": r}, {})
    telemetry.finish("completed")
  assert len(messages) == 1 and "tensorboard sink failed" in messages[0]
  assert telemetry.summary([])["telemetry"]["errors"] == ["tensorboard: OSError: disk full"]


def test_an_mlflow_store_that_cannot_open_is_a_clear_error_before_any_round(tmp_path):
  from fedjax_sim.runner.telemetry import TelemetryError
  with pytest.raises(TelemetryError, match="telemetry.mlflow: cannot start an MLflow run at "
                                           "tracking_uri = nosuchscheme://x"):
    _bare_telemetry(tmp_path, mlflow={"enabled": True, "tracking_uri": "nosuchscheme://x"})
  assert not os.path.exists(tmp_path / "bare" / MLFLOW_RUN_FILE)
  # The TensorBoard sink it had opened is closed again (its file holds no round).
  acc = _accumulator(str(tmp_path / "bare"))
  assert acc.Tags()["scalars"] == []


@pytest.mark.parametrize("status, mlflow_status", [
    ("completed", "FINISHED"), ("diverged", "FAILED"), ("interrupted by SIGTERM", "KILLED")])
def test_finish_ends_the_mlflow_run_with_the_runs_status(tmp_path, file_store, status,
                                                         mlflow_status):
  from mlflow.tracking import MlflowClient
  telemetry, out = _bare_telemetry(tmp_path, **_mlflow_section(tmp_path))
  with telemetry:
    telemetry.finish(status)
  run_id = json.load(open(os.path.join(out, MLFLOW_RUN_FILE)))["run_id"]
  client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
  assert client.get_run(run_id).info.status == mlflow_status
