"""Round throughput on the benchmark shapes: the engine against a per-client loop and hand-written programs.

`--task emnist` (default): 3,400 clients (federated EMNIST's writers),
28x28x1 float32 images, 62 classes; client sizes log-normal with federated
EMNIST's mean, 197.5 training examples per writer (TFF: 671,585 examples
over 3,400 writers), and LEAF's relative spread (FEMNIST: mean 226.83,
standard deviation 88.94, LEAF paper Table 1, a coefficient of variation of
0.392), at least 2 examples (TFF drops writers with fewer). Model: the CNN of
Reddi et al. 2021 (`emnist_cnn`: conv 3x3 32, conv 3x3 64, max-pool, dense
128, dense 62), its dropout rates set to 0 so that every program below does
exactly the same arithmetic (the first round's models are compared). Batch
20, client SGD learning rate 0.01.

`--task shakespeare`: 715 clients (TFF's speakers), next-character rows of
80 tokens over 90 ids, 22.5 rows per client on average (TFF: 16,068
training snippets, about one 80-character row each) with LEAF's Shakespeare
spread (mean 3,743, standard deviation 6,212 characters per speaker: a
coefficient of variation of 1.66), at least 1; the character LSTM of Reddi
et al. (`char_lstm`: embedding 8, two LSTMs of 256); batch 4; tokens/s is
reported too (80 per row).

Both: FedAvg, one local epoch, no shuffling, example-weighted mean, server
SGD learning rate 1.

For each cohort size K the script reports, measured in one process on the
same devices and data, seconds per round (the median over the timed rounds;
the first round, which compiles, is reported apart), examples/s, clients/s
and the peak resident memory of the process so far (run one K per process
for a figure of its own), for:

  engine           the simulator (`Engine`, block size --block-size), with
                   `engine.client_loop = auto` (on CPU: clients one at a
                   time inside the compiled program, since the model has
                   convolutions);
  engine_vmap      the same engine forced to vmap a block's clients (what it
                   did before `client_loop` existed);
  loop             FedJAX's default backend's shape: a Python loop over the
                   clients and over their batches, calling one jitted
                   masked SGD step (compiled once), deltas summed on device;
  jit_vmap         a hand-written `jit(vmap(client_update))` over the whole
                   cohort, padded to the cohort's largest client; the gather
                   into one array is timed, and each round's program is
                   compiled before it is timed (its padded shape changes);
  jit_map          the same with `lax.map` over the cohort instead of vmap
                   (the tuned hand-written program for convolutions on CPU).

`speedup_vs` is the engine's seconds per round over each reference's. The
hand-written references are skipped above --ref-max-k clients (their padded
copy of the cohort grows with K). Hardware ceilings (matmul GFLOP/s) are
measured in the same run (`report.ceilings`).

  python experiments/benchmarks/emnist.py --clients-per-round 10 --out docs/results/emnist_k10.json
  python experiments/benchmarks/emnist.py --task shakespeare --clients-per-round 10 100
  python experiments/benchmarks/emnist.py --clients-per-round 10 100 1000 3400   # a GPU host

Prints JSON (and writes it to --out).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

from report import COPY_MIB, MATMUL_N, ceilings, emit, machine  # next to this script

# Per task: clients, mean and coefficient of variation of client sizes, the
# smallest size, batch size, client learning rate.
TASKS = {
    # Federated EMNIST (62 classes): 671,585 training examples over 3,400 writers
    # (TFF), LEAF's FEMNIST spread (mean 226.83, sd 88.94), batch 20 (Reddi et al.).
    "emnist": dict(clients=3400, mean=197.5, cv=88.94 / 226.83, min_size=2, batch=20, lr=0.01),
    # Shakespeare: 16,068 training snippets over 715 speakers (TFF), about one
    # 80-character row each; LEAF's Shakespeare spread (mean 3,743, sd 6,212
    # characters), batch 4 (Reddi et al.).
    "shakespeare": dict(clients=715, mean=22.5, cv=6212 / 3743, min_size=1, batch=4, lr=1.0),
}
CLASSES, SEQ, VOCAB = 62, 80, 90


def client_sizes(num_clients: int, mean: float, cv: float, min_size: int, seed: int = 0):
  """Log-normal sizes with the given mean and coefficient of variation, at least `min_size`."""
  import numpy as np
  sigma2 = np.log1p(cv ** 2)
  mu = np.log(mean) - sigma2 / 2
  rng = np.random.default_rng(seed)
  return np.maximum(min_size, np.round(rng.lognormal(mu, np.sqrt(sigma2), num_clients))
                    ).astype(np.int64)


def population(task: str, num_clients: int, mean: float, seed: int = 0):
  """EMNIST-shaped images or Shakespeare-shaped next-character rows, random content."""
  import numpy as np
  from fedjax_sim.core.data import FederatedData
  t = TASKS[task]
  sizes = client_sizes(num_clients, mean, t["cv"], t["min_size"], seed)
  rng = np.random.default_rng(seed + 1)
  n = int(sizes.sum())
  if task == "emnist":
    features = {"x": rng.random((n, 28, 28, 1), dtype=np.float32),
                "y": rng.integers(0, CLASSES, n).astype(np.int32)}
  else:
    tokens = rng.integers(1, VOCAB, (n, SEQ + 1)).astype(np.int32)
    features = {"x": tokens[:, :-1], "y": tokens[:, 1:]}
  return FederatedData.from_offsets(features, np.concatenate([[0], np.cumsum(sizes)]))


def flops_per_example(task: str) -> float:
  """Useful FLOPs of one training example (forward + backward, 2 per multiply-add).

  EMNIST CNN forward multiply-adds: conv1 26*26*32*9, conv2 24*24*64*288, dense
  9216*128 and 128*62; the backward pass costs twice the forward (weight and
  input gradients; conv1's input gradient is not needed). Shakespeare LSTM,
  per token: two LSTM layers 4*256*(8+256) and 4*256*(256+256), dense 256*90,
  times 80 tokens a row, backward again twice the forward.
  """
  if task == "emnist":
    convs = 26 * 26 * 32 * 9 + 24 * 24 * 64 * 288
    dense = 9216 * 128 + 128 * 62
    return 2 * (3 * (convs + dense) - 26 * 26 * 32 * 9)
  per_token = 4 * 256 * (8 + 256) + 4 * 256 * 512 + 256 * 90
  return 2 * 3 * per_token * SEQ


def model_for(task: str):
  from fedjax_sim.models import char_lstm, emnist_cnn
  if task == "emnist":  # dropout off: every program computes exactly the same
    return emnist_cnn((28, 28, 1), CLASSES, conv_dropout=0.0, dense_dropout=0.0)
  return char_lstm(VOCAB)


def _peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _timed(run_round, rounds: int, compiles) -> dict:
  """Times `rounds` rounds; a round that compiled a program (`compiles()` grew) is
  reported apart, and the median is over the rounds that did not."""
  import numpy as np
  steady, compiling, first = [], [], None
  for r in range(rounds):
    before = compiles()
    t = time.perf_counter()
    out = run_round(r)
    (compiling if compiles() > before else steady).append(time.perf_counter() - t)
    first = out if first is None else first
  return {"round_seconds": float(np.median(steady or compiling)),
          "steady_rounds": len(steady), "compiling_rounds": len(compiling),
          "compiling_seconds": float(np.sum(compiling)),
          "includes_compile": not steady, "_first": first}


PROGRAMS = ("engine", "engine_vmap", "loop", "jit_vmap", "jit_map")


def run(task: str, k: int, rounds: int, ref_rounds: int, block_size: int, ref_max_k: int,
        num_clients: int, mean: float, programs=PROGRAMS) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from fedjax_sim.aggregators import weighted_mean
  from fedjax_sim.algorithms import fedavg
  from fedjax_sim.core import Engine, EngineConfig, LocalConfig, round_rng, sample_uniform

  BATCH, LR = TASKS[task]["batch"], TASKS[task]["lr"]
  data = population(task, num_clients, mean)
  model = model_for(task)
  shape = data.features["x"].shape[1:]
  params0 = model.init(jax.random.key(0))
  local = LocalConfig(batch_size=BATCH, epochs=1, shuffle=False)
  sampler = lambda r: sample_uniform(round_rng(0, r), num_clients, k)
  token_factor = SEQ if task == "shakespeare" else 1
  examples = {r: int(data.sizes[sampler(r)].sum()) for r in range(max(rounds, ref_rounds))}
  results = {}

  alg = fedavg(model, optax.sgd(LR), optax.sgd(1.0), local)
  for name, loop in (("engine", "auto"), ("engine_vmap", "vmap")):
    if name not in programs and name != "engine":  # the engine always runs (the reference)
      continue
    engine = Engine(alg, data, weighted_mean(), sampler, seed=0,
                    config=EngineConfig(block_size=block_size, client_loop=loop))
    state = [engine.init(params0)]

    def engine_round(r, engine=engine, state=state):
      state[0] = next(engine.rounds(state[0], r, r + 1)).state
      jax.block_until_ready(state[0])
      return state[0].server.params

    results[name] = _timed(engine_round, rounds if name == "engine" else ref_rounds,
                           lambda engine=engine: engine.traces)
    results[name]["client_loop"] = engine.client_loop

  def loss(p, xb, yb, mb):  # the engine's objective: the mean loss over real examples
    batch = {"x": xb, "y": yb}
    per = model.loss(model.apply(p, batch, train=False, key=None), batch)
    return jnp.sum(jnp.where(mb, per, 0.0)) / jnp.maximum(jnp.sum(mb), 1)

  @jax.jit
  def sgd_step(p, xb, yb, mb):  # a batch with no real example leaves p unchanged (grad 0)
    g = jax.grad(loss)(p, xb, yb, mb)
    return jax.tree.map(lambda a, b: a - LR * b, p, g)

  x, y = data.features["x"], data.features["y"]

  def padded_batches(i, steps):
    s, n = int(data.starts[i]), int(data.sizes[i])
    xb = np.zeros((steps * BATCH,) + shape, x.dtype)
    yb = np.zeros((steps * BATCH,) + y.shape[1:], np.int32)
    xb[:n], yb[:n] = x[s:s + n], y[s:s + n]
    mb = np.arange(steps * BATCH) < n
    return (xb.reshape((steps, BATCH) + shape), yb.reshape((steps, BATCH) + y.shape[1:]),
            mb.reshape(steps, BATCH))

  add = jax.jit(lambda acc, d, w: jax.tree.map(lambda a, b: a + w * b, acc, d))

  def loop_round(r):
    ids = sampler(r)
    acc = jax.tree.map(jnp.zeros_like, params0)
    for i in ids:
      steps = -(-int(data.sizes[i]) // BATCH)
      xb, yb, mb = padded_batches(i, steps)
      p = params0
      for t in range(steps):
        p = sgd_step(p, xb[t], yb[t], mb[t])
      acc = add(acc, jax.tree.map(jnp.subtract, p, params0), float(data.sizes[i]))
    total = float(data.sizes[ids].sum())
    out = jax.tree.map(lambda p, a: p + a / total, params0, acc)
    return jax.block_until_ready(out)

  if "loop" in programs:
    results["loop"] = _timed(loop_round, ref_rounds, lambda: sgd_step._cache_size())

  def client_update(p0, xb, yb, mb):
    def step(p, batch):
      return jax.tree.map(lambda a, b: a - LR * b, p, jax.grad(loss)(p, *batch)), None
    p, _ = jax.lax.scan(step, p0, (xb, yb, mb))
    return jax.tree.map(jnp.subtract, p, p0)

  def cohort_fn(mapper):
    def fn(p0, xb, yb, mb, w):
      deltas = mapper(lambda a: client_update(p0, *a), (xb, yb, mb))
      return jax.tree.map(lambda p, d: p + jnp.tensordot(w, d, 1) / jnp.sum(w), p0, deltas)
    return jax.jit(fn)

  mappers = {"jit_vmap": lambda f, xs: jax.vmap(f)(xs), "jit_map": jax.lax.map}
  if k <= ref_max_k:
    for name, mapper in mappers.items():
      if name not in programs:
        continue
      fn = cohort_fn(mapper)

      def hand_round(r, fn=fn):
        """The gather (timed) and one call of the compiled program (compiled untimed)."""
        t = time.perf_counter()
        ids = sampler(r)
        steps = -(-int(data.sizes[ids].max()) // BATCH)
        parts = [padded_batches(i, steps) for i in ids]
        args = (params0, *(np.stack(a) for a in zip(*parts)),
                jnp.asarray(data.sizes[ids], jnp.float32))
        gather = time.perf_counter() - t
        jax.block_until_ready(fn(*args))  # compiles this round's shape if new
        t = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        return out, gather + time.perf_counter() - t

      times, first = [], None
      for r in range(ref_rounds):
        out, seconds = hand_round(r)
        times.append(seconds)
        first = out if first is None else first
      results[name] = {"round_seconds": float(np.median(times)), "steady_rounds": len(times),
                       "compiling_rounds": 0, "compiling_seconds": 0.0,
                       "includes_compile": False, "_first": first}

  reference = jax.device_get(results["engine"]["_first"])
  scale = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(reference), jax.tree.leaves(jax.device_get(params0))))
  cell = {"task": task, "clients_per_round": k, "examples_per_round_mean": float(np.mean(list(
      examples.values()))), "block_size": block_size, "peak_rss_gib": _peak_rss_gib()}
  for name, res in results.items():
    first = jax.device_get(res.pop("_first"))
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
        jax.tree.leaves(first), jax.tree.leaves(reference)))
    res["max_relative_diff_vs_engine"] = diff / max(scale, 1e-30)
    res["examples_per_second"] = cell["examples_per_round_mean"] / res["round_seconds"]
    res["clients_per_second"] = k / res["round_seconds"]
    res["useful_gflops"] = res["examples_per_second"] * flops_per_example(task) / 1e9
    if token_factor > 1:  # next-character rows: tokens/s
      res["tokens_per_second"] = res["examples_per_second"] * token_factor
    cell[name] = res
  engine_s = cell["engine"]["round_seconds"]
  cell["speedup_vs"] = {n: cell[n]["round_seconds"] / engine_s for n in results if n != "engine"}
  hand = [n for n in ("jit_vmap", "jit_map") if n in cell]
  if hand:
    best = min(hand, key=lambda n: cell[n]["round_seconds"])
    cell["best_reference"] = best
    cell["speedup_vs_best_reference"] = cell["speedup_vs"][best]
  return cell


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--task", choices=sorted(TASKS), default="emnist")
  parser.add_argument("--clients-per-round", type=int, nargs="+", default=[10, 100])
  parser.add_argument("--rounds", type=int, default=6, help="engine rounds")
  parser.add_argument("--ref-rounds", type=int, default=3, help="rounds of each reference")
  parser.add_argument("--block-size", type=int, default=16)
  parser.add_argument("--ref-max-k", type=int, default=100)
  parser.add_argument("--programs", nargs="+", choices=PROGRAMS, default=list(PROGRAMS),
                      help="which to run (the engine always runs; alone, its peak memory)")
  parser.add_argument("--num-clients", type=int, default=0, help="0: the task's (tests shrink it)")
  parser.add_argument("--mean-size", type=float, default=0, help="0: the task's (tests shrink it)")
  parser.add_argument("--matmul-n", type=int, default=MATMUL_N)
  parser.add_argument("--copy-mib", type=float, default=COPY_MIB)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  t = TASKS[args.task]
  cells = [run(args.task, k, args.rounds, args.ref_rounds, args.block_size, args.ref_max_k,
               args.num_clients or t["clients"], args.mean_size or t["mean"], args.programs)
           for k in args.clients_per_round]
  limits = ceilings(args.matmul_n, args.copy_mib)
  for cell in cells:
    for name, res in cell.items():
      if isinstance(res, dict) and "useful_gflops" in res:
        res["fraction_of_matmul_peak"] = res["useful_gflops"] / limits["matmul_gflops"]
  emit({"benchmark": f"emnist.py --task {args.task}", "command": " ".join(["python"] + sys.argv),
        "machine": machine(), "ceilings": limits, "flops_per_example": flops_per_example(args.task),
        "cells": cells}, args.out)


if __name__ == "__main__":
  main()
