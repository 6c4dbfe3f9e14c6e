"""Prepared TFDS folders: read without TensorFlow, converted exactly, cached, clear errors.

The fixture prepares a tiny dataset with tfds itself (a `GeneratorBasedBuilder`
defined here, `download_and_prepare` with `file_format="array_record"`, the
only format tfds writes without TensorFlow). A TFRecord copy of it is made the
way tfds's TFRecord writer lays it out: the same serialized examples
(`FeaturesDict.serialize_example`), TFRecord framing written by the encoder
below (independent of the reader under test), shards named
`NAME-SPLIT.tfrecord-0000i-of-0000n`, and `dataset_info.json` saying
`fileFormat: tfrecord` with the shard lengths.
"""

import io
import json
import os
import shutil
import struct
import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
PIL_Image = pytest.importorskip("PIL.Image")

from fedjax_sim.core.data import DataError  # noqa: E402
from fedjax_sim.core.registry import DATASETS, Context  # noqa: E402
from fedjax_sim.datasets import tfds_dir  # noqa: E402
from fedjax_sim.runner.config import ConfigError, config_from_dict, to_dict  # noqa: E402

SIZES = {"train": 60, "test": 24}
FEATURES = {"x": "image", "y": "label", "coarse": "coarse_label"}


def _example(split: str, i: int) -> dict:
  """Example i of a split: its id in pixels (0, 0) and (0, 1), label i % 6, coarse label // 2."""
  rng = np.random.default_rng([SIZES[split], i])
  image = rng.integers(0, 256, (5, 4, 1), dtype=np.uint8)
  image[0, 0, 0], image[0, 1, 0] = i, SIZES[split]
  return {"image": image, "label": i % 6, "coarse_label": (i % 6) // 2}


def _png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  PIL_Image.fromarray(image[..., 0]).save(buffer, format="png")
  return buffer.getvalue()


class Tiny(tfds.core.GeneratorBasedBuilder):
  """A 5x4 grayscale image, a label in 0..5 and its coarse label in 0..2."""

  VERSION = tfds.core.Version("1.0.0")
  url_infos = None  # nothing to download (and no search for a checksums file beside this module)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(5, 4, 1)),
        "label": tfds.features.ClassLabel(num_classes=6),
        "coarse_label": tfds.features.ClassLabel(num_classes=3),
    }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in SIZES}

  def _generate_examples(self, split):
    for i in range(SIZES[split]):
      example = _example(split, i)
      yield i, {**example, "image": _png(example["image"])}


# -- a TFRecord writer (the framing tf.io.TFRecordWriter writes) ----------------------------


def _crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = _crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _tfrecord(records) -> bytes:
  out = bytearray()
  for record in records:
    length = struct.pack("<Q", len(record))
    out += length + struct.pack("<I", _masked_crc(length))
    out += record + struct.pack("<I", _masked_crc(record))
  return bytes(out)


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
  """`(array_record data_dir, tfrecord data_dir)`, each holding tiny/1.0.0."""
  root = tmp_path_factory.mktemp("tfds")
  array_dir = str(root / "array_record")
  Tiny(data_dir=array_dir, file_format="array_record").download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          compute_stats=tfds.download.ComputeStatsMode.SKIP))
  source = os.path.join(array_dir, "tiny", "1.0.0")
  tfrecord_dir = str(root / "tfrecord")
  folder = os.path.join(tfrecord_dir, "tiny", "1.0.0")
  os.makedirs(folder)
  for name in ("features.json", "dataset_info.json"):
    shutil.copy(os.path.join(source, name), folder)
  features = tfds.builder_from_directory(source).info.features
  shards = {"train": [25, 35], "test": [24]}
  with open(os.path.join(folder, "dataset_info.json")) as f:
    info = json.load(f)
  info["fileFormat"] = "tfrecord"
  for split in info["splits"]:
    split["shardLengths"] = [str(n) for n in shards[split["name"]]]
  with open(os.path.join(folder, "dataset_info.json"), "w") as f:
    json.dump(info, f)
  for split, lengths in shards.items():
    bounds = np.cumsum([0] + lengths)
    for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
      records = []
      for i in range(lo, hi):
        example = _example(split, i)
        records.append(features.serialize_example({**example, "image": _png(example["image"])}))
      path = os.path.join(folder, f"tiny-{split}.tfrecord-{s:05d}-of-{len(lengths):05d}")
      with open(path, "wb") as f:
        f.write(_tfrecord(records))
  return array_dir, tfrecord_dir


def _expected(split: str, order=None) -> dict[str, np.ndarray]:
  examples = [_example(split, i) for i in (range(SIZES[split]) if order is None else order)]
  return {"x": np.stack([e["image"] for e in examples]),
          "y": np.array([e["label"] for e in examples]),
          "coarse": np.array([e["coarse_label"] for e in examples])}


def _assert_exact(got: dict, want: dict):
  assert set(got) == set(want)
  for role in want:
    np.testing.assert_array_equal(got[role], want[role])
  assert got["x"].dtype == np.uint8 and got["x"].shape[1:] == (5, 4, 1)


def test_tfrecord_shards_are_converted_exactly_in_file_order(data_dirs, tmp_path):
  folder = tfds_dir.dataset_folder("tiny", data_dirs[1])
  for split in SIZES:
    got = tfds_dir.load_tfds_split(folder, split, FEATURES, str(tmp_path / "cache"))
    _assert_exact(got, _expected(split))
    assert isinstance(got["x"], np.memmap)  # memory-mapped from the cache
  assert "tensorflow" not in sys.modules


def test_array_record_is_converted_exactly(data_dirs, tmp_path):
  # tfds shuffles examples when it prepares a split: match them by the id in the pixels.
  folder = tfds_dir.dataset_folder("tiny:1.0.0", data_dirs[0])
  for split in SIZES:
    got = tfds_dir.load_tfds_split(folder, split, FEATURES, str(tmp_path / "cache"))
    ids = got["x"][:, 0, 0, 0].astype(int)
    assert sorted(ids) == list(range(SIZES[split]))
    _assert_exact(got, _expected(split, ids))
  assert "tensorflow" not in sys.modules


def _raw(data_dir, cache, **data):
  return {"seed": 4, "data": {"kind": "tfds", "name": "tiny", "data_dir": data_dir,
                              "cache_dir": cache, "num_clients": 5, **data},
          "sampling": {"clients_per_round": 2}}


def _build(raw):
  c = config_from_dict(raw)
  return c, DATASETS.get("tfds").build(c.data, Context(seed=c.seed, config=c))


def test_config_partitions_both_splits_like_npz(data_dirs, tmp_path):
  from fedjax_sim.datasets import pachinko_partition
  raw = _raw(data_dirs[1], str(tmp_path / "cache"), partition="pachinko", pachinko_alpha=0.5,
             test_clients=3)
  c, (train, test) = _build(raw)
  want = _expected("train")
  expected = pachinko_partition(want["x"].astype(np.float32) / 255, want["y"], want["coarse"],
                                5, 12, alpha=0.5, seed=4)
  np.testing.assert_array_equal(train.features["x"], expected.features["x"])
  np.testing.assert_array_equal(train.features["y"], expected.features["y"])
  assert train.features["x"].dtype == np.float32
  np.testing.assert_array_equal(test.sizes, [8, 8, 8])  # 24 test examples // 3 clients
  ids = np.rint(np.asarray(test.features["x"])[:, 0, 0, 0] * 255).astype(int)
  assert sorted(ids) == list(range(24))  # every test example, once
  assert config_from_dict(to_dict(c)) == c
  assert "test_fraction" not in to_dict(c)["data"]

  # No test split: one population, split by the config (the runner's test_fraction).
  c, data = _build(_raw(data_dirs[0], str(tmp_path / "cache"), test_split="", partition="iid"))
  assert data.num_clients == 5 and data.num_examples == 60
  assert "test_clients" not in to_dict(c)["data"]


def test_missing_dataset_version_or_config_names_the_folder_and_how_to_prepare(data_dirs, tmp_path):
  with pytest.raises(DataError, match=r"nowhere.*mnist does not exist.*tfds build mnist "
                                      r"--data_dir=.*nowhere.*never downloads"):
    tfds_dir.dataset_folder("mnist", str(tmp_path / "nowhere"))
  with pytest.raises(DataError, match=r"no prepared version 2.0.0 .*prepared: 1.0.0"):
    tfds_dir.dataset_folder("tiny:2.0.0", data_dirs[1])
  configs = tmp_path / "dd" / "multi"
  for config in ("a", "b"):
    (configs / config / "1.0.0").mkdir(parents=True)
  with pytest.raises(DataError, match=r"several configs \(a, b\).*'multi/a'"):
    tfds_dir.dataset_folder("multi", str(tmp_path / "dd"))
  (tmp_path / "dd" / "half" / "incomplete.X_1.0.0").mkdir(parents=True)
  with pytest.raises(DataError, match=r"holds no prepared version.*tfds build half"):
    tfds_dir.dataset_folder("half", str(tmp_path / "dd"))
  with pytest.raises(ConfigError, match="data.name is required"):
    config_from_dict({"data": {"kind": "tfds"}})


def test_unknown_split_and_feature_are_config_errors(data_dirs, tmp_path):
  folder = tfds_dir.dataset_folder("tiny", data_dirs[1])
  with pytest.raises(ConfigError, match=r"no split 'validation'; it has \['test', 'train'\]"):
    tfds_dir.read_tfds_split(folder, "validation", FEATURES)
  with pytest.raises(ConfigError, match=r"data.x = 'pixels'.*\['coarse_label', 'image', 'label'\]"):
    tfds_dir.read_tfds_split(folder, "train", {"x": "pixels", "y": "label"})
  with pytest.raises(ConfigError, match="test_split = 'test' gives the evaluation clients"):
    config_from_dict(_raw(data_dirs[1], "", test_fraction=0.3))


def _copy(data_dirs, tmp_path) -> str:
  data_dir = str(tmp_path / "copy")
  shutil.copytree(data_dirs[1], data_dir)
  return os.path.join(data_dir, "tiny", "1.0.0")


@pytest.mark.parametrize("damage,needle", [
    (lambda b: b[:-3], r"shard-1, record 34: the record claims \d+ bytes but the file ends"),
    (lambda b: b[:-(len(b) - 5)], r"shard-1, record 0: the file ends inside a record header"),
    (lambda b: b[:-10] + bytes([b[-10] ^ 1]) + b[-9:], r"shard-1, record 34: its data fails"),
    (lambda b: b[:8] + bytes([b[8] ^ 1]) + b[9:], r"shard-1, record 0: its length field fails"),
])
def test_a_corrupt_file_names_file_and_record_and_keeps_the_cache(data_dirs, tmp_path, damage,
                                                                   needle):
  folder = _copy(data_dirs, tmp_path)
  cache = tmp_path / "cache"
  tfds_dir.load_tfds_split(folder, "train", FEATURES, str(cache))
  entries = sorted(os.listdir(cache))
  path = os.path.join(folder, "tiny-train.tfrecord-00001-of-00002")
  with open(path, "rb") as f:
    blob = f.read()
  with open(path, "wb") as f:
    f.write(damage(blob))
  needle = needle.replace("shard-1", "tiny-train.tfrecord-00001-of-00002")
  with pytest.raises(DataError, match=needle):
    tfds_dir.load_tfds_split(folder, "train", FEATURES, str(cache))
  assert sorted(os.listdir(cache)) == entries  # the old entry untouched, nothing partial


def test_an_undecodable_example_and_missing_shard_are_named(data_dirs, tmp_path):
  folder = _copy(data_dirs, tmp_path)
  features = tfds.builder_from_directory(folder).info.features
  good = [features.serialize_example(_example("test", i) | {"image": _png(_example("test", i)[
      "image"])}) for i in range(24)]
  good[5] = features.serialize_example({"image": b"not a png", "label": 1, "coarse_label": 0})
  path = os.path.join(folder, "tiny-test.tfrecord-00000-of-00001")
  with open(path, "wb") as f:
    f.write(_tfrecord(good))
  with pytest.raises(DataError,
                     match=r"tiny-test.tfrecord-00000-of-00001, record 5: cannot decode"):
    tfds_dir.read_tfds_split(folder, "test", FEATURES)
  os.remove(os.path.join(folder, "tiny-train.tfrecord-00000-of-00002"))
  with pytest.raises(DataError, match=r"tiny-train.tfrecord-00000-of-00002 is missing.*incomplete"):
    tfds_dir.read_tfds_split(folder, "train", FEATURES)


def test_the_newest_prepared_version_is_used(tmp_path):
  for version in ("1.0.0", "1.10.0", "1.2.0", "incomplete.X_2.0.0"):
    (tmp_path / "ds" / version).mkdir(parents=True)
    if not version.startswith("incomplete"):
      (tmp_path / "ds" / version / "dataset_info.json").write_text("{}")
  assert tfds_dir.dataset_folder("ds", str(tmp_path)).endswith(os.path.join("ds", "1.10.0"))
  assert tfds_dir.dataset_folder("ds:1.2.0", str(tmp_path)).endswith(os.path.join("ds", "1.2.0"))


def test_without_tensorflow_datasets_the_error_says_what_to_install(data_dirs, monkeypatch):
  import builtins
  real_import = builtins.__import__

  def no_tfds(name, *args, **kwargs):
    if name == "tensorflow_datasets":
      raise ImportError("No module named 'tensorflow_datasets'")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_tfds)
  folder = os.path.join(data_dirs[1], "tiny", "1.0.0")
  with pytest.raises(ConfigError, match="pip install tensorflow-datasets"):
    tfds_dir.read_tfds_split(folder, "train", FEATURES)
