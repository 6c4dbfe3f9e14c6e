"""Ditto: a global model trained as FedAvg, plus a personal model per client.

Each sampled client (1) trains the global model locally as in FedAvg and
uploads the delta, and (2) trains its personal model v_k on the regularized
objective `F_k(v) + lam/2 ||v - w||^2` (w the broadcast global model), with
the same local schedule. Personal models live in the engine's per-client store
(initialised to the initial global model) and never leave the client; the
evaluation reports each client's accuracy under both models.

References:
  Li, Hu, Beirami, Smith. "Ditto: Fair and Robust Federated Learning Through
  Personalization", ICML 2021 (Algorithm 1).
"""

from __future__ import annotations

import dataclasses

import jax
import optax

from fedjax_sim.algorithms.fedavg import FedAvgConfig, fedavg, weighting_of
from fedjax_sim.algorithms.fedprox import proximal_term
from fedjax_sim.algorithms.rules import optimizers, refuse_local_dp
from fedjax_sim.core.algorithm import Algorithm, ClientData, LocalConfig
from fedjax_sim.core.local import local_train
from fedjax_sim.core.model import Model
from fedjax_sim.core.registry import ALGORITHMS
from fedjax_sim.core.schema import ConfigError, non_negative, option


def ditto(model: Model, client_optimizer: optax.GradientTransformation,
          server_optimizer: optax.GradientTransformation, local: LocalConfig, lam: float,
          personal_optimizer: optax.GradientTransformation | None = None,
          weighting: str = "examples") -> Algorithm:
  """Builds Ditto with personalization strength `lam >= 0` (0: purely local models)."""
  if lam < 0:
    raise ValueError(f"Ditto lam must be >= 0; got {lam}.")
  personal_optimizer = personal_optimizer or client_optimizer
  base = fedavg(model, client_optimizer, server_optimizer, local, weighting)

  def client_update(w, data: ClientData, v, key):
    global_key, personal_key = jax.random.split(key)
    out = base.client_update(w, data, None, global_key)
    v_new, _ = local_train(model, personal_optimizer, v, data, local, key=personal_key,
                           penalty=proximal_term(w, lam) if lam else None)
    return out._replace(client_state=v_new)

  return base._replace(client_update=client_update, client_state_init=lambda params: params,
                       personal_params=lambda v: v)


__all__ = ["ditto"]


# -- registered as algorithm.name = ditto ---------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class DittoConfig(FedAvgConfig):
  """Ditto (Li et al. 2021): FedAvg plus a personal model per client."""

  lam: float = option(0.1, check=(non_negative, "must be >= 0"),
                      help="Ditto personalization strength")


def _needs_client_split(config) -> None:
  if config.data.holdout_clients > 0:
    raise ConfigError("algorithm.name = 'ditto' evaluates each training client's personal model "
                      "on its own test split; set data.holdout_clients = 0.")


@ALGORITHMS.register("ditto", DittoConfig, weighting=weighting_of, message="model_delta",
                     checks=(_needs_client_split, refuse_local_dp(
                         "ditto", "a second, personal model trained on the same examples")))
def _build(cfg: DittoConfig, ctx) -> Algorithm:
  """Ditto with personalization strength lam."""
  client, server = optimizers(cfg)
  return ditto(ctx.model, client, server, cfg.local_config(ctx.local_dp), cfg.lam,
               weighting=cfg.weighting)
