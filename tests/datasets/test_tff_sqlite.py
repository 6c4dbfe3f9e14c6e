"""TFF SQLite files: every task converted exactly, cached, with clear errors.

Fixtures are written in TFF's exact schema, and their `tf.train.Example`
protos are encoded by a protobuf wire-format writer written here (field
numbers of tensorflow/core/example/{example,feature}.proto), independent of
the protobuf classes the loader parses with. Expected arrays are derived by
hand from TFF's preprocessing rules.
"""

import lzma
import os
import sqlite3
import struct
import sys

import numpy as np
import pytest

from fedjax_sim.core.data import DataError
from fedjax_sim.datasets import text
from fedjax_sim.datasets.cache import cache_root
from fedjax_sim.datasets.tff_sqlite import TffSqliteConfig, load_tff_sqlite
from fedjax_sim.runner.config import ConfigError, config_from_dict

# -- a protobuf writer for tf.train.Example ----------------------------------------


def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1  # negative int64: ten-byte two's complement
  out = bytearray()
  while True:
    byte, n = n & 0x7F, n >> 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _feature(values) -> bytes:
  if isinstance(values, bytes):  # BytesList (Feature field 1), one value
    return _len_field(1, _len_field(1, values))
  values = list(values)
  if all(isinstance(v, float) for v in values):  # FloatList (2), packed little-endian floats
    return _len_field(2, _len_field(1, struct.pack(f"<{len(values)}f", *values)))
  return _len_field(3, _len_field(1, b"".join(_varint(int(v)) for v in values)))  # Int64List


def encode_example(features: dict) -> bytes:
  """Example{features: Features{feature: map<string, Feature>}} in wire format."""
  entries = b"".join(_len_field(1, _len_field(1, k.encode()) + _len_field(2, _feature(v)))
                     for k, v in features.items())
  return _len_field(1, entries)


def write_tff_sqlite(path, rows, extra_metadata=()):
  """rows: (split, client_id, features or raw bytes), in file order."""
  con = sqlite3.connect(path)
  con.execute("CREATE TABLE examples (split_name TEXT NOT NULL, client_id TEXT NOT NULL, "
              "serialized_example_proto BLOB NOT NULL)")
  con.execute("CREATE TABLE client_metadata (client_id TEXT NOT NULL, split_name TEXT NOT NULL, "
              "num_examples INTEGER NOT NULL)")
  counts = {}
  for split, client, features in rows:
    blob = features if isinstance(features, bytes) else encode_example(features)
    con.execute("INSERT INTO examples VALUES (?, ?, ?)", (split, client, blob))
    counts[(split, client)] = counts.get((split, client), 0) + 1
  for (split, client), n in list(counts.items()) + list(extra_metadata):
    con.execute("INSERT INTO client_metadata VALUES (?, ?, ?)", (client, split, n))
  con.commit()
  con.close()
  return str(path)


def _emnist_rows(rng):
  rows, expected = [], {}
  # Clients written out of sorted order and interleaved: the loader sorts clients
  # and keeps each client's rows in file order.
  for split in ("all_train", "all_test"):
    for i, client in enumerate(["f_2", "f_0", "f_2", "f_1", "f_0", "f_2"]):
      pixels = rng.integers(0, 256, 784).astype(np.float32) / 255.0
      label = int(rng.integers(0, 62))
      rows.append((split, client, {"pixels": [float(v) for v in pixels], "label": [label]}))
      expected.setdefault((split, client), []).append((pixels, label))
  return rows, expected


def test_emnist_converts_exactly_sorted_clients_file_order_and_is_cached(tmp_path):
  rows, expected = _emnist_rows(np.random.default_rng(0))
  path = write_tff_sqlite(tmp_path / "emnist_all.sqlite", rows)
  cfg = TffSqliteConfig(path=path, cache_dir=str(tmp_path / "cache"))
  for split in ("all_train", "all_test"):
    data, ids = load_tff_sqlite(cfg, split)
    assert ids == ["f_0", "f_1", "f_2"]
    assert data.features["x"].dtype == np.float32 and data.features["x"].shape[1:] == (28, 28, 1)
    for c, client in enumerate(ids):
      got = data.client(c)
      want = expected[(split, client)]
      np.testing.assert_array_equal(got["x"][..., 0].reshape(len(want), -1),
                                    np.stack([p for p, _ in want]))
      np.testing.assert_array_equal(got["y"], [label for _, label in want])
  assert "tensorflow" not in sys.modules
  # A second load memory-maps the cache entry; invert_pixels is a different entry.
  again, _ = load_tff_sqlite(cfg, "all_train")
  assert isinstance(again.features["x"], np.memmap)
  inverted, _ = load_tff_sqlite(TffSqliteConfig(path=path, invert_pixels=True,
                                                cache_dir=str(tmp_path / "cache")), "all_train")
  np.testing.assert_allclose(inverted.features["x"], 1.0 - again.features["x"])


def test_cifar100_keeps_uint8_images_and_both_labels(tmp_path):
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (3, 32, 32, 3))
  rows = [("train", "c", {"coarse_label": [int(i) + 10], "image": images[i].reshape(-1),
                          "label": [int(i) + 50]}) for i in range(3)]
  rows.append(("test", "c", {"coarse_label": [1], "image": images[0].reshape(-1), "label": [2]}))
  path = write_tff_sqlite(tmp_path / "cifar100.sqlite", rows)
  data, ids = load_tff_sqlite(TffSqliteConfig(task="cifar100", path=path,
                                              cache_dir=str(tmp_path / "c")), "train")
  assert ids == ["c"] and data.features["x"].dtype == np.uint8
  np.testing.assert_array_equal(data.features["x"], images)
  np.testing.assert_array_equal(data.features["y"], [50, 51, 52])
  np.testing.assert_array_equal(data.features["y_coarse"], [10, 11, 12])


def test_shakespeare_tokens_follow_tffs_character_preprocessing(tmp_path):
  long = b"a" * 100
  rows = [("train", "KING", {"snippets": b"dh"}), ("train", "KING", {"snippets": long}),
          ("train", "FOOL", {"snippets": "d\u00e9".encode()}),  # 2 UTF-8 bytes -> 2 OOV tokens
          ("test", "FOOL", {"snippets": b"x"})]
  path = write_tff_sqlite(tmp_path / "shakespeare.sqlite", rows)
  data, ids = load_tff_sqlite(TffSqliteConfig(task="shakespeare", path=path,
                                              cache_dir=str(tmp_path / "c")), "train")
  assert ids == ["FOOL", "KING"]
  # Hand-derived: 'd' is vocabulary position 0 -> id 1, 'h' -> 2, 'a' -> 64
  # (counted by hand in TFF's string: ':' is 61, '\n' 62, 'a' 63); oov 87, bos 88,
  # eos 89, pad 0.
  assert len(text.SHAKESPEARE_CHARS) == 86 and text.SHAKESPEARE_CHARS.index("a") == 63
  fool = data.client(0)
  assert fool["x"].shape == (1, 80)
  np.testing.assert_array_equal(fool["x"][0, :5], [88, 1, 87, 87, 89])
  np.testing.assert_array_equal(fool["y"][0, :4], [1, 87, 87, 89])
  assert not fool["x"][0, 5:].any() and not fool["y"][0, 4:].any()
  king = data.client(1)
  # "dh" -> one row; 100 'a' + bos + eos = 102 tokens -> two rows of 81.
  assert king["x"].shape == (3, 80)
  np.testing.assert_array_equal(king["x"][0, :3], [88, 1, 2])
  np.testing.assert_array_equal(king["y"][0, :3], [1, 2, 89])
  stream = np.concatenate([[88], [64] * 100, [89], [0] * 60])  # 162 = 2 * 81
  np.testing.assert_array_equal(king["x"][1], stream[:80])
  np.testing.assert_array_equal(king["y"][1], stream[1:81])
  np.testing.assert_array_equal(king["x"][2], stream[81:161])
  np.testing.assert_array_equal(king["y"][2], stream[82:162])


def _stackoverflow(tmp_path, n_extra=0):
  vocab = tmp_path / "stackoverflow.word_count"
  vocab.write_text("the 50\nis 40\ncode 30\nrare 1\n")
  tags = tmp_path / "stackoverflow.tag_count"
  tags.write_text('{"css": 3, "python": 9, "sql": 3, "rare": 1}')
  so = {"creation_date": b"2010-01-08 09:34:05 UTC", "score": [-3], "type": b"question",
        "title": b"the sql code", "tags": b"python|sql|unknown"}
  long_sentence = b" ".join([b"the"] * 25)
  rows = [("train", "u1", {**so, "tokens": b"the code is broken"}),
          ("train", "u1", {**so, "tokens": long_sentence}),
          ("train", "u0", {**so, "tokens": b"code"})]
  rows += [("train", "u0", {**so, "tokens": b"is"})] * n_extra
  rows += [("test", "u0", {**so, "tokens": b"the"}), ("heldout", "u9", {**so, "tokens": b"is"})]
  return write_tff_sqlite(tmp_path / "stackoverflow.sqlite", rows), str(vocab), str(tags)


def test_stackoverflow_next_word_rows_follow_tffs_word_preprocessing(tmp_path):
  path, vocab, _ = _stackoverflow(tmp_path)
  cfg = TffSqliteConfig(task="stackoverflow_nwp", path=path, vocab_path=vocab, vocab_size=3,
                        cache_dir=str(tmp_path / "c"))
  data, ids = load_tff_sqlite(cfg, "train")
  assert ids == ["u0", "u1"]
  # Vocabulary the=1, is=2, code=3 (vocab_size 3: 'rare' is cut); oov 4, bos 5, eos 6.
  u1 = data.client(1)
  np.testing.assert_array_equal(u1["x"][0, :6], [5, 1, 3, 2, 4, 6])
  np.testing.assert_array_equal(u1["y"][0, :5], [1, 3, 2, 4, 6])
  assert not u1["x"][0, 6:].any() and not u1["y"][0, 5:].any()
  # 25 words: truncated to 20, no eos; x = bos + 19 words, y = 20 words.
  np.testing.assert_array_equal(u1["x"][1], [5] + [1] * 19)
  np.testing.assert_array_equal(u1["y"][1], [1] * 20)
  assert data.features["x"].dtype == np.int32 and data.features["x"].shape[1:] == (20,)
  # The held-out split is a split like any other.
  held, held_ids = load_tff_sqlite(cfg, "heldout")
  assert held_ids == ["u9"] and held.client(0)["x"][0, :2].tolist() == [5, 2]


def test_stackoverflow_caps_examples_per_client_in_file_order(tmp_path):
  path, vocab, _ = _stackoverflow(tmp_path, n_extra=4)
  cfg = TffSqliteConfig(task="stackoverflow_nwp", path=path, vocab_path=vocab, vocab_size=3,
                        max_examples=2, cache_dir=str(tmp_path / "c"))
  data, _ = load_tff_sqlite(cfg, "train")
  np.testing.assert_array_equal(data.sizes, [2, 2])
  np.testing.assert_array_equal(data.client(0)["x"][:, 1], [3, 2])  # "code", then the first "is"


def test_stackoverflow_tags_bag_of_words_ids_and_tag_ids(tmp_path):
  path, vocab, tags = _stackoverflow(tmp_path)
  cfg = TffSqliteConfig(task="stackoverflow_tag", path=path, vocab_path=vocab, tag_path=tags,
                        vocab_size=3, num_tags=2, max_words=8, cache_dir=str(tmp_path / "c"))
  data, _ = load_tff_sqlite(cfg, "train")
  # tokens + ' ' + title = "code the sql code": code=3, the=1, sql=oov 4, code=3.
  np.testing.assert_array_equal(data.client(0)["x"][0], [3, 1, 4, 3, 0, 0, 0, 0])
  # Tags by decreasing count, ties in file order: python=0, css=1 ('sql' is cut at 2).
  np.testing.assert_array_equal(data.client(0)["y"][0], [0, -1, -1, -1, -1])
  assert data.features["x"].shape[1:] == (8,) and data.features["y"].shape[1:] == (5,)


def test_config_reads_the_task_fixes_classes_and_refuses_split_keys(tmp_path):
  rows, _ = _emnist_rows(np.random.default_rng(0))
  path = write_tff_sqlite(tmp_path / "e.sqlite", rows)
  c = config_from_dict({"data": {"kind": "tff_sqlite", "task": "emnist", "path": path}})
  from fedjax_sim.runner.build import build_data, build_model
  train, test = build_data(c)
  assert train.num_clients == 3 and test.num_clients == 3
  assert build_model(c, train).apply is not None
  from fedjax_sim.core.registry import DATASETS
  assert DATASETS.trait(c.data, "num_classes") == 62
  with pytest.raises(ConfigError, match="fixed by data.task"):
    config_from_dict({"data": {"kind": "tff_sqlite", "path": path, "num_classes": 10}})
  with pytest.raises(ConfigError, match="test_split"):
    config_from_dict({"data": {"kind": "tff_sqlite", "path": path, "test_fraction": 0.5}})
  with pytest.raises(ConfigError, match="vocab_path is required.*word_count"):
    build_data(config_from_dict({"data": {"kind": "tff_sqlite", "path": path,
                                          "task": "stackoverflow_nwp"}}))


def test_missing_corrupt_and_inconsistent_files_name_the_problem(tmp_path):
  cache = str(tmp_path / "cache")
  with pytest.raises(DataError, match="emnist_all.sqlite.lzma"):
    load_tff_sqlite(TffSqliteConfig(path=str(tmp_path / "nope.sqlite"), cache_dir=cache),
                    "all_train")
  junk = tmp_path / "junk.sqlite"
  junk.write_bytes(b"this is not sqlite" * 100)
  with pytest.raises(DataError, match="junk.sqlite"):
    load_tff_sqlite(TffSqliteConfig(path=str(junk), cache_dir=cache), "all_train")
  rows, _ = _emnist_rows(np.random.default_rng(0))
  good = write_tff_sqlite(tmp_path / "good.sqlite", rows)
  with pytest.raises(DataError, match="splits are.*all_test"):
    load_tff_sqlite(TffSqliteConfig(path=good, cache_dir=cache), "digits_only_train")
  load_tff_sqlite(TffSqliteConfig(path=good, cache_dir=cache), "all_train")
  entries = sorted(os.listdir(cache_root(cache)))
  # One malformed proto: the error names the client and the row; no cache entry is
  # left behind and the existing one is untouched.
  bad_rows = rows[:3] + [("all_train", "f_1", b"\xff\xff\xff garbage")] + rows[3:]
  bad = write_tff_sqlite(tmp_path / "bad.sqlite", bad_rows)
  with pytest.raises(DataError, match=r"client 'f_1', row 4.*tf.train.Example"):
    load_tff_sqlite(TffSqliteConfig(path=bad, cache_dir=cache), "all_train")
  assert sorted(os.listdir(cache_root(cache))) == entries
  # A feature of the wrong size, and counts that disagree with client_metadata.
  short = write_tff_sqlite(tmp_path / "short.sqlite",
                           [("all_train", "a", {"pixels": [0.5] * 10, "label": [1]})])
  with pytest.raises(DataError, match="'pixels' has 10 values, expected 784"):
    load_tff_sqlite(TffSqliteConfig(path=short, cache_dir=cache), "all_train")
  lying = write_tff_sqlite(tmp_path / "lying.sqlite", rows[:1],
                           extra_metadata=[(("all_train", "ghost"), 3)])
  with pytest.raises(DataError, match="'ghost': 0 examples but client_metadata says 3"):
    load_tff_sqlite(TffSqliteConfig(path=lying, cache_dir=cache), "all_train")
  wrong_task = write_tff_sqlite(tmp_path / "w.sqlite", [("train", "a", {"snippets": b"x"})])
  with pytest.raises(DataError, match="no feature 'image'.*data.task"):
    load_tff_sqlite(TffSqliteConfig(task="cifar100", path=wrong_task, cache_dir=cache), "train")


def test_lzma_file_is_decompressed_once_and_converted(tmp_path):
  rows, expected = _emnist_rows(np.random.default_rng(3))
  raw = write_tff_sqlite(tmp_path / "emnist_all.sqlite", rows)
  packed = tmp_path / "emnist_all.sqlite.lzma"
  with open(raw, "rb") as src:
    packed.write_bytes(lzma.compress(src.read()))
  data, ids = load_tff_sqlite(TffSqliteConfig(path=str(packed), cache_dir=str(tmp_path / "c")),
                              "all_test")
  np.testing.assert_array_equal(data.client(0)["y"],
                                [label for _, label in expected[("all_test", "f_0")]])
