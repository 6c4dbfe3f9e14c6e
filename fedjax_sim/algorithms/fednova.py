"""FedNova: normalized averaging for clients that run different numbers of local steps.

Client i runs tau_i local steps of SGD with heavy-ball momentum rho
(`u <- rho u + g`, `w <- w - eta u`; rho = 0 is vanilla SGD), so its model
delta is `delta_i = -eta G_i a_i`, where G_i stacks its tau_i stochastic
gradients and a_i weights them: `a_ij = (1 - rho^(tau_i - j)) / (1 - rho)`
for step j = 0..tau_i-1, with

    ||a_i||_1 = [tau_i - rho (1 - rho^tau_i) / (1 - rho)] / (1 - rho)

(= tau_i for rho = 0). The client uploads its normalized update
`d_i = delta_i / ||a_i||_1`; the server combines them with the data weights
`p_i = n_i / sum_j n_j` and rescales by the effective number of steps
`tau_eff = sum_i p_i ||a_i||_1`:

    x <- x + tau_eff * sum_i p_i d_i

(the server optimizer receives `-tau_eff * sum_i p_i d_i` as its pseudo-
gradient; `optax.sgd(1.0)` is the paper's rule). With equal step counts this
is FedAvg; with unequal ones it removes the objective inconsistency that
plain averaging suffers, which weights clients by how much they moved.

Both weighted means come out of the aggregation stage: a client's message is
`{"delta": d_i, "tau": ||a_i||_1}` with weight n_i, so compression and DP
apply to `tau_eff` too.

The normalizer must match the local optimizer, so FedNova builds its own
client optimizer, `optax.sgd(client_learning_rate, momentum)`, from the two
numbers; it accepts no other client optimizer (Nesterov momentum, Adam, ...),
whose `a_i` it would not know.

References:
  Wang, Liu, Liang, Joshi, Poor. "Tackling the Objective Inconsistency
  Problem in Heterogeneous Federated Optimization", NeurIPS 2020 (eq. 6-7;
  Section 5 and Appendix for local momentum).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.algorithms.fedavg import fedavg
from fedjax_sim.algorithms.rules import check_optax_server, optimizers, refuse_compression
from fedjax_sim.core.algorithm import Algorithm, ClientData, ClientOutput, LocalConfig
from fedjax_sim.core.local import local_train
from fedjax_sim.core.model import Model
from fedjax_sim.core.registry import ALGORITHMS, AlgorithmSection
from fedjax_sim.core.schema import ConfigError, OptimizerConfig, option, server_sgd


def momentum_norm(tau: jax.typing.ArrayLike, momentum: float) -> jax.Array:
  """`||a||_1` of `tau` steps of SGD with heavy-ball momentum `rho` (= tau for rho = 0)."""
  tau = jnp.asarray(tau, jnp.float32)
  if momentum == 0.0:
    return tau
  rho = momentum
  return (tau - rho * (1.0 - rho ** tau) / (1.0 - rho)) / (1.0 - rho)


def fednova(model: Model, client_learning_rate: float,
            server_optimizer: optax.GradientTransformation, local: LocalConfig,
            momentum: float = 0.0) -> Algorithm:
  """Builds FedNova (data-weighted, each client normalized by its `||a_i||_1`).

  Args:
    model: the model record.
    client_learning_rate: eta of the clients' local SGD.
    server_optimizer: applied to `-tau_eff * sum_i p_i d_i`; `optax.sgd(1.0)`
      is the paper's server step.
    local: batch size, epochs, shuffling.
    momentum: rho in [0, 1), the clients' heavy-ball momentum (reset every
      round); 0 is vanilla local SGD.

  Raises:
    ValueError: `client_learning_rate` is an optax optimizer (FedNova builds
      its own SGD, so that its normalizer is known), or a value is out of range.
  """
  if isinstance(client_learning_rate, optax.GradientTransformation):
    raise ValueError("fednova builds its own client optimizer, optax.sgd(client_learning_rate, "
                     "momentum), because its normalizer ||a_i||_1 depends on the local update "
                     "rule; pass the learning rate (and momentum=...) instead of an optax "
                     "optimizer. Other client optimizers (Nesterov, Adam, ...) are not supported.")
  if not client_learning_rate > 0:
    raise ValueError(f"client_learning_rate must be > 0; got {client_learning_rate}.")
  if not 0.0 <= momentum < 1.0:
    raise ValueError(f"FedNova momentum must be in [0, 1); got {momentum}.")
  momentum = float(momentum)
  client_optimizer = (optax.sgd(client_learning_rate, momentum=momentum) if momentum
                      else optax.sgd(client_learning_rate))
  base = fedavg(model, client_optimizer, server_optimizer, local)

  def client_update(params, data: ClientData, client_state, key):
    trained, stats = local_train(model, client_optimizer, params, data, local, key=key)
    norm = momentum_norm(stats["steps"], momentum)
    n = jnp.sum(data.mask).astype(jnp.float32)
    normalized = jax.tree.map(lambda y, x: (y - x) / jnp.maximum(norm, 1.0), trained, params)
    return ClientOutput(update={"delta": normalized, "tau": norm}, weight=n,
                        client_state=client_state, metrics=stats)

  def server_update(state, mean, info):
    # The stage's weighted means: sum_i p_i d_i and tau_eff = sum_i p_i ||a_i||_1.
    step = jax.tree.map(lambda d: mean["tau"] * d, mean["delta"])
    return base.server_update(state, step, info)

  return base._replace(client_update=client_update, server_update=server_update)


# -- registered as algorithm.name = fednova -------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class FedNovaConfig(AlgorithmSection):
  """FedNova (Wang et al. 2020): data-weighted, each client normalized by ||a_i||_1."""

  server_optimizer: OptimizerConfig = option(default_factory=server_sgd)

  def __post_init__(self):
    super().__post_init__()
    kw = self.client_optimizer.kwargs
    if (self.client_optimizer.name != "sgd" or set(kw) - {"momentum", "nesterov"} or
        kw.get("nesterov", False) is not False):
      raise ConfigError("algorithm.client_optimizer must be sgd, optionally with momentum (no "
                        "nesterov or other arguments), for fednova: its normalizer ||a_i||_1 is "
                        "derived for local SGD with heavy-ball momentum.")
    rho = kw.get("momentum")
    if rho is not None and not (isinstance(rho, (int, float)) and not isinstance(rho, bool)
                                and 0 <= rho < 1):
      raise ConfigError(f"algorithm.client_optimizer.momentum = {rho!r} must be in [0, 1) for "
                        "fednova.")
    check_optax_server(self.server_optimizer)


@ALGORITHMS.register("fednova", FedNovaConfig, weighting=lambda cfg: "examples", message="other",
                     checks=(refuse_compression(
                         "fednova", "its server rescales by tau_eff, a scalar sent in the same "
                         "message as the update; compressed with it (one vector), the scalar is "
                         "lost or swamps the update"),))
def _build(cfg: FedNovaConfig, ctx) -> Algorithm:
  """FedNova with local SGD (optionally heavy-ball momentum)."""
  _, server = optimizers(cfg)
  return fednova(ctx.model, cfg.client_optimizer.learning_rate, server,
                 cfg.local_config(ctx.local_dp),
                 momentum=float(cfg.client_optimizer.kwargs.get("momentum") or 0.0))
