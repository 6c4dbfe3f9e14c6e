"""TensorFlow Federated's SQLite datasets (registered as `data.kind = tff_sqlite`).

TFF ships its federated benchmarks as SQLite files (`emnist_all.sqlite.lzma`,
`shakespeare.sqlite.lzma`, `stackoverflow.sqlite.lzma`,
`cifar100.sqlite.lzma`) with two tables:

    examples(split_name, client_id, serialized_example_proto)
    client_metadata(client_id, split_name, num_examples)

Each `serialized_example_proto` is a `tf.train.Example`. We parse it with the
protobuf classes `tensorflow-datasets` ships (`tensorflow_datasets.proto`),
never with TensorFlow, and convert one split once into the packed store (see
`datasets.cache`): clients sorted by id (as TFF's `SqlClientData` lists them),
each client's examples in the file's row order. A `.lzma` file is
decompressed once into the cache.

Tasks (`data.task`), with the features TFF's loaders parse and our arrays:

* `emnist` (62 classes; splits `all_train` / `all_test`) and `emnist_digits`
  (10 classes; `digits_only_train` / `digits_only_test`): `pixels` float
  [28, 28] (1.0 is the background, 0.0 the ink: the inverse of MNIST; kept
  as TFF and Reddi et al. train on it unless `invert_pixels`), `label` int64.
  -> x float32 [28, 28, 1], y int32.
* `cifar100` (splits `train` / `test`): `image` int64 [32, 32, 3], `label`
  (100 fine classes) and `coarse_label` (20) int64. -> x uint8 [32, 32, 3]
  (the models scale it), y int32, y_coarse int32.
* `shakespeare` (`train` / `test`): `snippets` bytes. -> next-character
  rows x, y int32 [80] over 90 ids (`datasets.text`).
* `stackoverflow_nwp` (`train`, and `test` or `heldout`): `tokens` bytes.
  -> next-word rows x, y int32 [20] over the `vocab_size` most frequent
  words of the word-count file + 4 specials; at most `max_examples` (1,000)
  sentences per client.
* `stackoverflow_tag`: `tokens`, `title`, `tags` bytes. -> x int32
  [max_words] word ids (bag of words, built by the model), y int32 [5] ids of
  the `num_tags` (500) most frequent tags, -1 padded; at most `max_examples`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sqlite3
from typing import Literal

import numpy as np

from fedjax_sim.core.data import DataError, FederatedData
from fedjax_sim.core.registry import DATASETS, DataSection
from fedjax_sim.core.schema import ConfigError, option, positive
from fedjax_sim.datasets import text
from fedjax_sim.datasets.cache import cached, decompressed

_VERSION = 1
_BUCKET = "https://storage.googleapis.com/tff-datasets-public/"
_FILES = {"emnist": "emnist_all.sqlite.lzma", "emnist_digits": "emnist_all.sqlite.lzma",
          "cifar100": "cifar100.sqlite.lzma", "shakespeare": "shakespeare.sqlite.lzma",
          "stackoverflow_nwp": "stackoverflow.sqlite.lzma",
          "stackoverflow_tag": "stackoverflow.sqlite.lzma"}
_SPLITS = {"emnist": ("all_train", "all_test"),
           "emnist_digits": ("digits_only_train", "digits_only_test"),
           "cifar100": ("train", "test"), "shakespeare": ("train", "test"),
           "stackoverflow_nwp": ("train", "test"), "stackoverflow_tag": ("train", "test")}
_MAX_TAGS = 5  # Stack Overflow questions carry at most five tags
Task = Literal["emnist", "emnist_digits", "cifar100", "shakespeare", "stackoverflow_nwp",
               "stackoverflow_tag"]


def where_to_get(task: str) -> str:
  name = _FILES[task]
  extra = ""
  if task.startswith("stackoverflow"):
    extra = (f" The vocabulary comes from {_BUCKET}stackoverflow.word_count.tar.bz2 (extract "
             "stackoverflow.word_count; data.vocab_path)")
    if task == "stackoverflow_tag":
      extra += (f" and the tags from {_BUCKET}stackoverflow.tag_count.tar.bz2 (extract "
                "stackoverflow.tag_count; data.tag_path)")
    extra += "."
  return (f"Download {_BUCKET}{name} (TFF's file; keep it .lzma or decompress it) and point "
          f"data.path at it.{extra}")


# -- reading the file ---------------------------------------------------------------


def _example_class():
  # tensorflow-datasets ships the tf.train.Example protos; importing them does not import TF.
  from tensorflow_datasets.proto import tf_example_generated_pb2
  return tf_example_generated_pb2.Example


def parse_example(blob: bytes, where: str) -> dict:
  """A serialized `tf.train.Example` as `{feature: list of bytes | float | int}`."""
  from google.protobuf.message import DecodeError
  example = _example_class()()
  try:
    example.ParseFromString(blob)
  except (DecodeError, TypeError) as e:
    raise DataError(f"{where}: not a serialized tf.train.Example ({e}).") from e
  out = {}
  for name, feature in example.features.feature.items():
    kind = feature.WhichOneof("kind")
    out[name] = list(getattr(feature, kind).value) if kind else []
  return out


def _connect(path: str) -> sqlite3.Connection:
  try:
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    tables = {r[0] for r in connection.execute("SELECT name FROM sqlite_master")}
  except sqlite3.DatabaseError as e:
    raise DataError(f"{path}: cannot read it as SQLite ({e}); download it again.") from e
  missing = {"examples", "client_metadata"} - tables
  if missing:
    raise DataError(f"{path} is not a TFF SQLite file: it lacks the table(s) "
                    f"{sorted(missing)} (it needs examples(split_name, client_id, "
                    "serialized_example_proto) and client_metadata(client_id, split_name, "
                    "num_examples)).")
  return connection


def split_clients(connection, path: str, split: str) -> tuple[list[str], np.ndarray]:
  """`(client ids sorted, their num_examples)` of one split, from client_metadata."""
  try:
    rows = connection.execute("SELECT client_id, num_examples FROM client_metadata WHERE "
                              "split_name = ?", (split,)).fetchall()
    if not rows:
      splits = [r[0] for r in connection.execute(
          "SELECT DISTINCT split_name FROM client_metadata")]
      raise DataError(f"{path} has no client in split {split!r}; its splits are {splits}.")
  except sqlite3.DatabaseError as e:
    raise DataError(f"{path}: cannot read client_metadata ({e}).") from e
  rows.sort(key=lambda r: r[0])
  return [r[0] for r in rows], np.array([r[1] for r in rows], np.int64)


class _Converter:
  """Turns one client's parsed examples into rows of the output features."""

  features: tuple[str, ...] = ()

  def rows(self, example: dict, where: str) -> dict[str, np.ndarray]:
    """`{feature: [k, ...]}` for one example (k rows; 0 to drop the example)."""
    raise NotImplementedError


def _field(example: dict, name: str, size: int | None, where: str):
  if name not in example:
    raise DataError(f"{where}: the example has no feature {name!r} (it has "
                    f"{sorted(example)}); is data.task right for this file?")
  values = example[name]
  if size is not None and len(values) != size:
    raise DataError(f"{where}: feature {name!r} has {len(values)} values, expected {size}.")
  return values


class _Emnist(_Converter):
  features = ("x", "y")

  def __init__(self, invert: bool):
    self.invert = invert

  def rows(self, example, where):
    pixels = np.asarray(_field(example, "pixels", 784, where), np.float32).reshape(1, 28, 28, 1)
    label = _field(example, "label", 1, where)
    return {"x": 1.0 - pixels if self.invert else pixels, "y": np.array(label, np.int32)}


class _Cifar100(_Converter):
  features = ("x", "y", "y_coarse")

  def rows(self, example, where):
    image = np.asarray(_field(example, "image", 32 * 32 * 3, where), np.int64)
    if image.min() < 0 or image.max() > 255:
      raise DataError(f"{where}: image values outside [0, 255].")
    return {"x": image.astype(np.uint8).reshape(1, 32, 32, 3),
            "y": np.array(_field(example, "label", 1, where), np.int32),
            "y_coarse": np.array(_field(example, "coarse_label", 1, where), np.int32)}


class _Shakespeare(_Converter):
  features = ("x", "y")

  def __init__(self, sequence_length: int):
    self.length = sequence_length

  def rows(self, example, where):
    snippet = _field(example, "snippets", 1, where)[0]
    seq = text.shakespeare_sequences(snippet, self.length)
    return {"x": seq[:, :-1], "y": seq[:, 1:]}


class _NextWord(_Converter):
  features = ("x", "y")

  def __init__(self, tokenizer: text.WordTokenizer, sequence_length: int):
    self.tokenizer, self.length = tokenizer, sequence_length

  def rows(self, example, where):
    try:
      row = self.tokenizer.next_word_row(_field(example, "tokens", 1, where)[0], self.length)
    except UnicodeDecodeError as e:
      raise DataError(f"{where}: 'tokens' is not UTF-8 ({e}).") from e
    return {"x": row[None, :-1], "y": row[None, 1:]}


class _Tags(_Converter):
  features = ("x", "y")

  def __init__(self, tokenizer: text.WordTokenizer, tags: list[str], max_words: int):
    self.tokenizer, self.max_words = tokenizer, max_words
    self.tag_ids = {t: i for i, t in enumerate(tags)}

  def rows(self, example, where):
    try:
      words, _ = self.tokenizer.bag_row(_field(example, "tokens", 1, where)[0],
                                          _field(example, "title", 1, where)[0], self.max_words)
      tags = text.tag_row(_field(example, "tags", 1, where)[0], self.tag_ids, _MAX_TAGS)
    except UnicodeDecodeError as e:
      raise DataError(f"{where}: a text feature is not UTF-8 ({e}).") from e
    return {"x": words[None], "y": tags[None]}


def read_tff_sqlite(path: str, split: str, converter: _Converter, max_examples: int = 0
                    ) -> tuple[FederatedData, list[str]]:
  """One split of a TFF SQLite file, every example converted, clients sorted by id.

  One sequential scan of the `examples` table (no index is needed); rows are
  kept in file order within each client.

  Raises:
    DataError: naming the file, the client and the row when a table is
      missing, a proto does not parse or lacks a feature, a client is not in
      client_metadata, or a client's count disagrees with it.
  """
  connection = _connect(path)
  try:
    ids, expected = split_clients(connection, path, split)
    index = {c: i for i, c in enumerate(ids)}
    per_client: list[list[dict]] = [[] for _ in ids]
    seen = np.zeros(len(ids), np.int64)
    try:
      cursor = connection.execute("SELECT rowid, client_id, serialized_example_proto FROM "
                                  "examples WHERE split_name = ? ORDER BY rowid", (split,))
      for rowid, client, blob in cursor:
        where = f"{path}, split {split!r}, client {client!r}, row {rowid}"
        i = index.get(client)
        if i is None:
          raise DataError(f"{where}: the client is not listed in client_metadata.")
        seen[i] += 1
        if max_examples and seen[i] > max_examples:
          continue
        rows = converter.rows(parse_example(blob, where), where)
        per_client[i].append(rows)
    except sqlite3.DatabaseError as e:
      raise DataError(f"{path}: reading the examples table failed ({e}); the file is "
                      "truncated or corrupt: download it again.") from e
  finally:
    connection.close()
  bad = np.nonzero(seen != expected)[0]
  if len(bad):
    i = bad[0]
    raise DataError(f"{path}, split {split!r}, client {ids[i]!r}: {seen[i]} examples but "
                    f"client_metadata says {expected[i]}; the file is inconsistent.")
  sizes = np.array([sum(len(next(iter(r.values()))) for r in c) for c in per_client], np.int64)
  features = {}
  for name in converter.features:
    pieces = [r[name] for c in per_client for r in c]
    features[name] = np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)
  return FederatedData.from_offsets(features, np.concatenate([[0], np.cumsum(sizes)])), ids


# -- the registered dataset -----------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class TffSqliteConfig(DataSection):
  """One of TFF's SQLite benchmark files: its train and test splits, converted once."""

  task: Task = "emnist"
  path: str = ""
  train_split: str = option("", help="default: the task's (e.g. all_train)")
  test_split: str = option("", help="default: the task's (e.g. all_test; Stack Overflow: test, "
                                    "or heldout)")
  vocab_path: str = option("", help="Stack Overflow: the stackoverflow.word_count file")
  tag_path: str = option("", help="stackoverflow_tag: the stackoverflow.tag_count file")
  vocab_size: int = option(10000, check=(positive, "must be >= 1"))
  num_tags: int = option(500, check=(positive, "must be >= 1"))
  sequence_length: int = option(0, check=(lambda v: v >= 0, "must be >= 0"),
                                help="0: the task's (Shakespeare 80, Stack Overflow 20)")
  max_examples: int = option(-1, check=(lambda v: v >= -1, "must be >= -1"),
                             help="per client; -1: the task's (Stack Overflow 1000, else all), "
                                  "0: all")
  max_words: int = option(100, check=(positive, "must be >= 1"),
                          help="stackoverflow_tag: words kept per example")
  invert_pixels: bool = option(False, help="EMNIST: 1 - pixels (0 = background, like MNIST)")
  cache_dir: str = ""

  def __post_init__(self):
    if not self.path:
      raise ConfigError(f"data.path is required when data.kind = 'tff_sqlite'. "
                        f"{where_to_get(self.task)}")

  @classmethod
  def unused_keys(cls, values: dict) -> set[str]:
    """The file gives the split; the task fixes the classes."""
    return {"test_fraction", "holdout_clients", "num_classes"}

  def check_given(self, given: set[str]) -> None:
    if given & {"test_fraction", "holdout_clients"}:
      raise ConfigError("data.test_fraction / data.holdout_clients do not apply to "
                        "data.kind = 'tff_sqlite': the file's splits give the evaluation "
                        "clients (choose them with data.test_split).")
    if "num_classes" in given:
      raise ConfigError(f"data.num_classes is fixed by data.task = {self.task!r} "
                        f"({task_classes(self)}); remove it.")


def task_classes(cfg: TffSqliteConfig) -> int:
  """Classes (or the vocabulary size a next-token model predicts over) of the task."""
  return {"emnist": 62, "emnist_digits": 10, "cifar100": 100,
          "shakespeare": len(text.SHAKESPEARE_CHARS) + 4,
          "stackoverflow_nwp": cfg.vocab_size + 4, "stackoverflow_tag": cfg.num_tags}[cfg.task]


def _converter(cfg: TffSqliteConfig) -> tuple[_Converter, str]:
  """The task's converter and a text naming every setting that changes its output."""
  if cfg.task.startswith("emnist"):
    return _Emnist(cfg.invert_pixels), f"invert={cfg.invert_pixels}"
  if cfg.task == "cifar100":
    return _Cifar100(), ""
  if cfg.task == "shakespeare":
    length = cfg.sequence_length or text.SHAKESPEARE_SEQUENCE_LENGTH
    return _Shakespeare(length), f"length={length}"
  vocab = _read(text.read_word_counts, cfg.vocab_path, cfg.vocab_size, "vocab_path", cfg.task)
  tokenizer = text.WordTokenizer(vocab)
  digest = hashlib.sha256("\n".join(vocab).encode()).hexdigest()[:16]
  if cfg.task == "stackoverflow_nwp":
    length = cfg.sequence_length or text.STACKOVERFLOW_SEQUENCE_LENGTH
    return _NextWord(tokenizer, length), f"vocab={digest}:length={length}"
  tags = _read(text.read_tag_counts, cfg.tag_path, cfg.num_tags, "tag_path", cfg.task)
  tag_digest = hashlib.sha256("\n".join(tags).encode()).hexdigest()[:16]
  return _Tags(tokenizer, tags, cfg.max_words), f"vocab={digest}:tags={tag_digest}:" \
                                                 f"words={cfg.max_words}"


def _read(reader, path: str, size: int, key: str, task: str):
  if not path:
    raise ConfigError(f"data.{key} is required for data.task = {task!r}. {where_to_get(task)}")
  if not os.path.exists(path):
    raise DataError(f"data.{key} = {path!r} does not exist. {where_to_get(task)}")
  try:
    return reader(path, size)
  except (OSError, ValueError) as e:
    raise DataError(f"data.{key}: {e}") from e


def load_tff_sqlite(cfg: TffSqliteConfig, split: str) -> tuple[FederatedData, list[str]]:
  """One split of the task's file, converted once and memory-mapped from the cache."""
  if not os.path.exists(cfg.path):
    raise DataError(f"data.path = {cfg.path!r} does not exist. {where_to_get(cfg.task)}")
  source = decompressed(cfg.path, cfg.cache_dir)
  converter, settings = _converter(cfg)
  cap = cfg.max_examples if cfg.max_examples >= 0 else (
      1000 if cfg.task.startswith("stackoverflow") else 0)
  kind = f"tff_sqlite:{cfg.task}:{split}:{settings}:cap={cap}"
  return cached(source, kind, _VERSION,
                lambda: read_tff_sqlite(source, split, converter, cap), cfg.cache_dir)


@DATASETS.register("tff_sqlite", TffSqliteConfig, num_classes=task_classes)
def _build(cfg: TffSqliteConfig, ctx):
  """A TFF SQLite file: (train, test) clients of the task's two splits."""
  del ctx
  train_split, test_split = _SPLITS[cfg.task]
  return tuple(load_tff_sqlite(cfg, split)[0] for split in
               (cfg.train_split or train_split, cfg.test_split or test_split))


__all__ = ["TffSqliteConfig", "load_tff_sqlite", "parse_example", "read_tff_sqlite",
           "task_classes", "where_to_get"]
