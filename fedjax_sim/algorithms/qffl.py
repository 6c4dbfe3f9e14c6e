"""q-FFL (q-FedAvg): fair resource allocation, weighting clients by their loss^q.

Client k runs local SGD from the global model w (learning rate eta) to w_k,
and with `L = 1 / eta` (the paper's Lipschitz estimate) and `F_k = F_k(w)`,
the loss of the *global* model on its training data, uploads

    Delta_k = F_k^q * L (w - w_k)
    h_k     = q F_k^(q-1) ||L (w - w_k)||^2 + L F_k^q

The server steps `w <- w - sum_k Delta_k / sum_k h_k`, a plain sum over the
cohort (no data weights). Larger q puts more weight on clients with high loss
(q = 0 is FedAvg with uniform weights).

Both sums travel through the aggregation stage: a client's message is
`{"delta": Delta_k, "h": h_k}` with weight 1 (0 for a client without data),
so the stage's mean gives `mean(Delta)` and `mean(h)`, and the server steps
by their ratio, which equals the ratio of the sums. Under compression or DP
the server thus divides by the compressed (noised) `mean(h)`, as it must: no
client statistic reaches it by another channel. (Clipping bounds the norm of
the whole message, `h` included.)

Sampling decides which objective this solves. q-FFL minimises
`sum_k p_k F_k^(q+1) / (q+1)` with `p_k = n_k / n`, and the paper's
Algorithm 2 picks each device with probability p_k before the unweighted sum
above; the authors' code draws the cohort without replacement with weights
p_k (their `sampling = 2`, used for all q-FedAvg experiments). That is
`sampling.scheme: data_proportional` in a config (`make_sampler(
"data_proportional", ...)` or `sample_data_proportional` from the Python
API). The algorithm itself does not sample: with the engine's default
`uniform` scheme (every client equally likely) the same update solves q-FFL
with equal client weights `p_k = 1 / N` (the paper's uniform-sampling
baseline), which differs from the paper's objective whenever clients hold
different amounts of data. A run's resolved config.yaml records the scheme.

Randomness: the loss evaluation and local training use separate keys split
from the client's key.

References:
  Li, Sanjabi, Beirami, Smith. "Fair Resource Allocation in Federated
  Learning", ICLR 2020 (Algorithm 2, q-FedAvg).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.algorithms.fedavg import fedavg
from fedjax_sim.algorithms.rules import (plain_sgd, refuse_compression, refuse_local_dp,
                                         refuse_user_level_dp)
from fedjax_sim.core.algorithm import Algorithm, ClientData, ClientOutput, LocalConfig
from fedjax_sim.core.local import local_train, masked_loss
from fedjax_sim.core.model import Model
from fedjax_sim.core.registry import ALGORITHMS, AlgorithmSection
from fedjax_sim.core.schema import non_negative, option


def qffl(model: Model, client_learning_rate: float, local: LocalConfig, q: float) -> Algorithm:
  """Builds q-FedAvg with fairness parameter `q >= 0` and local SGD.

  Args:
    model: the model record.
    client_learning_rate: eta of local SGD; the paper's `L = 1 / eta`.
    local: batch size, epochs, shuffling.
    q: the fairness parameter.

  The cohort's sampling is the engine's: use `data_proportional` sampling for
  the paper's q-FedAvg (see the module docstring).
  """
  if q < 0:
    raise ValueError(f"q must be >= 0; got {q}.")
  if client_learning_rate <= 0:
    raise ValueError(f"client_learning_rate must be > 0; got {client_learning_rate}.")
  lipschitz = 1.0 / client_learning_rate
  base = fedavg(model, optax.sgd(client_learning_rate), optax.sgd(1.0), local)

  def client_update(w, data: ClientData, client_state, key):
    eval_key, train_key = jax.random.split(key)
    global_loss, _ = masked_loss(model, w, data.examples, data.mask, key=eval_key, train=False)
    trained, stats = local_train(model, optax.sgd(client_learning_rate), w, data, local,
                                 key=train_key)
    dw = jax.tree.map(lambda a, b: lipschitz * (a - b), w, trained)
    sq_norm = sum(jax.tree.leaves(jax.tree.map(lambda x: jnp.sum(jnp.square(x)), dw)))
    f = jnp.maximum(global_loss, 1e-10)
    has_data = jnp.any(data.mask)
    h = jnp.where(has_data, q * f ** (q - 1) * sq_norm + lipschitz * f ** q, 0.0)
    delta = jax.tree.map(lambda x: f ** q * x, dw)
    return ClientOutput(update={"delta": delta, "h": h}, weight=has_data.astype(jnp.float32),
                        client_state=client_state, metrics=stats)

  def server_update(state, mean, info):
    # Uniform means over the clients with data: mean(Delta) / mean(h) = sum(Delta) / sum(h).
    # An empty round has mean(Delta) = 0 (the weighted mean's zeros): no step.
    scale = 1.0 / jnp.maximum(mean["h"], 1e-30)
    step = jax.tree.map(lambda d: -scale * d, mean["delta"])  # fedavg applies w + step
    return base.server_update(state, step, info)

  return base._replace(client_update=client_update, server_update=server_update)


# -- registered as algorithm.name = qffl ----------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class QFFLConfig(AlgorithmSection):
  """q-FFL / q-FedAvg (Li et al. 2020); its server step is part of the algorithm."""

  q: float = option(1.0, check=(non_negative, "must be >= 0"), help="q-FFL fairness parameter")

  def __post_init__(self):
    super().__post_init__()
    plain_sgd("qffl", self.client_optimizer)


@ALGORITHMS.register("qffl", QFFLConfig, weighting=lambda cfg: "uniform", message="other",
                     checks=(refuse_local_dp("qffl", "the loss that weights q-FFL's update"),
                             refuse_user_level_dp(
                                 "qffl", "its server step divides by the noisy mean of h_k, "
                                 "which the noise can drive to zero or below"),
                             refuse_compression(
                                 "qffl", "its server divides the mean update by the mean of h_k, "
                                 "a scalar sent in the same message; compressed with the update "
                                 "(one vector), it is lost (top_k, drive) or sets the step "
                                 "alone (sign)")))
def _build(cfg: QFFLConfig, ctx) -> Algorithm:
  """q-FedAvg with fairness parameter q."""
  return qffl(ctx.model, cfg.client_optimizer.learning_rate, cfg.local_config(ctx.local_dp),
              cfg.q)
