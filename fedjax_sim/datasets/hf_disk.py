"""A Hugging Face `datasets` dataset saved by `save_to_disk` (registered as `data.kind = hf_disk`).

`DatasetDict.save_to_disk(path)` writes `path/dataset_dict.json` and one
folder of Arrow files per split; `Dataset.save_to_disk(path)` writes a single
split. This loader opens either with `datasets.load_from_disk` (never the
Hub) and needs the optional extra `pip install 'fedjax_sim[hf]'`.

The columns the models read (`data.x`, `data.y`; `data.coarse` for the
Pachinko partition; `data.client_column` for natural clients) of a split are
converted once into the packed store and cached (see `datasets.cache`),
keyed by the saved folder, the split and the columns. Image columns are
decoded (PIL) into uint8 arrays; numeric and array columns are read with the
datasets NumPy formatter (which reads floats as float32). uint8 inputs are
then scaled by 1/255 like `data.kind = npz` does.

Clients: with `client_column`, every distinct value of that column is a
client (its natural id is kept, clients sorted by id, rows in stored order
within a client); without it, a split is partitioned like `npz` data
(`partition`, `num_clients`, ...).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from fedjax_sim.core.data import DataError, FederatedData
from fedjax_sim.core.registry import DATASETS
from fedjax_sim.core.schema import ConfigError
from fedjax_sim.datasets.cache import cached
from fedjax_sim.datasets.npz import (_PARTITION_KEYS, SplitArraysSection, inputs, labels,
                                     partition_splits)

_VERSION = 1
_WHERE = ("Write one with `DatasetDict.save_to_disk(path)` (or `Dataset.save_to_disk`) from the "
          "Hugging Face datasets package, e.g. after datasets.load_dataset(...) on a machine with "
          "internet access.")
_BATCH = 1024
# Keys that only the partitioned form reads (the natural clients of client_column ignore them).
_PARTITION_ONLY = ("num_clients", "partition", "test_clients") + tuple(
    k for keys in _PARTITION_KEYS.values() for k in keys)


def _datasets():
  try:
    import datasets  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConfigError("data.kind = 'hf_disk' needs the Hugging Face datasets package: "
                      "pip install 'fedjax_sim[hf]'.") from e
  return datasets


def _split(path: str, split: str):
  """The `datasets.Dataset` of one split of a saved folder, and its name in messages."""
  datasets = _datasets()
  if not os.path.isdir(path):
    raise DataError(f"{path} does not exist. {_WHERE}")
  try:
    saved = datasets.load_from_disk(path)
  except Exception as e:  # datasets raises FileNotFoundError, ValueError, Arrow errors
    raise DataError(f"{path}: datasets.load_from_disk cannot open it ({type(e).__name__}: "
                    f"{e}); it must be a complete, uncorrupted folder written by save_to_disk. "
                    f"{_WHERE}") from e
  if isinstance(saved, datasets.DatasetDict):
    if split not in saved:
      raise ConfigError(f"{path} has no split {split!r}; it has {sorted(saved)}. Set "
                        "data.train_split / data.test_split (test_split: '' splits the training "
                        "clients instead).")
    return saved[split], f"{path}, split {split!r}"
  return saved, path


def read_hf_split(path: str, split: str, columns: dict[str, str],
                  client_column: str = "") -> tuple[FederatedData, list[str]]:
  """The given columns of one split of a saved dataset, and the clients' ids.

  Args:
    path: the folder `save_to_disk` wrote.
    split: the split's name (ignored for a single saved `Dataset`).
    columns: role -> column name (e.g. {"x": "img", "y": "label"}).
    client_column: a column of client ids: one client per distinct value,
      sorted by id, rows in stored order; "" for one client holding the split
      (id: the split's name).

  Returns:
    `(data, ids)`: features named by role, as stored (images uint8).

  Raises:
    DataError: naming the folder, the split and the row when a value does
      not decode, is missing (null), or has another shape than the first
      row's; ConfigError for a split or column the dataset does not have.
  """
  ds, where = _split(path, split)
  wanted = dict(columns)
  if client_column:
    wanted["client"] = client_column
  for role, column in wanted.items():
    if column not in ds.column_names:
      key = "client_column" if role == "client" else role
      raise ConfigError(f"data.{key} = {column!r}: {where} has columns {ds.column_names}.")
  if not len(ds):
    raise DataError(f"{where} has no row.")
  table = ds.select_columns(sorted(set(wanted.values()))).with_format("numpy")
  parts: dict[str, list[np.ndarray]] = {role: [] for role in wanted}
  first: dict[str, np.ndarray] = {}
  for lo in range(0, len(ds), _BATCH):
    hi = min(lo + _BATCH, len(ds))
    try:
      batch = table[lo:hi]
    except Exception:  # a row that does not decode: find it
      batch = None
      for row in range(lo, hi):
        try:
          table[row]
        except Exception as e:
          raise DataError(f"{where}, row {row}: cannot decode it ({type(e).__name__}: "
                          f"{e}).") from e
    if batch is None:
      raise DataError(f"{where}, rows {lo} to {hi - 1}: cannot decode them.")
    for role, column in wanted.items():
      parts[role].append(_column(batch[column], column, role, lo, where, first))
  arrays = {role: np.concatenate(chunks) for role, chunks in parts.items()}
  if not client_column:
    return FederatedData.from_offsets(arrays, [0, len(ds)]), [split]
  ids, client_of = np.unique(arrays.pop("client"), return_inverse=True)
  order = np.argsort(client_of, kind="stable")
  offsets = np.concatenate([[0], np.cumsum(np.bincount(client_of, minlength=len(ids)))])
  return (FederatedData.from_offsets({k: v[order] for k, v in arrays.items()}, offsets),
          [str(i) for i in ids.tolist()])


def _column(values, column: str, role: str, lo: int, where: str,
            first: dict[str, np.ndarray]) -> np.ndarray:
  """One batch of a column as an array of fixed-shape rows (checked against the first row)."""
  if role == "client":
    values = np.asarray(values)
    if values.dtype == object:
      for i, value in enumerate(values):
        if value is None:
          raise DataError(f"{where}, row {lo + i}: client_column {column!r} is null.")
      values = values.astype(str)
    elif values.dtype.kind == "f" and np.isnan(values).any():  # a null in a numeric column
      raise DataError(f"{where}, row {lo + int(np.argmax(np.isnan(values)))}: client_column "
                      f"{column!r} is null.")
    return values
  if isinstance(values, np.ndarray) and values.dtype != object:  # stacked: one shape and dtype
    ref = first.setdefault(role, values[0])
    if values.shape[1:] != ref.shape or values.dtype != ref.dtype:
      raise DataError(f"{where}, row {lo}: column {column!r} has shape {values.shape[1:]} and "
                      f"dtype {values.dtype}, the first row {ref.shape} and {ref.dtype}; only "
                      "fixed-shape columns convert.")
    return values
  rows = []  # ragged or object rows (images of several sizes, nulls): check each
  for i, value in enumerate(values):
    array = np.asarray(value)
    if value is None or array.dtype == object:
      raise DataError(f"{where}, row {lo + i}: column {column!r} holds "
                      f"{'null' if value is None else repr(value)[:80]}, not a number or array.")
    ref = first.setdefault(role, array)
    if array.shape != ref.shape or array.dtype != ref.dtype:
      raise DataError(f"{where}, row {lo + i}: column {column!r} has shape {array.shape} and "
                      f"dtype {array.dtype}, the first row {ref.shape} and {ref.dtype}; only "
                      "fixed-shape columns convert.")
    rows.append(array)
  return np.stack(rows)


def load_hf_split(path: str, split: str, columns: dict[str, str], client_column: str = "",
                  cache_dir: str = "") -> tuple[FederatedData, list[str]]:
  """`read_hf_split` converted once and memory-mapped from the cache."""
  if not os.path.isdir(path):
    raise DataError(f"{path} does not exist. {_WHERE}")
  kind = (f"hf_disk:{split}:" + ",".join(f"{r}={columns[r]}" for r in sorted(columns))
          + f":clients={client_column}")
  return cached(path, kind, _VERSION, lambda: read_hf_split(path, split, columns, client_column),
                cache_dir)


@dataclasses.dataclass(frozen=True, kw_only=True)
class HfDiskConfig(SplitArraysSection):
  """A Hugging Face dataset saved with save_to_disk: natural clients or partitioned."""

  path: str = ""
  client_column: str = ""

  def __post_init__(self):
    if not self.path:
      raise ConfigError("data.path is required when data.kind = 'hf_disk'. " + _WHERE)

  def population(self) -> int | None:
    return None if self.client_column else self.num_clients

  @classmethod
  def unused_keys(cls, values: dict) -> set[str]:
    """With client_column the partition keys (at their defaults) do not apply."""
    unused = set(super().unused_keys(values))
    if values.get("client_column"):
      defaults = {f.name: f.default for f in dataclasses.fields(cls)}
      unused |= {k for k in _PARTITION_ONLY if values.get(k, defaults[k]) == defaults[k]}
    return unused

  def check_given(self, given: set[str]) -> None:
    super().check_given(given)
    if self.client_column and given & set(_PARTITION_ONLY):
      raise ConfigError(f"data.{sorted(given & set(_PARTITION_ONLY))[0]} is set but "
                        f"data.client_column = {self.client_column!r} gives the clients; remove "
                        "it (or client_column, to partition the rows instead).")


def _where(cfg: HfDiskConfig, split: str) -> str:
  return f"data.path {cfg.path!r}, split {split!r}"


@DATASETS.register("hf_disk", HfDiskConfig)
def _build(cfg: HfDiskConfig, ctx):
  """A saved Hugging Face dataset: natural clients (client_column) or its rows partitioned."""
  if not os.path.isdir(cfg.path):
    raise DataError(f"{cfg.path} does not exist. {_WHERE}")
  if cfg.test_split and _single_dataset(cfg.path):
    raise ConfigError(f"data.path {cfg.path!r} holds a single Dataset, not a DatasetDict of "
                      f"splits, so it has no test split {cfg.test_split!r}; set data.test_split: "
                      "'' to split its clients by test_fraction / holdout_clients.")
  columns = {"x": cfg.x, "y": cfg.y}
  if cfg.partition == "pachinko" and not cfg.client_column:
    columns["coarse"] = cfg.coarse
  splits = [cfg.train_split] + ([cfg.test_split] if cfg.test_split else [])
  loaded = [(load_hf_split(cfg.path, split, columns, cfg.client_column, cfg.cache_dir)[0], split)
            for split in splits]
  if cfg.client_column:
    out = tuple(_natural(cfg, data, split) for data, split in loaded)
    return out if len(out) == 2 else out[0]
  arrays = []
  for data, split in loaded:
    f, where = data.features, _where(cfg, split)
    coarse = labels(where, np.asarray(f["coarse"]), cfg.coarse) if "coarse" in f else None
    arrays.append((inputs(where, np.asarray(f["x"]), warn_uint8=False),
                   labels(where, np.asarray(f["y"]), cfg.y), coarse, where))
  return partition_splits(cfg, ctx.seed, arrays[0], arrays[1] if len(arrays) == 2 else None)


def _single_dataset(path: str) -> bool:
  return not os.path.exists(os.path.join(path, "dataset_dict.json"))


def _natural(cfg: HfDiskConfig, data: FederatedData, split: str) -> FederatedData:
  where = _where(cfg, split)
  x = inputs(where, np.asarray(data.features["x"]), warn_uint8=False)
  y = labels(where, np.asarray(data.features["y"]), cfg.y)
  return FederatedData({"x": x, "y": y}, data.starts, data.sizes)
