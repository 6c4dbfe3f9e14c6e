"""Config rules shared by several algorithms (each algorithm declares the ones it needs)."""

from __future__ import annotations

from typing import Callable

from fedjax_sim.core.registry import COMPRESSION, PRIVACY
from fedjax_sim.core.schema import ConfigError, OptimizerConfig, build_optimizer

# Paper-exact server steps selected by algorithm.name, not by server_optimizer.name.
PAPER_SERVER_STEPS = {"fed_adam": "fedadam", "fed_yogi": "fedyogi", "fed_adagrad": "fedadagrad"}


def check_optax_server(oc: OptimizerConfig, path: str = "algorithm.server_optimizer") -> None:
  """An optax server optimizer; the paper-exact FedOpt steps are refused with the fix."""
  if oc.name in PAPER_SERVER_STEPS:
    algorithm = PAPER_SERVER_STEPS[oc.name]
    raise ConfigError(f"{path}.name = {oc.name!r} is the paper-exact server step of {algorithm}; "
                      f"select it with algorithm.name = {algorithm!r} (tau = algorithm.tau). "
                      f"{path}.name takes an optax optimizer (sgd, adam, yogi, adagrad, ...).")
  build_optimizer(oc, path)


def plain_sgd(name: str, client_optimizer: OptimizerConfig) -> None:
  if client_optimizer.name != "sgd" or client_optimizer.kwargs:
    raise ConfigError(f"algorithm.client_optimizer must be plain sgd (no momentum or other "
                      f"arguments) for {name}: its update rule assumes local SGD.")


def refuse_user_level_dp(name: str, why: str) -> Callable:
  """Rule: `name` cannot run under a user-level DP mechanism, because `why`."""

  def check(config) -> None:
    mechanism = config.privacy.mechanism
    if PRIVACY.get(mechanism).traits.get("unit") == "client":
      raise ConfigError(f"privacy.mechanism = {mechanism!r} cannot be combined with "
                        f"algorithm.name = {name!r}: {why}. Use local_dp_sgd or another "
                        "algorithm.")
  return check


def refuse_local_dp(name: str, why: str) -> Callable:
  """Rule: `name` cannot run under an example-level (local DP-SGD) mechanism, because `why`."""

  def check(config) -> None:
    mechanism = config.privacy.mechanism
    if PRIVACY.get(mechanism).traits.get("unit") == "example":
      raise ConfigError(f"privacy.mechanism = {mechanism!r} is not accounted for {name}: its "
                        f"clients also touch their data outside DP-SGD ({why}).")
  return check


def refuse_compression(name: str, why: str) -> Callable:
  """Rule: `name`'s message cannot go through a lossy channel, because `why`."""

  def check(config) -> None:
    method = config.compression.method
    if method != COMPRESSION.default:
      raise ConfigError(f"compression.method = {method!r} cannot be combined with "
                        f"algorithm.name = {name!r}: {why}. Run it uncompressed.")
  return check


def optimizers(cfg, server: bool = True):
  """`(client, server)` optax optimizers of an algorithm section (server: None if not asked)."""
  client = build_optimizer(cfg.client_optimizer, "algorithm.client_optimizer")
  if not server:
    return client, None
  return client, build_optimizer(cfg.server_optimizer, "algorithm.server_optimizer")
