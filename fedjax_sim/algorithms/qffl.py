"""q-FFL (q-FedAvg): fair resource allocation, weighting clients by their loss^q.

Client k runs local SGD from the global model w (learning rate eta) to w_k,
and with `L = 1 / eta` (the paper's Lipschitz estimate) and `F_k = F_k(w)`,
the loss of the *global* model on its training data, uploads

    Delta_k = F_k^q * L (w - w_k)
    h_k     = q F_k^(q-1) ||L (w - w_k)||^2 + L F_k^q

The server steps `w <- w - sum_k Delta_k / sum_k h_k`. Larger q puts more
weight on clients with high loss (q = 0 is FedAvg with uniform weights).

References:
  Li, Sanjabi, Beirami, Smith. "Fair Resource Allocation in Federated
  Learning", ICLR 2020 (Algorithm 2, q-FedAvg).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.algorithms.fedavg import fedavg
from fedjax_sim.core.algorithm import Algorithm, ClientData, ClientOutput, LocalConfig
from fedjax_sim.core.local import local_train, masked_loss
from fedjax_sim.core.model import Model


def qffl(model: Model, client_learning_rate: float, local: LocalConfig, q: float) -> Algorithm:
  """Builds q-FedAvg with fairness parameter `q >= 0` and local SGD."""
  if q < 0:
    raise ValueError(f"q must be >= 0; got {q}.")
  if client_learning_rate <= 0:
    raise ValueError(f"client_learning_rate must be > 0; got {client_learning_rate}.")
  lipschitz = 1.0 / client_learning_rate
  base = fedavg(model, optax.sgd(client_learning_rate), optax.sgd(1.0), local)

  def client_update(w, data: ClientData, client_state, key):
    global_loss, _ = masked_loss(model, w, data.examples, data.mask, key, train=False)
    trained, stats = local_train(model, optax.sgd(client_learning_rate), w, data, local, key)
    dw = jax.tree.map(lambda a, b: lipschitz * (a - b), w, trained)
    sq_norm = sum(jax.tree.leaves(jax.tree.map(lambda x: jnp.sum(jnp.square(x)), dw)))
    f = jnp.maximum(global_loss, 1e-10)
    has_data = jnp.any(data.mask)
    h = jnp.where(has_data, q * f ** (q - 1) * sq_norm + lipschitz * f ** q, 0.0)
    delta = jax.tree.map(lambda x: f ** q * x, dw)
    stats = dict(stats, qffl_h=h, qffl_count=has_data.astype(jnp.float32))
    return ClientOutput(update=delta, weight=has_data.astype(jnp.float32),
                        client_state=client_state, metrics=stats)

  def server_update(state, mean_delta, stats):
    # mean_delta is the uniform mean over clients; sum_k Delta_k = count * mean.
    scale = stats["qffl_count"] / jnp.maximum(stats["qffl_h"], 1e-30)
    step = jax.tree.map(lambda d: -scale * d, mean_delta)  # fedavg applies w + step
    return base.server_update(state, step, stats)

  return base._replace(client_update=client_update, server_update=server_update)
