"""Experiment configuration: a typed schema, validated before anything runs.

A config is a YAML mapping. The sections `data`, `model`, `algorithm`,
`sampling`, `privacy` and `compression` each pick a registered component by
their selector key (`data.kind`, `model.kind`, `algorithm.name`,
`sampling.scheme`, `privacy.mechanism`, `compression.method`) and are
validated against that component's own config dataclass (see
`fedjax_sim.core.registry`); `engine`, `system`, `eval`, `checkpoint`,
`telemetry` and `sweep` are fixed sections below. `load_config` checks every key and
value: an unknown key, a wrong type or an impossible value raises
`ConfigError` naming the key (as a dotted path) and what is allowed, and a
key that belongs to another component names that component. `--set a.b=value` overrides are parsed as
YAML scalars and validated the same way. Then every chosen component's rules
(`Component.checks`) run against the whole config.

A top-level `imports:` list names Python modules imported before
validation: that is how a researcher's own components (registered in their
own module) become reachable from YAML.

A `sweep:` section (seeds and a grid of values of other keys) makes the
config a family of members, each a complete config of its own
(`sweep_members`); every member is validated here exactly like a config
file, and `runner/sweep.py` runs them.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import os
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
  max_chunk_mib: float | None = option(
      None, check=(lambda x: x is None or x > 0, "must be > 0, or null for the backend's default"),
      help="streamed example data per compiled call, in MiB (bounds buffers); null: 24 on CPU "
           "(under glibc's 32 MiB mmap ceiling), 256 on accelerators")
  bucketing: bool = True
  prefetch: int = option(3, check=(positive, "must be >= 1"))
  encode_cache_mib: float = option(8.0, check=(non_negative, "must be >= 0 (0 = no sub-blocks)"),
                                   help="MiB of client updates encoded together (cache-sized)")
  client_loop: Literal["auto", "vmap", "map"] = option(
      "auto", help="a block's clients batched (vmap) or one at a time (map); auto: on CPU, map "
                   "for convolutional models or a local step of >= 10 MFLOP")
  data_placement: Literal["auto", "device", "host"] = option(
      "auto", help="training data resident on the devices (gathered in the compiled round) or "
                   "streamed from the host each round; auto: resident when the copy takes at "
                   "most half the available memory")
  small_contractions: int | None = option(
      None, check=(lambda x: x is None or x >= 0, "must be >= 0 (0 = off), or null"),
      help="vmapped per-client products contracting at most this many elements (a small "
           "batch's weight gradient) run as unrolled sums of products; null: 16 on CPU, 0 "
           "(off) on accelerators")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  every: int = option(5, check=(non_negative, "must be >= 0 (0 = only at the end)"))
  max_clients: int = option(0, check=(non_negative, "must be >= 0 (0 = all)"))


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
  every: int = option(10, check=(non_negative, "must be >= 0 (0 = only after the last round)"))
  keep: int = option(2, check=(positive, "must be >= 1"))


@dataclasses.dataclass(frozen=True)
class MlflowSection:
  """The optional MLflow sink (`pip install 'fedjax_sim[mlflow]'`), see `runner.telemetry`."""

  enabled: bool = option(False, help="log params, per-round metrics and artifacts to MLflow")
  tracking_uri: str = option("", help="MLflow tracking URI ('': $MLFLOW_TRACKING_URI, else "
                                      "MLflow's default)")
  experiment: str = option("fedjax_sim", check=(bool, "must not be empty"),
                           help="MLflow experiment name (created if missing)")
  run_name: str = option("", help="MLflow run name ('': the output folder's name)")


def _positive_or_null(x):
  return x is None or x > 0


@dataclasses.dataclass(frozen=True)
class DeviceSection:
  """The simulated client device of the cost model (`runner/cost.py`): a preset, or its numbers
  overridden one by one."""

  preset: Literal["phone", "laptop", "iot"] = option(
      "phone", help="named device profile (compute rate, downlink, uplink), see runner/cost.py")
  gflops: float | None = option(None, check=(_positive_or_null, "must be > 0, or null"),
                                help="sustained GFLOP/s of local training (null: the preset's)")
  downlink_mbps: float | None = option(None, check=(_positive_or_null, "must be > 0, or null"),
                                       help="Mbit/s down (null: the preset's)")
  uplink_mbps: float | None = option(None, check=(_positive_or_null, "must be > 0, or null"),
                                     help="Mbit/s up (null: the preset's)")


@dataclasses.dataclass(frozen=True)
class TelemetrySection:
  """Where a run reports besides metrics.jsonl, and the per-round KPIs (`runner/telemetry.py`)."""

  tensorboard: bool = option(True, help="TensorBoard event files in <output_dir>/tensorboard/")
  mlflow: MlflowSection = option(default_factory=MlflowSection)
  cost_model: bool = option(True, help="per-client FLOPs, bytes and simulated device seconds "
                                       "per round (compiles one client's step once)")
  device: DeviceSection = option(default_factory=DeviceSection)
  anomaly_mad_k: float = option(6.0, check=(positive, "must be > 0"),
                                help="a client update norm above median + k * MAD is an anomaly")
  anomaly_scale: Literal["linear", "log"] = option(
      "linear", help="apply the median + k * MAD rule to the norms or to their logarithms")


def _distinct_seeds(seeds) -> bool:
  return len(set(seeds)) == len(seeds) and all(0 <= s < 2**32 for s in seeds)


@dataclasses.dataclass(frozen=True)
class SweepSection:
  """Members: every seed x every combination of the grid's values (`runner/sweep.py`)."""

  seeds: tuple[int, ...] = option((), check=(_distinct_seeds, "must be distinct seeds in "
                                                             "[0, 2**32)"),
                                  help="one member per seed (empty: the config's seed)")
  grid: dict = option(default_factory=dict,
                      help="{dotted.config.key: [values, ...]}: scalar keys, every combination "
                           "of values is a member")
  mode: Literal["auto", "loop", "vmap"] = option(
      "auto", help="members one after another in one process (loop), or their rounds as one "
                   "compiled program vmapped over them (vmap: members that differ only in the "
                   "seed, float keys of the algorithm section and host-only keys such as "
                   "system.*); auto: vmap where eligible and "
                   "a round is small (dispatch-bound), else loop")

  @property
  def active(self) -> bool:
    return bool(self.seeds or self.grid)


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
  telemetry: TelemetrySection = option(default_factory=TelemetrySection)
  sweep: SweepSection = option(default_factory=SweepSection,
                               help="run the config once per member (see runner/sweep.py)")
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
    if config.sweep.active:
      sweep_members(config)  # every member validated like a config file
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
  _check_telemetry(c.telemetry)
  run_checks(c)


def _check_telemetry(t: TelemetrySection) -> None:
  """The MLflow sink needs its package (an extra), checked before anything runs."""
  if not t.mlflow.enabled:
    return
  import importlib.util
  try:
    found = importlib.util.find_spec("mlflow") is not None
  except (ImportError, ValueError):  # a broken install, or a module blocked in sys.modules
    found = False
  if not found:
    raise ConfigError("telemetry.mlflow.enabled = true needs the mlflow package, which is not "
                      "installed: pip install 'fedjax_sim[mlflow]' (or set "
                      "telemetry.mlflow.enabled = false).")


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
  if only_applicable and isinstance(config, Config) and not config.sweep.active:
    del d["sweep"]  # a plain run's config.yaml has no sweep section
  return d


# -- sweeps -----------------------------------------------------------------------

# Keys a grid may not vary, and why.
_NOT_GRID_KEYS = {
    "seed": "list the seeds in sweep.seeds",
    "output_dir": "each member writes to <output_dir>/members/<its name>/",
    "imports": "every member imports the same modules",
    "sweep": "a member is a plain run",
}

_SCALARS = (bool, int, float, str, type(None))


@dataclasses.dataclass(frozen=True)
class SweepMember:
  """One member of a sweep.

  Attributes:
    name: its folder name under `<output_dir>/members/` (from its values,
      filesystem-safe).
    values: `{"seed": seed, grid key: value, ...}`, as the member's config
      resolves them (e.g. `1e-3` read as the number 0.001).
    config: the member's complete config (no sweep section; `output_dir`
      its folder): what a separate run of the member would be given.
  """

  name: str
  values: dict
  config: Config


def _format_value(v) -> str:
  if isinstance(v, bool):
    return "true" if v else "false"
  if v is None:
    return "null"
  return repr(v) if isinstance(v, float) else str(v)


def member_label(values: dict) -> str:
  """`seed=1,algorithm.client_optimizer.learning_rate=0.1`: a member's values as text."""
  return ",".join(f"{k}={_format_value(v)}" for k, v in values.items())


def _safe_name(label: str) -> str:
  import hashlib
  import re
  name = re.sub(r"[^A-Za-z0-9._,=+-]", "_", label)
  if name.startswith("."):
    name = "_" + name[1:]
  if len(name) > 180:  # file names stop at 255 bytes; the digest keeps long names unique
    name = name[:160] + "~" + hashlib.sha256(label.encode()).hexdigest()[:12]
  return name


def _check_grid(grid: dict) -> dict[str, tuple]:
  """The grid's keys and value lists, each checked for shape (not yet against the schema)."""
  out = {}
  for key, values in grid.items():
    where = f"sweep.grid[{key!r}]"
    if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
      raise ConfigError(f"{where}: a grid key is a dotted config key, e.g. "
                        "algorithm.client_optimizer.learning_rate.")
    top = key.split(".")[0]
    if top in _NOT_GRID_KEYS:
      raise ConfigError(f"{where}: {key!r} cannot be swept in the grid: {_NOT_GRID_KEYS[top]}.")
    if not isinstance(values, (list, tuple)) or not values:
      raise ConfigError(f"{where}: expected a non-empty list of values, got {values!r}.")
    for v in values:
      if not isinstance(v, _SCALARS):
        raise ConfigError(f"{where}: {v!r} is not a scalar; a grid sweeps scalar keys (numbers, "
                          "strings, true/false, null).")
    seen = [repr(v) for v in values]
    if len(set(seen)) != len(seen):
      raise ConfigError(f"{where} lists a value twice: {list(values)!r}.")
    out[key] = tuple(values)
  return out


def _set_grid_value(raw: dict, key: str, value) -> None:
  node = raw
  parts = key.split(".")
  for i, k in enumerate(parts[:-1]):
    node = node.setdefault(k, {})
    if not isinstance(node, dict):
      raise ConfigError(f"sweep.grid[{key!r}]: {'.'.join(parts[:i + 1])!r} is not a section.")
  node[parts[-1]] = value


def _lookup(d: dict, key: str, default):
  node = d
  for k in key.split("."):
    if not isinstance(node, dict) or k not in node:
      return default
    node = node[k]
  return node


def sweep_members(c: Config) -> list[SweepMember]:
  """The members of a config's sweep, each validated exactly like a config file.

  Members are every seed of `sweep.seeds` (or the config's `seed`) times every
  combination of the grid's values, seed-major, the grid's keys in the given
  order. A member's config is the config with `--set seed=S --set key=value
  ...` applied (from its resolved form, `to_dict`), no sweep section, and
  `output_dir` = `<output_dir>/members/<name>`.

  Raises:
    ConfigError: a bad grid key (unknown, with the closest one; not a scalar;
      one that cannot vary) or value, named under `sweep.grid`; or a member
      that fails validation, named by its values.
  """
  sw = c.sweep
  if not sw.active:
    return []
  grid = _check_grid(sw.grid)
  base = to_dict(c)
  del base["sweep"]
  # Each key and value alone first, so that a misspelt key is reported once, as itself.
  for key, values in grid.items():
    for v in values:
      raw = _deep_copy(base)
      _set_grid_value(raw, key, v)
      try:
        config_from_dict(raw, check_rules=False)
      except ConfigError as e:
        raise ConfigError(f"sweep.grid: {e}") from e
  members, names = [], set()
  for seed in (sw.seeds or (c.seed,)):
    for combo in itertools.product(*grid.values()):
      given = {"seed": seed, **dict(zip(grid, combo))}
      raw = _deep_copy(base)
      for key, v in given.items():
        _set_grid_value(raw, key, v)
      try:
        config = config_from_dict(raw)
      except ConfigError as e:
        raise ConfigError(f"sweep member {member_label(given)}: {e}") from e
      resolved = to_dict(config)
      values = {k: _lookup(resolved, k, v) for k, v in given.items()}
      name = base_name = _safe_name(member_label(values))
      n = 2
      while name in names:  # distinct values that print alike on a file system
        name, n = f"{base_name}~{n}", n + 1
      names.add(name)
      config = dataclasses.replace(config, output_dir=os.path.join(c.output_dir, "members", name))
      members.append(SweepMember(name, values, config))
  return members


__all__ = ["CheckpointSection", "Config", "ConfigError", "DeviceSection", "EngineSection",
           "EvalConfig", "MlflowSection", "OptimizerConfig", "SweepMember", "SweepSection",
           "SystemSection", "TelemetrySection", "applicable_keys", "build_optimizer",
           "config_differences", "config_from_dict", "load_config", "member_label",
           "parse_overrides", "prune_inapplicable", "sweep_members", "to_dict"]
