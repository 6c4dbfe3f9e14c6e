"""Telemetry of a run: per-round KPIs, TensorBoard event files, an optional MLflow run.

Every run (the CLI and the Python API both go through `run_experiment`) gets:

  * **KPIs** added to each round's metrics (metrics.jsonl, and so the summary's
    `final`): `participation_rate` (participating / sampled clients),
    `dropoff_rate` (dropped / sampled; both 0 when nobody was sampled),
    `round_success_rate` (the fraction of rounds 1..r in which somebody
    trained), `update_norm_anomalies` (see `update_norm_anomalies`), and with
    `telemetry.cost_model` the cost model's figures (`runner/cost.py`).
  * **TensorBoard** event files in `<output_dir>/tensorboard/`
    (`telemetry.tensorboard`), written with tensorboardX's event writer (no
    TensorFlow): per round, at step = round, every numeric value of the
    round's metrics.jsonl record as a scalar, tagged `<group>/<key>` (groups
    `train`, `eval`, `privacy` (`dp_*`), `cost` and `round`), and histograms
    `clients/update_norm` and `clients/mean_loss` (loss_sum / examples) over
    the round's participating clients (at least one example; non-finite values
    are left out of a histogram and counted by `update_norm_anomalies`).
    Events are written synchronously and flushed (fsync) after each round's
    metrics.jsonl line, so a killed run loses at most the round in progress.
  * **MLflow** (`telemetry.mlflow.enabled`, the `mlflow` extra): one MLflow
    run per output folder, its id kept in `<output_dir>/mlflow_run.json`;
    params = the resolved config flattened to dotted keys; metrics = every
    numeric value of each round's record at step = round; artifacts =
    config.yaml, summary.json and the privacy report where there is one; the
    run ends FINISHED, FAILED (divergence, an error) or KILLED (a signal).

Resuming (`--resume`). The run continues from its checkpoint's round; the
rounds after it are recomputed (identical values, except timings). The
TensorBoard sink opens a new event file that starts with a `SessionLog.START`
event at step checkpoint + 1: TensorBoard then drops the steps from there on
that earlier files hold (its orphaned-data purge), so every step shows once,
with the recomputed value. The older file keeps those bytes on disk. The
MLflow sink reopens the same run and logs only rounds above the last one
that run already holds, so no step is logged twice.

A sink that fails during a run (disk full, a tracking server going away)
warns once and stops; the run and its metrics.jsonl go on.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Callable

import numpy as np

from fedjax_sim.runner import cost as cost_model
from fedjax_sim.runner.io import atomic_write_json

TENSORBOARD_DIR = "tensorboard"
MLFLOW_RUN_FILE = "mlflow_run.json"


class TelemetryError(RuntimeError):
  """A sink cannot start (e.g. the MLflow tracking store is unreachable or unsupported)."""


# -- KPIs -------------------------------------------------------------------------------


def update_norm_anomalies(norms: np.ndarray, examples: np.ndarray, k: float,
                          scale: str = "linear") -> int:
  """Clients whose update norm is non-finite, or above median + k * MAD.

  Over the clients with at least one example: the median and the MAD
  (median absolute deviation from the median, unscaled: for normal data
  MAD ~ 0.674 sigma, so k = 6 is about 4 sigma) are those of the finite norms;
  a norm strictly above `median + k * MAD` counts, and so does every NaN or
  infinite norm. With identical norms (MAD = 0) any larger norm counts.

  `scale="log"` applies the same rule to the logarithms of the finite,
  positive norms (a norm of 0 is never an anomaly): `log(norm) > median +
  k * MAD` of the log-norms, i.e. a norm more than `exp(k * MAD)` times the
  median. Norms spread multiplicatively (clients with more local steps move
  further), and on such skewed data the linear rule flags healthy clients:
  with log-normal norms (sigma 0.3) and k = 6 it flags at least one of 200
  clients in about 59 % of rounds, the log rule in about 1 % (as the linear
  rule does on normal data). Either rule is noisy on a handful of clients:
  with 5 clients 9-15 % of healthy rounds flag one.

  Args:
    norms: per-client update norms (`RoundResult.clients["update_norm"]`).
    examples: per-client example counts (clients with none are left out).
    k: the threshold in MADs.
    scale: "linear" (the norms) or "log" (their logarithms).
  """
  norms = np.asarray(norms, np.float64)[np.asarray(examples) > 0]
  finite = norms[np.isfinite(norms)]
  anomalies = len(norms) - len(finite)
  if scale == "log":
    finite = np.log(finite[finite > 0])
  elif scale != "linear":
    raise ValueError(f"scale must be 'linear' or 'log'; got {scale!r}.")
  if len(finite):
    median = np.median(finite)
    mad = np.median(np.abs(finite - median))
    anomalies += int(np.sum(finite > median + k * mad))
  return int(anomalies)


def participants(clients: dict[str, np.ndarray]) -> np.ndarray:
  """A mask of the round's clients that trained on at least one example."""
  return np.asarray(clients.get("examples", np.zeros(0))) > 0


def client_mean_losses(clients: dict[str, np.ndarray]) -> np.ndarray:
  """loss_sum / examples of each participating client (clients without examples skipped)."""
  keep = participants(clients)
  return (np.asarray(clients["loss_sum"], np.float64)[keep]
          / np.asarray(clients["examples"], np.float64)[keep])


def round_kpis(record: dict, clients: dict[str, np.ndarray], *, k: float, successes: int,
               rounds: int, scale: str = "linear") -> dict[str, float]:
  """The round's KPIs (module docstring) from its public metrics and per-client record.

  Args:
    record: the round's metrics.jsonl record so far (`sampled_clients`,
      `participating_clients`, `dropped_clients`).
    clients: `RoundResult.clients`.
    k, scale: the anomaly rule (`update_norm_anomalies`).
    successes, rounds: rounds in which somebody trained, and rounds, up to
      and including this one (the running success rate).
  """
  sampled = float(record.get("sampled_clients", 0.0))
  rate = lambda n: float(n) / sampled if sampled > 0 else 0.0
  norms = clients.get("update_norm", np.zeros(0))
  return {
      "participation_rate": rate(record.get("participating_clients", 0.0)),
      "dropoff_rate": rate(record.get("dropped_clients", 0.0)),
      "round_success_rate": successes / rounds if rounds else 0.0,
      "update_norm_anomalies": float(update_norm_anomalies(
          norms, clients.get("examples", np.zeros(len(norms))), k, scale)),
  }


def _numeric(record: dict) -> dict[str, float]:
  """The numeric values of a record (`round` is the step, not a value)."""
  return {k: float(v) for k, v in record.items()
          if k != "round" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
  """A nested config dict as `{dotted.key: value as text}` (lists as JSON)."""
  out = {}
  for k, v in config.items():
    key = f"{prefix}.{k}" if prefix else str(k)
    if isinstance(v, dict) and v:
      out.update(flatten(v, key))
    else:
      out[key] = v if isinstance(v, str) else json.dumps(v)
  return out


# -- sinks ------------------------------------------------------------------------------


def _tag(key: str) -> str:
  for prefix, group in (("train_", "train"), ("eval_", "eval"), ("dp_", "privacy")):
    if key.startswith(prefix):
      return f"{group}/{key}"
  if key in cost_model.ROUND_KEYS:
    return f"cost/{key}"
  return f"round/{key}"


class TensorBoardSink:
  """Writes each round's scalars and histograms to a TensorBoard event file, synchronously.

  Args:
    logdir: the folder (created).
    purge_from: on a resume, the first round this writer writes: TensorBoard
      hides the steps >= it that older event files hold.
  """

  def __init__(self, logdir: str, *, purge_from: int | None = None):
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto.event_pb2 import Event, SessionLog
    os.makedirs(logdir, exist_ok=True)
    self._event = Event
    # tensorboardX names the file by the second it opens and the host; the pid and the
    # first round keep a quick resume from reusing (and truncating) an earlier file.
    self._writer = EventsWriter(os.path.join(logdir, "events"),
                                f".{os.getpid()}.from{purge_from or 1}")
    if purge_from is not None:
      self._writer.write_event(Event(wall_time=time.time(), step=purge_from,
                                     session_log=SessionLog(status=SessionLog.START)))
    self._writer.flush()

  def write(self, record: dict, clients: dict[str, np.ndarray]) -> None:
    from tensorboardX import summary
    from tensorboardX.proto.summary_pb2 import Summary
    values = [summary.scalar(_tag(k), v).value[0] for k, v in _numeric(record).items()]
    keep = participants(clients)
    for name, data in (("clients/update_norm",
                        np.asarray(clients.get("update_norm", np.zeros(0)), np.float64)[keep]),
                       ("clients/mean_loss", client_mean_losses(clients))):
      data = data[np.isfinite(data)]
      if len(data):
        values.append(summary.histogram(name, data, bins="auto").value[0])
    self._writer.write_event(self._event(wall_time=time.time(), step=int(record["round"]),
                                         summary=Summary(value=values)))
    self._writer.flush()  # flush + fsync: the round is on disk before the next one starts

  def close(self) -> None:
    self._writer.close()


class MlflowSink:
  """One MLflow run per output folder (its id in `mlflow_run.json`), through `MlflowClient`.

  Args:
    section: the config's `telemetry.mlflow`.
    out: the output folder.
    config: the resolved config as a dict (logged as params).
    resume: reopen the folder's run (when its id is there and the store has it).
  """

  def __init__(self, section, out: str, config: dict, *, resume: bool):
    try:
      from mlflow.entities import Param
      from mlflow.tracking import MlflowClient
    except ImportError as e:
      from fedjax_sim.core.schema import ConfigError
      raise ConfigError(f"telemetry.mlflow.enabled = true needs the mlflow package ({e}): pip "
                        "install 'fedjax_sim[mlflow]'.") from e
    self._file = os.path.join(out, MLFLOW_RUN_FILE)
    self.last_step = 0
    try:
      self._client = MlflowClient(tracking_uri=section.tracking_uri or None)
      self.tracking_uri = self._client.tracking_uri
      run = self._reopen() if resume else None
      if run is None:
        experiment = self._client.get_experiment_by_name(section.experiment)
        experiment_id = (experiment.experiment_id if experiment is not None else
                         self._client.create_experiment(section.experiment))
        run = self._client.create_run(
            experiment_id, run_name=section.run_name or os.path.basename(os.path.abspath(out)),
            tags={"fedjax_sim.output_dir": os.path.abspath(out)})
        logged = {}
      else:
        logged = dict(run.data.params)
        self._client.update_run(run.info.run_id, status="RUNNING")
      self.run_id = run.info.run_id
      # MLflow refuses to change a param: a resumed run's new `rounds` becomes a tag.
      params = flatten(config)
      new = [Param(k, v) for k, v in params.items() if k not in logged]
      for i in range(0, len(new), 100):  # MLflow takes at most 100 params per batch
        self._client.log_batch(self.run_id, params=new[i:i + 100])
      for k, v in params.items():
        if k in logged and logged[k] != v:
          self._client.set_tag(self.run_id, f"fedjax_sim.resumed.{k}", v)
    except Exception as e:  # MLflow raises its own exceptions, OSError, ImportError, ...
      if getattr(self, "run_id", None):  # created, then logging failed: not left RUNNING
        try:
          self._client.set_terminated(self.run_id, "FAILED")
        except Exception:  # noqa: BLE001  (the first error is the one to report)
          pass
      uri = section.tracking_uri or "MLflow's default ($MLFLOW_TRACKING_URI, else its own)"
      raise TelemetryError(
          f"telemetry.mlflow: cannot start an MLflow run at tracking_uri = {uri} "
          f"({type(e).__name__}: {str(e)[:300]}). Set telemetry.mlflow.tracking_uri to a "
          "tracking server (http://...) or a store your MLflow supports, or set "
          "telemetry.mlflow.enabled = false.") from e
    atomic_write_json(self._file, {"tracking_uri": self.tracking_uri, "run_id": self.run_id,
                                   "experiment_id": run.info.experiment_id})

  def _reopen(self):
    """The folder's earlier run, or None (no id on file, or the store lacks it)."""
    try:
      with open(self._file) as f:
        run_id = json.load(f)["run_id"]
      run = self._client.get_run(run_id)
    except Exception:  # no file, a bad file, or an id this store does not hold
      return None
    history = self._client.get_metric_history(run_id, "sampled_clients")
    self.last_step = max((m.step for m in history), default=0)
    return run

  def write(self, record: dict) -> None:
    from mlflow.entities import Metric
    step = int(record["round"])
    if step <= self.last_step:  # logged before the resume, with the same values
      return
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, step) for k, v in _numeric(record).items()]
    for i in range(0, len(metrics), 1000):  # MLflow's batch limit
      self._client.log_batch(self.run_id, metrics=metrics[i:i + 1000])
    self.last_step = step

  def artifacts(self, paths: list[str]) -> None:
    for path in paths:
      if os.path.exists(path):
        self._client.log_artifact(self.run_id, path)

  def close(self, status: str) -> None:
    self._client.set_terminated(self.run_id, status)


# -- the run's telemetry ------------------------------------------------------------------


class Telemetry:
  """The telemetry of one run: KPIs and cost figures per round, and the sinks.

  Used by `run_experiment` as a context manager: `round_metrics` adds a
  round's KPIs to its record, `write` sends the record to the sinks after
  metrics.jsonl has it, `summary` gives summary.json's telemetry fields, and
  `finish` logs the artifacts and closes the sinks. Leaving the context
  without `finish` (an exception, a second signal) closes the sinks too,
  the MLflow run as FAILED or KILLED.

  Args:
    config: the run's `Config`.
    engine: its engine, after `init`.
    server_state: the server state (sizes the broadcast for the cost model).
    out: the output folder.
    resume: whether the run continues a checkpoint.
    start: the rounds already done (the checkpoint's round; 0 for a new run).
    kept: metrics.jsonl's records of rounds 1..start.
    config_dict: the resolved config as a dict (MLflow params).
    log: the runner's log function (warnings).
    step_cost: the cost model's `StepCost` where it is known already (a vmap
      sweep's members share one structure, hence one cost); None: computed.
  """

  def __init__(self, config, engine, server_state, out: str, *, resume: bool, start: int,
               kept: list[dict], config_dict: dict, log: Callable = print, step_cost=None):
    t = config.telemetry
    self._out, self._log = out, log
    self._k, self._scale = t.anomaly_mad_k, t.anomaly_scale
    self._successes = sum(1 for r in kept if not r.get("round_failed", 0))
    self._rounds = len(kept)
    self._finished = False
    self.errors: list[str] = []
    self.profile = self.cost = None
    if t.cost_model:
      d = t.device
      self.profile = cost_model.device_profile(d.preset, gflops=d.gflops,
                                               downlink_mbps=d.downlink_mbps,
                                               uplink_mbps=d.uplink_mbps)
      self.cost = step_cost or cost_model.step_cost(engine, server_state)
    tb_dir = os.path.join(out, TENSORBOARD_DIR)
    if not resume:
      shutil.rmtree(tb_dir, ignore_errors=True)  # a replaced run's events would mix in
      if os.path.exists(os.path.join(out, MLFLOW_RUN_FILE)):
        os.remove(os.path.join(out, MLFLOW_RUN_FILE))  # a replaced run gets its own MLflow run
    self.tensorboard = (TensorBoardSink(tb_dir, purge_from=start + 1 if resume else None)
                        if t.tensorboard else None)
    self._tb_dir = tb_dir if t.tensorboard else None
    self.mlflow, self._mlflow_run = None, None
    if t.mlflow.enabled:
      try:
        self.mlflow = MlflowSink(t.mlflow, out, config_dict, resume=resume)
      except Exception:
        self._close_sinks("FAILED")
        raise
      self._mlflow_run = {"tracking_uri": self.mlflow.tracking_uri, "run_id": self.mlflow.run_id}

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if not self._finished:
      self._close_sinks("KILLED" if exc_type is KeyboardInterrupt else "FAILED")
    return False

  def round_metrics(self, record: dict, clients: dict[str, np.ndarray]) -> dict[str, float]:
    """The KPIs and cost figures of the round whose public metrics are `record`."""
    self._rounds += 1
    self._successes += int(not record.get("round_failed", 0))
    out = round_kpis(record, clients, k=self._k, successes=self._successes,
                     rounds=self._rounds, scale=self._scale)
    if self.cost is not None:
      out.update(cost_model.round_cost(self.cost, self.profile, clients, record))
    return out

  def write(self, record: dict, clients: dict[str, np.ndarray]) -> None:
    """Sends a finished round's record (as written to metrics.jsonl) to the sinks."""
    if self.tensorboard is not None:
      self._guard("tensorboard", lambda: self.tensorboard.write(record, clients))
    if self.mlflow is not None:
      self._guard("mlflow", lambda: self.mlflow.write(record))

  def _guard(self, name: str, fn) -> None:
    try:
      fn()
    except Exception as e:  # a sink must not stop the run
      self.errors.append(f"{name}: {type(e).__name__}: {e}")
      self._log(f"fedjax_sim: warning: the {name} sink failed ({type(e).__name__}: {e}); "
                "it is off for the rest of the run (metrics.jsonl is unaffected).")
      if name == "tensorboard":
        self.tensorboard = None
      else:
        self.mlflow = None

  def summary(self, records: list[dict]) -> dict:
    """summary.json's telemetry fields (`cost_model`, `telemetry`), from every round's record."""
    out = {"telemetry": {
        "tensorboard_dir": self._tb_dir,
        "mlflow": self._mlflow_run,
        "update_norm_anomalies": float(sum(r.get("update_norm_anomalies", 0.0)
                                           for r in records)),
        "anomaly_mad_k": self._k,
        "anomaly_scale": self._scale,
        "errors": list(self.errors),
    }}
    if self.cost is not None:
      out["cost_model"] = cost_model.cost_summary(self.cost, self.profile, records)
    return out

  def finish(self, status: str) -> None:
    """Logs the artifacts (after summary.json is written) and closes the sinks."""
    if self.mlflow is not None:
      names = ("config.yaml", "summary.json", "privacy_report.json", "privacy_report.md")
      self._guard("mlflow", lambda: self.mlflow.artifacts(
          [os.path.join(self._out, n) for n in names]))
    self._close_sinks("FINISHED" if status == "completed" else
                      "KILLED" if status.startswith("interrupted") else "FAILED")
    self._finished = True

  def _close_sinks(self, mlflow_status: str) -> None:
    if self.tensorboard is not None:
      self.tensorboard.close()
      self.tensorboard = None
    if self.mlflow is not None:
      try:
        self.mlflow.close(mlflow_status)
      except Exception as e:  # noqa: BLE001  (closing must not hide the run's own outcome)
        self._log(f"fedjax_sim: warning: could not end the MLflow run ({e}).")
      self.mlflow = None


__all__ = ["MLFLOW_RUN_FILE", "MlflowSink", "TENSORBOARD_DIR", "TelemetryError", "TensorBoardSink",
           "Telemetry",
           "client_mean_losses", "flatten", "round_kpis", "update_norm_anomalies"]
