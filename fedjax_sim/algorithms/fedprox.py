"""FedProx: FedAvg whose clients minimise `F_k(w) + mu/2 ||w - w_global||^2`.

The proximal term keeps local models near the broadcast model, which
stabilises training under statistical heterogeneity and when clients do
variable amounts of work; `mu = 0` is exactly FedAvg.

References:
  Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith. "Federated Optimization in
  Heterogeneous Networks", MLSys 2020.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.algorithms.fedavg import FedAvgConfig, fedavg, weighting_of
from fedjax_sim.algorithms.rules import optimizers
from fedjax_sim.core.algorithm import Algorithm, LocalConfig
from fedjax_sim.core.model import Model
from fedjax_sim.core.registry import ALGORITHMS
from fedjax_sim.core.schema import non_negative, option


def proximal_term(anchor, mu: float):
  """`w -> mu/2 ||w - anchor||^2` (its gradient is `mu (w - anchor)`)."""
  def penalty(params):
    sq = jax.tree.map(lambda w, a: jnp.sum(jnp.square(w - a)), params, anchor)
    return 0.5 * mu * sum(jax.tree.leaves(sq))
  return penalty


def fedprox(model: Model, client_optimizer: optax.GradientTransformation,
            server_optimizer: optax.GradientTransformation, local: LocalConfig, mu: float,
            weighting: str = "examples") -> Algorithm:
  """Builds FedProx with proximal weight `mu >= 0` (server side as FedAvg).

  `mu` may be a traced scalar (a sweep's member axis, `core/members.py`): the
  proximal term is then always built, and adds exactly zero where `mu = 0`.
  """
  traced = isinstance(mu, jax.Array)
  if not traced and mu < 0:
    raise ValueError(f"FedProx mu must be >= 0; got {mu}.")
  return fedavg(model, client_optimizer, server_optimizer, local, weighting,
                local_penalty=(lambda anchor: proximal_term(anchor, mu)) if traced or mu
                else None)


# -- registered as algorithm.name = fedprox -------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class FedProxConfig(FedAvgConfig):
  """FedProx (Li et al. 2020): FedAvg with a proximal term mu/2 ||w - w_t||^2."""

  mu: float = option(0.01, check=(non_negative, "must be >= 0"),
                     help="FedProx proximal weight")


@ALGORITHMS.register("fedprox", FedProxConfig, weighting=weighting_of, message="model_delta")
def _build(cfg: FedProxConfig, ctx) -> Algorithm:
  """FedProx with proximal weight mu."""
  client, server = optimizers(cfg)
  return fedprox(ctx.model, client, server, cfg.local_config(ctx.local_dp), cfg.mu, cfg.weighting)
