"""Packed, columnar federated data.

All examples of all clients live in one array per feature; a client is a
`(start, size)` window into those arrays. A million clients are two int64
arrays, not a million Python objects. Views (per-client train/test splits,
subsets of clients) share the feature arrays and only carry new windows.

On disk a dataset is a folder of `.npy` files, one per feature, plus
`offsets.npy` (`num_clients + 1` cumulative sizes); it can be memory-mapped so
data larger than RAM streams from the page cache.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping

import numpy as np

_MANIFEST = "fedjax_sim_data.json"


class DataError(ValueError):
  """A federated dataset is malformed or does not match what was asked for."""


@dataclasses.dataclass(frozen=True)
class FederatedData:
  """Examples of many clients, packed feature by feature.

  Attributes:
    features: feature name -> array of shape `[total_examples, ...]`. All
      features share the leading axis.
    starts: `[num_clients]` int64, index of each client's first example.
    sizes: `[num_clients]` int64, number of examples of each client.
  """

  features: Mapping[str, np.ndarray]
  starts: np.ndarray
  sizes: np.ndarray

  def __post_init__(self):
    if not self.features:
      raise DataError("FederatedData needs at least one feature array.")
    lengths = {k: len(v) for k, v in self.features.items()}
    if len(set(lengths.values())) != 1:
      raise DataError(
          f"All feature arrays must have the same number of examples; got {lengths}.")
    starts = np.asarray(self.starts, np.int64)
    sizes = np.asarray(self.sizes, np.int64)
    if starts.shape != sizes.shape or starts.ndim != 1:
      raise DataError(
          f"starts and sizes must be 1-D of equal length; got {starts.shape} and {sizes.shape}.")
    total = next(iter(lengths.values()))
    if len(sizes) and (sizes.min() < 0 or starts.min() < 0 or (starts + sizes).max() > total):
      raise DataError(
          f"Client windows fall outside the {total} stored examples: check offsets/sizes.")
    object.__setattr__(self, "starts", starts)
    object.__setattr__(self, "sizes", sizes)

  # -- construction ---------------------------------------------------------

  @classmethod
  def from_offsets(cls, features: Mapping[str, np.ndarray], offsets) -> FederatedData:
    """Builds from contiguous storage: client `i` owns `offsets[i]:offsets[i+1]`."""
    offsets = np.asarray(offsets, np.int64)
    if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or np.any(np.diff(offsets) < 0):
      raise DataError("offsets must be a non-decreasing 1-D array starting at 0.")
    total = next(iter(features.values())).shape[0]
    if offsets[-1] != total:
      raise DataError(
          f"offsets[-1] = {offsets[-1]} but the feature arrays hold {total} examples.")
    return cls(dict(features), offsets[:-1].copy(), np.diff(offsets))

  @classmethod
  def from_client_arrays(cls, clients: list[Mapping[str, np.ndarray]]) -> FederatedData:
    """Packs a list of per-client feature dicts (convenient for small data)."""
    if not clients:
      raise DataError("from_client_arrays needs at least one client.")
    keys = list(clients[0])
    features = {k: np.concatenate([np.asarray(c[k]) for c in clients]) for k in keys}
    sizes = [len(c[keys[0]]) for c in clients]
    return cls.from_offsets(features, np.concatenate([[0], np.cumsum(sizes)]))

  # -- properties -----------------------------------------------------------

  @property
  def num_clients(self) -> int:
    return len(self.sizes)

  @property
  def num_examples(self) -> int:
    return int(self.sizes.sum())

  @property
  def feature_specs(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    return {k: (v.shape[1:], v.dtype) for k, v in self.features.items()}

  @property
  def bytes_per_example(self) -> int:
    return int(sum(v.dtype.itemsize * int(np.prod(v.shape[1:])) for v in self.features.values()))

  def client(self, i: int) -> dict[str, np.ndarray]:
    """One client's examples (a copy); for inspection and tests, not the hot path."""
    s, n = int(self.starts[i]), int(self.sizes[i])
    return {k: np.asarray(v[s:s + n]) for k, v in self.features.items()}

  # -- views ----------------------------------------------------------------

  def select(self, client_ids) -> FederatedData:
    """A view on a subset of clients, renumbered 0..len(client_ids)-1."""
    ids = np.asarray(client_ids, np.int64)
    return FederatedData(self.features, self.starts[ids], self.sizes[ids])

  def split_examples(self, test_fraction: float) -> tuple[FederatedData, FederatedData]:
    """Per-client train/test split: the last `ceil(f * n)` examples of each client.

    The split follows stored order (a temporal split for time-ordered data);
    call `shuffle_within_clients` first for a random split. Clients keep their
    ids in both views. A client with one example keeps it for training.
    """
    if not 0.0 < test_fraction < 1.0:
      raise DataError(f"test_fraction must be in (0, 1); got {test_fraction}.")
    n_test = np.ceil(self.sizes * test_fraction).astype(np.int64)
    n_test = np.minimum(n_test, np.maximum(self.sizes - 1, 0))
    n_train = self.sizes - n_test
    train = FederatedData(self.features, self.starts, n_train)
    test = FederatedData(self.features, self.starts + n_train, n_test)
    return train, test

  def split_clients(self, holdout_fraction: float, seed: int) -> tuple[FederatedData, FederatedData]:
    """Splits the population: a random `holdout_fraction` of clients never trains."""
    if not 0.0 < holdout_fraction < 1.0:
      raise DataError(f"holdout_fraction must be in (0, 1); got {holdout_fraction}.")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED]))
    perm = rng.permutation(self.num_clients)
    n_hold = max(1, int(round(holdout_fraction * self.num_clients)))
    if n_hold >= self.num_clients:
      raise DataError("holdout_fraction leaves no training client.")
    return self.select(np.sort(perm[n_hold:])), self.select(np.sort(perm[:n_hold]))

  def shuffle_within_clients(self, seed: int) -> FederatedData:
    """A packed copy with every client's examples in a random order."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5A0F]))
    order = np.concatenate([s + rng.permutation(n) for s, n in zip(self.starts, self.sizes)]
                           or [np.zeros(0, np.int64)])
    features = {k: np.asarray(v)[order] for k, v in self.features.items()}
    return FederatedData.from_offsets(features, np.concatenate([[0], np.cumsum(self.sizes)]))

  # -- gathering ------------------------------------------------------------

  def gather(self, client_ids, pad_to: int, valid=None,
             finite=None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Gathers clients into dense `[len(ids), pad_to, ...]` arrays plus a mask.

    A client with more than `pad_to` examples is truncated (the planner never
    asks for that). Padding slots of a real client repeat its last example;
    slots whose `valid` is False are zeros where `finite` is True (default:
    everywhere) and left uninitialised elsewhere (slots the device never
    reads). All padding is masked out.

    Returns:
      (features, mask): features[k] has shape `[len(ids), pad_to, *shape_k]`;
      mask is bool `[len(ids), pad_to]`.
    """
    ids = np.asarray(client_ids, np.int64)
    n = len(ids)
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    sizes = np.where(valid, np.minimum(self.sizes[ids], pad_to), 0)
    pos = np.arange(pad_to, dtype=np.int64)
    mask = pos[None, :] < sizes[:, None]
    # Runs of consecutive valid slots: each is one `take` straight into the output.
    edges = np.flatnonzero(np.diff(np.concatenate([[0], valid.astype(np.int8), [0]])))
    runs = list(zip(edges[0::2], edges[1::2]))
    out = {}
    for k, v in self.features.items():
      buf = np.empty((n, pad_to) + v.shape[1:], v.dtype)
      for lo, hi in runs:
        last = np.maximum(sizes[lo:hi] - 1, 0)
        index = self.starts[ids[lo:hi]][:, None] + np.minimum(pos[None, :], last[:, None])
        # An empty client's window may start at the very end; any in-range row will
        # do, since all its slots are masked.
        np.minimum(index, max(len(v) - 1, 0), out=index)
        np.take(v, index.reshape(-1), axis=0,
                out=buf[lo:hi].reshape(((hi - lo) * pad_to,) + v.shape[1:]))
      buf[~valid if finite is None else (~valid & np.asarray(finite, bool))] = 0
      out[k] = buf
    return out, mask

  # -- storage --------------------------------------------------------------

  def save(self, directory: str) -> None:
    """Writes a packed (contiguous) copy as `.npy` files plus a manifest."""
    os.makedirs(directory, exist_ok=True)
    packed = self if self._is_contiguous() else self._repacked()
    for k, v in packed.features.items():
      _atomic_save_npy(os.path.join(directory, f"{k}.npy"), np.asarray(v))
    _atomic_save_npy(os.path.join(directory, "offsets.npy"),
                     np.concatenate([[0], np.cumsum(packed.sizes)]).astype(np.int64))
    manifest = {"features": sorted(packed.features), "num_clients": packed.num_clients,
                "num_examples": packed.num_examples}
    tmp = os.path.join(directory, _MANIFEST + ".tmp")
    with open(tmp, "w") as f:
      json.dump(manifest, f)
    os.replace(tmp, os.path.join(directory, _MANIFEST))

  @classmethod
  def load(cls, directory: str, mmap: bool = False) -> FederatedData:
    """Loads a folder written by `save`; `mmap=True` memory-maps the features."""
    path = os.path.join(directory, _MANIFEST)
    if not os.path.exists(path):
      raise DataError(f"{directory!r} is not a fedjax_sim dataset: {_MANIFEST} is missing. "
                      "Write one with FederatedData.save().")
    try:
      with open(path) as f:
        manifest = json.load(f)
      names = manifest["features"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise DataError(f"Corrupt dataset manifest {path}: {e}. Re-create the dataset.") from e
    features = {}
    for k in names + ["offsets"]:
      file = os.path.join(directory, f"{k}.npy")
      try:
        arr = np.load(file, mmap_mode="r" if (mmap and k != "offsets") else None,
                      allow_pickle=False)
      except (OSError, ValueError, EOFError) as e:
        raise DataError(f"Cannot read {file}: {e}. The file is missing or corrupt; "
                        "re-create the dataset.") from e
      features[k] = arr
    offsets = features.pop("offsets")
    data = cls.from_offsets(features, offsets)
    if data.num_clients != manifest.get("num_clients"):
      raise DataError(f"{directory}: manifest says {manifest.get('num_clients')} clients, "
                      f"offsets.npy has {data.num_clients}. The dataset is corrupt.")
    return data

  def _is_contiguous(self) -> bool:
    total = next(iter(self.features.values())).shape[0]
    ends = np.concatenate([[0], np.cumsum(self.sizes)])
    return bool(np.array_equal(self.starts, ends[:-1]) and ends[-1] == total)

  def _repacked(self) -> FederatedData:
    index = np.concatenate([np.arange(s, s + n) for s, n in zip(self.starts, self.sizes)]
                           or [np.zeros(0, np.int64)])
    features = {k: np.asarray(v)[index] for k, v in self.features.items()}
    return FederatedData.from_offsets(features, np.concatenate([[0], np.cumsum(self.sizes)]))


def aligned_empty(shape, dtype) -> np.ndarray:
  """An uninitialised array whose data starts 64-byte aligned.

  CPU devices alias (rather than copy) aligned host arrays when data is
  placed on them (`core/resident.py`); numpy's own allocations are only
  16-byte aligned.
  """
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  buf = np.empty(nbytes + 64, np.uint8)
  offset = (-buf.ctypes.data) % 64
  return buf[offset:offset + nbytes].view(dtype).reshape(shape)


def _atomic_save_npy(path: str, array: np.ndarray) -> None:
  tmp = path + ".tmp.npy"
  np.save(tmp, array, allow_pickle=False)
  os.replace(tmp, path)
