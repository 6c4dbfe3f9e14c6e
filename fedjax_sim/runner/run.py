"""The experiment runner: a validated `Config` in, an output folder out.

Output folder:
  config.yaml      the resolved config (every default that applies filled in)
  checkpoints/     orbax checkpoints of the whole state (every checkpoint.every rounds, and last)
  metrics.jsonl    one line per round (train and, on eval rounds, eval metrics)
  summary.json     final metrics, timings, compile count, devices, versions
  convergence.png  loss and accuracy against rounds
  privacy_report.json, privacy_report.md
                   for DP runs: mechanism, accounting, epsilon per round, assumptions
  tensorboard/     TensorBoard event files (telemetry.tensorboard; see `runner.telemetry`)
  mlflow_run.json  the MLflow run of this folder (telemetry.mlflow.enabled)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import platform
import threading
import time

import jax
import numpy as np
import yaml

from fedjax_sim.core import SimState
from fedjax_sim.core.engine import STORE_LAYOUT
from fedjax_sim.core.evaluation import summarize
from fedjax_sim.core.keys import Purpose, run_key
from fedjax_sim.core.registry import PRIVACY
from fedjax_sim.runner.build import Experiment, Parts, build_experiment
from fedjax_sim.runner.checkpoint import CheckpointError, Checkpointer, checkpoint_dir
from fedjax_sim.runner.compile_cache import (CompileCacheError, CompileClock,
                                            enable_compilation_cache)
from fedjax_sim.runner.config import (Config, ConfigError, config_differences, config_from_dict,
                                     prune_inapplicable, to_dict)
from fedjax_sim.core.distributed import agree, is_multiprocess
from fedjax_sim.runner.io import (MetricsLog, atomic_write_json, atomic_write_text, is_writer,
                                  read_metrics)
from fedjax_sim.runner.plot import convergence_plot
from fedjax_sim.runner.privacy import privacy_report, write_privacy_report
from fedjax_sim.runner.telemetry import Telemetry, TelemetryError


class RunError(RuntimeError):
  """The run cannot start or continue (e.g. its output folder holds another run)."""


class DivergenceError(RunError):
  """The global model became non-finite; the run stopped at that round."""


class Interrupted(RunError):
  """The run was stopped by SIGINT/SIGTERM after a round, with a checkpoint to resume from."""

  def __init__(self, message: str, *, signal_number: int, output_dir: str, rounds_done: int):
    super().__init__(message)
    self.signal_number = signal_number
    self.output_dir = output_dir
    self.rounds_done = rounds_done


# -- running --------------------------------------------------------------------


def _holds_run(out: str) -> bool:
  metrics = os.path.join(out, "metrics.jsonl")
  ckpts = checkpoint_dir(out)
  has_checkpoint = os.path.isdir(ckpts) and any(n.isdigit() for n in os.listdir(ckpts))
  return bool((os.path.exists(metrics) and read_metrics(metrics)) or has_checkpoint)


def _barrier(name: str) -> None:
  """Waits for every process of a multi-process run (a no-op on one)."""
  if is_multiprocess():
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"fedjax_sim: {name}")


def _check_output_free(c: Config, overwrite: bool) -> None:
  """Refuses an output folder that holds a run (before anything is built or written)."""
  out = c.output_dir
  if _holds_run(out) and not overwrite:
    raise RunError(f"output_dir {out!r} already holds a run (metrics.jsonl, checkpoints). Choose "
                   f"another output_dir (--set output_dir=...), pass --resume {out} to continue "
                   f"it, or pass --overwrite to replace it.")


def _prepare_output(c: Config) -> str:
  out = c.output_dir
  if not is_writer():  # process 0 of several prepares the shared folder
    return out
  metrics = os.path.join(out, "metrics.jsonl")
  ckpts = checkpoint_dir(out)
  if os.path.exists(metrics):
    os.remove(metrics)  # replaced on request, or holds no complete round
  if os.path.isdir(ckpts):
    shutil.rmtree(ckpts)  # replaced on request, or an empty folder a failed start left
  for name in ("summary.json", "privacy_report.json", "privacy_report.md"):
    if os.path.exists(os.path.join(out, name)):
      os.remove(os.path.join(out, name))
  os.makedirs(out, exist_ok=True)
  atomic_write_text(os.path.join(out, "config.yaml"),
                    yaml.safe_dump(to_dict(c), sort_keys=False))
  return out


# Keys that may change between a run and its resumption (telemetry only observes the run).
_RESUMABLE_CHANGES = {"rounds", "progress", "output_dir", "telemetry"}


def _check_resumable(c: Config) -> str:
  out = c.output_dir
  saved_path = os.path.join(out, "config.yaml")
  if not os.path.exists(saved_path):
    raise RunError(f"Cannot resume: {out!r} holds no run (config.yaml is missing). Start it "
                   "without --resume.")
  try:
    # prune_inapplicable: folders written before ignored keys became errors list every key.
    saved = config_from_dict(prune_inapplicable(yaml.safe_load(open(saved_path)) or {}))
  except (ConfigError, yaml.YAMLError) as e:
    raise RunError(f"Cannot resume: {saved_path} is not a valid config ({e}).") from e
  diffs = [f"{k}: the run has {a!r}, now {b!r}" for k, a, b in
           config_differences(to_dict(saved), to_dict(c)) if k.split(".")[0] not in _RESUMABLE_CHANGES]
  if diffs:
    raise RunError(f"Cannot resume {out!r} with a different config; only rounds (and the "
                   "telemetry section) may change. Differences: " + "; ".join(diffs))
  return out


class _StopRequest:
  """Set by SIGINT/SIGTERM; the round loop stops after the round in progress."""

  def __init__(self):
    self.signum: int | None = None


@contextlib.contextmanager
def _stop_on_signals(log):
  """SIGINT and SIGTERM ask the run to stop after the current round (a second one stops at once).

  Only the main thread can install signal handlers; elsewhere (a run started
  from a worker thread) signals keep their usual meaning.
  """
  request = _StopRequest()
  if threading.current_thread() is not threading.main_thread():
    yield request
    return

  def handler(signum, frame):
    if request.signum is not None:
      raise KeyboardInterrupt(f"{signal.Signals(signum).name} received twice")
    request.signum = signum
    log(f"\nfedjax_sim: {signal.Signals(signum).name} received; stopping after the current round "
        "and saving a checkpoint (send it again to stop at once, without one).")

  previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
  try:
    yield request
  finally:
    for sig, h in previous.items():
      if h is not None:  # None: a handler installed from C, which Python cannot reinstall
        signal.signal(sig, h)


def run_experiment(c: Config, *, overwrite: bool = False, resume: bool = False,
                   log=print, compile_cache: str | None = None, parts: Parts | None = None) -> dict:
  """Runs a validated config to completion; returns the summary.

  With `resume=True` it continues the run in `c.output_dir` from its latest
  checkpoint (the config must match; `rounds` may grow): metrics of rounds
  after that checkpoint are dropped and recomputed, identically.

  JAX's persistent compilation cache is enabled first (`compile_cache`: a
  folder or "off"; default: see `runner.compile_cache`). `parts` holds
  objects a script supplies instead of building them (see
  `fedjax_sim.Simulation`, which fills it and the matching config sections).

  Raises:
    ConfigError, DataError: bad config or data (nothing is written).
    RunError: the output folder holds another run, a resume does not fit, or
      a privacy budget is spent.
    DivergenceError: the global model became non-finite; metrics up to that
      round and the checkpoints before it are kept.
    Interrupted: SIGINT/SIGTERM stopped the run after a round; its state is
      checkpointed and `--resume` continues it.
  """
  # A Config built in Python skips the checks a file gets; the round trip runs them all
  # (types, ranges and every component's rules), for configs from files a no-op.
  c = config_from_dict(to_dict(c))
  if c.sweep.active:  # the members are the runs (runner/sweep.py); this would run the base only
    raise RunError("This config has a sweep: section; run it with fedjax_sim.runner.sweep."
                   "run_sweep (fedjax-sim run does), which runs each member.")
  # Several processes (jax.distributed) must run one config on equal device counts.
  agree("config", yaml.safe_dump(to_dict(c), sort_keys=True))
  agree("number of local devices", str(jax.local_device_count()))
  if is_multiprocess() and not is_writer():
    # Only process 0 writes the run's files and reports (checkpoints are written by all).
    c = dataclasses.replace(c, progress=False, telemetry=dataclasses.replace(
        c.telemetry, tensorboard=False,
        mlflow=dataclasses.replace(c.telemetry.mlflow, enabled=False)))
  try:
    cache_dir = enable_compilation_cache(compile_cache)
  except CompileCacheError as e:
    raise RunError(str(e)) from e
  with CompileClock() as clock, _stop_on_signals(log) as request, \
      contextlib.ExitStack() as cleanup:  # closes the telemetry sinks on every way out
    return _run(c, overwrite, resume, log, clock, cache_dir, request, parts, cleanup)


def _run(c: Config, overwrite: bool, resume: bool, log, clock: CompileClock,
         cache_dir: str | None, request: _StopRequest, parts: Parts | None,
         cleanup: contextlib.ExitStack) -> dict:
  session = RunSession(c, overwrite=overwrite, resume=resume, log=log, clock=clock,
                       cache_dir=cache_dir, request=request, cleanup=cleanup)
  session.build(parts)
  session.open()
  try:
    session.check_signal()
    for result in session.exp.engine.rounds(session.state, session.start, session.stop):
      if not session.on_round(result, lambda result=result: result.state):
        break
  finally:
    session.close()
  return session.finish()


class RunSession:
  """One run's life in the steps a driver calls, so that several runs can advance together.

  `run_experiment` drives one session over its engine's rounds; a `vmap`
  sweep (`runner/sweep.py`) drives one session per member over the rounds of
  `core/members.MemberRounds`, so every member writes exactly what a run
  writes, through this code:

    build(parts)   checks the output folder (or the resume), builds the experiment; writes nothing
    open()         prepares the folder, starts (or restores) the state, telemetry, privacy report
    check_signal() refuses to train when a signal came while building
    on_round(result, get_state) -> bool
                   writes one round (metrics, evaluation, checkpoint); False: the run stops
    close()        closes the progress bar, checkpointer and metrics file (always)
    finish()       the plot and summary.json; raises DivergenceError or Interrupted

  Attributes set by `build`/`open`: `exp`, `state` (the state the rounds start
  from), `start` (rounds already done), `stop` (the last round to run, lower
  than `rounds` where a privacy budget ends the run), `status`, `done`.
  """

  def __init__(self, c: Config, *, overwrite: bool, resume: bool, log, clock: CompileClock,
               cache_dir: str | None, request: _StopRequest, cleanup: contextlib.ExitStack):
    self.c, self.overwrite, self.resume, self.log = c, overwrite, resume, log
    self.clock, self.cache_dir, self.request, self.cleanup = clock, cache_dir, request, cleanup
    self.t_start = time.perf_counter()
    self.out = c.output_dir
    self.sink = None
    self.bar = None
    self.checkpointer = None
    self.summary_extra: dict = {}  # added to summary.json (a vmap sweep says so there)
    self.step_cost = None  # the cost model's figures, where known (see `Telemetry`)

  def build(self, parts: Parts | None = None, noise_multiplier: float | None = None) -> None:
    """Checks the folder (or the resume) and builds the experiment; nothing is written."""
    c = self.c
    if self.resume:
      self.out = _check_resumable(c)
      self.exp = build_experiment(c, _calibrated_noise(self.out, c), parts)
    else:
      _check_output_free(c, self.overwrite)
      # bad data or settings fail here, before any write
      self.exp = build_experiment(c, noise_multiplier, parts)
    self.t_built = time.perf_counter()

  def open(self) -> None:
    """Prepares the output folder and the starting state (restored on resume)."""
    c, exp, out, log, resume = self.c, self.exp, self.out, self.log, self.resume
    if not resume:
      _barrier("checked the output folder")  # several processes: all look before one writes
      _prepare_output(c)
      _barrier("prepared the output folder")
    self.privacy = privacy = exp.privacy
    if privacy is not None and privacy.info.get("utility_warning"):
      log(f"fedjax_sim: warning: {privacy.info['utility_warning']}")
    stop, stopped = c.rounds, None
    if privacy is not None and c.privacy.budget_epsilon is not None:
      stop = privacy.ledger.affordable_rounds(c.privacy.budget_epsilon, c.rounds)
      if stop < c.rounds:
        stopped = (f"privacy budget: round {stop + 1} would spend epsilon = "
                   f"{privacy.epsilon(stop + 1):.4g} > budget_epsilon = "
                   f"{c.privacy.budget_epsilon} (delta = {privacy.delta:.3g}); the state after "
                   f"round {stop} is saved.")
      if stop == 0:
        raise RunError(f"privacy.budget_epsilon = {c.privacy.budget_epsilon} does not afford one "
                       f"round: round 1 alone spends epsilon = {privacy.epsilon(1):.4g}. Raise "
                       "the budget or privacy.noise_multiplier.")
    self.stop, self.stopped = stop, stopped
    params = exp.model.init(run_key(c.seed, Purpose.INIT))
    state = exp.engine.init(params)
    self.checkpointer = checkpointer = Checkpointer(out, keep=c.checkpoint.keep)
    self.metrics_path = metrics_path = os.path.join(out, "metrics.jsonl")
    start, last_eval, total_bits, kept = 0, {}, 0.0, []
    if resume:
      state, start = _restore(checkpointer, exp, state)
      if stopped is not None and start >= stop:
        raise RunError(f"Cannot resume {out!r}: its privacy budget is spent. After round "
                       f"{start} epsilon = {privacy.epsilon(start):.4g}, and "
                       f"{stopped.split(';')[0]}. A run cannot spend past its budget_epsilon; "
                       "start a new run to train more.")
      if start > c.rounds:
        raise RunError(f"The checkpoint in {out!r} holds {start} rounds but rounds = "
                       f"{c.rounds}; set rounds >= {start} to continue.")
      kept = [r for r in read_metrics(metrics_path) if r["round"] <= start]
      if [r["round"] for r in kept] != list(range(1, start + 1)):
        raise CheckpointError(f"{metrics_path} does not hold rounds 1..{start} of the "
                              "checkpoint; the run folder is inconsistent.")
      atomic_write_text(metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
      atomic_write_text(os.path.join(out, "config.yaml"),
                        yaml.safe_dump(to_dict(c), sort_keys=False))
      last_eval = next(({k: v for k, v in r.items() if k.startswith("eval_")}
                        for r in reversed(kept) if "eval_loss" in r), {})
      total_bits = kept[-1].get("total_bits", 0.0) if kept else 0.0
      log(f"fedjax_sim: resuming {out} after round {start}")
    self.state, self.start = state, start
    self.last_eval, self.total_bits = last_eval, total_bits
    try:
      self.telemetry = self.cleanup.enter_context(
          Telemetry(c, exp.engine, state.server, out, resume=resume, start=start, kept=kept,
                    config_dict=to_dict(c), log=log, step_cost=self.step_cost))
    except TelemetryError as e:
      raise RunError(str(e)) from e
    log(f"fedjax_sim: {exp.train.num_clients} training clients, "
        f"{exp.evaluator.data.num_clients} eval clients, {len(exp.engine.mesh.devices.flat)} "
        f"device(s) ({jax.default_backend()}), output in {out}")
    if c.progress:
      from tqdm.auto import tqdm
      self.bar = tqdm(total=c.rounds, initial=start, desc="rounds", unit="round",
                      dynamic_ncols=True)
    if privacy is not None:
      log(f"fedjax_sim: {privacy.mechanism}, noise multiplier {privacy.noise_multiplier:.4g} "
          f"({privacy.noise_source}); epsilon after {stop} rounds: {privacy.epsilon(stop):.4g} "
          f"at delta = {privacy.delta:.3g}")
      if not resume:  # the multiplier is on disk before any round runs (resume reuses it)
        write_privacy_report(out, privacy_report(privacy, [], c.rounds, stopped))
    self.timing = {"train_seconds": 0.0, "train_compile_seconds": 0.0, "eval_seconds": 0.0}
    self.status, self.done, self.saved_at, self.stop_now = "completed", start, None, None

  def check_signal(self) -> None:
    """Refuses to train after a signal that came while building; opens metrics.jsonl."""
    if self.request.signum is not None:  # a signal while building: nothing trained yet
      raise RunError(f"{signal.Signals(self.request.signum).name} received before round "
                     f"{self.start + 1}; stopped without training (the output folder "
                     f"{self.out!r} holds "
                     + (f"the checkpoint of round {self.start}; resume again to continue)."
                        if self.resume else "no round; run the command again to start)."))
    self.sink = MetricsLog(self.metrics_path)
    self.compile_mark = self.clock.seconds

  def on_round(self, result, get_state) -> bool:
    """Writes one round's record, evaluates and checkpoints on schedule.

    Args:
      result: the engine's `RoundResult` (its `state` is not read).
      get_state: returns the state after the round; called only when the
        round is evaluated or checkpointed.

    Returns:
      Whether the run goes on (False: it diverged, was interrupted, or this
      was its last round).
    """
    c, exp, privacy, timing = self.c, self.exp, self.privacy, self.timing
    # Programs a round needs are compiled inside it (before it yields).
    timing["train_compile_seconds"] += self.clock.seconds - self.compile_mark
    state = []

    def current():
      if not state:
        state.append(get_state())
      return state[0]

    done = self.done = result.round_num + 1
    record = {"round": done, **_public(result.metrics)}
    self.total_bits += record.get("bits", 0.0)
    record["total_bits"] = self.total_bits  # uploaded since round 1, all clients
    if privacy is not None:
      record["dp_epsilon"] = privacy.epsilon(done)
    timing["train_seconds"] += result.metrics["round_seconds"]
    record.update(self.telemetry.round_metrics(record, result.clients))
    if result.metrics.get("model_finite", 1.0) < 1.0:
      self.sink.append(record)
      self.telemetry.write(record, result.clients)
      self.status = "diverged"
      return False
    is_last = done == self.stop
    if is_last or (c.eval.every and done % c.eval.every == 0):
      t0 = time.perf_counter()
      self.last_eval = _evaluate(exp, current())
      record.update(self.last_eval)
      record["eval_seconds"] = time.perf_counter() - t0
      timing["eval_seconds"] += record["eval_seconds"]
    self.sink.append(record)
    self.telemetry.write(record, result.clients)  # after metrics.jsonl holds the round
    # read once: a signal from here on stops after the next round
    stop_now = self.stop_now = self.request.signum
    if is_last or (c.checkpoint.every and done % c.checkpoint.every == 0) or stop_now:
      self.checkpointer.save(done, current(), layout=_layout(exp))
      self.saved_at = done
      if privacy is not None:
        write_privacy_report(self.out, privacy_report(privacy, read_metrics(self.metrics_path),
                                                      c.rounds,
                                                      self.stopped if is_last else None,
                                                      cross_check=is_last))
    if self.bar is not None:
      self.bar.update(1)
      postfix = {"loss": f"{record.get('train_loss', float('nan')):.4f}"}
      if "eval_accuracy" in self.last_eval:
        postfix["acc"] = f"{self.last_eval['eval_accuracy']:.4f}"
      postfix["clients_s"] = f"{record['clients_per_second']:.0f}"
      self.bar.set_postfix(postfix)
    self.compile_mark = self.clock.seconds
    if stop_now and not is_last:
      self.status = f"interrupted by {signal.Signals(stop_now).name}"
      return False
    return not is_last

  def close(self) -> None:
    """Closes the progress bar, the checkpointer and metrics.jsonl."""
    if self.bar is not None:
      self.bar.close()
    if self.checkpointer is not None:
      self.checkpointer.close()
    if self.sink is not None:
      self.sink.close()

  def finish(self) -> dict:
    """Writes the plot and summary.json; returns the summary or raises how the run ended."""
    c, exp, privacy, out, status = self.c, self.exp, self.privacy, self.out, self.status
    records = read_metrics(self.metrics_path)
    if records:
      convergence_plot(records, os.path.join(out, "convergence.png"),
                       title=f"{c.algorithm.name} / {c.model.kind} / {c.data.kind}")
    summary = _summary(exp, records, self.last_eval, status, self.timing, self.clock,
                       self.cache_dir, self.t_start, self.t_built)
    if privacy is not None:
      summary["privacy"] = {"mechanism": privacy.mechanism,
                            "epsilon": privacy.epsilon(len(records)) if records else 0.0,
                            "delta": privacy.delta, "noise_multiplier": privacy.noise_multiplier,
                            "stopped_by_budget": self.stopped if status == "completed" else None}
    summary.update(self.telemetry.summary(records))
    summary.update(self.summary_extra)
    atomic_write_json(os.path.join(out, "summary.json"), summary)
    self.telemetry.finish(status)  # artifacts (summary.json included), then the sinks close
    if status == "diverged":
      raise DivergenceError(_divergence_message(c, records[-1], self.checkpointer.directory,
                                                self.checkpointer.latest()))
    if status.startswith("interrupted"):
      raise Interrupted(f"{status} after round {self.done} of {c.rounds}; its state is "
                        f"checkpointed in {self.checkpointer.directory} (round {self.saved_at}) "
                        f"and metrics.jsonl holds rounds 1..{self.done}.",
                        signal_number=self.stop_now, output_dir=out, rounds_done=self.done)
    if privacy is not None and self.stopped:
      self.log(f"fedjax_sim: stopped early: {self.stopped}")
    self.log(f"done: {len(records)} rounds in {summary['wall_seconds']:.1f}s (compiling "
             f"{summary['compile_seconds']:.1f}s), eval accuracy "
             f"{self.last_eval.get('eval_accuracy', float('nan')):.4f}; results in {out}")
    return summary


def _summary(exp: Experiment, records: list[dict], last_eval: dict, status: str, timing: dict,
             clock: CompileClock, cache_dir: str | None, t_start: float, t_built: float) -> dict:
  c = exp.config
  steady = [r["clients_per_second"] for r in records[1:]] or \
      [r["clients_per_second"] for r in records[-1:]] or [0.0]
  return {
      "status": status,
      "rounds": len(records),
      "final": records[-1] if records else {},
      "final_eval": last_eval,
      "best_eval_accuracy": max((r["eval_accuracy"] for r in records if "eval_accuracy" in r),
                                default=None),
      "median_clients_per_second_after_first_round": float(np.median(steady)),
      "total_bits_uploaded": records[-1].get("total_bits", 0.0) if records else 0.0,
      "round_success_rate": float(np.mean([r["round_failed"] == 0 for r in records]))
                            if records else 0.0,
      "failed_rounds": int(sum(r["round_failed"] for r in records)),
      "setup_seconds": t_built - t_start,
      "train_seconds": timing["train_seconds"],
      # Compile time inside the rounds is part of train_seconds; this is the rest.
      "train_seconds_excluding_compile": timing["train_seconds"] - timing["train_compile_seconds"],
      "eval_seconds": timing["eval_seconds"],
      "compile_seconds": clock.seconds,  # tracing + lowering + compiling or cache loading
      "compiled_programs": clock.backend_compiles - clock.cache_hits,
      "programs_from_compile_cache": clock.cache_hits,
      "compile_cache_dir": cache_dir,
      "wall_seconds": time.perf_counter() - t_start,
      "compiled_chunk_programs": exp.engine.traces,
      "devices": [str(d) for d in exp.engine.mesh.devices.flat],
      # Where the training data lived (resident on the devices or streamed), and why.
      "data_placement": exp.engine.placement,
      "backend": jax.default_backend(),
      "versions": {"fedjax_sim": _code_version(), "jax": jax.__version__,
                   "numpy": np.__version__, "python": platform.python_version()},
      "seed": c.seed,
  }


def _code_version() -> str:
  from fedjax_sim import __version__
  return __version__


def _divergence_message(c: Config, record: dict, ckpt_dir: str, last_ckpt: int | None) -> str:
  r = record["round"]
  a = c.algorithm
  server = getattr(a, "server_optimizer", None)
  server_lr = (f"server learning_rate = {server.learning_rate}" if server is not None else
               "no server learning rate")
  details = [f"train_loss = {float(record.get('train_loss', 'nan')):.4g}"]
  if float(record.get("nonfinite_updates", 0)) > 0:
    details.append(f"{float(record['nonfinite_updates']):.0f} client update(s) were non-finite")
  kept = (f"the last good checkpoint is round {last_ckpt} in {ckpt_dir}" if last_ckpt else
          "no checkpoint was written before it (checkpoint.every sets how often)")
  return (f"Round {r} made the global model non-finite (NaN or inf); the run stopped there "
          f"({'; '.join(details)}). Likely cause: a learning rate too large for this model and "
          f"data (algorithm.client_optimizer.learning_rate = {a.client_optimizer.learning_rate}, "
          f"{server_lr}), or unscaled inputs. "
          f"Lower the learning rate (or scale the data) and start a new run. metrics.jsonl keeps "
          f"rounds 1..{r}, and {kept}.")


def _restore(checkpointer: Checkpointer, exp: Experiment, state: SimState):
  """The latest checkpoint, re-laid out if it was written on another number of devices."""
  layout = _layout(exp)
  has_store = bool(jax.tree.leaves((state.clients, state.aggregator_clients)))
  saved = checkpointer.saved_layout()
  if not has_store or not saved or saved == layout:
    return checkpointer.restore(state, layout=layout if has_store else None)
  like = exp.engine.store_like(state, saved["num_devices"], saved["rows_per_device"])
  restored, step = checkpointer.restore(like)
  # Checkpoints written before the "range" layout recorded none: theirs was "modulo".
  return exp.engine.relayout(restored, saved["num_devices"], saved["rows_per_device"],
                             saved.get("store_layout", "modulo")), step


def _calibrated_noise(out: str, c: Config) -> float | None:
  """The noise multiplier a run started with (a resumed run must not recalibrate)."""
  path = os.path.join(out, "privacy_report.json")
  if c.privacy.mechanism == PRIVACY.default:  # no privacy, no multiplier
    return None
  if not os.path.exists(path):
    raise RunError(f"Cannot resume the DP run in {out!r}: {path} is missing, and it holds the "
                   "noise multiplier the run started with (recalibrating for a different number "
                   "of rounds would misstate the rounds already run). Start a new run.")
  try:
    with open(path) as f:
      return float(json.load(f)["noise_multiplier"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise RunError(f"Cannot resume: {path} is unreadable ({e}); it holds the run's noise "
                   "multiplier.") from e


def _layout(exp: Experiment) -> dict:
  """How the per-client store is laid out: a checkpoint only fits the same layout."""
  return {"num_devices": int(exp.engine.num_devices),
          "rows_per_device": int(exp.engine.rows_per_device), "store_layout": STORE_LAYOUT}


def _evaluate(exp: Experiment, state) -> dict:
  """Global-model metrics, plus personal-model ones for personalization algorithms."""
  alg = exp.engine.algorithm
  out = exp.evaluator(alg.params_of(state.server))
  if alg.personal_params is not None:
    per_client = exp.evaluator.per_client_personal(
        state.clients, alg.personal_params, exp.engine.rows_per_device, store_ids=exp.eval_ids)
    out.update(summarize(per_client, prefix="eval_personal_"))
  return out


_HIDDEN = {"update_norm_sum", "uploads", "model_finite", "clients"}


def _public(metrics: dict) -> dict:
  """The round's metrics as written to metrics.jsonl.

  `participating_clients` counts the clients that trained on at least one
  example (a sampled client without data uploads nothing).
  """
  out = {k: v for k, v in metrics.items() if k not in _HIDDEN}
  out["participating_clients"] = out.pop("clients_with_data", 0.0)
  return out


__all__ = ["DivergenceError", "Experiment", "Interrupted", "Parts", "RunError", "RunSession",
           "build_experiment", "run_experiment"]
