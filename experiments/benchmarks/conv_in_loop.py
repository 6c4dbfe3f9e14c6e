"""Convolution gradients inside a loop on XLA:CPU: `lax.conv_general_dilated` against ours.

Local training runs its steps in a loop. This measures, in one process on the
same devices, eight SGD steps of the EMNIST CNN (Reddi et al. 2021, dropout
off) on batches of 20 28x28 images, run three ways for each convolution:

  python_loop   a Python loop calling one jitted step eight times;
  scan          one jitted `lax.scan` over the eight steps (the shape of the
                engine's local training);

and, for one 3x3 32 -> 64 convolution on 20 images of 26x26, the weight
gradient alone, eight times, the same two ways. `lax` is
`lax.conv_general_dilated` (JAX's gradients), `ours` is
`fedjax_sim.models.conv.conv_general_dilated` (both gradients written as
canonical convolutions). Best of --reps timed calls after a compiling one.

  python experiments/benchmarks/conv_in_loop.py --out docs/results/conv_in_loop.json
"""

from __future__ import annotations

import argparse
import sys
import time

from report import emit, machine  # next to this script

STEPS, BATCH = 8, 20


def _best(fn, *args, reps: int) -> float:
  import jax
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return best


def run(reps: int) -> dict:
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from jax import lax

  from fedjax_sim.models import conv as ours

  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.random((STEPS, BATCH, 28, 28, 1), dtype=np.float32))
  labels = jnp.asarray(rng.integers(0, 62, (STEPS, BATCH)).astype(np.int32))
  out = {}
  for name, conv in (("lax", lax.conv_general_dilated), ("ours", ours.conv_general_dilated)):

    class Net(nn.Module):
      @nn.compact
      def __call__(self, x):
        x = nn.relu(nn.Conv(32, (3, 3), padding="VALID", conv_general_dilated=conv)(x))
        x = nn.relu(nn.Conv(64, (3, 3), padding="VALID", conv_general_dilated=conv)(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2)).reshape((x.shape[0], -1))
        return nn.Dense(62)(nn.relu(nn.Dense(128)(x)))

    net = Net()
    params = net.init(jax.random.key(0), images[0])

    def step(p, batch):
      def loss(q):
        logits = net.apply(q, batch[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()
      return jax.tree.map(lambda a, g: a - 0.01 * g, p, jax.grad(loss)(p)), None

    one = jax.jit(lambda p, x, y: step(p, (x, y))[0])

    def python_loop(p):
      for t in range(STEPS):
        p = one(p, images[t], labels[t])
      return p

    scan = jax.jit(lambda p, xs, ys: lax.scan(step, p, (xs, ys))[0])
    x = jnp.asarray(rng.random((STEPS, BATCH, 26, 26, 32), dtype=np.float32))
    w = jnp.asarray(rng.random((3, 3, 32, 64), dtype=np.float32))
    weight_grad = jax.grad(lambda w, x: jnp.sum(conv(x, w, (1, 1), "VALID", dimension_numbers=(
        "NHWC", "HWIO", "NHWC")) ** 2))
    grad_one = jax.jit(weight_grad)
    grad_scan = jax.jit(lambda w, xs: lax.scan(lambda c, xb: (c, weight_grad(w, xb)), 0, xs)[1])
    res = {"training_python_loop_seconds": _best(python_loop, params, reps=reps),
           "training_scan_seconds": _best(scan, params, images, labels, reps=reps),
           "weight_grad_python_loop_seconds": _best(
               lambda w: [grad_one(w, x[t]) for t in range(STEPS)][-1], w, reps=reps),
           "weight_grad_scan_seconds": _best(grad_scan, w, x, reps=reps)}
    res["training_scan_over_loop"] = (res["training_scan_seconds"]
                                      / res["training_python_loop_seconds"])
    res["weight_grad_scan_over_loop"] = (res["weight_grad_scan_seconds"]
                                         / res["weight_grad_python_loop_seconds"])
    out[name] = res
  out["ours_speedup_in_scan"] = (out["lax"]["training_scan_seconds"]
                                 / out["ours"]["training_scan_seconds"])
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  emit({"benchmark": "conv_in_loop", "command": " ".join(["python"] + sys.argv),
        "machine": machine(), "steps": STEPS, "batch": BATCH, "results": run(args.reps)},
       args.out)


if __name__ == "__main__":
  main()
