"""A user's own dataset built by a Python function (registered as `data.kind = factory`).

    data:
      factory: "my_pkg.my_data:load"   # module:function
      root: /data/my_set               # any other key is passed to it
      num_classes: 20                  # the data section's own keys stay the config's

The section needs no `kind`: a `factory` key implies `kind: factory`, and the
keys the section does not declare are collected into `kwargs` and passed as
keyword arguments, `fn(**kwargs)`, plus `seed=` (the run's seed) when the
function has a parameter named `seed` and the config does not set one. The
module must be importable: on PYTHONPATH, or listed in the config's
top-level `imports:`.

The function returns one of

- a `FederatedData` with features `x` and `y` (split by the config's
  `test_fraction` / `holdout_clients`);
- a `(train, test)` pair of them (its own split);
- a dict with arrays `x` (`[N, ...]`) and `y` (`[N]` class ids) and either
  `client_ids` (`[N]`, the natural client of every example: one client per
  distinct id, sorted by id, examples in the given order) or `partition` (a
  mapping of `data.kind = npz`'s partition keys, e.g. `{"partition":
  "dirichlet", "num_clients": 50, "dirichlet_alpha": 0.3}`; `coarse`, `[N]`,
  holds the coarse labels the Pachinko partition needs). uint8 `x` is scaled
  by 1/255, like npz data.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect

import numpy as np

from fedjax_sim.core.data import DataError, FederatedData
from fedjax_sim.core.registry import DATASETS, DataSection
from fedjax_sim.core.schema import (ConfigError, is_reference, option, parse_section,
                                    resolve_reference)
from fedjax_sim.datasets.npz import PartitionedSection, inputs, labels, partition_arrays

_RETURNS = ("return a FederatedData (features 'x' and 'y'), a (train, test) pair of them, or a "
            "dict {'x', 'y', and 'client_ids' (one id per example) or 'partition' (npz "
            "partition keys)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FactoryConfig(DataSection):
  """A user's dataset: `factory: "module:function"`, called with the section's other keys."""

  # Undeclared keys of the section are collected into `kwargs` (the registry's rule).
  extra_keys = "kwargs"

  factory: str = option("", help="'module:function' returning the data")
  kwargs: dict = option(default_factory=dict, help="keyword arguments of the function")

  def __post_init__(self):
    if not self.factory:
      raise ConfigError("data.factory is required when data.kind = 'factory': "
                        "'module:function', e.g. 'my_pkg.my_data:load'.")
    if not is_reference(self.factory):
      raise ConfigError(f"data.factory = {self.factory!r} is not 'module:function' (a dotted "
                        "module path, a colon, then the function's name), e.g. "
                        "'my_pkg.my_data:load'.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class _PartitionKeys(PartitionedSection):
  """The partition keys a factory's dict names (parsed like npz's)."""


_PARTITION_FIELDS = ({f.name for f in dataclasses.fields(PartitionedSection)}
                     - {f.name for f in dataclasses.fields(DataSection)})


def resolve(path: str):
  """The callable `path` ("module:function") names; `ConfigError` naming what is wrong."""
  return resolve_reference(path, "data.factory", "my_pkg.my_data:load")


def call_factory(path: str, kwargs: dict, seed: int):
  """`fn(**kwargs)` (plus `seed=` if it takes one), its arguments checked first."""
  fn = resolve(path)
  given = sorted(kwargs)
  kwargs = dict(kwargs)
  try:
    signature = inspect.signature(fn)
  except (TypeError, ValueError):
    signature = None
  if signature is not None:
    if "seed" in signature.parameters and "seed" not in kwargs:
      kwargs["seed"] = seed
    try:
      signature.bind(**kwargs)
    except TypeError as e:
      params = [p for p in signature.parameters if p != "seed"
                and signature.parameters[p].kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                         inspect.Parameter.VAR_KEYWORD)]
      section = [f.name for f in dataclasses.fields(FactoryConfig) if f.name != "kwargs"]
      hints = [f" Did you mean {close[0]!r} (a key of the data section) for {k!r}?"
               for k in sorted(kwargs) if k not in signature.parameters
               for close in [difflib.get_close_matches(k, section, n=1)] if close]
      raise ConfigError(f"data.factory = {path!r} does not accept the keys given to it "
                        f"({', '.join(given) or 'none'}): {e}. It takes "
                        f"{', '.join(params) or 'no argument'}; the data section's other keys "
                        f"are its keyword arguments.{''.join(hints)}") from e
  try:
    return fn(**kwargs)
  except TypeError as e:
    if signature is not None:
      raise
    raise ConfigError(f"data.factory = {path!r} rejected its keyword arguments "
                      f"({', '.join(sorted(kwargs))}): {e}") from e


def to_population(path: str, result, seed: int):
  """A factory's result as `FederatedData` or a `(train, test)` pair; `ConfigError` otherwise."""
  where = f"data.factory = {path!r}"
  if isinstance(result, FederatedData):
    return _checked(where, result)
  if isinstance(result, (tuple, list)):
    if len(result) != 2 or not all(isinstance(d, FederatedData) for d in result):
      raise ConfigError(f"{where} returned a {type(result).__name__} of "
                        f"{[type(d).__name__ for d in result]}; {_RETURNS}.")
    return _checked(f"{where} (train)", result[0]), _checked(f"{where} (test)", result[1])
  if isinstance(result, dict):
    return _from_dict(where, result, seed)
  raise ConfigError(f"{where} returned {type(result).__name__}; {_RETURNS}.")


def _checked(where: str, data: FederatedData) -> FederatedData:
  missing = {"x", "y"} - set(data.features)
  if missing:
    raise ConfigError(f"{where} returned FederatedData with features {sorted(data.features)}; "
                      f"the models read 'x' and 'y' ({', '.join(sorted(missing))} missing).")
  return data


def _from_dict(where: str, result: dict, seed: int) -> FederatedData:
  known = {"x", "y", "client_ids", "partition", "coarse"}
  unknown = set(result) - known
  if unknown or "x" not in result or "y" not in result:
    raise ConfigError(f"{where} returned a dict with keys {sorted(result)}; it needs 'x' and 'y' "
                      f"and one of 'client_ids' or 'partition' (allowed: {', '.join(sorted(known))}"
                      ").")
  if ("client_ids" in result) == ("partition" in result):
    raise ConfigError(f"{where} returned a dict with "
                      f"{'both' if 'client_ids' in result else 'neither of'} 'client_ids' and "
                      "'partition'; give exactly one: the natural client of every example, or "
                      "how to partition them.")
  try:
    x, y = np.asarray(result["x"]), np.asarray(result["y"])
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{where}: its 'x' or 'y' is not an array ({e}).") from e
  if x.ndim < 1 or len(x) != len(y):
    raise ConfigError(f"{where}: 'x' has shape {x.shape} and 'y' shape {y.shape}; they need one "
                      "row per example, the same number of rows.")
  if not len(y):
    raise ConfigError(f"{where}: 'x' and 'y' hold no example.")
  x, y = inputs(where, x), labels(where, y)
  if "client_ids" in result:
    ids = np.asarray(result["client_ids"])
    if ids.shape != y.shape:
      raise ConfigError(f"{where}: 'client_ids' has shape {ids.shape}; it needs one client id "
                        f"per example, shape {y.shape}.")
    if ids.dtype == object:
      ids = ids.astype(str)
    unique, client_of = np.unique(ids, return_inverse=True)
    order = np.argsort(client_of, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(np.bincount(client_of, minlength=len(unique)))])
    return FederatedData.from_offsets({"x": x[order], "y": y[order]}, offsets)
  keys = result["partition"]
  if not isinstance(keys, dict) or set(keys) - _PARTITION_FIELDS:
    extra = sorted(set(keys) - _PARTITION_FIELDS) if isinstance(keys, dict) else keys
    raise ConfigError(f"{where}: its 'partition' must be a mapping of npz partition keys "
                      f"({', '.join(sorted(_PARTITION_FIELDS))}); got {extra!r}.")
  cfg = parse_section(_PartitionKeys, keys, f"{where} partition")
  coarse = None
  if "coarse" in result:
    coarse = np.asarray(result["coarse"])
    if coarse.shape != y.shape:
      raise ConfigError(f"{where}: 'coarse' has shape {coarse.shape}; it needs one coarse label "
                        f"per example, shape {y.shape}.")
    coarse = labels(where, coarse, "coarse")
  return partition_arrays(cfg, x, y, coarse, seed, f"the arrays {where} returned")


@DATASETS.register("factory", FactoryConfig, implied_by="factory")
def _build(cfg: FactoryConfig, ctx):
  """A user's dataset: the function `data.factory` names, called with the section's other keys."""
  result = call_factory(cfg.factory, cfg.kwargs, ctx.seed)
  try:
    return to_population(cfg.factory, result, ctx.seed)
  except DataError as e:
    raise ConfigError(f"data.factory = {cfg.factory!r} returned malformed data: {e}") from e
