"""FedJAX SQLite files: converted exactly, cached atomically, memory-mapped, with clear errors.

The fixtures are written in FedJAX's exact format with an encoder written
here (msgpack extension type 1 = (shape, dtype name, C-order bytes), the blob
zlib-compressed, the table created with FedJAX's DDL), independent of the
decoder under test.
"""

import lzma
import os
import sqlite3
import sys
import zlib

import msgpack
import numpy as np
import pytest

from fedjax_sim.core.data import DataError
from fedjax_sim.datasets import fedjax_sqlite
from fedjax_sim.datasets.cache import cache_root
from fedjax_sim.runner.config import ConfigError, config_from_dict
from fedjax_sim.runner.io import read_metrics
from fedjax_sim.runner.run import run_experiment

_DDL = """CREATE TABLE federated_data (
  client_id BLOB NOT NULL PRIMARY KEY,
  data BLOB NOT NULL,
  num_examples INTEGER NOT NULL
);"""


def _ext(obj):
  if isinstance(obj, np.ndarray):
    payload = msgpack.packb((obj.shape, obj.dtype.name, obj.tobytes("C")), use_bin_type=True)
    return msgpack.ExtType(1, payload)
  raise TypeError(type(obj))


def _blob(features: dict) -> bytes:
  return zlib.compress(msgpack.packb(features, default=_ext, strict_types=True))


def _clients(seed, n_clients=4):
  rng = np.random.default_rng(seed)
  out = {}
  for i in range(n_clients):
    n = int(rng.integers(1, 6))
    y = rng.integers(0, 3, n).astype(np.int32)
    pixels = (rng.normal(size=(n, 4, 4)) + y[:, None, None]).astype(np.float32)
    out[f"{i:04x}".encode()] = {"pixels": pixels, "label": y}
  return out


def _write(path, clients, rows=None):
  with sqlite3.connect(path) as connection:
    connection.execute(_DDL)
    for cid, features in reversed(list(clients.items())):  # stored out of order
      connection.execute("INSERT INTO federated_data VALUES (?, ?, ?);",
                         (cid, _blob(features), len(features["label"])))
    for row in rows or ():
      connection.execute("INSERT INTO federated_data VALUES (?, ?, ?);", row)
  return str(path)


def _entries():
  root = cache_root()
  return sorted(os.listdir(root)) if os.path.isdir(root) else []


def test_conversion_is_exact_in_client_id_order_then_memory_mapped(tmp_path, monkeypatch):
  clients = _clients(0)
  path = _write(tmp_path / "train.sqlite", clients)
  data, ids = fedjax_sqlite.load_fedjax_sqlite(path, str(tmp_path / "cache"))
  assert ids == sorted(c.decode() for c in clients)
  for i, cid in enumerate(sorted(clients)):
    got = data.client(i)
    np.testing.assert_array_equal(got["pixels"], clients[cid]["pixels"])
    np.testing.assert_array_equal(got["label"], clients[cid]["label"])
    assert got["pixels"].dtype == np.float32 and got["label"].dtype == np.int32
  assert isinstance(data.features["pixels"], np.memmap)
  # A second load reads the cache only.
  monkeypatch.setattr(fedjax_sqlite, "read_fedjax_sqlite",
                      lambda p: (_ for _ in ()).throw(AssertionError("converted twice")))
  again, ids_again = fedjax_sqlite.load_fedjax_sqlite(path, str(tmp_path / "cache"))
  assert ids_again == ids
  np.testing.assert_array_equal(again.features["pixels"], data.features["pixels"])
  assert "tensorflow" not in sys.modules


def test_lzma_input_is_decompressed_once(tmp_path):
  clients = _clients(1)
  plain = _write(tmp_path / "a.sqlite", clients)
  packed = str(tmp_path / "b.sqlite.lzma")
  with open(plain, "rb") as src, lzma.open(packed, "wb") as dst:
    dst.write(src.read())
  data, ids = fedjax_sqlite.load_fedjax_sqlite(packed, str(tmp_path / "cache"))
  reference, _ = fedjax_sqlite.read_fedjax_sqlite(plain)
  np.testing.assert_array_equal(data.features["pixels"], reference.features["pixels"])
  assert len(ids) == 4
  with open(str(tmp_path / "bad.sqlite.lzma"), "wb") as f:
    f.write(b"not lzma at all")
  with pytest.raises(DataError, match="bad.sqlite.lzma is not a complete LZMA file"):
    fedjax_sqlite.load_fedjax_sqlite(str(tmp_path / "bad.sqlite.lzma"), str(tmp_path / "cache"))


@pytest.mark.parametrize("row,needle", [
    ((b"zz_bad", b"not zlib", 1), "client 'zz_bad': its data is not zlib-compressed"),
    ((b"zz_bad", zlib.compress(b"\xc1"), 1), "client 'zz_bad': its data is not a msgpack map"),
    ((b"zz_bad", _blob({"pixels": np.zeros((2, 4, 4), np.float32),
                        "label": np.zeros(2, np.int32)}), 3),
     "client 'zz_bad': feature 'pixels' has 2 examples but num_examples = 3"),
    ((b"zz_bad", _blob({"pixels": np.zeros((1, 5), np.float32), "label": np.zeros(1, np.int32)}),
      1), "client 'zz_bad': its features"),
])
def test_a_malformed_row_names_file_and_client_and_leaves_no_cache(tmp_path, row, needle):
  path = _write(tmp_path / "train.sqlite", _clients(2), rows=[row])
  cache = str(tmp_path / "cache")
  with pytest.raises(DataError, match=needle) as e:
    fedjax_sqlite.load_fedjax_sqlite(path, cache)
  assert "train.sqlite" in str(e.value)
  assert os.listdir(cache) == []  # no entry, no partial folder


def test_a_missing_file_a_non_sqlite_file_and_a_wrong_schema_are_named(tmp_path):
  with pytest.raises(DataError, match="nope.sqlite does not exist.*~/.cache/fedjax"):
    fedjax_sqlite.load_fedjax_sqlite(str(tmp_path / "nope.sqlite"))
  junk = tmp_path / "junk.sqlite"
  junk.write_bytes(b"this is not a database" * 100)
  with pytest.raises(DataError, match="junk.sqlite is not a FedJAX SQLite file"):
    fedjax_sqlite.read_fedjax_sqlite(str(junk))
  other = tmp_path / "other.sqlite"
  with sqlite3.connect(other) as connection:
    connection.execute("CREATE TABLE examples (split_name TEXT, client_id TEXT)")
  with pytest.raises(DataError, match="needs the table federated_data"):
    fedjax_sqlite.read_fedjax_sqlite(str(other))


def test_a_train_and_a_test_file_run_from_a_config(tmp_path):
  train = _write(tmp_path / "train.sqlite", _clients(3, n_clients=12))
  test = _write(tmp_path / "test.sqlite", _clients(4, n_clients=5))
  raw = {"seed": 0, "rounds": 2, "output_dir": str(tmp_path / "run"), "progress": False,
         "data": {"kind": "fedjax_sqlite", "path": train, "test_path": test, "x": "pixels",
                  "y": "label", "num_classes": 3, "cache_dir": str(tmp_path / "cache")},
         "model": {"kind": "logreg"}, "algorithm": {"batch_size": 2},
         "sampling": {"clients_per_round": 4}, "engine": {"block_size": 4},
         "eval": {"every": 1}}
  run_experiment(config_from_dict(raw), log=lambda *a: None)
  records = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
  test_examples = sum(len(c["label"]) for c in _clients(4, n_clients=5).values())
  assert [r["eval_clients"] for r in records] == [5, 5]  # exactly the test file's clients
  assert records[-1]["eval_examples"] == test_examples
  with pytest.raises(ConfigError, match="data.x = 'image'"):
    from fedjax_sim.runner.build import build_data
    build_data(config_from_dict({**raw, "data": {**raw["data"], "x": "image"}}))
  with pytest.raises(ConfigError, match="test_path gives the evaluation clients"):
    config_from_dict({**raw, "data": {**raw["data"], "test_fraction": 0.3}})
