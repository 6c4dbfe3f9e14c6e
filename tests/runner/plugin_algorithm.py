"""A researcher's own algorithm, registered from outside the package (used by tests).

`scaled_fedavg` is FedAvg whose server moves by `scale` times the mean
client delta: by construction equal to FedAvg with server SGD at learning
rate `scale`, which is what the acceptance test checks.
"""

import dataclasses

import jax
import jax.numpy as jnp

from fedjax_sim.core.algorithm import ClientOutput
from fedjax_sim.core.local import local_train
from fedjax_sim.core.registry import ALGORITHMS, AlgorithmSection
from fedjax_sim.core.schema import ConfigError, build_optimizer, option
from fedjax_sim.core import Algorithm


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScaledFedAvgConfig(AlgorithmSection):
  """FedAvg with the server step scaled by `scale`."""

  scale: float = option(1.0, check=(lambda x: x > 0, "must be > 0"))


def _no_scale_above_two(config):
  if config.algorithm.scale > 2 and config.privacy.mechanism != "none":
    raise ConfigError("algorithm.scale > 2 is refused with privacy (a rule the plugin declares).")


@ALGORITHMS.register("scaled_fedavg", ScaledFedAvgConfig, weighting=lambda cfg: "examples",
                     message="model_delta", checks=(_no_scale_above_two,))
def build(cfg, ctx):
  client_opt = build_optimizer(cfg.client_optimizer, "algorithm.client_optimizer")
  local = cfg.local_config(ctx.local_dp)
  model = ctx.model

  def client_update(params, data, client_state, key):
    trained, stats = local_train(model, client_opt, params, data, local, key=key)
    delta = jax.tree.map(lambda a, b: a - b, trained, params)
    weight = jnp.sum(data.mask).astype(jnp.float32)  # FedAvg's: the client's examples
    return ClientOutput(delta, weight, client_state, stats)

  def server_update(params, mean_delta, info):
    del info
    return jax.tree.map(lambda p, d: p + cfg.scale * d, params, mean_delta)

  return Algorithm(server_init=lambda p: p, broadcast=lambda p: p, client_update=client_update,
                   server_update=server_update, local=local, params_of=lambda p: p)

