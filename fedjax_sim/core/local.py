"""Local training of one client: masked minibatch steps (plain or DP-SGD).

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


def masked_loss(model: Model, params: Params, batch, mask: jax.Array, *, key: PRNGKey,
                train: bool = True):
  """Mean loss over the real examples of a batch, plus summed statistics."""
  outputs = model.apply(params, batch, train=train, key=key)
  per_example = model.loss(outputs, batch)
  count = jnp.sum(mask)
  loss_sum = jnp.sum(jnp.where(mask, per_example, 0.0))
  stats = {"loss_sum": loss_sum, "examples": count.astype(jnp.float32)}
  stats.update(metric_sums(model.metrics(outputs, batch), mask))
  return loss_sum / jnp.maximum(count, 1), stats


def metric_sums(metrics: dict, mask: jax.Array) -> dict[str, jax.Array]:
  """`<name>_sum` over the real examples of each metric, plus `<name>_count` for ratios.

  A metric is per-example values (reported as their mean over examples) or a
  pair `(numerator, denominator)` of per-example values (reported as
  sum(numerator) / sum(denominator), e.g. token accuracy = correct counted
  tokens / counted tokens).
  """
  out = {}
  for name, values in metrics.items():
    if isinstance(values, tuple):
      numerator, denominator = values
      out[f"{name}_sum"] = jnp.sum(jnp.where(mask, numerator, 0.0))
      out[f"{name}_count"] = jnp.sum(jnp.where(mask, denominator, 0.0))
    else:
      out[f"{name}_sum"] = jnp.sum(jnp.where(mask, values, 0.0))
  return out


def _select(pred, new, old):
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def local_train(model: Model, optimizer: optax.GradientTransformation, params: Params,
                data: ClientData, local: LocalConfig, *, key: PRNGKey,
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

  Local DP-SGD (`local.dp_clip_norm` set) clips each example's gradient to
  the clip norm and drops one with a NaN or infinite entry (it contributes
  zero, so the sensitivity stays the clip norm); its statistics add
  `clipped_examples` and `nonfinite_examples`.

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
    loss, stats = masked_loss(model, p, batch, mask, key=k)
    if penalty is not None:
      loss = loss + penalty(p)
    return loss, stats

  grad_fn = jax.grad(objective, has_aux=True)
  dp = local.dp_clip_norm is not None
  # Local DP-SGD runs the client's own ceil(n / b) steps per epoch, each on a
  # freshly sampled batch (plain SGD: a batch with no real example is a no-op).
  own_steps = (jnp.sum(data.mask) + b - 1) // b

  def dp_grad(p, batch, mask, k):
    """Per-example gradients (vmap), each clipped to C; sum + N(0, (sigma C)^2); / batch size."""
    noise_key, k = jax.random.split(k)

    def one(q, example, kk):
      ex = jax.tree.map(lambda a: a[None], example)
      outputs = model.apply(q, ex, train=True, key=kk)
      values = metric_sums(model.metrics(outputs, ex), jnp.ones((1,), bool))
      return model.loss(outputs, ex)[0], values

    (losses, values), grads = jax.vmap(jax.value_and_grad(one, has_aux=True), (None, 0, 0))(
        p, batch, jax.random.split(k, mask.shape[0]))
    norms = jnp.sqrt(sum(jnp.sum(jnp.square(g.reshape(g.shape[0], -1).astype(jnp.float32)),
                                 axis=1) for g in jax.tree.leaves(grads)))
    # A gradient with a NaN or inf entry (or an overflowing norm) is dropped:
    # scaling it by 0 would still give NaN and poison the whole step. Padded
    # slots are dropped the same way, whatever their content.
    keep = mask & jnp.isfinite(norms)
    scale = jnp.where(keep, jnp.minimum(1.0, local.dp_clip_norm / jnp.maximum(norms, 1e-30)), 0.0)
    count = jnp.sum(mask).astype(jnp.float32)
    leaves, treedef = jax.tree.flatten(grads)
    noise_keys = jax.random.split(noise_key, len(leaves))
    std = local.dp_noise_multiplier * local.dp_clip_norm

    def clipped_sum(g):
      kept = keep.reshape((-1,) + (1,) * (g.ndim - 1))
      return jnp.tensordot(scale, jnp.where(kept, g, jnp.zeros_like(g)), axes=1)

    noisy = [(clipped_sum(g) + std * jax.random.normal(nk, g.shape[1:], g.dtype))
             / jnp.maximum(count, 1.0) for g, nk in zip(leaves, noise_keys)]
    grad = jax.tree.unflatten(treedef, noisy)
    if penalty is not None:  # data-independent: added after clipping, never clipped
      grad = jax.tree.map(jnp.add, grad, jax.grad(penalty)(p))
    stats = {"loss_sum": jnp.sum(jnp.where(mask, losses, 0.0)), "examples": count}
    stats.update(metric_sums(values, mask))
    stats["clipped_examples"] = jnp.sum(jnp.where(mask, norms > local.dp_clip_norm, False)
                                        ).astype(jnp.float32)
    stats["nonfinite_examples"] = jnp.sum(mask & ~jnp.isfinite(norms)).astype(jnp.float32)
    return grad, stats

  def step(carry, batch, mask, k, active):
    p, opt_state, totals = carry
    grads, stats = (dp_grad if dp else grad_fn)(p, batch, mask, k)
    updates, new_opt_state = optimizer.update(grads, opt_state, p)
    new_p = optax.apply_updates(p, updates)
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
    if local.shuffle and not dp:
      # Real examples first, in random order; padding stays at the end. With
      # JAX's (default) partitionable threefry the first n draws do not depend
      # on pad_to, so a padded client shuffles exactly like its unpadded self.
      order = jnp.argsort(jnp.where(mask, jax.random.uniform(order_key, (pad_to,)), 2.0))
      examples = jax.tree.map(lambda a: a[order], examples)
      mask = mask[order]

    def body(t, carry):
      k = jax.random.fold_in(step_key, t)
      if dp:  # a fresh uniform batch of min(b, n) real examples, without replacement
        pick_key, k = jax.random.split(k)
        pick = jnp.argsort(jnp.where(mask, jax.random.uniform(pick_key, (pad_to,)), 2.0))[:b]
        batch = jax.tree.map(lambda a: a[pick], examples)
        m = mask[pick]
        return step(carry, batch, m, k, t < own_steps)
      batch = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, t * b, b), examples)
      m = jax.lax.dynamic_slice_in_dim(mask, t * b, b)
      return step(carry, batch, m, k, jnp.any(m))

    # A dynamic step count: a block runs only as many steps as its largest client.
    return jax.lax.fori_loop(0, num_steps, body, carry), None

  zero_stats = jax.eval_shape(lambda: (dp_grad if dp else grad_fn)(
      params, jax.tree.map(lambda a: a[:b], data.examples), data.mask[:b], key)[1])
  totals = {k: jnp.zeros((), jnp.float32) for k in zero_stats}
  totals["steps"] = jnp.zeros((), jnp.float32)
  carry = (params, optimizer.init(params), totals)
  (params, _, totals), _ = jax.lax.scan(epoch, carry, jax.random.split(key, local.epochs))
  return params, totals
