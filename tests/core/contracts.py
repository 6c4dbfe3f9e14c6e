"""Helpers of the contract suite (tests/core/test_contracts.py): tiny runs of any
registered component, built through the config and the registry like a user's run.

Also imported by the suite's multi-device subprocess, so it holds no test.
"""

from __future__ import annotations

import copy

import jax
import numpy as np

import tests.runner.plugin_algorithm  # noqa: F401  (a component registered outside the package)
from fedjax_sim.core import Engine
from fedjax_sim.core.engine import default_mesh
from fedjax_sim.core.keys import Purpose, run_key
from fedjax_sim.core.registry import ALGORITHMS, COMPRESSION, MODELS, PRIVACY
from fedjax_sim.runner.build import build_experiment
from fedjax_sim.runner.config import config_from_dict

SKIP = {"script"}  # objects a script hands in; nothing to build from a config

BASE = {
    "seed": 3, "rounds": 3, "output_dir": "unused", "progress": False,
    "data": {"kind": "gaussian_mixture", "num_clients": 16, "examples_per_client": 6,
             "num_features": 4, "num_classes": 3},
    "model": {"kind": "logreg"},
    "algorithm": {"batch_size": 3, "client_optimizer": {"learning_rate": 0.3}},
    "sampling": {"clients_per_round": 6},
    "engine": {"bucketing": False},
}


def names(family) -> list[str]:
  return [n for n in family.names() if n not in SKIP]


def _merge(raw: dict, extra: dict) -> dict:
  for section, values in extra.items():
    if isinstance(values, dict) and isinstance(raw.get(section), dict):
      # A new selector starts the section afresh (the keys differ per component).
      selector = {"sampling": "scheme"}.get(section)
      if selector in values:
        raw[section] = dict(values)
      else:
        raw[section] = {**raw[section], **values}
    else:
      raw[section] = values
  return raw


def raw_config(*, algorithm="fedavg", compression="none", privacy="none", block_size=2) -> dict:
  raw = copy.deepcopy(BASE)
  raw["algorithm"]["name"] = algorithm
  raw["engine"]["block_size"] = block_size
  if compression != "none":
    raw["compression"] = {"method": compression}
    _merge(raw, COMPRESSION.get(compression).traits.get("example", {}))
  if privacy != "none":
    raw["privacy"] = {"mechanism": privacy}
    _merge(raw, PRIVACY.get(privacy).traits.get("example", {}))
  _merge(raw, ALGORITHMS.get(algorithm).traits.get("example", {}))
  if privacy == "dp_ftrl":
    raw["sampling"] = {"scheme": "shuffle", "clients_per_round": 6}
  return raw


def experiment(**kwargs):
  return build_experiment(config_from_dict(raw_config(**kwargs)))


def run(exp, rounds: int = 3, mesh=None):
  """`(initial state, [RoundResult], traces after round 1)` of `rounds` rounds."""
  engine = exp.engine
  if mesh is not None:
    engine = Engine(engine.algorithm, exp.train, engine.aggregator, engine.sampler,
                    seed=exp.config.seed, config=engine.config, mesh=mesh)
  state = engine.init(exp.model.init(run_key(exp.config.seed, Purpose.INIT)))
  results, traces_after_first = [], None
  for result in engine.rounds(state, 0, rounds):
    results.append(result)
    if traces_after_first is None:
      traces_after_first = engine.traces
  return state, results, traces_after_first, engine


def params(exp, result) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(exp.engine.algorithm.params_of(
      result.state.server))]


def device_counts_agree(family: str, rtol: float = 1e-5, atol: float = 1e-6) -> dict:
  """For every registered component of one family ("algorithm", "compression" or
  "privacy"): params after a round on 1 device vs all devices."""
  cases = {"algorithm": [dict(algorithm=a) for a in names(ALGORITHMS)],
           "compression": [dict(compression=c) for c in names(COMPRESSION) if c != "none"],
           "privacy": [dict(privacy=p) for p in names(PRIVACY) if p != "none"]}[family]
  out = {}
  for case in cases:
    exp = experiment(**case)
    one = run(exp, 1, mesh=default_mesh(jax.devices()[:1]))[1][-1]
    many = run(exp, 1, mesh=default_mesh(jax.devices()))[1][-1]
    diffs = [float(np.max(np.abs(a - b) - rtol * np.abs(b)))
             for a, b in zip(params(exp, one), params(exp, many))]
    out["/".join(f"{k}={v}" for k, v in case.items())] = max(diffs) <= atol
  return out


def model_names() -> list[str]:
  return names(MODELS)
