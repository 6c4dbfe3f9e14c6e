"""Experiment configuration: a typed schema, validated before anything runs.

A config is a YAML mapping. The sections `data`, `model`, `algorithm`,
`sampling`, `privacy` and `compression` each pick a registered component by
their selector key (`data.kind`, `model.kind`, `algorithm.name`,
`sampling.scheme`, `privacy.mechanism`, `compression.method`) and are
validated against that component's own config dataclass (see
`fedjax_sim.core.registry`); `engine`, `system`, `eval` and `checkpoint` are
fixed sections below. `load_config` checks every key and value: an unknown
key, a wrong type or an impossible value raises `ConfigError` naming the key
(as a dotted path) and what is allowed, and a key that belongs to another
component names that component. `--set a.b=value` overrides are parsed as
YAML scalars and validated the same way. Then every chosen component's rules
(`Component.checks`) run against the whole config.

A top-level `imports:` list names Python modules imported before
validation: that is how a researcher's own components (registered in their
own module) become reachable from YAML.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Literal

import yaml

# Importing the component packages registers their components.
import fedjax_sim.algorithms  # noqa: F401
import fedjax_sim.compression  # noqa: F401
import fedjax_sim.datasets  # noqa: F401
import fedjax_sim.models  # noqa: F401
import fedjax_sim.privacy  # noqa: F401
import fedjax_sim.runner.script_parts  # noqa: F401  (data/model/algorithm given by a script)
from fedjax_sim.core.registry import (ALGORITHMS, COMPRESSION, DATASETS, FAMILIES, MODELS, PRIVACY,
                                      SAMPLERS, AlgorithmSection, CompressionSection, DataSection,
                                      ModelSection, PrivacySection, SamplingSection, run_checks)
from fedjax_sim.core.schema import (ConfigError, OptimizerConfig, build_optimizer, non_negative,
                                    option, parse_section, positive, to_plain)



@dataclasses.dataclass(frozen=True)
class SystemSection:
  """Dropouts and stragglers (see `fedjax_sim.core.heterogeneity`)."""

  dropout: float = option(0.0, check=(lambda x: 0 <= x < 1, "must be in [0, 1) (1 would drop "
                                       "every client of every round)"))
  dropout_concentration: float | None = option(None, check=(
      lambda x: x is None or x > 0, "must be > 0, or null for equal dropout probabilities"))
  straggler_fraction: float = option(0.0, check=(lambda x: 0 <= x <= 1, "must be in [0, 1]"))
  straggler_policy: Literal["drop", "partial"] = "drop"
  straggler_work: Literal["steps", "epochs"] = "steps"
  straggler_concentration: float | None = option(None, check=(
      lambda x: x is None or x > 0, "must be > 0, or null for a fixed fraction per round"))


@dataclasses.dataclass(frozen=True)
class EngineSection:
  block_size: int = option(64, check=(positive, "must be >= 1"))
  max_chunk_mib: float = option(24.0, check=(positive, "must be > 0"),
                                help="example data per compiled call, in MiB (bounds buffers)")
  bucketing: bool = True
  prefetch: int = option(3, check=(positive, "must be >= 1"))
  encode_cache_mib: float = option(8.0, check=(non_negative, "must be >= 0 (0 = no sub-blocks)"),
                                   help="MiB of client updates encoded together (cache-sized)")
  client_loop: Literal["auto", "vmap", "map"] = option(
      "auto", help="a block's clients batched (vmap) or one at a time (map); auto: on CPU, map "
                   "for convolutional models or a local step of >= 10 MFLOP")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  every: int = option(5, check=(non_negative, "must be >= 0 (0 = only at the end)"))
  max_clients: int = option(0, check=(non_negative, "must be >= 0 (0 = all)"))


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
  every: int = option(10, check=(non_negative, "must be >= 0 (0 = only after the last round)"))
  keep: int = option(2, check=(positive, "must be >= 1"))


@dataclasses.dataclass(frozen=True)
class Config:
  seed: int = option(0, check=(lambda x: 0 <= x < 2**32, "must be in [0, 2**32)"))
  rounds: int = option(10, check=(positive, "must be >= 1"))
  output_dir: str = "runs/default"
  imports: tuple[str, ...] = option((), help="modules to import first (they register components)")
  data: DataSection = option(default_factory=DATASETS.default_config)
  model: ModelSection = option(default_factory=MODELS.default_config)
  algorithm: AlgorithmSection = option(default_factory=ALGORITHMS.default_config)
  sampling: SamplingSection = option(default_factory=SAMPLERS.default_config)
  engine: EngineSection = option(default_factory=EngineSection)
  system: SystemSection = option(default_factory=SystemSection)
  privacy: PrivacySection = option(default_factory=PRIVACY.default_config)
  compression: CompressionSection = option(default_factory=COMPRESSION.default_config)
  checkpoint: CheckpointSection = option(default_factory=CheckpointSection)
  eval: EvalConfig = option(default_factory=EvalConfig)
  progress: bool = True


# -- parsing ----------------------------------------------------------------------


def _set_dotted(raw: dict, dotted: str, value) -> None:
  keys = dotted.split(".")
  node = raw
  for k in keys[:-1]:
    node = node.setdefault(k, {})
    if not isinstance(node, dict):
      raise ConfigError(f"--set {dotted}: {k!r} is not a section.")
  node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
  out = []
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set rounds=3.")
    key, text = item.split("=", 1)
    try:
      value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError as e:
      raise ConfigError(f"--set {item!r}: cannot parse the value: {e}") from e
    out.append((key.strip(), value))
  return out


def config_from_dict(raw: dict | None, overrides: list[str] = (), *,
                     check_rules: bool = True) -> Config:
  """Validates a raw mapping (plus `key=value` overrides) into a `Config`.

  `check_rules=False` checks keys, types and ranges only, not the rules
  between sections (for a caller that replaces sections first).
  """
  raw = {} if raw is None else raw
  if not isinstance(raw, dict):
    raise ConfigError("The config must be a YAML mapping at the top level.")
  raw = _deep_copy(raw)
  for key, value in parse_overrides(list(overrides)):
    _set_dotted(raw, key, value)
  _import_modules(raw)
  config = parse_section(Config, raw, "")
  if check_rules:
    _cross_checks(config)
  return config


def load_config(path: str, overrides: list[str] = ()) -> Config:
  """Reads and validates a YAML config file."""
  try:
    with open(path) as f:
      raw = yaml.safe_load(f)
  except FileNotFoundError as e:
    raise ConfigError(f"Config file {path!r} does not exist.") from e
  except yaml.YAMLError as e:
    raise ConfigError(f"Config file {path!r} is not valid YAML: {e}") from e
  return config_from_dict(raw, overrides)


def _deep_copy(x):
  if isinstance(x, dict):
    return {k: _deep_copy(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_deep_copy(v) for v in x]
  return x


def _import_modules(raw: dict) -> None:
  names = raw.get("imports", ())
  if isinstance(names, str):
    names = [names]
  if not isinstance(names, (list, tuple)):
    raise ConfigError(f"imports: expected a list of module names, got {names!r}.")
  for name in names:
    if not isinstance(name, str) or not name:
      raise ConfigError(f"imports: {name!r} is not a module name.")
    try:
      importlib.import_module(name)
    except ImportError as e:
      raise ConfigError(f"imports: cannot import {name!r} ({e}); install it or put its folder on "
                        "PYTHONPATH.") from e


def _cross_checks(c: Config) -> None:
  """Rules between fixed sections; the components' own rules follow (`run_checks`)."""
  population = c.data.population()
  if population is not None and "clients_per_round" in _field_names(c.sampling):
    held_out = (max(1, int(round(c.data.holdout_clients * population)))
                if c.data.holdout_clients > 0 else 0)
    train_clients = population - held_out
    if c.sampling.clients_per_round > train_clients:
      raise ConfigError(
          f"sampling.clients_per_round = {c.sampling.clients_per_round} but only {train_clients} "
          f"clients train (data.num_clients = {population}, data.holdout_clients = "
          f"{c.data.holdout_clients}); lower clients_per_round or raise num_clients.")
  sy = c.system
  if sy.straggler_policy == "drop" and sy.straggler_fraction == 1 and \
      sy.straggler_concentration is None:
    raise ConfigError("system.straggler_fraction = 1.0 with straggler_policy = 'drop' drops "
                      "every client of every round; lower it, or keep stragglers' partial work "
                      "with straggler_policy = 'partial'.")
  run_checks(c)


def _field_names(section) -> set[str]:
  return {f.name for f in dataclasses.fields(section)}


def applicable_keys(section: str, selector_value: str) -> set[str] | None:
  """The keys of a component section when its selector has this value (None: a fixed section)."""
  family = FAMILIES.get(section)
  if family is None:
    return None
  return {family.selector} | {f.name for f in dataclasses.fields(family.get(selector_value).config)}


def _unused(config_cls, values: dict) -> set[str]:
  """Keys a component's own settings switch off (its optional `unused_keys(values)`)."""
  hook = getattr(config_cls, "unused_keys", None)
  return set(hook(values)) if hook is not None else set()


def prune_inapplicable(raw: dict) -> dict:
  """A raw config without the keys its chosen components do not have (reads the
  config.yaml of runs written when every section listed every key)."""
  raw = _deep_copy(raw)
  for name, node in raw.items():
    family = FAMILIES.get(name)
    if family is None or not isinstance(node, dict):
      continue
    selected = family.selected(node)
    if not isinstance(selected, str) or selected not in family:
      continue  # validation names it
    config_cls = family.get(selected).config
    keep = applicable_keys(name, selected) - _unused(config_cls, node)
    open_field = getattr(config_cls, "extra_keys", None)  # its undeclared keys are arguments
    raw[name] = {k: v for k, v in node.items()
                 if k in keep or (open_field and k not in applicable_keys(name, selected))}
  return raw


def config_differences(a: dict, b: dict, prefix: str = ""):
  """`(dotted key, value in a, value in b)` for every leaf where two config dicts differ."""
  if isinstance(a, dict) and isinstance(b, dict):
    for k in sorted(set(a) | set(b)):
      yield from config_differences(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
  elif a != b:
    yield prefix, a, b


def to_dict(config, *, only_applicable: bool = True) -> dict:
  """A plain, YAML-serialisable dict of a config (tuples become lists).

  Each component section lists its selector and exactly its component's keys,
  less those its own settings leave without effect (its `unused_keys` hook:
  e.g. unset noise and budget settings, adaptive-clipping keys without
  adaptive clipping); `config_from_dict` reads the result back to the same
  `Config`. An empty `imports` is left out too (`only_applicable=False` keeps
  everything).
  """
  d = {}
  for f in dataclasses.fields(config):
    value = getattr(config, f.name)
    family = FAMILIES.get(f.name) if isinstance(config, Config) else None
    plain = to_plain(value)
    if family is not None:
      unused = _unused(type(value), plain) if only_applicable else set()
      plain = {family.selector: family.name_of(value),
               **{k: v for k, v in plain.items() if k not in unused}}
    d[f.name] = plain
  if only_applicable and isinstance(config, Config) and not d["imports"]:
    del d["imports"]
  return d


__all__ = ["CheckpointSection", "Config", "ConfigError", "EngineSection", "EvalConfig",
           "OptimizerConfig", "SystemSection", "applicable_keys", "build_optimizer",
           "config_differences", "config_from_dict", "load_config", "parse_overrides",
           "prune_inapplicable", "to_dict"]
