"""A TensorFlow Datasets dataset prepared in a local folder (registered as `data.kind = tfds`).

`tfds build NAME --data_dir=DIR` (or `tfds.builder(NAME).download_and_prepare()`)
writes a dataset into `DIR/NAME[/CONFIG]/VERSION/`: `dataset_info.json`,
`features.json` and the examples of each split as serialized `tf.train.Example`
protos in sharded record files, TFRecord (the default) or ArrayRecord. This
loader reads such a folder and never downloads (there is no network on a
cluster node; prepare the folder where there is one and copy it over).

It needs `tensorflow-datasets` (a dependency of fedjax_sim) but not
TensorFlow: the folder is opened with `tfds.builder_from_directory`,
ArrayRecord files are read with the `array_record` package tfds depends on,
TFRecord files by the reader below (each record is a little-endian uint64
length, the masked CRC-32C of those 8 bytes, the data and its masked CRC-32C;
both checksums are verified), and every example is decoded by tfds's NumPy
path (`FeaturesDict.deserialize_example_np`: protobuf parsing, PNG/JPEG
decoding with OpenCV or PIL).

A split's input and label features (`data.x`, `data.y`, and `data.coarse` for
the Pachinko partition) are converted once into the packed store and cached
(see `datasets.cache`), keyed by the dataset's prepared folder, the split and
the features; later runs memory-map them and partition them with the run's
seed like `data.kind = npz` does (uint8 images are scaled by 1/255).
"""

from __future__ import annotations

import dataclasses
import os
import re
import struct
from typing import Iterator

import google_crc32c
import numpy as np

from fedjax_sim.core.data import DataError, FederatedData
from fedjax_sim.core.registry import DATASETS
from fedjax_sim.core.schema import ConfigError
from fedjax_sim.datasets.cache import cached
from fedjax_sim.datasets.npz import SplitArraysSection, inputs, labels, partition_splits

_VERSION = 1
_VERSION_DIR = re.compile(r"\d+\.\d+\.\d+")
_INFO = "dataset_info.json"


def _tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConfigError("data.kind = 'tfds' needs tensorflow-datasets, a dependency of fedjax_sim "
                      "(TensorFlow itself is not needed): pip install tensorflow-datasets.") from e
  return tfds


def default_data_dir() -> str:
  """Where tfds prepares datasets by default: `$TFDS_DATA_DIR`, else `~/tensorflow_datasets`."""
  return os.environ.get("TFDS_DATA_DIR", "") or "~/tensorflow_datasets"


def _how_to_prepare(name: str, data_dir: str) -> str:
  return (f"Prepare it on a machine with internet access: `tfds build {name} "
          f"--data_dir={data_dir}` (or tfds.builder({name!r}, data_dir={data_dir!r})"
          ".download_and_prepare()), then copy the folder here; data.kind = 'tfds' never "
          "downloads.")


def dataset_folder(name: str, data_dir: str = "") -> str:
  """The prepared folder of `name` ("mnist", "cifar100:3.0.2", "ds/config:1.0.0").

  Without a version, the newest prepared version is used.

  Raises:
    DataError: naming the folder looked in, when the dataset, the version or
      a single config cannot be found.
  """
  data_dir = data_dir or default_data_dir()
  base, _, version = name.partition(":")
  root = os.path.join(os.path.expanduser(data_dir), base)
  if not base or not os.path.isdir(root):
    raise DataError(f"No prepared TFDS dataset {name!r}: {root} does not exist. "
                    + _how_to_prepare(name or "NAME", data_dir))
  versions = sorted((d for d in os.listdir(root) if _VERSION_DIR.fullmatch(d)
                     and os.path.exists(os.path.join(root, d, _INFO))),
                    key=lambda v: tuple(int(p) for p in v.split(".")))
  if version:
    if version not in versions:
      raise DataError(f"TFDS dataset {base!r} has no prepared version {version} in {root} "
                      f"(prepared: {', '.join(versions) or 'none'}). "
                      + _how_to_prepare(f"{base}:{version}", data_dir))
    return os.path.join(root, version)
  if versions:
    return os.path.join(root, versions[-1])
  configs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))
                   and any(_VERSION_DIR.fullmatch(v) for v in os.listdir(os.path.join(root, d))))
  if configs:
    raise DataError(f"TFDS dataset {base!r} in {root} has several configs ({', '.join(configs)});"
                    f" name one in data.name, e.g. {base + '/' + configs[0]!r}.")
  raise DataError(f"{root} holds no prepared version of {base!r} (no VERSION/{_INFO}; an "
                  "interrupted preparation leaves only incomplete.* folders). "
                  + _how_to_prepare(base, data_dir))


def read_tfds_split(folder: str, split: str, features: dict[str, str]) -> dict[str, np.ndarray]:
  """The given features of every example of one split of a prepared folder, in file order.

  Args:
    folder: a prepared dataset's version folder (holding `dataset_info.json`).
    split: the split's name ("train").
    features: role -> tfds feature name (e.g. {"x": "image", "y": "label"}).

  Returns:
    role -> array `[num_examples, ...]` as decoded (images stay uint8).

  Raises:
    DataError: naming the file and the record when a file is missing,
      truncated, fails its checksum, or an example does not decode or has a
      different shape from the first; ConfigError for a split or feature the
      dataset does not have.
  """
  tfds = _tfds()
  try:
    info = tfds.builder_from_directory(folder).info
  except Exception as e:  # tfds raises several types on a bad folder
    raise DataError(f"{folder}: cannot read the prepared dataset's {_INFO} / features.json "
                    f"({type(e).__name__}: {e}).") from e
  if split not in info.splits:
    raise ConfigError(f"{folder} has no split {split!r}; it has {sorted(info.splits)}. Set "
                      "data.train_split / data.test_split (test_split: '' splits the training "
                      "clients instead).")
  for role, feature in features.items():
    if feature not in info.features:
      raise ConfigError(f"data.{role} = {feature!r}: {folder} has features "
                        f"{sorted(info.features.keys())}.")
  file_format = getattr(info.file_format, "value", str(info.file_format))
  if file_format == "tfrecord":
    records = _tfrecord_records
  elif file_format == "array_record":
    records = _array_record_records
  else:
    raise DataError(f"{folder}: its examples are stored as {file_format!r}; data.kind = 'tfds' "
                    "reads tfrecord and array_record (prepare it with one of those).")
  columns: dict[str, list[np.ndarray]] = {role: [] for role in features}
  total = 0
  for path in (os.fspath(p) for p in info.splits[split].filepaths):
    if not os.path.exists(path):
      raise DataError(f"{path} is missing: the prepared folder {folder} is incomplete; prepare "
                      "the dataset again.")
    for row, raw in enumerate(records(path)):
      try:
        example = info.features.deserialize_example_np(raw)
        values = {role: np.asarray(example[f]) for role, f in features.items()}
      except Exception as e:  # protobuf, image decoders and tfds raise many types
        raise DataError(f"{path}, record {row}: cannot decode the example "
                        f"({type(e).__name__}: {e}).") from e
      for role, value in values.items():
        first = columns[role][0] if columns[role] else value
        if value.shape != first.shape or value.dtype != first.dtype:
          raise DataError(f"{path}, record {row}: feature {features[role]!r} has shape "
                          f"{value.shape} and dtype {value.dtype}, the first example "
                          f"{first.shape} and {first.dtype}; only fixed-shape features convert.")
        columns[role].append(value)
      total += 1
  expected = info.splits[split].num_examples
  if total != expected:
    raise DataError(f"{folder}: split {split!r} has {total} examples in its files but "
                    f"{_INFO} says {expected}; prepare the dataset again.")
  if not total:
    raise DataError(f"{folder}: split {split!r} has no example.")
  return {role: np.stack(values) for role, values in columns.items()}


def load_tfds_split(folder: str, split: str, features: dict[str, str],
                    cache_dir: str = "") -> dict[str, np.ndarray]:
  """`read_tfds_split` converted once and memory-mapped from the cache."""
  roles = sorted(features)
  kind = f"tfds:{split}:" + ",".join(f"{r}={features[r]}" for r in roles)

  def convert():
    arrays = read_tfds_split(folder, split, features)
    return FederatedData.from_offsets(arrays, [0, len(arrays[roles[0]])]), [split]

  data, _ = cached(folder, kind, _VERSION, convert, cache_dir)
  return dict(data.features)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TfdsConfig(SplitArraysSection):
  """A TFDS dataset prepared in a local data_dir (read without TensorFlow), partitioned."""

  name: str = ""
  data_dir: str = ""

  def __post_init__(self):
    if not self.name:
      raise ConfigError("data.name is required when data.kind = 'tfds' (a TFDS dataset such "
                        "as 'mnist' or 'cifar100:3.0.2', prepared under data.data_dir).")


def _split_arrays(cfg: TfdsConfig, folder: str, split: str) -> tuple:
  features = {"x": cfg.x, "y": cfg.y}
  if cfg.partition == "pachinko":
    features["coarse"] = cfg.coarse
  arrays = load_tfds_split(folder, split, features, cfg.cache_dir)
  where = f"TFDS {cfg.name!r} split {split!r} ({folder})"
  coarse = labels(where, np.asarray(arrays["coarse"]), cfg.coarse) if "coarse" in arrays else None
  return (inputs(where, np.asarray(arrays["x"]), warn_uint8=False),
          labels(where, np.asarray(arrays["y"]), cfg.y), coarse, where)


@DATASETS.register("tfds", TfdsConfig)
def _build(cfg: TfdsConfig, ctx):
  """A prepared TFDS dataset: its train split partitioned (and its test split, if named)."""
  folder = dataset_folder(cfg.name, cfg.data_dir)
  train = _split_arrays(cfg, folder, cfg.train_split)
  test = _split_arrays(cfg, folder, cfg.test_split) if cfg.test_split else None
  return partition_splits(cfg, ctx.seed, train, test)


# -- TFRecord files, without TensorFlow --------------------------------------------------------


def _masked_crc(data) -> int:
  """TFRecord's masked CRC-32C of `data` (google-crc32c computes the CRC)."""
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _tfrecord_records(path: str) -> Iterator[bytes]:
  """The records of a TFRecord file (length, its masked CRC, data, its masked CRC),
  every length and record checked against its checksum."""
  with open(path, "rb") as f:
    data = f.read()
  pos, size, index = 0, len(data), 0
  while pos < size:
    if pos + 12 > size:
      raise DataError(f"{path}, record {index}: the file ends inside a record header "
                      "(truncated); prepare the dataset again.")
    header = data[pos:pos + 8]
    if _masked_crc(header) != struct.unpack_from("<I", data, pos + 8)[0]:
      raise DataError(f"{path}, record {index}: its length field fails the CRC-32C check "
                      "(corrupt file); prepare the dataset again.")
    (length,) = struct.unpack_from("<Q", data, pos)
    if pos + 12 + length + 4 > size:
      raise DataError(f"{path}, record {index}: the record claims {length} bytes but the file "
                      "ends first (truncated); prepare the dataset again.")
    record = data[pos + 12:pos + 12 + length]
    if _masked_crc(record) != struct.unpack_from("<I", data, pos + 12 + length)[0]:
      raise DataError(f"{path}, record {index}: its data fails the CRC-32C check (corrupt "
                      "file); prepare the dataset again.")
    yield record
    pos += 12 + length + 4
    index += 1


def _array_record_records(path: str, batch: int = 4096) -> Iterator[bytes]:
  """The records of an ArrayRecord file."""
  try:
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConfigError(f"{path} is an ArrayRecord file; reading it needs the array_record "
                      "package (pip install array_record).") from e
  try:
    reader = array_record_module.ArrayRecordReader(path)
    count = reader.num_records()
  except Exception as e:  # the C++ reader raises RuntimeError / ValueError
    raise DataError(f"{path}: not a readable ArrayRecord file ({type(e).__name__}: {e}); "
                    "prepare the dataset again.") from e
  try:
    for lo in range(0, count, batch):
      try:
        chunk = reader.read(lo, min(lo + batch, count))
      except Exception as e:
        raise DataError(f"{path}, records {lo} to {min(lo + batch, count) - 1}: cannot read "
                        f"them ({type(e).__name__}: {e}); prepare the dataset again.") from e
      yield from chunk
  finally:
    reader.close()
