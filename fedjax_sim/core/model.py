"""The model record: a model is four pure functions, nothing more."""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax

from fedjax_sim.core.types import Batch, Params, PRNGKey


class Model(NamedTuple):
  """A pure model.

  Attributes:
    init: `init(key) -> params`.
    apply: `apply(params, batch, *, train, key) -> outputs` for a batch whose
      leading axis is examples.
    loss: `loss(outputs, batch) -> [examples]` per-example losses (the engine
      masks and averages them).
    metrics: `metrics(outputs, batch) -> {name: [examples]}` per-example values
      (e.g. 0/1 correctness) summed over real examples by the engine.
  """

  init: Callable[[PRNGKey], Params]
  apply: Callable[..., jax.Array]
  loss: Callable[[jax.Array, Batch], jax.Array]
  metrics: Callable[[jax.Array, Batch], dict[str, jax.Array]]
