"""FedDyn: dynamic regularization, so the clients' stationary points agree with the global one.

Client i keeps `g_i`, the gradient of its loss at its last local model
(initially 0, in the engine's per-client store), and minimises

    L_i(w) - <g_i, w> + alpha/2 ||w - x||^2

from the broadcast model x. With its trained model y_i it updates
`g_i <- g_i - alpha (y_i - x)` and uploads `y_i - x`. The server keeps h:

    h <- h - alpha / N * sum_{i in P} (y_i - x)
    x <- mean_{i in P} y_i - h / alpha

`|P|` is the stage's released `total_weight` (every client that took a step
has weight 1), so FedDyn needs a stage that releases the exact total weight
(not a DP stage: the server step raises a ValueError when it is traced).

References:
  Acar, Zhao, Navarro, Mattina, Whatmough, Saligrama. "Federated Learning
  Based on Dynamic Regularization", ICLR 2021 (Algorithm 1).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.algorithms.rules import optimizers, refuse_user_level_dp
from fedjax_sim.core.aggregation import total_weight
from fedjax_sim.core.algorithm import Algorithm, ClientData, ClientOutput, LocalConfig
from fedjax_sim.core.local import local_train
from fedjax_sim.core.model import Model
from fedjax_sim.core.registry import ALGORITHMS, AlgorithmSection
from fedjax_sim.core.schema import option, positive
from fedjax_sim.core.types import Params


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class FedDynState:
  params: Params
  h: Params
  round: jax.Array


def _sum_leaves(tree):
  return sum(jax.tree.leaves(tree))


def feddyn(model: Model, client_optimizer: optax.GradientTransformation, local: LocalConfig,
           alpha: float, num_clients: int) -> Algorithm:
  """Builds FedDyn with regularization weight `alpha > 0` over `num_clients` clients.

  Averages are uniform over participating clients, as in the paper.
  """
  if alpha <= 0:
    raise ValueError(f"FedDyn alpha must be > 0; got {alpha}.")
  if num_clients < 1:
    raise ValueError(f"num_clients must be >= 1; got {num_clients}.")
  zeros_like = lambda p: jax.tree.map(jnp.zeros_like, p)

  def server_init(params):
    return FedDynState(params=params, h=zeros_like(params), round=jnp.zeros((), jnp.int32))

  def client_update(x, data: ClientData, g_i, key):
    def penalty(w):
      linear = _sum_leaves(jax.tree.map(lambda g, ww: jnp.sum(g * ww), g_i, w))
      prox = _sum_leaves(jax.tree.map(lambda ww, xx: jnp.sum(jnp.square(ww - xx)), w, x))
      return -linear + 0.5 * alpha * prox

    y, stats = local_train(model, client_optimizer, x, data, local, key=key, penalty=penalty)
    delta = jax.tree.map(jnp.subtract, y, x)
    took = stats["steps"] > 0
    g_new = jax.tree.map(lambda g, d: jnp.where(took, g - alpha * d, g), g_i, delta)
    weight = took.astype(jnp.float32)
    return ClientOutput(update=delta, weight=weight, client_state=g_new, metrics=stats)

  def server_update(state, mean_delta, info):
    # |P|: clients that took a step (weight 1), as the stage released it.
    frac = total_weight(info, "FedDyn") / num_clients
    h = jax.tree.map(lambda hh, d: hh - alpha * frac * d, state.h, mean_delta)
    params = jax.tree.map(lambda x, d, hh: x + d - hh / alpha, state.params, mean_delta, h)
    return FedDynState(params=params, h=h, round=state.round + 1)

  return Algorithm(server_init, lambda s: s.params, client_update, server_update, local,
                   params_of=lambda s: s.params, client_state_init=zeros_like)


# -- registered as algorithm.name = feddyn --------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class FedDynConfig(AlgorithmSection):
  """FedDyn (Acar et al. 2021); its server step is part of the algorithm."""

  alpha: float = option(0.01, check=(positive, "must be > 0"), help="FedDyn regularization weight")


@ALGORITHMS.register("feddyn", FedDynConfig, weighting=lambda cfg: "uniform", message="other",
                     checks=(refuse_user_level_dp(
                         "feddyn", "its server state needs the exact number of clients that "
                         "took a step, which a DP aggregate does not release"),))
def _build(cfg: FedDynConfig, ctx) -> Algorithm:
  """FedDyn over the training population."""
  client, _ = optimizers(cfg, server=False)
  return feddyn(ctx.model, client, cfg.local_config(ctx.local_dp), cfg.alpha,
                ctx.train.num_clients)
