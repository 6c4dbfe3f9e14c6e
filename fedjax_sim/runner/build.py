"""From a validated `Config` to built objects: data, model, algorithm, privacy plan, engine.

Every component comes from the registry (`fedjax_sim.core.registry`): the
section's selector names it, its factory builds it. `Parts` carries objects a
Python script supplies instead (its own data, model, algorithm or
aggregation stage); their config sections then say `script` (see
`fedjax_sim.runner.script_parts`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fedjax_sim.aggregators import weighted_mean
from fedjax_sim.compression import compressed_mean
from fedjax_sim.core import (Aggregator, Algorithm, Engine, EngineConfig, Evaluator, FederatedData,
                             Model)
from fedjax_sim.core.heterogeneity import SystemConfig
from fedjax_sim.core.keys import Purpose, run_key
from fedjax_sim.core.registry import (ALGORITHMS, COMPRESSION, DATASETS, MODELS, PRIVACY, SAMPLERS,
                                      Context)
from fedjax_sim.privacy.mechanisms import PrivacyPlan
from fedjax_sim.runner.config import Config, ConfigError


@dataclasses.dataclass
class Parts:
  """Objects a script supplies in place of the config's components (None: build it)."""

  train: FederatedData | None = None
  test: FederatedData | None = None
  model: Model | None = None
  algorithm: Algorithm | None = None
  aggregator: Aggregator | None = None


@dataclasses.dataclass
class Experiment:
  """Everything built from a config, before any round runs."""

  config: Config
  train: FederatedData
  test: FederatedData
  model: Model
  engine: Engine
  evaluator: Evaluator
  eval_ids: np.ndarray  # population id of each evaluation client
  privacy: PrivacyPlan | None = None
  # What the algorithm's factory received (a vmap sweep rebuilds it with traced values).
  context: Context | None = None


# -- building -------------------------------------------------------------------


def build_data(c: Config) -> tuple[FederatedData, FederatedData]:
  """The training population and the evaluation clients."""
  data = DATASETS.of(c.data).build(c.data, Context(seed=c.seed, config=c))
  pair = data if isinstance(data, tuple) else (data,)
  if len(pair) not in (1, 2) or not all(isinstance(d, FederatedData) for d in pair):
    raise ConfigError(f"data.kind = {c.data.kind!r} built {type(data).__name__}; its factory "
                      "must return a FederatedData (split by the config) or a (train, test) "
                      "pair of them (a dataset with its own split).")
  return pair if len(pair) == 2 else split(c, data)


def split(c: Config, data: FederatedData) -> tuple[FederatedData, FederatedData]:
  """`(train, evaluation)` clients: held-out clients, or each client's last examples."""
  if c.data.holdout_clients > 0:
    return data.split_clients(c.data.holdout_clients, seed=c.seed)
  return data.split_examples(c.data.test_fraction)


def _num_classes(c: Config, data: FederatedData) -> int:
  """The dataset's own class count (a trait, e.g. a text task's vocabulary), else
  data.num_classes raised to cover every label the data holds."""
  declared = DATASETS.trait(c.data, "num_classes")
  if declared is not None:
    return int(declared)
  y = data.features.get("y")
  if y is None or not len(y) or not np.issubdtype(np.asarray(y[:1]).dtype, np.integer):
    return int(c.data.num_classes)
  return max(int(c.data.num_classes), int(np.max(y)) + 1)


def build_model(c: Config, data: FederatedData) -> Model:
  """The model of the config for this population."""
  return MODELS.of(c.model).build(c.model, Context(seed=c.seed, config=c, train=data,
                                                   num_classes=_num_classes(c, data)))


def build_compressor(c: Config):
  """The compression section's channel (a `Compressor`), an aggregation stage that
  replaces the mean (e.g. majority vote), or None (float32 uploads)."""
  return COMPRESSION.of(c.compression).build(c.compression, Context(seed=c.seed, config=c))


def build_experiment(c: Config, noise_multiplier: float | None = None,
                     parts: Parts | None = None) -> Experiment:
  """Builds data, model, algorithm, privacy plan, engine and evaluator from the registry.

  Args:
    c: the validated config.
    noise_multiplier: overrides the privacy section's (see `plan_privacy`).
    parts: objects a script supplies instead of building them.
  """
  parts = parts or Parts()
  if parts.train is not None:
    train, test = (parts.train, parts.test) if parts.test is not None else split(c, parts.train)
  else:
    train, test = build_data(c)
  if "clients_per_round" in {f.name for f in dataclasses.fields(c.sampling)} and \
      c.sampling.clients_per_round > train.num_clients:
    raise ConfigError(f"sampling.clients_per_round = {c.sampling.clients_per_round} but the data "
                      f"has only {train.num_clients} training clients.")
  model = parts.model if parts.model is not None else build_model(c, train)
  channel = build_compressor(c)
  compressor = None if isinstance(channel, Aggregator) else channel
  ctx = Context(seed=c.seed, config=c, train=train, model=model, compressor=compressor,
                noise_multiplier=noise_multiplier)
  privacy = PRIVACY.of(c.privacy).build(c.privacy, ctx)
  ctx.local_dp = privacy.local_dp if privacy is not None and privacy.local_dp else None
  algorithm = (parts.algorithm if parts.algorithm is not None else
               ALGORITHMS.of(c.algorithm).build(c.algorithm, ctx))
  sampler = SAMPLERS.of(c.sampling).build(c.sampling, ctx)
  if parts.aggregator is not None:
    aggregator = parts.aggregator
  elif privacy is not None and privacy.aggregator is not None:
    aggregator = privacy.aggregator
  elif isinstance(channel, Aggregator):
    aggregator = channel
  elif compressor is not None:
    aggregator = compressed_mean(compressor, getattr(c.compression, "error_feedback", False))
  else:
    aggregator = weighted_mean()
  e, sy = c.engine, c.system
  system = SystemConfig(sy.dropout, sy.dropout_concentration, sy.straggler_fraction,
                        sy.straggler_policy, sy.straggler_work, sy.straggler_concentration)
  engine = Engine(algorithm, train, aggregator, sampler, seed=c.seed, system=system,
                  config=EngineConfig(e.block_size, (int(e.max_chunk_mib * 2**20) if e.max_chunk_mib else None), e.bucketing,
                                      e.prefetch, int(e.encode_cache_mib * 2**20),
                                      e.client_loop, e.data_placement, e.small_contractions))
  eval_data, eval_ids = test, np.arange(test.num_clients)
  if c.eval.max_clients and test.num_clients > c.eval.max_clients:
    rng = np.random.default_rng(np.random.SeedSequence([c.seed, 0xE7A1]))
    eval_ids = np.sort(rng.choice(test.num_clients, c.eval.max_clients, replace=False))
    eval_data = test.select(eval_ids)
  evaluator = Evaluator(model, eval_data, mesh=engine.mesh, block_size=e.block_size,
                        key=run_key(c.seed, Purpose.EVAL), client_loop=e.client_loop)
  return Experiment(c, train, test, model, engine, evaluator, eval_ids, privacy, ctx)


