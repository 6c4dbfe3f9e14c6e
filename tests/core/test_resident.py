"""Training data resident on the devices: the in-program gather, placement, and the round."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_sim.aggregators import weighted_mean
from fedjax_sim.algorithms import fedavg, scaffold
from fedjax_sim.core import Engine, EngineConfig, LocalConfig, round_rng, sample_uniform
from fedjax_sim.core import resident
from fedjax_sim.core.data import FederatedData, aligned_empty
from fedjax_sim.core.engine import default_mesh
from fedjax_sim.core.program import gather_resident
from fedjax_sim.models import logistic_regression
from tests.conftest import default_emitters, packed_dataset

_SIZES = np.array([3, 0, 7, 1, 5, 12, 2, 0, 9, 4, 6, 1], np.int64)


def _image_data():
  """Clients with a 2-D float feature and an int label, stored out of client order."""
  rng = np.random.default_rng(0)
  total = int(_SIZES.sum())
  x = rng.normal(size=(total + 5, 2, 3)).astype(np.float32)
  y = rng.integers(0, 9, size=total + 5).astype(np.int32)
  # Windows in reverse order with gaps: the store is not contiguous in client order.
  ends = np.cumsum(_SIZES[::-1])[::-1] + 5
  return FederatedData({"x": x, "y": y}, ends - _SIZES, _SIZES)


def test_the_in_program_gather_equals_the_host_gather():
  data = _image_data()
  placed = resident.place(data, default_mesh(jax.devices()[:1]), rows_per_device=data.num_clients)
  ids = np.array([5, 1, 2, 0, 11, 8, 3, 7], np.int64)
  valid = np.array([1, 1, 1, 0, 1, 1, 0, 1], bool)
  for pad_to in (4, 8, 16):
    want, want_mask = data.gather(ids, pad_to, valid=valid)
    got, got_mask = jax.jit(gather_resident, static_argnums=3)(
        placed.arrays, jnp.asarray(ids, jnp.int32), jnp.asarray(valid), pad_to)
    np.testing.assert_array_equal(np.asarray(got_mask), want_mask)
    for k in want:
      # Real clients' slots equal (padding repeats the last example); invalid slots are
      # zeros; an empty client's slots, all masked, may hold any finite example.
      keep = valid & (_SIZES[ids] > 0)
      np.testing.assert_array_equal(np.asarray(got[k])[keep], want[k][keep])
      assert not np.asarray(got[k])[~valid].any()
  # The shard holds exactly the clients' examples, packed in id order.
  features, starts, sizes = placed.arrays
  np.testing.assert_array_equal(np.asarray(sizes), _SIZES)
  for c in range(data.num_clients):
    s, n = int(starts[c]), int(sizes[c])
    np.testing.assert_array_equal(np.asarray(features["x"])[s:s + n], data.client(c)["x"])
  assert placed.nbytes == resident.shard_nbytes(data, 1)


def test_auto_placement_keeps_data_on_devices_only_when_it_fits(monkeypatch):
  data = packed_dataset([4, 6, 2])
  mesh = default_mesh(jax.devices()[:1])
  # What a CPU device would add (nothing for arrays it can alias, which depends on where
  # numpy put them: counted the way the engine counts).
  need = resident.shard_nbytes(data, 1, on_cpu=True)
  monkeypatch.setattr(resident, "available_bytes", lambda mesh: (4 * need, "test memory"))
  chosen = resident.choose_placement("auto", data, mesh)
  assert chosen["data"] == "device" and "fits" in chosen["reason"]
  monkeypatch.setattr(resident, "available_bytes", lambda mesh: (need, "test memory"))
  chosen = resident.choose_placement("auto", data, mesh)
  assert chosen["data"] == "host" and "streamed" in chosen["reason"]
  assert chosen["resident_bytes"] == need and chosen["available_bytes"] == need
  assert resident.choose_placement("device", data, mesh)["data"] == "device"
  assert resident.choose_placement("host", data, mesh)["reason"].startswith("forced")
  with pytest.raises(ValueError, match="data_placement"):
    resident.choose_placement("gpu", data, mesh)


def test_host_memory_is_read_for_cpu_devices():
  have, source = resident.available_bytes(default_mesh(jax.devices()[:1]))
  assert have > 0 and "host" in source


_MODEL = logistic_regression((5,), 3)
_LOCAL = LocalConfig(batch_size=4, epochs=1)
_FEDAVG = fedavg(_MODEL, optax.sgd(0.1), optax.sgd(1.0), _LOCAL)
_SCAFFOLD = {n: scaffold(_MODEL, 0.1, _LOCAL, n) for n in (12, 30)}


def _rounds(alg, data, placement, rounds=3, k=9):
  sampler = lambda r: sample_uniform(round_rng(1, r), data.num_clients, k)
  engine = Engine(alg, data, weighted_mean(), sampler, seed=1,
                  config=EngineConfig(block_size=4, data_placement=placement))
  state = engine.init(_MODEL.init(jax.random.key(0)))
  results = list(engine.rounds(state, 0, rounds))
  return engine, results


# SCAFFOLD: a per-client store too (FedAvg's rounds are compared across placements and
# device counts in tests/core/test_engine.py).
@pytest.mark.parametrize("alg", [_SCAFFOLD[30]], ids=["scaffold"])
@default_emitters  # bit-for-bit across two programs: XLA's default machine code
def test_resident_rounds_equal_streamed_rounds(alg):
  data = packed_dataset(np.random.default_rng(3).integers(0, 14, 30), seed=2)
  host, host_results = _rounds(alg, data, "host")
  dev, dev_results = _rounds(alg, data, "device")
  assert host.placement["data"] == "host" and dev.placement["data"] == "device"
  assert host.resident is None and dev.resident is not None
  # Same clients, same data, same keys; on one device both paths sum the blocks
  # in the same order, so the rounds agree bit for bit.
  for a, b in zip(host_results, dev_results):
    for x, y in zip(jax.tree.leaves(a.state.server), jax.tree.leaves(b.state.server)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert a.metrics["train_loss"] == b.metrics["train_loss"]
    for k in a.clients:
      order_a, order_b = np.argsort(a.clients["client_id"]), np.argsort(b.clients["client_id"])
      np.testing.assert_array_equal(a.clients[k][order_a], b.clients[k][order_b])
  if alg is _SCAFFOLD[30]:  # the per-client store too
    ids = np.arange(data.num_clients)
    for x, y in zip(jax.tree.leaves(host.client_state(host_results[-1].state, ids)),
                    jax.tree.leaves(dev.client_state(dev_results[-1].state, ids))):
      np.testing.assert_array_equal(x, y)


def test_the_per_client_record_matches_the_round():
  sizes = np.random.default_rng(4).integers(0, 14, 30)
  data = packed_dataset(sizes, seed=2)
  engine, results = _rounds(_FEDAVG, data, "auto", rounds=2, k=11)
  for res in results:
    rec = res.clients
    sampled = np.sort(sample_uniform(round_rng(1, res.round_num), data.num_clients, 11))
    np.testing.assert_array_equal(np.sort(rec["client_id"]), sampled)
    np.testing.assert_array_equal(rec["examples"], sizes[rec["client_id"]])
    np.testing.assert_array_equal(rec["steps"], -(-sizes[rec["client_id"]] // 4))  # real steps
    assert rec["loss_sum"].sum() == pytest.approx(res.metrics["loss_sum"], rel=1e-5)
    assert rec["update_norm"].mean() == pytest.approx(res.metrics["mean_client_update_norm"],
                                                      rel=1e-5)
    assert all(v.shape == (11,) for v in rec.values())


def test_client_state_reads_the_asked_rows_and_rejects_unknown_ids():
  data = packed_dataset(np.full(12, 4), seed=2)
  engine, results = _rounds(_SCAFFOLD[12], data, "device", rounds=2, k=5)
  state = results[-1].state
  every = engine.client_state(state, np.arange(12))
  some = engine.client_state(state, [7, 2, 7])
  for full, part in zip(jax.tree.leaves(every), jax.tree.leaves(some)):
    np.testing.assert_array_equal(part, full[[7, 2, 7]])
  with pytest.raises(ValueError, match="client ids"):
    engine.client_state(state, [12])


def test_contiguous_aligned_data_is_aliased_not_copied_on_cpu():
  sizes = np.array([5, 0, 3, 8, 2, 6, 1, 4], np.int64)
  total = int(sizes.sum())
  x = aligned_empty((total, 16), np.float32)  # 64-byte rows, aligned start
  x[:] = np.random.default_rng(0).normal(size=x.shape)
  y = np.arange(total, dtype=np.int32)
  data = FederatedData.from_offsets({"x": x, "y": y}, np.concatenate([[0], np.cumsum(sizes)]))
  mesh = default_mesh(jax.devices()[:1])
  # x aliases (no bytes); y (4-byte rows from an unaligned malloc) may or may not, so count it
  # by hand: starts + sizes, plus y's shard unless aligned.
  y_bytes = 0 if y.ctypes.data % 64 == 0 else total * 4
  assert resident.shard_nbytes(data, 1, on_cpu=True) == 8 * len(sizes) + y_bytes
  assert resident.shard_nbytes(data, 1, on_cpu=False) == 8 * len(sizes) + total * (64 + 4)
  placed = resident.place(data, mesh, rows_per_device=len(sizes))
  ids = np.arange(len(sizes))
  got, mask = gather_resident(placed.arrays, jnp.asarray(ids, jnp.int32),
                              jnp.ones(len(ids), bool), 8)
  want, want_mask = data.gather(ids, 8)
  keep = sizes > 0
  np.testing.assert_array_equal(np.asarray(mask), want_mask)
  np.testing.assert_array_equal(np.asarray(got["x"])[keep], want["x"][keep])


def test_the_shared_layout_aliases_the_whole_store_on_every_device():
  sizes = np.array([5, 0, 3, 8, 2, 6, 1, 4], np.int64)
  total = int(sizes.sum())
  x = aligned_empty((total, 16), np.float32)
  x[:] = np.random.default_rng(0).normal(size=x.shape)
  y = aligned_empty((total,), np.int32)
  y[:] = np.arange(total)
  # Stored out of client order: the shared layout keeps the store's own offsets.
  starts = np.concatenate([[0], np.cumsum(sizes[::-1])])[:-1][::-1]
  data = FederatedData({"x": x, "y": y}, starts, sizes)
  mesh = default_mesh(jax.devices()[:1])
  assert resident.shareable(data, mesh)
  assert resident.shard_nbytes(data, 1, shared=True) == 8 * len(sizes)
  placed = resident.place(data, mesh, rows_per_device=len(sizes), shared=True)
  assert placed.shared
  features, got_starts, got_sizes = placed.arrays
  for k, v in (("x", x), ("y", y)):  # the host's memory itself, not a copy
    assert [s.data.unsafe_buffer_pointer() for s in features[k].addressable_shards] == [
        v.ctypes.data]
  np.testing.assert_array_equal(np.asarray(got_starts), starts)
  np.testing.assert_array_equal(np.asarray(got_sizes), sizes)
  ids = np.array([3, 0, 7, 1, 5], np.int64)
  got, mask = gather_resident(placed.arrays, jnp.asarray(ids, jnp.int32),
                              jnp.ones(len(ids), bool), 8)
  want, want_mask = data.gather(ids, 8)
  keep = sizes[ids] > 0
  np.testing.assert_array_equal(np.asarray(mask), want_mask)
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k])[keep], want[k][keep])
  # A feature array that does not start on a 64-byte boundary cannot be shared.
  raw = aligned_empty((total * 4 + 64,), np.uint8)
  odd = raw[4:4 + total * 4].view(np.int32)
  odd[:] = y
  unaligned = FederatedData({"x": x, "y": odd}, starts, sizes)
  assert not resident.shareable(unaligned, mesh)
  with pytest.raises(ValueError, match="shared resident layout needs"):
    resident.place(unaligned, mesh, rows_per_device=len(sizes), shared=True)


def test_a_store_in_the_older_modulo_layout_is_moved_to_the_range_layout():
  data = packed_dataset(np.full(10, 3), seed=2)
  engine = Engine(_SCAFFOLD[12], packed_dataset(np.full(12, 3)), weighted_mean(),
                  lambda r: np.arange(3), seed=0, config=EngineConfig(data_placement="host"))
  del data
  state = engine.init(_MODEL.init(jax.random.key(0)))
  # A store written on 3 devices of 4 rows in the older layout: client c at (c % 3) * 4 + c // 3.
  leaf = jax.tree.leaves(state.clients)[0]
  marker = np.zeros((12,) + leaf.shape[1:], np.float32)
  for c in range(12):
    marker[(c % 3) * 4 + c // 3] = c
  old = jax.tree.map(lambda a: marker.astype(a.dtype) if a.shape == leaf.shape else
                     np.zeros(a.shape, a.dtype), state.clients)
  moved = engine.relayout(dataclasses.replace(state, clients=old), 3, 4, "modulo")
  got = engine.client_state(moved, np.arange(12))
  np.testing.assert_array_equal(jax.tree.leaves(got)[0].reshape(12, -1)[:, 0], np.arange(12))
  with pytest.raises(ValueError, match="layout"):
    engine.relayout(dataclasses.replace(state, clients=old), 3, 4, "diagonal")
