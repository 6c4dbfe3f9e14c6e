"""FedJAX's SQLite federated datasets (registered as `data.kind = fedjax_sqlite`).

A FedJAX SQLite file has one table,

    federated_data(client_id BLOB PRIMARY KEY, data BLOB, num_examples INTEGER)

where `data` is one client's examples: a zlib-compressed msgpack map from
feature name to numpy array (FedJAX's `msgpack_serialize`, the encoding
`flax.serialization` shares: an ndarray is an extension of type 1 holding
`(shape, dtype name, bytes)`). FedJAX's dataset helpers keep such files in
`~/.cache/fedjax`, one file per split, sometimes `.lzma`-compressed.

The file is converted once into the packed store and cached (see
`datasets.cache`); clients keep their natural ids, in `client_id` order.
Numeric features only: byte-string features (raw text) are refused with a
`DataError` until the text tasks convert them.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import zlib

import numpy as np
from flax import serialization

from fedjax_sim.core.data import DataError, FederatedData
from fedjax_sim.core.registry import DATASETS, DataSection
from fedjax_sim.core.schema import ConfigError
from fedjax_sim.datasets.cache import cached, decompressed

_VERSION = 1
_WHERE = ("Files in FedJAX's SQLite format are what FedJAX's dataset helpers download into "
          "~/.cache/fedjax (one file per split); point data.path at one.")


def read_fedjax_sqlite(path: str) -> tuple[FederatedData, list[str]]:
  """Every client of a FedJAX SQLite file, in `client_id` order, and their ids.

  Raises:
    DataError: naming the file and the client when the file is not SQLite,
      lacks the table, or a client's blob does not decompress, decode, or
      agree with its `num_examples` and the other clients' features.
  """
  try:
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
  except sqlite3.Error as e:
    raise DataError(f"{path}: cannot open it as SQLite ({e}).") from e
  try:
    rows = connection.execute(
        "SELECT client_id, data, num_examples FROM federated_data ORDER BY client_id").fetchall()
  except sqlite3.DatabaseError as e:
    raise DataError(f"{path} is not a FedJAX SQLite file ({e}); it needs the table "
                    "federated_data(client_id, data, num_examples).") from e
  finally:
    connection.close()
  if not rows:
    raise DataError(f"{path}: the table federated_data has no client.")
  ids, clients, specs = [], [], None
  for client_id, blob, num_examples in rows:
    name = client_id.decode("utf-8", "replace") if isinstance(client_id, bytes) else str(client_id)
    where = f"{path}, client {name!r}"
    try:
      examples = serialization.msgpack_restore(zlib.decompress(blob))
    except zlib.error as e:
      raise DataError(f"{where}: its data is not zlib-compressed ({e}).") from e
    except Exception as e:  # msgpack raises several exception types on bad input
      raise DataError(f"{where}: its data is not a msgpack map of arrays ({e}).") from e
    if not isinstance(examples, dict) or not examples:
      raise DataError(f"{where}: its data is not a map from feature name to array.")
    arrays = {}
    for feature, value in examples.items():
      if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
        raise DataError(f"{where}: feature {feature!r} is not a numeric array (got "
                        f"{type(value).__name__}); text features are not converted yet.")
      if len(value) != num_examples:
        raise DataError(f"{where}: feature {feature!r} has {len(value)} examples but "
                        f"num_examples = {num_examples}.")
      arrays[feature] = value
    spec = {k: (v.dtype, v.shape[1:]) for k, v in arrays.items()}
    if specs is None:
      specs = spec
    elif spec != specs:
      raise DataError(f"{where}: its features {spec} differ from the first client's {specs}.")
    ids.append(name)
    clients.append(arrays)
  features = {k: np.concatenate([c[k] for c in clients]) for k in specs}
  offsets = np.concatenate([[0], np.cumsum([len(next(iter(c.values()))) for c in clients])])
  return FederatedData.from_offsets(features, offsets), ids


def load_fedjax_sqlite(path: str, cache_dir: str = "") -> tuple[FederatedData, list[str]]:
  """A FedJAX SQLite file (or `.lzma`), converted once and memory-mapped from the cache."""
  if not os.path.exists(path):
    raise DataError(f"{path} does not exist. {_WHERE}")
  source = decompressed(path, cache_dir)
  return cached(source, "fedjax_sqlite", _VERSION, lambda: read_fedjax_sqlite(source), cache_dir)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FedJaxSqliteConfig(DataSection):
  """A FedJAX SQLite file, converted once and memory-mapped from the cache."""

  path: str = ""
  test_path: str = ""
  x: str = "x"
  y: str = "y"
  cache_dir: str = ""

  def __post_init__(self):
    if not self.path:
      raise ConfigError("data.path is required when data.kind = 'fedjax_sqlite'. " + _WHERE)

  @classmethod
  def unused_keys(cls, values: dict) -> set[str]:
    """With a test file the files give the split (config.yaml leaves the split keys out)."""
    return {"test_fraction", "holdout_clients"} if values.get("test_path") else set()

  def check_given(self, given: set[str]) -> None:
    """With a test file, the split is the files': the split keys would be ignored."""
    if self.test_path and given & {"test_fraction", "holdout_clients"}:
      raise ConfigError("data.test_fraction / data.holdout_clients are set but data.test_path "
                        "gives the evaluation clients; remove them (or test_path).")


def _features_as_xy(data: FederatedData, cfg: FedJaxSqliteConfig, path: str) -> FederatedData:
  """Renames the features `cfg.x` and `cfg.y` to `x` and `y` (what the models read)."""
  features = dict(data.features)
  for target, source in (("x", cfg.x), ("y", cfg.y)):
    if source not in features:
      raise ConfigError(f"data.{target} = {source!r}: {path} has features "
                        f"{sorted(data.features)}; name the one the models should read as "
                        f"{target!r}.")
  x, y = features.pop(cfg.x), features.pop(cfg.y)
  if y.dtype.kind == "f":
    if not np.all(np.asarray(y) == np.round(np.asarray(y))):
      raise ConfigError(f"data.y = {cfg.y!r}: {path} stores non-integer labels.")
  out = {**features, "x": np.asarray(x, np.float32) if x.dtype != np.float32 else x,
         "y": np.asarray(y, np.int32) if y.dtype != np.int32 else y}
  return FederatedData(out, data.starts, data.sizes)


@DATASETS.register("fedjax_sqlite", FedJaxSqliteConfig)
def _build(cfg: FedJaxSqliteConfig, ctx):
  """A FedJAX SQLite file (and optionally its test split's file)."""
  del ctx
  train = _features_as_xy(load_fedjax_sqlite(cfg.path, cfg.cache_dir)[0], cfg, cfg.path)
  if not cfg.test_path:
    return train
  test = _features_as_xy(load_fedjax_sqlite(cfg.test_path, cfg.cache_dir)[0], cfg,
                         cfg.test_path)
  return train, test
