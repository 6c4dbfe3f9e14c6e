"""Sweeps: one config run once per member (seeds x a grid of values), in one process.

A config with a `sweep:` section (see `runner.config.SweepSection`) is a
family of members, each a complete config (`config.sweep_members`). In
`loop` mode the sweep runs them one after another through `run_experiment`;
in `vmap` mode their rounds run together (below). Either way each member
writes what a separate run of its config writes:

    <output_dir>/
      config.yaml          the sweep's config (with its sweep: section), for --resume
      members/<name>/      a complete run folder per member: config.yaml, metrics.jsonl,
                           summary.json, checkpoints/, convergence.png, privacy report
                           (DP members), tensorboard/ (telemetry.tensorboard)
      sweep.json           per member: values, status, rounds, final and best eval
                           metrics, wall seconds, epsilon (DP); the mode and why
      sweep.md             the same as a table
      sweep.png            evaluation curves per member and the final values

What one process saves over separate runs (`loop` mode): Python's start and
imports, JAX's start, and most compilation. Compiled chunk programs are cached
by the algorithm and aggregation-stage *objects* (`core/program.chunk_program`
is an lru_cache over them), so a member built from fresh objects traces and
lowers its programs again (about 0.5-1 s of a small run on 2 CPU cores; the
persistent compile cache then skips only XLA's backend step). Members whose
model, algorithm and stage would be built from equal inputs share those
objects instead (`_Sharing`), and with them every compiled chunk program; the
evaluator, the server step and the cost model are per member, as in a
separate run. The population is built once for consecutive members whose data
section and seed are equal (a grid over training keys); members with other
seeds build their own, since the data generators and splits are seeded.

`vmap` mode: the members' runs advance in lockstep and each round of all of
them is one compiled program vmapped over a member axis
(`core/members.MemberRounds`; `runner/sweep_vmap.py`). Each member is still a
`run.RunSession`, the steps `run_experiment` takes, so its folder is a
complete run folder written by the same code (metrics.jsonl with the same
keys, evaluations on its schedule, checkpoints a separate `--resume`
continues, privacy report, telemetry, summary.json); only the timing and
compile fields of its summary are those of the whole lockstep run (its
`sweep_mode` says so), and `round_seconds` is the lockstep round's. Members
may differ in the seed (cohorts, keys, initial model, a seeded population),
in float keys of the algorithm section (client and server learning rates,
FedProx's mu, ...) and, with dp_fedavg (adaptive clipping or not) or
dp_ftrl, in privacy.clip_norm, privacy.noise_multiplier and
privacy.target_epsilon (each member's plan calibrates its own noise
multiplier and accounts its own privacy on the host), which enter the program
as traced values (one compilation serves the whole grid), and in host-only
keys (system, eval, checkpoint, telemetry). Anything else (a grid key of
another section or another privacy key, an int key, a user's factory, local
DP-SGD settings that differ) is refused when forced, naming the key, and
sends `auto` to loop (`sweep_vmap`'s docstring lists the rules).

Mode choice (`choose_mode`, then `_VmapSweep.decide` on the built members):
`loop` is forced or taken by `auto` when the members are not eligible; `auto`
takes vmap when they are, when their shared rounds save more dispatch than
vmap costs once (`sweep_vmap.pays_back`, from the configs, before building),
and when a round of all members trains at most `sweep_vmap.AUTO_MAX_FLOPS`
(dispatch-bound rounds, where one program call instead of M saves most of a
round; checked on the built members); forced `vmap` on ineligible members is
a `RunError` that says why. sweep.json records the mode and the reason.

Resume (`fedjax-sim run CONFIG --resume OUTDIR`, `run_sweep(resume=True)`):
the config must match `OUTDIR/config.yaml` where a run's must (only `rounds`,
`progress`, `output_dir`, `telemetry` and `sweep.mode` may change); members
already done (completed, stopped by their privacy budget, or diverged) are
skipped (their summaries are read back), an interrupted one is resumed from
its latest checkpoint (`run_experiment(resume=True)`), one killed before its
first checkpoint is started again, and the rest start. A member that diverges
is recorded and the sweep goes on. SIGINT/SIGTERM during a member stop that
run after its round (`Interrupted`, checkpointed); between members they stop
the sweep before the next one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import time

import numpy as np
import yaml

from fedjax_sim.core.registry import FAMILIES, PRIVACY
from fedjax_sim.runner.build import Parts, _num_classes, build_data, build_experiment
from fedjax_sim.runner.checkpoint import checkpoint_dir
from fedjax_sim.runner.compile_cache import (CompileCacheError, CompileClock,
                                             enable_compilation_cache)
from fedjax_sim.runner.config import (Config, ConfigError, SweepMember, config_differences,
                                     config_from_dict, member_label, sweep_members, to_dict)
from fedjax_sim.runner.io import atomic_write, atomic_write_json, atomic_write_text, read_metrics
from fedjax_sim.runner import sweep_vmap
from fedjax_sim.core.distributed import agree
from fedjax_sim.runner.io import is_writer
from fedjax_sim.runner.run import (DivergenceError, Interrupted, RunError, RunSession, _barrier,
                                  _stop_on_signals, run_experiment)

# Config keys that may change between a sweep and its resumption (as for a run, plus the mode).
_RESUMABLE_CHANGES = {"rounds", "progress", "output_dir", "telemetry", "sweep.mode"}

# Top-level keys whose values no model, algorithm or aggregation stage is built from: members
# differing only in these (and, for built-in components, the seed) share those objects.
_NOT_BUILT_FROM = ("seed", "output_dir", "progress", "telemetry", "eval", "checkpoint", "sweep")

# Component kinds that call a user's function: it may read anything (e.g. data statistics).
_USER_KINDS = ("factory", "script")

def vmap_refusal(why: str) -> str:
  """The error of a forced `sweep.mode = 'vmap'` that these members cannot run."""
  return (f"sweep.mode = 'vmap' cannot run these members as one compiled program: {why}. Use "
          "sweep.mode = 'loop' (or 'auto', which falls back to it): it runs any members, "
          "sharing compiled programs where it can.")


def choose_mode(c: Config, members: list[SweepMember]) -> tuple[str, str]:
  """The mode a sweep runs in, and why, as far as the configs tell (recorded in sweep.json).

  Returns `("loop", reason)`, or `("vmap", reason)` where vmap is forced or
  possible; `run_sweep` then builds the members and may still fall back to
  loop (auto) or refuse (forced) with what their built pieces show.

  Raises:
    RunError: `vmap` is forced on members that cannot share one program.
  """
  if c.sweep.mode == "loop":
    return "loop", "sweep.mode = 'loop'"
  why = sweep_vmap.config_reason(c, members)
  if why is not None:
    if c.sweep.mode == "vmap":
      raise RunError(vmap_refusal(why))
    return "loop", f"auto: not eligible for vmap ({why})"
  if c.sweep.mode == "vmap":
    return "vmap", "sweep.mode = 'vmap'"
  # Too few rounds to pay back vmap's one-off cost: decided before building anything.
  pays, numbers = sweep_vmap.pays_back([m.config.rounds for m in members])
  if not pays:
    return "loop", f"auto: eligible for vmap, but {numbers}"
  return "vmap", "auto: eligible for vmap"


# -- sharing between members ------------------------------------------------------


def _built_in_only(c: Config) -> bool:
  """Whether every component of `c` is one of the package's own, none calling a user's function.

  Their factories build the model, algorithm and stage from the config and
  the population's shapes and sizes only, never from the seed.
  """
  for section, family in FAMILIES.items():
    cfg = getattr(c, section)
    name = family.name_of(cfg)
    if name in _USER_KINDS or not family.get(name).build.__module__.startswith("fedjax_sim."):
      return False
  return not c.imports


def _digest(x) -> str:
  return hashlib.sha256(yaml.safe_dump(x, sort_keys=True).encode()).hexdigest()


class _Sharing:
  """What members share: the population (equal data section and seed) and the built model,
  algorithm and stage (equal inputs), hence every compiled chunk program."""

  def __init__(self):
    self._data_key = None
    self._data = None
    self._objects: dict[str, tuple] = {}
    self.groups: dict[str, list[str]] = {}

  def _data_for(self, c: Config):
    plain = to_dict(c)
    # A module of the user's (imports) may register a dataset reading any key: then only an
    # equal config shares its data.
    key = _digest({k: v for k, v in plain.items() if k not in ("output_dir", "progress")}
                  if c.imports else {"data": plain["data"], "seed": c.seed})
    if key != self._data_key:
      self._data_key, self._data = key, None  # one population held at a time
      self._data = build_data(c)
    return self._data

  def parts(self, member: SweepMember, noise: float | None) -> Parts:
    c = member.config
    train, test = self._data_for(c)
    plain = to_dict(c)
    inputs = {k: v for k, v in plain.items() if k not in _NOT_BUILT_FROM}
    if not _built_in_only(c):
      inputs["seed"] = c.seed
    inputs["population"] = {
        "clients": int(train.num_clients), "num_classes": _num_classes(c, train),
        "features": {k: [list(shape), np.dtype(dtype).str]
                     for k, (shape, dtype) in sorted(train.feature_specs.items())}}
    if c.privacy.mechanism != PRIVACY.default:
      # Calibration and local DP-SGD's accounting read the client sizes, and a resumed member
      # keeps the noise multiplier it started with.
      inputs["sizes"] = hashlib.sha256(np.ascontiguousarray(train.sizes).tobytes()).hexdigest()
      inputs["noise_multiplier"] = noise
    key = _digest(inputs)
    if key not in self._objects:
      exp = build_experiment(c, noise, Parts(train=train, test=test))
      self._objects[key] = (exp.model, exp.engine.algorithm, exp.engine.aggregator)
      del exp  # its engine and evaluator; each member builds its own
    self.groups.setdefault(key, []).append(member.name)
    model, algorithm, aggregator = self._objects[key]
    return Parts(train=train, test=test, model=model, algorithm=algorithm, aggregator=aggregator)


# -- member folders and resume ------------------------------------------------------


def _read_json(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _has_checkpoint(out: str) -> bool:
  ckpts = checkpoint_dir(out)
  return os.path.isdir(ckpts) and any(n.isdigit() for n in os.listdir(ckpts))


def _holds_run(out: str) -> bool:
  return bool(read_metrics(os.path.join(out, "metrics.jsonl"))) or _has_checkpoint(out)


def _holds_results(out: str) -> bool:
  """Whether `out` holds a sweep's results or a run (a config.yaml alone, left by a start that
  failed before any member trained, does not count)."""
  members = os.path.join(out, "members")
  return (os.path.exists(os.path.join(out, "sweep.json")) or _holds_run(out) or
          (os.path.isdir(members) and any(_holds_run(os.path.join(members, n))
                                          for n in os.listdir(members))))


def _member_state(member: SweepMember) -> str:
  """"done" (completed or diverged for these rounds), "resume" (a checkpoint to continue
  from), "restart" (killed before its first checkpoint) or "new"."""
  out = member.config.output_dir
  summary = _read_json(os.path.join(out, "summary.json"))
  if summary is not None:
    stopped = (summary.get("privacy") or {}).get("stopped_by_budget")
    if summary.get("status") == "diverged":
      return "done"
    if summary.get("status") == "completed" and (summary.get("rounds", 0) >= member.config.rounds
                                                 or stopped):
      return "done"
  if _has_checkpoint(out):
    return "resume"
  if os.path.exists(os.path.join(out, "metrics.jsonl")):
    return "restart"
  return "new"


def _noise_of(member: SweepMember, state: str) -> float | None:
  """The noise multiplier a resumed DP member started with (None: calibrate, or no DP)."""
  if state != "resume" or member.config.privacy.mechanism == PRIVACY.default:
    return None
  report = _read_json(os.path.join(member.config.output_dir, "privacy_report.json"))
  try:
    return float(report["noise_multiplier"])
  except (TypeError, KeyError, ValueError):
    return None  # run_experiment names the problem


def _check_output(c: Config, overwrite: bool, resume: bool) -> None:
  out = c.output_dir
  saved_path = os.path.join(out, "config.yaml")
  if resume:
    if not os.path.exists(saved_path):
      raise RunError(f"Cannot resume: {out!r} holds no sweep (config.yaml is missing). Start it "
                     "without --resume.")
    try:
      saved = config_from_dict(yaml.safe_load(open(saved_path)) or {})
    except (ConfigError, yaml.YAMLError) as e:
      raise RunError(f"Cannot resume: {saved_path} is not a valid config ({e}).") from e
    if not saved.sweep.active:
      raise RunError(f"Cannot resume {out!r} as a sweep: it holds a single run. Resume it with "
                     "its own config (without a sweep: section).")
    diffs = [f"{k}: the sweep has {a!r}, now {b!r}"
             for k, a, b in config_differences(to_dict(saved), to_dict(c))
             if k.split(".")[0] not in _RESUMABLE_CHANGES and k not in _RESUMABLE_CHANGES]
    if diffs:
      raise RunError(f"Cannot resume the sweep in {out!r} with a different config; only rounds, "
                     "sweep.mode (and the telemetry section) may change. Differences: "
                     + "; ".join(diffs))
    return
  if _holds_results(out) and not overwrite:
    raise RunError(f"output_dir {out!r} already holds a sweep or a run. Choose another "
                   f"output_dir (--set output_dir=...), pass --resume {out} to continue it, or "
                   "pass --overwrite to replace it.")


# -- running -------------------------------------------------------------------


def run_sweep(c: Config, *, overwrite: bool = False, resume: bool = False, log=print,
              compile_cache: str | None = None) -> dict:
  """Runs every member of a config's sweep in this process; returns the gathered results.

  Args:
    c: a config with an active `sweep:` section.
    overwrite: replace the members' previous runs (and the sweep's files).
    resume: continue the sweep in `c.output_dir`: completed members are
      skipped, interrupted ones resumed, the others started.
    log: where progress lines go.
    compile_cache: as for `run_experiment`.

  Returns:
    The content of `sweep.json`.

  Raises:
    ConfigError: a bad config or member (nothing is written).
    DataError: bad data, raised when the first member that needs it starts.
    RunError: the folder holds something else, a resume does not fit, the
      mode is not available, or a member cannot run (named).
    Interrupted: SIGINT/SIGTERM stopped a member after a round (checkpointed);
      `output_dir` is the sweep's, to pass to `--resume`.
  """
  c = config_from_dict(to_dict(c))  # every rule, and every member validated
  if not c.sweep.active:
    raise RunError("This config has no sweep: section (sweep.seeds or sweep.grid); run it with "
                   "run_experiment.")
  members = sweep_members(c)
  # Several processes (jax.distributed) run every member together, each member a
  # multi-process run; they must agree on the sweep and see the folder as it was before
  # any of them writes (the checks and each member's state, read by all).
  agree("sweep config", yaml.safe_dump(to_dict(c), sort_keys=True))
  mode, reason = choose_mode(c, members)
  _check_output(c, overwrite, resume)
  states = [_member_state(m) if resume else "new" for m in members]
  _barrier("sweep folder checked")
  try:
    cache_dir = enable_compilation_cache(compile_cache)
  except CompileCacheError as e:
    raise RunError(str(e)) from e
  out = c.output_dir
  t_start = time.perf_counter()
  with contextlib.ExitStack() as stack:
    lockstep = None
    if mode == "vmap":
      # The members are built (nothing written) before the mode is final.
      clock = stack.enter_context(CompileClock())
      request = stack.enter_context(_stop_on_signals(log))
      lockstep = _VmapSweep(c, members, states, overwrite, log, clock, cache_dir, request,
                            stack)
      mode, reason = lockstep.decide(reason)
      if mode == "loop":
        lockstep = None
    if is_writer():
      os.makedirs(out, exist_ok=True)
      atomic_write_text(os.path.join(out, "config.yaml"),
                        yaml.safe_dump(to_dict(c), sort_keys=False))
    log(f"fedjax_sim: sweep of {len(members)} members in {out} (mode {mode}: {reason})")
    header = {"mode": mode, "mode_reason": reason, "mode_setting": c.sweep.mode,
              "members": len(members), "output_dir": out, "compile_cache_dir": cache_dir}
    if lockstep is not None:
      return lockstep.run(header, t_start)
    # A signal while a member runs is that run's (it stops after its round, checkpointed); one
    # between members stops the sweep before the next.
    with _stop_on_signals(log) as request:
      return _run_members(c, members, states, overwrite, log, compile_cache, header, request,
                          t_start)


def _run_members(c: Config, members: list[SweepMember], states: list[str], overwrite: bool,
                 log, compile_cache: str | None, header: dict, request, t_start: float) -> dict:
  out = c.output_dir
  sharing = _Sharing()
  rows = []
  for i, member in enumerate(members):
    if request.signum is not None:
      rows += [_row(m, "not started", 0.0) for m in members[i:]]
      _gather(c, header, rows, time.perf_counter() - t_start, sharing)
      name = signal.Signals(request.signum).name
      raise Interrupted(f"sweep stopped by {name} before member {i + 1} of {len(members)} "
                        f"({member.name}); the members before it have run.",
                        signal_number=request.signum, output_dir=out, rounds_done=0)
    state = states[i]
    prefix = f"fedjax_sim: sweep member {i + 1}/{len(members)} {member.name}"
    if state == "done":
      log(f"{prefix}: already done, skipped")
      rows.append(_row(member, "skipped", 0.0))
      continue
    parts = sharing.parts(member, _noise_of(member, state))
    log(f"{prefix}: " + {"new": "starting", "resume": "resuming",
                         "restart": "starting again (no checkpoint to resume from)"}[state])
    t0 = time.perf_counter()
    try:
      run_experiment(member.config, overwrite=overwrite or state == "restart",
                     resume=state == "resume", log=log, compile_cache=compile_cache, parts=parts)
    except DivergenceError as e:
      log(f"{prefix}: diverged: {e}")
    except Interrupted as e:
      rows.append(_row(member, "ran", time.perf_counter() - t0))
      rows += [_row(m, "not started", 0.0) for m in members[len(rows):]]
      _gather(c, header, rows, time.perf_counter() - t_start, sharing)
      raise Interrupted(f"sweep member {member.name}: {e}", signal_number=e.signal_number,
                        output_dir=out, rounds_done=e.rounds_done) from e
    except RunError as e:
      raise RunError(f"sweep member {member.name}: {e}") from e
    _barrier(f"sweep member {member.name} done")  # its files written, for every process to read
    rows.append(_row(member, "ran", time.perf_counter() - t0))
    if len(rows) < len(members):  # the table so far (the plot waits for the end)
      _gather(c, header, rows + [_row(m, "not started", 0.0) for m in members[len(rows):]],
              time.perf_counter() - t_start, sharing, plot=False)
  return _gather(c, header, rows, time.perf_counter() - t_start, sharing)


def _row(member: SweepMember, this_process: str, seconds: float) -> dict:
  """One member's line of sweep.json, read from its folder."""
  out = member.config.output_dir
  summary = _read_json(os.path.join(out, "summary.json")) or {}
  records = read_metrics(os.path.join(out, "metrics.jsonl"))
  evals = [r for r in records if "eval_loss" in r]
  row = {"name": member.name, "values": member.values,
         "folder": os.path.relpath(out, os.path.dirname(os.path.dirname(out))),
         "status": summary.get("status", "not started" if not records else "incomplete"),
         "this_process": this_process, "rounds": len(records),
         "final_eval": summary.get("final_eval", {}),
         "final_train_loss": records[-1].get("train_loss") if records else None,
         "best_eval_accuracy": summary.get("best_eval_accuracy"),
         "best_eval_loss": min((r["eval_loss"] for r in evals), default=None),
         # The run's own clock (its latest session, when it was resumed) and this process's.
         "wall_seconds": summary.get("wall_seconds"),
         "seconds_in_this_sweep": seconds}
  if "privacy" in summary:
    row["epsilon"] = summary["privacy"]["epsilon"]
    row["delta"] = summary["privacy"]["delta"]
  return row


class _VmapSweep:
  """The members' runs advancing together, their rounds one compiled program (vmap mode).

  Each member is a `RunSession` (what `run_experiment` runs, step by step),
  so its folder holds what a separate run writes; `sweep_vmap.run_lockstep`
  feeds the sessions the rounds of `core/members.MemberRounds`.
  """

  def __init__(self, c: Config, members: list[SweepMember], states: list[str], overwrite: bool,
               log, clock: CompileClock, cache_dir: str | None, request,
               stack: contextlib.ExitStack):
    """`states`: each member's "new", "resume", "restart" or "done" (`_member_state`)."""
    self.c, self.members, self.log = c, members, log
    self.states = list(states)
    self.running = [m for m, st in zip(members, self.states) if st != "done"]
    populations: dict[str, tuple] = {}
    self.sessions = []
    for m, st in zip(members, self.states):
      if st == "done":
        continue
      mc = m.config
      key = _digest({"data": to_dict(mc)["data"], "seed": mc.seed})
      if key not in populations:
        populations[key] = build_data(mc)
      train, test = populations[key]
      session = RunSession(mc, overwrite=overwrite or st == "restart", resume=st == "resume",
                           log=log, clock=clock, cache_dir=cache_dir, request=request,
                           cleanup=stack)
      try:
        session.build(Parts(train=train, test=test))
      except RunError as e:
        raise RunError(f"sweep member {m.name}: {e}") from e
      self.sessions.append(session)
    self.driver = None

  def decide(self, reason: str) -> tuple[str, str]:
    """The final mode: vmap, or (auto) loop when the built members say otherwise."""
    forced = self.c.sweep.mode == "vmap"
    exps = [s.exp for s in self.sessions]
    if not exps:  # a resumed sweep whose members are all done: nothing to run
      return "loop", f"{reason}; every member is done"
    if len(exps) < 2 and not forced:
      return "loop", "auto: fewer than two members left to run"
    driver, why = sweep_vmap.prepare(exps, self.running, self.c)
    if why is not None:
      if forced:
        raise RunError(vmap_refusal(why))
      return "loop", f"auto: not eligible for vmap ({why})"
    self.driver = driver
    if forced:
      return "vmap", reason
    faster, numbers = sweep_vmap.expected_faster(exps, [m.config.rounds for m in self.running])
    if not faster:
      return "loop", f"auto: eligible for vmap, but {numbers}"
    return "vmap", f"auto: eligible for vmap and {numbers}"

  def run(self, header: dict, t_start: float) -> dict:
    c, log = self.c, self.log
    driver = self.driver
    header["vmap"] = {
        "members_in_program": len(self.sessions),
        "traced_hyperparameters": list(driver.hyperparameters),
        "data": ("one population, resident on the devices" if driver.resident is not None else
                 "streamed from the host, each member's clients from its own population"),
        "note": "members' rounds ran as one program over a member axis; their summaries' "
                "timing and compile fields are those of the whole lockstep run"}
    for i, (m, st) in enumerate(zip(self.members, self.states)):
      log(f"fedjax_sim: sweep member {i + 1}/{len(self.members)} {m.name}: " + {
          "done": "already done, skipped", "new": "starting", "resume": "resuming",
          "restart": "starting again (no checkpoint to resume from)"}[st])
    for m, session in zip(self.running, self.sessions):
      session.summary_extra = {"sweep_mode": "vmap", "vmap_members": len(self.sessions)}
      # One structure, one cost model (the first member's, computed when it opens).
      session.step_cost = getattr(getattr(self.sessions[0], "telemetry", None), "cost", None)
      try:
        session.open()
        session.check_signal()
      except RunError as e:
        raise RunError(f"sweep member {m.name}: {e}") from e
    t0 = time.perf_counter()
    try:
      header["vmap"]["member_programs_compiled"] = sweep_vmap.run_lockstep(self.sessions,
                                                                           driver)
    finally:
      for session in self.sessions:
        session.close()
    seconds = time.perf_counter() - t0
    interrupted = None
    for m, session in zip(self.running, self.sessions):
      try:
        session.finish()
      except DivergenceError as e:
        log(f"fedjax_sim: sweep member {m.name}: diverged: {e}")
      except Interrupted as e:
        interrupted = interrupted or (m, e)
      except RunError as e:
        raise RunError(f"sweep member {m.name}: {e}") from e
    ran = {m.name for m in self.running}
    rows = [_row(m, "ran" if m.name in ran else "skipped", seconds if m.name in ran else 0.0)
            for m in self.members]
    groups = {"groups": [sorted(ran)] if ran else [],
              "note": "vmap mode: the members' rounds ran as one compiled program"}
    result = _gather(c, header, rows, time.perf_counter() - t_start, groups)
    if interrupted is not None:
      m, e = interrupted
      raise Interrupted(f"sweep (vmap mode) stopped by a signal: {e}",
                        signal_number=e.signal_number, output_dir=c.output_dir,
                        rounds_done=e.rounds_done) from e
    return result


# -- gathered results --------------------------------------------------------------


def _gather(c: Config, header: dict, rows: list[dict], seconds: float,
            sharing: _Sharing | dict, *, plot: bool = True) -> dict:
  out = c.output_dir
  result = dict(header)
  result["seconds"] = seconds
  result["sharing"] = sharing if isinstance(sharing, dict) else {
      "groups": sorted(sharing.groups.values()),
      "note": "members of a group share the built model, algorithm and aggregation stage, "
              "hence every compiled chunk program"}
  result["results"] = rows
  if not is_writer():  # process 0 of several writes the sweep's files
    return result
  atomic_write_json(os.path.join(out, "sweep.json"), result)
  atomic_write_text(os.path.join(out, "sweep.md"), render_table(result))
  if plot:
    sweep_plot(c, rows, os.path.join(out, "sweep.png"))
  return result


def _cell(x, digits: int = 4) -> str:
  if x is None:
    return "-"
  if isinstance(x, float):
    return f"{x:.{digits}g}"
  return str(x)


def render_table(result: dict) -> str:
  """sweep.md: one row per member."""
  rows = result["results"]
  keys = list(rows[0]["values"]) if rows else []
  dp = any("epsilon" in r for r in rows)
  head = ["member", *keys, "status", "rounds", "final eval loss", "final eval accuracy",
          "best eval accuracy", *(["epsilon"] if dp else []), "wall s"]
  lines = [f"# Sweep: {result['members']} members", "",
           f"Mode: {result['mode']} ({result['mode_reason']}).", "",
           "| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
  for r in rows:
    fe = r["final_eval"] or {}
    cells = [f"`{r['name']}`", *(_cell(r["values"][k]) for k in keys), r["status"],
             str(r["rounds"]), _cell(fe.get("eval_loss")), _cell(fe.get("eval_accuracy")),
             _cell(r["best_eval_accuracy"]), *([_cell(r.get("epsilon"))] if dp else []),
             _cell(r["wall_seconds"], 3)]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _short_labels(rows: list[dict]) -> list[str]:
  """Members' values as text, each key by its last part where those are distinct."""
  keys = list(rows[0]["values"]) if rows else []
  short = [k.rsplit(".", 1)[-1] for k in keys]
  if len(set(short)) < len(short):
    short = keys
  return [",".join(f"{s}={member_label({k: r['values'][k]}).split('=', 1)[1]}"
                   for s, k in zip(short, keys)) for r in rows]


def sweep_plot(c: Config, rows: list[dict], path: str) -> None:
  """sweep.png: each member's evaluation curve, and its final value, side by side."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  curves = {}
  for r in rows:
    records = read_metrics(os.path.join(c.output_dir, "members", r["name"], "metrics.jsonl"))
    curves[r["name"]] = [x for x in records if "eval_loss" in x]
  metric = ("eval_accuracy" if any("eval_accuracy" in x for ev in curves.values() for x in ev)
            else "eval_loss")
  fig, (ax_curve, ax_final) = plt.subplots(1, 2, figsize=(12, 4.5))
  labels = _short_labels(rows)
  finals = []
  for r, label in zip(rows, labels):
    ev = [x for x in curves[r["name"]] if metric in x]
    if ev:
      ax_curve.plot([x["round"] for x in ev], [x[metric] for x in ev], "o-", ms=3, label=label)
    finals.append(ev[-1][metric] if ev else np.nan)
  ax_curve.set(xlabel="round", ylabel=metric, title=f"{metric} per member")
  ax_curve.grid(alpha=0.3)
  if len(rows) <= 12 and ax_curve.get_lines():  # no curve (no evaluation yet): no legend
    ax_curve.legend(fontsize=7)
  ax_final.barh(np.arange(len(rows)), finals)
  ax_final.set_yticks(np.arange(len(rows)), labels, fontsize=7)
  ax_final.invert_yaxis()
  ax_final.set(xlabel=f"final {metric}", title="final value per member")
  ax_final.grid(alpha=0.3, axis="x")
  fig.suptitle(f"sweep: {c.algorithm.name} / {c.model.kind} / {c.data.kind}")
  fig.tight_layout()
  atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
  plt.close(fig)


__all__ = ["choose_mode", "vmap_refusal", "render_table", "run_sweep", "sweep_plot"]
