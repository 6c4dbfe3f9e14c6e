"""Every algorithm name in the config schema builds and runs end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim.core.registry import ALGORITHMS
from fedjax_sim.core.schema import OptimizerConfig, build_optimizer
from fedjax_sim.runner.config import ConfigError, applicable_keys, config_from_dict
from fedjax_sim.runner.io import read_metrics
from fedjax_sim.runner.run import build_experiment, run_experiment

NAMES = [n for n in ALGORITHMS.names() if n != "script"]  # script: objects from Python


@pytest.mark.parametrize("name", NAMES)
def test_algorithm_runs_from_config(name, tmp_path):
  server_lr = 0.01 if name in ("fedadam", "fedyogi", "fedadagrad") else 1.0
  config = config_from_dict({
      "seed": 1, "rounds": 3, "output_dir": str(tmp_path / name), "progress": False,
      "data": {"kind": "gaussian_mixture", "num_clients": 40, "num_features": 6,
               "num_classes": 3, "examples_per_client": 8},
      "model": {"kind": "mlp", "hidden": [8]},
      "algorithm": {"name": name, "batch_size": 4, "client_optimizer": {"learning_rate": 0.2},
                    **({"server_optimizer": {"learning_rate": server_lr}} if "server_optimizer"
                       in applicable_keys("algorithm", name) else {})},
      "sampling": {"clients_per_round": 8},
      "engine": {"block_size": 4},
      "eval": {"every": 1}})
  run_experiment(config, log=lambda *a: None)
  records = read_metrics(str(tmp_path / name / "metrics.jsonl"))
  assert [r["round"] for r in records] == [1, 2, 3]
  for r in records:
    assert r["participating_clients"] == 8
    assert r["update_norm"] > 0
  # Every algorithm learns this well-separated mixture: the global model's loss on
  # the held-out examples falls round over round.
  losses = [r["eval_loss"] for r in records]
  assert losses[2] < losses[1] < losses[0], losses


def test_ditto_reports_personalized_metrics(tmp_path):
  config = config_from_dict({
      "seed": 1, "rounds": 2, "output_dir": str(tmp_path / "d"), "progress": False,
      "data": {"kind": "gaussian_mixture", "num_clients": 40, "num_features": 6,
               "num_classes": 3, "examples_per_client": 8},
      "model": {"kind": "mlp", "hidden": [8]},
      "algorithm": {"name": "ditto", "batch_size": 4, "lam": 0.5},
      "sampling": {"clients_per_round": 8}, "engine": {"block_size": 4},
      "eval": {"every": 1, "max_clients": 10}})
  run_experiment(config, log=lambda *a: None)
  last = read_metrics(str(tmp_path / "d" / "metrics.jsonl"))[-1]
  assert last["eval_clients"] == last["eval_personal_clients"] == 10
  for key in ("eval_personal_accuracy", "eval_personal_accuracy_client_p10", "eval_accuracy"):
    assert 0 <= last[key] <= 1


def _small(name, algorithm, **extra):
  return config_from_dict({
      "seed": 3, "rounds": 3, "output_dir": "unused", "progress": False,
      "data": {"kind": "gaussian_mixture", "num_clients": 20, "num_features": 5,
               "num_classes": 3, "examples_per_client": 8},
      "model": {"kind": "logreg"},
      "algorithm": {"name": name, "batch_size": 4, **algorithm},
      "sampling": {"clients_per_round": 5}, "engine": {"block_size": 4}, **extra})


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize("name,server,b1,b2", [
    ("fedadam", {"learning_rate": 0.03, "b1": 0.8, "b2": 0.95}, 0.8, 0.95),
    ("fedyogi", {"learning_rate": 0.03}, 0.9, 0.99),  # the paper's defaults
    ("fedadagrad", {"learning_rate": 0.1}, 0.0, None),
])
def test_fedopt_from_config_moves_the_server_as_algorithm_2(name, server, b1, b2):
  """algorithm.name = fedadam | fedyogi | fedadagrad is Reddi et al. 2021, Algorithm 2.

  Each round's average delta Delta_t is measured by running the same round
  (same cohort, same client keys) with FedAvg from the same model; Algorithm
  2, transcribed in numpy, must then give the FedOpt run's next model.
  """
  tau, eta = 0.01, server["learning_rate"]
  exp = build_experiment(_small(name, {"tau": tau, "server_optimizer": server}))
  avg = build_experiment(_small("fedavg", {"server_optimizer": {"learning_rate": 1.0}}))
  state = exp.engine.init(exp.model.init(jax.random.key(0)))
  x = _flat(exp.engine.algorithm.params_of(state.server))
  m, v = np.zeros_like(x), np.full_like(x, tau**2)
  for r in range(3):
    start = jax.tree.map(np.array, exp.engine.algorithm.params_of(state.server))
    avg_state = avg.engine.init(jax.tree.map(jnp.asarray, start))
    (one_avg_round,) = avg.engine.rounds(avg_state, r, r + 1)
    delta = _flat(one_avg_round.server_state.params) - _flat(start)
    assert np.any(delta > 0) and np.any(delta < 0)
    (result,) = exp.engine.rounds(state, r, r + 1)
    state = result.state
    m = b1 * m + (1 - b1) * delta
    if name == "fedadam":
      v = b2 * v + (1 - b2) * delta**2
    elif name == "fedyogi":
      v = v - (1 - b2) * delta**2 * np.sign(v - delta**2)
    else:
      v = v + delta**2
    x = x + eta * m / (np.sqrt(v) + tau)
    np.testing.assert_allclose(_flat(exp.engine.algorithm.params_of(state.server)), x,
                               rtol=1e-4, atol=1e-6, err_msg=f"{name}, round {r + 1}")


@pytest.mark.parametrize("algorithm,needle", [
    ({"name": "fedadam", "server_optimizer": {"name": "adam"}},
     "whose server optimizer is fed_adam, the paper-exact step of Reddi et al. 2021 "
     "(not optax.adam)"),
    ({"name": "fedadam", "server_optimizer": {"eps": 0.1}}, "set algorithm.tau instead"),
    ({"name": "fedyogi", "server_optimizer": {"tau": 0.1}}, "set algorithm.tau instead"),
    ({"name": "fedadagrad", "server_optimizer": {"b2": 0.9}},
     "Unknown config key 'algorithm.server_optimizer.b2' for algorithm.name = 'fedadagrad'"),
    ({"name": "fedyogi", "server_optimizer": {"nesterov": True}},
     "use algorithm.name = 'fedavg' with algorithm.server_optimizer.name = 'yogi'"),
    ({"name": "fedadam", "server_optimizer": {"b1": 1.0}},
     "algorithm.server_optimizer.b1 = 1.0 must be a number in [0, 1)"),
    ({"name": "fedavg", "server_optimizer": {"name": "fed_adam"}},
     "select it with algorithm.name = 'fedadam'"),
])
def test_fedopt_server_settings_are_checked(algorithm, needle):
  with pytest.raises(ConfigError) as e:
    config_from_dict({"algorithm": algorithm})
  assert needle in str(e.value)


def test_fedopt_names_build_the_paper_exact_optimizer_and_fedavg_keeps_optax():
  paper = config_from_dict({"algorithm": {
      "name": "fedyogi", "tau": 0.01, "server_optimizer": {"learning_rate": 0.03, "b1": 0.5}}})
  assert paper.algorithm.server_optimizer == OptimizerConfig(name="fed_yogi", learning_rate=0.03,
                                                             kwargs={"b1": 0.5})
  assert paper.algorithm.tau == 0.01
  same = config_from_dict({"algorithm": {"name": "fedyogi", "server_optimizer": {
      "name": "fed_yogi", "learning_rate": 0.03}}}).algorithm
  assert same.server_optimizer.name == "fed_yogi"
  # One step each on Delta = 1e-3: optax.adam's is ten times the paper's
  # (1 - b1) Delta / (sqrt(b2 tau^2 + (1 - b2) Delta^2) + tau).
  g, x = {"w": jnp.full((2,), -1e-3)}, {"w": jnp.zeros(2)}
  steps = {}
  for key, a in (("paper", config_from_dict({"algorithm": {
      "name": "fedadam", "server_optimizer": {"learning_rate": 1.0}}}).algorithm),
                 ("optax", config_from_dict({"algorithm": {"name": "fedavg", "server_optimizer": {
                     "name": "adam", "learning_rate": 1.0, "b2": 0.99, "eps": 1e-3}}}).algorithm)):
    opt = a.server_step() if a.name == "fedadam" else build_optimizer(a.server_optimizer)
    steps[key] = float(opt.update(g, opt.init(x), x)[0]["w"][0])
  np.testing.assert_allclose(steps["paper"], 0.1e-3 / (np.sqrt(0.99e-6 + 0.01e-6) + 1e-3),
                             rtol=1e-5)
  np.testing.assert_allclose(steps["optax"], 0.5, rtol=1e-5)
