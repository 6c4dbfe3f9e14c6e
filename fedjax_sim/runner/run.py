"""The experiment runner: a validated `Config` in, an output folder out.

Output folder:
  config.yaml      the resolved config (every default filled in)
  checkpoints/     orbax checkpoints of the whole state (every checkpoint.every rounds, and last)
  metrics.jsonl    one line per round (train and, on eval rounds, eval metrics)
  summary.json     final metrics, timings, compile count, devices, versions
  convergence.png  loss and accuracy against rounds
  privacy_report.json, privacy_report.md
                   for DP runs: mechanism, accounting, epsilon per round, assumptions
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import platform
import time

import jax
import numpy as np
import yaml

from fedjax_sim.aggregators import weighted_mean
from fedjax_sim.compression import (Compressor, compressed_mean, drive, majority_vote, qsgd,
                                    random_k, rotated, scaled_sign, stochastic_quantizer, top_k)
from fedjax_sim.algorithms import ditto, fedavg, feddyn, fednova, fedprox, qffl, scaffold
from fedjax_sim.core import (Engine, EngineConfig, Evaluator, FederatedData, LocalConfig, Model,
                             round_rng, sample_poisson, sample_shuffled, sample_uniform)
from fedjax_sim.core.engine import root_key
from fedjax_sim.core.evaluation import summarize
from fedjax_sim.core.heterogeneity import SystemConfig
from fedjax_sim.datasets import (dirichlet_partition, gaussian_mixture, iid_partition,
                                 leaf_synthetic, lognormal_sizes, shards_partition)
from fedjax_sim.models import cnn, logistic_regression, mlp
from fedjax_sim.runner.checkpoint import CheckpointError, Checkpointer, checkpoint_dir
from fedjax_sim.runner.config import (Config, ConfigError, build_optimizer, config_from_dict,
                                     server_optimizer_config, to_dict)
from fedjax_sim.runner.io import MetricsLog, atomic_write_json, atomic_write_text, read_metrics
from fedjax_sim.runner.plot import convergence_plot
from fedjax_sim.runner.privacy import PrivacyPlan, plan_privacy, privacy_report, write_privacy_report


class RunError(RuntimeError):
  """The run cannot start or continue (e.g. its output folder holds another run)."""


@dataclasses.dataclass
class Experiment:
  """Everything built from a config, before any round runs."""

  config: Config
  train: FederatedData
  test: FederatedData
  model: Model
  engine: Engine
  evaluator: Evaluator
  eval_ids: np.ndarray  # population id of each evaluation client
  privacy: PrivacyPlan | None = None


# -- building -------------------------------------------------------------------


def build_data(c: Config) -> tuple[FederatedData, FederatedData]:
  """The training population and the evaluation clients."""
  d = c.data
  if d.kind == "leaf_synthetic":
    data = leaf_synthetic(d.alpha, d.beta, d.num_clients, seed=c.seed, iid=d.iid)
  elif d.kind == "gaussian_mixture":
    sizes = None
    if d.size_sigma > 0:
      sizes = lognormal_sizes(d.num_clients, median=d.examples_per_client, sigma=d.size_sigma,
                              max_size=d.max_client_size, seed=c.seed)
    data = gaussian_mixture(d.num_clients, d.examples_per_client, d.num_features, d.num_classes,
                            seed=c.seed, label_skew=d.label_skew, sizes=sizes)
  elif d.kind == "npz":
    data = _partition_npz(c)
  else:
    data = FederatedData.load(d.path, mmap=d.mmap)
  if d.holdout_clients > 0:
    return data.split_clients(d.holdout_clients, seed=c.seed)
  return data.split_examples(d.test_fraction)


def _partition_npz(c: Config) -> FederatedData:
  d = c.data
  try:
    with np.load(d.path, allow_pickle=False) as f:
      if "x" not in f or "y" not in f:
        raise ConfigError(f"data.path {d.path!r} must hold arrays 'x' and 'y'; it has "
                          f"{sorted(f.files)}.")
      x, y = f["x"].astype(np.float32), f["y"]
  except FileNotFoundError as e:
    raise ConfigError(f"data.path {d.path!r} does not exist.") from e
  except (OSError, ValueError, EOFError) as e:
    raise ConfigError(f"data.path {d.path!r} is not a readable .npz file ({e}).") from e
  if len(x) != len(y):
    raise ConfigError(f"data.path {d.path!r}: x has {len(x)} rows but y has {len(y)}.")
  y = y.astype(np.int32)
  try:
    if d.partition == "iid":
      return iid_partition(x, y, d.num_clients, seed=c.seed)
    if d.partition == "shards":
      return shards_partition(x, y, d.num_clients, d.shards_per_client, seed=c.seed)
    return dirichlet_partition(x, y, d.num_clients, d.dirichlet_alpha, seed=c.seed)
  except ValueError as e:
    raise ConfigError(f"data.partition = {d.partition!r} cannot split {d.path!r}: {e}") from e


def build_model(c: Config, data: FederatedData) -> Model:
  if "x" not in data.features or "y" not in data.features:
    raise ConfigError(f"The models need features 'x' and 'y'; the data has {sorted(data.features)}.")
  input_shape = data.features["x"].shape[1:]
  y = data.features["y"]
  num_classes = int(c.data.num_classes)
  if c.data.kind in ("leaf_synthetic", "npz", "packed"):
    num_classes = max(num_classes, int(np.max(y)) + 1 if len(y) else 2)
  m = c.model
  if m.kind == "logreg":
    return logistic_regression(input_shape, num_classes)
  if m.kind == "mlp":
    return mlp(input_shape, num_classes, m.hidden)
  if len(input_shape) not in (2, 3):
    raise ConfigError(f"model.kind = 'cnn' needs image inputs [H, W] or [H, W, C]; the data's x "
                      f"has per-example shape {input_shape}. Use 'mlp' or 'logreg'.")
  return cnn(input_shape, num_classes, m.channels, m.dense)


def build_compressor(c: Config) -> Compressor | None:
  """The upload channel of the compression section (None: float32 or majority vote)."""
  m = c.compression
  if m.method == "quantize":
    base = stochastic_quantizer(m.bits, m.block_size, m.scaling)
  elif m.method == "qsgd":
    base = qsgd(m.levels)
  elif m.method == "drive":
    return drive()
  elif m.method == "top_k":
    return top_k(fraction=m.fraction)
  elif m.method == "random_k":  # unscaled under error feedback (the residual carries the rest)
    return random_k(fraction=m.fraction, unbiased=not m.error_feedback)
  elif m.method == "sign":
    return scaled_sign()
  else:
    return None
  return rotated(base) if m.rotation else base


def build_experiment(c: Config, noise_multiplier: float | None = None) -> Experiment:
  """Builds data, model, algorithm, privacy plan, engine and evaluator.

  `noise_multiplier` overrides the privacy section's (see `plan_privacy`).
  """
  train, test = build_data(c)
  if c.sampling.scheme != "poisson" and c.sampling.clients_per_round > train.num_clients:
    raise ConfigError(f"sampling.clients_per_round = {c.sampling.clients_per_round} but the data "
                      f"has only {train.num_clients} training clients.")
  model = build_model(c, train)
  compressor = build_compressor(c)
  privacy = plan_privacy(c, train, noise_multiplier, compressor)
  a = c.algorithm
  local_dp = privacy.local_dp if privacy is not None and privacy.local_dp else (None, 0.0)
  local = LocalConfig(a.batch_size, a.local_epochs, a.shuffle, *local_dp)
  client_opt = build_optimizer(a.client_optimizer, "algorithm.client_optimizer")
  server_opt = build_optimizer(server_optimizer_config(a), "algorithm.server_optimizer")
  if a.name == "fedprox":
    algorithm = fedprox(model, client_opt, server_opt, local, a.mu, a.weighting)
  elif a.name == "fednova":
    algorithm = fednova(model, client_opt, server_opt, local)
  elif a.name == "feddyn":
    algorithm = feddyn(model, client_opt, local, a.alpha, train.num_clients)
  elif a.name == "ditto":
    algorithm = ditto(model, client_opt, server_opt, local, a.lam, weighting=a.weighting)
  elif a.name == "qffl":
    algorithm = qffl(model, a.client_optimizer.learning_rate, local, a.q)
  elif a.name == "scaffold":
    algorithm = scaffold(model, a.client_optimizer.learning_rate, local, train.num_clients,
                         server_opt)
  else:  # fedavg, fedavgm and the FedOpt family differ only in the server optimizer
    algorithm = fedavg(model, client_opt, server_opt, local, a.weighting)
  n, s = train.num_clients, c.sampling

  def sampler(round_num):
    rng = round_rng(c.seed, round_num)
    if s.scheme == "poisson":
      return sample_poisson(rng, n, s.rate)
    if s.scheme == "shuffle":
      return sample_shuffled(c.seed, round_num, n, s.clients_per_round)
    return sample_uniform(rng, n, s.clients_per_round)

  e = c.engine
  sy = c.system
  system = SystemConfig(sy.dropout, sy.dropout_concentration, sy.straggler_fraction,
                        sy.straggler_policy, sy.straggler_work, sy.straggler_concentration)
  m = c.compression
  if privacy is not None and privacy.aggregator is not None:
    aggregator = privacy.aggregator
  elif m.method == "majority_vote":
    aggregator = majority_vote(m.vote_step)
  elif compressor is not None:
    aggregator = compressed_mean(compressor, m.error_feedback)
  else:
    aggregator = weighted_mean()
  engine = Engine(algorithm, train, aggregator, sampler, seed=c.seed, system=system,
                  config=EngineConfig(e.block_size, int(e.max_chunk_mib * 2**20), e.bucketing,
                                      e.prefetch, int(e.encode_cache_mib * 2**20)))
  eval_data, eval_ids = test, np.arange(test.num_clients)
  if c.eval.max_clients and test.num_clients > c.eval.max_clients:
    rng = np.random.default_rng(np.random.SeedSequence([c.seed, 0xE7A1]))
    eval_ids = np.sort(rng.choice(test.num_clients, c.eval.max_clients, replace=False))
    eval_data = test.select(eval_ids)
  evaluator = Evaluator(model, eval_data, mesh=engine.mesh, block_size=e.block_size)
  return Experiment(c, train, test, model, engine, evaluator, eval_ids, privacy)


# -- running --------------------------------------------------------------------


def _prepare_output(c: Config, overwrite: bool) -> str:
  out = c.output_dir
  metrics = os.path.join(out, "metrics.jsonl")
  ckpts = checkpoint_dir(out)
  holds_run = (os.path.exists(metrics) and read_metrics(metrics)) or os.path.isdir(ckpts)
  if holds_run and not overwrite:
    raise RunError(f"output_dir {out!r} already holds a run (metrics.jsonl, checkpoints). Choose "
                   f"another output_dir (--set output_dir=...), pass --resume {out} to continue "
                   f"it, or pass --overwrite to replace it.")
  if os.path.exists(metrics):
    os.remove(metrics)  # replaced on request, or holds no complete round
  if os.path.isdir(ckpts):
    shutil.rmtree(ckpts)
  os.makedirs(out, exist_ok=True)
  atomic_write_text(os.path.join(out, "config.yaml"),
                    yaml.safe_dump(to_dict(c), sort_keys=False))
  return out


# Keys that may change between a run and its resumption.
_RESUMABLE_CHANGES = {"rounds", "progress", "output_dir"}


def _check_resumable(c: Config) -> str:
  out = c.output_dir
  saved_path = os.path.join(out, "config.yaml")
  if not os.path.exists(saved_path):
    raise RunError(f"Cannot resume: {out!r} holds no run (config.yaml is missing). Start it "
                   "without --resume.")
  try:
    saved = config_from_dict(yaml.safe_load(open(saved_path)))
  except (ConfigError, yaml.YAMLError) as e:
    raise RunError(f"Cannot resume: {saved_path} is not a valid config ({e}).") from e
  diffs = [f"{k}: the run has {a!r}, now {b!r}" for k, a, b in
           _diff(to_dict(saved), to_dict(c)) if k.split(".")[0] not in _RESUMABLE_CHANGES]
  if diffs:
    raise RunError(f"Cannot resume {out!r} with a different config; only rounds may change. "
                   "Differences: " + "; ".join(diffs))
  return out


def _diff(a, b, prefix=""):
  if isinstance(a, dict) and isinstance(b, dict):
    for k in sorted(set(a) | set(b)):
      yield from _diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
  elif a != b:
    yield prefix, a, b


def run_experiment(c: Config, *, overwrite: bool = False, resume: bool = False,
                   log=print) -> dict:
  """Runs a validated config to completion; returns the summary.

  With `resume=True` it continues the run in `c.output_dir` from its latest
  checkpoint (the config must match; `rounds` may grow): metrics of rounds
  after that checkpoint are dropped and recomputed, identically.
  """
  out = _check_resumable(c) if resume else _prepare_output(c, overwrite)
  t_start = time.perf_counter()
  exp = build_experiment(c, _calibrated_noise(out, c) if resume else None)
  t_built = time.perf_counter()
  privacy = exp.privacy
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
                     f"round: round 1 alone spends epsilon = {privacy.epsilon(1):.4g}. Raise the "
                     "budget or privacy.noise_multiplier.")
  params = exp.model.init(root_key(c.seed, 4))
  state = exp.engine.init(params)
  checkpointer = Checkpointer(out, keep=c.checkpoint.keep)
  metrics_path = os.path.join(out, "metrics.jsonl")
  start, last_eval, total_bits = 0, {}, 0.0
  if resume:
    state, start = checkpointer.restore(state, layout=_layout(exp))
    if stopped is not None and start >= stop:
      raise RunError(f"Cannot resume {out!r}: its privacy budget is spent. After round {start} "
                     f"epsilon = {privacy.epsilon(start):.4g}, and {stopped.split(';')[0]}. "
                     "A run cannot spend past its budget_epsilon; start a new run to train more.")
    if start > c.rounds:
      raise RunError(f"The checkpoint in {out!r} holds {start} rounds but rounds = {c.rounds}; "
                     f"set rounds >= {start} to continue.")
    kept = [r for r in read_metrics(metrics_path) if r["round"] <= start]
    if [r["round"] for r in kept] != list(range(1, start + 1)):
      raise CheckpointError(f"{metrics_path} does not hold rounds 1..{start} of the checkpoint; "
                            "the run folder is inconsistent.")
    atomic_write_text(metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
    atomic_write_text(os.path.join(out, "config.yaml"),
                      yaml.safe_dump(to_dict(c), sort_keys=False))
    last_eval = next(({k: v for k, v in r.items() if k.startswith("eval_")}
                      for r in reversed(kept) if "eval_loss" in r), {})
    total_bits = kept[-1].get("total_bits", 0.0) if kept else 0.0
    log(f"fedjax_sim: resuming {out} after round {start}")
  log(f"fedjax_sim: {exp.train.num_clients} training clients, {exp.evaluator.data.num_clients} "
      f"eval clients, {len(exp.engine.mesh.devices.flat)} device(s) "
      f"({jax.default_backend()}), output in {out}")

  bar = None
  if c.progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=c.rounds, initial=start, desc="rounds", unit="round", dynamic_ncols=True)
  if privacy is not None:
    log(f"fedjax_sim: {privacy.mechanism}, noise multiplier {privacy.noise_multiplier:.4g} "
        f"({privacy.noise_source}); epsilon after {stop} rounds: {privacy.epsilon(stop):.4g} at "
        f"delta = {privacy.delta:.3g}")
    if not resume:  # the multiplier is on disk before any round runs (resume reuses it)
      write_privacy_report(out, privacy_report(privacy, [], c.rounds, stopped))
  train_seconds = 0.0
  try:
    with MetricsLog(metrics_path) as sink:
      for result in exp.engine.rounds(state, start, stop):
        state = result.state
        record = {"round": result.round_num + 1, **_public(result.metrics)}
        total_bits += record.get("bits", 0.0)
        record["total_bits"] = total_bits  # uploaded since round 1, all clients
        if privacy is not None:
          record["dp_epsilon"] = privacy.epsilon(result.round_num + 1)
        train_seconds += result.metrics["round_seconds"]
        is_last = result.round_num + 1 == stop
        if is_last or (c.eval.every and (result.round_num + 1) % c.eval.every == 0):
          t0 = time.perf_counter()
          last_eval = _evaluate(exp, state)
          record.update(last_eval)
          record["eval_seconds"] = time.perf_counter() - t0
        sink.append(record)
        done = result.round_num + 1
        if is_last or (c.checkpoint.every and done % c.checkpoint.every == 0):
          checkpointer.save(done, state, layout=_layout(exp))
          if privacy is not None:
            write_privacy_report(out, privacy_report(privacy, read_metrics(metrics_path),
                                                     c.rounds, stopped if is_last else None))
        if bar is not None:
          bar.update(1)
          bar.set_postfix(loss=f"{record.get('train_loss', float('nan')):.4f}",
                          acc=f"{last_eval.get('eval_accuracy', float('nan')):.4f}",
                          clients_s=f"{record['clients_per_second']:.0f}")
  finally:
    if bar is not None:
      bar.close()
    checkpointer.close()

  records = read_metrics(metrics_path)
  convergence_plot(records, os.path.join(out, "convergence.png"),
                   title=f"{c.algorithm.name} / {c.model.kind} / {c.data.kind}")
  steady = [r["clients_per_second"] for r in records[1:]] or [records[-1]["clients_per_second"]]
  summary = {
      "rounds": len(records),
      "final": records[-1],
      "final_eval": last_eval,
      "best_eval_accuracy": max((r["eval_accuracy"] for r in records if "eval_accuracy" in r),
                                default=None),
      "median_clients_per_second_after_first_round": float(np.median(steady)),
      "total_bits_uploaded": records[-1].get("total_bits", 0.0),
      "round_success_rate": float(np.mean([r["round_failed"] == 0 for r in records])),
      "failed_rounds": int(sum(r["round_failed"] for r in records)),
      "train_seconds": train_seconds,
      "setup_seconds": t_built - t_start,
      "wall_seconds": time.perf_counter() - t_start,
      "compiled_chunk_programs": exp.engine.traces,
      "devices": [str(d) for d in exp.engine.mesh.devices.flat],
      "backend": jax.default_backend(),
      "versions": {"jax": jax.__version__, "numpy": np.__version__,
                   "python": platform.python_version()},
      "seed": c.seed,
  }
  if privacy is not None:
    summary["privacy"] = {"mechanism": privacy.mechanism, "epsilon": privacy.epsilon(len(records)),
                          "delta": privacy.delta, "noise_multiplier": privacy.noise_multiplier,
                          "stopped_by_budget": stopped}
    if stopped:
      log(f"fedjax_sim: stopped early: {stopped}")
  atomic_write_json(os.path.join(out, "summary.json"), summary)
  log(f"done: {len(records)} rounds in {summary['wall_seconds']:.1f}s, eval accuracy "
      f"{last_eval.get('eval_accuracy', float('nan')):.4f}; results in {out}")
  return summary


def _calibrated_noise(out: str, c: Config) -> float | None:
  """The noise multiplier a run started with (a resumed run must not recalibrate)."""
  path = os.path.join(out, "privacy_report.json")
  if c.privacy.mechanism == "none":
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
          "rows_per_device": int(exp.engine.rows_per_device)}


def _evaluate(exp: Experiment, state) -> dict:
  """Global-model metrics, plus personal-model ones for personalization algorithms."""
  alg = exp.engine.algorithm
  out = exp.evaluator(alg.params_of(state.server))
  if alg.personal_params is not None:
    per_client = exp.evaluator.per_client_personal(
        state.clients, alg.personal_params, exp.engine.rows_per_device, store_ids=exp.eval_ids)
    out.update(summarize(per_client, prefix="eval_personal_"))
  return out


_HIDDEN = {"update_norm_sum", "uploads"}


def _public(metrics: dict) -> dict:
  out = {k: v for k, v in metrics.items() if k not in _HIDDEN}
  out["participating_clients"] = out.pop("clients", 0.0)
  return out
