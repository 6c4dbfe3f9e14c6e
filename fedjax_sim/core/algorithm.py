"""The algorithm protocol: four pure functions over pytrees.

An algorithm is built by a factory that closes over its hyperparameters and
returns an `Algorithm`; the engine calls `client_update` vmapped over a block
of clients inside one compiled program, and `server_update` once per round.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax

from fedjax_sim.core.types import Params, PyTree


@dataclasses.dataclass(frozen=True)
class LocalConfig:
  """How a client trains locally (static, not a pytree).

  Attributes:
    batch_size: examples per local step; a client with n examples runs
      ceil(n / batch_size) steps per epoch, the last batch partial.
    epochs: local passes over the client's data.
    shuffle: reshuffle the client's examples every epoch.
    dp_clip_norm: set to train with local DP-SGD (example-level privacy):
      every step draws a fresh batch of min(batch_size, n) examples uniformly
      without replacement, clips each example's gradient to this L2 norm, sums
      them, adds N(0, (dp_noise_multiplier * dp_clip_norm)^2) per coordinate
      and divides by the batch size (`shuffle` does not apply). None: plain
      minibatch SGD.
    dp_noise_multiplier: sigma of local DP-SGD (std over clip norm).
  """

  batch_size: int
  epochs: int = 1
  shuffle: bool = True
  dp_clip_norm: float | None = None
  dp_noise_multiplier: float = 0.0

  def __post_init__(self):
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be >= 1; got {self.batch_size}.")
    if self.epochs < 1:
      raise ValueError(f"epochs must be >= 1; got {self.epochs}.")
    if self.dp_clip_norm is not None and not self.dp_clip_norm > 0:
      raise ValueError(f"dp_clip_norm must be > 0 (or None); got {self.dp_clip_norm}.")
    if not self.dp_noise_multiplier >= 0:
      raise ValueError(f"dp_noise_multiplier must be >= 0; got {self.dp_noise_multiplier}.")


class ClientData(NamedTuple):
  """One client's examples as the engine hands them to `client_update`.

  Attributes:
    examples: feature -> `[pad_to, ...]`; real examples first.
    mask: bool `[pad_to]`, True for real examples.
    num_steps: local steps per epoch to run (a scalar shared by the block, at
      least the client's own `ceil(n / batch_size)`; extra steps see no real
      example and change nothing). None: `pad_to // batch_size`.
    step_limit: the most local steps this client completes in total (a
      straggler's budget); None: no limit.
  """

  examples: dict[str, jax.Array]
  mask: jax.Array
  num_steps: jax.Array | int | None = None
  step_limit: jax.Array | int | None = None


class ClientOutput(NamedTuple):
  """What a client returns.

  Attributes:
    update: the client's message, a pytree of arrays that every aggregation
      stage sees and transforms as a whole (clipping, noise, compression):
      the model delta for FedAvg, and any other sum the server step needs as
      extra fields (SCAFFOLD's `{"delta", "control"}`, q-FFL's
      `{"delta", "h"}`). Its structure must not depend on the data.
    weight: scalar aggregation weight (e.g. number of examples).
    client_state: the client's new per-client state (None if stateless).
    metrics: name -> scalar *sum* (e.g. summed loss, example count); the
      engine sums them over clients for the round's metrics, so ratios are
      exact. Diagnostics only: they never reach `server_update`.
  """

  update: Params
  weight: jax.Array
  client_state: PyTree
  metrics: dict[str, jax.Array]


class Algorithm(NamedTuple):
  """A federated algorithm as pure functions.

  Attributes:
    server_init: `server_init(params) -> server_state`.
    broadcast: `broadcast(server_state) -> what every client receives`.
    client_update: `client_update(broadcast, client_data, client_state, key)
      -> ClientOutput`, for a single client (the engine vmaps it).
    server_update: `server_update(server_state, aggregate, info) ->
      server_state`; `aggregate` is what the aggregation stage's `finalize`
      made of the clients' updates (same structure as one update) and `info`
      is *only* the dict of scalars that `finalize` released (its metrics,
      e.g. `total_weight` for the non-DP stages, see
      `fedjax_sim.core.aggregation.total_weight`). Raw client statistics
      never reach the server: a sum the server step needs must travel in
      `ClientOutput.update`, through the stage.
    local: the local-training configuration (the planner needs the batch size).
    params_of: `params_of(server_state) -> model parameters` (for evaluation).
    client_state_init: `client_state_init(params) -> one client's initial
      state` for algorithms that keep per-client state (SCAFFOLD's control
      variates, personal models); the engine stores it for every client,
      hands `client_update` its client's state and stores what it returns.
      None for stateless algorithms (they receive and return None).
    personal_params: `personal_params(client_state) -> params` for
      personalization algorithms (Ditto): the model a client itself uses,
      evaluated per client next to the global model. None otherwise.
  """

  server_init: Callable[[Params], Any]
  broadcast: Callable[[Any], PyTree]
  client_update: Callable[..., ClientOutput]
  server_update: Callable[[Any, Params, dict], Any]
  local: LocalConfig
  params_of: Callable[[Any], Params]
  client_state_init: Callable[[Params], PyTree] | None = None
  personal_params: Callable[[PyTree], Params] | None = None
