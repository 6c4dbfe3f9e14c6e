"""Round throughput of the engine against two references, measured in one run.

Workload W1: non-IID Gaussian-mixture data, 32 examples x 64 float32 features
per client, 10 classes; logistic regression or MLP 64-128-10 (ReLU); FedAvg,
1 local epoch, batch 8, client SGD lr 0.1, server SGD lr 1.0.

For each cohort size K it reports the median seconds per round (the first,
compiling round excluded), clients/s, examples/s, useful GFLOP/s and the
fraction of the machine's FMA ceiling, and peak resident memory; and, in the
same process and on the same data, two references:

  loop      a Python loop over clients calling one jitted per-client update
            (slices of the packed arrays, deltas summed on device);
  jit_vmap  a hand-written `jit(vmap(client_update))` over the whole round,
            after gathering the round's data into one [K, 32, 64] array.

Both references and the engine do the same arithmetic (same batches, no
shuffling) and include their host-side gathering in the timed round.

  python experiments/benchmarks/throughput.py --model logreg --clients-per-round 10000 --rounds 5
  python experiments/benchmarks/throughput.py --heterogeneous --model mlp --clients-per-round 10000
  python experiments/benchmarks/throughput.py --out results.json     # the whole grid

The grid runs every cell in a fresh subprocess so each peak-memory figure is
its own. Prints JSON (and writes it to --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

GRID_K = (100, 1_000, 10_000, 100_000, 1_000_000)
MODELS = ("logreg", "mlp")
EXAMPLES, FEATURES, CLASSES, BATCH, LR = 32, 64, 10, 8, 0.1
FMA_CEILING_GFLOPS = 157.0  # 2 cores x fp32 FMA peak of the reference machine (issue #2)


def _flops_per_example(model: str) -> float:
  """Useful FLOPs of one forward + backward pass (no gradient w.r.t. the input)."""
  if model == "logreg":
    return 2 * (2 * FEATURES * CLASSES)
  dense = FEATURES * 128 + 128 * CLASSES
  return 2 * (2 * dense) + 2 * 128 * CLASSES


def _peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _matmul_gflops() -> float:
  import jax
  import jax.numpy as jnp
  a = jnp.ones((2048, 2048), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  t = time.perf_counter()
  for _ in range(5):
    out = f(a)
  out.block_until_ready()
  return 5 * 2 * 2048**3 / (time.perf_counter() - t) / 1e9


def run_cell(model_name: str, k: int, rounds: int, *, heterogeneous: bool, block_size: int,
             references: bool, loop_max_k: int, ref_rounds: int, bucket: bool = True) -> dict:
  import jax
  import numpy as np
  import optax

  import fedjax_sim as fs
  from fedjax_sim.datasets import gaussian_mixture, lognormal_sizes

  population = max(k, 1_000)
  t0 = time.perf_counter()
  sizes = None
  if heterogeneous:
    sizes = lognormal_sizes(population, median=EXAMPLES, sigma=1.0, max_size=1024, seed=0)
  data = gaussian_mixture(population, EXAMPLES, FEATURES, CLASSES, seed=0, sizes=sizes)
  gen_seconds = time.perf_counter() - t0
  model = (fs.logistic_regression((FEATURES,), CLASSES) if model_name == "logreg"
           else fs.mlp((FEATURES,), CLASSES, hidden=(128,)))
  local = fs.LocalConfig(batch_size=BATCH, epochs=1, shuffle=False)
  alg = fs.fedavg(model, optax.sgd(LR), optax.sgd(1.0), local)
  sampler = lambda r: fs.sample_uniform(fs.round_rng(0, r), population, k)
  engine = fs.Engine(alg, data, fs.weighted_mean(), sampler, seed=0,
                     config=fs.EngineConfig(block_size=block_size,
                                            bucketing=bucket))
  params = model.init(jax.random.key(0))
  state = engine.init(params)
  times, effs, examples = [], [], []
  for res in engine.rounds(state, 0, rounds):
    times.append(res.metrics["round_seconds"])
    effs.append(res.metrics["padding_efficiency"])
    examples.append(res.metrics["examples"])
  steady = times[1:] or times
  sec = float(np.median(steady))
  flops_client = _flops_per_example(model_name) * float(np.mean(examples)) / k
  out = {
      "model": model_name, "clients_per_round": k, "population": population,
      "heterogeneous": heterogeneous, "bucketing": bucket, "rounds": rounds,
      "block_size": block_size, "devices": jax.device_count(),
      "data_generation_seconds": gen_seconds,
      "engine": {
          "first_round_seconds": times[0],
          "median_round_seconds": sec,
          "clients_per_second": k / sec,
          "examples_per_second": float(np.mean(examples)) / sec,
          "gflops": k / sec * flops_client / 1e9,
          "fraction_of_fma_ceiling": k / sec * flops_client / 1e9 / FMA_CEILING_GFLOPS,
          "padding_efficiency": float(np.mean(effs)),
          "compiled_programs": engine.traces,
          "peak_rss_gib": _peak_rss_gib(),
      },
  }
  if heterogeneous:
    return out
  if references:
    x, y = data.features["x"], data.features["y"]
    out["references"] = {}
    if k <= loop_max_k:
      out["references"]["loop"] = _loop_reference(model, params, x, y, data, sampler, ref_rounds)
    else:
      out["references"]["loop"] = {"skipped": f"K > --loop-max-k {loop_max_k}"}
    need = k * EXAMPLES * (FEATURES + 1) * 4 / 2**30
    if need < 4.0:
      out["references"]["jit_vmap"] = _vmap_reference(model, params, x, y, data, sampler,
                                                       ref_rounds)
    else:
      out["references"]["jit_vmap"] = {
          "skipped": f"needs a second {need:.1f} GiB copy of the round's data"}
    best = max((r["clients_per_second"] for r in out["references"].values()
                if "clients_per_second" in r), default=None)
    if best:
      out["speedup_vs_best_reference"] = out["engine"]["clients_per_second"] / best
  out["matmul_gflops_measured"] = _matmul_gflops()
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


def _loop_reference(model, params, x, y, data, sampler, rounds):
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  update = jax.jit(_client_update_fn(model, optax, jax, jnp))
  add = jax.jit(lambda acc, d: jax.tree.map(jnp.add, acc, d))
  times = []
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
  sec = float(np.median(times[1:] or times))
  return {"median_round_seconds": sec, "clients_per_second": len(ids) / sec, "rounds": rounds}


def _vmap_reference(model, params, x, y, data, sampler, rounds):
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  update = _client_update_fn(model, optax, jax, jnp)

  @jax.jit
  def round_fn(params, xs, ys):
    deltas = jax.vmap(update, (None, 0, 0))(params, xs, ys)
    return jax.tree.map(lambda p, d: p + d.mean(0), params, deltas)

  times = []
  for r in range(rounds):
    ids = sampler(r)
    t = time.perf_counter()
    index = (data.starts[ids][:, None] + np.arange(EXAMPLES)[None, :]).reshape(-1)
    xs = x[index].reshape(len(ids), EXAMPLES, FEATURES)
    ys = y[index].reshape(len(ids), EXAMPLES)
    params = round_fn(params, xs, ys)
    jax.block_until_ready(params)
    times.append(time.perf_counter() - t)
  sec = float(np.median(times[1:] or times))
  return {"median_round_seconds": sec, "clients_per_second": len(ids) / sec, "rounds": rounds}


def _machine() -> dict:
  import jax
  return {"platform": platform.platform(), "processor": platform.processor(),
          "cpu_count": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()]}


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
           "--loop-max-k", str(args.loop_max_k)]
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
  p.add_argument("--reference-rounds", type=int, default=3)
  p.add_argument("--out")
  args = p.parse_args()

  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    n = os.cpu_count() if args.cpu_devices == "auto" else int(args.cpu_devices)
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()

  if args.model is None and args.clients_per_round is None:
    results = _grid(args)
  else:
    models = [args.model] if args.model else list(MODELS)
    k = args.clients_per_round or 10_000
    results = []
    for m in models:
      if args.heterogeneous:
        het = run_cell(m, k, args.rounds, heterogeneous=True, block_size=args.block_size,
                       references=False, loop_max_k=0, ref_rounds=0)
        flat = run_cell(m, k, args.rounds, heterogeneous=True, block_size=args.block_size,
                        references=False, loop_max_k=0, ref_rounds=0, bucket=False)
        # Equal-size workload with the same total examples per round.
        equal = run_cell(m, k, args.rounds, heterogeneous=False, block_size=args.block_size,
                         references=False, loop_max_k=0, ref_rounds=0)
        ex_ratio = het["engine"]["examples_per_second"] / equal["engine"]["examples_per_second"]
        het["without_bucketing"] = {
            "padding_efficiency": flat["engine"]["padding_efficiency"],
            "examples_per_second": flat["engine"]["examples_per_second"]}
        het["equal_size_examples_per_second"] = equal["engine"]["examples_per_second"]
        het["examples_per_second_vs_equal_size"] = ex_ratio
        results.append(het)
      else:
        results.append(run_cell(m, k, args.rounds, heterogeneous=False,
                                block_size=args.block_size, references=not args.no_references,
                                loop_max_k=args.loop_max_k, ref_rounds=args.reference_rounds))
  report = {"benchmark": "throughput", "workload": "W1", "machine": _machine(),
            "fma_ceiling_gflops": FMA_CEILING_GFLOPS, "results": results}
  text = json.dumps(report, indent=2)
  print(text)
  if args.out:
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
      f.write(text + "\n")
    os.replace(tmp, args.out)


if __name__ == "__main__":
  main()
