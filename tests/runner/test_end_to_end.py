"""End-to-end runs from a YAML-style config for every data kind, model kind and split.

Each run goes through the stable interface only: `config_from_dict` on a plain
mapping (the README's keys), `run_experiment`, and `read_metrics` on the run's
`metrics.jsonl`. The checks are concrete facts about the run, not finiteness:
client and example counts against an independent partition of the same
arrays, the parameter count of the model (in `bits_per_client`), learning on
an easy separable task, and bit-identical metrics for the same data read from
an `.npz` file, a packed folder and a memory-mapped one. `build_experiment`
is used only where a fact cannot be seen in the outputs (which examples
train, whether the features are memory-mapped).
"""

import functools
import os

import chex
import numpy as np
import pytest

from fedjax_sim.core.data import FederatedData
from fedjax_sim.datasets import dirichlet_partition, iid_partition, shards_partition
from fedjax_sim.runner.config import ConfigError, config_from_dict
from fedjax_sim.runner.io import read_metrics
from fedjax_sim.runner.run import build_experiment, run_experiment

SEED = 3
N, K, CLASSES, FEATURES = 360, 12, 3, 6
ROUNDS = 3
# Parameters of the models below (data.num_classes = 3, the largest label + 1), counted by
# hand: an uncompressed upload is 32 bits per parameter.
LOGREG_PARAMS = FEATURES * CLASSES + CLASSES  # 21
# conv 5x5 1->2, conv 5x5 2->4, two 2x2 pools (8x8 -> 2x2), dense 16->8, dense 8->3.
CNN_PARAMS = (25 * 1 * 2 + 2) + (25 * 2 * 4 + 4) + (2 * 2 * 4 * 8 + 8) + (8 * CLASSES + CLASSES)


def _blobs():
  """Three well separated Gaussian classes: class c has mean 3 in coordinate c."""
  rng = np.random.default_rng(0)
  y = (np.arange(N) % CLASSES).astype(np.int32)
  x = rng.normal(size=(N, FEATURES)).astype(np.float32)
  x[np.arange(N), y] += 3.0
  return x, y


def _images():
  """8-bit 8x8 images: noise in 0..59 and a bright quadrant (160..255) at the class's corner."""
  rng = np.random.default_rng(1)
  y = (np.arange(N) % CLASSES).astype(np.int32)
  x = rng.integers(0, 60, size=(N, 8, 8)).astype(np.uint8)
  for c, (r, s) in enumerate([(0, 0), (0, 4), (4, 0)]):
    rows = np.flatnonzero(y == c)
    x[rows, r:r + 4, s:s + 4] = rng.integers(160, 256, size=(len(rows), 4, 4))
  return x, y


def _raw(out, data, model=None, rounds=ROUNDS, clients_per_round=K):
  return {
      "seed": SEED, "rounds": rounds, "output_dir": out, "progress": False,
      "data": {"num_classes": CLASSES, **data}, "model": model or {"kind": "logreg"},
      "algorithm": {"name": "fedavg", "batch_size": 8,
                    "client_optimizer": {"name": "sgd", "learning_rate": 0.3}},
      "sampling": {"scheme": "uniform", "clients_per_round": clients_per_round},
      "engine": {"block_size": 4},
      "eval": {"every": 1},
      "checkpoint": {"every": 0},
  }


def _deterministic(records):
  """The metrics that do not depend on timing."""
  return [{k: v for k, v in r.items() if "seconds" not in k and "per_second" not in k}
          for r in records]


def _clients(data: FederatedData):
  """Every client's examples, as a pytree (a list of feature dicts)."""
  return [data.client(i) for i in range(data.num_clients)]


def _assert_learns(records, min_accuracy):
  train = [r["train_loss"] for r in records]
  evals = [r["eval_loss"] for r in records]
  assert all(a > b for a, b in zip(train, train[1:])), train
  assert all(a > b for a, b in zip(evals, evals[1:])), evals
  assert records[-1]["eval_accuracy"] > min_accuracy, records[-1]["eval_accuracy"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("e2e")
  x, y = _blobs()
  np.savez(root / "blobs.npz", x=x, y=y)
  images, labels = _images()
  np.savez(root / "images_u8.npz", x=images, y=labels)  # [N, 8, 8] uint8
  iid_partition(x, y, K, seed=SEED).save(str(root / "packed"))
  return root


@pytest.fixture(scope="module")
def run(files):
  """`run(name, data, **kw) -> (summary, records)`, each distinct run done once per module."""

  @functools.cache
  def once(name, data_items, model_items=None, **kw):
    out = str(files / "runs" / name)
    model = dict(model_items) if model_items else None
    summary = run_experiment(config_from_dict(_raw(out, dict(data_items), model, **kw)),
                             log=lambda *a: None)
    return summary, read_metrics(os.path.join(out, "metrics.jsonl"))

  def call(name, data, model=None, **kw):
    return once(name, _freeze(data), _freeze(model) if model else None, **kw)

  return call


def _freeze(d):
  return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items()))


# -- npz: every partition -------------------------------------------------------------------

PARTITIONS = {
    "iid": ({}, lambda x, y: iid_partition(x, y, K, seed=SEED)),
    "dirichlet": ({"dirichlet_alpha": 0.3},
                  lambda x, y: dirichlet_partition(x, y, K, 0.3, seed=SEED)),
    "shards": ({"shards_per_client": 1}, lambda x, y: shards_partition(x, y, K, 1, seed=SEED)),
}


def _npz_data(files, partition):
  return {"kind": "npz", "path": str(files / "blobs.npz"), "num_clients": K,
          "partition": partition, **PARTITIONS[partition][0]}


@pytest.mark.parametrize("partition", sorted(PARTITIONS))
def test_npz_run_learns_and_counts_the_partitions_clients(files, run, partition):
  x, y = _blobs()
  expected = PARTITIONS[partition][1](x, y)
  train, test = expected.split_examples(0.2)  # the default data.test_fraction
  data = _npz_data(files, partition)

  # The runner's split is exactly the partitioner's (kind, num_clients, alpha, shards, seed).
  exp = build_experiment(config_from_dict(_raw(str(files / "unused"), data)))
  chex.assert_trees_all_equal(_clients(exp.train), _clients(train))
  chex.assert_trees_all_equal(_clients(exp.test), _clients(test))
  if partition == "dirichlet":
    assert len(set(train.sizes.tolist())) > 1  # label skew makes unequal clients
  if partition == "shards":  # one shard of a sorted label each: one label per client
    assert all(len(np.unique(c["y"])) == 1 for c in _clients(train))

  summary, records = run(f"npz_{partition}", data)
  assert [r["round"] for r in records] == list(range(1, ROUNDS + 1))
  for r in records:
    assert r["sampled_clients"] == K
    assert r["participating_clients"] == np.count_nonzero(train.sizes)
    assert r["eval_clients"] == np.count_nonzero(test.sizes)  # empty clients are not scored
    assert r["eval_examples"] == test.num_examples
    assert r["bits_per_client"] == 32 * LOGREG_PARAMS
  _assert_learns(records, min_accuracy=0.8)  # chance is 1/3
  assert summary["status"] == "completed" and summary["final"] == records[-1]


# -- packed folders, in memory and memory-mapped ------------------------------------------


def test_packed_folder_runs_bit_identical_to_the_same_data_in_memory(files, run):
  # files/packed holds iid_partition of blobs.npz with the run's seed: the same clients
  # as data.kind = npz with partition = iid, read back from disk.
  packed = {"kind": "packed", "path": str(files / "packed")}
  for mmap in (False, True):
    exp = build_experiment(config_from_dict(_raw(str(files / "unused"), {**packed, "mmap": mmap})))
    x = exp.train.features["x"]
    assert isinstance(x, np.memmap) == mmap
    chex.assert_shape(x, (N, FEATURES))
    chex.assert_trees_all_equal(_clients(exp.train), _clients(
        iid_partition(*_blobs(), K, seed=SEED).split_examples(0.2)[0]))

  _, in_memory = run("npz_iid", _npz_data(files, "iid"))
  summary, from_disk = run("packed", packed)
  _, mapped = run("packed_mmap", {**packed, "mmap": True})
  assert len(in_memory) == ROUNDS
  assert _deterministic(from_disk) == _deterministic(in_memory)
  assert _deterministic(mapped) == _deterministic(in_memory)

  # Rounds 2 and 3 have the shapes of round 1 (equal clients, all sampled): no chunk
  # program is traced after round 1.
  one, first = run("packed_one_round", packed, rounds=1)
  assert _deterministic(first) == _deterministic(in_memory[:1])
  assert summary["compiled_chunk_programs"] == one["compiled_chunk_programs"] >= 1


# -- the CNN on image data ------------------------------------------------------------------


def test_cnn_on_uint8_hw_images(files, run):
  model = {"kind": "cnn", "channels": [2, 4], "dense": 8}
  data = {"kind": "npz", "path": str(files / "images_u8.npz"), "num_clients": K,
          "partition": "iid"}
  images, labels = _images()
  with pytest.warns(UserWarning, match="uint8"):
    exp = build_experiment(config_from_dict(_raw(str(files / "unused"), data, model)))
  x = exp.train.features["x"]
  chex.assert_shape(x, (N, 8, 8))  # [H, W] images stay [H, W]; the CNN adds the channel
  assert x.dtype == np.float32
  # The uint8 pixels are scaled by 1/255, then partitioned like any npz data.
  scaled = iid_partition(images.astype(np.float32) / 255.0, labels, K, seed=SEED)
  chex.assert_trees_all_close(_clients(exp.train), _clients(scaled.split_examples(0.2)[0]),
                              rtol=1e-6, atol=0)

  with pytest.warns(UserWarning, match="uint8"):
    _, records = run("cnn_hw_uint8", data, model)
  for r in records:
    assert r["bits_per_client"] == 32 * CNN_PARAMS  # a 1-channel CNN with these widths
    assert r["sampled_clients"] == K and r["eval_clients"] == K
    assert r["eval_examples"] == K * 6  # 30 examples per client, the last 6 held out
  _assert_learns(records, min_accuracy=0.6)  # chance is 1/3


# -- held-out clients -------------------------------------------------------------------------


def test_holdout_clients_are_the_eval_clients_and_never_train(files, run):
  num_clients, holdout = 20, 0.25
  held_out = round(holdout * num_clients)  # 5
  trained = num_clients - held_out  # 15
  data = {"kind": "npz", "path": str(files / "blobs.npz"), "num_clients": num_clients,
          "partition": "iid", "holdout_clients": holdout}

  # The training population is the other 15 clients: a 16-client cohort cannot be drawn.
  with pytest.raises(ConfigError,
                     match=rf"clients_per_round = {trained + 1} but .*only {trained}\b"):
    build_experiment(config_from_dict(_raw(str(files / "unused"), data,
                                           clients_per_round=trained + 1)))
  exp = build_experiment(config_from_dict(_raw(str(files / "unused"), data,
                                               clients_per_round=trained)))
  assert exp.train.num_clients == trained and exp.test.num_clients == held_out
  # Whole clients are held out: their examples are disjoint from the training ones and
  # together they are every example.
  rows = lambda d: {r.tobytes() for c in _clients(d) for r in c["x"]}
  train_rows, test_rows = rows(exp.train), rows(exp.test)
  assert not train_rows & test_rows
  assert len(train_rows) + len(test_rows) == N
  assert exp.test.num_examples == held_out * (N // num_clients)

  _, records = run("holdout", data, clients_per_round=trained)
  for r in records:
    assert r["sampled_clients"] == r["participating_clients"] == trained
    assert r["eval_clients"] == held_out
    assert r["eval_examples"] == held_out * (N // num_clients)  # all their examples
  _assert_learns(records, min_accuracy=0.8)  # on clients it never trained on
