"""The Python API: what `fedjax-sim run` does, from a script, with the script's own objects.

    sim = fedjax_sim.Simulation(
        Config(rounds=20, privacy=DPFedAvgConfig(target_epsilon=3.0), ...),
        data=my_federated_data, model=flax_classifier(MyNet(), (28, 28)))
    summary = sim.run()          # metrics.jsonl, summary.json, plots, checkpoints,
                                 # privacy report: the CLI's output folder
    sim.run(resume=True)         # continue it (the same objects again)

Components that are registered (the built-in ones, or a script's own
registered with `ALGORITHMS.register(...)` etc.) are chosen by their typed
config in `Config`; a ready object (`FederatedData`, `Model`, `Algorithm`,
`Aggregator`) can be passed instead, and the run's config.yaml then records
it as a `script` component with a fingerprint (see `runner.script_parts`).
"""

from __future__ import annotations

import dataclasses

from fedjax_sim.core import Aggregator, Algorithm, FederatedData, Model
from fedjax_sim.core.registry import COMPRESSION, PRIVACY
from fedjax_sim.runner import script_parts
from fedjax_sim.runner.build import Experiment, Parts, build_experiment
from fedjax_sim.runner.config import Config, ConfigError, config_from_dict, to_dict
from fedjax_sim.runner.run import run_experiment


def validate(config: Config | dict | None) -> Config:
  """A config checked exactly as a YAML file is (types, ranges, component rules).

  Sections built directly in Python (`FedProxConfig(mu=-1)`) skip the value
  checks YAML input gets; a round trip through `to_dict` runs them all.
  """
  if config is None:
    return config_from_dict({})
  if isinstance(config, dict):
    return config_from_dict(config)
  if not isinstance(config, Config):
    raise TypeError(f"expected a fedjax_sim Config or a dict; got {type(config).__name__}.")
  return config_from_dict(to_dict(config))


def _parse(config: Config | dict | None) -> Config:
  """A `Config` from what a script gives, types and ranges checked, rules not yet run."""
  if config is None:
    return Config()
  if isinstance(config, dict):
    return config_from_dict(config, check_rules=False)
  if not isinstance(config, Config):
    raise TypeError(f"expected a fedjax_sim Config or a dict; got {type(config).__name__}.")
  return config


class Simulation:
  """A run of the CLI's machinery from Python.

  Args:
    config: a `Config` (typed sections: `GaussianMixtureConfig`,
      `FedProxConfig`, `DPFedAvgConfig`, ...), a dict in the YAML layout, or
      None for the defaults. It is validated like a config file.
    data: the training population (a `FederatedData`), or `(train, test)`;
      with one population the evaluation split follows `config.data`
      (`test_fraction` or `holdout_clients`).
    model: a `Model` (e.g. `fedjax_sim.flax_classifier(module, shape)`).
    algorithm: an `Algorithm`; `weighting` says how its clients weight
      their updates ("examples" or "uniform"; DP mechanisms need "uniform"),
      `message` whether its update is the model delta ("model_delta", which
      majority-vote compression needs) or more ("other"). Local DP-SGD needs
      a registered algorithm (its local training is built with the
      calibrated noise), not a ready object.
    aggregator: an aggregation stage replacing the mean; recorded as
      `compression.method: script` (no compression or privacy section may be
      set with it).
  """

  def __init__(self, config: Config | dict | None = None, *,
               data: FederatedData | tuple[FederatedData, FederatedData] | None = None,
               model: Model | None = None, algorithm: Algorithm | None = None,
               weighting: str = "examples", message: str = "other",
               aggregator: Aggregator | None = None):
    # Parsed, not yet checked: the rules run once the script's objects have
    # replaced the sections they stand for (a rule must judge what will run).
    config = _parse(config)
    replace, parts = {}, Parts(model=model, algorithm=algorithm, aggregator=aggregator)
    if data is not None:
      train, test = data if isinstance(data, tuple) else (data, None)
      for d in (train, test):
        if d is not None and not isinstance(d, FederatedData):
          raise TypeError(f"data must be a FederatedData (or a (train, test) pair of them); got "
                          f"{type(d).__name__}. Partition arrays with fedjax_sim.iid_partition, "
                          "dirichlet_partition or shards_partition.")
      parts.train, parts.test = train, test
      base = {f.name: getattr(config.data, f.name) for f in dataclasses.fields(
          script_parts.ScriptDataConfig) if hasattr(config.data, f.name)}
      base.update(description=script_parts.describe_data(train, test),
                  fingerprint=script_parts.data_fingerprint(
                      *(d for d in (train, test) if d is not None)))
      replace["data"] = script_parts.ScriptDataConfig(**base)
    if model is not None:
      if not isinstance(model, Model):
        raise TypeError(f"model must be a fedjax_sim Model (see flax_classifier); got "
                        f"{type(model).__name__}.")
      description, fingerprint = script_parts.model_fingerprint(model)
      replace["model"] = script_parts.ScriptModelConfig(description=description,
                                                        fingerprint=fingerprint)
    if algorithm is not None:
      if not isinstance(algorithm, Algorithm):
        raise TypeError(f"algorithm must be a fedjax_sim Algorithm; got {type(algorithm).__name__}.")
      if PRIVACY.trait(config.privacy, "unit") == "example":
        raise ConfigError(f"privacy.mechanism = {config.privacy.mechanism!r} with a ready "
                          "Algorithm object: its local training must be built with the calibrated "
                          "noise. Register the algorithm (fedjax_sim.ALGORITHMS.register) and "
                          "select it in the config.")
      local = algorithm.local
      replace["algorithm"] = script_parts.ScriptAlgorithmConfig(
          batch_size=local.batch_size, local_epochs=local.epochs, shuffle=local.shuffle,
          weighting=weighting, message=message,
          description=script_parts.describe_algorithm(algorithm))
    if aggregator is not None:
      if not isinstance(aggregator, Aggregator):
        raise TypeError(f"aggregator must be a fedjax_sim Aggregator; got "
                        f"{type(aggregator).__name__}.")
      if config.compression.method != COMPRESSION.default:
        raise ConfigError("An aggregator object replaces the aggregation compression.method = "
                          f"{config.compression.method!r} would build; leave compression at "
                          "'none' (or compose your stage with the compressor yourself).")
      stateful = "per-client state" if aggregator.client_state_init is not None else "stateless"
      replace["compression"] = script_parts.ScriptAggregatorConfig(
          description=f"script aggregation stage ({stateful})")
    self.config = validate(dataclasses.replace(config, **replace))
    self.parts = parts

  def build(self) -> Experiment:
    """The built experiment (data, model, engine, evaluator, privacy plan), without running."""
    return build_experiment(self.config, parts=self.parts)

  def run(self, *, overwrite: bool = False, resume: bool = False, log=print,
          compile_cache: str | None = None) -> dict:
    """Runs (or with `resume=True` continues) the simulation; returns `summary.json`'s dict.

    Writes the CLI's output folder `config.output_dir` and raises its errors
    (see `fedjax_sim.runner.run.run_experiment`).
    """
    return run_experiment(self.config, overwrite=overwrite, resume=resume, log=log,
                          compile_cache=compile_cache, parts=self.parts)
