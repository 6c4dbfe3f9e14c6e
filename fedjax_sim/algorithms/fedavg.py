"""FedAvg and FedAvgM.

Each client starts from the broadcast model, runs local minibatch steps with a
client optax optimizer and uploads its model delta. The server averages the
deltas (weighted by example count by default) and treats minus the average as
a pseudo-gradient for a server optax optimizer: SGD with learning rate 1 is
plain FedAvg; SGD with momentum is FedAvgM.

References:
  McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks
  from Decentralized Data". Hsu et al. 2019, "Measuring the Effects of
  Non-Identical Data Distribution for Federated Visual Classification"
  (FedAvgM). Reddi et al. 2021, "Adaptive Federated Optimization" (the
  server-optimizer view).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.algorithms.rules import check_optax_server, optimizers
from fedjax_sim.core.algorithm import Algorithm, ClientData, ClientOutput, LocalConfig
from fedjax_sim.core.local import local_train
from fedjax_sim.core.model import Model
from fedjax_sim.core.registry import ALGORITHMS, AlgorithmSection
from fedjax_sim.core.schema import ConfigError, OptimizerConfig, option, server_sgd
from fedjax_sim.core.types import Params


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerState:
  params: Params
  opt_state: Any
  round: jax.Array


_WEIGHTINGS = ("examples", "uniform")


def fedavg(model: Model, client_optimizer: optax.GradientTransformation,
           server_optimizer: optax.GradientTransformation, local: LocalConfig,
           weighting: str = "examples", local_penalty=None) -> Algorithm:
  """Builds FedAvg with any client and server optax optimizers.

  Args:
    model: the model record.
    client_optimizer: e.g. `optax.sgd(0.1)`; its state is reset every round.
    server_optimizer: applied to the pseudo-gradient `-mean(delta)`;
      `optax.sgd(1.0)` recovers McMahan et al.'s averaging.
    local: batch size, epochs, shuffling.
    weighting: "examples" (weight n_k, the paper's choice) or "uniform".
    local_penalty: optional `local_penalty(broadcast_params) -> (params ->
      scalar)`, a term added to every client's local objective (FedProx's
      proximal term is one).
  """
  if weighting not in _WEIGHTINGS:
    raise ValueError(f"weighting must be one of {_WEIGHTINGS}; got {weighting!r}.")

  def server_init(params):
    return ServerState(params=params, opt_state=server_optimizer.init(params),
                       round=jnp.zeros((), jnp.int32))

  def broadcast(state):
    return state.params

  def client_update(params, data: ClientData, client_state, key):
    penalty = local_penalty(params) if local_penalty is not None else None
    trained, stats = local_train(model, client_optimizer, params, data, local, key=key,
                                 penalty=penalty)
    delta = jax.tree.map(jnp.subtract, trained, params)
    n = jnp.sum(data.mask).astype(jnp.float32)
    weight = n if weighting == "examples" else (n > 0).astype(jnp.float32)
    return ClientOutput(update=delta, weight=weight, client_state=client_state, metrics=stats)

  def server_update(state, mean_delta, info=None):
    del info  # FedAvg's server step needs nothing but the mean delta
    pseudo_grad = jax.tree.map(jnp.negative, mean_delta)
    updates, opt_state = server_optimizer.update(pseudo_grad, state.opt_state, state.params)
    return ServerState(params=optax.apply_updates(state.params, updates), opt_state=opt_state,
                       round=state.round + 1)

  return Algorithm(server_init, broadcast, client_update, server_update, local,
                   params_of=lambda state: state.params)


def fedavgm(model: Model, client_optimizer: optax.GradientTransformation, local: LocalConfig,
            server_learning_rate: float = 1.0, server_momentum: float = 0.9,
            weighting: str = "examples") -> Algorithm:
  """FedAvg with server momentum (heavy ball on the averaged delta)."""
  return fedavg(model, client_optimizer,
                optax.sgd(server_learning_rate, momentum=server_momentum), local, weighting)


# -- registered as algorithm.name = fedavg | fedavgm --------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class FedAvgConfig(AlgorithmSection):
  """FedAvg (McMahan et al. 2017) with any optax server optimizer."""

  server_optimizer: OptimizerConfig = option(default_factory=server_sgd)
  weighting: Literal["examples", "uniform"] = "examples"

  def __post_init__(self):
    super().__post_init__()
    check_optax_server(self.server_optimizer)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FedAvgMConfig(AlgorithmSection):
  """FedAvg with server momentum (Hsu et al. 2019)."""

  server_optimizer: OptimizerConfig = option(default_factory=server_sgd)
  server_momentum: float = option(0.9, check=(lambda x: 0 <= x < 1, "must be in [0, 1)"))
  weighting: Literal["examples", "uniform"] = "examples"

  def __post_init__(self):
    super().__post_init__()
    if self.server_optimizer.name != "sgd" or self.server_optimizer.kwargs:
      raise ConfigError("algorithm.name = 'fedavgm' uses SGD with algorithm.server_momentum on "
                        "the server; give only algorithm.server_optimizer.learning_rate, or use "
                        "algorithm.name = 'fedavg' with any server optimizer.")


def weighting_of(cfg) -> str:
  return cfg.weighting


@ALGORITHMS.register("fedavg", FedAvgConfig, weighting=weighting_of, message="model_delta")
def _build_fedavg(cfg: FedAvgConfig, ctx) -> Algorithm:
  """FedAvg with any optax client and server optimizers."""
  client, server = optimizers(cfg)
  return fedavg(ctx.model, client, server, cfg.local_config(ctx.local_dp), cfg.weighting)


@ALGORITHMS.register("fedavgm", FedAvgMConfig, weighting=weighting_of, message="model_delta")
def _build_fedavgm(cfg: FedAvgMConfig, ctx) -> Algorithm:
  """FedAvg with server momentum."""
  client, _ = optimizers(cfg, server=False)
  return fedavgm(ctx.model, client, cfg.local_config(ctx.local_dp),
                 cfg.server_optimizer.learning_rate, cfg.server_momentum, cfg.weighting)
