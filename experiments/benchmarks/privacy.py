"""The cost of differential privacy per round, as ratios to the non-private round, in one run.

Workload W1 (as in throughput.py): non-IID Gaussian mixture, 32 examples x 64
features per client, 10 classes, MLP 64-128-10, FedAvg with 1 local epoch of
batch-8 SGD (lr 0.1), server SGD lr 1.0; every cohort drawn uniformly.

User-level mechanisms (an aggregation stage each; the clients' work is
unchanged), with K clients per round (default 10,000):

  plain         weighted mean (the baseline)
  dp_fedavg     clip each update, sum, Gaussian noise, fixed denominator
  dp_adaptive   the same with adaptive clipping (the noisy quantile count)
  dp_ftrl       clip, sum, tree-aggregated noise (about 2 node draws a round)

Example-level: local DP-SGD (per-example gradients by vmap, per-example
clipping, noise every step) against plain local SGD, at --dpsgd-clients
clients per round.

Each variant runs --rounds rounds; the median of the rounds after the first
(compiling) one is its time. Variants alternate round-robin in the same
process, so drifts of the machine hit all of them alike.

  python experiments/benchmarks/privacy.py --out privacy.json
  python experiments/benchmarks/privacy.py --quick      # K = 1,000, a few rounds
"""

from __future__ import annotations

import argparse
import os
import sys

from report import emit, machine  # experiments/benchmarks/report.py, next to this script

EXAMPLES, FEATURES, CLASSES, BATCH, LR = 32, 64, 10, 8, 0.1


def _engines(k: int, population: int, variants: dict, local_dp: tuple | None = None):
  import optax

  import fedjax_sim as fs
  from fedjax_sim.datasets import gaussian_mixture

  data = gaussian_mixture(population, EXAMPLES, FEATURES, CLASSES, seed=0)
  model = fs.mlp((FEATURES,), CLASSES, hidden=(128,))
  out = {}
  for name, make in variants.items():
    dp = local_dp if name == "local_dp_sgd" else (None, 0.0)
    local = fs.LocalConfig(batch_size=BATCH, epochs=1, shuffle=False, dp_clip_norm=dp[0],
                           dp_noise_multiplier=dp[1])
    alg = fs.fedavg(model, optax.sgd(LR), optax.sgd(1.0), local, weighting="uniform")
    sampler = lambda r: fs.sample_uniform(fs.round_rng(0, r), population, k)
    out[name] = fs.Engine(alg, data, make(), sampler, seed=0)
  return model, out


def _race(model, engines: dict, rounds: int) -> dict:
  """Round-robin over the engines, one round each at a time; median seconds per round."""
  import jax
  import numpy as np
  params = model.init(jax.random.key(0))
  iters = {n: e.rounds(e.init(params), 0, rounds) for n, e in engines.items()}
  times = {n: [] for n in engines}
  for _ in range(rounds):
    for name, it in iters.items():
      res = next(it)
      times[name].append(res.metrics["round_seconds"])
  return {n: {"first_round_seconds": t[0], "median_round_seconds": float(np.median(t[1:] or t)),
              "rounds": rounds} for n, t in times.items()}


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--clients-per-round", type=int, default=10_000)
  ap.add_argument("--dpsgd-clients", type=int, default=1_000)
  ap.add_argument("--rounds", type=int, default=6)
  ap.add_argument("--quick", action="store_true", help="K = 1,000 and 200, 4 rounds")
  ap.add_argument("--out", help="also write the JSON here")
  args = ap.parse_args(argv)
  if args.quick:
    args.clients_per_round, args.dpsgd_clients, args.rounds = 1_000, 200, 4
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:  # one XLA device per core, as the CLI
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={os.cpu_count()}"


  import fedjax_sim as fs
  from fedjax_sim.privacy import gaussian_sum, tree_sum

  k = args.clients_per_round
  user_level = {
      "plain": fs.weighted_mean,
      "dp_fedavg": lambda: gaussian_sum(0.5, 1.0, float(k)),
      "dp_adaptive": lambda: gaussian_sum(0.5, 1.0, float(k), target_quantile=0.5),
      "dp_ftrl": lambda: tree_sum(0.5, 1.0, float(k), restart_every=None),
  }
  model, engines = _engines(k, k, user_level)
  user = _race(model, engines, args.rounds)
  base = user["plain"]["median_round_seconds"]
  for name, r in user.items():
    r["ratio_to_plain"] = r["median_round_seconds"] / base
  del engines

  kd = args.dpsgd_clients
  model, engines = _engines(kd, kd, {"plain_local_sgd": fs.weighted_mean,
                                     "local_dp_sgd": fs.weighted_mean}, local_dp=(1.0, 1.0))
  local = _race(model, engines, args.rounds)
  local["local_dp_sgd"]["ratio_to_plain"] = (local["local_dp_sgd"]["median_round_seconds"]
                                            / local["plain_local_sgd"]["median_round_seconds"])
  result = {
      "benchmark": "privacy", "workload": "W1 MLP 64-128-10, 32 examples/client, batch 8",
      "user_level": {"clients_per_round": k, "variants": user},
      "example_level": {"clients_per_round": kd, "variants": local},
      "machine": machine(),
  }
  return emit(result, args.out)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  main()
