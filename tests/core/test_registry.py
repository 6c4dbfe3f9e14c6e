"""The registry's contract: one registration per name, typed configs, clear errors."""

import dataclasses

import pytest

from fedjax_sim.core.registry import ALGORITHMS, FAMILIES, Family, run_checks
from fedjax_sim.core.schema import ConfigError, option, parse_section


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Base:
  common: int = 1

  @property
  def pick(self):
    return _FAMILY.name_of(self)


_FAMILY = Family("widget", "pick", _Base, "plain", "build(cfg, ctx) -> str")


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Fancy(_Base):
  shine: float = option(0.5, check=(lambda x: 0 <= x <= 1, "must be in [0, 1]"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Dull(_Base):
  grey: int = 3


_FAMILY.register("plain")(lambda cfg, ctx: "plain")
_FAMILY.register("fancy", _Fancy, sparkly=True)(lambda cfg, ctx: f"fancy {cfg.shine}")
_FAMILY.register("dull", _Dull)(lambda cfg, ctx: "dull")


def test_a_section_is_parsed_into_the_selected_components_dataclass():
  cfg = _FAMILY.parse({"pick": "fancy", "shine": 0.25, "common": 7}, "widget")
  assert type(cfg) is _Fancy and cfg.shine == 0.25 and cfg.common == 7
  assert cfg.pick == "fancy"
  assert _FAMILY.of(cfg).build(cfg, None) == "fancy 0.25"
  assert _FAMILY.of(cfg).traits == {"sparkly": True}
  assert type(_FAMILY.parse({}, "widget")) is _Base  # the default component


def test_errors_name_the_key_the_component_and_the_fix():
  with pytest.raises(ConfigError, match=r"widget.shine = 2.0 must be in \[0, 1\]"):
    _FAMILY.parse({"pick": "fancy", "shine": 2}, "widget")
  with pytest.raises(ConfigError, match=r"widget.grey is set but widget.pick = 'fancy' ignores it "
                                        r"\(it applies only to widget.pick = 'dull'\)"):
    _FAMILY.parse({"pick": "fancy", "grey": 1}, "widget")
  with pytest.raises(ConfigError, match=r"Did you mean 'shine'\?"):
    _FAMILY.parse({"pick": "fancy", "shnie": 1}, "widget")
  with pytest.raises(ConfigError, match=r"'fency' is not a registered widget pick. Did you mean "
                                        r"'fancy'\?"):
    _FAMILY.parse({"pick": "fency"}, "widget")


def test_registration_rules():
  with pytest.raises(ValueError, match="registered already"):
    _FAMILY.register("fancy", _Fancy)(lambda cfg, ctx: None)

  @dataclasses.dataclass(frozen=True, kw_only=True)
  class _Other(_Base):
    pass

  with pytest.raises(TypeError, match="its own config dataclass"):
    _FAMILY.register("bare")(lambda cfg, ctx: None)  # only the default may use the base
  with pytest.raises(TypeError, match="is the config of 'dull'"):
    _FAMILY.register("dull2", _Dull)(lambda cfg, ctx: None)

  @dataclasses.dataclass(frozen=True)
  class _NotASubclass:
    x: int = 0

  with pytest.raises(TypeError, match="extending _Base"):
    _FAMILY.register("alien", _NotASubclass)(lambda cfg, ctx: None)
  _FAMILY.register("other", _Other)(lambda cfg, ctx: "v1")
  _FAMILY.register("other", _Other, replace=True)(lambda cfg, ctx: "v2")
  assert _FAMILY.get("other").build(None, None) == "v2"


def test_sections_nest_in_a_parent_dataclass_through_the_family_parser():
  @dataclasses.dataclass(frozen=True)
  class Parent:
    widget: _Base = option(default_factory=_FAMILY.default_config)

  p = parse_section(Parent, {"widget": {"pick": "dull", "grey": 9}}, "")
  assert isinstance(p.widget, _Dull) and p.widget.grey == 9
  with pytest.raises(ConfigError, match="widget: expected a mapping"):
    parse_section(Parent, {"widget": 3}, "")


def test_every_family_of_the_run_config_is_registered_with_its_defaults():
  assert set(FAMILIES) == {"algorithm", "data", "model", "sampling", "privacy", "compression"}
  from fedjax_sim.runner import config
  assert config.Config  # importing it imports (and so registers) every component package
  for family in FAMILIES.values():
    assert family.default in family.names()
    default = family.default_config()
    assert family.name_of(default) == family.default
  assert {"fedavg", "fedprox", "scaffold", "fednova", "feddyn", "qffl", "ditto", "fedadam",
          "fedyogi", "fedadagrad", "fedavgm"} <= set(ALGORITHMS.names())


def test_component_rules_run_against_the_whole_config():
  from fedjax_sim.runner.config import Config, config_from_dict
  c = config_from_dict({"algorithm": {"name": "ditto"}})
  run_checks(c)
  bad = dataclasses.replace(c, data=dataclasses.replace(c.data, holdout_clients=0.5))
  with pytest.raises(ConfigError, match="holdout_clients = 0"):
    run_checks(bad)  # declared by ditto, not by the runner
  assert isinstance(Config(), Config)


def test_user_level_dp_reads_the_sampling_schemes_declared_accounting():
  from fedjax_sim.core.registry import SAMPLERS, SamplingSection
  from fedjax_sim.core.sampling import make_sampler
  from fedjax_sim.runner.config import config_from_dict

  @dataclasses.dataclass(frozen=True, kw_only=True)
  class _Mine(SamplingSection):
    clients_per_round: int = 5

  @dataclasses.dataclass(frozen=True, kw_only=True)
  class _MineAccounted(_Mine):
    pass

  def build(cfg, ctx):
    return make_sampler("uniform", ctx.seed, ctx.train.num_clients, cfg.clients_per_round, 0.0)

  SAMPLERS.register("test_unaccounted", _Mine, replace=True)(build)
  SAMPLERS.register("test_accounted", _MineAccounted, accounted_as="uniform", replace=True)(build)
  dp = {"privacy": {"mechanism": "dp_fedavg", "noise_multiplier": 1.0},
        "algorithm": {"weighting": "uniform"}}
  with pytest.raises(ConfigError, match="dp-accounting has no event for this sampling"):
    config_from_dict({**dp, "sampling": {"scheme": "test_unaccounted"}})
  c = config_from_dict({**dp, "sampling": {"scheme": "test_accounted"}})
  assert SAMPLERS.trait(c.sampling, "accounted_as") == "uniform"


def test_a_key_only_one_component_has_implies_it_and_open_sections_keep_extra_keys():
  @dataclasses.dataclass(frozen=True, kw_only=True)
  class _Made(_Base):
    extra_keys = "kwargs"
    factory: str = ""
    kwargs: dict = option(default_factory=dict)

  family = Family("gadget", "pick", _Base, "plain", "build(cfg, ctx) -> str")
  family.register("plain")(lambda cfg, ctx: "plain")
  family.register("made", _Made, implied_by="factory")(lambda cfg, ctx: cfg.kwargs)
  cfg = family.parse({"factory": "pkg:fn", "width": 3, "common": 2}, "gadget")
  assert isinstance(cfg, _Made) and cfg.kwargs == {"width": 3} and cfg.common == 2
  assert family.parse({"common": 2}, "gadget") == _Base(common=2)  # no implying key: default
  with pytest.raises(ConfigError, match="width"):  # a closed section still refuses it
    family.parse({"pick": "plain", "width": 3}, "gadget")
  from fedjax_sim.core.schema import to_plain
  assert to_plain(cfg) == {"common": 2, "factory": "pkg:fn", "width": 3}
