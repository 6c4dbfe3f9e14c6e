"""A stateful algorithm at scale: SCAFFOLD's per-client control variates for a large population.

Default: W1 data (32 examples x 64 features per client), MLP 64-128-10, 100,000 clients in
the population, 10,000 per round, 4 rounds. Prints JSON: seconds per round (the first
compiles), clients/s after the first round, the per-client store's size, peak RSS, and the
machine with its float32 matmul and copy ceilings measured in the same process (report.py).

  python experiments/benchmarks/stateful_scale.py [--clients 100000] [--per-round 10000]
"""

from __future__ import annotations

import argparse
import os
import resource

from report import COPY_MIB, MATMUL_N, ceilings, emit, machine  # next to this script


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--clients", type=int, default=100_000)
  p.add_argument("--per-round", type=int, default=10_000)
  p.add_argument("--rounds", type=int, default=4)
  p.add_argument("--matmul-n", type=int, default=MATMUL_N, help="side of the ceiling's matmul")
  p.add_argument("--copy-mib", type=float, default=COPY_MIB, help="MiB of the ceiling's copy")
  p.add_argument("--out")
  args = p.parse_args()
  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={os.cpu_count()}")
  import jax
  import numpy as np

  import fedjax_sim as fs
  from fedjax_sim.algorithms import scaffold
  from fedjax_sim.datasets import gaussian_mixture

  n, k = args.clients, args.per_round
  data = gaussian_mixture(n, 32, 64, 10, seed=0)
  model = fs.mlp((64,), 10)
  alg = scaffold(model, 0.1, fs.LocalConfig(batch_size=8, epochs=1, shuffle=False), n)
  engine = fs.Engine(alg, data, fs.weighted_mean(),
                     lambda r: fs.sample_uniform(fs.round_rng(0, r), n, k), seed=0)
  state = engine.init(model.init(jax.random.key(0)))
  seconds = []
  for result in engine.rounds(state, 0, args.rounds):
    seconds.append(result.metrics["round_seconds"])
    state = result.state
  report = {
      "algorithm": "scaffold", "population": n, "clients_per_round": k,
      "devices": jax.device_count(), "round_seconds": seconds,
      "clients_per_second": k / float(np.median(seconds[1:] or seconds)),
      "store_gib": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.clients)) / 2**30,
      "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
      "final_train_loss": result.metrics["train_loss"],
      "machine": machine(), "ceilings": ceilings(args.matmul_n, args.copy_mib),
  }
  emit(report, args.out)


if __name__ == "__main__":
  main()
