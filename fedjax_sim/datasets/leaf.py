"""LEAF's JSON federated datasets (registered as `data.kind = leaf`).

LEAF's scripts (`preprocess.sh`) write each split as JSON files in
`data/train/` and `data/test/`, each file a map

    {"users": [id, ...], "num_samples": [n, ...],
     "user_data": {id: {"x": [example, ...], "y": [label, ...]}}}

with a split's users spread over several files. A split folder is converted
once into the packed store and cached (see `datasets.cache`); clients keep
their natural ids, sorted. Numeric examples (FEMNIST's 784 pixels,
Synthetic's 60 features; `data.input_shape` reshapes them, e.g. [28, 28]) are
kept as they are; LEAF's Shakespeare (`x` windows of 80 characters, `y` the
next character) becomes next-character rows over TFF's 90 ids (see
`_char_rows`), so `data.num_classes` must then be 90. Sent140 (sentences
with sentiment labels) is not supported.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import numpy as np

from fedjax_sim.core.data import DataError, FederatedData
from fedjax_sim.core.registry import DATASETS, DataSection
from fedjax_sim.core.schema import ConfigError, option
from fedjax_sim.datasets import text
from fedjax_sim.datasets.cache import cached

_VERSION = 2  # 2: text datasets (Shakespeare) converted
_WHERE = ("LEAF's scripts write them: clone https://github.com/TalwalkarLab/leaf, run "
          "preprocess.sh in data/<dataset>/ (e.g. data/femnist), and point data.path at its "
          "data/ folder (holding train/ and test/).")


def read_leaf_split(folder: str) -> tuple[FederatedData, list[str]]:
  """Every user of one LEAF split folder (all its .json files), sorted by id.

  Raises:
    DataError: naming the file and the user when a file is not JSON, lacks
      `users`/`num_samples`/`user_data`, a user's data is missing, ragged,
      not numeric, or disagrees with its `num_samples`, or a user appears twice.
  """
  files = sorted(glob.glob(os.path.join(folder, "*.json")))
  if not files:
    raise DataError(f"{folder} holds no .json file. {_WHERE}")
  users: dict[str, tuple[np.ndarray, np.ndarray, str]] = {}
  for path in files:
    try:
      with open(path) as f:
        blob = json.load(f)
      ids, counts, data = blob["users"], blob["num_samples"], blob["user_data"]
    except (OSError, ValueError) as e:
      raise DataError(f"{path} is not a readable JSON file ({e}).") from e
    except (KeyError, TypeError) as e:
      raise DataError(f"{path} is not a LEAF file: it needs 'users', 'num_samples' and "
                      f"'user_data' ({e!r} missing).") from e
    if len(ids) != len(counts):
      raise DataError(f"{path}: {len(ids)} users but {len(counts)} num_samples.")
    for user, count in zip(ids, counts):
      where = f"{path}, user {user!r}"
      if user in users:
        raise DataError(f"{where}: the user is also in {users[user][2]}.")
      if user not in data:
        raise DataError(f"{where}: listed in 'users' but has no 'user_data'.")
      x, y = data[user].get("x"), data[user].get("y")
      if x is None or y is None or len(x) != count or len(y) != count:
        raise DataError(f"{where}: needs {count} examples in 'x' and 'y' (num_samples); has "
                        f"{None if x is None else len(x)} and {None if y is None else len(y)}.")
      if count and (isinstance(x[0], str) or isinstance(y[0], str)):
        users[user] = (*_char_rows(x, y, where), path)
        continue
      try:
        xs, ys = np.asarray(x, np.float32), np.asarray(y)
      except (ValueError, TypeError) as e:
        raise DataError(f"{where}: 'x' is ragged or not numeric ({e}).") from e
      if ys.ndim != 1 or (ys.size and not np.all(ys == np.round(ys))):
        raise DataError(f"{where}: 'y' must hold one integer class per example.")
      users[user] = (xs, ys.astype(np.int32), path)
  order = sorted(users)
  shapes = {users[u][0].shape[1:] for u in order if len(users[u][0])}
  if len(shapes) > 1:
    raise DataError(f"{folder}: examples have different shapes across users: {sorted(shapes)}.")
  shape = shapes.pop() if shapes else (0,)
  xs = [users[u][0].reshape((-1, *shape)) for u in order]
  features = {"x": np.concatenate(xs), "y": np.concatenate([users[u][1] for u in order])}
  offsets = np.concatenate([[0], np.cumsum([len(v) for v in xs])])
  return FederatedData.from_offsets(features, offsets), order


def _char_rows(x: list, y: list, where: str) -> tuple[np.ndarray, np.ndarray]:
  """LEAF Shakespeare (x: windows of characters, y: the next character) as next-character
  rows over TFF's vocabulary: the window plus its next character, one token per
  character (pad 0, TFF's 86 characters 1..86, anything else OOV 87), x = row[:-1],
  y = row[1:]; so the same models and metrics serve LEAF's and TFF's Shakespeare."""
  if not all(isinstance(v, str) for v in x) or not all(isinstance(v, str) and len(v) == 1
                                                       for v in y):
    raise DataError(f"{where}: a text dataset needs 'x' strings and 'y' single characters.")
  lengths = {len(v) for v in x}
  if len(lengths) > 1:
    raise DataError(f"{where}: its windows have different lengths {sorted(lengths)}.")
  oov = text.special_tokens(len(text.SHAKESPEARE_CHARS))["oov"]
  ids = {c: i + 1 for i, c in enumerate(text.SHAKESPEARE_CHARS)}
  rows = np.array([[ids.get(c, oov) for c in window + nxt] for window, nxt in zip(x, y)],
                  np.int32)
  return rows[:, :-1], rows[:, 1:]


def load_leaf_split(folder: str, cache_dir: str = "") -> tuple[FederatedData, list[str]]:
  """One LEAF split folder, converted once and memory-mapped from the cache."""
  if not os.path.isdir(folder):
    raise DataError(f"{folder} does not exist. {_WHERE}")
  return cached(folder, "leaf", _VERSION, lambda: read_leaf_split(folder), cache_dir)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LeafConfig(DataSection):
  """A LEAF JSON dataset: its train/ and test/ split folders, converted once and cached."""

  path: str = ""
  input_shape: tuple[int, ...] = option((), check=(lambda t: all(v >= 1 for v in t),
                                                   "must list positive sizes (or be empty)"))
  cache_dir: str = ""

  def __post_init__(self):
    if not self.path:
      raise ConfigError("data.path is required when data.kind = 'leaf'. " + _WHERE)

  @classmethod
  def unused_keys(cls, values: dict) -> set[str]:
    """LEAF's folders give the split (config.yaml leaves the split keys out)."""
    return {"test_fraction", "holdout_clients"}

  def check_given(self, given: set[str]) -> None:
    if given & {"test_fraction", "holdout_clients"}:
      raise ConfigError("data.test_fraction / data.holdout_clients do not apply to "
                        "data.kind = 'leaf': its train/ and test/ folders give the split.")


def _shaped(data: FederatedData, shape: tuple[int, ...], folder: str) -> FederatedData:
  if not shape:
    return data
  x = data.features["x"]
  if int(np.prod(shape)) != int(np.prod(x.shape[1:])):
    raise ConfigError(f"data.input_shape = {list(shape)} does not fit {folder}'s examples of "
                      f"{int(np.prod(x.shape[1:]))} values.")
  return FederatedData({**data.features, "x": x.reshape((-1, *shape))}, data.starts, data.sizes)


@DATASETS.register("leaf", LeafConfig)
def _build(cfg: LeafConfig, ctx):
  """LEAF's train/ and test/ folders: (train, test) in the files' own split."""
  del ctx
  splits = []
  for name in ("train", "test"):
    folder = os.path.join(cfg.path, name)
    data = _shaped(load_leaf_split(folder, cfg.cache_dir)[0], cfg.input_shape, folder)
    vocabulary = len(text.SHAKESPEARE_CHARS) + 4
    if data.features["x"].dtype == np.int32 and cfg.num_classes != vocabulary:
      raise ConfigError(f"{folder} holds text (next-character rows over TFF's {vocabulary} "
                        f"ids); set data.num_classes: {vocabulary} (the models predict over "
                        "all of them, the last three being OOV, BOS and EOS).")
    splits.append(data)
  return tuple(splits)
