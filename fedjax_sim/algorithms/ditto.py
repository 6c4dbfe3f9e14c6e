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

import jax
import optax

from fedjax_sim.algorithms.fedavg import fedavg
from fedjax_sim.algorithms.fedprox import proximal_term
from fedjax_sim.core.algorithm import Algorithm, ClientData, LocalConfig
from fedjax_sim.core.local import local_train
from fedjax_sim.core.model import Model


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
    v_new, _ = local_train(model, personal_optimizer, v, data, local, personal_key,
                           penalty=proximal_term(w, lam) if lam else None)
    return out._replace(client_state=v_new)

  return base._replace(client_update=client_update, client_state_init=lambda params: params,
                       personal_params=lambda v: v)


__all__ = ["ditto"]
