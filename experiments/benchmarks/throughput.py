"""Round throughput of the engine against four references, measured in one run.

Workload W1: non-IID Gaussian-mixture data, 32 examples x 64 float32 features
per client, 10 classes; logistic regression or MLP 64-128-10 (ReLU); FedAvg,
1 local epoch, batch 8, client SGD lr 0.1, server SGD lr 1.0.

For each cohort size K it reports the median seconds per round (rounds that
compiled a program excluded: the first, and any later one that met a new chunk
shape), clients/s, examples/s, useful GFLOP/s and their
fraction of the float32 matmul GFLOP/s measured in the same process (see
report.ceilings), and peak resident memory; and, in the same process and on
the same data, four references:

  loop               a Python loop over clients calling one jitted per-client
                     update (slices of the packed arrays, deltas summed on
                     device); one device; slicing is timed.
  jit_vmap           a hand-written `jit(vmap(client_update))` over the whole
                     round on one device, after gathering the round's data
                     into one [K, 32, 64] array; the gather is timed.
  scan_vmap_1dev     a tuned hand-written round on one device: the round's
                     data resident on the device (put there before the timer
                     starts), a `lax.scan` over blocks of B clients with
                     `vmap(client_update)` inside, the block sums accumulated
                     in the scan's carry.
  scan_vmap_sharded  the same over every local device: the data resident and
                     split over the devices (`shard_map`), one scan per device,
                     the per-device partial sums added at the end.

and, on CPU with several devices, `scan_vmap_sharded_unrolled`: the sharded
scan traced under the engine's unrolled small contractions
(`fedjax_sim.core.contractions`, what `engine.small_contractions` turns on).
It is no program a user writes (the rule is the engine's), so it is never the
"best reference"; it shows what the same arithmetic costs with the engine's
trick and none of its bookkeeping (masks, statistics, per-client records,
chunking).

The sharded scans run interleaved with the engine: after the engine's first
(compiling) round and the other references, engine round r and the sharded
scans' round r (the same cohort) alternate for r = 1..R-1, each preceded by a
0.25 s pause in which the engine's prefetch thread finishes preparing its next
round (so no thread of the engine competes with a timed reference round); a
shared virtual machine's speed drifts by tens of percent over minutes, and
this way both see the same. Each of them also reports `paired_speedup`, the
median over those rounds of its seconds over the engine's.

The scan references try every block size of --ref-blocks smaller than a
device's share of the cohort, plus one block of the whole share when that is
no larger than the largest (each compiled and timed, best of two calls, on
round 0's data), and keep the fastest; the JSON says which and lists the
tries. They time only the device work: sampling, gathering and the
transfer to the devices are done before the timer starts (their host time is
reported separately as `untimed_host_seconds`). The engine and the other two
references include their host-side data handling in the timed round (the
engine overlaps it with the device work in a background thread).

Every reference does the same arithmetic as the engine (same batches, no
shuffling): the model after each reference's first round is compared with the
engine's after its first round (`max_relative_diff_vs_engine`,
`matches_engine`). Speed-ups are the engine's clients/s divided by each
reference's (`speedup_vs`) and by the best reference's
(`speedup_vs_best_reference`, `best_reference`: the best of the four plain
references). The references that hold a
second copy of the round's data (all but the loop) are skipped when that copy
exceeds a third of the physical memory the population leaves free.

  python experiments/benchmarks/throughput.py --model logreg --clients-per-round 10000 --rounds 5
  python experiments/benchmarks/throughput.py --heterogeneous --model mlp --clients-per-round 10000
  python experiments/benchmarks/throughput.py --out results.json     # the whole grid

With --heterogeneous (log-normal sizes) the engine's rounds alternate with
those of the equal-size cell in one process (see `heterogeneous_cell`), so
both see the same machine speed. The grid runs every cell in a fresh
subprocess so each peak-memory figure is its own. Prints JSON (and writes it
to --out).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from report import MATMUL_N, COPY_MIB, ceilings, emit, machine  # next to this script

GRID_K = (100, 1_000, 10_000, 100_000, 1_000_000)
MODELS = ("logreg", "mlp")
EXAMPLES, FEATURES, CLASSES, BATCH, LR = 32, 64, 10, 8, 0.1
REF_BLOCKS = (16, 64, 256, 1024, 4096)
MATCH_RTOL = 1e-4  # max |reference - engine| / max |engine update| after one round
# Seconds to let the engine's prefetch thread settle before a timed reference round.
SETTLE_SECONDS = 0.25
# References that borrow the engine's own machinery: reported, never the "best reference".
BORROWED = ("scan_vmap_sharded_unrolled",)


def _flops_per_example(model: str) -> float:
  """Useful FLOPs of one forward + backward pass (no gradient w.r.t. the input)."""
  if model == "logreg":
    return 2 * (2 * FEATURES * CLASSES)
  dense = FEATURES * 128 + 128 * CLASSES
  return 2 * (2 * dense) + 2 * 128 * CLASSES


def _peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _memory_gib() -> float | None:
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  except (ValueError, OSError, AttributeError):
    return None


class EngineCell:
  """The engine on one W1 cell, advanced one round at a time (so two cells can alternate)."""

  def __init__(self, model_name: str, k: int, rounds: int, *, heterogeneous: bool,
               block_size: int, bucket: bool = True, placement: str = "auto"):
    import jax
    import optax

    import fedjax_sim as fs
    from fedjax_sim.datasets import gaussian_mixture, lognormal_sizes

    self.model_name, self.k, self.rounds = model_name, k, rounds
    self.heterogeneous, self.bucket, self.block_size = heterogeneous, bucket, block_size
    self.population = population = max(k, 1_000)
    t0 = time.perf_counter()
    sizes = None
    if heterogeneous:
      sizes = lognormal_sizes(population, median=EXAMPLES, sigma=1.0, max_size=1024, seed=0)
    self.data = gaussian_mixture(population, EXAMPLES, FEATURES, CLASSES, seed=0, sizes=sizes)
    self.gen_seconds = time.perf_counter() - t0
    self.model = (fs.logistic_regression((FEATURES,), CLASSES) if model_name == "logreg"
                  else fs.mlp((FEATURES,), CLASSES, hidden=(128,)))
    local = fs.LocalConfig(batch_size=BATCH, epochs=1, shuffle=False)
    self.alg = fs.fedavg(self.model, optax.sgd(LR), optax.sgd(1.0), local)
    self.sampler = lambda r: fs.sample_uniform(fs.round_rng(0, r), population, k)
    self.engine = fs.Engine(self.alg, self.data, fs.weighted_mean(), self.sampler, seed=0,
                            config=fs.EngineConfig(block_size=block_size, bucketing=bucket,
                                                   data_placement=placement))
    self.params = self.model.init(jax.random.key(0))
    self._rounds = self.engine.rounds(self.engine.init(self.params), 0, rounds)
    self.times, self.effs, self.examples, self.compiled = [], [], [], []
    self.first = None  # the model after round 1
    self._traces = self.engine.traces

  def step(self) -> None:
    """Runs the next round and records it."""
    import jax
    res = next(self._rounds)
    self.times.append(res.metrics["round_seconds"])
    self.effs.append(res.metrics["padding_efficiency"])
    self.examples.append(res.metrics["examples"])
    # Whether this round compiled a program (a new shape).
    self.compiled.append(self.engine.traces > self._traces)
    self._traces = self.engine.traces
    if self.first is None:
      self.first = jax.device_get(self.alg.params_of(res.state.server))

  def steady(self) -> list[int]:
    """Indices of the steady-state rounds: those that compiled nothing (heterogeneous
    cohorts meet new chunk shapes in later rounds too); all but the first if each did."""
    idx = [i for i, c in enumerate(self.compiled) if not c]
    return idx or list(range(1, len(self.times))) or [0]

  def summary(self) -> dict:
    import jax
    import numpy as np
    steady = self.steady()
    sec = float(np.median([self.times[i] for i in steady]))
    k = self.k
    flops_client = _flops_per_example(self.model_name) * float(np.mean(self.examples)) / k
    return {
        "model": self.model_name, "clients_per_round": k, "population": self.population,
        "heterogeneous": self.heterogeneous, "bucketing": self.bucket, "rounds": self.rounds,
        "block_size": self.block_size, "devices": jax.device_count(),
        "data_generation_seconds": self.gen_seconds,
        "data_placement": self.engine.placement,
        "engine": {
            "first_round_seconds": self.times[0],
            "round_seconds": self.times,
            "median_round_seconds": sec,
            "rounds_timed": len(steady),
            "rounds_that_compiled": int(sum(self.compiled)),
            "clients_per_second": k / sec,
            "examples_per_second": float(np.mean(self.examples)) / sec,
            "gflops": k / sec * flops_client / 1e9,
            "padding_efficiency": float(np.mean(self.effs)),
            "compiled_programs": self.engine.traces,
            "peak_rss_gib": _peak_rss_gib(),
        },
    }


def heterogeneous_cell(model_name: str, k: int, rounds: int, *, block_size: int,
                       placement: str = "auto") -> dict:
  """The heterogeneous cell and the equal-size cell, their rounds alternating in one process.

  Alternating (the order swapped every round) exposes both engines to the same machine
  speed, which drifts by tens of percent over minutes on a shared virtual machine; the
  ratio is the median over rounds r that compiled in neither engine of the two
  examples/s of round r (`examples_per_second_vs_equal_size`), next to the ratio of the
  medians. The cell without bucketing (only its padding efficiency and examples/s are
  reported) runs afterwards.
  """
  import numpy as np
  het = EngineCell(model_name, k, rounds, heterogeneous=True, block_size=block_size,
                   placement=placement)
  equal = EngineCell(model_name, k, rounds, heterogeneous=False, block_size=block_size,
                     placement=placement)
  for r in range(rounds):
    for cell in ((het, equal) if r % 2 == 0 else (equal, het)):
      cell.step()
  out = het.summary()
  eq = equal.summary()
  both = sorted(set(het.steady()) & set(equal.steady())) or het.steady()
  paired = [(het.examples[i] / het.times[i]) / (equal.examples[i] / equal.times[i])
            for i in both]
  out["equal_size_examples_per_second"] = eq["engine"]["examples_per_second"]
  out["equal_size_median_round_seconds"] = eq["engine"]["median_round_seconds"]
  out["examples_per_second_vs_equal_size"] = float(np.median(paired))
  out["examples_per_second_vs_equal_size_of_medians"] = (
      out["engine"]["examples_per_second"] / eq["engine"]["examples_per_second"])
  out["paired_rounds"] = len(paired)
  out["interleaved"] = "heterogeneous and equal-size rounds alternate in one process"
  del het, equal
  flat = EngineCell(model_name, k, rounds, heterogeneous=True, block_size=block_size,
                    bucket=False, placement=placement)
  for _ in range(rounds):
    flat.step()
  fs_ = flat.summary()["engine"]
  out["without_bucketing"] = {"padding_efficiency": fs_["padding_efficiency"],
                              "examples_per_second": fs_["examples_per_second"]}
  return out


def run_cell(model_name: str, k: int, rounds: int, *, heterogeneous: bool, block_size: int,
             references: bool, loop_max_k: int, ref_rounds: int, bucket: bool = True,
             ref_blocks: tuple = REF_BLOCKS, placement: str = "auto",
             unrolled_reference: bool = True) -> dict:
  import jax
  import numpy as np

  from fedjax_sim.core import contractions

  cell = EngineCell(model_name, k, rounds, heterogeneous=heterogeneous, block_size=block_size,
                    bucket=bucket, placement=placement)
  cell.step()  # round 0: compiles
  if heterogeneous or not references:
    for _ in range(1, rounds):
      cell.step()
    return cell.summary()
  model, params, data, sampler = cell.model, cell.params, cell.data, cell.sampler
  k, population = cell.k, cell.population
  x, y = data.features["x"], data.features["y"]
  refs: dict = {}
  if k <= loop_max_k:
    refs["loop"] = _loop_reference(model, params, x, y, data, sampler, ref_rounds)
  else:
    refs["loop"] = {"skipped": f"K > --loop-max-k {loop_max_k}"}
  # Every other reference holds a second copy of the round's data.
  need = k * EXAMPLES * (FEATURES + 1) * 4 / 2**30
  mem = _memory_gib()
  limit = (mem - population * EXAMPLES * (FEATURES + 1) * 4 / 2**30) / 3 if mem else 4.0
  interleaved: dict = {}  # the sharded scans: their rounds alternate with the engine's
  if need <= limit:
    refs["jit_vmap"] = _vmap_reference(model, params, x, y, data, sampler, ref_rounds)
    devices = jax.local_devices()
    refs["scan_vmap_1dev"] = _scan_reference(model, params, x, y, data, sampler, ref_rounds,
                                             devices[:1], ref_blocks)
    if len(devices) > 1:
      interleaved["scan_vmap_sharded"] = ScanReference(model, params, x, y, data, sampler,
                                                       devices, ref_blocks)
      if unrolled_reference and jax.default_backend() == "cpu" and contractions.available():
        interleaved["scan_vmap_sharded_unrolled"] = ScanReference(
            model, params, x, y, data, sampler, devices, ref_blocks,
            small_contractions=contractions.CPU_MAX_K)
  else:
    skip = {"skipped": f"needs a second {need:.1f} GiB copy of the round's data (limit "
                       f"{limit:.1f} GiB: a third of the memory the population leaves)"}
    refs.update({"jit_vmap": skip, "scan_vmap_1dev": skip, "scan_vmap_sharded": skip})
  # The engine's rounds 1.. alternate with the sharded references' rounds on the same
  # cohorts, so that both see the same machine speed (it drifts on a shared virtual
  # machine). Before each, a pause lets the engine's prefetch thread finish preparing
  # its next round (it then waits on its full queue), so no thread of ours competes.
  for r in range(1, rounds):
    time.sleep(SETTLE_SECONDS)
    cell.step()
    time.sleep(SETTLE_SECONDS)
    for ref in interleaved.values():
      ref.round(r)
  out = cell.summary()
  steady = [i for i in cell.steady() if i > 0]
  for name, ref in interleaved.items():
    refs[name] = ref.result()
    refs[name]["interleaved_with_engine"] = True
    if steady:  # the engine's speed over the reference's, round by round
      refs[name]["paired_speedup"] = float(np.median(
          [ref.times[i] / cell.times[i] for i in steady]))
  out["references"] = refs
  engine_first = cell.first
  flops_client = _flops_per_example(model_name) * float(np.mean(cell.examples)) / k
  # Same arithmetic: each reference's model after round 1 against the engine's.
  eng = jax.tree.leaves(engine_first)
  eng_update = max(float(np.max(np.abs(np.asarray(e) - np.asarray(p))))
                   for e, p in zip(eng, jax.tree.leaves(params)))
  for r in refs.values():
    first = r.pop("_first", None)
    if first is not None:
      diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                 for a, b in zip(jax.tree.leaves(first), eng))
      r["max_relative_diff_vs_engine"] = diff / eng_update
      r["matches_engine"] = diff <= MATCH_RTOL * eng_update
  timed = {n: r["clients_per_second"] for n, r in refs.items() if "clients_per_second" in r}
  # The best of the references written the way a user writes them (JAX's own batching
  # rules); the unrolled one borrows the engine's rule and is reported beside it.
  plain = {n: v for n, v in timed.items() if n not in BORROWED}
  for n, v in timed.items():
    refs[n]["gflops"] = v * flops_client / 1e9
  if timed:
    cps = out["engine"]["clients_per_second"]
    out["speedup_vs"] = {n: cps / v for n, v in timed.items()}
    out["best_reference"] = max(plain, key=plain.get)
    out["speedup_vs_best_reference"] = cps / plain[out["best_reference"]]
  return out


def _client_update_fn(model, optax, jax, jnp):
  """A plain per-client FedAvg update: 4 SGD steps on batches of 8, returns the delta."""
  opt = optax.sgd(LR)

  def loss(p, xb, yb):
    logits = model.apply(p, {"x": xb}, train=True, key=None)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  def update(params, x, y):
    xb = x.reshape(EXAMPLES // BATCH, BATCH, FEATURES)
    yb = y.reshape(EXAMPLES // BATCH, BATCH)

    def step(carry, batch):
      p, s = carry
      g = jax.grad(loss)(p, *batch)
      u, s = opt.update(g, s, p)
      return (optax.apply_updates(p, u), s), None

    (p, _), _ = jax.lax.scan(step, (params, opt.init(params)), (xb, yb))
    return jax.tree.map(jnp.subtract, p, params)

  return update


def _median_result(times: list, k: int, rounds: int, first) -> dict:
  import numpy as np
  sec = float(np.median(times[1:] or times))
  return {"median_round_seconds": sec, "clients_per_second": k / sec, "rounds": rounds,
          "_first": first}


def _loop_reference(model, params, x, y, data, sampler, rounds):
  import jax
  import jax.numpy as jnp
  import optax
  update = jax.jit(_client_update_fn(model, optax, jax, jnp))
  add = jax.jit(lambda acc, d: jax.tree.map(jnp.add, acc, d))
  times, first = [], None
  for r in range(rounds):
    ids = sampler(r)
    t = time.perf_counter()
    acc = jax.tree.map(jnp.zeros_like, params)
    for i in ids:
      s = int(data.starts[i])
      acc = add(acc, update(params, x[s:s + EXAMPLES], y[s:s + EXAMPLES]))
    params = jax.tree.map(lambda p, a: p + a / len(ids), params, acc)
    jax.block_until_ready(params)
    times.append(time.perf_counter() - t)
    first = jax.device_get(params) if first is None else first
  out = _median_result(times, len(ids), rounds, first)
  out.update(devices=1, timed="slicing, per-client calls, sum, server step")
  return out


def _gather(data, x, y, ids):
  import numpy as np
  index = (data.starts[ids][:, None] + np.arange(EXAMPLES)[None, :]).reshape(-1)
  return (x[index].reshape(len(ids), EXAMPLES, FEATURES),
          y[index].reshape(len(ids), EXAMPLES))


def _vmap_reference(model, params, x, y, data, sampler, rounds):
  import jax
  import jax.numpy as jnp
  import optax
  update = _client_update_fn(model, optax, jax, jnp)

  @jax.jit
  def round_fn(params, xs, ys):
    deltas = jax.vmap(update, (None, 0, 0))(params, xs, ys)
    return jax.tree.map(lambda p, d: p + d.mean(0), params, deltas)

  times, first = [], None
  for r in range(rounds):
    ids = sampler(r)
    t = time.perf_counter()
    params = round_fn(params, *_gather(data, x, y, ids))
    jax.block_until_ready(params)
    times.append(time.perf_counter() - t)
    first = jax.device_get(params) if first is None else first
  out = _median_result(times, len(ids), rounds, first)
  out.update(devices=1, timed="host gather, transfer, vmap over the round, server step")
  return out


def _scan_round_fn(model, mesh, block: int, per_device: int):
  """A hand-written round over `mesh`: per device a lax.scan over blocks of `block` clients
  with vmap(client_update) inside, weighted sums in the carry; partial sums added at the end.

  The device's `per_device` clients are `nb = per_device // block` full blocks (read in
  place with dynamic slices: no copy of the data) and one vmap over the remainder.
  """
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import NamedSharding, PartitionSpec as P
  update = _client_update_fn(model, optax, jax, jnp)
  nb, rem = divmod(per_device, block)

  def weighted_sum(p, xs, ys, w):
    deltas = jax.vmap(update, (None, 0, 0))(p, xs, ys)
    return jax.tree.map(lambda d: jnp.tensordot(w, d, axes=1), deltas)

  def on_device(p, xs, ys, w):
    acc = jax.tree.map(jnp.zeros_like, p)
    if nb:
      def body(acc, i):
        blk = [jax.lax.dynamic_slice_in_dim(a, i * block, block) for a in (xs, ys, w)]
        return jax.tree.map(jnp.add, acc, weighted_sum(p, *blk)), None
      acc, _ = jax.lax.scan(body, acc, jnp.arange(nb))
    if rem:
      tail = weighted_sum(p, xs[nb * block:], ys[nb * block:], w[nb * block:])
      acc = jax.tree.map(jnp.add, acc, tail)
    return jax.tree.map(lambda a: a[None], acc)

  partials = jax.shard_map(on_device, mesh=mesh, in_specs=(P(), P("c"), P("c"), P("c")),
                           out_specs=P("c"), check_vma=False)
  replicated = NamedSharding(mesh, P())

  def round_fn(p, xs, ys, w, count):
    sums = partials(p, xs, ys, w)
    return jax.tree.map(lambda q, s: q + s.sum(0) / count, p, sums)

  return jax.jit(round_fn, out_shardings=replicated)


def _scan_reference(model, params, x, y, data, sampler, rounds, devices, blocks,
                    small_contractions: int = 0):
  """The tuned hand-written reference with the round's data resident on `devices`
  (`small_contractions` > 0: traced and run under the engine's unrolled contractions),
  run for `rounds` rounds on its own."""
  ref = ScanReference(model, params, x, y, data, sampler, devices, blocks, small_contractions)
  for r in range(1, rounds):
    ref.round(r)
  return ref.result()


class ScanReference:
  """The scan reference, tuned on round 0's data (which it then trains on: its `first`
  model), then advanced one round at a time (`round`), so that its rounds can alternate
  with the engine's. Each round's data is gathered and placed before its timer starts."""

  def __init__(self, model, params, x, y, data, sampler, devices, blocks,
               small_contractions: int = 0):
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from fedjax_sim.core import contractions
    self._context = lambda: contractions.unrolled_small_contractions(small_contractions)
    self.small_contractions = small_contractions
    self.mesh = mesh = Mesh(np.asarray(devices), ("c",))
    self.nd = nd = len(devices)
    self._sharded = NamedSharding(mesh, P("c"))
    self._data = (data, x, y, sampler)
    t = time.perf_counter()
    arrays, k = self._resident(0)
    self.host = [time.perf_counter() - t]
    self.per_device = per_device = arrays[0].shape[0] // nd
    p0 = jax.device_put(params, NamedSharding(mesh, P()))
    candidates = sorted({b for b in blocks if b < per_device} |
                        ({per_device} if per_device <= max(blocks) else set()))
    tries, fns = {}, {}
    with self._context():
      for b in candidates:
        fn = fns[b] = _scan_round_fn(model, mesh, b, per_device)
        t = time.perf_counter()
        jax.block_until_ready(fn(p0, *arrays, np.float32(k)))
        compile_s = time.perf_counter() - t
        best = float("inf")
        for _ in range(2):
          t = time.perf_counter()
          jax.block_until_ready(fn(p0, *arrays, np.float32(k)))
          best = min(best, time.perf_counter() - t)
        tries[b] = {"seconds": best, "first_call_seconds": compile_s}
    self.tries = tries
    self.block = min(tries, key=lambda b: tries[b]["seconds"])
    self._fn = fns[self.block]  # compiled while tuning
    del fns
    self.times, self.k = [], k
    self._p = p0
    self._run(arrays, k)  # round 0
    self.first = jax.device_get(self._p)

  def _resident(self, r):
    """Round r's data on the devices (padded to a multiple of the device count, weight 0)."""
    import jax
    import numpy as np
    data, x, y, sampler = self._data
    ids = sampler(r)
    pad = -len(ids) % self.nd
    xs, ys = _gather(data, x, y, ids)
    w = np.ones(len(ids) + pad, np.float32)
    if pad:
      w[len(ids):] = 0
      xs = np.concatenate([xs, np.zeros((pad,) + xs.shape[1:], xs.dtype)])
      ys = np.concatenate([ys, np.zeros((pad,) + ys.shape[1:], ys.dtype)])
    arrays = jax.device_put((xs, ys, w), self._sharded)
    jax.block_until_ready(arrays)
    return arrays, len(ids)

  def _run(self, arrays, k) -> float:
    import jax
    import numpy as np
    if arrays[0].shape[0] // self.nd != self.per_device:
      raise AssertionError("cohort size changed between rounds")
    with self._context():
      t = time.perf_counter()
      self._p = self._fn(self._p, *arrays, np.float32(k))
      jax.block_until_ready(self._p)
      seconds = time.perf_counter() - t
    self.times.append(seconds)
    return seconds

  def round(self, r: int) -> float:
    """Trains round r (its data placed first, untimed); returns its timed seconds."""
    t = time.perf_counter()
    arrays, k = self._resident(r)
    self.host.append(time.perf_counter() - t)
    return self._run(arrays, k)

  def result(self) -> dict:
    import numpy as np
    out = _median_result(self.times, self.k, len(self.times), self.first)
    out.update(devices=self.nd, block_size=self.block, clients_per_device=self.per_device,
               tuning={str(b): v for b, v in self.tries.items()},
               untimed_host_seconds=float(np.median(self.host)),
               timed="device work only (data resident before the timer starts), sum of the "
                     "per-device partials, server step")
    if self.small_contractions:
      out["small_contractions"] = self.small_contractions
    return out


def _grid(args) -> list[dict]:
  cells = [(m, k, False) for m in MODELS for k in GRID_K]
  cells += [(m, 10_000, True) for m in MODELS]
  results = []
  for model, k, het in cells:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
      path = f.name
    cmd = [sys.executable, __file__, "--model", model, "--clients-per-round", str(k),
           "--rounds", str(args.rounds if k < 1_000_000 else 3), "--out", path,
           "--block-size", str(args.block_size), "--cpu-devices", args.cpu_devices,
           "--loop-max-k", str(args.loop_max_k), "--reference-rounds", str(args.reference_rounds),
           "--ref-blocks", args.ref_blocks, "--matmul-n", str(args.matmul_n),
           "--copy-mib", str(args.copy_mib), "--data-placement", args.data_placement]
    if het:
      cmd.append("--heterogeneous")
    print(f"# running {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
      results.append({"model": model, "clients_per_round": k, "heterogeneous": het,
                      "error": proc.stderr[-2000:]})
    else:
      with open(path) as f:
        results.extend(json.load(f)["results"])
    os.remove(path)
  return results


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", choices=MODELS)
  p.add_argument("--clients-per-round", type=int)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--heterogeneous", action="store_true",
                 help="log-normal client sizes (median 32, max 1024); reports padding efficiency "
                      "with and without bucketing and the equal-size run with the same examples")
  p.add_argument("--block-size", type=int, default=64)
  p.add_argument("--cpu-devices", default="auto",
                 help="XLA host devices on CPU (default: one per core)")
  p.add_argument("--no-references", action="store_true")
  p.add_argument("--loop-max-k", type=int, default=100_000,
                 help="skip the Python-loop reference above this K (it is slow)")
  p.add_argument("--reference-rounds", type=int, default=3,
                 help="rounds of the loop, jit_vmap and one-device references (the sharded "
                      "scans run as many rounds as the engine, interleaved with it)")
  p.add_argument("--ref-blocks", default=",".join(map(str, REF_BLOCKS)),
                 help="block sizes the scan references try (plus one block of all the "
                      "device's clients when that is no larger)")
  p.add_argument("--matmul-n", type=int, default=MATMUL_N, help="side of the ceiling's matmul")
  p.add_argument("--copy-mib", type=float, default=COPY_MIB, help="MiB of the ceiling's copy")
  p.add_argument("--data-placement", choices=("auto", "device", "host"), default="auto",
                 help="the engine's training data on the devices or streamed (auto: by memory)")
  p.add_argument("--out")
  args = p.parse_args()

  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    n = os.cpu_count() if args.cpu_devices == "auto" else int(args.cpu_devices)
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
  blocks = tuple(int(b) for b in args.ref_blocks.split(","))

  if args.model is None and args.clients_per_round is None:
    results = _grid(args)
  else:
    models = [args.model] if args.model else list(MODELS)
    k = args.clients_per_round or 10_000
    results = []
    for m in models:
      if args.heterogeneous:
        het = heterogeneous_cell(m, k, args.rounds, block_size=args.block_size,
                                 placement=args.data_placement)
        results.append(het)
      else:
        results.append(run_cell(m, k, args.rounds, heterogeneous=False,
                                block_size=args.block_size, references=not args.no_references,
                                loop_max_k=args.loop_max_k, ref_rounds=args.reference_rounds,
                                ref_blocks=blocks, placement=args.data_placement))
  # The machine's ceilings, measured in this process after the cells (in the grid, each cell's
  # own process measured its own, reported with the cell).
  ceil = ceilings(args.matmul_n, args.copy_mib)
  for cell in results:
    if "engine" in cell and "ceilings" not in cell:
      cell["ceilings"] = ceil
      for part in (cell["engine"], *cell.get("references", {}).values()):
        if "gflops" in part:
          part["fraction_of_measured_matmul"] = part["gflops"] / ceil["matmul_gflops"]
  emit({"benchmark": "throughput", "workload": "W1", "machine": machine(), "ceilings": ceil,
        "results": results}, args.out)


if __name__ == "__main__":
  main()
