"""DP from the config: reports, per-round epsilon, budgets across resume, bad settings."""

import json
import os

import dp_accounting
import pytest
from dp_accounting import rdp

from fedjax_sim.runner.config import ConfigError, config_from_dict
from fedjax_sim.runner.io import read_metrics
from fedjax_sim.runner.privacy import REQUIRED_KEYS
from fedjax_sim.runner.run import RunError, run_experiment

BASE = {
    "seed": 1, "rounds": 4, "progress": False,
    "data": {"kind": "gaussian_mixture", "num_clients": 120, "examples_per_client": 8,
             "num_features": 6, "num_classes": 3},
    "model": {"kind": "logreg"},
    "algorithm": {"name": "fedavg", "batch_size": 4, "weighting": "uniform",
                  "client_optimizer": {"name": "sgd", "learning_rate": 0.1}},
    "sampling": {"scheme": "poisson", "rate": 0.2},
    "engine": {"block_size": 8},
    "eval": {"every": 0},
    "checkpoint": {"every": 1},
}


def _config(out, privacy, **top):
  raw = json.loads(json.dumps(BASE))
  raw.update(top)
  raw["output_dir"] = out
  raw["privacy"] = privacy
  return config_from_dict(raw)


def _quiet(*a, **k):
  pass


def test_dp_fedavg_run_reports_what_dp_accounting_says(tmp_out):
  c = _config(tmp_out, {"mechanism": "dp_fedavg", "clip_norm": 0.5, "noise_multiplier": 1.1,
                        "delta": 1e-4})
  summary = run_experiment(c, log=_quiet)
  report = json.load(open(os.path.join(tmp_out, "privacy_report.json")))
  assert set(REQUIRED_KEYS) <= set(report)
  n = report["num_clients"]
  by_hand = rdp.RdpAccountant().compose(dp_accounting.PoissonSampledDpEvent(
      0.2, dp_accounting.GaussianDpEvent(1.1)), 4).get_epsilon(1e-4)
  assert report["epsilon"] == pytest.approx(by_hand, rel=1e-12)
  assert (report["sampling"], report["sampling_rate"], report["accountant"]) == \
      ("poisson", 0.2, "rdp")
  assert report["clients_per_round"] == pytest.approx(0.2 * n)
  assert report["rounds"] == 4 and report["noise_multiplier"] == 1.1
  assert report["epsilon_by_accountant"]["pld"] < report["epsilon_by_accountant"]["rdp"]
  per_round = [r["dp_epsilon"] for r in read_metrics(os.path.join(tmp_out, "metrics.jsonl"))]
  assert per_round == report["epsilon_per_round"] and per_round[-1] == report["epsilon"]
  assert all(a < b for a, b in zip(per_round, per_round[1:]))
  md = open(os.path.join(tmp_out, "privacy_report.md")).read()
  assert "Assumptions behind the guarantee" in md and "user-level" in md
  assert summary["privacy"]["epsilon"] == report["epsilon"]
  # The metrics the guarantee covers are the noisy release and its post-processing;
  # the raw client statistics are listed as diagnostics, in the JSON and the Markdown.
  assert set(report["covered_metrics"]) == {"round", "dp_epsilon", "dp_clip_norm", "update_norm"}
  for raw in ("train_loss", "participating_clients", "dp_participants", "dp_clipped_fraction"):
    assert raw in report["raw_diagnostic_metrics"] and f"`{raw}`" in md
  assert not set(report["covered_metrics"]) & set(report["raw_diagnostic_metrics"])
  # Intermediate reports skip the other accountant's (slow, for PLD) cross-check.
  from fedjax_sim.runner.privacy import privacy_report
  from fedjax_sim.runner.run import build_experiment
  plan = build_experiment(c).privacy
  records = read_metrics(os.path.join(tmp_out, "metrics.jsonl"))
  quick = privacy_report(plan, records, 4, None, cross_check=False)
  assert quick["epsilon_by_accountant"] == {"rdp": pytest.approx(report["epsilon"], rel=1e-9)}


def test_budget_stops_the_run_and_resume_refuses_to_spend_past_it(tmp_out):
  privacy = {"mechanism": "dp_fedavg", "noise_multiplier": 0.9, "delta": 1e-4,
             "adaptive_clipping": True}
  c = _config(tmp_out, privacy, rounds=6)
  from fedjax_sim.runner.run import build_experiment
  ledger = build_experiment(c).privacy.ledger
  budget = (ledger.epsilon(2) + ledger.epsilon(3)) / 2  # affords exactly 2 rounds
  c = _config(tmp_out, {**privacy, "budget_epsilon": budget}, rounds=6)
  summary = run_experiment(c, log=_quiet)
  records = read_metrics(os.path.join(tmp_out, "metrics.jsonl"))
  assert [r["round"] for r in records] == [1, 2]
  assert "round 3 would spend" in summary["privacy"]["stopped_by_budget"]
  report = json.load(open(os.path.join(tmp_out, "privacy_report.json")))
  assert report["epsilon"] <= budget and report["rounds"] == 2
  assert len(report["clip_norm_trajectory"]) == 2
  assert sorted(os.listdir(os.path.join(tmp_out, "checkpoints")))[-1].endswith("2")
  with pytest.raises(RunError, match="privacy budget is spent"):
    run_experiment(c, resume=True, log=_quiet)
  more = _config(tmp_out, {**privacy, "budget_epsilon": budget}, rounds=10)
  with pytest.raises(RunError, match="privacy budget is spent"):
    run_experiment(more, resume=True, log=_quiet)
  assert len(read_metrics(os.path.join(tmp_out, "metrics.jsonl"))) == 2  # nothing lost


def test_calibrated_noise_is_kept_when_a_resumed_run_grows(tmp_out):
  privacy = {"mechanism": "dp_fedavg", "target_epsilon": 5.0, "delta": 1e-4}
  run_experiment(_config(tmp_out, privacy, rounds=2), log=_quiet)
  first = json.load(open(os.path.join(tmp_out, "privacy_report.json")))
  assert first["epsilon"] == pytest.approx(5.0, rel=0.02)
  run_experiment(_config(tmp_out, privacy, rounds=3), resume=True, log=_quiet)
  grown = json.load(open(os.path.join(tmp_out, "privacy_report.json")))
  assert grown["noise_multiplier"] == first["noise_multiplier"]
  assert grown["rounds"] == 3 and grown["epsilon"] > first["epsilon"]


def test_dp_ftrl_and_local_dp_sgd_run_from_the_config(tmp_out):
  ftrl = _config(tmp_out + "_ftrl", {"mechanism": "dp_ftrl", "noise_multiplier": 2.0,
                                     "delta": 1e-4, "tree_restart": 2},
                 sampling={"scheme": "shuffle", "clients_per_round": 30})
  run_experiment(ftrl, log=_quiet)
  records = read_metrics(os.path.join(tmp_out + "_ftrl", "metrics.jsonl"))
  assert [r["dp_tree_step"] for r in records] == [1, 2, 1, 2]
  assert [r["participating_clients"] for r in records] == [30] * 4
  report = json.load(open(os.path.join(tmp_out + "_ftrl", "privacy_report.json")))
  assert report["neighboring_relation"] == "REPLACE_SPECIAL" and report["rounds_per_epoch"] == 4
  local = _config(tmp_out + "_local", {"mechanism": "local_dp_sgd", "noise_multiplier": 1.0,
                                       "clip_norm": 1.0, "delta": 1e-3})
  run_experiment(local, log=_quiet)
  report = json.load(open(os.path.join(tmp_out + "_local", "privacy_report.json")))
  assert report["unit"] == "example" and report["epsilon"] > 0
  assert set(report["epsilon_by_client_size"]) == {"6"}  # 8 examples, a quarter held out
  assert report["epsilon"] == max(report["epsilon_by_client_size"].values())
  records = read_metrics(os.path.join(tmp_out + "_local", "metrics.jsonl"))
  assert "train_loss" in records[-1]


@pytest.mark.parametrize("privacy,extra,needle", [
    ({"clip_norm": 2.0}, {}, "privacy.mechanism = 'none'"),
    ({"mechanism": "dp_fedavg"}, {}, "exactly one of privacy.noise_multiplier"),
    ({"mechanism": "dp_fedavg", "noise_multiplier": 1.0, "target_epsilon": 1.0}, {},
     "exactly one"),
    ({"mechanism": "dp_fedavg", "noise_multiplier": -1.0}, {}, "noise_multiplier = -1.0 must be"),
    ({"mechanism": "dp_fedavg", "noise_multiplier": 1.0, "clip_norm": 0.0}, {},
     "clip_norm = 0.0 must be > 0"),
    ({"mechanism": "dp_fedavg", "noise_multiplier": 1.0, "delta": 1.0}, {},
     r"delta = 1.0 must be in \(0, 1\)"),
    ({"mechanism": "dp_ftrl", "noise_multiplier": 1.0}, {}, "sampling.scheme = 'shuffle'"),
    ({"mechanism": "dp_fedavg", "noise_multiplier": 1.0, "accountant": "pld"},
     {"sampling": {"scheme": "uniform", "clients_per_round": 10}}, "PLD accountant cannot"),
    ({"mechanism": "dp_fedavg", "noise_multiplier": 1.0},
     {"algorithm": {"name": "scaffold"}}, "cannot be combined with algorithm.name = 'scaffold'"),
    ({"mechanism": "dp_fedavg", "noise_multiplier": 1.0},
     {"algorithm": {"weighting": "examples"}}, "algorithm.weighting = 'uniform'"),
    ({"mechanism": "dp_fedavg", "noise_multiplier": 1.0, "target_quantile": 0.3}, {},
     "adaptive_clipping = true"),
    ({"mechanism": "local_dp_sgd", "noise_multiplier": 1.0},
     {"algorithm": {"name": "qffl"}}, "not accounted for qffl"),
    ({"mechanism": "dp_ftrl", "noise_multiplier": 1.0, "tree_restart": "weekly"},
     {"sampling": {"scheme": "shuffle", "clients_per_round": 10}}, "tree_restart"),
    ({"mechanism": "dp_fedavg", "noise_mutliplier": 1.0}, {}, "Did you mean 'noise_multiplier'"),
])
def test_bad_privacy_settings_name_the_problem(privacy, extra, needle, tmp_out):
  raw = json.loads(json.dumps(BASE))
  for k, v in extra.items():
    # A new sampling scheme or algorithm name replaces the section (its keys differ).
    raw[k] = v if k == "sampling" or "name" in v else {**raw[k], **v}
  raw["privacy"] = privacy
  with pytest.raises(ConfigError, match=needle):
    config_from_dict(raw)


def test_a_budget_too_small_for_one_round_is_refused(tmp_out):
  c = _config(tmp_out, {"mechanism": "dp_fedavg", "noise_multiplier": 0.5, "delta": 1e-4,
                        "budget_epsilon": 0.01})
  with pytest.raises(RunError, match="does not afford one round"):
    run_experiment(c, log=_quiet)


def test_ftrl_restart_that_straddles_epochs_is_refused(tmp_out):
  c = _config(tmp_out, {"mechanism": "dp_ftrl", "noise_multiplier": 1.0, "tree_restart": 3},
              sampling={"scheme": "shuffle", "clients_per_round": 30})
  with pytest.raises(ConfigError, match="does not divide the epoch length"):
    run_experiment(c, log=_quiet)


def test_resume_without_the_privacy_report_is_refused(tmp_out):
  c = _config(tmp_out, {"mechanism": "local_dp_sgd", "noise_multiplier": 1.0}, rounds=1)
  run_experiment(c, log=_quiet)
  report = json.load(open(os.path.join(tmp_out, "privacy_report.json")))
  assert report["delta"] == pytest.approx((120 * 6) ** -1.1)  # all training examples
  assert any("Not covered" in a for a in report["assumptions"])
  os.remove(os.path.join(tmp_out, "privacy_report.json"))
  with pytest.raises(RunError, match="privacy_report.json is missing"):
    run_experiment(_config(tmp_out, {"mechanism": "local_dp_sgd", "noise_multiplier": 1.0},
                           rounds=2), resume=True, log=_quiet)


# -- calibration failures and utility ---------------------------------------------


def test_noise_that_drowns_the_average_warns_and_is_reported(tmp_out):
  """z = 30 over 0.2 x 120 = 24 expected clients: noise std 1.25 C per coordinate of the mean."""
  import warnings
  from fedjax_sim.runner.privacy import PrivacyUtilityWarning
  from fedjax_sim.runner.run import build_experiment
  c = _config(tmp_out, {"mechanism": "dp_fedavg", "clip_norm": 0.5, "noise_multiplier": 30.0,
                        "delta": 1e-4})
  with pytest.warns(PrivacyUtilityWarning, match=r"std 1\.25 x clip_norm.*lower "
                                                  r"privacy\.noise_multiplier"):
    plan = build_experiment(c).privacy
  assert plan.info["noise_to_signal_bound"] == pytest.approx(30.0 / 24.0)
  assert plan.info["noise_std_on_mean"] == pytest.approx(30.0 * 0.5 / 24.0)
  assert "barely move" in plan.info["utility_warning"]
  calm = _config(tmp_out + "_calm", {"mechanism": "dp_fedavg", "noise_multiplier": 1.1,
                                     "delta": 1e-4})
  with warnings.catch_warnings():
    warnings.simplefilter("error", PrivacyUtilityWarning)
    plan = build_experiment(calm).privacy
  assert plan.info["utility_warning"] is None
  assert plan.info["noise_to_signal_bound"] == pytest.approx(1.1 / 24.0)


def test_a_calibrated_drowning_noise_warns_with_the_calibration_fix(tmp_out):
  from fedjax_sim.runner.privacy import PrivacyUtilityWarning
  c = _config(tmp_out, {"mechanism": "dp_fedavg", "target_epsilon": 0.03, "delta": 1e-4})
  with pytest.warns(PrivacyUtilityWarning, match="raise privacy.target_epsilon, run fewer rounds"):
    summary = run_experiment(c, log=_quiet)
  report = json.load(open(os.path.join(tmp_out, "privacy_report.json")))
  z = report["noise_multiplier"]
  assert z > 24 and report["noise_to_signal_bound"] == pytest.approx(z / 24)
  assert "barely move" in report["utility_warning"]
  assert "Utility warning" in open(os.path.join(tmp_out, "privacy_report.md")).read()
  by_hand = rdp.RdpAccountant().compose(dp_accounting.PoissonSampledDpEvent(
      0.2, dp_accounting.GaussianDpEvent(z)), 4).get_epsilon(1e-4)
  assert 0.0295 < by_hand <= 0.03 + 1e-9
  assert summary["privacy"]["epsilon"] == pytest.approx(by_hand, rel=1e-9)


def test_a_tight_target_with_adaptive_clipping_blames_the_target_not_the_count_noise(tmp_out):
  """Issue: target 1e-6-like settings were told to 'raise clip_count_stddev'."""
  c = _config(tmp_out, {"mechanism": "dp_fedavg", "target_epsilon": 0.05, "delta": 1e-4,
                        "adaptive_clipping": True})
  with pytest.raises(ConfigError, match="target is too tight for this run: raise "
                                        "privacy.target_epsilon") as info:
    run_experiment(c, log=_quiet)
  assert "Raise privacy.clip_count_stddev" not in str(info.value)


def test_an_unreachable_target_is_a_config_error_naming_the_fix(tmp_out):
  c = _config(tmp_out, {"mechanism": "dp_fedavg", "target_epsilon": 1e-6, "delta": 1e-6})
  with pytest.raises(ConfigError, match="out of reach.*Raise privacy.target_epsilon, sample fewer "
                                        "clients per round.*Poisson sampling at rate 0.2"):
    run_experiment(c, log=_quiet)


def test_a_pld_failure_during_planning_is_a_config_error(tmp_out, monkeypatch):
  from dp_accounting import pld

  def boom(*args, **kwargs):
    raise MemoryError("Unable to allocate 38.0 GiB for an array with shape (5097425306,)")

  monkeypatch.setattr(pld.PLDAccountant, "get_epsilon", boom)
  c = _config(tmp_out, {"mechanism": "dp_fedavg", "noise_multiplier": 1.0, "delta": 1e-4,
                        "accountant": "pld"})
  with pytest.raises(ConfigError, match="PLD accountant failed.*MemoryError.*privacy.accountant "
                                        "= 'rdp'"):
    run_experiment(c, log=_quiet)


def test_local_dp_sgd_noise_that_drowns_the_step_warns(tmp_out):
  """sigma = 10 over batches of min(4, 6) = 4 examples: std 2.5 C on each coordinate of a step."""
  from fedjax_sim.runner.privacy import PrivacyUtilityWarning
  from fedjax_sim.runner.run import build_experiment
  c = _config(tmp_out, {"mechanism": "local_dp_sgd", "noise_multiplier": 10.0, "delta": 1e-3})
  with pytest.warns(PrivacyUtilityWarning, match=r"std 2\.5 x clip_norm.*larger batch_size"):
    plan = build_experiment(c).privacy
  assert plan.info["noise_to_signal_bound"] == pytest.approx(2.5)
