"""DRIVE's bias with k randomized Hadamard blocks: E[x_hat] - x, measured over many draws.

`drive(rotation_rounds=k)` (fedjax_sim/compression/quantize.py) reconstructs
x_hat = S R^-1 sign(R x) with R = (H D_k) ... (H D_1) / sqrt(d)^k. With one
block it is biased (x = e1 + 0.5 e2 comes back as 1.25 e1 on every draw, a
bias of exactly 50 % of ||x||); with k >= 2 the bias shrinks. For each input
x, each d in --dims and each k in --rounds, --draws reconstructions (keys
split from --seed, a jitted vmap over the keys, --batch-values values per
call) give:

  mean_head           the first four coordinates of mean(x_hat) (the mean
                      reconstruction; the rest of it only enters the norms)
  bias                ||mean(x_hat) - x|| / ||x||
  bias_se             its standard error from the per-draw spread:
                      sqrt(sum_i var_i / N) / ||x||, var_i the sample variance
                      of coordinate i. With no bias, ||mean - x|| is the norm
                      of the noise alone and comes out about 1 bias_se
                      (||noise||^2 / se^2 has mean 1 and is at least as
                      concentrated as chi^2 with one degree of freedom)
  resolved            bias > 3 bias_se: a bias the draws tell from noise
                      (P < 0.3 % per cell when there is none)
  bias_excess         sqrt(max(0, bias^2 - bias_se^2)): the bias with the
                      noise's expected contribution removed
  nmse                mean over draws of ||x_hat - x||^2 / ||x||^2
  inner_product_max_rel_dev
                      max over draws of |<x_hat, x> - ||x||^2| / ||x||^2,
                      zero up to float32 rounding for every rotation (so
                      any bias is orthogonal to x)

Inputs, all of length d (a power of two, so nothing is padded): the
two-coordinate vectors (1, 0.5) = e1 + 0.5 e2, (-2, 0.3) and (1, 0.1) on the
first two coordinates, and three fixed standard-normal vectors
(numpy default_rng(seed).normal(size=d), seeds 1, 2, 3).

The default --draws (2^19 = 524,288 per cell, 54 cells) runs in about 2
minutes on 2 CPU cores (144 s measured, the cores shared with a test run);
the standard error is then about sqrt(0.57 / N) = 0.10 % of ||x||, so a
bias is resolved above about 0.3 % of ||x||. Where every draw is the same
(one block on the two-coordinate inputs) the standard error is float32
rounding, 1e-10 or 0, and bias_over_se is huge or null.

  python experiments/benchmarks/drive_bias.py --out docs/results/drive_bias.json
  python experiments/benchmarks/drive_bias.py --draws 4096   # a few seconds
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from report import emit, machine  # experiments/benchmarks/report.py, next to this script

SPARSE = {"e1+0.5e2": (1.0, 0.5), "(-2, 0.3)": (-2.0, 0.3), "(1, 0.1)": (1.0, 0.1)}
GAUSSIAN_SEEDS = (1, 2, 3)
HEAD = 4  # coordinates of the mean reconstruction recorded


def inputs(d: int) -> dict:
  import numpy as np
  out = {}
  for name, values in SPARSE.items():
    x = np.zeros(d, np.float32)
    x[:len(values)] = values
    out[name] = x
  for seed in GAUSSIAN_SEEDS:
    out[f"gaussian{seed}"] = np.random.default_rng(seed).normal(size=d).astype(np.float32)
  return out


def _batch_stats(compressor):
  """A jitted function of (x, keys): per-batch sums over the draws, reduced on the device."""
  import jax
  import jax.numpy as jnp

  def stats(x, keys):
    x_hat = jax.vmap(compressor.encode, (None, 0))(x, keys)  # [B, d]
    x2 = jnp.sum(jnp.square(x))
    mean = jnp.mean(x_hat, axis=0)
    m2 = jnp.sum(jnp.square(x_hat - mean), axis=0)  # per coordinate, about the batch mean
    nmse = jnp.sum(jnp.square(x_hat - x), axis=1) / x2
    along = jnp.max(jnp.abs(x_hat @ x - x2)) / x2
    return mean, m2, jnp.sum(nmse), along

  return jax.jit(stats)


def measure(fn, x, draws: int, batch: int, key) -> dict:
  """Mean, bias and its standard error of `draws` reconstructions of x, `batch` at a time.

  Per-coordinate means and variances are merged across batches in float64
  (Chan et al.'s pairwise update), so N can be large without float32 sums.
  """
  import jax
  import numpy as np
  xs = jax.numpy.asarray(x)
  n, mean, m2, nmse_sum, along = 0, np.zeros(x.shape[0]), np.zeros(x.shape[0]), 0.0, 0.0
  for b in range(-(-draws // batch)):
    keys = jax.random.split(jax.random.fold_in(key, b), batch)
    bm, bm2, bnmse, balong = (np.asarray(v, np.float64) for v in fn(xs, keys))
    delta = bm - mean
    total = n + batch
    mean = mean + delta * batch / total
    m2 = m2 + bm2 + delta ** 2 * n * batch / total
    n = total
    nmse_sum += float(bnmse)
    along = max(along, float(balong))
  xd = x.astype(np.float64)
  norm = float(np.linalg.norm(xd))
  bias = float(np.linalg.norm(mean - xd)) / norm
  se = float(np.sqrt(np.sum(m2 / (n - 1)) / n)) / norm
  return {"draws": n, "norm_x": norm, "mean_head": mean[:HEAD].tolist(),
          "x_head": xd[:HEAD].tolist(), "bias": bias, "bias_se": se,
          "bias_over_se": bias / se if se > 0 else None, "resolved": bool(bias > 3 * se),
          "bias_excess": float(np.sqrt(max(0.0, bias ** 2 - se ** 2))),
          "nmse": nmse_sum / n, "inner_product_max_rel_dev": along}


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--draws", type=int, default=1 << 19,
                  help="reconstructions per cell (rounded up to whole batches); the default "
                       "runs in about 2 minutes on 2 CPU cores")
  ap.add_argument("--dims", default="64,256,1024", help="vector lengths (powers of two)")
  ap.add_argument("--rounds", default="1,2,3", help="Hadamard blocks k, comma-separated")
  ap.add_argument("--batch-values", type=int, default=1 << 20,
                  help="draws x d per jitted call (the batch is at most --draws)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", help="also write the JSON here (atomically)")
  args = ap.parse_args(argv)
  dims = [int(v) for v in args.dims.split(",")]
  rounds = [int(v) for v in args.rounds.split(",")]
  if any(d & (d - 1) or d < 2 for d in dims):
    ap.error(f"--dims must be powers of two >= 2; got {args.dims}")

  import jax

  from fedjax_sim.compression import drive
  start = time.perf_counter()
  records = []
  for d in dims:
    batch = max(1, min(args.draws, args.batch_values // d))
    xs = inputs(d)
    for k in rounds:
      compressor = drive(rotation_rounds=k)
      fn = _batch_stats(compressor)
      for i, (name, x) in enumerate(xs.items()):
        t = time.perf_counter()
        key = jax.random.fold_in(jax.random.key(args.seed), (d * 16 + k) * 64 + i)
        rec = {"input": name, "d": d, "k": k, "compressor": compressor.name, "batch": batch,
               **measure(fn, x, args.draws, batch, key)}
        rec["seconds"] = time.perf_counter() - t
        records.append(rec)
        print(f"d={d} k={k} {name:>9}: bias {100 * rec['bias']:.4f} % "
              f"+- {100 * rec['bias_se']:.4f} % ({'resolved' if rec['resolved'] else 'not'}), "
              f"nmse {rec['nmse']:.4f}, {rec['seconds']:.1f} s", file=sys.stderr, flush=True)
  result = {"benchmark": "drive_bias", "draws_requested": args.draws, "dims": dims,
            "rounds": rounds, "seed": args.seed, "records": records,
            "seconds": time.perf_counter() - start, "machine": machine()}
  return emit(result, args.out)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  main()
