"""The FedOpt family: FedAvg clients, an adaptive server optimizer from optax.

The server treats `-mean(delta)` as a pseudo-gradient for Adam, Yogi or
Adagrad; `tau` is the adaptivity (epsilon) that the paper tunes, passed to
optax as `eps`.

References:
  Reddi, Charles, Zaheer, Garrett, Rush, Konecny, Kumar, McMahan. "Adaptive
  Federated Optimization", ICLR 2021 (Algorithm 2).
"""

from __future__ import annotations

import optax

from fedjax_sim.algorithms.fedavg import fedavg
from fedjax_sim.core.algorithm import Algorithm, LocalConfig
from fedjax_sim.core.model import Model


def fedadam(model: Model, client_optimizer: optax.GradientTransformation, local: LocalConfig,
            server_learning_rate: float, b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3,
            weighting: str = "examples") -> Algorithm:
  """FedAdam: `optax.adam(server_learning_rate, b1, b2, eps=tau)` on the server."""
  return fedavg(model, client_optimizer, optax.adam(server_learning_rate, b1=b1, b2=b2, eps=tau),
                local, weighting)


def fedyogi(model: Model, client_optimizer: optax.GradientTransformation, local: LocalConfig,
            server_learning_rate: float, b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3,
            weighting: str = "examples") -> Algorithm:
  """FedYogi: `optax.yogi(server_learning_rate, b1, b2, eps=tau)` on the server."""
  return fedavg(model, client_optimizer, optax.yogi(server_learning_rate, b1=b1, b2=b2, eps=tau),
                local, weighting)


def fedadagrad(model: Model, client_optimizer: optax.GradientTransformation, local: LocalConfig,
               server_learning_rate: float, tau: float = 1e-3,
               initial_accumulator_value: float = 0.0, weighting: str = "examples") -> Algorithm:
  """FedAdagrad: `optax.adagrad(server_learning_rate, initial_accumulator_value, eps=tau)`."""
  return fedavg(model, client_optimizer,
                optax.adagrad(server_learning_rate, initial_accumulator_value, eps=tau),
                local, weighting)
