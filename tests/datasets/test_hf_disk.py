"""Hugging Face datasets saved with save_to_disk: converted exactly, cached, clear errors."""

import builtins
import os
import sys

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")
PIL_Image = pytest.importorskip("PIL.Image")

from fedjax_sim.core.data import DataError  # noqa: E402
from fedjax_sim.core.registry import DATASETS, Context  # noqa: E402
from fedjax_sim.datasets import dirichlet_partition, hf_disk, pachinko_partition  # noqa: E402
from fedjax_sim.runner.config import ConfigError, config_from_dict, to_dict  # noqa: E402

SIZES = {"train": 40, "test": 12}
USERS = ["u10", "u2", "u7"]


def _rows(split: str) -> dict:
  """Images (id in pixel (0, 0)), labels 0..5, coarse labels label // 2, a user per row."""
  n = SIZES[split]
  rng = np.random.default_rng(n)
  images = rng.integers(0, 256, (n, 3, 4, 3), dtype=np.uint8)
  images[:, 0, 0, 0] = np.arange(n)
  label = np.arange(n) * 5 % 6
  return {"img": images, "fine": label, "coarse": label // 2,
          "user": [USERS[i % 3] if i % 5 else "u2" for i in range(n)],
          "vec": rng.normal(size=(n, 2)).astype(np.float32)}


def _dataset(split: str, **replace):
  rows = {**_rows(split), **replace}
  features = datasets.Features({
      "img": datasets.Image(), "fine": datasets.ClassLabel(num_classes=6),
      "coarse": datasets.Value("int64"), "user": datasets.Value("string"),
      "vec": datasets.Sequence(datasets.Value("float32"), length=2)})
  return datasets.Dataset.from_dict({**rows, "img": [PIL_Image.fromarray(a) if a is not None
                                                     else None for a in rows["img"]],
                                     "vec": [None if v is None else list(v)
                                             for v in rows["vec"]]}, features=features)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("hf") / "dict")
  datasets.DatasetDict({s: _dataset(s) for s in SIZES}).save_to_disk(path)
  return path


COLUMNS = {"x": "img", "y": "fine"}


def test_natural_clients_are_converted_exactly(saved, tmp_path):
  data, ids = hf_disk.load_hf_split(saved, "train", COLUMNS, "user", str(tmp_path / "cache"))
  rows = _rows("train")
  assert ids == sorted(USERS)  # sorted by id
  for i, user in enumerate(ids):
    mine = [r for r in range(SIZES["train"]) if rows["user"][r] == user]  # stored order
    got = data.client(i)
    np.testing.assert_array_equal(got["x"], rows["img"][mine])
    np.testing.assert_array_equal(got["y"], rows["fine"][mine])
  assert data.features["x"].dtype == np.uint8 and isinstance(data.features["x"], np.memmap)
  assert "tensorflow" not in sys.modules


def test_one_client_per_split_without_client_column(saved, tmp_path):
  data, ids = hf_disk.load_hf_split(saved, "test", {"x": "vec", "y": "fine", "coarse": "coarse"},
                                    cache_dir=str(tmp_path / "cache"))
  rows = _rows("test")
  assert ids == ["test"] and data.num_clients == 1
  np.testing.assert_array_equal(data.features["x"], rows["vec"])
  np.testing.assert_array_equal(data.features["coarse"], rows["coarse"])


def _raw(path, cache, **data):
  return {"seed": 2, "data": {"kind": "hf_disk", "path": path, "cache_dir": cache,
                              "x": "img", "y": "fine", **data},
          "sampling": {"clients_per_round": 2}}


def _build(raw):
  c = config_from_dict(raw)
  return c, DATASETS.get("hf_disk").build(c.data, Context(seed=c.seed, config=c))


def test_config_natural_clients_of_both_splits(saved, tmp_path):
  c, (train, test) = _build(_raw(saved, str(tmp_path / "c"), client_column="user"))
  assert train.num_clients == test.num_clients == 3
  rows = _rows("test")
  first = [r for r in range(12) if rows["user"][r] == "u10"]
  np.testing.assert_array_equal(test.client(0)["x"], rows["img"][first].astype(np.float32) / 255)
  assert test.features["x"].dtype == np.float32 and test.features["y"].dtype == np.int32
  d = to_dict(c)["data"]
  assert "num_clients" not in d and "partition" not in d and "test_fraction" not in d
  assert config_from_dict(to_dict(c)) == c
  assert c.data.population() is None
  with pytest.raises(ConfigError, match="data.num_clients is set but data.client_column"):
    config_from_dict(_raw(saved, "", client_column="user", num_clients=4))


def test_config_partitions_like_npz(saved, tmp_path):
  rows = _rows("train")
  x = rows["img"].astype(np.float32) / 255
  _, (train, test) = _build(_raw(saved, str(tmp_path / "c"), num_clients=4,
                                 partition="dirichlet", dirichlet_alpha=0.7))
  want = dirichlet_partition(x, rows["fine"], 4, 0.7, seed=2)
  np.testing.assert_array_equal(train.features["x"], want.features["x"])
  np.testing.assert_array_equal(train.sizes, want.sizes)
  assert test.num_clients == 4 and test.num_examples == 12

  _, (train, _) = _build(_raw(saved, str(tmp_path / "c"), num_clients=4, partition="pachinko",
                              coarse="coarse"))
  want = pachinko_partition(x, rows["fine"], rows["coarse"], 4, 10, seed=2)
  np.testing.assert_array_equal(train.features["x"], want.features["x"])


def test_a_single_saved_dataset(tmp_path):
  path = str(tmp_path / "single")
  _dataset("train").save_to_disk(path)
  with pytest.raises(ConfigError, match="single Dataset.*set data.test_split: ''"):
    _build(_raw(path, str(tmp_path / "c"), num_clients=4))
  _, data = _build(_raw(path, str(tmp_path / "c"), num_clients=4, test_split="",
                        partition="iid"))
  assert data.num_examples == 40


def test_missing_folder_split_and_column_are_named(saved, tmp_path):
  with pytest.raises(DataError, match=r"nowhere does not exist.*save_to_disk"):
    hf_disk.load_hf_split(str(tmp_path / "nowhere"), "train", COLUMNS)
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match=r"empty: datasets.load_from_disk cannot open it"):
    hf_disk.read_hf_split(str(tmp_path / "empty"), "train", COLUMNS)
  with pytest.raises(ConfigError, match=r"no split 'valid'; it has \['test', 'train'\]"):
    hf_disk.read_hf_split(saved, "valid", COLUMNS)
  with pytest.raises(ConfigError, match=r"data.y = 'label': .*split 'train' has columns"):
    hf_disk.read_hf_split(saved, "train", {"x": "img", "y": "label"})
  with pytest.raises(ConfigError, match=r"data.client_column = 'who'"):
    hf_disk.read_hf_split(saved, "train", COLUMNS, "who")
  with pytest.raises(ConfigError, match="data.path is required"):
    config_from_dict({"data": {"kind": "hf_disk"}})


def test_bad_rows_are_named_and_leave_no_cache(tmp_path):
  rows = _rows("train")
  images = list(rows["img"])
  images[17] = np.zeros((4, 4, 3), np.uint8)  # another size
  vecs = list(rows["vec"])
  vecs[23] = None
  users = list(rows["user"])
  users[31] = None
  for name, ds, columns, client_column, needle in [
      ("ragged", _dataset("train", img=images), COLUMNS, "",
       r"split 'train', row 17: column 'img' has shape \(4, 4, 3\)"),
      ("null", _dataset("train", vec=vecs), {"x": "vec", "y": "fine"}, "",
       r"split 'train', row 23: column 'vec' holds null"),
      ("null_user", _dataset("train", user=users), COLUMNS, "user",
       r"split 'train', row 31: client_column 'user' is null"),
  ]:
    path = str(tmp_path / name)
    datasets.DatasetDict({"train": ds}).save_to_disk(path)
    cache = tmp_path / f"cache_{name}"
    with pytest.raises(DataError, match=needle):
      hf_disk.load_hf_split(path, "train", columns, client_column, cache_dir=str(cache))
    assert not cache.exists() or os.listdir(cache) == []


def test_a_corrupt_file_keeps_the_existing_cache(tmp_path):
  path = str(tmp_path / "d")
  datasets.DatasetDict({"train": _dataset("train")}).save_to_disk(path)
  cache = tmp_path / "cache"
  hf_disk.load_hf_split(path, "train", COLUMNS, cache_dir=str(cache))
  entries = sorted(os.listdir(cache))
  arrow = os.path.join(path, "train", "data-00000-of-00001.arrow")
  with open(arrow, "r+b") as f:
    f.truncate(os.path.getsize(arrow) // 2)
  needle = r"d(: datasets.load_from_disk cannot|, split 'train', row \d+: cannot)"
  with pytest.raises(DataError, match=needle):
    hf_disk.load_hf_split(path, "train", COLUMNS, cache_dir=str(cache))
  assert sorted(os.listdir(cache)) == entries


def test_without_the_package_the_error_says_what_to_install(saved, monkeypatch):
  real_import = builtins.__import__

  def no_datasets(name, *args, **kwargs):
    if name == "datasets":
      raise ImportError("No module named 'datasets'")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_datasets)
  with pytest.raises(ConfigError, match=r"pip install 'fedjax_sim\[hf\]'"):
    hf_disk.read_hf_split(saved, "train", COLUMNS)
