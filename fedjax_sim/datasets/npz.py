"""Centralized arrays from an .npz file (`x`, `y`), partitioned over clients.

Registered as `data.kind = npz`: `x` holds inputs (numbers; uint8 images are
scaled to [0, 1]), `y` integer class ids 0..K-1, one per row of `x`. The
partition is `iid`, `dirichlet` (label skew) or `shards` (McMahan et al.'s
pathological non-IID split).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Literal

import numpy as np

from fedjax_sim.core.data import FederatedData
from fedjax_sim.core.registry import DATASETS, DataSection
from fedjax_sim.core.schema import ConfigError, option, positive
from fedjax_sim.datasets.partition import dirichlet_partition, iid_partition, shards_partition


@dataclasses.dataclass(frozen=True, kw_only=True)
class NpzConfig(DataSection):
  """Arrays `x`, `y` from an .npz file, partitioned over `num_clients` clients."""

  num_clients: int = option(100, check=(positive, "must be >= 1"))
  path: str = ""
  partition: Literal["iid", "dirichlet", "shards"] = "dirichlet"
  dirichlet_alpha: float = option(0.5, check=(positive, "must be > 0"))
  shards_per_client: int = option(2, check=(positive, "must be >= 1"))

  def __post_init__(self):
    if not self.path:
      raise ConfigError("data.path is required when data.kind = 'npz'.")


def read_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
  """`(x float32, y int32)` from an .npz file, checked; `ConfigError` names any problem."""
  try:
    with np.load(path, allow_pickle=False) as f:
      if "x" not in f or "y" not in f:
        raise ConfigError(f"data.path {path!r} must hold arrays 'x' and 'y'; it has "
                          f"{sorted(f.files)}.")
      x, y = f["x"], f["y"]
  except FileNotFoundError as e:
    raise ConfigError(f"data.path {path!r} does not exist.") from e
  except (OSError, ValueError, EOFError) as e:
    raise ConfigError(f"data.path {path!r} is not a readable .npz file ({e}).") from e
  if len(x) != len(y):
    raise ConfigError(f"data.path {path!r}: x has {len(x)} rows but y has {len(y)}.")
  return _inputs(path, x), _labels(path, y)


@DATASETS.register("npz", NpzConfig)
def _build(cfg: NpzConfig, ctx) -> FederatedData:
  """Arrays `x`, `y` from an .npz file, partitioned over clients."""
  x, y = read_npz(cfg.path)
  try:
    if cfg.partition == "iid":
      return iid_partition(x, y, cfg.num_clients, seed=ctx.seed)
    if cfg.partition == "shards":
      return shards_partition(x, y, cfg.num_clients, cfg.shards_per_client, seed=ctx.seed)
    return dirichlet_partition(x, y, cfg.num_clients, cfg.dirichlet_alpha, seed=ctx.seed)
  except ValueError as e:
    raise ConfigError(f"data.partition = {cfg.partition!r} cannot split {cfg.path!r}: {e}") from e


def _labels(path: str, y: np.ndarray) -> np.ndarray:
  """Class labels as int32 in 0..K-1; float labels only if they are whole numbers."""
  if y.ndim != 1:
    raise ConfigError(f"data.path {path!r}: labels 'y' must be one class id per example (shape "
                      f"[N]); they have shape {y.shape}. One-hot labels: store y.argmax(-1).")
  if np.issubdtype(y.dtype, np.floating):
    bad = ~np.isfinite(y) | (y != np.round(y))
    if bad.any():
      i = int(np.argmax(bad))
      raise ConfigError(f"data.path {path!r}: labels 'y' must be integer class ids 0..K-1; they "
                        f"are {y.dtype} and y[{i}] = {y[i]!r} is not a whole number. The "
                        "models are classifiers: store class ids (y.astype(int)).")
  elif not np.issubdtype(y.dtype, np.integer):
    raise ConfigError(f"data.path {path!r}: labels 'y' have dtype {y.dtype}; store integer "
                      "class ids 0..K-1.")
  if len(y) and y.min() < 0:
    raise ConfigError(f"data.path {path!r}: labels 'y' must be class ids 0..K-1; the smallest is "
                      f"{y.min()}.")
  return y.astype(np.int32)


def _inputs(path: str, x: np.ndarray) -> np.ndarray:
  """Inputs as float32; 8-bit images are scaled to [0, 1], other large inputs warned about."""
  if x.dtype == np.uint8:
    warnings.warn(f"data.path {path!r}: x is uint8 (images, 0..255); scaled to [0, 1] by 1/255.",
                  stacklevel=4)
    return x.astype(np.float32) / 255.0
  if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
    raise ConfigError(f"data.path {path!r}: inputs 'x' have dtype {x.dtype}; store numbers.")
  x = x.astype(np.float32)
  if x.size and not np.all(np.isfinite(x)):
    raise ConfigError(f"data.path {path!r}: inputs 'x' hold NaN or inf values; clean them first.")
  peak = float(np.max(np.abs(x))) if x.size else 0.0
  if peak > 100.0:
    warnings.warn(f"data.path {path!r}: inputs 'x' reach |x| = {peak:.4g}; unscaled inputs "
                  "usually make SGD diverge. Standardize them (or scale to [0, 1]) first.",
                  stacklevel=4)
  return x
