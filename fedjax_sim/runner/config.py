"""Experiment configuration: a typed schema, validated before anything runs.

A config is a YAML mapping whose sections are the frozen dataclasses below.
`load_config` checks every key and value against them: an unknown key, a wrong
type or an impossible value raises `ConfigError` naming the key (as a dotted
path) and what is allowed. `--set a.b=value` overrides are parsed as YAML
scalars and validated the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import types
import typing
from typing import Any, Literal

import numpy as np
import optax
import yaml


class ConfigError(ValueError):
  """A configuration value is unknown, mistyped or impossible."""


def _positive(x):
  return x > 0


def _non_negative(x):
  return x >= 0


def _fraction_open(x):
  return 0 < x < 1


def _field(default=dataclasses.MISSING, *, check=None, help="", default_factory=dataclasses.MISSING):
  meta = {"check": check, "help": help}
  if default_factory is not dataclasses.MISSING:
    return dataclasses.field(default_factory=default_factory, metadata=meta)
  return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the clients come from.

  kind:
    leaf_synthetic   - Synthetic(alpha, beta) of Li et al. 2020 (FedProx).
    gaussian_mixture - non-IID Gaussian mixture (the benchmark workload).
    npz              - arrays `x`, `y` from an .npz file, partitioned.
    packed           - a folder written by FederatedData.save (optionally mmapped).
  """

  kind: Literal["leaf_synthetic", "gaussian_mixture", "npz", "packed"] = "gaussian_mixture"
  num_clients: int = _field(100, check=(_positive, "must be >= 1"))
  # leaf_synthetic
  alpha: float = _field(0.5, check=(_non_negative, "must be >= 0"))
  beta: float = _field(0.5, check=(_non_negative, "must be >= 0"))
  iid: bool = False
  # gaussian_mixture
  examples_per_client: int = _field(32, check=(_positive, "must be >= 1"))
  num_features: int = _field(64, check=(_positive, "must be >= 1"))
  num_classes: int = _field(10, check=(lambda x: x >= 2, "must be >= 2"))
  label_skew: float = _field(0.5, check=(_positive, "must be > 0 (a Dirichlet concentration)"))
  size_sigma: float = _field(0.0, check=(_non_negative, "must be >= 0 (0 = equal sizes)"))
  max_client_size: int = _field(1024, check=(_positive, "must be >= 1"))
  # npz / packed
  path: str = ""
  partition: Literal["iid", "dirichlet", "shards"] = "dirichlet"
  dirichlet_alpha: float = _field(0.5, check=(_positive, "must be > 0"))
  shards_per_client: int = _field(2, check=(_positive, "must be >= 1"))
  mmap: bool = False
  # evaluation split
  test_fraction: float = _field(0.2, check=(_fraction_open, "must be in (0, 1)"))
  holdout_clients: float = _field(0.0, check=(lambda x: 0 <= x < 1, "must be in [0, 1)"),
                                  help="fraction of clients never trained on; 0 = per-client split")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  kind: Literal["logreg", "mlp", "cnn"] = "mlp"
  hidden: tuple[int, ...] = _field((128,), check=(lambda t: all(v >= 1 for v in t),
                                                  "must list layer widths >= 1"))
  channels: tuple[int, ...] = _field((16, 32), check=(lambda t: len(t) >= 1 and all(
      v >= 1 for v in t), "must list at least one channel count, each >= 1"))
  dense: int = _field(128, check=(_positive, "must be >= 1"))


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Any optax optimizer: `name` is an optax function (sgd, adam, adagrad, yogi, ...);
  the other keys are passed as its keyword arguments and checked against its signature."""

  name: str = "sgd"
  learning_rate: float = _field(0.1, check=(_positive, "must be > 0"))
  kwargs: dict = _field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class AlgorithmConfig:
  name: Literal["fedavg", "fedavgm", "fedprox", "scaffold", "fednova", "feddyn", "qffl",
                "ditto", "fedadam", "fedyogi", "fedadagrad"] = "fedavg"
  client_optimizer: OptimizerConfig = _field(default_factory=OptimizerConfig)
  server_optimizer: OptimizerConfig = _field(
      default_factory=lambda: OptimizerConfig(name="sgd", learning_rate=1.0))
  server_momentum: float = _field(0.9, check=(lambda x: 0 <= x < 1, "must be in [0, 1)"),
                                  help="FedAvgM only")
  mu: float = _field(0.01, check=(_non_negative, "must be >= 0"), help="FedProx proximal weight")
  tau: float = _field(1e-3, check=(_positive, "must be > 0"),
                      help="FedAdam/FedYogi/FedAdagrad adaptivity tau of Reddi et al. 2021: "
                           "the server step is eta * m / (sqrt(v) + tau), v starts at tau^2")
  alpha: float = _field(0.01, check=(_positive, "must be > 0"),
                        help="FedDyn regularization weight")
  q: float = _field(1.0, check=(_non_negative, "must be >= 0"), help="q-FFL fairness parameter")
  lam: float = _field(0.1, check=(_non_negative, "must be >= 0"),
                      help="Ditto personalization strength")
  batch_size: int = _field(8, check=(_positive, "must be >= 1"))
  local_epochs: int = _field(1, check=(_positive, "must be >= 1"))
  shuffle: bool = True
  weighting: Literal["examples", "uniform"] = "examples"


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How each round's cohort is drawn.

  scheme:
    uniform - clients_per_round distinct clients, uniformly.
    poisson - every client independently with probability rate.
    shuffle - epochs: a fresh permutation per epoch, cut into cohorts of
              clients_per_round; nobody takes part twice in one epoch.
    data_proportional - clients_per_round distinct clients, each draw picking
              a client with probability proportional to its number of
              training examples among those not drawn yet: q-FFL's sampling
              (Li et al. 2020), for algorithm.name = qffl as in the paper.
  """

  scheme: Literal["uniform", "poisson", "shuffle", "data_proportional"] = "uniform"
  clients_per_round: int = _field(10, check=(_positive, "must be >= 1"))
  rate: float = _field(0.1, check=(lambda x: 0 < x <= 1, "must be in (0, 1]"),
                       help="Poisson inclusion probability")


@dataclasses.dataclass(frozen=True)
class PrivacySection:
  """Differential privacy (see `fedjax_sim.privacy`).

  mechanism:
    none         - no privacy.
    dp_fedavg    - user-level DP-FedAvg: clip each client's update, Gaussian noise on the sum.
    dp_ftrl      - user-level DP-FTRL: tree-aggregated noise, needs sampling.scheme = shuffle.
    local_dp_sgd - example-level DP-SGD inside every client.
  Exactly one of noise_multiplier and target_epsilon is given: the other is
  found by accounting before training.
  """

  mechanism: Literal["none", "dp_fedavg", "dp_ftrl", "local_dp_sgd"] = "none"
  clip_norm: float = _field(1.0, check=(_positive, "must be > 0"),
                            help="L2 bound of a client's update (an example's gradient for "
                                 "local_dp_sgd); the initial bound if adaptive")
  noise_multiplier: float | None = _field(None, check=(_non_negative, "must be >= 0"),
                                          help="noise std / clip norm")
  target_epsilon: float | None = _field(None, check=(_positive, "must be > 0"),
                                        help="calibrate noise_multiplier for this epsilon")
  delta: float | None = _field(None, check=(_fraction_open, "must be in (0, 1)"),
                               help="default 1/N^1.1 (N clients; N examples in all for "
                                    "local_dp_sgd)")
  budget_epsilon: float | None = _field(None, check=(_positive, "must be > 0"),
                                        help="stop before the round that would exceed it")
  accountant: Literal["rdp", "pld"] = "rdp"
  adaptive_clipping: bool = False
  target_quantile: float = _field(0.5, check=(lambda x: 0 <= x <= 1, "must be in [0, 1]"))
  clip_learning_rate: float = _field(0.2, check=(_positive, "must be > 0"))
  clip_count_stddev: float | None = _field(None, check=(_positive, "must be > 0"),
                                           help="default: expected clients per round / 20")
  tree_restart: str | int = _field("epoch", help="'epoch', 'none' or every N rounds")


@dataclasses.dataclass(frozen=True)
class CompressionSection:
  """Compressed uploads (see `fedjax_sim.compression`).

  method:
    none          - float32 updates.
    quantize      - b-bit unbiased stochastic quantization (bits, block_size, scaling, rotation).
    qsgd          - QSGD with `levels` levels (rotation optional).
    drive         - DRIVE: 1 bit per coordinate after rotation_rounds randomized Hadamard blocks.
    top_k         - the `fraction` of largest coordinates (use error_feedback).
    random_k      - a random `fraction` of coordinates, scaled to be unbiased (unscaled with EF).
    sign          - scaled sign, 1 bit per coordinate (EF-signSGD with error_feedback).
    majority_vote - signSGD with majority vote; the server steps by vote_step * sign(votes).
  """

  method: Literal["none", "quantize", "qsgd", "drive", "top_k", "random_k", "sign",
                  "majority_vote"] = "none"
  bits: int = _field(8, check=(lambda x: 1 <= x <= 16, "must be in 1..16"))
  block_size: int | None = _field(None, check=(_positive, "must be >= 1 (or null: whole vector)"))
  scaling: Literal["minmax", "norm"] = "minmax"
  rotation: bool = False
  rotation_rounds: int = _field(1, check=(lambda x: x >= 1, "must be >= 1"),
                                help="drive: randomized Hadamard blocks chained, (HD)^k")
  levels: int = _field(16, check=(lambda x: 1 <= x <= 32767, "must be in 1..32767"))
  fraction: float = _field(0.01, check=(lambda x: 0 < x <= 1, "must be in (0, 1]"))
  error_feedback: bool = False
  vote_step: float = _field(0.01, check=(_positive, "must be > 0"))


@dataclasses.dataclass(frozen=True)
class SystemSection:
  """Dropouts and stragglers (see `fedjax_sim.core.heterogeneity`)."""

  dropout: float = _field(0.0, check=(lambda x: 0 <= x < 1, "must be in [0, 1) (1 would drop "
                                       "every client of every round)"))
  dropout_concentration: float | None = _field(None, check=(
      lambda x: x is None or x > 0, "must be > 0, or null for equal dropout probabilities"))
  straggler_fraction: float = _field(0.0, check=(lambda x: 0 <= x <= 1, "must be in [0, 1]"))
  straggler_policy: Literal["drop", "partial"] = "drop"
  straggler_work: Literal["steps", "epochs"] = "steps"
  straggler_concentration: float | None = _field(None, check=(
      lambda x: x is None or x > 0, "must be > 0, or null for a fixed fraction per round"))


@dataclasses.dataclass(frozen=True)
class EngineSection:
  block_size: int = _field(64, check=(_positive, "must be >= 1"))
  max_chunk_mib: float = _field(24.0, check=(_positive, "must be > 0"),
                                help="example data per compiled call, in MiB (bounds buffers)")
  bucketing: bool = True
  prefetch: int = _field(3, check=(_positive, "must be >= 1"))
  encode_cache_mib: float = _field(8.0, check=(_non_negative, "must be >= 0 (0 = no sub-blocks)"),
                                   help="MiB of client updates encoded together (cache-sized)")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  every: int = _field(5, check=(_non_negative, "must be >= 0 (0 = only at the end)"))
  max_clients: int = _field(0, check=(_non_negative, "must be >= 0 (0 = all)"))


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
  every: int = _field(10, check=(_non_negative, "must be >= 0 (0 = only after the last round)"))
  keep: int = _field(2, check=(_positive, "must be >= 1"))


@dataclasses.dataclass(frozen=True)
class Config:
  seed: int = _field(0, check=(lambda x: 0 <= x < 2**32, "must be in [0, 2**32)"))
  rounds: int = _field(10, check=(_positive, "must be >= 1"))
  output_dir: str = "runs/default"
  data: DataConfig = _field(default_factory=DataConfig)
  model: ModelConfig = _field(default_factory=ModelConfig)
  algorithm: AlgorithmConfig = _field(default_factory=AlgorithmConfig)
  sampling: SamplingConfig = _field(default_factory=SamplingConfig)
  engine: EngineSection = _field(default_factory=EngineSection)
  system: SystemSection = _field(default_factory=SystemSection)
  privacy: PrivacySection = _field(default_factory=PrivacySection)
  compression: CompressionSection = _field(default_factory=CompressionSection)
  checkpoint: CheckpointSection = _field(default_factory=CheckpointSection)
  eval: EvalConfig = _field(default_factory=EvalConfig)
  progress: bool = True


# -- parsing ----------------------------------------------------------------------


def _type_name(tp) -> str:
  origin = typing.get_origin(tp)
  if origin is Literal:
    return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
  if origin in (types.UnionType, typing.Union):
    return " or ".join(_type_name(a) for a in typing.get_args(tp))
  if origin is tuple:
    return f"a list of {_type_name(typing.get_args(tp)[0])}"
  if tp is type(None):
    return "null"
  return {int: "an integer", float: "a number", bool: "true/false", str: "a string",
          dict: "a mapping"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value, tp, path: str):
  origin = typing.get_origin(tp)
  if dataclasses.is_dataclass(tp):
    if not isinstance(value, dict):
      raise ConfigError(f"{path}: expected a mapping (section), got {value!r}.")
    return _build(tp, value, path)
  if origin is Literal:
    if value not in typing.get_args(tp):
      raise ConfigError(f"{path}: {value!r} is not allowed; use {_type_name(tp)}.")
    return value
  if origin in (types.UnionType, typing.Union):
    for arg in typing.get_args(tp):
      try:
        return _coerce(value, arg, path)
      except ConfigError:
        continue
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}.")
  if origin is tuple:
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}.")
    inner = typing.get_args(tp)[0]
    return tuple(_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value))
  if tp is type(None):
    if value is not None:
      raise ConfigError(f"{path}: expected null, got {value!r}.")
    return None
  if tp is bool:
    if not isinstance(value, bool):
      raise ConfigError(f"{path}: expected true/false, got {value!r}.")
    return value
  if tp is int:
    value = _number_text(value)
    if isinstance(value, float) and value.is_integer():
      value = int(value)  # 1e6 written for an integer
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(f"{path}: expected an integer, got {value!r}.")
    return value
  if tp is float:
    value = _number_text(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"{path}: expected a number, got {value!r}.")
    if not np.isfinite(value):
      raise ConfigError(f"{path}: expected a finite number, got {value!r}.")
    return float(value)
  if tp is str:
    if not isinstance(value, str):
      raise ConfigError(f"{path}: expected a string, got {value!r}.")
    return value
  if tp is dict:
    if not isinstance(value, dict):
      raise ConfigError(f"{path}: expected a mapping, got {value!r}.")
    return dict(value)
  raise ConfigError(f"{path}: unsupported type {tp}.")


# YAML 1.1 (PyYAML) reads `1e-3` and `1E6` as strings: it wants a dot and a
# signed exponent (`1.0e-3`). Every researcher writes the short form, so
# number fields accept a string in scientific notation (and only that: a
# quoted "3" stays an error).
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _number_text(value):
  if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
    return float(value)
  return value


def _build(cls, raw: dict, path: str):
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  raw = dict(raw)
  kwargs = {}
  if cls is OptimizerConfig:
    # Optimizer sections are open: extra keys are optax keyword arguments.
    extra = {k: raw.pop(k) for k in list(raw) if k not in fields}
    if "kwargs" in raw:
      extra.update(raw.pop("kwargs"))
    raw["kwargs"] = {k: _number_text(v) for k, v in extra.items()}
  for key, value in raw.items():
    where = f"{path}.{key}" if path else key
    if key not in fields:
      close = difflib.get_close_matches(key, fields, n=1)
      hint = f" Did you mean {close[0]!r}?" if close else ""
      raise ConfigError(f"Unknown config key {where!r}.{hint} Allowed keys"
                        f"{' in ' + path if path else ''}: {', '.join(sorted(fields))}.")
    value = _coerce(value, hints[key], where)
    check = fields[key].metadata.get("check")
    if check is not None and value is not None and not check[0](value):
      raise ConfigError(f"{where} = {value!r} {check[1]}.")
    kwargs[key] = value
  try:
    return cls(**kwargs)
  except TypeError as e:
    raise ConfigError(f"{path or 'config'}: {e}") from e


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


def config_from_dict(raw: dict | None, overrides: list[str] = ()) -> Config:
  """Validates a raw mapping (plus `key=value` overrides) into a `Config`."""
  raw = {} if raw is None else raw
  if not isinstance(raw, dict):
    raise ConfigError("The config must be a YAML mapping at the top level.")
  raw = _deep_copy(raw)
  for key, value in parse_overrides(list(overrides)):
    _set_dotted(raw, key, value)
  config = _build(Config, raw, "")
  _cross_checks(config)
  _unused_key_checks(raw, config)
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


def _cross_checks(c: Config) -> None:
  held_out = (max(1, int(round(c.data.holdout_clients * c.data.num_clients)))
              if c.data.holdout_clients > 0 else 0)
  train_clients = c.data.num_clients - held_out
  if c.data.kind in ("leaf_synthetic", "gaussian_mixture"):
    if c.sampling.scheme != "poisson" and c.sampling.clients_per_round > train_clients:
      raise ConfigError(
          f"sampling.clients_per_round = {c.sampling.clients_per_round} but only {train_clients} "
          f"clients train (data.num_clients = {c.data.num_clients}, data.holdout_clients = "
          f"{c.data.holdout_clients}); lower clients_per_round or raise num_clients.")
  if c.algorithm.name == "ditto" and c.data.holdout_clients > 0:
    raise ConfigError("algorithm.name = 'ditto' evaluates each training client's personal model "
                      "on its own test split; set data.holdout_clients = 0.")
  if c.data.kind in ("npz", "packed") and not c.data.path:
    raise ConfigError(f"data.path is required when data.kind = {c.data.kind!r}.")
  if c.data.kind == "gaussian_mixture" and c.data.size_sigma > 0 and \
      c.data.max_client_size < c.data.examples_per_client:
    raise ConfigError("data.max_client_size must be >= data.examples_per_client (the median size).")
  a = c.algorithm
  if a.name in FEDOPT_SERVER:
    _fedopt_server_checks(a)
  elif a.server_optimizer.name in _FEDOPT_KWARGS:
    algorithm = next(k for k, v in FEDOPT_SERVER.items() if v == a.server_optimizer.name)
    raise ConfigError(f"algorithm.server_optimizer.name = {a.server_optimizer.name!r} is the "
                      f"paper-exact server step of {algorithm}; select it with algorithm.name = "
                      f"{algorithm!r} (tau = algorithm.tau). algorithm.server_optimizer.name "
                      "takes an optax optimizer (sgd, adam, yogi, adagrad, ...).")
  if a.name in ("scaffold", "qffl") and (a.client_optimizer.name != "sgd" or
                                         a.client_optimizer.kwargs):
    raise ConfigError(f"algorithm.client_optimizer must be plain sgd (no momentum or other "
                      f"arguments) for {a.name}: its update rule assumes local SGD.")
  if a.name == "fednova":
    kw = a.client_optimizer.kwargs
    if (a.client_optimizer.name != "sgd" or set(kw) - {"momentum", "nesterov"} or
        kw.get("nesterov", False) is not False):
      raise ConfigError("algorithm.client_optimizer must be sgd, optionally with momentum (no "
                        "nesterov or other arguments), for fednova: its normalizer ||a_i||_1 is "
                        "derived for local SGD with heavy-ball momentum.")
    rho = kw.get("momentum")
    if rho is not None and not (isinstance(rho, (int, float)) and not isinstance(rho, bool)
                                and 0 <= rho < 1):
      raise ConfigError(f"algorithm.client_optimizer.momentum = {rho!r} must be in [0, 1) for "
                        "fednova.")
  default_server = OptimizerConfig(name="sgd", learning_rate=1.0)
  if a.name in ("feddyn", "qffl") and a.server_optimizer != default_server:
    raise ConfigError(f"algorithm.server_optimizer is not used by {a.name} (its server step is "
                      "part of the algorithm); remove it from the config.")
  if a.name == "fedavgm" and (a.server_optimizer.name != "sgd" or a.server_optimizer.kwargs):
    raise ConfigError("algorithm.name = 'fedavgm' uses SGD with algorithm.server_momentum on the "
                      "server; give only algorithm.server_optimizer.learning_rate, or use "
                      "algorithm.name = 'fedavg' with any server optimizer.")
  if a.name in ("fednova", "scaffold", "feddyn", "qffl") and a.weighting != "examples":
    raise ConfigError(f"algorithm.weighting is fixed by {a.name} (its paper's rule); remove it.")
  sy = c.system
  if sy.straggler_policy == "drop" and sy.straggler_fraction == 1 and \
      sy.straggler_concentration is None:
    raise ConfigError("system.straggler_fraction = 1.0 with straggler_policy = 'drop' drops "
                      "every client of every round; lower it, or keep stragglers' partial work "
                      "with straggler_policy = 'partial'.")
  _privacy_checks(c)
  _compression_checks(c)
  build_optimizer(a.client_optimizer, "algorithm.client_optimizer")
  build_server_optimizer(a, "algorithm.server_optimizer")


# Algorithms whose server consumes the (noisy) mean of model deltas, so a
# user-level DP aggregate can stand in for their weighted mean.
DP_AGGREGATE_ALGORITHMS = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad")


def _privacy_checks(c: Config) -> None:
  p, a, s = c.privacy, c.algorithm, c.sampling
  if p.mechanism == "none":
    changed = [f.name for f in dataclasses.fields(p)
               if getattr(p, f.name) != getattr(PrivacySection(), f.name)]
    if changed:
      raise ConfigError(f"privacy.{changed[0]} is set but privacy.mechanism = 'none'; set "
                        "privacy.mechanism (dp_fedavg, dp_ftrl or local_dp_sgd) or remove it.")
    return
  if (p.noise_multiplier is None) == (p.target_epsilon is None):
    raise ConfigError("Give exactly one of privacy.noise_multiplier and privacy.target_epsilon "
                      f"(mechanism {p.mechanism!r}): the other is derived by accounting.")
  if p.mechanism in ("dp_fedavg", "dp_ftrl"):
    if s.scheme == "data_proportional":
      raise ConfigError(f"privacy.mechanism = {p.mechanism!r} with sampling.scheme = "
                        "'data_proportional': dp-accounting has no event for sampling weighted "
                        "by data size. Use poisson (dp_fedavg) or shuffle (dp_ftrl).")
    if a.name not in DP_AGGREGATE_ALGORITHMS:
      raise ConfigError(f"privacy.mechanism = {p.mechanism!r} replaces the server's mean of model "
                        f"deltas; algorithm.name = {a.name!r} aggregates something else. Use one "
                        f"of {', '.join(DP_AGGREGATE_ALGORITHMS)}, or local_dp_sgd.")
    if a.weighting != "uniform":
      raise ConfigError(f"privacy.mechanism = {p.mechanism!r} weights every client equally (its "
                        "sensitivity bound needs it); set algorithm.weighting = 'uniform'.")
  if p.mechanism == "dp_ftrl":
    if s.scheme != "shuffle":
      raise ConfigError("privacy.mechanism = 'dp_ftrl' is accounted for shuffled epochs (every "
                        "client at most once per epoch); dp-accounting has no tree-aggregation "
                        f"event with {s.scheme} sampling. Set sampling.scheme = 'shuffle'.")
    if p.adaptive_clipping:
      raise ConfigError("privacy.adaptive_clipping is implemented for dp_fedavg only; dp-accounting "
                        "has no event for it combined with tree aggregation.")
    r = p.tree_restart
    if not (r in ("epoch", "none") or (isinstance(r, int) and not isinstance(r, bool) and r >= 1)):
      raise ConfigError(f"privacy.tree_restart = {r!r}; use 'epoch', 'none' or a number of "
                        "rounds >= 1.")
  elif p.tree_restart != "epoch":
    raise ConfigError("privacy.tree_restart applies to dp_ftrl only; remove it.")
  if p.mechanism == "local_dp_sgd":
    if a.name in ("qffl", "ditto"):
      raise ConfigError(f"privacy.mechanism = 'local_dp_sgd' is not accounted for {a.name}: its "
                        "clients also touch their data outside DP-SGD "
                        + ("(the loss that weights q-FFL's update)." if a.name == "qffl" else
                           "(a second, personal model trained on the same examples)."))
    if p.adaptive_clipping:
      raise ConfigError("privacy.adaptive_clipping applies to dp_fedavg only.")
  if p.adaptive_clipping and p.noise_multiplier == 0:
    raise ConfigError("privacy.adaptive_clipping needs privacy.noise_multiplier > 0.")
  if not p.adaptive_clipping:
    for name in ("target_quantile", "clip_learning_rate", "clip_count_stddev"):
      if getattr(p, name) != getattr(PrivacySection(), name):
        raise ConfigError(f"privacy.{name} applies only with privacy.adaptive_clipping = true.")
  if p.accountant == "pld" and (p.mechanism in ("dp_ftrl", "local_dp_sgd") or
                                s.scheme == "uniform"):
    raise ConfigError("privacy.accountant = 'pld': dp-accounting's PLD accountant cannot account "
                      + ("tree aggregation" if p.mechanism == "dp_ftrl" else
                         "sampling without replacement") + "; use privacy.accountant = 'rdp'"
                      + (" or sampling.scheme = 'poisson'." if p.mechanism == "dp_fedavg" else "."))


_COMPRESSION_KEYS = {
    "quantize": {"bits", "block_size", "scaling", "rotation", "error_feedback"},
    "qsgd": {"levels", "rotation", "error_feedback"},
    "drive": {"rotation_rounds", "error_feedback"},
    "top_k": {"fraction", "error_feedback"},
    "random_k": {"fraction", "error_feedback"},
    "sign": {"error_feedback"},
    "majority_vote": {"vote_step"},
    "none": set(),
}


def _compression_checks(c: Config) -> None:
  m = c.compression
  default = CompressionSection()
  for f in dataclasses.fields(m):
    if f.name != "method" and f.name not in _COMPRESSION_KEYS[m.method] and \
        getattr(m, f.name) != getattr(default, f.name):
      used = ", ".join(sorted(_COMPRESSION_KEYS[m.method])) or "no other key"
      raise ConfigError(f"compression.{f.name} does not apply to compression.method = "
                        f"{m.method!r} (it uses {used}); remove it.")
  if m.method == "majority_vote":
    if c.privacy.mechanism != "none":
      raise ConfigError("compression.method = 'majority_vote' replaces the server's aggregation "
                        "and cannot be combined with privacy.mechanism; use 'sign' with "
                        "error_feedback instead.")
    if c.algorithm.name not in DP_AGGREGATE_ALGORITHMS:
      raise ConfigError(f"compression.method = 'majority_vote' steps the model by the vote; "
                        f"algorithm.name = {c.algorithm.name!r} aggregates something else. Use "
                        f"one of {', '.join(DP_AGGREGATE_ALGORITHMS)}.")
  if m.error_feedback and c.privacy.mechanism == "dp_fedavg":
    raise ConfigError("compression.error_feedback with privacy.mechanism = 'dp_fedavg' is not "
                      "implemented (the residual would have to be clipped with the update); "
                      "use an unbiased compressor without error feedback.")
  if m.method != "none" and c.privacy.mechanism == "dp_ftrl":
    raise ConfigError("compression with privacy.mechanism = 'dp_ftrl' is not implemented; use "
                      "dp_fedavg or no compression.")


# algorithm.name = fedadam | fedyogi | fedadagrad selects the paper-exact server
# step of Reddi et al. 2021, Algorithm 2 (`fedjax_sim.algorithms.fed_adam`, ...;
# no bias correction, tau outside the square root, v starting at tau^2), not
# optax.adam / yogi / adagrad. Those stay available as algorithm.name = fedavg
# with algorithm.server_optimizer.name = adam | yogi | adagrad.
FEDOPT_SERVER = {"fedadam": "fed_adam", "fedyogi": "fed_yogi", "fedadagrad": "fed_adagrad"}
# The algorithm.server_optimizer keys each accepts besides learning_rate (tau is algorithm.tau).
_FEDOPT_KWARGS = {"fed_adam": ("b1", "b2"), "fed_yogi": ("b1", "b2"), "fed_adagrad": ("b1",)}
_OPTAX_TWIN = {"fedadam": "adam", "fedyogi": "yogi", "fedadagrad": "adagrad"}


def _fedopt_server_checks(a: AlgorithmConfig) -> None:
  """Checks algorithm.server_optimizer for algorithm.name = fedadam | fedyogi | fedadagrad."""
  so, implied, twin = a.server_optimizer, FEDOPT_SERVER[a.name], _OPTAX_TWIN[a.name]
  accepted = _FEDOPT_KWARGS[implied]
  plain = (f"For plain optax.{twin} (a different step) use algorithm.name = 'fedavg' with "
           f"algorithm.server_optimizer.name = {twin!r}.")
  if so.name not in ("sgd", implied):  # sgd: the section's default, i.e. no name given
    raise ConfigError(f"algorithm.server_optimizer.name = {so.name!r} conflicts with "
                      f"algorithm.name = {a.name!r}, whose server optimizer is {implied}, the "
                      f"paper-exact step of Reddi et al. 2021 (not optax.{twin}); leave the name "
                      f"out (learning_rate, {', '.join(accepted)} are used). {plain}")
  for key, value in so.kwargs.items():
    where = f"algorithm.server_optimizer.{key}"
    if key in ("eps", "epsilon", "tau"):
      raise ConfigError(f"{where}: the adaptivity of {a.name} is algorithm.tau; set algorithm.tau "
                        "instead.")
    if key not in accepted:
      raise ConfigError(f"Unknown config key {where!r} for algorithm.name = {a.name!r}: its server "
                        f"optimizer {implied} (Reddi et al. 2021, Algorithm 2) accepts "
                        f"learning_rate, {', '.join(accepted)} (tau is algorithm.tau). {plain}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
      raise ConfigError(f"{where} = {value!r} must be a number in [0, 1).")


def server_optimizer_config(a: AlgorithmConfig) -> OptimizerConfig:
  """The server optimizer an algorithm section asks for.

  fedadam, fedyogi and fedadagrad imply `fed_adam`, `fed_yogi` and
  `fed_adagrad` of `fedjax_sim.algorithms.fedopt` (Reddi et al. 2021,
  Algorithm 2, not optax's adam, yogi, adagrad) with `tau = algorithm.tau`;
  fedavgm implies SGD with momentum. Build the result with
  `build_server_optimizer`.
  """
  if a.name in FEDOPT_SERVER:
    so = a.server_optimizer
    return OptimizerConfig(name=FEDOPT_SERVER[a.name], learning_rate=so.learning_rate,
                           kwargs={**so.kwargs, "tau": a.tau})
  if a.name == "fedavgm":
    return OptimizerConfig(name="sgd", learning_rate=a.server_optimizer.learning_rate,
                           kwargs={"momentum": a.server_momentum})
  return a.server_optimizer


def build_server_optimizer(
    a: AlgorithmConfig, path: str = "algorithm.server_optimizer") -> optax.GradientTransformation:
  """Builds the server optimizer of an algorithm section, checking it first.

  For fedadam, fedyogi and fedadagrad: the paper-exact `fed_adam`,
  `fed_yogi` or `fed_adagrad`; for every other algorithm the optax optimizer
  of `server_optimizer_config(a)` (see `build_optimizer`).
  """
  if a.name not in FEDOPT_SERVER:
    return build_optimizer(server_optimizer_config(a), path)
  from fedjax_sim.algorithms import fedopt  # the schema itself needs no algorithm code
  _fedopt_server_checks(a)
  oc = server_optimizer_config(a)
  try:
    return getattr(fedopt, oc.name)(oc.learning_rate, **oc.kwargs)
  except ValueError as e:
    raise ConfigError(f"{path}: {e}") from e


def build_optimizer(oc: OptimizerConfig, path: str = "optimizer") -> optax.GradientTransformation:
  """Builds `optax.<name>(learning_rate, **kwargs)`, checking the arguments first."""
  fn = getattr(optax, oc.name, None)
  if fn is None or not callable(fn) or oc.name.startswith("_"):
    close = difflib.get_close_matches(oc.name, [n for n in dir(optax) if not n.startswith("_")], 3)
    raise ConfigError(f"{path}.name = {oc.name!r} is not an optax optimizer. "
                      f"Did you mean {', '.join(close) or 'sgd, adam, adagrad, yogi'}?")
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{path}.name = {oc.name!r}: cannot inspect its signature.") from e
  if "learning_rate" not in params:
    raise ConfigError(f"{path}.name = {oc.name!r} takes no learning_rate; it is not an optimizer.")
  for k in oc.kwargs:
    if k not in params:
      raise ConfigError(f"Unknown config key '{path}.{k}': optax.{oc.name} accepts "
                        f"{', '.join(p for p in params if p != 'learning_rate')}.")
  try:
    opt = fn(learning_rate=oc.learning_rate, **oc.kwargs)
    # One step on a dummy parameter: a bad value (momentum: "abc") fails here,
    # not inside the first compiled round.
    dummy = {"w": np.ones(2, np.float32)}
    opt.update(dummy, opt.init(dummy), dummy)
  except Exception as e:  # optax raises TypeError, ValueError, and errors from JAX ops
    raise ConfigError(f"{path}: optax.{oc.name} rejected its arguments "
                      f"({', '.join(f'{k}={v!r}' for k, v in oc.kwargs.items()) or 'defaults'}): "
                      f"{type(e).__name__}: {str(e)[:200]}") from e
  return opt


# Which keys of a section apply, by the value of the section's selector
# (data.kind, model.kind, algorithm.name). A key that is given but does not
# apply is an error (it would be silently ignored), and the resolved
# config.yaml lists only the keys that apply.
_COMMON_ALGORITHM_KEYS = {"name", "client_optimizer", "batch_size", "local_epochs", "shuffle"}
_APPLIES = {
    "data": ("kind", {"test_fraction", "holdout_clients", "num_classes"}, {
        "leaf_synthetic": {"num_clients", "alpha", "beta", "iid"},
        "gaussian_mixture": {"num_clients", "examples_per_client", "num_features", "label_skew",
                             "size_sigma", "max_client_size"},
        "npz": {"num_clients", "path", "partition", "dirichlet_alpha", "shards_per_client"},
        "packed": {"path", "mmap"},
    }),
    "model": ("kind", set(), {"logreg": set(), "mlp": {"hidden"}, "cnn": {"channels", "dense"}}),
    "sampling": ("scheme", set(), {"uniform": {"clients_per_round"},
                                   "poisson": {"rate"},
                                   "shuffle": {"clients_per_round"},
                                   "data_proportional": {"clients_per_round"}}),
    "algorithm": ("name", _COMMON_ALGORITHM_KEYS, {
        "fedavg": {"server_optimizer", "weighting"},
        "fedavgm": {"server_optimizer", "server_momentum", "weighting"},
        "fedprox": {"server_optimizer", "mu", "weighting"},
        "scaffold": {"server_optimizer"},
        "fednova": {"server_optimizer"},
        "feddyn": {"alpha"},
        "qffl": {"q"},
        "ditto": {"server_optimizer", "lam", "weighting"},
        "fedadam": {"server_optimizer", "tau", "weighting"},
        "fedyogi": {"server_optimizer", "tau", "weighting"},
        "fedadagrad": {"server_optimizer", "tau", "weighting"},
    }),
}


_ADAPTIVE_ONLY = {"target_quantile", "clip_learning_rate", "clip_count_stddev"}


def applicable_keys(section: str, selector_value) -> set[str] | None:
  """The keys of `section` that apply when its selector has this value (None: all)."""
  if section not in _APPLIES:
    return None
  selector, common, by_value = _APPLIES[section]
  return {selector} | common | by_value.get(selector_value, set())


def _section_keys(section: str, values: dict) -> set[str] | None:
  """The keys of a section that apply, given the section's (resolved) values; None: all.

  The one rule behind the unused-key errors, `to_dict` and `prune_inapplicable`.
  """
  if section in _APPLIES:
    return applicable_keys(section, values[_APPLIES[section][0]])
  if section == "privacy":
    if values["mechanism"] == "none":
      return {"mechanism"}
    keys = {f.name for f in dataclasses.fields(PrivacySection)}
    if not values["adaptive_clipping"]:
      keys -= _ADAPTIVE_ONLY
    if values["mechanism"] != "dp_ftrl":
      keys.discard("tree_restart")
    return keys
  if section == "compression":
    return _COMPRESSION_KEYS[values["method"]] | {"method"}
  return None


def prune_inapplicable(raw: dict) -> dict:
  """A raw config without the keys its choices ignore (reads config.yaml files
  written before such keys were errors, which listed every field)."""
  raw = _deep_copy(raw)
  defaults = _to_plain(Config())
  for section, node in raw.items():
    if isinstance(node, dict) and isinstance(defaults.get(section), dict):
      try:
        keep = _section_keys(section, {**defaults[section], **node})
      except KeyError:  # an unknown selector value: validation names it
        continue
      if keep is not None:
        raw[section] = {k: v for k, v in node.items() if k in keep}
  return raw


def _unused_key_checks(raw: dict, c: Config) -> None:
  resolved = _to_plain(c)
  for section, given in raw.items():
    if not isinstance(given, dict):
      continue
    keep = _section_keys(section, resolved[section])
    extra = sorted(k for k in given if keep is not None and k not in keep)
    if not extra:
      continue
    key = extra[0]
    if section == "privacy":
      why = ("privacy.mechanism = 'none'; set privacy.mechanism (dp_fedavg, dp_ftrl or "
             "local_dp_sgd) or remove it." if c.privacy.mechanism == "none" else
             "it applies only with privacy.adaptive_clipping = true"
             if key in _ADAPTIVE_ONLY else "it applies only to privacy.mechanism = 'dp_ftrl'")
      raise ConfigError(f"privacy.{key} is set but {why}" + ("" if why.endswith(".") else
                                                              "; remove it."))
    if section == "compression":
      used = ", ".join(sorted(keep - {"method"})) or "no other key"
      raise ConfigError(f"compression.{key} does not apply to compression.method = "
                        f"{c.compression.method!r} (it uses {used}); remove it.")
    selector = _APPLIES[section][0]
    value = resolved[section][selector]
    users = sorted(v for v, keys in _APPLIES[section][2].items() if key in keys)
    where = (f"it applies only to {section}.{selector} = {', '.join(map(repr, users))}"
             if users else "it does not apply")
    raise ConfigError(f"{section}.{key} is set but {section}.{selector} = {value!r} ignores "
                      f"it ({where}); remove it, or choose the {selector} it belongs to.")


def config_differences(a: dict, b: dict, prefix: str = ""):
  """`(dotted key, value in a, value in b)` for every leaf where two config dicts differ."""
  if isinstance(a, dict) and isinstance(b, dict):
    for k in sorted(set(a) | set(b)):
      yield from config_differences(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
  elif a != b:
    yield prefix, a, b


def to_dict(config, *, only_applicable: bool = True) -> dict:
  """A plain, YAML-serialisable dict of a config (tuples become lists).

  By default, keys that the chosen data kind, model, algorithm, sampling
  scheme, privacy mechanism or compression method ignores are left out, and
  so are unset (null) noise and budget settings: this is the form written to
  a run's config.yaml, and `config_from_dict` reads it back to the same
  `Config`. `only_applicable=False` lists every field.
  """
  d = _to_plain(config)
  if not only_applicable or not isinstance(config, Config):
    return d
  for section, values in d.items():
    keep = _section_keys(section, values) if isinstance(values, dict) else None
    if keep is not None:
      d[section] = {k: v for k, v in values.items() if k in keep}
  d["privacy"] = {k: v for k, v in d["privacy"].items() if v is not None or k not in (
      "noise_multiplier", "target_epsilon", "budget_epsilon")}
  a = d["algorithm"]
  if a["name"] in FEDOPT_SERVER and "server_optimizer" in a:
    a["server_optimizer"] = {**a["server_optimizer"], "name": FEDOPT_SERVER[a["name"]]}
  return d


def _to_plain(config) -> dict:
  def convert(x):
    if dataclasses.is_dataclass(x):
      d = {f.name: convert(getattr(x, f.name)) for f in dataclasses.fields(x)}
      if isinstance(x, OptimizerConfig):
        d.update(d.pop("kwargs"))
      return d
    if isinstance(x, tuple):
      return [convert(v) for v in x]
    if isinstance(x, dict):
      return {k: convert(v) for k, v in x.items()}
    return x
  return convert(config)
