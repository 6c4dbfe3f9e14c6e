"""Typed, validated configuration sections: the machinery every component's config uses.

A section is a frozen dataclass whose fields carry their own checks
(`option(default, check=(predicate, "must be ..."))`). `parse_section`
turns a raw mapping (from YAML, `--set` overrides or a dict in a script) into
an instance and raises `ConfigError` naming the dotted key, the expected type
or range and, for an unknown key, the closest allowed one. A section type
that stands for a family of components (an algorithm section, a model
section, ...) is parsed by the registry (`fedjax_sim.core.registry`), which
picks the component's own dataclass from the section's selector key.

Why not pydantic: its errors name neither a close match for a misspelled key
nor the YAML 1.1 short-exponent quirk (`1e-3` read as a string), and a
discriminated union keyed by a registry that user code extends at run time
needs a custom validator either way; the validation below is a few hundred
lines on frozen stdlib dataclasses and depends on nothing.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import re
import types
import typing
from typing import Any, Callable, Literal

import numpy as np
import optax


class ConfigError(ValueError):
  """A configuration value is unknown, mistyped or impossible."""


def positive(x):
  return x > 0


def non_negative(x):
  return x >= 0


def fraction_open(x):
  return 0 < x < 1


def rate(x):
  """In [0, 1): a dropout rate, a momentum, a fraction held out."""
  return 0 <= x < 1


def option(default=dataclasses.MISSING, *, check=None, help="",
           default_factory=dataclasses.MISSING):
  """A dataclass field with a value check `(predicate, "must be ...")` and a help text."""
  meta = {"check": check, "help": help}
  if default_factory is not dataclasses.MISSING:
    return dataclasses.field(default_factory=default_factory, metadata=meta)
  return dataclasses.field(default=default, metadata=meta)


# Section types parsed by someone else (the registry's component families):
# type -> parse(raw, path) -> instance.
SECTION_PARSERS: dict[type, Callable[[dict, str], Any]] = {}


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Any optax optimizer: `name` is an optax function (sgd, adam, adagrad, yogi, ...);
  the other keys are passed as its keyword arguments and checked against its signature."""

  extra_keys = "kwargs"  # undeclared keys are optax keyword arguments (see parse_section)

  name: str = "sgd"
  learning_rate: float = option(0.1, check=(positive, "must be > 0"))
  kwargs: dict = option(default_factory=dict)

  def build(self, path: str = "optimizer") -> optax.GradientTransformation:
    """`optax.<name>(learning_rate, **kwargs)`, its arguments checked (see `build_optimizer`)."""
    return build_optimizer(self, path)


def server_sgd() -> OptimizerConfig:
  """The default server optimizer: SGD with learning rate 1 (the plain mean step)."""
  return OptimizerConfig(name="sgd", learning_rate=1.0)


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


# -- parsing ----------------------------------------------------------------------


def type_name(tp) -> str:
  origin = typing.get_origin(tp)
  if origin is Literal:
    return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
  if origin in (types.UnionType, typing.Union):
    return " or ".join(type_name(a) for a in typing.get_args(tp))
  if origin is tuple:
    return f"a list of {type_name(typing.get_args(tp)[0])}"
  if tp is type(None):
    return "null"
  return {int: "an integer", float: "a number", bool: "true/false", str: "a string",
          dict: "a mapping"}.get(tp, getattr(tp, "__name__", str(tp)))


def coerce(value, tp, path: str):
  """`value` checked (and converted: int -> float, list -> tuple) against type `tp`."""
  origin = typing.get_origin(tp)
  if isinstance(tp, type) and tp in SECTION_PARSERS:
    if not isinstance(value, dict):
      raise ConfigError(f"{path}: expected a mapping (section), got {value!r}.")
    return SECTION_PARSERS[tp](value, path)
  if dataclasses.is_dataclass(tp):
    if not isinstance(value, dict):
      raise ConfigError(f"{path}: expected a mapping (section), got {value!r}.")
    return parse_section(tp, value, path)
  if origin is Literal:
    if value not in typing.get_args(tp):
      raise ConfigError(f"{path}: {value!r} is not allowed; use {type_name(tp)}.")
    return value
  if origin in (types.UnionType, typing.Union):
    for arg in typing.get_args(tp):
      try:
        return coerce(value, arg, path)
      except ConfigError:
        continue
    raise ConfigError(f"{path}: expected {type_name(tp)}, got {value!r}.")
  if origin is tuple:
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{path}: expected {type_name(tp)}, got {value!r}.")
    inner = typing.get_args(tp)[0]
    return tuple(coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value))
  if tp is type(None):
    if value is not None:
      raise ConfigError(f"{path}: expected null, got {value!r}.")
    return None
  if tp is bool:
    if not isinstance(value, bool):
      raise ConfigError(f"{path}: expected true/false, got {value!r}.")
    return value
  if tp is int:
    value = number_text(value)
    if isinstance(value, float) and value.is_integer():
      value = int(value)  # 1e6 written for an integer
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(f"{path}: expected an integer, got {value!r}.")
    return value
  if tp is float:
    value = number_text(value)
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
  if tp is Any:
    return value
  raise ConfigError(f"{path}: unsupported type {tp}.")


# YAML 1.1 (PyYAML) reads `1e-3` and `1E6` as strings: it wants a dot and a
# signed exponent (`1.0e-3`). Every researcher writes the short form, so
# number fields accept a string in scientific notation (and only that: a
# quoted "3" stays an error).
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def number_text(value):
  if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
    return float(value)
  return value


def unknown_key_error(key: str, fields, path: str, extra: str = "") -> ConfigError:
  where = f"{path}.{key}" if path else key
  close = difflib.get_close_matches(key, list(fields), n=1)
  hint = f" Did you mean {close[0]!r}?" if close else ""
  return ConfigError(f"Unknown config key {where!r}{extra}.{hint} Allowed keys"
                     f"{' in ' + path if path else ''}: {', '.join(sorted(fields))}.")


def parse_section(cls, raw: dict, path: str, *, unknown: Callable[[str], ConfigError] | None = None):
  """An instance of dataclass `cls` from a raw mapping, every key and value checked.

  Args:
    cls: a (frozen) dataclass whose fields may carry `option(check=...)`.
    raw: the mapping.
    path: the section's dotted path, for messages ("" at the top level).
    unknown: builds the error for a key `cls` does not have (default: the
      allowed keys and the closest match).
  """
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  raw = dict(raw)
  kwargs = {}
  open_field = getattr(cls, "extra_keys", None)
  if open_field:
    # Open sections (optimizers, user factories): undeclared keys are keyword
    # arguments, collected into the `open_field` mapping.
    extra = {k: raw.pop(k) for k in list(raw) if k not in fields}
    if open_field in raw:
      extra.update(raw.pop(open_field) or {})
    raw[open_field] = {k: number_text(v) for k, v in extra.items()}
  for key, value in raw.items():
    where = f"{path}.{key}" if path else key
    if key not in fields or not fields[key].init:
      raise (unknown(key) if unknown is not None else unknown_key_error(key, fields, path))
    value = coerce(value, hints[key], where)
    check = fields[key].metadata.get("check")
    if check is not None and value is not None and not check[0](value):
      raise ConfigError(f"{where} = {value!r} {check[1]}.")
    kwargs[key] = value
  try:
    section = cls(**kwargs)
    if hasattr(section, "check_given"):  # rules about keys given explicitly, even at defaults
      section.check_given(set(kwargs))
    return section
  except ConfigError as e:
    if not path or str(e).startswith(path):
      raise
    raise ConfigError(f"{path}: {e}") from e
  except TypeError as e:
    raise ConfigError(f"{path or 'config'}: {e}") from e


def to_plain(config) -> Any:
  """A plain, YAML-serialisable form of a section (tuples become lists; an
  optimizer's kwargs are flattened into its section)."""
  if dataclasses.is_dataclass(config):
    d = {f.name: to_plain(getattr(config, f.name)) for f in dataclasses.fields(config)}
    open_field = getattr(type(config), "extra_keys", None)
    if open_field:
      d.update(d.pop(open_field))
    return d
  if isinstance(config, tuple):
    return [to_plain(v) for v in config]
  if isinstance(config, dict):
    return {k: to_plain(v) for k, v in config.items()}
  return config


REFERENCE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def is_reference(ref) -> bool:
  """Whether `ref` reads 'module.path:function' (what factory keys take)."""
  return isinstance(ref, str) and REFERENCE.fullmatch(ref) is not None


def resolve_reference(ref: str, where: str, example: str) -> Callable:
  """The callable "module:attribute" names (a user's factory); a `ConfigError`
  naming `where` (e.g. "data.factory") and what is wrong otherwise: a
  malformed reference, a module that is not importable (or whose import
  fails), a missing attribute (with the closest name), or not a callable."""
  if not is_reference(ref):
    raise ConfigError(f"{where} = {ref!r} is not 'module:function' (a dotted module path, a "
                      f"colon, then the function's name), e.g. {example!r}.")
  module_name, attribute = ref.split(":")
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
      raise ConfigError(f"{where} = {ref!r}: cannot import module {module_name!r} ({e}). It "
                        "must be on PYTHONPATH (e.g. run from its folder, or pip install it) "
                        "or listed in the config's top-level `imports:`.") from e
    raise ConfigError(f"{where} = {ref!r}: importing module {module_name!r} failed: it imports "
                      f"{e.name!r}, which is not installed ({e}).") from e
  except Exception as e:  # the module's own code raised
    raise ConfigError(f"{where} = {ref!r}: importing module {module_name!r} raised "
                      f"{type(e).__name__}: {e}") from e
  target = module
  for i, name in enumerate(attribute.split(".")):
    if not hasattr(target, name):
      public = [n for n in dir(target) if not n.startswith("_")]
      close = difflib.get_close_matches(name, public, n=1)
      hint = f" Did you mean {close[0]!r}?" if close else ""
      owner = module_name + "".join("." + n for n in attribute.split(".")[:i])
      raise ConfigError(f"{where} = {ref!r}: {owner} has no attribute {name!r}.{hint}")
    target = getattr(target, name)
  if not callable(target):
    raise ConfigError(f"{where} = {ref!r} is a {type(target).__name__}, not a function.")
  return target
