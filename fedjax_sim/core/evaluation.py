"""Federated evaluation: per-client metrics, their weighted totals and their spread.

Every client of an evaluation population is scored on its own examples with
the same vmapped, block-streamed, sharded machinery as training. The result
keeps one value per client, so fairness statistics come from the real
distribution, not an average: for every metric the mean, median and standard
deviation over clients, and the worst decile (the 90th percentile of the loss,
the 10th percentile of accuracy and other higher-is-better metrics).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedjax_sim.core.data import FederatedData
from fedjax_sim.core.distributed import to_devices, to_host
from fedjax_sim.core.engine import AXIS, default_mesh
from fedjax_sim.core.program import client_loop, step_flops
from fedjax_sim.core.local import masked_loss
from fedjax_sim.core.model import Model
from fedjax_sim.core.plan import Planner


class Evaluator:
  """Scores parameters on every client of `data`.

  Args:
    model: the model record.
    data: the evaluation clients (e.g. the test split, or held-out clients).
    mesh: device mesh with axis 'clients'.
    block_size: clients vmapped together.
    granularity: examples are padded to multiples of this (bucketed).
    key: the evaluation key (the runner derives it from the run's seed with
      `run_key(seed, Purpose.EVAL)`); models run with `train=False`, so only
      a model that is stochastic at evaluation uses it.
  """

  def __init__(self, model: Model, data: FederatedData, *, key: jax.Array,
               mesh: Mesh | None = None, block_size: int = 64, granularity: int = 16,
               max_chunk_bytes: int = 24 << 20, client_loop: str = "auto"):
    self.model = model
    self.key = jax.random.key_data(key)
    self.data = data
    self.mesh = mesh or default_mesh()
    n_dev = self.mesh.devices.size
    self.planner = Planner(batch_size=granularity, block_size=block_size, num_devices=n_dev,
                           max_chunk_examples=max(1, max_chunk_bytes // data.bytes_per_example))
    self._sharding = NamedSharding(self.mesh, P(AXIS))
    self._fns: dict[tuple[int, int], Callable] = {}
    ids = np.nonzero(data.sizes > 0)[0]
    self._plan = self.planner.plan(0, ids, data.sizes[ids])
    self.client_loop = _resolve_loop(client_loop, model, data, self.mesh, granularity)

  def _fn(self, num_blocks: int, block: int):
    if (num_blocks, block) in self._fns:
      return self._fns[(num_blocks, block)]
    model = self.model

    def client_stats(params, examples, mask, key):
      _, stats = masked_loss(model, params, examples, mask, key=key, train=False)
      return stats

    def per_device(params, examples, mask, key):
      key = jax.random.wrap_key_data(key)
      blocks = jax.tree.map(lambda a: a.reshape((num_blocks, block) + a.shape[1:]),
                            (examples, mask))
      if self.client_loop == "map":
        run_block = lambda blk: jax.lax.map(lambda c: client_stats(params, *c, key), blk)
      else:
        run_block = lambda blk: jax.vmap(client_stats, (None, 0, 0, None))(params, *blk, key)
      out = jax.lax.map(run_block, blocks)
      return jax.tree.map(lambda a: a.reshape((num_blocks * block,) + a.shape[2:]), out)

    fn = jax.jit(jax.shard_map(per_device, mesh=self.mesh,
                               in_specs=(P(), P(AXIS), P(AXIS), P()),
                               out_specs=P(AXIS), check_vma=False))
    self._fns[(num_blocks, block)] = fn
    return fn

  def per_client(self, params) -> dict[str, np.ndarray]:
    """Per-client sums (`loss_sum`, `examples`, `<metric>_sum`) and `client_ids`."""
    params = to_devices(params, NamedSharding(self.mesh, P()))
    pieces = []
    for chunk in self._plan.chunks:
      examples, mask = self.data.gather(chunk.client_ids, chunk.pad_to, valid=chunk.valid)
      arrays = to_devices((examples, mask), self._sharding)
      stats = self._fn(chunk.num_blocks, chunk.block_size)(params, *arrays, self.key)
      pieces.append((chunk, stats))
    columns: dict[str, list[np.ndarray]] = {"client_ids": []}
    for chunk, stats in pieces:
      valid = chunk.valid
      columns["client_ids"].append(chunk.client_ids[valid])
      for k, v in to_host(stats).items():
        columns.setdefault(k, []).append(np.asarray(v)[valid])
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in columns.items()}

  def __call__(self, params) -> dict[str, float]:
    """Weighted totals and the distribution over clients of loss and each metric."""
    return summarize(self.per_client(params))

  # -- personalized models ---------------------------------------------------------

  def per_client_personal(self, store, personal_params: Callable, rows_per_device: int,
                          store_ids=None) -> dict[str, np.ndarray]:
    """Per-client sums where every client is scored with its *own* model.

    Args:
      store: the engine's per-client store (`SimState.clients`), sharded over
        this evaluator's mesh by owner device.
      personal_params: `personal_params(client_state) -> params` of a client.
      rows_per_device: the store's rows per device (`Engine.rows_per_device`).
      store_ids: the population id of each evaluation client (default: the
        evaluation data's own numbering, e.g. a per-client test split).
    """
    n_dev = self.mesh.devices.size
    local_ids = np.nonzero(self.data.sizes > 0)[0]
    pop = local_ids if store_ids is None else np.asarray(store_ids, np.int64)[local_ids]
    planner = dataclasses.replace(self.planner, by_owner=True, owner_rows=rows_per_device)
    plan = planner.plan(0, pop, self.data.sizes[local_ids])
    to_local = dict(zip(pop.tolist(), local_ids.tolist()))
    columns: dict[str, list[np.ndarray]] = {"client_ids": []}
    for chunk in plan.chunks:
      local = np.array([to_local[int(i)] if v else 0 for i, v in
                        zip(chunk.client_ids, chunk.valid)], np.int64)
      examples, mask = self.data.gather(local, chunk.pad_to, valid=chunk.valid)
      arrays = to_devices((chunk.client_ids.astype(np.int32), examples, mask), self._sharding)
      fn = self._personal_fn(chunk.num_blocks, chunk.block_size, personal_params,
                             rows_per_device, n_dev)
      stats = to_host(fn(store, *arrays, self.key))
      columns["client_ids"].append(local[chunk.valid])
      for k, v in stats.items():
        columns.setdefault(k, []).append(np.asarray(v)[chunk.valid])
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in columns.items()}

  def _personal_fn(self, num_blocks, block, personal_params, rows_per_device, n_dev):
    key = ("personal", num_blocks, block, personal_params, rows_per_device)
    if key in self._fns:
      return self._fns[key]
    model = self.model

    def client_stats(params, examples, mask, key):
      _, stats = masked_loss(model, params, examples, mask, key=key, train=False)
      return stats

    def per_device(store, ids, examples, mask, key):
      key = jax.random.wrap_key_data(key)
      blocks = jax.tree.map(lambda a: a.reshape((num_blocks, block) + a.shape[1:]),
                            (ids, examples, mask))

      def one_block(blk):
        ids_b, ex_b, mask_b = blk
        rows = ids_b % rows_per_device  # owner-local rows (contiguous id ranges)
        params = personal_params(jax.tree.map(lambda s: s[rows], store))
        if self.client_loop == "map":
          return jax.lax.map(lambda c: client_stats(*c, key), (params, ex_b, mask_b))
        return jax.vmap(client_stats, (0, 0, 0, None))(params, ex_b, mask_b, key)

      out = jax.lax.map(one_block, blocks)
      return jax.tree.map(lambda a: a.reshape((num_blocks * block,) + a.shape[2:]), out)

    fn = jax.jit(jax.shard_map(per_device, mesh=self.mesh,
                               in_specs=(P(AXIS), P(AXIS), P(AXIS), P(AXIS), P()),
                               out_specs=P(AXIS), check_vma=False))
    self._fns[key] = fn
    return fn


# Metrics where lower is better; for every other metric higher is better.
_LOWER_IS_BETTER = ("loss",)


def _resolve_loop(setting: str, model: Model, data: FederatedData, mesh: Mesh,
                  granularity: int) -> str:
  """`program.client_loop` for the model's forward pass on one padding granule."""
  if setting != "auto":
    return setting
  example = {k: jax.ShapeDtypeStruct((granularity,) + tuple(shape), dtype)
             for k, (shape, dtype) in data.feature_specs.items()}
  params = jax.eval_shape(model.init, jax.random.key(0))
  forward = lambda p, b: model.apply(p, b, train=False, key=None)
  return client_loop(setting, jax.make_jaxpr(forward)(params, example),
                     all(d.platform == "cpu" for d in mesh.devices.flat),
                     flops=lambda: step_flops(forward, params, example))


def summarize(per_client: dict[str, np.ndarray], prefix: str = "eval_") -> dict[str, float]:
  """Example-weighted loss/metrics and their distribution over clients.

  For each `<name>_sum` column: `<name>` (example-weighted, or divided by the
  `<name>_count` column of a ratio metric), and over clients
  `<name>_client_mean`, `_client_median`, `_client_std` and the worst decile:
  `loss_client_p90` (90th percentile of per-client loss) and, for
  higher-is-better metrics such as accuracy, `<name>_client_p10`. Clients
  with no examples are not scored.
  """
  n = per_client.get("examples", np.zeros(0))
  total = float(n.sum())
  out = {f"{prefix}clients": float(len(n)), f"{prefix}examples": total}
  if total == 0:
    return out
  for k, v in per_client.items():
    if not k.endswith("_sum"):
      continue
    name = k[:-4]
    denominator = per_client.get(f"{name}_count", n)  # ratio metrics carry their own
    if denominator.sum() <= 0:
      continue
    out[f"{prefix}{name}"] = float(v.sum() / denominator.sum())
    per = v / np.where(denominator > 0, denominator, 1)
    if denominator is not n:  # clients with nothing to count are not scored on a ratio
      per = per[denominator > 0]
    out[f"{prefix}{name}_client_mean"] = float(per.mean())
    out[f"{prefix}{name}_client_median"] = float(np.median(per))
    out[f"{prefix}{name}_client_std"] = float(per.std())
    if name in _LOWER_IS_BETTER:
      out[f"{prefix}{name}_client_p90"] = float(np.percentile(per, 90))
    else:
      out[f"{prefix}{name}_client_p10"] = float(np.percentile(per, 10))
  return out


__all__ = ["Evaluator", "summarize"]
