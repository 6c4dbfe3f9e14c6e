"""Local training of one client: masked minibatch steps under `lax.scan`.

Shared by every algorithm whose clients run an optax optimizer on their data.
Padding is exact: padded examples are masked out of the loss, and a step whose
batch holds no real example leaves parameters and optimizer state untouched,
so a client padded to a longer bucket computes exactly its unpadded update.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.core.algorithm import ClientData, LocalConfig
from fedjax_sim.core.model import Model
from fedjax_sim.core.types import Params, PRNGKey


def masked_loss(model: Model, params: Params, batch, mask: jax.Array, key: PRNGKey,
                train: bool = True):
  """Mean loss over the real examples of a batch, plus summed statistics."""
  outputs = model.apply(params, batch, train=train, key=key)
  per_example = model.loss(outputs, batch)
  count = jnp.sum(mask)
  loss_sum = jnp.sum(jnp.where(mask, per_example, 0.0))
  stats = {"loss_sum": loss_sum, "examples": count.astype(jnp.float32)}
  for name, values in model.metrics(outputs, batch).items():
    stats[f"{name}_sum"] = jnp.sum(jnp.where(mask, values, 0.0))
  return loss_sum / jnp.maximum(count, 1), stats


def _select(pred, new, old):
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def local_train(model: Model, optimizer: optax.GradientTransformation, params: Params,
                data: ClientData, local: LocalConfig, key: PRNGKey,
                penalty: Callable[[Params], jax.Array] | None = None):
  """Runs `local.epochs` epochs of minibatch steps on one client.

  Args:
    model: the model record.
    optimizer: the client optimizer; its state starts fresh each round.
    params: starting parameters (the broadcast model).
    data: the client's padded examples and mask; `pad_to` must be a multiple
      of `local.batch_size`.
    local: batch size, epochs, shuffling.
    key: the client's key for this round.
    penalty: optional extra term added to the local objective (e.g. FedProx's
      proximal term), a function of the parameters.

  A client with `data.step_limit` stops updating after that many steps;
  statistics count only the steps it took.

  Returns:
    (params, stats): the trained parameters and summed training statistics
    (`loss_sum`, `examples`, one `<metric>_sum` per model metric, `steps`),
    measured on each batch before the step that uses it.
  """
  pad_to = data.mask.shape[0]
  b = local.batch_size
  if pad_to % b:
    raise ValueError(f"pad_to={pad_to} is not a multiple of batch_size={b}.")
  num_steps = pad_to // b if data.num_steps is None else data.num_steps

  def objective(p, batch, mask, k):
    loss, stats = masked_loss(model, p, batch, mask, k)
    if penalty is not None:
      loss = loss + penalty(p)
    return loss, stats

  grad_fn = jax.grad(objective, has_aux=True)

  def step(carry, batch, mask, k):
    p, opt_state, totals = carry
    grads, stats = grad_fn(p, batch, mask, k)
    updates, new_opt_state = optimizer.update(grads, opt_state, p)
    new_p = optax.apply_updates(p, updates)
    active = jnp.any(mask)
    if data.step_limit is not None:  # a straggler stops after its budget of steps
      active = active & (totals["steps"] < data.step_limit)
    p = _select(active, new_p, p)
    opt_state = _select(active, new_opt_state, opt_state)
    stats = {name: jnp.where(active, v, 0.0) for name, v in stats.items()}
    stats["steps"] = active.astype(jnp.float32)
    totals = jax.tree.map(jnp.add, totals, stats)
    return p, opt_state, totals

  def epoch(carry, epoch_key):
    order_key, step_key = jax.random.split(epoch_key)
    examples, mask = data.examples, data.mask
    if local.shuffle:
      # Real examples first, in random order; padding stays at the end. With
      # JAX's (default) partitionable threefry the first n draws do not depend
      # on pad_to, so a padded client shuffles exactly like its unpadded self.
      order = jnp.argsort(jnp.where(mask, jax.random.uniform(order_key, (pad_to,)), 2.0))
      examples = jax.tree.map(lambda a: a[order], examples)
      mask = mask[order]

    def body(t, carry):
      batch = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, t * b, b), examples)
      m = jax.lax.dynamic_slice_in_dim(mask, t * b, b)
      return step(carry, batch, m, jax.random.fold_in(step_key, t))

    # A dynamic step count: a block runs only as many steps as its largest client.
    return jax.lax.fori_loop(0, num_steps, body, carry), None

  zero_stats = jax.eval_shape(lambda: objective(params, jax.tree.map(lambda a: a[:b], data.examples),
                                                data.mask[:b], key)[1])
  totals = {k: jnp.zeros((), jnp.float32) for k in zero_stats}
  totals["steps"] = jnp.zeros((), jnp.float32)
  carry = (params, optimizer.init(params), totals)
  (params, _, totals), _ = jax.lax.scan(epoch, carry, jax.random.split(key, local.epochs))
  return params, totals
