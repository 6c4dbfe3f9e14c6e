import math

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from fedjax_sim.privacy import (PrivacyError, calibrate_noise_multiplier, dp_fedavg_event,
                                epsilon, epsilons)


def test_epsilon_equals_a_direct_dp_accounting_composition():
  # Written independently: the events and accountants built by hand.
  z, q, T, delta = 1.3, 0.02, 150, 1e-6
  by_hand = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), T)
  ours = dp_fedavg_event(z, T, sampling="poisson", num_clients=5000, rate=q)
  assert ours == by_hand
  assert epsilon(ours, delta, sampling="poisson") == \
      rdp.RdpAccountant().compose(by_hand).get_epsilon(delta)
  assert epsilon(ours, delta, sampling="poisson", accountant="pld") == \
      pld.PLDAccountant().compose(by_hand).get_epsilon(delta)
  fixed = dp_accounting.SelfComposedDpEvent(
      dp_accounting.SampledWithoutReplacementDpEvent(5000, 100, dp_accounting.GaussianDpEvent(z)),
      T)
  relation = dp_accounting.NeighboringRelation.REPLACE_ONE
  assert epsilon(dp_fedavg_event(z, T, sampling="uniform", num_clients=5000,
                                 clients_per_round=100), delta, sampling="uniform") == \
      rdp.RdpAccountant(neighboring_relation=relation).compose(fixed).get_epsilon(delta)


def _analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
  """Balle & Wang 2018: the exact epsilon of a sensitivity-1 Gaussian mechanism at delta."""
  phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))
  d = lambda e: phi(-e * sigma + 1 / (2 * sigma)) - math.exp(e) * phi(-e * sigma - 1 / (2 * sigma))
  lo, hi = 0.0, 100.0
  for _ in range(200):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if d(mid) > delta else (lo, mid)
  return hi


@pytest.mark.parametrize("z,rounds", [(1.0, 1), (2.0, 16), (0.8, 4)])
def test_full_participation_matches_the_analytic_gaussian_mechanism(z, rounds):
  """With q = 1, T rounds of noise z are one Gaussian with sigma = z / sqrt(T)."""
  eps = epsilon(dp_fedavg_event(z, rounds, sampling="poisson", num_clients=10, rate=1.0), 1e-5,
                sampling="poisson", accountant="pld")
  exact = _analytic_gaussian_epsilon(z / math.sqrt(rounds), 1e-5)
  assert eps == pytest.approx(exact, rel=2e-3)
  # RDP is an upper bound, looser than the exact value.
  assert epsilon(dp_fedavg_event(z, rounds, sampling="poisson", num_clients=10, rate=1.0), 1e-5,
                 sampling="poisson") >= exact


def test_calibration_hits_the_target_and_grows_with_rounds():
  kw = dict(sampling="poisson", num_clients=10_000, rate=0.01)
  previous = 0.0
  for rounds in (100, 400, 1600):
    z = calibrate_noise_multiplier(2.0, 1e-5, rounds, **kw)
    eps = epsilon(dp_fedavg_event(z, rounds, **kw), 1e-5, sampling="poisson")
    assert eps <= 2.0 + 1e-6 and eps > 1.9  # within the calibration's tolerance, from below
    assert epsilon(dp_fedavg_event(0.97 * z, rounds, **kw), 1e-5, sampling="poisson") > 2.0
    assert z > previous
    previous = z


def test_no_noise_means_no_privacy():
  ev = dp_fedavg_event(0.0, 10, sampling="poisson", num_clients=100, rate=0.1)
  assert math.isinf(epsilon(ev, 1e-5, sampling="poisson"))


@pytest.mark.parametrize("kwargs,needle", [
    (dict(noise_multiplier=-1.0, rounds=1, sampling="poisson", num_clients=10, rate=0.1),
     "noise_multiplier must be >= 0"),
    (dict(noise_multiplier=1.0, rounds=1, sampling="poisson", num_clients=10, rate=0.0),
     "rate in (0, 1]"),
    (dict(noise_multiplier=1.0, rounds=1, sampling="uniform", num_clients=10,
          clients_per_round=11), "clients_per_round <= num_clients"),
    (dict(noise_multiplier=1.0, rounds=1, sampling="shuffled", num_clients=10),
     "sampling must be one of"),
])
def test_bad_settings_are_rejected(kwargs, needle):
  z, rounds = kwargs.pop("noise_multiplier"), kwargs.pop("rounds")
  with pytest.raises(PrivacyError, match=needle.replace("(", r"\(").replace(")", r"\)")):
    dp_fedavg_event(z, rounds, **kwargs)


def test_delta_and_unsupported_accountants_are_refused_not_guessed():
  ev = dp_fedavg_event(1.0, 10, sampling="uniform", num_clients=100, clients_per_round=10)
  with pytest.raises(PrivacyError, match=r"delta must be in \(0, 1\)"):
    epsilon(ev, 1.0, sampling="uniform")
  with pytest.raises(PrivacyError, match="PLD accountant .* cannot account uniform"):
    epsilon(ev, 1e-5, sampling="uniform", accountant="pld")
  both = epsilons(ev, 1e-5, sampling="uniform")
  assert both["pld"] is None and both["rdp"] > 0
  with pytest.raises(PrivacyError, match="target_epsilon"):
    calibrate_noise_multiplier(0.0, 1e-5, 10, sampling="poisson", num_clients=10, rate=0.1)
