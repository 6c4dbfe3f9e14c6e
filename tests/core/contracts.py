"""Helpers of the contract suite (tests/core/test_contracts.py): tiny runs of any
registered component, built through the config and the registry like a user's run.

Also imported by the suite's multi-device subprocess, so it holds no test.
"""

from __future__ import annotations

import copy

import chex
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


def cases() -> list[dict]:
  """Every registered algorithm, compressor and privacy mechanism, one case each."""
  return ([dict(algorithm=a) for a in names(ALGORITHMS)]
          + [dict(compression=c) for c in names(COMPRESSION) if c != "none"]
          + [dict(privacy=p) for p in names(PRIVACY) if p != "none"])


def case_id(case: dict) -> str:
  return "/".join(f"{k}={v}" for k, v in case.items())


def check_rounds(case: dict) -> None:
  """A component's round contract; raises AssertionError naming what broke.

  Needs a process of at least 2 devices (the suite runs it in a subprocess):
  3 rounds on 1 device in blocks of 2 keep every state's structure, shapes
  and dtypes, compile no program after the first round, move the model by
  a finite amount, and are bit-identical when run again from the same seed;
  the same 3 rounds on 2 devices with the whole per-device cohort in one
  block (blocks of 8) give the same model up to the order of float
  summation, so neither the device count nor the block size changes a
  result.
  """
  one = default_mesh(jax.devices()[:1])
  exp = experiment(**case, block_size=2)
  state, results, traces_after_first, engine = run(exp, 3, mesh=one)
  last = results[-1].state
  for name in ("server", "aggregator", "clients", "aggregator_clients"):
    chex.assert_trees_all_equal_shapes_and_dtypes(getattr(state, name), getattr(last, name))
  # Rounds 2 and 3 have round 1's shapes: no chunk program is traced again.
  assert engine.traces == traces_after_first >= 1, (engine.traces, traces_after_first)
  start = jax.tree.leaves(exp.engine.algorithm.params_of(state.server))
  end = params(exp, results[-1])
  assert all(np.all(np.isfinite(p)) for p in end), "non-finite parameters"
  assert any(not np.array_equal(np.asarray(a), b) for a, b in zip(start, end)), "model unmoved"
  # The same run again from the same seed (a fresh engine of the same pieces, so no
  # program is compiled twice): bit-identical.
  _, again, _, _ = run(exp, 3, mesh=one)
  chex.assert_trees_all_equal(end, params(exp, again[-1]))
  assert [r.metrics.get("train_loss") for r in results] == \
      [r.metrics.get("train_loss") for r in again], "train_loss differs between equal runs"
  # Two devices, one block per device instead of blocks of 2.
  wide = experiment(**case, block_size=8)
  _, results_wide, _, _ = run(wide, 3, mesh=default_mesh(jax.devices()[:2]))
  chex.assert_trees_all_close(end, params(wide, results_wide[-1]), rtol=1e-5, atol=1e-6)


def check_cases(ids: list[str]) -> dict:
  """`{case id: None, or what broke}` for the given case ids (`check_rounds`)."""
  by_id = {case_id(c): c for c in cases()}
  out = {}
  for i in ids:
    try:
      check_rounds(by_id[i])
      out[i] = None
    except AssertionError as e:
      out[i] = f"{type(e).__name__}: {str(e)[:2000]}"
  return out


def model_names() -> list[str]:
  return names(MODELS)
