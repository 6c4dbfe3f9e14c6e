"""SCAFFOLD with option II control variates.

Each client corrects every local gradient by `c - c_i` (server minus client
control variate), which removes the client drift of FedAvg under
heterogeneous data. After `K` local steps with learning rate `eta_l` the
client updates its variate (option II)

    c_i+ = c_i - c + (x - y_i) / (K eta_l)

and uploads `(y_i - x, c_i+ - c_i)`. The server moves
`x <- x + eta_g mean(dy)` (through the server optimizer) and
`c <- c + |S| / N mean(dc)`. Clients' `c_i` live in the engine's per-client
store (`[num_clients, ...]`), so only sampled clients' variates move.

`|S|` is the stage's released `total_weight` (every client that took a step
has weight 1), so SCAFFOLD needs a stage that releases the exact total weight
(not a DP stage: the server step raises a ValueError when it is traced).

References:
  Karimireddy, Kale, Mohri, Reddi, Stich, Suresh. "SCAFFOLD: Stochastic
  Controlled Averaging for Federated Learning", ICML 2020 (Algorithm 1).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.algorithms.rules import (check_optax_server, optimizers, plain_sgd,
                                         refuse_user_level_dp)
from fedjax_sim.core.aggregation import total_weight
from fedjax_sim.core.algorithm import Algorithm, ClientData, ClientOutput, LocalConfig
from fedjax_sim.core.local import local_train
from fedjax_sim.core.model import Model
from fedjax_sim.core.registry import ALGORITHMS, AlgorithmSection
from fedjax_sim.core.schema import OptimizerConfig, option, server_sgd
from fedjax_sim.core.types import Params


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class ScaffoldState:
  params: Params
  control: Params  # the server control variate c
  opt_state: Any
  round: jax.Array


def _vdot(a, b):
  return sum(jax.tree.leaves(jax.tree.map(lambda x, y: jnp.sum(x * y), a, b)))


def scaffold(model: Model, client_learning_rate: float, local: LocalConfig, num_clients: int,
             server_optimizer: optax.GradientTransformation | None = None) -> Algorithm:
  """Builds SCAFFOLD (option II) with local SGD.

  Args:
    model: the model record.
    client_learning_rate: eta_l of the local SGD steps (used in option II).
    local: batch size, epochs, shuffling; K is the number of steps a client
      actually takes.
    num_clients: N, the population size (for the server variate update).
    server_optimizer: applied to `-mean(dy)`; default `optax.sgd(1.0)`
      (eta_g = 1, the paper's setting).

  Averages are uniform over participating clients, as in the paper.
  """
  if client_learning_rate <= 0:
    raise ValueError(f"client_learning_rate must be > 0; got {client_learning_rate}.")
  if num_clients < 1:
    raise ValueError(f"num_clients must be >= 1; got {num_clients}.")
  server_optimizer = server_optimizer or optax.sgd(1.0)
  client_optimizer = optax.sgd(client_learning_rate)
  zeros_like = lambda p: jax.tree.map(jnp.zeros_like, p)

  def server_init(params):
    return ScaffoldState(params=params, control=zeros_like(params),
                         opt_state=server_optimizer.init(params),
                         round=jnp.zeros((), jnp.int32))

  def broadcast(state):
    return state.params, state.control

  def client_update(bcast, data: ClientData, c_i, key):
    x, c = bcast
    shift = jax.tree.map(jnp.subtract, c, c_i)  # gradient correction c - c_i
    y, stats = local_train(model, client_optimizer, x, data, local, key=key,
                           penalty=lambda w: _vdot(shift, w))
    k = stats["steps"]
    took_steps = k > 0
    scale = jnp.where(took_steps, 1.0 / (jnp.maximum(k, 1.0) * client_learning_rate), 0.0)
    c_new = jax.tree.map(lambda ci, cs, xx, yy: jnp.where(took_steps, ci - cs + scale * (xx - yy), ci),
                         c_i, c, x, y)
    update = {"delta": jax.tree.map(jnp.subtract, y, x),
              "control": jax.tree.map(jnp.subtract, c_new, c_i)}
    weight = took_steps.astype(jnp.float32)
    return ClientOutput(update=update, weight=weight, client_state=c_new, metrics=stats)

  def server_update(state, mean_update, info):
    # |S|: clients that took a step (weight 1), as the stage released it.
    frac = total_weight(info, "SCAFFOLD") / num_clients
    pseudo_grad = jax.tree.map(jnp.negative, mean_update["delta"])
    updates, opt_state = server_optimizer.update(pseudo_grad, state.opt_state, state.params)
    control = jax.tree.map(lambda c, dc: c + frac * dc, state.control, mean_update["control"])
    return ScaffoldState(params=optax.apply_updates(state.params, updates), control=control,
                         opt_state=opt_state, round=state.round + 1)

  return Algorithm(server_init, broadcast, client_update, server_update, local,
                   params_of=lambda state: state.params, client_state_init=zeros_like)


# -- registered as algorithm.name = scaffold ------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScaffoldConfig(AlgorithmSection):
  """SCAFFOLD, option II (Karimireddy et al. 2020); local SGD, uniform weights."""

  server_optimizer: OptimizerConfig = option(default_factory=server_sgd)

  def __post_init__(self):
    super().__post_init__()
    plain_sgd("scaffold", self.client_optimizer)
    check_optax_server(self.server_optimizer)


@ALGORITHMS.register("scaffold", ScaffoldConfig, weighting=lambda cfg: "uniform", message="other",
                     checks=(refuse_user_level_dp(
                         "scaffold", "its server variate needs the exact number of clients "
                         "that took a step, which a DP aggregate does not release"),))
def _build(cfg: ScaffoldConfig, ctx) -> Algorithm:
  """SCAFFOLD (option II) over the training population."""
  _, server = optimizers(cfg)
  return scaffold(ctx.model, cfg.client_optimizer.learning_rate, cfg.local_config(ctx.local_dp),
                  ctx.train.num_clients, server)
