"""The privacy mechanisms a run can choose (config section `privacy`), and their plans.

Each mechanism is a registered component with its own config dataclass and
the rules it imposes on the rest of the run. `plan_privacy` resolves it
against the training population before training: it resolves delta,
calibrates the noise multiplier from a target epsilon (dp-accounting's
calibration), builds the aggregation stage (user-level DP) or the local
DP-SGD settings (example-level DP), and a `PrivacyLedger` that gives epsilon
after any number of rounds. `privacy_report` turns a plan and the run's
metrics into the report dict a run writes (`fedjax_sim.runner.privacy`
writes it to disk).

The same objects serve scripts: build `Config(privacy=DPFedAvgConfig(
target_epsilon=3.0, clip_norm=1.0), ...)` and hand it to
`fedjax_sim.Simulation`; the calibration, budget and report are the same as
the CLI's.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Callable, Literal

import numpy as np
from jax.typing import ArrayLike

from fedjax_sim.core import Aggregator, FederatedData
from fedjax_sim.core.registry import ALGORITHMS, PRIVACY, SAMPLERS, PrivacySection
from fedjax_sim.core.sampling import rounds_per_epoch
from fedjax_sim.core.schema import ConfigError, fraction_open, non_negative, option, positive
from fedjax_sim.privacy import accounting as acc
from fedjax_sim.privacy.gaussian_sum import gaussian_sum
from fedjax_sim.privacy.tree import tree_sum


class PrivacyUtilityWarning(UserWarning):
  """The noise of a DP run is so large that training cannot be expected to learn."""


# -- configs -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPSection(PrivacySection):
  """Keys every DP mechanism has. Exactly one of noise_multiplier and
  target_epsilon is given: the other is found by accounting before training."""

  clip_norm: float = option(1.0, check=(positive, "must be > 0"),
                            help="L2 bound of a client's update (an example's gradient for "
                                 "local_dp_sgd); the initial bound if adaptive")
  noise_multiplier: float | None = option(None, check=(non_negative, "must be >= 0"),
                                          help="noise std / clip norm")
  target_epsilon: float | None = option(None, check=(positive, "must be > 0"),
                                        help="calibrate noise_multiplier for this epsilon")
  delta: float | None = option(None, check=(fraction_open, "must be in (0, 1)"),
                               help="default 1/N^1.1 (N clients; N examples in all for "
                                    "local_dp_sgd)")
  budget_epsilon: float | None = option(None, check=(positive, "must be > 0"),
                                        help="stop before the round that would exceed it")
  accountant: Literal["rdp", "pld"] = "rdp"

  @classmethod
  def unused_keys(cls, values: dict) -> set[str]:
    """Unset (null) noise and budget settings: left out of config.yaml."""
    return {k for k in ("noise_multiplier", "target_epsilon", "budget_epsilon")
            if values.get(k) is None}

  def __post_init__(self):
    if (self.noise_multiplier is None) == (self.target_epsilon is None):
      raise ConfigError("Give exactly one of privacy.noise_multiplier and privacy.target_epsilon "
                        f"(mechanism {self.mechanism!r}): the other is derived by accounting.")


_ADAPTIVE_ONLY = ("target_quantile", "clip_learning_rate", "clip_count_stddev")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPFedAvgConfig(DPSection):
  """User-level DP-FedAvg: clip each client's update, Gaussian noise on the sum."""

  adaptive_clipping: bool = False
  target_quantile: float = option(0.5, check=(lambda x: 0 <= x <= 1, "must be in [0, 1]"))
  clip_learning_rate: float = option(0.2, check=(positive, "must be > 0"))
  clip_count_stddev: float | None = option(None, check=(positive, "must be > 0"),
                                           help="default: expected clients per round / 20")

  def __post_init__(self):
    super().__post_init__()
    if not self.adaptive_clipping:
      for name in _ADAPTIVE_ONLY:
        if getattr(self, name) != _DEFAULTS[name]:
          self.check_given({name})
    elif self.noise_multiplier == 0:
      raise ConfigError("privacy.adaptive_clipping needs privacy.noise_multiplier > 0.")

  @classmethod
  def unused_keys(cls, values: dict) -> set[str]:
    """Keys of this section that `values` (a plain or raw section) leaves without effect."""
    adaptive = set() if values.get("adaptive_clipping") else set(_ADAPTIVE_ONLY)
    return super().unused_keys(values) | adaptive

  def check_given(self, given: set[str]) -> None:
    """A key adaptive clipping alone uses is an error without it, even at its default."""
    if not self.adaptive_clipping:
      for name in _ADAPTIVE_ONLY:
        if name in given:
          raise ConfigError(f"privacy.{name} is set but it applies only with "
                            "privacy.adaptive_clipping = true; remove it.")


_DEFAULTS = {"target_quantile": 0.5, "clip_learning_rate": 0.2, "clip_count_stddev": None}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPFTRLConfig(DPSection):
  """User-level DP-FTRL: tree-aggregated noise over shuffled epochs."""

  tree_restart: str | int = option("epoch", help="'epoch', 'none' or every N rounds")

  def __post_init__(self):
    super().__post_init__()
    r = self.tree_restart
    if not (r in ("epoch", "none") or (isinstance(r, int) and not isinstance(r, bool) and r >= 1)):
      raise ConfigError(f"privacy.tree_restart = {r!r}; use 'epoch', 'none' or a number of "
                        "rounds >= 1.")
    if self.accountant == "pld":
      raise ConfigError("privacy.accountant = 'pld': dp-accounting's PLD accountant cannot account "
                        "tree aggregation; use privacy.accountant = 'rdp'.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LocalDPSGDConfig(DPSection):
  """Example-level DP-SGD inside every client."""

  def __post_init__(self):
    super().__post_init__()
    if self.accountant == "pld":
      raise ConfigError("privacy.accountant = 'pld': dp-accounting's PLD accountant cannot account "
                        "sampling without replacement; use privacy.accountant = 'rdp'.")


# -- rules ---------------------------------------------------------------------------


def _user_level_rules(c) -> None:
  """DP-FedAvg and DP-FTRL: an accountable sampling scheme and equal client weights."""
  p, s = c.privacy, c.sampling
  if accounted_as(s) is None:
    raise ConfigError(f"privacy.mechanism = {p.mechanism!r} with sampling.scheme = "
                      f"{s.scheme!r}: dp-accounting has no event for this sampling (e.g. "
                      "sampling weighted by data size). Use poisson (dp_fedavg) or shuffle "
                      "(dp_ftrl).")
  algorithm = ALGORITHMS.of(c.algorithm)
  if ALGORITHMS.trait(c.algorithm, "weighting") != "uniform":
    fix = ("set algorithm.weighting = 'uniform'" if hasattr(c.algorithm, "weighting") else
           f"{algorithm.name} weights clients by their data, so it cannot be combined with it")
    raise ConfigError(f"privacy.mechanism = {p.mechanism!r} weights every client equally (its "
                      f"sensitivity bound needs it); {fix}.")


def _dp_fedavg_rules(c) -> None:
  _user_level_rules(c)
  if c.privacy.accountant == "pld" and accounted_as(c.sampling) == "uniform":
    raise ConfigError("privacy.accountant = 'pld': dp-accounting's PLD accountant cannot account "
                      "sampling without replacement; use privacy.accountant = 'rdp' or "
                      "sampling.scheme = 'poisson'.")


def _dp_ftrl_rules(c) -> None:
  _user_level_rules(c)
  if accounted_as(c.sampling) != "shuffle":
    raise ConfigError("privacy.mechanism = 'dp_ftrl' is accounted for shuffled epochs (every "
                      "client at most once per epoch); dp-accounting has no tree-aggregation "
                      f"event with {c.sampling.scheme} sampling. Set sampling.scheme = 'shuffle'.")
  if c.compression.method != "none":
    raise ConfigError("compression with privacy.mechanism = 'dp_ftrl' is not implemented; use "
                      "dp_fedavg or no compression.")


# -- planning --------------------------------------------------------------------------


def accounted_as(s) -> str | None:
  """The sampling dp-accounting accounts a sampling section as (its scheme's declared
  `accounted_as` trait: "uniform", "poisson", "shuffle"; None: no event exists)."""
  return SAMPLERS.of(s).traits.get("accounted_as")


def _cohort_settings(s) -> tuple[int, float]:
  """(clients_per_round, rate) of a sampling section (0 where the scheme has none)."""
  return int(getattr(s, "clients_per_round", 0)), float(getattr(s, "rate", 0.0))


@dataclasses.dataclass
class PrivacyPlan:
  """Everything a DP run needs, fixed before the first round.

  Attributes:
    stage: for user-level DP, `stage(clip_norm, noise_multiplier) ->
      Aggregator`, the factory that built `aggregator` (from `clip_norm` and
      the resolved z) with everything else fixed; the scalars may be traced,
      so a vmap sweep builds each member's stage inside its program.
    stage_settings: what else `stage` is built from (denominator, adaptive
      clipping's settings, tree restarts, compression): members whose
      settings are equal differ only in the two scalars.
  """

  mechanism: str
  unit: str  # "client" (user-level) or "example"
  noise_multiplier: float
  noise_source: str
  delta: float
  ledger: acc.PrivacyLedger
  aggregator: Aggregator | None  # None: the algorithm's own aggregation (local DP-SGD)
  local_dp: tuple[float, float] | None  # (clip norm, noise multiplier) of local DP-SGD
  info: dict  # static report fields
  stage: Callable[[ArrayLike, ArrayLike], Aggregator] | None = None
  stage_settings: dict | None = None

  def epsilon(self, rounds: int) -> float:
    return self.ledger.epsilon(rounds)


def _cohort(c, num_clients: int) -> tuple[float, float]:
  """(sampling rate, expected clients per round)."""
  cpr, rate = _cohort_settings(c.sampling)
  if accounted_as(c.sampling) == "poisson":
    return rate, rate * num_clients
  return cpr / num_clients, float(cpr)


def _events(c, train: FederatedData, z: float):
  """`rounds -> [DpEvent]` for the configured mechanism at noise multiplier z."""
  p, s, n = c.privacy, c.sampling, train.num_clients
  if p.mechanism == "dp_fedavg":
    cpr, rate = _cohort_settings(s)
    return lambda r: [acc.dp_fedavg_event(z, r, sampling=accounted_as(s), num_clients=n,
                                          clients_per_round=cpr, rate=rate)]
  if p.mechanism == "dp_ftrl":
    return lambda r: [acc.dp_ftrl_event(z, r, num_clients=n,
                                        clients_per_round=_cohort_settings(s)[0],
                                        restart=p.tree_restart)]
  b, epochs = c.algorithm.batch_size, c.algorithm.local_epochs
  sizes = [int(k) for k in np.unique(train.sizes) if k > 0]
  return lambda r: [acc.dp_sgd_event(z, r, num_examples=k, batch_size=b,
                                     steps_per_round=epochs * -(-k // b)) for k in sizes]


def plan_privacy(c, train: FederatedData, noise_multiplier: float | None = None,
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
  cpr, rate_in = _cohort_settings(s)
  n = train.num_clients
  example_level = p.mechanism == "local_dp_sgd"
  if example_level and train.sizes.max(initial=0) < 1:
    raise ConfigError("privacy.mechanism = 'local_dp_sgd': no client has examples.")
  units = int(train.sizes.sum()) if example_level else n  # the protected records
  delta = p.delta if p.delta is not None else float(units) ** -1.1
  if not 0 < delta < 1:
    raise ConfigError(f"privacy.delta defaults to 1/N^1.1 = {delta} for N = {units}; set "
                      "privacy.delta explicitly.")
  scheme = accounted_as(s) or s.scheme  # local DP-SGD does not use client sampling
  relation = acc.relation_for(p.mechanism, scheme)
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
    linear = example_level or (p.mechanism == "dp_fedavg" and scheme in ("poisson", "uniform"))
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
  aggregator, local_dp, stage, settings = None, None, None, None
  info = {"mechanism": p.mechanism, "unit": "example" if example_level else "client",
          "clip_norm": p.clip_norm, "noise_multiplier": z, "noise_multiplier_source": source,
          "delta": delta, "accountant": p.accountant, "neighboring_relation": relation.name,
          "sampling": s.scheme, "sampling_rate": rate, "num_clients": n,
          "clients_per_round": rate_in * n if scheme == "poisson" else cpr,
          "budget_epsilon": p.budget_epsilon}
  try:
    if p.mechanism == "dp_fedavg":
      adaptive = {} if not p.adaptive_clipping else dict(
          target_quantile=p.target_quantile, clip_learning_rate=p.clip_learning_rate,
          count_stddev=p.clip_count_stddev)
      stage = functools.partial(gaussian_sum, expected_participants=expected,
                                compressor=compressor, **adaptive)
      settings = {"denominator": expected, "compression": c.compression, **adaptive}
      aggregator = stage(p.clip_norm, z)
      if p.adaptive_clipping:
        sigma_b = expected / 20 if p.clip_count_stddev is None else p.clip_count_stddev
        info.update(adaptive_clipping=True, target_quantile=p.target_quantile,
                    clip_learning_rate=p.clip_learning_rate, clip_count_stddev=sigma_b,
                    update_noise_multiplier=acc.adaptive_clip_noise(z, sigma_b) if z > 0 else 0.0)
      info["denominator"] = expected
    elif p.mechanism == "dp_ftrl":
      per_epoch = rounds_per_epoch(n, cpr)
      restart = {"epoch": per_epoch, "none": None}.get(p.tree_restart, p.tree_restart)
      stage = functools.partial(tree_sum, denominator=float(cpr), restart_every=restart)
      settings = {"denominator": float(cpr), "restart_every": restart}
      aggregator = stage(p.clip_norm, z)
      info.update(tree_restart=p.tree_restart, rounds_per_epoch=per_epoch,
                  denominator=float(cpr))
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
                     info, stage, settings)


def _cohort_text(c, num_clients: int) -> str:
  s = c.sampling
  cpr, rate = _cohort_settings(s)
  if accounted_as(s) == "poisson":
    return f"Poisson sampling at rate {rate:g} of {num_clients} clients"
  return f"{s.scheme} sampling of {cpr} of {num_clients} clients"


def _utility(c, train: FederatedData, z: float, info: dict) -> dict:
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


def _assumptions(c, relation) -> list[str]:
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
    if accounted_as(s) in ("poisson", "uniform"):
      out.append(f"Amplification by {accounted_as(s)} sampling assumes each round's cohort stays "
                 "secret and is drawn independently of the data.")
    if accounted_as(s) == "shuffle":
      out.append("Shuffled epochs: every client takes part in at most one round per epoch; no "
                 "amplification by sampling is claimed.")
    if p.mechanism == "dp_ftrl":
      out.append("Tree aggregation (DP-FTRL): each client's contribution enters one leaf per "
                 "tree and the trees never straddle an epoch, as dp-accounting's "
                 "SingleEpochTreeAggregationDpEvent requires.")
    if getattr(p, "adaptive_clipping", False):
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


# Metrics that are the accounted release or post-processing of it (the noisy
# aggregate's norm, the clip norm adapted from the noisy count, the public tree
# schedule, the accountant's epsilon).
COVERED_METRICS = frozenset({"round", "dp_epsilon", "dp_clip_norm",
                             "dp_unclipped_fraction_estimate", "dp_tree_step", "update_norm"})


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
  # Which of the run's metrics the guarantee covers: the noisy releases and what
  # is computed from them. Every other metric is a raw diagnostic.
  keys = sorted({k for r in records for k in r})
  report["covered_metrics"] = [k for k in keys if k in COVERED_METRICS]
  report["raw_diagnostic_metrics"] = [k for k in keys if k not in COVERED_METRICS]
  report["assumptions"] = plan.info["assumptions"]
  return report


def _build_plan(cfg, ctx):
  """A privacy plan (see `plan_privacy`)."""
  del cfg
  return plan_privacy(ctx.config, ctx.train, ctx.noise_multiplier, ctx.compressor)


PRIVACY.register("none")(lambda cfg, ctx: None)
# `example`: settings that make a small config valid for the component (the contract
# suite of tests/core/test_contracts.py runs every registered component with them).
_USER_LEVEL_EXAMPLE = {"privacy": {"noise_multiplier": 0.5}, "algorithm": {"weighting": "uniform"}}
PRIVACY.register("dp_fedavg", DPFedAvgConfig, checks=(_dp_fedavg_rules,), unit="client",
                 example=_USER_LEVEL_EXAMPLE)(_build_plan)
PRIVACY.register("dp_ftrl", DPFTRLConfig, checks=(_dp_ftrl_rules,), unit="client",
                 example={**_USER_LEVEL_EXAMPLE, "sampling": {"scheme": "shuffle"}})(_build_plan)
# Algorithms whose clients touch their data outside DP-SGD refuse local_dp_sgd themselves.
PRIVACY.register("local_dp_sgd", LocalDPSGDConfig, unit="example",
                 example={"privacy": {"noise_multiplier": 0.5}})(_build_plan)
