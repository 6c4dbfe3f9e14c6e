import json

import jax
import numpy as np
import optax
import pytest

from fedjax_sim.aggregators import weighted_mean
from fedjax_sim.algorithms import fedavg
from fedjax_sim.core import (Engine, EngineConfig, LocalConfig, round_rng,
                             sample_uniform)
from fedjax_sim.core.data import FederatedData, aligned_empty
from fedjax_sim.models import logistic_regression, mlp
from tests.conftest import packed_dataset, run_python, xla_flags

SIZES = np.random.default_rng(0).integers(1, 9, size=40)  # 1 or 2 steps per epoch at batch 4


_ALGS = {}


def _engine(data, model, local, *, block_size=4, k=12, lr=0.1, server=None, seed=0, mesh=None,
            max_chunk=64, placement="auto"):
  # max_chunk is in example slots; the packed test data has 5 float32 + 1 int32 per example.
  # Reusing one algorithm object lets engines share compiled chunk programs.
  key = (model, local, lr, server)
  if key not in _ALGS:
    _ALGS[key] = fedavg(model, optax.sgd(lr), server or optax.sgd(1.0), local)
  alg = _ALGS[key]
  return Engine(alg, data, weighted_mean(),
                lambda r: sample_uniform(round_rng(seed, r), data.num_clients, k), seed=seed,
                config=EngineConfig(block_size=block_size, max_chunk_bytes=max_chunk * 24,
                                    data_placement=placement),
                mesh=mesh)


def _run(engine, model, rounds, seed=0):
  state = engine.init(model.init(jax.random.key(seed)))
  results = list(engine.rounds(state, 0, rounds))
  return results[-1].server_state.params, [r.metrics for r in results]


def test_fedavg_one_full_batch_step_equals_centralized_gradient_descent():
  """With one full-batch local step and example weights, FedAvg is one GD step on the union."""
  data = packed_dataset(SIZES, num_features=5, num_classes=3)
  model = logistic_regression((5,), 3)
  lr = 0.7
  engine = _engine(data, model, LocalConfig(batch_size=int(SIZES.max()), epochs=1, shuffle=False),
                   lr=lr)
  params, _ = _run(engine, model, 1)
  ids = engine.plan(0).client_ids
  x = np.concatenate([data.client(i)["x"] for i in ids]).astype(np.float64)
  y = np.concatenate([data.client(i)["y"] for i in ids])
  p0 = model.init(jax.random.key(0))
  w = np.asarray(p0["Dense_0"]["kernel"], np.float64)
  b = np.asarray(p0["Dense_0"]["bias"], np.float64)
  logits = x @ w + b
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  p[np.arange(len(y)), y] -= 1
  n = len(y)
  np.testing.assert_allclose(params["Dense_0"]["kernel"], w - lr * x.T @ p / n, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(params["Dense_0"]["bias"], b - lr * p.sum(0) / n, rtol=1e-5,
                             atol=1e-6)


_MLP = mlp((5,), 3, hidden=(8,))
_LOCAL = LocalConfig(batch_size=4, epochs=2, shuffle=True)


@pytest.fixture(scope="module")
def mlp_setup():
  return packed_dataset(SIZES, num_features=5, num_classes=3, seed=1), _MLP, _LOCAL


def test_same_seed_gives_identical_metrics(mlp_setup):
  data, model, local = mlp_setup
  p1, m1 = _run(_engine(data, model, local), model, 3)
  p2, m2 = _run(_engine(data, model, local), model, 3)
  jax.tree.map(np.testing.assert_array_equal, p1, p2)
  drop = ("round_seconds", "clients_per_second", "examples_per_second")
  strip = lambda ms: [{k: v for k, v in m.items() if k not in drop} for m in ms]
  assert strip(m1) == strip(m2)
  p3, _ = _run(_engine(data, model, local, seed=1), model, 3)
  assert not np.allclose(p1["Dense_0"]["kernel"], p3["Dense_0"]["kernel"])


def test_block_size_does_not_change_the_result(mlp_setup):
  data, model, local = mlp_setup
  p1, m1 = _run(_engine(data, model, local, block_size=1, max_chunk=8), model, 2)
  p64, m64 = _run(_engine(data, model, local, block_size=64, max_chunk=1024), model, 2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p1, p64)
  np.testing.assert_allclose(m1[-1]["train_loss"], m64[-1]["train_loss"], rtol=1e-5)


def test_second_round_does_not_recompile(mlp_setup):
  _, model, local = mlp_setup
  data = packed_dataset(np.full(40, 7), num_features=5, num_classes=3)
  engine = _engine(data, model, local, block_size=3)
  state = engine.init(model.init(jax.random.key(0)))
  gen = engine.rounds(state, 0, 4)
  next(gen)
  traces = engine.traces
  assert traces >= 1
  list(gen)
  assert engine.traces == traces


def test_update_norm_and_padding_metrics(mlp_setup):
  data, model, local = mlp_setup
  _, metrics = _run(_engine(data, model, local), model, 1)
  m = metrics[0]
  assert m["clients"] == 12 and m["sampled_clients"] == 12
  assert 0 < m["padding_efficiency"] <= 1
  ids = sample_uniform(round_rng(0, 0), 40, 12)
  assert m["update_norm"] > 0
  assert m["examples"] == 2 * SIZES[ids].sum()  # two epochs over every real example


def _counting_algorithm(model, local):
  """FedAvg whose per-client state counts participations and keeps the last delta."""
  base = fedavg(model, optax.sgd(0.1), optax.sgd(1.0), local)

  def client_state_init(params):
    return {"count": np.float32(0.0), "last": jax.tree.map(jax.numpy.zeros_like, params)}

  def client_update(bcast, data, state, key):
    out = base.client_update(bcast, data, None, key)
    new = {"count": state["count"] + 1.0, "last": out.update}
    return out._replace(client_state=new)

  return base._replace(client_update=client_update, client_state_init=client_state_init)


def device_runs() -> dict:
  """Rounds on every device of this process: FedAvg with the data resident and streamed,
  and a per-client store (only the sampled clients' rows change). JSON-ready."""
  data = packed_dataset(SIZES, num_features=5, num_classes=3, seed=1)
  model = mlp((5,), 3, hidden=(8,))
  out = {"devices": jax.device_count()}

  def copied(offset):
    """The data in new arrays starting `offset` bytes past a 64-byte boundary."""
    features = {}
    for k, v in data.features.items():
      raw = aligned_empty((v.nbytes + 64,), np.uint8)
      features[k] = raw[offset:offset + v.nbytes].view(v.dtype).reshape(v.shape)
      features[k][:] = v
    return FederatedData(features, data.starts, data.sizes)

  # Resident data in the shared layout (aligned: every device aliases the whole store,
  # blocks dealt to balance the devices) and by owner (misaligned), and streamed.
  for name, placement, offset in (("shared", "device", 0), ("by owner", "device", 4),
                                  ("host", "host", 0)):
    engine = _engine(copied(offset), model, LocalConfig(batch_size=4, epochs=2, shuffle=True),
                     block_size=2, placement=placement)
    assert engine.placement["data"] == placement
    if placement == "device":
      assert engine.placement["layout"] == name and engine.resident.shared == (name == "shared")
      assert engine.planner.by_owner == (name == "by owner")
    params, metrics = _run(engine, model, 2)
    out[name] = {"params": jax.tree.map(lambda a: np.asarray(a).tolist(), params),
                 "loss": metrics[-1]["train_loss"]}
  sampler = lambda r: sample_uniform(round_rng(0, r), data.num_clients, 7)
  engine = Engine(_counting_algorithm(_MLP, _LOCAL), data, weighted_mean(), sampler, seed=0,
                  config=EngineConfig(block_size=2))
  state = engine.init(_MLP.init(jax.random.key(0)))
  for res in engine.rounds(state, 0, 5):
    state = res.state
  stored = engine.client_state(state, np.arange(data.num_clients))
  expected = np.zeros(data.num_clients)
  for r in range(5):
    expected[sampler(r)] += 1
  out["store"] = {
      "count": stored["count"].tolist(), "expected": expected.tolist(),
      "last_norm": [float(np.abs(stored["last"]["Dense_0"]["kernel"][c]).sum())
                    for c in range(data.num_clients)],
      "params": jax.tree.map(lambda a: np.asarray(a).tolist(), res.server_state.params)}
  return out


def test_one_and_four_devices_give_the_same_aggregate_and_store():
  # One device: this process (the suite runs on one CPU device); four: a subprocess.
  out = {1: json.loads(json.dumps(device_runs()))}
  text = run_python("import json\nfrom tests.core.test_engine import device_runs\n"
                    "print(json.dumps(device_runs()))",
                    {"XLA_FLAGS": xla_flags(4), "JAX_PLATFORMS": "cpu"})
  out[4] = json.loads(text.strip().splitlines()[-1])
  assert out[1]["devices"] == 1 and out[4]["devices"] == 4
  # Data resident on the devices (either layout) or streamed from the host, on 1 or 4
  # devices: the same round (up to the order of the sums).
  runs = [out[n][p] for n in (1, 4) for p in ("shared", "by owner", "host")]
  for run in runs[1:]:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 runs[0]["params"], run["params"])
    np.testing.assert_allclose(runs[0]["loss"], run["loss"], rtol=1e-5)
  # The per-client store updates the sampled clients only, on 1 and on 4 devices.
  for n in (1, 4):
    store = out[n]["store"]
    np.testing.assert_array_equal(store["count"], store["expected"])  # never sampled: 0
    for c, norm in enumerate(store["last_norm"]):
      if store["expected"][c] == 0:
        assert norm == 0.0  # untouched
      else:
        assert norm > 0.0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               out[1]["store"]["params"], out[4]["store"]["params"])


# -- one channel from clients to the server: message-shaped stages, no raw stats --------------

_SMALL = logistic_regression((4,), 3)
_SMALL_LOCAL = LocalConfig(batch_size=5, shuffle=False)


def _shaped_algorithm(shape: str):
  """FedAvg (uniform) whose message is not params-shaped, like SCAFFOLD's or q-FFL's.

  "scaffold": `{"control": -delta, "delta": delta}` (two params-shaped fields);
  "qffl": `{"delta": delta, "h": 1[has data]}` (params plus a scalar). The server
  applies the aggregate's "delta" and keeps the whole aggregate in its state.
  """
  base = fedavg(_SMALL, optax.sgd(0.5), optax.sgd(1.0), _SMALL_LOCAL, weighting="uniform")

  def message(delta, has_data):
    if shape == "scaffold":
      return {"delta": delta, "control": jax.tree.map(jax.numpy.negative, delta)}
    return {"delta": delta, "h": has_data}

  def client_update(bcast, data, client_state, key):
    out = base.client_update(bcast, data, client_state, key)
    has_data = jax.numpy.any(data.mask).astype(jax.numpy.float32)
    return out._replace(update=message(out.update, has_data))

  def server_init(params):
    zeros = jax.tree.map(jax.numpy.zeros_like, params)
    return {"inner": base.server_init(params),
            "last": message(zeros, jax.numpy.zeros((), jax.numpy.float32))}

  def server_update(state, aggregate, info):
    return {"inner": base.server_update(state["inner"], aggregate["delta"], info),
            "last": aggregate}

  return base._replace(server_init=server_init, broadcast=lambda s: s["inner"].params,
                       client_update=client_update, server_update=server_update,
                       params_of=lambda s: s["inner"].params)


_SHAPED = {shape: _shaped_algorithm(shape) for shape in ("scaffold", "qffl")}


def _dp_noise_by_hand(message_like, seed, round_num, clip, z, denom):
  """DP-FedAvg's release of an empty round: N(0, (z C)^2) per coordinate / D.

  One key per leaf of the message (in tree order), split from the update half
  of the round's finalize key.
  """
  from fedjax_sim.core.keys import Purpose, run_key
  update_key, _ = jax.random.split(jax.random.fold_in(run_key(seed, Purpose.FINALIZE),
                                                      round_num))
  leaves = jax.tree.leaves(message_like)
  keys = jax.random.split(update_key, len(leaves))
  return [z * clip * np.asarray(jax.random.normal(k, np.shape(x), np.float32)) / denom
          for x, k in zip(leaves, keys)]


@pytest.mark.parametrize("shape", ["scaffold", "qffl"])
@pytest.mark.parametrize("mechanism", ["gaussian_sum", "tree_sum"])
def test_an_empty_dp_round_releases_noise_shaped_like_the_message(shape, mechanism):
  """Nobody sampled in round 0: the zero sum, and so the noise, has the message's structure."""
  from fedjax_sim import privacy
  data = packed_dataset(np.full(6, 5), num_features=4, num_classes=3)
  alg = _SHAPED[shape]
  p0 = _SMALL.init(jax.random.key(0))
  cohorts = [np.zeros(0, np.int64), np.arange(0, 6, 2)]  # empty, then three clients
  clip, z, denom = 0.1, 1.0, 3.0
  engine = Engine(alg, data, getattr(privacy, mechanism)(clip, z, denom), lambda r: cohorts[r],
                  seed=4, config=EngineConfig(block_size=2))
  empty, full = list(engine.rounds(engine.init(p0), 0, 2))
  assert empty.metrics["round_failed"] == 1.0 and full.metrics["round_failed"] == 0.0
  like = alg.server_init(p0)["last"]
  last = jax.device_get(empty.server_state["last"])
  assert jax.tree.structure(last) == jax.tree.structure(like)
  for leaf in jax.tree.leaves(last):  # noise in every field, the scalar one included
    assert np.all(np.isfinite(leaf)) and np.all(leaf != 0)
  params = jax.device_get(empty.server_state["inner"].params)
  jax.tree.map(lambda p, a, d: np.testing.assert_allclose(p, a + d, rtol=1e-6, atol=1e-7),
               params, p0, last["delta"])  # the model moved by the noisy "delta"
  if mechanism == "gaussian_sum":  # the first tree node's noise is drawn otherwise
    for got, want in zip(jax.tree.leaves(last), _dp_noise_by_hand(like, 4, 0, clip, z, denom)):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)
  assert full.metrics["dp_participants"] == 3.0


def _released_keys(stage, like) -> set:
  """The names a stage releases to the server: its declared `released` among its metrics."""
  metrics = stage.finalize(stage.init(like), stage.zeros(like), 1.0, jax.random.key(0))[2]
  return set(stage.released) & set(metrics)


def _info_recording_algorithm(expected_keys: set):
  """FedAvg whose server step checks `info`'s keys (at trace time) and keeps `info` in its state."""
  base = fedavg(_SMALL, optax.sgd(0.5), optax.sgd(1.0), _SMALL_LOCAL)

  def server_init(params):
    return {"inner": base.server_init(params),
            "info": {k: jax.numpy.zeros((), jax.numpy.float32) for k in sorted(expected_keys)}}

  def server_update(state, aggregate, info):
    assert set(info) == expected_keys, sorted(info)
    return {"inner": base.server_update(state["inner"], aggregate, info),
            "info": {k: jax.numpy.asarray(info[k], jax.numpy.float32) for k in sorted(info)}}

  return base._replace(server_init=server_init, broadcast=lambda s: s["inner"].params,
                       server_update=server_update, params_of=lambda s: s["inner"].params)


def test_the_server_receives_only_what_the_stage_releases():
  from fedjax_sim.compression import compressed_mean, top_k
  from fedjax_sim.privacy import gaussian_sum
  sizes = np.array([5, 3, 0, 4, 5, 2])
  data = packed_dataset(sizes, num_features=4, num_classes=3)
  p0 = _SMALL.init(jax.random.key(0))
  cohort = np.array([0, 1, 2, 3])
  raw = {"examples", "loss_sum", "steps", "clients", "clients_with_data", "bits", "uploads",
         "update_norm_sum"}
  for stage in (weighted_mean(), compressed_mean(top_k(3)), gaussian_sum(1.0, 0.0, 4.0)):
    released = _released_keys(stage, p0)
    assert not released & raw
    engine = Engine(_info_recording_algorithm(released), data, stage, lambda r: cohort, seed=0,
                    config=EngineConfig(block_size=2))
    res = next(engine.rounds(engine.init(p0), 0, 1))
    info = jax.device_get(res.server_state["info"])
    assert res.metrics["examples"] == sizes[cohort].sum()  # raw stats reach the metrics only
    if "total_weight" in released:  # the exact sum of the weights (example counts)
      assert info["total_weight"] == sizes[cohort].sum() == res.metrics["total_weight"]
    else:  # DP: only the noisy aggregate; exact counts are diagnostics in the metrics
      assert info == {} and res.metrics["dp_participants"] == 3.0


def test_convolutional_clients_run_one_at_a_time_on_cpu_with_the_same_result():
  """XLA:CPU's vmapped (grouped) convolutions are slow: "auto" loops over a block's
  clients for a model with a convolution, and the loop trains exactly what vmap does."""
  from fedjax_sim.core.evaluation import Evaluator
  from fedjax_sim.models import cnn
  rng = np.random.default_rng(0)
  sizes = rng.integers(2, 7, size=6)
  base = packed_dataset(sizes, num_features=36, num_classes=3)
  data = type(base).from_offsets({"x": base.features["x"].reshape(-1, 6, 6, 1),
                                  "y": base.features["y"]}, np.concatenate([[0], np.cumsum(sizes)]))
  model = cnn((6, 6, 1), 3, channels=(2,), dense=4)
  local = LocalConfig(batch_size=4, epochs=1, shuffle=False)
  alg = fedavg(model, optax.sgd(0.1), optax.sgd(1.0), local)
  out = {}
  for loop in ("auto", "vmap"):
    engine = Engine(alg, data, weighted_mean(), lambda r: sample_uniform(round_rng(0, r), 6, 4),
                    seed=0, config=EngineConfig(block_size=4, client_loop=loop))
    state = engine.init(model.init(jax.random.key(0)))
    out[loop] = list(engine.rounds(state, 0, 2))[-1].server_state.params
    assert engine.client_loop == ("map" if loop == "auto" else "vmap")
  chex_close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  jax.tree.map(chex_close, out["auto"], out["vmap"])
  assert Evaluator(model, data, key=jax.random.key(0)).client_loop == "map"
  scores = [Evaluator(model, data, key=jax.random.key(0), client_loop=loop)(out["auto"])
            for loop in ("map", "vmap")]
  assert scores[0]["eval_loss"] == pytest.approx(scores[1]["eval_loss"], rel=1e-5)
  # Without convolutions the cost decides: a small model keeps the batched program,
  # one whose forward pass over a 16-example granule costs 2 * 16 * 512 * 2048 = 34
  # MFLOP (over program.MAP_MIN_FLOPS = 10 MFLOP) runs clients one at a time.
  assert Evaluator(mlp((36,), 3, (4,)), base, key=jax.random.key(0)).client_loop == "vmap"
  wide = packed_dataset(sizes, num_features=512, num_classes=3)
  assert Evaluator(mlp((512,), 3, (2048,)), wide, key=jax.random.key(0)).client_loop == "map"
