"""LEAF JSON folders: converted exactly (users sorted, files merged), cached, clear errors."""

import json
import os
import sys

import numpy as np
import pytest

from fedjax_sim.core.data import DataError
from fedjax_sim.datasets import leaf
from fedjax_sim.runner.config import ConfigError, config_from_dict
from fedjax_sim.runner.io import read_metrics
from fedjax_sim.runner.run import run_experiment


def _users(seed, names):
  rng = np.random.default_rng(seed)
  out = {}
  for name in names:
    n = int(rng.integers(1, 5))
    y = rng.integers(0, 3, n)
    x = rng.normal(size=(n, 4)) + y[:, None]
    out[name] = {"x": x.round(4).tolist(), "y": y.tolist()}
  return out


def _write_split(folder, files):
  os.makedirs(folder, exist_ok=True)
  for file_name, users in files.items():
    blob = {"users": list(users), "num_samples": [len(u["y"]) for u in users.values()],
            "user_data": users}
    with open(os.path.join(folder, file_name), "w") as f:
      json.dump(blob, f)


def _dataset(root, seed=0):
  train = {"a.json": _users(seed, ["f_3", "f_1"]), "b.json": _users(seed + 1, ["f_2"])}
  test = {"a.json": _users(seed + 2, ["f_3", "f_1"]), "b.json": _users(seed + 3, ["f_2"])}
  _write_split(os.path.join(root, "train"), train)
  _write_split(os.path.join(root, "test"), test)
  return train, test


def test_a_split_is_converted_exactly_with_users_sorted_and_files_merged(tmp_path):
  train, _ = _dataset(str(tmp_path / "data"))
  data, ids = leaf.load_leaf_split(str(tmp_path / "data" / "train"), str(tmp_path / "cache"))
  assert ids == ["f_1", "f_2", "f_3"]
  merged = {**train["a.json"], **train["b.json"]}
  for i, user in enumerate(ids):
    got = data.client(i)
    np.testing.assert_array_equal(got["x"], np.asarray(merged[user]["x"], np.float32))
    np.testing.assert_array_equal(got["y"], np.asarray(merged[user]["y"], np.int32))
  assert isinstance(data.features["x"], np.memmap)
  assert "tensorflow" not in sys.modules


@pytest.mark.parametrize("users,needle", [
    ({"users": ["u"], "num_samples": [1], "user_data": {}},
     "user 'u': listed in 'users' but has no 'user_data'"),
    ({"users": ["u"], "num_samples": [3], "user_data": {"u": {"x": [[1.0]], "y": [0]}}},
     "user 'u': needs 3 examples"),
    ({"users": ["u"], "num_samples": [2], "user_data": {"u": {"x": [[1.0], [1.0, 2.0]],
                                                              "y": [0, 1]}}},
     "user 'u': 'x' is ragged or not numeric"),
    ({"users": ["u"], "num_samples": [1], "user_data": {"u": {"x": ["to be or not to be"],
                                                              "y": ["e!"]}}},
     "user 'u': a text dataset needs 'x' strings and 'y' single characters"),
    ({"user_data": {}}, "is not a LEAF file"),
])
def test_a_malformed_file_names_file_and_user_and_leaves_no_cache(tmp_path, users, needle):
  folder = tmp_path / "train"
  folder.mkdir()
  (folder / "bad.json").write_text(json.dumps(users))
  cache = tmp_path / "cache"
  with pytest.raises(DataError, match=needle) as e:
    leaf.load_leaf_split(str(folder), str(cache))
  assert "bad.json" in str(e.value)
  assert not cache.exists() or os.listdir(cache) == []


def test_missing_folder_bad_json_and_duplicate_users_are_named(tmp_path):
  with pytest.raises(DataError, match="does not exist.*preprocess.sh"):
    leaf.load_leaf_split(str(tmp_path / "nowhere"))
  folder = tmp_path / "train"
  folder.mkdir()
  (folder / "a.json").write_text("{not json")
  with pytest.raises(DataError, match="a.json is not a readable JSON file"):
    leaf.read_leaf_split(str(folder))
  _write_split(str(tmp_path / "dup"), {"a.json": _users(0, ["u"]), "b.json": _users(1, ["u"])})
  with pytest.raises(DataError, match="user 'u': the user is also in"):
    leaf.read_leaf_split(str(tmp_path / "dup"))


def test_a_leaf_folder_runs_from_a_config_with_its_own_split(tmp_path):
  _dataset(str(tmp_path / "data"), seed=5)
  raw = {"seed": 0, "rounds": 2, "output_dir": str(tmp_path / "run"), "progress": False,
         "data": {"kind": "leaf", "path": str(tmp_path / "data"), "input_shape": [2, 2],
                  "num_classes": 3, "cache_dir": str(tmp_path / "cache")},
         "model": {"kind": "cnn", "channels": [2], "dense": 4},
         "algorithm": {"batch_size": 2}, "sampling": {"clients_per_round": 2},
         "engine": {"block_size": 2}, "eval": {"every": 1}}
  run_experiment(config_from_dict(raw), log=lambda *a: None)
  records = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
  test_examples = sum(len(u["y"]) for f in _dataset(str(tmp_path / "again"), seed=5)[1].values()
                      for u in f.values())
  assert [r["eval_clients"] for r in records] == [3, 3]
  assert records[-1]["eval_examples"] == test_examples
  with pytest.raises(ConfigError, match="do not apply to data.kind = 'leaf'"):
    config_from_dict({**raw, "data": {**raw["data"], "test_fraction": 0.5}})
  with pytest.raises(ConfigError, match=r"data.input_shape = \[3, 3\] does not fit"):
    from fedjax_sim.runner.build import build_data
    build_data(config_from_dict({**raw, "data": {**raw["data"], "input_shape": [3, 3]}}))


def test_shakespeare_windows_become_next_character_rows_over_tffs_ids(tmp_path):
  # LEAF's Shakespeare: x = an 80-character window, y = the next character.
  window = ("dh" * 40)
  users = {"users": ["KING"], "num_samples": [2],
           "user_data": {"KING": {"x": [window, "\u00e9" + window[1:]], "y": ["x", "h"]}}}
  for split in ("train", "test"):
    (tmp_path / split).mkdir()
    (tmp_path / split / "all.json").write_text(json.dumps(users))
  data, ids = leaf.load_leaf_split(str(tmp_path / "train"), str(tmp_path / "cache"))
  # By hand: 'd' -> 1, 'h' -> 2, 'x' -> 6 (TFF's vocabulary "dhlptx..."), other -> OOV 87.
  assert ids == ["KING"] and data.features["x"].dtype == np.int32
  np.testing.assert_array_equal(data.features["x"][0], [1, 2] * 40)
  np.testing.assert_array_equal(data.features["y"][0], [2, 1] * 39 + [2, 6])
  np.testing.assert_array_equal(data.features["x"][1, :2], [87, 2])
  from fedjax_sim.runner.build import build_data
  c = config_from_dict({"data": {"kind": "leaf", "path": str(tmp_path), "num_classes": 90,
                                 "cache_dir": str(tmp_path / "cache")}})
  train, test = build_data(c)
  assert train.num_clients == test.num_clients == 1
  with pytest.raises(ConfigError, match="set data.num_classes: 90"):
    build_data(config_from_dict({"data": {"kind": "leaf", "path": str(tmp_path),
                                          "cache_dir": str(tmp_path / "cache")}}))
