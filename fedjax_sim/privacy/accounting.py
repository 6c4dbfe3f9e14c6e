"""Privacy accounting for user-level DP-FedAvg, by Google's `dp-accounting`.

A run's mechanism is declared as a `dp_accounting.DpEvent`; the accountants
(RDP and PLD) do the arithmetic. Nothing here computes epsilon by hand.

One round of DP-FedAvg with clip norm C and noise multiplier z releases the
sum of clipped client updates plus N(0, (zC)^2 I): a Gaussian mechanism of
sensitivity C applied to a sampled cohort, so T rounds are

  Poisson sampling (rate q):        T x PoissonSampled(q, Gaussian(z))
                                    (add/remove-one neighbouring clients)
  fixed-size uniform sampling (m of N, without replacement):
                                    T x SampledWithoutReplacement(N, m, Gaussian(z))
                                    (replace-one neighbouring clients)

The protected unit is one client's whole data (user-level DP); the server is
trusted to clip and add the noise.

References:
  McMahan, Ramage, Talwar, Zhang. "Learning Differentially Private Recurrent
  Language Models", ICLR 2018 (DP-FedAvg). Mironov 2017 (RDP); Doroshenko
  et al. 2022, "Connect the Dots" (PLD accounting).
"""

from __future__ import annotations

import math

import dp_accounting
from dp_accounting import pld, rdp

SAMPLING = ("poisson", "uniform")
ACCOUNTANTS = ("rdp", "pld")


class PrivacyError(ValueError):
  """A privacy setting is invalid, or no accountant can back the requested number."""


def _check(noise_multiplier: float, rounds: int, sampling: str, num_clients: int,
           clients_per_round: int | None, rate: float | None) -> None:
  if not noise_multiplier >= 0:
    raise PrivacyError(f"noise_multiplier must be >= 0; got {noise_multiplier}.")
  if rounds < 0:
    raise PrivacyError(f"rounds must be >= 0; got {rounds}.")
  if sampling not in SAMPLING:
    raise PrivacyError(f"sampling must be one of {SAMPLING}; got {sampling!r}.")
  if num_clients < 1:
    raise PrivacyError(f"num_clients must be >= 1; got {num_clients}.")
  if sampling == "poisson":
    if rate is None or not 0 < rate <= 1:
      raise PrivacyError(f"Poisson sampling needs a rate in (0, 1]; got {rate}.")
  elif clients_per_round is None or not 1 <= clients_per_round <= num_clients:
    raise PrivacyError(f"uniform sampling needs 1 <= clients_per_round <= num_clients "
                       f"({num_clients}); got {clients_per_round}.")


def dp_fedavg_event(noise_multiplier: float, rounds: int, *, sampling: str, num_clients: int,
                    clients_per_round: int | None = None,
                    rate: float | None = None) -> dp_accounting.DpEvent:
  """The `DpEvent` of `rounds` rounds of DP-FedAvg (see the module docstring)."""
  _check(noise_multiplier, rounds, sampling, num_clients, clients_per_round, rate)
  gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
  if sampling == "poisson":
    one_round = dp_accounting.PoissonSampledDpEvent(rate, gaussian)
  else:
    one_round = dp_accounting.SampledWithoutReplacementDpEvent(num_clients, clients_per_round,
                                                               gaussian)
  return dp_accounting.SelfComposedDpEvent(one_round, rounds)


def neighboring_relation(sampling: str) -> dp_accounting.NeighboringRelation:
  """Add/remove-one for Poisson sampling, replace-one for fixed-size sampling."""
  if sampling == "poisson":
    return dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
  return dp_accounting.NeighboringRelation.REPLACE_ONE


def make_accountant(accountant: str, sampling: str) -> dp_accounting.PrivacyAccountant:
  relation = neighboring_relation(sampling)
  if accountant == "rdp":
    return rdp.RdpAccountant(neighboring_relation=relation)
  if accountant == "pld":
    return pld.PLDAccountant(neighboring_relation=relation)
  raise PrivacyError(f"accountant must be one of {ACCOUNTANTS}; got {accountant!r}.")


def epsilon(event: dp_accounting.DpEvent, delta: float, *, sampling: str,
            accountant: str = "rdp") -> float:
  """Epsilon of `event` at `delta` under the given accountant.

  Raises:
    PrivacyError: delta outside (0, 1), or an accountant that does not support
      the event (e.g. PLD with fixed-size sampling without replacement): the
      number would not be backed by the accountant, so none is returned.
  """
  if not 0 < delta < 1:
    raise PrivacyError(f"delta must be in (0, 1); got {delta}.")
  acc = make_accountant(accountant, sampling)
  if not acc.supports(event):
    raise PrivacyError(f"The {accountant.upper()} accountant of dp-accounting cannot account "
                       f"{sampling} sampling as configured ({event}); use the "
                       f"{'RDP' if accountant == 'pld' else 'PLD'} accountant or Poisson sampling.")
  return float(acc.compose(event).get_epsilon(delta))


def epsilons(event: dp_accounting.DpEvent, delta: float, *, sampling: str) -> dict:
  """Epsilon under every accountant that supports the event (None where none applies)."""
  out = {}
  for name in ACCOUNTANTS:
    try:
      out[name] = epsilon(event, delta, sampling=sampling, accountant=name)
    except PrivacyError:
      out[name] = None
  return out


def calibrate_noise_multiplier(target_epsilon: float, delta: float, rounds: int, *,
                               sampling: str, num_clients: int,
                               clients_per_round: int | None = None, rate: float | None = None,
                               accountant: str = "rdp") -> float:
  """The smallest noise multiplier whose `rounds` rounds cost at most `target_epsilon`.

  Uses `dp_accounting.calibrate_dp_mechanism` (bisection over z with fresh
  accountants), before any training.
  """
  if not target_epsilon > 0 or math.isinf(target_epsilon):
    raise PrivacyError(f"target_epsilon must be a finite number > 0; got {target_epsilon}.")
  if not 0 < delta < 1:
    raise PrivacyError(f"delta must be in (0, 1); got {delta}.")
  kw = dict(sampling=sampling, num_clients=num_clients, clients_per_round=clients_per_round,
            rate=rate)
  probe = dp_fedavg_event(1.0, rounds, **kw)
  if not make_accountant(accountant, sampling).supports(probe):
    raise PrivacyError(f"The {accountant.upper()} accountant cannot account {sampling} "
                       "sampling; calibrate with the other accountant.")
  return float(dp_accounting.calibrate_dp_mechanism(
      lambda: make_accountant(accountant, sampling),
      lambda z: dp_fedavg_event(z, rounds, **kw),
      target_epsilon, delta,
      bracket_interval=dp_accounting.LowerEndpointAndGuess(0.0, 1.0)))
