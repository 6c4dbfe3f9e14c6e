"""Config sections for objects a Python script supplies (`data.kind`, `model.kind`,
`algorithm.name`, `compression.method` = `script`).

A run started by `fedjax_sim.Simulation` with its own data, model, algorithm
or aggregation stage records them in config.yaml as `script` components: a
description and, for data and models, a fingerprint, so that a resumed run
checks it was handed the same data and model again. An algorithm or stage
object (closures) has no fingerprint: a resume trusts the script to pass the
same one. These components cannot be built from a file: their factories say
how to pass the objects.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Literal

import jax
import numpy as np

from fedjax_sim.core import Algorithm, FederatedData, Model
from fedjax_sim.core.registry import (ALGORITHMS, COMPRESSION, DATASETS, MODELS, PRIVACY,
                                      AlgorithmSection, CompressionSection, DataSection,
                                      ModelSection)
from fedjax_sim.core.schema import ConfigError

_FULL_HASH_BYTES = 256 << 20  # hash every byte of data up to this size; sample beyond it


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScriptDataConfig(DataSection):
  """Data a script passed to `Simulation(data=...)`."""

  description: str = ""
  fingerprint: str = ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScriptModelConfig(ModelSection):
  """A model a script passed to `Simulation(model=...)`."""

  description: str = ""
  fingerprint: str = ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScriptAlgorithmConfig(AlgorithmSection):
  """An algorithm object a script passed to `Simulation(algorithm=...)`.

  `weighting` is what the script declares its clients' weights to be (DP
  mechanisms need "uniform"); batch_size, local_epochs and shuffle are read
  from the object's `LocalConfig`.
  """

  description: str = ""
  weighting: Literal["examples", "uniform"] = "examples"
  message: Literal["model_delta", "other"] = "other"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScriptAggregatorConfig(CompressionSection):
  """An aggregation stage a script passed to `Simulation(aggregator=...)`; it replaces the
  mean (and the compression this section would otherwise choose)."""

  description: str = ""


def _no_privacy_with_a_script_stage(config) -> None:
  if config.privacy.mechanism != PRIVACY.default:
    raise ConfigError("An aggregator object replaces the aggregation that privacy.mechanism = "
                      f"{config.privacy.mechanism!r} would build; leave privacy at 'none' (or "
                      "compose your stage with the DP stage yourself).")


def _not_from_a_file(what: str, argument: str):
  def build(cfg, ctx):
    raise ConfigError(f"{what} = 'script': this run's {argument} came from a Python script "
                      f"({getattr(cfg, 'description', '') or 'no description'}); a config file "
                      f"cannot rebuild it. Pass it again: fedjax_sim.Simulation(config, "
                      f"{argument}=...).")
  build.__doc__ = f"Supplied by a script (Simulation({argument}=...))."
  return build


DATASETS.register("script", ScriptDataConfig)(_not_from_a_file("data.kind", "data"))
MODELS.register("script", ScriptModelConfig)(_not_from_a_file("model.kind", "model"))
ALGORITHMS.register("script", ScriptAlgorithmConfig, weighting=lambda cfg: cfg.weighting,
                    message=lambda cfg: cfg.message)(
                        _not_from_a_file("algorithm.name", "algorithm"))
COMPRESSION.register("script", ScriptAggregatorConfig, checks=(_no_privacy_with_a_script_stage,))(
    _not_from_a_file("compression.method", "aggregator"))


def data_fingerprint(*datasets: FederatedData) -> str:
  """SHA-256 of client sizes, feature names, dtypes, shapes and contents (every byte up to
  256 MiB of features; beyond that the first and last MiB of each feature)."""
  h = hashlib.sha256()
  for data in datasets:
    h.update(np.asarray(data.sizes, np.int64).tobytes())
    total = sum(a.nbytes for a in data.features.values())
    for name in sorted(data.features):
      a = np.asarray(data.features[name])
      h.update(f"{name}:{a.dtype}:{a.shape}".encode())
      raw = a.reshape(-1).view(np.uint8) if a.flags.c_contiguous else np.ascontiguousarray(
          a).reshape(-1).view(np.uint8)
      if total <= _FULL_HASH_BYTES:
        h.update(raw.tobytes())
      else:
        h.update(raw[: 1 << 20].tobytes())
        h.update(raw[-(1 << 20):].tobytes())
  return h.hexdigest()[:16]


def model_fingerprint(model: Model) -> tuple[str, str]:
  """`(description, fingerprint)` of a model: its parameter tree's structure, shapes, dtypes."""
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  leaves = jax.tree_util.tree_leaves_with_path(shapes)
  text = ";".join(f"{jax.tree_util.keystr(p)}:{x.dtype}:{x.shape}" for p, x in leaves)
  count = sum(int(np.prod(x.shape)) for _, x in leaves)
  return (f"{len(leaves)} parameter arrays, {count} parameters",
          hashlib.sha256(text.encode()).hexdigest()[:16])


def describe_data(train: FederatedData, test: FederatedData | None) -> str:
  n = int(np.sum(train.sizes))
  shapes = ", ".join(f"{k} {tuple(v.shape[1:])} {v.dtype}" for k, v in sorted(
      train.features.items()))
  held = "" if test is None else f"; {test.num_clients} evaluation clients given"
  return f"{train.num_clients} clients, {n} examples ({shapes}){held}"


def describe_algorithm(algorithm: Algorithm) -> str:
  stateful = "per-client state" if algorithm.client_state_init is not None else "stateless"
  return f"script algorithm ({stateful})"
