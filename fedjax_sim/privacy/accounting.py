"""Privacy accounting by Google's `dp-accounting`: events in, epsilon out.

Every mechanism is declared as a `dp_accounting.DpEvent`; the accountants (RDP
and PLD) do all the arithmetic. Nothing here computes epsilon by hand.

User-level DP-FedAvg (clip C, noise multiplier z, T rounds):

  Poisson sampling (rate q)       T x PoissonSampled(q, Gaussian(z))       add/remove one client
  fixed-size sampling (m of N)    T x SampledWithoutReplacement(N, m, Gaussian(z / 2))
                                                                           replace one client
  shuffled epochs (m per round)   E x Gaussian(z)                          replace one by a null client

  Under replace-one, one client's clipped update can change the sum by 2C, not
  C, while `GaussianDpEvent`'s multiplier is std / C: the without-replacement
  RDP bound (Wang, Balle, Kasiviswanathan 2019, Thm 27) is stated per unit of
  L2 sensitivity, so it receives z / 2 (dp-accounting issue #378 describes the
  factor). With shuffled epochs a client takes part in at most one round per
  epoch, so each of the E epochs the run touches is one Gaussian mechanism.

DP-FTRL (tree aggregation, Kairouz et al. 2021) needs shuffled epochs and is
accounted with `SingleEpochTreeAggregationDpEvent` under the replace-special
relation (Appendix D of the paper); restart layouts the event cannot express
are refused.

Local DP-SGD (example level, inside one client with n examples, batches of
b = min(B, n) drawn uniformly without replacement at every step, s steps per
round): T x s x SampledWithoutReplacement(n, b, Gaussian(sigma / 2)),
replace one example; the bound assumes the client takes part in every round.

Failures: every call into dp-accounting (epsilon, calibration, the ledger) is
guarded, so whatever an accountant raises (a `MemoryError` when a PLD grid
would not fit, a `ValueError` or an `OverflowError` at an extreme setting)
reaches the caller as a `PrivacyError` naming the setting to change.
Calibration searches noise multipliers in [1e-3, 1e4] (PLD: from 0.1, and
starting from the RDP answer, see `calibrate`); a target that needs more noise
than 1e4 is reported as out of reach.

References:
  McMahan, Ramage, Talwar, Zhang. "Learning Differentially Private Recurrent
  Language Models", ICLR 2018. Kairouz, McMahan, Song, Thakkar, Thakurta, Xu.
  "Practical and Private (Deep) Learning without Sampling or Shuffling", ICML
  2021. Mironov 2017 (RDP); Doroshenko et al. 2022 (PLD accounting).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from typing import Callable, Sequence

import dp_accounting
from dp_accounting import pld, rdp

SAMPLING = ("poisson", "uniform", "shuffle")
ACCOUNTANTS = ("rdp", "pld")
Relation = dp_accounting.NeighboringRelation


# Calibration's search interval. Above MAX_NOISE_MULTIPLIER the noise on each
# coordinate of the sum is 10^4 clip norms: no cohort a simulation runs
# would learn through it, so such a target is reported as out of reach.
MAX_NOISE_MULTIPLIER = 1e4
_MIN_NOISE_MULTIPLIER = 1e-3
# The PLD accountant discretizes the privacy loss with spacing 1e-4 over a
# range that grows like 1/z^2: at z = 0.1 one epsilon takes 10-50 s and
# 0.5-2 GB, at z = 1e-3 it asks for 38 GiB. Below this multiplier (where
# epsilon is in the hundreds anyway) PLD is refused and RDP is the answer.
PLD_MIN_NOISE_MULTIPLIER = 0.1


class PrivacyError(ValueError):
  """A privacy setting is invalid, or no accountant can back the requested number."""


class TargetUnreachableError(PrivacyError):
  """No noise multiplier within calibration's interval meets the target epsilon."""


def _check_noise(noise_multiplier: float, rounds: int) -> None:
  if not noise_multiplier >= 0:
    raise PrivacyError(f"noise_multiplier must be >= 0; got {noise_multiplier}.")
  if rounds < 0:
    raise PrivacyError(f"rounds must be >= 0; got {rounds}.")


def _check_cohort(num_clients: int, clients_per_round: int | None) -> None:
  if num_clients < 1:
    raise PrivacyError(f"num_clients must be >= 1; got {num_clients}.")
  if clients_per_round is None or not 1 <= clients_per_round <= num_clients:
    raise PrivacyError(f"clients_per_round must be in [1, num_clients = {num_clients}]; got "
                       f"{clients_per_round}.")


def dp_fedavg_event(noise_multiplier: float, rounds: int, *, sampling: str, num_clients: int,
                    clients_per_round: int | None = None,
                    rate: float | None = None) -> dp_accounting.DpEvent:
  """The `DpEvent` of `rounds` rounds of DP-FedAvg (see the module docstring)."""
  _check_noise(noise_multiplier, rounds)
  if sampling not in SAMPLING:
    raise PrivacyError(f"sampling must be one of {SAMPLING}; got {sampling!r}.")
  gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
  if sampling == "poisson":
    if num_clients < 1:
      raise PrivacyError(f"num_clients must be >= 1; got {num_clients}.")
    if rate is None or not 0 < rate <= 1:
      raise PrivacyError(f"Poisson sampling needs a rate in (0, 1]; got {rate}.")
    return dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(rate, gaussian),
                                             rounds)
  _check_cohort(num_clients, clients_per_round)
  if sampling == "uniform":
    half = dp_accounting.GaussianDpEvent(noise_multiplier / 2)  # replace-one: sensitivity 2C
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.SampledWithoutReplacementDpEvent(num_clients, clients_per_round, half),
        rounds)
  per_epoch = num_clients // clients_per_round
  return dp_accounting.SelfComposedDpEvent(gaussian, -(-rounds // per_epoch))


def tree_sizes(rounds: int, rounds_per_epoch: int, restart: str | int) -> list[list[int]]:
  """The trees of a DP-FTRL run, grouped by epoch: `[[steps of each tree in epoch 0], ...]`.

  Args:
    rounds: rounds run.
    rounds_per_epoch: R, rounds in one pass over the shuffled population.
    restart: "epoch" (a fresh tree every epoch), "none" (one tree for the
      whole run) or an integer k (a fresh tree every k rounds; k must divide
      R so no tree straddles two epochs).

  Raises:
    PrivacyError: a layout in which some client could land twice in one tree
      (a tree spanning two epochs): `SingleEpochTreeAggregationDpEvent` does
      not cover it.
  """
  if restart == "epoch":
    k = rounds_per_epoch
  elif restart == "none":
    if rounds > rounds_per_epoch:
      raise PrivacyError(
          f"DP-FTRL without restarts runs one tree for all {rounds} rounds, but an epoch has only "
          f"{rounds_per_epoch} rounds, so clients return to the same tree; dp-accounting has no "
          "event for that. Set privacy.tree_restart = 'epoch' (or a divisor of the epoch length), "
          "or run at most one epoch.")
    k = max(rounds, 1)
  elif isinstance(restart, int) and not isinstance(restart, bool) and restart >= 1:
    if rounds_per_epoch % restart:
      raise PrivacyError(
          f"privacy.tree_restart = {restart} does not divide the epoch length ({rounds_per_epoch} "
          "rounds), so a tree would span two epochs and hold a client twice; dp-accounting has no "
          f"event for that. Use 'epoch' or a divisor of {rounds_per_epoch}.")
    k = restart
  else:
    raise PrivacyError(f"tree_restart must be 'epoch', 'none' or an integer >= 1; got "
                       f"{restart!r}.")
  epochs = []
  for start in range(0, rounds, rounds_per_epoch):
    steps = min(rounds_per_epoch, rounds - start)
    epochs.append([min(k, steps - i) for i in range(0, steps, k)])
  return epochs


def dp_ftrl_event(noise_multiplier: float, rounds: int, *, num_clients: int,
                  clients_per_round: int, restart: str | int = "epoch") -> dp_accounting.DpEvent:
  """DP-FTRL over shuffled epochs: one `SingleEpochTreeAggregationDpEvent` per epoch."""
  _check_noise(noise_multiplier, rounds)
  _check_cohort(num_clients, clients_per_round)
  epochs = tree_sizes(rounds, num_clients // clients_per_round, restart)
  return dp_accounting.ComposedDpEvent(
      [dp_accounting.SingleEpochTreeAggregationDpEvent(noise_multiplier, steps)
       for steps in epochs])


def dp_sgd_event(noise_multiplier: float, rounds: int, *, num_examples: int, batch_size: int,
                 steps_per_round: int) -> dp_accounting.DpEvent:
  """Example-level local DP-SGD of one client over `rounds` rounds (see module docstring)."""
  _check_noise(noise_multiplier, rounds)
  if num_examples < 1 or batch_size < 1 or steps_per_round < 0:
    raise PrivacyError("local DP-SGD needs num_examples >= 1, batch_size >= 1 and "
                       f"steps_per_round >= 0; got {num_examples}, {batch_size}, "
                       f"{steps_per_round}.")
  step = dp_accounting.SampledWithoutReplacementDpEvent(
      num_examples, min(batch_size, num_examples),
      dp_accounting.GaussianDpEvent(noise_multiplier / 2))  # replace-one: sensitivity 2C
  return dp_accounting.SelfComposedDpEvent(step, rounds * steps_per_round)


def relation_for(mechanism: str, sampling: str) -> Relation:
  """The neighbouring relation a mechanism's guarantee is stated under."""
  if mechanism == "local_dp_sgd":
    return Relation.REPLACE_ONE
  if mechanism == "dp_ftrl" or sampling == "shuffle":
    return Relation.REPLACE_SPECIAL
  if sampling == "poisson":
    return Relation.ADD_OR_REMOVE_ONE
  return Relation.REPLACE_ONE


def make_accountant(accountant: str, relation: Relation) -> dp_accounting.PrivacyAccountant:
  if accountant == "rdp":
    return rdp.RdpAccountant(neighboring_relation=relation)
  if accountant == "pld":
    return pld.PLDAccountant(neighboring_relation=relation)
  raise PrivacyError(f"accountant must be one of {ACCOUNTANTS}; got {accountant!r}.")


@contextlib.contextmanager
def _quiet():
  """dp-accounting logs (through absl) every RDP order it drops as unusable; that is routine."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


@contextlib.contextmanager
def _guarded(accountant: str, doing: str):
  """Runs dp-accounting quietly; anything it raises becomes a `PrivacyError` with a fix."""
  try:
    with _quiet():
      yield
  except PrivacyError:
    raise
  except Exception as e:  # MemoryError, ValueError, OverflowError, dp-accounting's own errors
    raise _accountant_failure(e, accountant, doing) from e


def _accountant_failure(err: Exception, accountant: str, doing: str) -> PrivacyError:
  other = "rdp" if accountant == "pld" else "pld"
  if isinstance(err, MemoryError) and accountant == "pld":
    fix = ("The PLD accountant's privacy-loss grid grows like 1/z^2 as the noise multiplier z "
           "shrinks. Set privacy.accountant = 'rdp', or use more noise (a larger "
           "privacy.noise_multiplier, or a smaller privacy.target_epsilon).")
  elif isinstance(err, MemoryError):
    fix = ("Use more noise (a larger privacy.noise_multiplier or a smaller "
           "privacy.target_epsilon), fewer rounds, or privacy.accountant = 'pld'.")
  elif isinstance(err, (OverflowError, FloatingPointError)):
    fix = ("The setting is numerically extreme: use a noise multiplier nearer 1 (set "
           "privacy.noise_multiplier, or a target_epsilon between 0.1 and 50), fewer rounds, a "
           f"delta nearer 1/N, or privacy.accountant = {other!r}.")
  else:
    fix = ("Check privacy.noise_multiplier (or target_epsilon), privacy.delta, the sampling "
           f"settings and the rounds, or try privacy.accountant = {other!r}.")
  return PrivacyError(f"dp-accounting's {accountant.upper()} accountant failed while {doing} "
                      f"({type(err).__name__}: {_short(str(err))}). {fix}")


def _check_delta(delta: float) -> None:
  if not 0 < delta < 1:
    raise PrivacyError(f"delta must be in (0, 1); got {delta}.")


def _noise_multipliers(event: dp_accounting.DpEvent):
  """The noise multipliers of the Gaussian mechanisms inside `event`."""
  if isinstance(event, (dp_accounting.GaussianDpEvent,
                        dp_accounting.SingleEpochTreeAggregationDpEvent)):
    yield event.noise_multiplier
  inner = getattr(event, "event", None)
  if isinstance(inner, dp_accounting.DpEvent):
    yield from _noise_multipliers(inner)
  for e in getattr(event, "events", None) or ():
    yield from _noise_multipliers(e)


def _check_pld_noise(event: dp_accounting.DpEvent) -> None:
  small = [z for z in _noise_multipliers(event) if 0 < z < PLD_MIN_NOISE_MULTIPLIER]
  if small:
    raise PrivacyError(
        f"The PLD accountant is not run at noise multiplier {min(small):.3g} (below "
        f"{PLD_MIN_NOISE_MULTIPLIER}): its privacy-loss grid grows like 1/z^2 and would need "
        "gigabytes, for an epsilon in the hundreds. Set privacy.accountant = 'rdp', or use more "
        "noise (a larger privacy.noise_multiplier, or a smaller privacy.target_epsilon).")


def epsilon(event: dp_accounting.DpEvent, delta: float, *, relation: Relation,
            accountant: str = "rdp") -> float:
  """Epsilon of `event` at `delta` under the given accountant.

  Raises:
    PrivacyError: delta outside (0, 1), an accountant that does not support
      the event (e.g. PLD with sampling without replacement or with tree
      aggregation), PLD at a noise multiplier below
      `PLD_MIN_NOISE_MULTIPLIER`, or any failure inside dp-accounting: the
      number would not be backed, so none is returned.
  """
  _check_delta(delta)
  acc = make_accountant(accountant, relation)
  if not supports(event, relation, accountant):
    other = "RDP" if accountant == "pld" else "PLD"
    raise PrivacyError(f"The {accountant.upper()} accountant of dp-accounting cannot account this "
                       f"mechanism under the {relation.name} relation ({_short(event)}); use the "
                       f"{other} accountant (privacy.accountant) or another sampling scheme.")
  if accountant == "pld":
    _check_pld_noise(event)
  with _guarded(accountant, f"computing epsilon at delta = {delta:.3g} for {_short(event)}"):
    eps = float(acc.compose(event).get_epsilon(delta))
  if math.isnan(eps):
    raise PrivacyError(f"The {accountant.upper()} accountant returned NaN for {_short(event)} at "
                       f"delta = {delta:.3g}; try privacy.accountant = "
                       f"{'rdp' if accountant == 'pld' else 'pld'!r}.")
  return eps


def _short(event) -> str:
  text = str(event)
  return text if len(text) < 160 else text[:157] + "..."


def supports(event: dp_accounting.DpEvent, relation: Relation, accountant: str) -> bool:
  acc = make_accountant(accountant, relation)
  with _guarded(accountant, "checking which mechanisms it supports"):
    return bool(acc.supports(event))


def calibrate(make_event: Callable[[float], dp_accounting.DpEvent], target_epsilon: float,
              delta: float, *, relation: Relation, accountant: str = "rdp",
              max_noise_multiplier: float = MAX_NOISE_MULTIPLIER) -> float:
  """The smallest noise multiplier z with `epsilon(make_event(z)) <= target_epsilon`.

  A bracket [lo, hi] with epsilon(lo) > target >= epsilon(hi) is found first
  (hi doubles from a guess, lo steps down from hi), then
  `dp_accounting.calibrate_dp_mechanism` finds z inside it, before any
  training. The guess is 1 for RDP. For PLD it is the RDP answer: RDP's
  epsilon bounds PLD's from above, so that z meets the target and PLD is
  never evaluated at the tiny multipliers where its grid explodes (a bracket
  starting at 1e-3 asked for 38 GiB).

  Args:
    make_event: `z -> DpEvent` of the whole run at noise multiplier z.
    target_epsilon: the epsilon to meet, finite and > 0.
    delta: the delta it is met at.
    relation: the neighbouring relation.
    accountant: "rdp" or "pld".
    max_noise_multiplier: the largest z searched.

  Returns:
    z within 1e-6 of the smallest multiplier meeting the target; the lower
    end of the search (1e-3, PLD 0.1) when even that meets it.

  Raises:
    TargetUnreachableError: the target needs z > max_noise_multiplier.
    PrivacyError: invalid settings, an accountant that cannot account the
      mechanism, or any failure inside dp-accounting.
  """
  if not target_epsilon > 0 or math.isinf(target_epsilon):
    raise PrivacyError(f"target_epsilon must be a finite number > 0; got {target_epsilon}.")
  _check_delta(delta)
  if not supports(make_event(1.0), relation, accountant):
    raise PrivacyError(f"The {accountant.upper()} accountant cannot account this mechanism; "
                       "calibrate with the other accountant.")
  eps = lambda z: epsilon(make_event(z), delta, relation=relation, accountant=accountant)
  floor = PLD_MIN_NOISE_MULTIPLIER if accountant == "pld" else _MIN_NOISE_MULTIPLIER
  hi = 1.0
  if accountant == "pld" and supports(make_event(1.0), relation, "rdp"):
    try:
      hi = calibrate(make_event, target_epsilon, delta, relation=relation, accountant="rdp",
                     max_noise_multiplier=max_noise_multiplier)
    except TargetUnreachableError:
      hi = max_noise_multiplier  # PLD is tighter: it may still reach the target
  hi = min(max(hi, floor), max_noise_multiplier)
  # PLD's cost grows as z falls, so its lower end is approached in small steps.
  step = 0.8 if accountant == "pld" else 0.5
  while (top := eps(hi)) > target_epsilon:
    if hi >= max_noise_multiplier:
      tighter = (" The PLD accountant (privacy.accountant = 'pld') is tighter at small epsilons."
                 if accountant == "rdp" and supports(make_event(1.0), relation, "pld") else "")
      raise TargetUnreachableError(
          f"target_epsilon = {target_epsilon:g} at delta = {delta:.3g} is out of reach: it needs "
          f"a noise multiplier above {max_noise_multiplier:g} (noise std {max_noise_multiplier:g} "
          f"times the clip norm on every coordinate), where the {accountant.upper()} accountant "
          f"still gives epsilon = {top:.3g}. Raise privacy.target_epsilon, sample fewer clients "
          "per round (a lower sampling rate), run fewer rounds, or raise privacy.delta."
          + tighter)
    hi = min(2 * hi, max_noise_multiplier)
  while True:
    lo = max(hi * step, floor)
    if lo >= hi:
      return hi  # even the floor meets the target
    if eps(lo) > target_epsilon:
      break
    hi = lo
  with _guarded(accountant, f"calibrating the noise multiplier in [{lo:.4g}, {hi:.4g}] for "
                            f"target_epsilon = {target_epsilon:g} at delta = {delta:.3g}"):
    if accountant == "pld":
      _check_pld_noise(make_event(lo))
    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: make_accountant(accountant, relation), make_event, target_epsilon, delta,
        bracket_interval=dp_accounting.ExplicitBracketInterval(lo, hi)))


def calibrate_worst(make_events: Callable[[float], Sequence[dp_accounting.DpEvent]],
                    target_epsilon: float, delta: float, *, relation: Relation,
                    accountant: str = "rdp") -> float:
  """`calibrate` when the guarantee is the largest epsilon over several groups.

  Calibrates one group, checks every group at that multiplier (one ledger
  pass), and recalibrates on the group that exceeds the target, if any. Each
  pass raises z, so it ends after at most one pass per group (in practice
  one or two), and the result is the exact answer: the smallest z that
  keeps every group within the target.
  """
  group = 0
  while True:
    z = calibrate(lambda zz: make_events(zz)[group], target_epsilon, delta, relation=relation,
                  accountant=accountant)
    eps = [epsilon(e, delta, relation=relation, accountant=accountant) for e in make_events(z)]
    worst = max(range(len(eps)), key=eps.__getitem__)
    if eps[worst] <= target_epsilon * (1 + 1e-9) or worst == group:
      return z
    group = worst


def calibrate_noise_multiplier(target_epsilon: float, delta: float, rounds: int, *,
                               sampling: str, num_clients: int,
                               clients_per_round: int | None = None, rate: float | None = None,
                               accountant: str = "rdp") -> float:
  """`calibrate` for DP-FedAvg: the noise multiplier for `rounds` rounds at (epsilon, delta)."""
  kw = dict(sampling=sampling, num_clients=num_clients, clients_per_round=clients_per_round,
            rate=rate)
  dp_fedavg_event(1.0, rounds, **kw)  # validates the arguments
  return calibrate(lambda z: dp_fedavg_event(z, rounds, **kw), target_epsilon, delta,
                   relation=relation_for("dp_fedavg", sampling), accountant=accountant)


def adaptive_clip_noise(noise_multiplier: float, count_stddev: float) -> float:
  """The noise multiplier of the clipped-update sum under adaptive clipping.

  Andrew et al. 2021 (Thm. 1): releasing the update sum with multiplier z_v
  and the centred count of unclipped clients (sensitivity 1/2) with std
  sigma_b is one Gaussian mechanism with multiplier
  z = (z_v^-2 + (2 sigma_b)^-2)^(-1/2). Given the total z the run is accounted
  with, the update sum gets z_v = (z^-2 - (2 sigma_b)^-2)^(-1/2).
  """
  if not noise_multiplier > 0:
    raise PrivacyError(f"adaptive clipping needs noise_multiplier > 0; got {noise_multiplier}.")
  if not count_stddev > noise_multiplier / 2:
    raise PrivacyError(
        f"adaptive clipping: the count noise std ({count_stddev:.4g}) must exceed "
        f"noise_multiplier / 2 ({noise_multiplier / 2:.4g}), otherwise the count alone spends the "
        "whole budget. Raise privacy.clip_count_stddev above that (Andrew et al. use expected "
        "clients per round / 20), or lower the noise multiplier.")
  return (noise_multiplier ** -2 - (2 * count_stddev) ** -2) ** -0.5


class PrivacyLedger:
  """Epsilon after r rounds for a configured mechanism, with a budget.

  Args:
    events: `events(rounds) -> [DpEvent, ...]`: the guarantee after `rounds`
      rounds is the largest epsilon among them (one event per group of
      protected units with different exposure, e.g. per client size for
      local DP-SGD; a single event otherwise).
    delta: the target delta.
    relation: the neighbouring relation.
    accountant: "rdp" or "pld".
  """

  def __init__(self, events: Callable[[int], Sequence[dp_accounting.DpEvent]], delta: float, *,
               relation: Relation, accountant: str, linear: bool = False):
    _check_delta(delta)
    self.events, self.delta = events, delta
    self.relation, self.accountant = relation, accountant
    # With many protected groups (local DP-SGD: one per client size) composing
    # every group afresh each round is slow (~0.1 s per group). When the RDP
    # of r rounds is r times that of one (`linear`), the one-round RDP curve of
    # each group is computed once by dp-accounting and scaled; epsilon is then
    # dp-accounting's own `compute_epsilon` of the scaled curve.
    self._curves = None
    if linear and accountant == "rdp":
      self._curves = []
      for event in events(1):
        acc = rdp.RdpAccountant(neighboring_relation=relation)
        with _guarded("rdp", f"composing one round of {_short(event)}"):
          acc.compose(event)
        self._curves.append((acc._orders, acc._rdp))  # no public getter for the RDP curve
    for event in events(1):
      if not supports(event, relation, accountant):
        other = "rdp" if accountant == "pld" else "pld"
        raise PrivacyError(
            f"The {accountant.upper()} accountant of dp-accounting cannot account this mechanism "
            f"under the {relation.name} relation ({_short(event)}). Set privacy.accountant = "
            f"{other!r}, or choose a sampling scheme it supports.")
      if accountant == "pld":
        _check_pld_noise(event)

  @functools.lru_cache(maxsize=4096)
  def epsilon(self, rounds: int) -> float:
    if rounds <= 0:
      return 0.0
    if self._curves is not None:
      return max(self._group_epsilon(i, rounds) for i in range(len(self._curves)))
    return max(epsilon(e, self.delta, relation=self.relation, accountant=self.accountant)
               for e in self.events(rounds))

  def _group_epsilon(self, group: int, rounds: int) -> float:
    orders, curve = self._curves[group]
    with _guarded("rdp", f"computing epsilon after {rounds} rounds"):
      return float(rdp.compute_epsilon(orders, rounds * curve, self.delta)[0])

  def affordable_rounds(self, budget: float, limit: int) -> int:
    """The most rounds (<= limit) whose epsilon stays within `budget` (bisection; eps grows)."""
    if self.epsilon(limit) <= budget:
      return limit
    lo, hi = 0, limit  # eps(lo) <= budget < eps(hi)
    while hi - lo > 1:
      mid = (lo + hi) // 2
      lo, hi = (mid, hi) if self.epsilon(mid) <= budget else (lo, mid)
    return lo
