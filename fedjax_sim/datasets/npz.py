"""Centralized arrays from an .npz file (`x`, `y`), partitioned over clients.

Registered as `data.kind = npz`: `x` holds inputs (numbers; uint8 images are
scaled to [0, 1]), `y` integer class ids 0..K-1, one per row of `x`. The
partition is `iid`, `dirichlet` (label skew), `shards` (McMahan et al.'s
pathological non-IID split), `quantity_skew` (power-law client sizes, IID
labels) or `pachinko` (Reddi et al.'s two-level label skew, which reads the
coarse labels from the array `y_coarse`).

The partition keys (`PartitionedSection`) and `partition_arrays`, which
applies them, are shared with the other loaders of centralized data
(`data.kind = tfds`, `hf_disk`).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Literal

import numpy as np

from fedjax_sim.core.data import FederatedData
from fedjax_sim.core.registry import DATASETS, DataSection
from fedjax_sim.core.schema import ConfigError, non_negative, option, positive
from fedjax_sim.datasets.partition import (dirichlet_partition, iid_partition, pachinko_partition,
                                           quantity_skew_partition, shards_partition)

# The keys only one partition reads (left out of config.yaml for the others at their defaults).
_PARTITION_KEYS = {
    "dirichlet": ("dirichlet_alpha",),
    "shards": ("shards_per_client",),
    "quantity_skew": ("quantity_exponent",),
    "pachinko": ("pachinko_alpha", "pachinko_beta", "examples_per_client"),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class PartitionedSection(DataSection):
  """Keys of a dataset whose centralized examples are partitioned over `num_clients` clients."""

  num_clients: int = option(100, check=(positive, "must be >= 1"))
  partition: Literal["iid", "dirichlet", "shards", "quantity_skew", "pachinko"] = "dirichlet"
  dirichlet_alpha: float = option(0.5, check=(positive, "must be > 0"))
  shards_per_client: int = option(2, check=(positive, "must be >= 1"))
  quantity_exponent: float = option(1.5, check=(positive, "must be > 0"),
                                    help="quantity_skew: power-law tail index of client sizes")
  pachinko_alpha: float = option(0.1, check=(positive, "must be > 0"),
                                 help="pachinko: Dirichlet concentration over coarse labels")
  pachinko_beta: float = option(10.0, check=(positive, "must be > 0"),
                                help="pachinko: Dirichlet concentration over fine labels")
  examples_per_client: int = option(0, check=(non_negative, "must be >= 0"),
                                    help="pachinko: examples per client (0: N // num_clients)")

  @classmethod
  def unused_keys(cls, values: dict) -> set[str]:
    """Other partitions' keys at their defaults (config.yaml leaves them out)."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    chosen = values.get("partition", defaults["partition"])
    return {k for p, keys in _PARTITION_KEYS.items() if p != chosen for k in keys
            if values.get(k, defaults[k]) == defaults[k]}


def partition_arrays(cfg: PartitionedSection, x: np.ndarray, y: np.ndarray,
                     coarse: np.ndarray | None, seed: int, source: str,
                     num_clients: int | None = None) -> FederatedData:
  """`x`, `y` partitioned as `cfg` says; `ConfigError` naming `source` if impossible.

  Args:
    cfg: the partition keys.
    x: inputs `[N, ...]`.
    y: class ids `[N]`.
    coarse: coarse class ids `[N]` (read only by `partition = pachinko`).
    seed: the run's seed.
    source: the data's name in messages (a file, a dataset split).
    num_clients: clients to make instead of `cfg.num_clients` (a test split's).
  """
  k = cfg.num_clients if num_clients is None else num_clients
  try:
    if cfg.partition == "iid":
      return iid_partition(x, y, k, seed=seed)
    if cfg.partition == "shards":
      return shards_partition(x, y, k, cfg.shards_per_client, seed=seed)
    if cfg.partition == "quantity_skew":
      return quantity_skew_partition(x, y, k, exponent=cfg.quantity_exponent, seed=seed)
    if cfg.partition == "pachinko":
      if coarse is None:
        raise ConfigError(f"data.partition = 'pachinko' needs coarse labels, which {source} "
                          "does not have.")
      per_client = cfg.examples_per_client or len(y) // k
      if per_client < 1:
        raise ValueError(f"{len(y)} examples cannot give {k} clients one each.")
      return pachinko_partition(x, y, coarse, k, per_client, alpha=cfg.pachinko_alpha,
                                beta=cfg.pachinko_beta, seed=seed)
    return dirichlet_partition(x, y, k, cfg.dirichlet_alpha, seed=seed)
  except ValueError as e:
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(f"data.partition = {cfg.partition!r} cannot split {source}: {e}") from e


_TEST_PURPOSE = 0x7E57


@dataclasses.dataclass(frozen=True, kw_only=True)
class SplitArraysSection(PartitionedSection):
  """Keys of a dataset with named splits whose columns are partitioned (tfds, hf_disk).

  The `train_split` is partitioned over `num_clients` clients. With a
  `test_split`, that split is partitioned the same way over `test_clients`
  clients (0: `num_clients`) and evaluated on; without one (`""`), the
  training clients are split by `test_fraction` / `holdout_clients`.
  """

  train_split: str = "train"
  test_split: str = option("test", help="'' = split the training clients instead")
  test_clients: int = option(0, check=(non_negative, "must be >= 0"),
                             help="clients of the test split (0: num_clients)")
  x: str = "image"
  y: str = "label"
  coarse: str = option("coarse_label", help="pachinko: the coarse labels")
  cache_dir: str = ""

  @classmethod
  def unused_keys(cls, values: dict) -> set[str]:
    """The config's split keys with a test split, the test split's without; partition keys."""
    unused = set(super().unused_keys(values))
    if values.get("test_split", "test"):
      unused |= {"test_fraction", "holdout_clients"}
    elif values.get("test_clients", 0) == 0:
      unused.add("test_clients")
    if values.get("partition", "dirichlet") != "pachinko" and \
        values.get("coarse", "coarse_label") == "coarse_label":
      unused.add("coarse")
    return unused

  def check_given(self, given: set[str]) -> None:
    """The split is the test split's or the config's, not both."""
    if self.test_split and given & {"test_fraction", "holdout_clients"}:
      raise ConfigError(f"data.test_fraction / data.holdout_clients are set but data.test_split "
                        f"= {self.test_split!r} gives the evaluation clients; remove them, or set "
                        "data.test_split: '' to split the training clients instead.")
    if not self.test_split and "test_clients" in given:
      raise ConfigError("data.test_clients is set but data.test_split is empty; name the split "
                        "to partition over test_clients, or remove it.")


def partition_splits(cfg: SplitArraysSection, seed: int, train: tuple, test: tuple | None):
  """The train split partitioned, and the test split too if given (its own seed and clients).

  Args:
    cfg: the section.
    seed: the run's seed.
    train: `(x, y, coarse or None, source)` of the training split.
    test: the same for the test split, or None.

  Returns:
    A `FederatedData` (no test split) or a `(train, test)` pair.
  """
  train_data = partition_arrays(cfg, *train[:3], seed, train[3])
  if test is None:
    return train_data
  test_seed = int(np.random.SeedSequence([seed, _TEST_PURPOSE]).generate_state(1)[0])
  return train_data, partition_arrays(cfg, *test[:3], test_seed, test[3],
                                      num_clients=cfg.test_clients or cfg.num_clients)


@dataclasses.dataclass(frozen=True, kw_only=True)
class NpzConfig(PartitionedSection):
  """Arrays `x`, `y` from an .npz file, partitioned over `num_clients` clients."""

  path: str = ""

  def __post_init__(self):
    if not self.path:
      raise ConfigError("data.path is required when data.kind = 'npz'.")


def read_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
  """`(x float32, y int32)` from an .npz file, checked; `ConfigError` names any problem."""
  x, y, _ = _read(path, coarse=False)
  return x, y


def _read(path: str, coarse: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  """`(x, y, y_coarse or None)` from an .npz file; `y_coarse` is required if `coarse`."""
  where = f"data.path {path!r}"
  try:
    with np.load(path, allow_pickle=False) as f:
      if "x" not in f or "y" not in f:
        raise ConfigError(f"{where} must hold arrays 'x' and 'y'; it has {sorted(f.files)}.")
      if coarse and "y_coarse" not in f:
        raise ConfigError(f"{where}: data.partition = 'pachinko' needs the coarse label of "
                          f"every example in an array 'y_coarse'; the file has "
                          f"{sorted(f.files)}.")
      x, y = f["x"], f["y"]
      y_coarse = f["y_coarse"] if coarse else None
  except FileNotFoundError as e:
    raise ConfigError(f"{where} does not exist.") from e
  except (OSError, ValueError, EOFError) as e:
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(f"{where} is not a readable .npz file ({e}).") from e
  if len(x) != len(y):
    raise ConfigError(f"{where}: x has {len(x)} rows but y has {len(y)}.")
  if y_coarse is not None:
    if y_coarse.shape != y.shape:
      raise ConfigError(f"{where}: y_coarse has shape {y_coarse.shape}; it needs one coarse "
                        f"label per example, shape {y.shape}.")
    y_coarse = labels(where, y_coarse, "y_coarse")
  return inputs(where, x), labels(where, y), y_coarse


@DATASETS.register("npz", NpzConfig)
def _build(cfg: NpzConfig, ctx) -> FederatedData:
  """Arrays `x`, `y` from an .npz file, partitioned over clients."""
  x, y, coarse = _read(cfg.path, coarse=cfg.partition == "pachinko")
  return partition_arrays(cfg, x, y, coarse, ctx.seed, repr(cfg.path))


def labels(where: str, y: np.ndarray, name: str = "y") -> np.ndarray:
  """Class labels as int32 in 0..K-1; float labels only if they are whole numbers.

  Args:
    where: the source in messages (e.g. "data.path 'a.npz'").
    y: the labels.
    name: their name in messages.
  """
  if y.ndim != 1:
    raise ConfigError(f"{where}: labels {name!r} must be one class id per example (shape "
                      f"[N]); they have shape {y.shape}. One-hot labels: store y.argmax(-1).")
  if np.issubdtype(y.dtype, np.floating):
    bad = ~np.isfinite(y) | (y != np.round(y))
    if bad.any():
      i = int(np.argmax(bad))
      raise ConfigError(f"{where}: labels {name!r} must be integer class ids 0..K-1; they "
                        f"are {y.dtype} and {name}[{i}] = {y[i].item()!r} is not a whole "
                        "number. The models are classifiers: store class ids (y.astype(int)).")
  elif not np.issubdtype(y.dtype, np.integer):
    raise ConfigError(f"{where}: labels {name!r} have dtype {y.dtype}; store integer "
                      "class ids 0..K-1.")
  if len(y) and y.min() < 0:
    i = int(np.argmin(y))
    raise ConfigError(f"{where}: labels {name!r} must be class ids 0..K-1; {name}[{i}] = "
                      f"{y[i]} is negative.")
  if len(y) and y.max() > np.iinfo(np.int32).max:
    raise ConfigError(f"{where}: labels {name!r} reach {y.max()}; class ids must fit in int32.")
  return y.astype(np.int32)


def inputs(where: str, x: np.ndarray, warn_uint8: bool = True) -> np.ndarray:
  """Inputs as float32; 8-bit images are scaled to [0, 1], other large inputs warned about.

  Args:
    where: the source in messages (e.g. "data.path 'a.npz'").
    x: the inputs.
    warn_uint8: warn that uint8 inputs are scaled (off where they are known images).
  """
  if x.dtype == np.uint8:
    if warn_uint8:
      warnings.warn(f"{where}: x is uint8 (images, 0..255); scaled to [0, 1] by 1/255.",
                    stacklevel=4)
    return x.astype(np.float32) / 255.0
  if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
    raise ConfigError(f"{where}: inputs 'x' have dtype {x.dtype}; store numbers.")
  x = x.astype(np.float32)
  if x.size and not np.all(np.isfinite(x)):
    i = int(np.argmax(~np.isfinite(x).reshape(len(x), -1).all(axis=1)))
    raise ConfigError(f"{where}: inputs 'x' hold NaN or inf values (first in row {i}); clean "
                      "them first.")
  peak = float(np.max(np.abs(x))) if x.size else 0.0
  if peak > 100.0:
    warnings.warn(f"{where}: inputs 'x' reach |x| = {peak:.4g}; unscaled inputs "
                  "usually make SGD diverge. Standardize them (or scale to [0, 1]) first.",
                  stacklevel=4)
  return x
