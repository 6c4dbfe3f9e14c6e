"""FedNova: normalized averaging for clients that run different numbers of local steps.

Client i runs tau_i local SGD steps and uploads its normalized update
`d_i = delta_i / tau_i` (its average step). The server combines them with the
data weights `p_i = n_i / sum_j n_j` and rescales by the effective number of
steps `tau_eff = sum_i p_i tau_i`:

    x <- x + tau_eff * sum_i p_i d_i

(the server optimizer receives `-tau_eff * sum_i p_i d_i` as its pseudo-
gradient; `optax.sgd(1.0)` is the paper's rule). With equal step counts this
is FedAvg; with unequal ones it removes the objective inconsistency that
plain averaging suffers, which weights clients by how many steps they ran.

References:
  Wang, Liu, Liang, Joshi, Poor. "Tackling the Objective Inconsistency
  Problem in Heterogeneous Federated Optimization", NeurIPS 2020 (eq. 6-7,
  vanilla local SGD).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.algorithms.fedavg import fedavg
from fedjax_sim.core.algorithm import Algorithm, ClientData, ClientOutput, LocalConfig
from fedjax_sim.core.local import local_train
from fedjax_sim.core.model import Model


def fednova(model: Model, client_optimizer: optax.GradientTransformation,
            server_optimizer: optax.GradientTransformation, local: LocalConfig) -> Algorithm:
  """Builds FedNova (data-weighted, normalized by each client's step count)."""
  base = fedavg(model, client_optimizer, server_optimizer, local)

  def client_update(params, data: ClientData, client_state, key):
    trained, stats = local_train(model, client_optimizer, params, data, local, key)
    tau = stats["steps"]
    n = jnp.sum(data.mask).astype(jnp.float32)
    normalized = jax.tree.map(lambda y, x: (y - x) / jnp.maximum(tau, 1.0), trained, params)
    stats = dict(stats, nova_weight=n, nova_weighted_tau=n * tau)
    return ClientOutput(update=normalized, weight=n, client_state=client_state, metrics=stats)

  def server_update(state, mean_normalized, stats):
    tau_eff = stats["nova_weighted_tau"] / jnp.maximum(stats["nova_weight"], 1e-30)
    step = jax.tree.map(lambda d: tau_eff * d, mean_normalized)
    return base.server_update(state, step, stats)

  return base._replace(client_update=client_update, server_update=server_update)
