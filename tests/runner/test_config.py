import glob
import os

import pytest
import yaml

from fedjax_sim.runner.config import (Config, ConfigError, build_optimizer, config_from_dict,
                                      load_config, to_dict)
from tests.conftest import REPO


def _error(raw, overrides=()) -> str:
  with pytest.raises(ConfigError) as e:
    config_from_dict(raw, list(overrides))
  return str(e.value)


# -- unknown keys ---------------------------------------------------------------


def test_unknown_top_level_key_names_it_and_the_allowed_keys():
  msg = _error({"roundz": 3})
  assert "'roundz'" in msg
  assert "Did you mean 'rounds'?" in msg
  for allowed in ("rounds", "seed", "output_dir", "sampling"):
    assert allowed in msg


def test_unknown_nested_key_gives_dotted_path_and_suggestion():
  msg = _error({"data": {"num_client": 5}})
  assert "'data.num_client'" in msg
  assert "Did you mean 'num_clients'?" in msg
  assert "examples_per_client" in msg  # the keys allowed in the section


def test_unknown_key_without_close_match_has_no_hint():
  msg = _error({"sampling": {"zzzzzz": 1}})
  assert "'sampling.zzzzzz'" in msg and "Did you mean" not in msg
  assert "clients_per_round" in msg


# -- types --------------------------------------------------------------------


@pytest.mark.parametrize("raw, key, expected", [
    ({"rounds": "3"}, "rounds", "an integer"),
    ({"rounds": True}, "rounds", "an integer"),
    ({"data": {"num_clients": False}}, "data.num_clients", "an integer"),
    ({"seed": [1, 2]}, "seed", "an integer"),
    ({"algorithm": {"client_optimizer": {"learning_rate": [0.1]}}},
     "algorithm.client_optimizer.learning_rate", "a number"),
    ({"algorithm": {"client_optimizer": {"learning_rate": True}}},
     "algorithm.client_optimizer.learning_rate", "a number"),
    ({"output_dir": ["a"]}, "output_dir", "a string"),
    ({"progress": "yes"}, "progress", "true/false"),
    ({"model": {"hidden": 128}}, "model.hidden", "a list of an integer"),
    ({"model": {"hidden": [8, "wide"]}}, "model.hidden[1]", "an integer"),
    ({"model": {"kind": "perceptron"}}, "model.kind", "'mlp'"),
    ({"data": 3}, "data", "mapping"),
    ({"engine": {"bucketing": "wide"}}, "engine.bucketing", "true/false"),
    ({"engine": {"max_chunk_mib": "big"}}, "engine.max_chunk_mib", "a number"),
])
def test_wrong_type_names_key_and_expected_type(raw, key, expected):
  msg = _error(raw)
  assert msg.startswith(key + ":"), msg
  assert expected in msg


def test_int_is_accepted_for_a_float_and_becomes_a_float():
  c = config_from_dict({"algorithm": {"client_optimizer": {"learning_rate": 1}}})
  assert c.algorithm.client_optimizer.learning_rate == 1.0
  assert isinstance(c.algorithm.client_optimizer.learning_rate, float)


def test_top_level_must_be_a_mapping():
  assert "mapping" in _error([1, 2])


# -- impossible values ----------------------------------------------------------


@pytest.mark.parametrize("raw, key, allowed", [
    ({"algorithm": {"client_optimizer": {"learning_rate": -0.1}}},
     "algorithm.client_optimizer.learning_rate", "must be > 0"),
    ({"algorithm": {"server_optimizer": {"learning_rate": 0}}},
     "algorithm.server_optimizer.learning_rate", "must be > 0"),
    ({"rounds": 0}, "rounds", "must be >= 1"),
    ({"sampling": {"scheme": "poisson", "rate": 0.0}}, "sampling.rate", "(0, 1]"),
    ({"sampling": {"scheme": "poisson", "rate": 1.5}}, "sampling.rate", "(0, 1]"),
    ({"sampling": {"scheme": "poisson", "rate": -0.2}}, "sampling.rate", "(0, 1]"),
    ({"engine": {"max_chunk_mib": 0}}, "engine.max_chunk_mib", "must be > 0"),
    ({"engine": {"block_size": 0}}, "engine.block_size", "must be >= 1"),
    ({"engine": {"encode_cache_mib": -1}}, "engine.encode_cache_mib", "must be >= 0"),
    ({"data": {"test_fraction": 1.0}}, "data.test_fraction", "(0, 1)"),
    ({"data": {"holdout_clients": 1.0}}, "data.holdout_clients", "[0, 1)"),
    ({"algorithm": {"name": "fedavgm", "server_momentum": 1.0}}, "algorithm.server_momentum",
     "[0, 1)"),
    ({"data": {"num_classes": 1}}, "data.num_classes", "must be >= 2"),
])
def test_impossible_value_names_key_and_allowed_range(raw, key, allowed):
  msg = _error(raw)
  assert msg.startswith(key + " = "), msg
  assert allowed in msg


def test_boundary_values_are_accepted():
  c = config_from_dict({"sampling": {"scheme": "poisson", "rate": 1.0}, "rounds": 1,
                        "engine": {"bucketing": False}})
  assert c.sampling.rate == 1.0 and c.rounds == 1 and c.engine.bucketing is False
  assert config_from_dict({"engine": {"max_chunk_mib": 0.5}}).engine.max_chunk_mib == 0.5


def test_clients_per_round_above_num_clients_is_rejected():
  msg = _error({"data": {"num_clients": 10}, "sampling": {"clients_per_round": 11}})
  assert "sampling.clients_per_round = 11" in msg and "data.num_clients = 10" in msg
  c = config_from_dict({"data": {"num_clients": 10}, "sampling": {"clients_per_round": 10}})
  assert c.sampling.clients_per_round == 10


def test_clients_per_round_counts_only_training_clients_when_holding_out():
  # 100 clients, 20% held out: 80 train.
  raw = {"data": {"num_clients": 100, "holdout_clients": 0.2}}
  msg = _error({**raw, "sampling": {"clients_per_round": 81}})
  assert "sampling.clients_per_round = 81" in msg and "only 80 clients train" in msg
  assert "data.holdout_clients" in msg
  config_from_dict({**raw, "sampling": {"clients_per_round": 80}})


def test_poisson_sampling_has_no_clients_per_round_to_check():
  # 10 clients at rate 0.5: the default clients_per_round (10) is not checked
  # against the population, and giving it is an error (Poisson ignores it).
  c = config_from_dict({"data": {"num_clients": 5}, "sampling": {"scheme": "poisson",
                                                                  "rate": 0.5}})
  assert c.sampling.scheme == "poisson"
  assert "ignores it" in _error({"sampling": {"scheme": "poisson", "clients_per_round": 50}})


def test_tiny_holdout_still_holds_out_one_client():
  # split_clients(0.004) on 100 clients holds out 1 client, leaving 99 to train.
  _error({"data": {"num_clients": 100, "holdout_clients": 0.004},
          "sampling": {"clients_per_round": 100}})


def test_non_positive_layer_width_is_rejected():
  msg = _error({"model": {"hidden": [8, 0]}})
  assert "model.hidden" in msg


def test_negative_seed_is_rejected():
  msg = _error({"seed": -1})
  assert "seed" in msg


# -- optimizers -----------------------------------------------------------------


def test_unknown_optax_optimizer_name():
  msg = _error({"algorithm": {"client_optimizer": {"name": "adamm"}}})
  assert "algorithm.client_optimizer.name = 'adamm' is not an optax optimizer" in msg
  assert "adam" in msg.split("Did you mean")[1]


def test_optax_function_without_learning_rate_is_not_an_optimizer():
  msg = _error({"algorithm": {"server_optimizer": {"name": "apply_updates"}}})
  assert "algorithm.server_optimizer.name = 'apply_updates'" in msg
  assert "learning_rate" in msg


def test_unknown_optimizer_kwarg_names_key_and_accepted_kwargs():
  msg = _error({"algorithm": {"client_optimizer": {"name": "sgd", "momentom": 0.9}}})
  assert "'algorithm.client_optimizer.momentom'" in msg
  assert "optax.sgd accepts" in msg and "momentum" in msg and "nesterov" in msg


def test_valid_optax_kwargs_are_accepted_and_reach_the_optimizer():
  c = config_from_dict({"algorithm": {
      "client_optimizer": {"name": "sgd", "learning_rate": 0.1, "momentum": 0.9},
      "server_optimizer": {"name": "adam", "learning_rate": 0.01, "b1": 0.8}}})
  assert c.algorithm.client_optimizer.kwargs == {"momentum": 0.9}
  assert c.algorithm.server_optimizer.kwargs == {"b1": 0.8}
  assert c.algorithm.server_optimizer.name == "adam"
  # The explicit `kwargs:` form is the same config.
  c2 = config_from_dict({"algorithm": {
      "client_optimizer": {"name": "sgd", "learning_rate": 0.1, "kwargs": {"momentum": 0.9}},
      "server_optimizer": {"name": "adam", "learning_rate": 0.01, "kwargs": {"b1": 0.8}}}})
  assert c2 == c


def test_build_optimizer_matches_optax_with_the_same_arguments():
  import jax.numpy as jnp
  import numpy as np
  import optax
  c = config_from_dict({"algorithm": {
      "server_optimizer": {"name": "adam", "learning_rate": 0.01, "b1": 0.5}}})
  mine = build_optimizer(c.algorithm.server_optimizer)
  ref = optax.adam(0.01, b1=0.5)
  params = jnp.array([1.0, -2.0])
  grads = [jnp.array([0.3, -1.0]), jnp.array([2.0, 0.5])]
  s1, s2 = mine.init(params), ref.init(params)
  for g in grads:
    u1, s1 = mine.update(g, s1, params)
    u2, s2 = ref.update(g, s2, params)
    np.testing.assert_allclose(u1, u2, rtol=1e-6)
  # b1=0.5 is honoured: the default b1=0.9 gives a different second update.
  d = optax.adam(0.01)
  sd = d.init(params)
  for g in grads:
    ud, sd = d.update(g, sd, params)
  assert not np.allclose(ud, u2)


# -- overrides and files -----------------------------------------------------------


def test_set_overrides_are_parsed_as_yaml_scalars():
  c = config_from_dict({"rounds": 10, "sampling": {"scheme": "poisson"}},
                       ["rounds=3", "output_dir=out/quick", "sampling.rate=0.01"])
  assert c.rounds == 3
  assert c.output_dir == "out/quick"
  assert c.sampling.rate == 0.01 and c.sampling.scheme == "poisson"


def test_set_override_wins_over_the_file(tmp_path):
  path = tmp_path / "c.yaml"
  path.write_text("rounds: 7\ndata: {num_clients: 50}\n")
  c = load_config(str(path), ["data.num_clients=60", "rounds=2"])
  assert c.rounds == 2 and c.data.num_clients == 60


def test_set_override_without_equals_is_an_error():
  msg = _error({}, ["rounds"])
  assert "--set 'rounds'" in msg and "key=value" in msg


def test_set_override_is_validated_like_the_file():
  msg = _error({}, ["rounds=three"])
  assert msg.startswith("rounds:") and "an integer" in msg
  msg = _error({}, ["sampling.rat=0.1"])
  assert "'sampling.rat'" in msg and "Did you mean 'rate'?" in msg


def test_set_override_into_a_scalar_is_an_error():
  msg = _error({"rounds": 3}, ["rounds.x=1"])
  assert "rounds" in msg and "not a section" in msg


def test_missing_config_file(tmp_path):
  path = str(tmp_path / "nope.yaml")
  with pytest.raises(ConfigError, match="does not exist") as e:
    load_config(path)
  assert path in str(e.value)


def test_config_file_that_is_not_yaml(tmp_path):
  path = tmp_path / "bad.yaml"
  path.write_text("rounds: [1, 2\nseed: {\n")
  with pytest.raises(ConfigError, match="not valid YAML") as e:
    load_config(str(path))
  assert str(path) in str(e.value)


def test_empty_config_file_gives_the_defaults(tmp_path):
  path = tmp_path / "empty.yaml"
  path.write_text("")
  assert load_config(str(path)) == Config()


# -- round trip and shipped configs ----------------------------------------------


def test_to_dict_round_trips_through_config_from_dict_and_yaml():
  c = config_from_dict({
      "seed": 3, "rounds": 4, "output_dir": "x/y",
      "data": {"kind": "leaf_synthetic", "num_clients": 30, "alpha": 1.0, "iid": True,
               "holdout_clients": 0.1},
      "model": {"kind": "cnn", "channels": [2, 3], "dense": 5},
      "algorithm": {"name": "fedavg", "weighting": "uniform",
                    "client_optimizer": {"name": "sgd", "learning_rate": 0.2, "momentum": 0.5},
                    "server_optimizer": {"name": "adam", "learning_rate": 0.01, "b2": 0.99}},
      "sampling": {"scheme": "poisson", "rate": 0.25},
      "engine": {"bucketing": False, "block_size": 4},
      "eval": {"every": 2, "max_clients": 7},
      "progress": False})
  d = to_dict(c)
  assert d["model"]["channels"] == [2, 3]  # plain lists, YAML-safe
  assert d["algorithm"]["client_optimizer"]["momentum"] == 0.5
  assert config_from_dict(d) == c
  assert config_from_dict(yaml.safe_load(yaml.safe_dump(d))) == c
  assert config_from_dict(to_dict(Config())) == Config()


_SHIPPED = sorted(glob.glob(os.path.join(REPO, "experiments", "configs", "**", "*.y*ml"),
                            recursive=True))


def test_there_are_shipped_configs():
  assert any(p.endswith("quickstart.yaml") for p in _SHIPPED)


@pytest.mark.parametrize("path", _SHIPPED, ids=lambda p: os.path.relpath(p, REPO))
def test_every_shipped_config_validates(path):
  c = load_config(path)
  assert isinstance(c, Config)


def test_fedopt_names_imply_their_paper_exact_server_optimizer_with_tau():
  c = config_from_dict({"algorithm": {"name": "fedyogi", "tau": 0.01,
                                      "server_optimizer": {"learning_rate": 0.03, "b1": 0.5}}})
  so = c.algorithm.server_optimizer
  assert so.name == "fed_yogi" and so.learning_rate == 0.03 and so.kwargs == {"b1": 0.5}
  assert c.algorithm.tau == 0.01
  m = config_from_dict({"algorithm": {"name": "fedavgm", "server_momentum": 0.7}}).algorithm
  assert m.server_optimizer.name == "sgd" and m.server_momentum == 0.7


@pytest.mark.parametrize("raw,needle", [
    ({"algorithm": {"name": "fedadam", "server_optimizer": {"name": "yogi"}}},
     "conflicts with algorithm.name = 'fedadam'"),
    ({"algorithm": {"name": "fedadam", "server_optimizer": {"eps": 0.1}}}, "algorithm.tau"),
    ({"algorithm": {"name": "scaffold", "client_optimizer": {"name": "adam"}}}, "plain sgd"),
    ({"algorithm": {"name": "scaffold", "client_optimizer": {"momentum": 0.9}}}, "plain sgd"),
    ({"algorithm": {"name": "fedprox", "mu": -0.1}}, "algorithm.mu = -0.1 must be >= 0"),
    ({"algorithm": {"name": "fedadam", "tau": 0}}, "algorithm.tau = 0.0 must be > 0"),
    ({"algorithm": {"name": "qffl", "client_optimizer": {"name": "adam"}}}, "plain sgd"),
    ({"algorithm": {"name": "qffl", "q": -1}}, "algorithm.q = -1.0 must be >= 0"),
    ({"algorithm": {"name": "ditto"}, "data": {"holdout_clients": 0.2}}, "holdout_clients = 0"),
    ({"algorithm": {"name": "ditto", "lam": -1}}, "algorithm.lam = -1.0 must be >= 0"),
])
def test_algorithm_specific_errors(raw, needle):
  assert needle in _error(raw)


@pytest.mark.parametrize("raw,needle", [
    ({"system": {"dropout": 1.5}}, "system.dropout = 1.5 must be in [0, 1)"),
    ({"system": {"straggler_fraction": -0.1}}, "system.straggler_fraction = -0.1 must be in [0, 1]"),
    ({"system": {"straggler_policy": "keep"}}, "system.straggler_policy: 'keep' is not allowed"),
    ({"system": {"dropout_concentration": 0}}, "system.dropout_concentration = 0.0 must be > 0"),
    ({"system": {"dropuot": 0.1}}, "Did you mean 'dropout'?"),
])
def test_system_section_errors(raw, needle):
  assert needle in _error(raw)


def test_straggler_concentration_must_be_positive():
  assert "system.straggler_concentration = 0.0 must be > 0" in _error(
      {"system": {"straggler_concentration": 0}})


@pytest.mark.parametrize("raw,needle", [
    ({"seed": 2**40}, "seed = 1099511627776 must be in [0, 2**32)"),
    ({"algorithm": {"client_optimizer": {"name": "sgd", "momentum": "abc"}}},
     "algorithm.client_optimizer: optax.sgd rejected its arguments (momentum='abc')"),
    ({"algorithm": {"name": "fednova", "client_optimizer": {"momentum": 0.9, "nesterov": True}}},
     "sgd, optionally with momentum"),
    ({"algorithm": {"name": "feddyn", "server_optimizer": {"name": "adam"}}},
     "algorithm.server_optimizer is set but algorithm.name = 'feddyn' ignores it"),
    ({"algorithm": {"name": "fedavgm", "server_optimizer": {"nesterov": True}}},
     "'fedavgm' uses SGD with algorithm.server_momentum"),
    ({"algorithm": {"name": "fednova", "weighting": "uniform"}},
     "algorithm.weighting is set but algorithm.name = 'fednova' ignores it"),
])
def test_settings_an_algorithm_would_ignore_or_crash_on_are_rejected(raw, needle):
  assert needle in _error(raw)


# -- scientific notation, unused keys, resolved config ---------------------------------


@pytest.mark.parametrize("text,expected", [("1e-3", 1e-3), ("1E6", 1e6), ("+2e-1", 0.2)])
def test_scientific_notation_is_a_number_in_files_and_overrides(tmp_path, text, expected):
  # PyYAML (YAML 1.1) reads 1e-3 as the string "1e-3"; a number field takes it.
  path = tmp_path / "c.yaml"
  path.write_text(f"algorithm:\n  mu: {text}\n  name: fedprox\n")
  assert isinstance(yaml.safe_load(path.read_text())["algorithm"]["mu"], str)
  assert load_config(str(path)).algorithm.mu == pytest.approx(expected)
  c = config_from_dict({}, ["privacy.mechanism=dp_fedavg", "privacy.noise_multiplier=1",
                            "algorithm.weighting=uniform", "sampling.scheme=poisson",
                            f"privacy.clip_norm={text}"])
  assert c.privacy.clip_norm == pytest.approx(expected)


def test_scientific_notation_for_an_integer_field_and_still_no_quoted_numbers():
  assert config_from_dict({}, ["data.num_clients=1e3"]).data.num_clients == 1000
  assert "expected an integer" in _error({}, ["data.num_clients=1.5e0"])
  assert "expected an integer" in _error({"rounds": "3"})
  assert "expected a number" in _error({"algorithm": {"name": "fedprox", "mu": "lots"}})


def test_non_finite_numbers_are_rejected():
  assert "finite" in _error({"algorithm": {"client_optimizer": {"learning_rate": float("inf")}}})


def test_dropout_of_one_is_rejected_before_any_round():
  assert "would drop every client" in _error({"system": {"dropout": 1.0}})


@pytest.mark.parametrize("raw,needle", [
    ({"algorithm": {"name": "fedavg", "mu": 0.1}},
     "algorithm.mu is set but algorithm.name = 'fedavg' ignores it (it applies only to "
     "algorithm.name = 'fedprox')"),
    ({"algorithm": {"name": "fedprox", "lam": 0.1}}, "applies only to algorithm.name = 'ditto'"),
    ({"algorithm": {"tau": 0.1}}, "'fedadagrad', 'fedadam', 'fedyogi'"),
    ({"model": {"kind": "logreg", "hidden": [3]}}, "model.hidden is set but model.kind"),
    ({"data": {"kind": "gaussian_mixture", "alpha": 1.0}}, "data.alpha is set but data.kind"),
    ({"data": {"kind": "packed", "path": "x", "num_clients": 5}}, "data.num_clients is set"),
])
def test_a_key_the_chosen_component_ignores_is_an_error(raw, needle):
  assert needle in _error(raw)


def test_resolved_config_lists_only_what_applies():
  c = config_from_dict({"algorithm": {"name": "fedprox", "mu": 0.5},
                        "model": {"kind": "logreg"}})
  d = to_dict(c)
  assert d["algorithm"]["mu"] == 0.5
  for unused in ("lam", "q", "alpha", "tau", "server_momentum"):
    assert unused not in d["algorithm"]
  assert d["model"] == {"kind": "logreg"}
  assert d["privacy"] == {"mechanism": "none"}
  assert d["compression"] == {"method": "none"}
  assert "alpha" not in d["data"] and "examples_per_client" in d["data"]
  assert config_from_dict(d) == c
  full = to_dict(c, only_applicable=False)
  assert full["privacy"] == {"mechanism": "none"} and full["imports"] == []


def test_fedopt_resolved_config_names_the_paper_exact_optimizer():
  c = config_from_dict({"algorithm": {"name": "fedadam", "server_optimizer": {"b2": 0.9}}})
  d = to_dict(c)
  assert d["algorithm"]["server_optimizer"]["name"] == "fed_adam"
  assert to_dict(config_from_dict(d)) == d


def test_dp_with_data_proportional_sampling_is_refused():
  assert "dp-accounting has no event for this sampling (e.g. sampling weighted by data size)" in _error(
      {"privacy": {"mechanism": "dp_fedavg", "noise_multiplier": 1.0},
       "algorithm": {"weighting": "uniform"}, "sampling": {"scheme": "data_proportional"}})


def test_scientific_notation_in_optimizer_arguments():
  c = config_from_dict({"algorithm": {"client_optimizer": {"name": "adam", "eps": "1e-8",
                                                           "learning_rate": "1e-3"}}})
  assert c.algorithm.client_optimizer.kwargs == {"eps": 1e-8}
  assert c.algorithm.client_optimizer.learning_rate == 1e-3


def test_every_straggler_dropped_is_refused():
  assert "drops every client of every round" in _error(
      {"system": {"straggler_fraction": 1.0, "straggler_policy": "drop"}})
  config_from_dict({"system": {"straggler_fraction": 1.0, "straggler_policy": "partial"}})


@pytest.mark.parametrize("raw,needle", [
    ({"sampling": {"scheme": "uniform", "rate": 0.1}}, "sampling.rate is set but sampling.scheme"),
    ({"sampling": {"scheme": "poisson", "clients_per_round": 10}},
     "sampling.clients_per_round is set but sampling.scheme = 'poisson'"),
    ({"privacy": {"clip_norm": 1.0}}, "privacy.clip_norm is set but privacy.mechanism = 'none'"),
    ({"compression": {"method": "sign", "bits": 8}},
     "compression.bits is set but compression.method = 'sign' ignores it"),
])
def test_a_key_given_at_its_default_value_is_still_an_ignored_key(raw, needle):
  assert needle in _error(raw)


def test_an_old_style_resolved_config_with_every_key_still_reads():
  from fedjax_sim.runner.config import prune_inapplicable
  c = config_from_dict({"algorithm": {"name": "fedprox", "mu": 0.3},
                        "sampling": {"scheme": "poisson", "rate": 0.2}})
  full = to_dict(c)  # config.yaml before this rule listed every key of every component:
  full["algorithm"].update(lam=0.1, q=1.0, alpha=0.01, tau=1e-3, server_momentum=0.9)
  full["sampling"]["clients_per_round"] = 10
  with pytest.raises(ConfigError):
    config_from_dict(full)
  assert config_from_dict(prune_inapplicable(full)) == c


def test_a_privacy_key_the_mechanism_ignores_is_an_error_even_at_its_default():
  base = {"mechanism": "dp_fedavg", "noise_multiplier": 1.0}
  dp = {"algorithm": {"weighting": "uniform"}, "sampling": {"scheme": "poisson"}}
  assert "privacy.tree_restart is set but privacy.mechanism = 'dp_fedavg' ignores it (it applies " \
      "only to privacy.mechanism = 'dp_ftrl')" in \
      _error({**dp, "privacy": {**base, "tree_restart": "epoch"}})
  assert "applies only with privacy.adaptive_clipping = true" in \
      _error({**dp, "privacy": {**base, "target_quantile": 0.5}})


def test_pruning_keeps_a_factorys_keyword_arguments_and_reads_the_implied_kind():
  from fedjax_sim.runner.config import prune_inapplicable
  raw = {"data": {"factory": "pkg.mod:make", "n": 5, "num_classes": 3},
         "model": {"kind": "factory", "factory": "pkg.mod:net", "width": 8, "hidden": [4]}}
  pruned = prune_inapplicable(raw)
  assert pruned["data"] == raw["data"]
  # `hidden` belongs to no key of `factory` but is (like `width`) a keyword argument.
  assert pruned["model"] == raw["model"]
  assert prune_inapplicable({"model": {"kind": "mlp", "width": 8}})["model"] == {"kind": "mlp"}
