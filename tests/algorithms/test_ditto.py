import json

import jax
import numpy as np
import optax
import pytest

from fedjax_sim.aggregators import weighted_mean
from fedjax_sim.algorithms import ditto, fedavg
from fedjax_sim.core import Engine, EngineConfig, Evaluator, LocalConfig, round_rng, sample_uniform
from fedjax_sim.models import mlp
from tests.conftest import packed_dataset, run_python, xla_flags

MODEL = mlp((5,), 3, hidden=(8,))
LOCAL = LocalConfig(batch_size=4, epochs=2, shuffle=False)


def _engine(alg, data, k=6):
  return Engine(alg, data, weighted_mean(), lambda r: sample_uniform(round_rng(0, r), 20, k),
                seed=0, config=EngineConfig(block_size=2))


def test_lam_zero_personal_model_is_the_local_model_and_the_global_model_is_fedavg():
  data = packed_dataset(np.full(20, 6), num_features=5, num_classes=3)
  alg = ditto(MODEL, optax.sgd(0.2), optax.sgd(1.0), LOCAL, lam=0.0)
  engine = _engine(alg, data)
  state = engine.init(MODEL.init(jax.random.key(0)))
  w0 = state.server.params
  res = next(engine.rounds(state, 0, 1))
  ids = sample_uniform(round_rng(0, 0), 20, 6)
  personal = engine.client_state(res.state, np.arange(20))
  for c in range(20):
    v_c = jax.tree.map(lambda a: a[c], personal)
    if c in ids:  # trained from w0 with no pull towards w: the same as its FedAvg local model
      out = fedavg(MODEL, optax.sgd(0.2), optax.sgd(1.0), LOCAL).client_update(
          w0, _client_data(data, c), None, jax.random.key(0))
      jax.tree.map(lambda v, w, d: np.testing.assert_allclose(v, w + d, rtol=1e-5, atol=1e-6),
                   v_c, w0, out.update)
    else:  # untouched: still the initial model
      jax.tree.map(np.testing.assert_array_equal, v_c, w0)
  # The global model moves exactly as FedAvg's.
  ref = _engine(fedavg(MODEL, optax.sgd(0.2), optax.sgd(1.0), LOCAL), data)
  ref_res = next(ref.rounds(ref.init(w0), 0, 1))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               res.server_state.params, ref_res.server_state.params)


def _client_data(data, c):
  from fedjax_sim.core.algorithm import ClientData
  ex, mask = data.gather([c], 8)
  return ClientData(jax.tree.map(lambda a: a[0], ex), mask[0])


def personal_eval() -> dict:
  """Ditto for 3 rounds on this process's devices; every client's personal evaluation."""
  data = packed_dataset(np.random.default_rng(0).integers(4, 12, 20), num_features=5,
                        num_classes=3)
  train, test = data.split_examples(0.5)
  engine = _engine(ditto(MODEL, optax.sgd(0.2), optax.sgd(1.0), LOCAL, lam=0.1), train)
  state = engine.init(MODEL.init(jax.random.key(0)))
  for res in engine.rounds(state, 0, 3):
    state = res.state
  ev = Evaluator(MODEL, test, mesh=engine.mesh, block_size=2, key=jax.random.key(1))
  got = ev.per_client_personal(state.clients, lambda v: v, engine.rows_per_device)
  personal = engine.client_state(state, np.arange(20))
  return {"devices": jax.device_count(), "ids": got["client_ids"].tolist(),
          "loss": got["loss_sum"].tolist(),
          "personal": jax.tree.map(lambda a: np.asarray(a).tolist(), personal)}


@pytest.mark.parametrize("devices", [1, 2])
def test_personalized_evaluation_scores_each_client_with_its_own_model(devices):
  if devices == 1:  # this process (the suite runs on one CPU device)
    out = json.loads(json.dumps(personal_eval()))
  else:
    out = json.loads(run_python(
        "import json\nfrom tests.algorithms.test_ditto import personal_eval\n"
        "print(json.dumps(personal_eval()))",
        {"XLA_FLAGS": xla_flags(devices), "JAX_PLATFORMS": "cpu"}).strip().splitlines()[-1])
  assert out["devices"] == devices
  data = packed_dataset(np.random.default_rng(0).integers(4, 12, 20), num_features=5,
                        num_classes=3)
  _, test = data.split_examples(0.5)
  personal = jax.tree.map(np.asarray, out["personal"], is_leaf=lambda x: isinstance(x, list))
  for cid, loss in zip(out["ids"], out["loss"]):
    v = jax.tree.map(lambda a: a[cid], personal)
    alone = Evaluator(MODEL, test.select([cid]), block_size=2,
                      key=jax.random.key(1)).per_client(v)
    np.testing.assert_allclose(loss, alone["loss_sum"][0], rtol=1e-5)
  assert sorted(out["ids"]) == list(range(20))
