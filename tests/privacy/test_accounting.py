import math

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from fedjax_sim.privacy import (PrivacyError, PrivacyLedger, adaptive_clip_noise, calibrate,
                                calibrate_noise_multiplier, dp_fedavg_event, dp_ftrl_event,
                                dp_sgd_event, epsilon, relation_for, tree_sizes)

Rel = dp_accounting.NeighboringRelation
POISSON, UNIFORM = Rel.ADD_OR_REMOVE_ONE, Rel.REPLACE_ONE


def test_epsilon_equals_a_direct_dp_accounting_composition():
  # Written independently: the events and accountants built by hand.
  z, q, T, delta = 1.3, 0.02, 150, 1e-6
  by_hand = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), T)
  ours = dp_fedavg_event(z, T, sampling="poisson", num_clients=5000, rate=q)
  assert ours == by_hand
  assert relation_for("dp_fedavg", "poisson") == POISSON
  assert epsilon(ours, delta, relation=POISSON) == \
      rdp.RdpAccountant().compose(by_hand).get_epsilon(delta)
  assert epsilon(ours, delta, relation=POISSON, accountant="pld") == \
      pld.PLDAccountant().compose(by_hand).get_epsilon(delta)
  # Fixed-size sampling, replace-one: one client moves the clipped sum by up to
  # 2C, so the Gaussian's multiplier per unit of sensitivity is z / 2.
  fixed = dp_accounting.SelfComposedDpEvent(
      dp_accounting.SampledWithoutReplacementDpEvent(5000, 100,
                                                     dp_accounting.GaussianDpEvent(z / 2)), T)
  assert relation_for("dp_fedavg", "uniform") == UNIFORM
  assert epsilon(dp_fedavg_event(z, T, sampling="uniform", num_clients=5000,
                                 clients_per_round=100), delta, relation=UNIFORM) == \
      rdp.RdpAccountant(neighboring_relation=UNIFORM).compose(fixed).get_epsilon(delta)


def test_replace_one_with_everyone_sampled_is_a_gaussian_of_sensitivity_2c():
  """m = N, one round: replacing a client moves the sum by 2C; noise std zC -> sigma = z/2."""
  z = 3.0
  eps = epsilon(dp_fedavg_event(z, 1, sampling="uniform", num_clients=50, clients_per_round=50),
                1e-5, relation=UNIFORM)
  direct = rdp.RdpAccountant().compose(dp_accounting.GaussianDpEvent(z / 2)).get_epsilon(1e-5)
  assert eps == pytest.approx(direct, rel=1e-9)


def test_shuffled_epochs_are_one_gaussian_per_epoch_touched():
  z, n, m = 2.0, 100, 30  # 3 rounds per epoch (10 clients sit each epoch out)
  rs = Rel.REPLACE_SPECIAL
  for rounds, epochs in [(1, 1), (3, 1), (4, 2), (9, 3)]:
    ev = dp_fedavg_event(z, rounds, sampling="shuffle", num_clients=n, clients_per_round=m)
    by_hand = rdp.RdpAccountant(neighboring_relation=rs).compose(
        dp_accounting.GaussianDpEvent(z), epochs).get_epsilon(1e-5)
    assert epsilon(ev, 1e-5, relation=rs) == pytest.approx(by_hand, rel=1e-12)


def test_dp_ftrl_trees_follow_epochs_and_restarts():
  assert tree_sizes(7, 3, "epoch") == [[3], [3], [1]]
  assert tree_sizes(6, 6, 2) == [[2, 2, 2]]
  assert tree_sizes(8, 6, 3) == [[3, 3], [2]]
  assert tree_sizes(4, 6, "none") == [[4]]
  with pytest.raises(PrivacyError, match="does not divide the epoch length"):
    tree_sizes(10, 6, 4)
  with pytest.raises(PrivacyError, match="without restarts"):
    tree_sizes(7, 6, "none")
  # Against dp-accounting's tree event composed by hand: 2 full epochs of 5
  # rounds (restart every epoch) then 2 rounds of a third epoch.
  z, delta = 1.7, 1e-6
  ours = dp_ftrl_event(z, 12, num_clients=50, clients_per_round=10, restart="epoch")
  rs = Rel.REPLACE_SPECIAL
  acc = rdp.RdpAccountant(neighboring_relation=rs)
  acc.compose(dp_accounting.SingleEpochTreeAggregationDpEvent(z, [5]), 2)
  acc.compose(dp_accounting.SingleEpochTreeAggregationDpEvent(z, [2]))
  assert epsilon(ours, delta, relation=relation_for("dp_ftrl", "shuffle")) == \
      pytest.approx(acc.get_epsilon(delta), rel=1e-12)
  with pytest.raises(PrivacyError, match="PLD accountant .* cannot account"):
    epsilon(ours, delta, relation=rs, accountant="pld")


def test_local_dp_sgd_event_is_steps_of_sampled_gaussians():
  ev = dp_sgd_event(1.1, 5, num_examples=40, batch_size=8, steps_per_round=10)
  step = dp_accounting.SampledWithoutReplacementDpEvent(40, 8, dp_accounting.GaussianDpEvent(0.55))
  assert ev == dp_accounting.SelfComposedDpEvent(step, 50)
  small = dp_sgd_event(1.1, 1, num_examples=3, batch_size=8, steps_per_round=1)
  assert small.event.sample_size == 3  # the batch is the whole client


def test_adaptive_clipping_split_is_one_gaussian_of_the_total_multiplier():
  """dp-accounting's own composition of the two releases equals Gaussian(z)."""
  z, sigma_b, q = 1.0, 2.5, 0.05
  z_v = adaptive_clip_noise(z, sigma_b)
  assert z_v > z
  both = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.ComposedDpEvent(
      [dp_accounting.GaussianDpEvent(z_v), dp_accounting.GaussianDpEvent(2 * sigma_b)]))
  single = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
  e_both = rdp.RdpAccountant().compose(both, 100).get_epsilon(1e-5)
  e_single = rdp.RdpAccountant().compose(single, 100).get_epsilon(1e-5)
  assert e_both == pytest.approx(e_single, rel=1e-9)
  with pytest.raises(PrivacyError, match="must exceed noise_multiplier / 2"):
    adaptive_clip_noise(1.0, 0.4)


def test_ledger_budget_is_the_largest_affordable_round_count():
  kw = dict(sampling="poisson", num_clients=1000, rate=0.05)
  ledger = PrivacyLedger(lambda r: [dp_fedavg_event(1.0, r, **kw)], 1e-5, relation=POISSON,
                         accountant="rdp")
  budget = ledger.epsilon(37) + 1e-9
  assert ledger.affordable_rounds(budget, 100) == 37
  assert ledger.affordable_rounds(budget, 20) == 20
  assert ledger.epsilon(0) == 0.0
  with pytest.raises(PrivacyError, match="cannot account"):
    PrivacyLedger(lambda r: [dp_fedavg_event(1.0, r, sampling="uniform", num_clients=10,
                                             clients_per_round=2)], 1e-5, relation=UNIFORM,
                  accountant="pld")


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
                relation=POISSON, accountant="pld")
  exact = _analytic_gaussian_epsilon(z / math.sqrt(rounds), 1e-5)
  assert eps == pytest.approx(exact, rel=2e-3)
  # RDP is an upper bound, looser than the exact value.
  assert epsilon(dp_fedavg_event(z, rounds, sampling="poisson", num_clients=10, rate=1.0), 1e-5,
                 relation=POISSON) >= exact


def test_calibration_hits_the_target_and_grows_with_rounds():
  kw = dict(sampling="poisson", num_clients=10_000, rate=0.01)
  previous = 0.0
  for rounds in (100, 400, 1600):
    z = calibrate_noise_multiplier(2.0, 1e-5, rounds, **kw)
    eps = epsilon(dp_fedavg_event(z, rounds, **kw), 1e-5, relation=POISSON)
    assert eps <= 2.0 + 1e-6 and eps > 1.9  # within the calibration's tolerance, from below
    assert epsilon(dp_fedavg_event(0.97 * z, rounds, **kw), 1e-5, relation=POISSON) > 2.0
    assert z > previous
    previous = z


def test_no_noise_means_no_privacy():
  ev = dp_fedavg_event(0.0, 10, sampling="poisson", num_clients=100, rate=0.1)
  assert math.isinf(epsilon(ev, 1e-5, relation=POISSON))


def test_calibration_of_dp_ftrl_hits_the_target():
  make = lambda z: dp_ftrl_event(z, 40, num_clients=200, clients_per_round=20)
  rs = relation_for("dp_ftrl", "shuffle")
  z = calibrate(make, 4.0, 1e-5, relation=rs)
  assert 3.9 < epsilon(make(z), 1e-5, relation=rs) <= 4.0 + 1e-6


@pytest.mark.parametrize("kwargs,needle", [
    (dict(noise_multiplier=-1.0, rounds=1, sampling="poisson", num_clients=10, rate=0.1),
     "noise_multiplier must be >= 0"),
    (dict(noise_multiplier=1.0, rounds=1, sampling="poisson", num_clients=10, rate=0.0),
     "rate in (0, 1]"),
    (dict(noise_multiplier=1.0, rounds=1, sampling="uniform", num_clients=10,
          clients_per_round=11), "clients_per_round must be in"),
    (dict(noise_multiplier=1.0, rounds=1, sampling="shuffled", num_clients=10),
     "sampling must be one of"),
    (dict(noise_multiplier=1.0, rounds=1, sampling="shuffle", num_clients=10,
          clients_per_round=0), "clients_per_round must be in"),
])
def test_bad_settings_are_rejected(kwargs, needle):
  z, rounds = kwargs.pop("noise_multiplier"), kwargs.pop("rounds")
  with pytest.raises(PrivacyError, match=needle.replace("(", r"\(").replace(")", r"\)")):
    dp_fedavg_event(z, rounds, **kwargs)


def test_delta_and_unsupported_accountants_are_refused_not_guessed():
  ev = dp_fedavg_event(1.0, 10, sampling="uniform", num_clients=100, clients_per_round=10)
  with pytest.raises(PrivacyError, match=r"delta must be in \(0, 1\)"):
    epsilon(ev, 1.0, relation=UNIFORM)
  with pytest.raises(PrivacyError, match="PLD accountant .* cannot account"):
    epsilon(ev, 1e-5, relation=UNIFORM, accountant="pld")
  with pytest.raises(PrivacyError, match="accountant must be one of"):
    epsilon(ev, 1e-5, relation=UNIFORM, accountant="moments")
  with pytest.raises(PrivacyError, match="target_epsilon"):
    calibrate_noise_multiplier(0.0, 1e-5, 10, sampling="poisson", num_clients=10, rate=0.1)


def test_linear_ledger_equals_full_composition_for_every_client_size():
  sizes = (3, 8, 9, 40, 200)
  events = lambda r: [dp_sgd_event(1.2, r, num_examples=n, batch_size=8,
                                   steps_per_round=2 * -(-n // 8)) for n in sizes]
  fast = PrivacyLedger(events, 1e-5, relation=UNIFORM, accountant="rdp", linear=True)
  full = PrivacyLedger(events, 1e-5, relation=UNIFORM, accountant="rdp")
  for rounds in (1, 7, 50):
    by_hand = max(rdp.RdpAccountant(neighboring_relation=UNIFORM).compose(e).get_epsilon(1e-5)
                  for e in events(rounds))
    assert fast.epsilon(rounds) == pytest.approx(by_hand, rel=1e-9)
    assert full.epsilon(rounds) == pytest.approx(by_hand, rel=1e-12)


def test_calibration_over_groups_covers_the_worst_group_exactly():
  sizes = (4, 9, 60)  # n = 9: nearly full batches, twice the steps of n = 4
  make = lambda z: [dp_sgd_event(z, 10, num_examples=n, batch_size=8,
                                 steps_per_round=-(-n // 8)) for n in sizes]
  from fedjax_sim.privacy import calibrate_worst
  z = calibrate_worst(make, 3.0, 1e-5, relation=UNIFORM)
  eps = [epsilon(e, 1e-5, relation=UNIFORM) for e in make(z)]
  assert max(eps) <= 3.0 + 1e-6 and max(eps) > 2.9
  per_group = [calibrate(lambda zz, i=i: make(zz)[i], 3.0, 1e-5, relation=UNIFORM)
               for i in range(3)]
  assert z == pytest.approx(max(per_group), rel=1e-3)


# -- failures, calibration brackets and unreachable targets ---------------------


def _poisson(z, q=0.05, rounds=10):
  return dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)


def test_pld_calibration_never_visits_the_tiny_multipliers_that_exhaust_memory(monkeypatch):
  """1,000 clients at rate 0.05 for 10 rounds: the old bracket started PLD at z = 1e-3 (38 GiB)."""
  seen = []
  compose = pld.PLDAccountant.compose

  def spy(self, event, count=1):
    zs = [e.noise_multiplier for e in _gaussians(event)]
    seen.extend(zs)
    if min(zs) < 0.05:  # stop before the allocation the old code attempted
      raise AssertionError(f"PLD asked for noise multiplier {min(zs)}")
    return compose(self, event, count)

  monkeypatch.setattr(pld.PLDAccountant, "compose", spy)
  delta = 1000 ** -1.1
  z = calibrate_noise_multiplier(3.0, delta, 10, sampling="poisson", num_clients=1000, rate=0.05,
                                 accountant="pld")
  assert min(seen) >= 0.1
  monkeypatch.undo()
  # Checked by a fresh dp-accounting PLD accountant: the target is met, and barely.
  by_hand = lambda zz: pld.PLDAccountant().compose(_poisson(zz)).get_epsilon(delta)
  assert 2.97 < by_hand(z) <= 3.0 + 1e-6
  assert by_hand(0.99 * z) > 3.0
  # PLD is tighter than RDP, so it needs less noise for the same target.
  assert z < rdp_z(3.0, delta)


def rdp_z(target, delta):
  lo, hi = 0.1, 10.0  # bisection on dp-accounting's RDP epsilon, independent of `calibrate`
  for _ in range(60):
    mid = (lo + hi) / 2
    lo, hi = (lo, mid) if rdp.RdpAccountant().compose(_poisson(mid)).get_epsilon(delta) <= \
        target else (mid, hi)
  return hi


def _gaussians(event):
  if isinstance(event, dp_accounting.GaussianDpEvent):
    return [event]
  inner = getattr(event, "event", None)
  return _gaussians(inner) if inner is not None else []


@pytest.mark.parametrize("accountant,cls,error", [
    ("pld", pld.PLDAccountant, MemoryError("Unable to allocate 38.0 GiB for an array")),
    ("rdp", rdp.RdpAccountant, OverflowError("math range error")),
    ("rdp", rdp.RdpAccountant, ValueError("bad orders")),
])
def test_accountant_failures_become_privacy_errors_that_name_the_fix(monkeypatch, accountant, cls,
                                                                     error):
  def boom(*args, **kwargs):
    raise error

  monkeypatch.setattr(cls, "get_epsilon", boom)
  ev = _poisson(1.0)
  needle = f"{accountant.upper()} accountant failed .*{type(error).__name__}.*privacy\\.accountant"
  with pytest.raises(PrivacyError, match=needle) as info:
    epsilon(ev, 1e-5, relation=POISSON, accountant=accountant)
  assert info.value.__cause__ is error
  with pytest.raises(PrivacyError, match=needle):
    calibrate_noise_multiplier(3.0, 1e-5, 10, sampling="poisson", num_clients=1000, rate=0.05,
                               accountant=accountant)
  ledger = PrivacyLedger(lambda r: [_poisson(1.0, rounds=r)], 1e-5, relation=POISSON,
                         accountant=accountant)
  with pytest.raises(PrivacyError, match=needle):
    ledger.epsilon(3)
  if isinstance(error, MemoryError):
    assert "grid grows like 1/z^2" in str(info.value)


def test_failures_of_the_calibration_and_the_linear_ledger_are_privacy_errors(monkeypatch):
  def no_bracket(*args, **kwargs):
    raise dp_accounting.mechanism_calibration.NoBracketIntervalFoundError("no bracket")

  monkeypatch.setattr(dp_accounting, "calibrate_dp_mechanism", no_bracket)
  with pytest.raises(PrivacyError, match="NoBracketIntervalFoundError"):
    calibrate_noise_multiplier(3.0, 1e-5, 10, sampling="poisson", num_clients=1000, rate=0.05)
  monkeypatch.undo()

  def overflow(*args, **kwargs):
    raise OverflowError("(34, 'Numerical result out of range')")

  events = lambda r: [dp_sgd_event(1.0, r, num_examples=20, batch_size=8, steps_per_round=3)]
  ledger = PrivacyLedger(events, 1e-5, relation=UNIFORM, accountant="rdp", linear=True)
  monkeypatch.setattr(rdp, "compute_epsilon", overflow)
  with pytest.raises(PrivacyError, match="OverflowError.*numerically extreme"):
    ledger.epsilon(5)


def test_pld_is_refused_below_its_minimum_noise_multiplier_without_trying():
  with pytest.raises(PrivacyError, match="PLD accountant is not run at noise multiplier 0.01.*"
                                         "privacy.accountant = 'rdp'"):
    epsilon(_poisson(0.01), 1e-5, relation=POISSON, accountant="pld")
  with pytest.raises(PrivacyError, match="not run at noise multiplier"):
    PrivacyLedger(lambda r: [_poisson(0.01, rounds=r)], 1e-5, relation=POISSON, accountant="pld")
  assert math.isinf(epsilon(_poisson(0.0), 1e-5, relation=POISSON, accountant="pld"))


def test_an_unreachable_target_says_so_and_what_to_change():
  kw = dict(sampling="poisson", num_clients=10_000, rate=0.1)
  with pytest.raises(PrivacyError, match="out of reach: it needs a noise multiplier above 10000"
                     ) as info:
    calibrate_noise_multiplier(1e-8, 1e-5, 150, **kw)
  message = str(info.value)
  assert "Raise privacy.target_epsilon" in message and "fewer clients" in message
  assert "fewer rounds" in message and "clip_count_stddev" not in message
  # A smaller search interval: epsilon(z = 2) > 0.5, so z <= 2 cannot reach it.
  make = lambda z: dp_fedavg_event(z, 100, **kw)
  assert epsilon(make(2.0), 1e-5, relation=POISSON) > 0.5
  with pytest.raises(PrivacyError, match="above 2"):
    calibrate(make, 0.5, 1e-5, relation=POISSON, max_noise_multiplier=2.0)


def test_a_tiny_target_within_the_interval_is_calibrated_exactly():
  """epsilon = 0.01 needs z in the hundreds; the result meets it, 1 % less noise does not."""
  kw = dict(sampling="poisson", num_clients=10_000, rate=0.1)
  z = calibrate_noise_multiplier(0.01, 1e-5, 150, **kw)
  by_hand = lambda zz: rdp.RdpAccountant().compose(_poisson(zz, 0.1, 150)).get_epsilon(1e-5)
  assert 100 < z < 10_000
  assert by_hand(z) <= 0.01 * (1 + 1e-9) and by_hand(0.99 * z) > 0.01
