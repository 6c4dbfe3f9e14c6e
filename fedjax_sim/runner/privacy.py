"""A config's privacy section made concrete: mechanism, accounting, budget and report.

`plan_privacy` runs before training: it resolves delta, calibrates the noise
multiplier from a target epsilon (dp-accounting's calibration), builds the
aggregation stage or the local DP-SGD settings, and a `PrivacyLedger` that
gives epsilon after any number of rounds. The runner asks the ledger how many
rounds the budget affords, adds `dp_epsilon` to every round's metrics and
writes `privacy_report.json` / `privacy_report.md`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings

import numpy as np

from fedjax_sim.core import Aggregator, FederatedData
from fedjax_sim.core.sampling import rounds_per_epoch
from fedjax_sim.privacy import accounting as acc
from fedjax_sim.privacy.gaussian_sum import gaussian_sum
from fedjax_sim.privacy.tree import tree_sum
from fedjax_sim.runner.config import Config, ConfigError
from fedjax_sim.runner.io import atomic_write_text


class PrivacyUtilityWarning(UserWarning):
  """The noise of a DP run is so large that training cannot be expected to learn."""


# The JSON keys every DP run's report carries (more may follow).
REQUIRED_KEYS = ("mechanism", "epsilon", "delta", "noise_multiplier", "clip_norm", "rounds",
                 "sampling", "sampling_rate", "num_clients", "clients_per_round", "accountant")


def _fmt(x) -> str:
  if x is None:
    return "-"
  if isinstance(x, float):
    if math.isinf(x):
      return "inf"
    return f"{x:.6g}"
  return str(x)


def render_markdown(report: dict) -> str:
  """A human-readable rendering of a report dict (the same facts as the JSON)."""
  lines = [f"# Privacy report: {report['mechanism']}", ""]
  eps = report["epsilon"]
  lines += [f"After **{report['rounds']}** round(s) the run is "
            f"**({_fmt(eps)}, {_fmt(report['delta'])})-DP** at the level of one "
            f"{report.get('unit', 'client')}, by the {report['accountant'].upper()} accountant of "
            "dp-accounting.", ""]
  if report.get("utility_warning"):
    lines += [f"**Utility warning.** {report['utility_warning']}", ""]
  if report.get("stopped_by_budget"):
    lines += [f"The run stopped before its planned {report.get('rounds_planned')} rounds: "
              f"{report['stopped_by_budget']}", ""]
  lines += ["| setting | value |", "|---|---|"]
  skip = {"epsilon_per_round", "clip_norm_trajectory", "assumptions", "epsilon_by_client_size",
          "utility_warning"}
  for key, value in report.items():
    if key in skip:
      continue
    if isinstance(value, dict):
      value = ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    lines.append(f"| {key} | {_fmt(value)} |")
  lines.append("")
  per_round = report.get("epsilon_per_round") or []
  clips = report.get("clip_norm_trajectory") or []
  if per_round:
    lines += ["## Epsilon per round", ""]
    header = "| round | epsilon |" + (" clip norm |" if clips else "")
    lines += [header, "|---|---|" + ("---|" if clips else "")]
    n = len(per_round)
    shown = sorted(set(range(0, n, max(1, n // 40))) | {n - 1})
    for i in shown:
      row = f"| {i + 1} | {_fmt(per_round[i])} |"
      if clips:
        row += f" {_fmt(clips[i]) if i < len(clips) else '-'} |"
      lines.append(row)
    if len(shown) < n:
      lines.append(f"\n({len(shown)} of {n} rounds shown; the JSON has every round.)")
    lines.append("")
  by_size = report.get("epsilon_by_client_size")
  if by_size:
    lines += ["## Epsilon by client dataset size", "", "| examples | epsilon |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in by_size.items()]
    lines.append("")
  lines += ["## Assumptions behind the guarantee", ""]
  lines += [f"- {a}" for a in report.get("assumptions", [])]
  return "\n".join(lines) + "\n"


def write_privacy_report(out_dir: str, report: dict) -> None:
  """Writes both files atomically (a crash leaves the previous version intact)."""
  missing = [k for k in REQUIRED_KEYS if k not in report]
  if missing:
    raise ValueError(f"privacy report is missing keys {missing}.")
  atomic_write_text(os.path.join(out_dir, "privacy_report.json"),
                    json.dumps(report, indent=2, sort_keys=False) + "\n")
  atomic_write_text(os.path.join(out_dir, "privacy_report.md"), render_markdown(report))


@dataclasses.dataclass
class PrivacyPlan:
  """Everything a DP run needs, fixed before the first round."""

  mechanism: str
  unit: str  # "client" (user-level) or "example"
  noise_multiplier: float
  noise_source: str
  delta: float
  ledger: acc.PrivacyLedger
  aggregator: Aggregator | None  # None: the algorithm's own aggregation (local DP-SGD)
  local_dp: tuple[float, float] | None  # (clip norm, noise multiplier) of local DP-SGD
  info: dict  # static report fields

  def epsilon(self, rounds: int) -> float:
    return self.ledger.epsilon(rounds)


def _cohort(c: Config, num_clients: int) -> tuple[float, float]:
  """(sampling rate, expected clients per round)."""
  s = c.sampling
  if s.scheme == "poisson":
    return s.rate, s.rate * num_clients
  return s.clients_per_round / num_clients, float(s.clients_per_round)


def _events(c: Config, train: FederatedData, z: float):
  """`rounds -> [DpEvent]` for the configured mechanism at noise multiplier z."""
  p, s, n = c.privacy, c.sampling, train.num_clients
  if p.mechanism == "dp_fedavg":
    return lambda r: [acc.dp_fedavg_event(z, r, sampling=s.scheme, num_clients=n,
                                          clients_per_round=s.clients_per_round, rate=s.rate)]
  if p.mechanism == "dp_ftrl":
    return lambda r: [acc.dp_ftrl_event(z, r, num_clients=n, clients_per_round=s.clients_per_round,
                                        restart=p.tree_restart)]
  b, epochs = c.algorithm.batch_size, c.algorithm.local_epochs
  sizes = [int(k) for k in np.unique(train.sizes) if k > 0]
  return lambda r: [acc.dp_sgd_event(z, r, num_examples=k, batch_size=b,
                                     steps_per_round=epochs * -(-k // b)) for k in sizes]


def plan_privacy(c: Config, train: FederatedData, noise_multiplier: float | None = None,
                 compressor=None) -> PrivacyPlan | None:
  """Resolves the privacy section against the training population (None: no DP).

  Args:
    c: the validated config.
    train: the training population (its size and client sizes enter the
      accounting).
    noise_multiplier: overrides the config's (a resumed run keeps the
      multiplier its first start calibrated, whatever `rounds` is now).
    compressor: the upload's compressor, composed into DP-FedAvg's stage
      (clip -> compress -> clip -> noise).

  Raises:
    ConfigError: a setting the accountants cannot back, or a target epsilon
      no noise level reaches.
  """
  p, s = c.privacy, c.sampling
  if p.mechanism == "none":
    return None
  n = train.num_clients
  example_level = p.mechanism == "local_dp_sgd"
  if example_level and train.sizes.max(initial=0) < 1:
    raise ConfigError("privacy.mechanism = 'local_dp_sgd': no client has examples.")
  units = int(train.sizes.sum()) if example_level else n  # the protected records
  delta = p.delta if p.delta is not None else float(units) ** -1.1
  if not 0 < delta < 1:
    raise ConfigError(f"privacy.delta defaults to 1/N^1.1 = {delta} for N = {units}; set "
                      "privacy.delta explicitly.")
  relation = acc.relation_for(p.mechanism, s.scheme)
  try:
    if noise_multiplier is not None:
      z, source = float(noise_multiplier), "calibrated when the run started"
    elif p.noise_multiplier is not None:
      z, source = float(p.noise_multiplier), "given"
    else:
      # The guarantee is the worst group's (local DP-SGD: one group per client size).
      z = acc.calibrate_worst(lambda zz: _events(c, train, zz)(c.rounds), p.target_epsilon, delta,
                              relation=relation, accountant=p.accountant)
      source = (f"calibrated for epsilon = {p.target_epsilon} at delta = {delta:.3g} over "
                f"{c.rounds} rounds")
    # RDP adds up over rounds when every round is the same event (local DP-SGD,
    # DP-FedAvg with Poisson or uniform sampling): the ledger then scales one
    # round's RDP curve instead of composing r rounds afresh for each round's
    # epsilon (40 ms a round for DP-FedAvg; same numbers).
    linear = example_level or (p.mechanism == "dp_fedavg" and s.scheme in ("poisson", "uniform"))
    ledger = acc.PrivacyLedger(_events(c, train, z), delta, relation=relation,
                               accountant=p.accountant, linear=linear)
    ledger.epsilon(c.rounds)  # an accountant failure surfaces here, before training
  except acc.TargetUnreachableError as e:
    raise ConfigError(f"privacy: {e} (This run: {c.rounds} rounds, {_cohort_text(c, n)}.)") from e
  except acc.PrivacyError as e:
    raise ConfigError(f"privacy: {e}") from e

  rate, expected = _cohort(c, n)
  if p.mechanism == "dp_fedavg" and p.adaptive_clipping and z > 0:
    sigma_b = expected / 20 if p.clip_count_stddev is None else p.clip_count_stddev
    if not sigma_b > z / 2 and p.noise_multiplier is None and noise_multiplier is None:
      raise ConfigError(
          f"privacy: target_epsilon = {p.target_epsilon} needs noise multiplier z = {z:.4g} "
          f"over {c.rounds} rounds ({_cohort_text(c, n)}), and adaptive clipping would then need "
          f"its count noise privacy.clip_count_stddev above z / 2 = {z / 2:.4g} (it is "
          f"{sigma_b:.4g}). The target is too tight for this run: raise privacy.target_epsilon, "
          "run fewer rounds, or train on a larger population. (A clip_count_stddev above "
          f"{z / 2:.4g} would run, with noise of std at least {z / expected:.3g} x clip_norm on "
          "each coordinate of the averaged update.)")
  aggregator, local_dp = None, None
  info = {"mechanism": p.mechanism, "unit": "example" if example_level else "client",
          "clip_norm": p.clip_norm, "noise_multiplier": z, "noise_multiplier_source": source,
          "delta": delta, "accountant": p.accountant, "neighboring_relation": relation.name,
          "sampling": s.scheme, "sampling_rate": rate, "num_clients": n,
          "clients_per_round": s.rate * n if s.scheme == "poisson" else s.clients_per_round,
          "budget_epsilon": p.budget_epsilon}
  try:
    if p.mechanism == "dp_fedavg":
      if p.adaptive_clipping:
        aggregator = gaussian_sum(p.clip_norm, z, expected, target_quantile=p.target_quantile,
                                  clip_learning_rate=p.clip_learning_rate,
                                  count_stddev=p.clip_count_stddev, compressor=compressor)
        sigma_b = expected / 20 if p.clip_count_stddev is None else p.clip_count_stddev
        info.update(adaptive_clipping=True, target_quantile=p.target_quantile,
                    clip_learning_rate=p.clip_learning_rate, clip_count_stddev=sigma_b,
                    update_noise_multiplier=acc.adaptive_clip_noise(z, sigma_b) if z > 0 else 0.0)
      else:
        aggregator = gaussian_sum(p.clip_norm, z, expected, compressor=compressor)
      info["denominator"] = expected
    elif p.mechanism == "dp_ftrl":
      per_epoch = rounds_per_epoch(n, s.clients_per_round)
      restart = {"epoch": per_epoch, "none": None}.get(p.tree_restart, p.tree_restart)
      aggregator = tree_sum(p.clip_norm, z, float(s.clients_per_round), restart)
      info.update(tree_restart=p.tree_restart, rounds_per_epoch=per_epoch,
                  denominator=float(s.clients_per_round))
    else:
      local_dp = (p.clip_norm, z)
      info.update(batch_size=c.algorithm.batch_size, local_epochs=c.algorithm.local_epochs)
  except acc.PrivacyError as e:
    raise ConfigError(f"privacy: {e}") from e
  info.update(_utility(c, train, z, info))
  if info["utility_warning"]:
    warnings.warn(info["utility_warning"], PrivacyUtilityWarning, stacklevel=2)
  info["assumptions"] = _assumptions(c, relation)
  return PrivacyPlan(p.mechanism, info["unit"], z, source, delta, ledger, aggregator, local_dp,
                     info)


def _cohort_text(c: Config, num_clients: int) -> str:
  s = c.sampling
  if s.scheme == "poisson":
    return f"Poisson sampling at rate {s.rate:g} of {num_clients} clients"
  return f"{s.scheme} sampling of {s.clients_per_round} of {num_clients} clients"


def _utility(c: Config, train: FederatedData, z: float, info: dict) -> dict:
  """The noise std on each coordinate of the averaged update, in clip norms, and a warning.

  A clipped update has norm at most C, so once the noise on one coordinate of
  the average (z C / D, D the denominator) exceeds C, no client's whole update
  can stand out of it: training is noise.
  """
  p = c.privacy
  if p.mechanism == "local_dp_sgd":
    # Each step averages min(batch_size, n) clipped gradients: the smallest client is the worst.
    smallest = int(np.min(train.sizes[train.sizes > 0]))
    denominator = float(min(c.algorithm.batch_size, smallest))
    multiplier, what = z, "step"
    where = f"{denominator:g} examples per batch"
  else:
    denominator = float(info["denominator"])
    multiplier = info.get("update_noise_multiplier", z)
    what = "averaged update"
    where = f"{denominator:g} expected clients per round"
  ratio = multiplier / denominator
  warning = None
  if ratio > 1:
    if p.noise_multiplier is None and p.target_epsilon is not None:
      fix = ("raise privacy.target_epsilon, run fewer rounds, or train on more clients (at a "
             "fixed epsilon the noise on the average falls roughly as 1 / population size)")
    else:
      fix = ("lower privacy.noise_multiplier (a larger epsilon) or sample more clients per round"
             if p.mechanism != "local_dp_sgd" else
             "lower privacy.noise_multiplier (a larger epsilon) or use a larger batch_size")
    warning = (f"privacy: the noise on each coordinate of the {what} has std {ratio:.3g} x "
               f"clip_norm (noise multiplier {multiplier:.4g} over {where}), more than the whole "
               f"norm any clipped {'gradient' if what == 'step' else 'update'} can have: the "
               f"guarantee holds, but training will barely move. To learn, {fix}.")
  return {"noise_std_on_mean": ratio * p.clip_norm, "noise_to_signal_bound": ratio,
          "utility_warning": warning}


def _assumptions(c: Config, relation) -> list[str]:
  p, s = c.privacy, c.sampling
  out = []
  if p.mechanism == "local_dp_sgd":
    out += [
        "Protected unit: one training example (example-level DP), under the replace-one "
        "relation (each client's dataset size is public).",
        "Every step samples min(batch_size, n) of the client's n examples uniformly without "
        "replacement, clips each example's gradient to clip_norm and adds Gaussian noise of std "
        "noise_multiplier * clip_norm to the sum, on the client.",
        "The bound assumes the client takes part in every round (no amplification from client "
        "sampling is claimed); epsilon is the largest over all client dataset sizes.",
        "The model update a client uploads is a post-processing of its DP-SGD iterates, so the "
        "server need not be trusted with it.",
    ]
  else:
    out.append("Protected unit: all the data of one client (user-level DP), under the "
               f"{relation.name.lower().replace('_', '-')} relation.")
    out.append("The server (or an aggregator it trusts) sees clipped updates and adds the noise; "
               "the covered release is the sequence of noisy aggregates and the models computed "
               "from them. A round in which nobody takes part still releases noise.")
    if s.scheme in ("poisson", "uniform"):
      out.append(f"Amplification by {s.scheme} sampling assumes each round's cohort stays "
                 "secret and is drawn independently of the data.")
    if s.scheme == "shuffle":
      out.append("Shuffled epochs: every client takes part in at most one round per epoch; no "
                 "amplification by sampling is claimed.")
    if p.mechanism == "dp_ftrl":
      out.append("Tree aggregation (DP-FTRL): each client's contribution enters one leaf per "
                 "tree and the trees never straddle an epoch, as dp-accounting's "
                 "SingleEpochTreeAggregationDpEvent requires.")
    if p.adaptive_clipping:
      out.append("Adaptive clipping: the clip norm is updated from a noisy count of unclipped "
                 "clients; that count is part of the accounted Gaussian mechanism, so the clip "
                 "norm trajectory is itself private.")
  out += [
      "Not covered: the simulator's diagnostics in metrics.jsonl (training loss and accuracy, "
      "exact participant and clipped counts, bits, evaluation metrics) are computed from raw "
      "data and the exact cohort; a deployment would not publish them.",
      "Simulation: the noise, the cohorts and the batches derive from the run's seed, for "
      "reproducibility; anyone holding the seed can regenerate them. The guarantee is that of "
      "a deployment drawing them from a secret source. Noise is float32 Gaussian sampling, not "
      "hardened against floating-point attacks (Mironov 2012).",
  ]
  return out


def privacy_report(plan: PrivacyPlan, records: list[dict], rounds_planned: int,
                   stopped: str | None, *, cross_check: bool = True) -> dict:
  """The report dict after the rounds in `records` (one metrics record per round).

  `cross_check`: also compute epsilon under the accountant the run does not
  use (`epsilon_by_accountant`). A PLD composition of many rounds costs
  about a second, so the runner asks for it only in the final report; the
  reports written at intermediate checkpoints list the run's own accountant.
  """
  per_round = [float(r["dp_epsilon"]) for r in records if "dp_epsilon" in r]
  rounds = len(records)
  report = {"mechanism": plan.mechanism, "epsilon": plan.epsilon(rounds), **{
      k: v for k, v in plan.info.items() if k not in ("mechanism", "assumptions")}}
  report["rounds"] = rounds
  report["rounds_planned"] = rounds_planned
  report["epsilon_planned"] = plan.epsilon(rounds_planned)
  others = {}
  for name in acc.ACCOUNTANTS:
    if not cross_check and name != plan.info["accountant"]:
      continue
    try:
      others[name] = max(acc.epsilon(e, plan.delta, relation=plan.ledger.relation,
                                     accountant=name) for e in plan.ledger.events(rounds)) \
          if rounds else 0.0
    except acc.PrivacyError:
      others[name] = None
  report["epsilon_by_accountant"] = others
  report["epsilon_per_round"] = per_round
  if "dp_clip_norm" in (records[0] if records else {}):
    report["clip_norm_trajectory"] = [float(r["dp_clip_norm"]) for r in records]
  if plan.mechanism == "local_dp_sgd" and rounds:
    sizes = sorted({int(e.event.source_dataset_size) for e in plan.ledger.events(1)})
    eps = [acc.epsilon(e, plan.delta, relation=plan.ledger.relation, accountant="rdp")
           for e in plan.ledger.events(rounds)]
    report["epsilon_by_client_size"] = {str(k): v for k, v in zip(sizes, eps)}
  report["stopped_by_budget"] = stopped
  report["assumptions"] = plan.info["assumptions"]
  return report
