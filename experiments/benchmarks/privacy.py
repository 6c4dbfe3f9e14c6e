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

With --configs BASELINE TREATMENT it measures instead what a whole experiment
config costs against another (e.g. quickstart.yaml and dp_fedavg.yaml): it
lists every resolved setting in which they differ (output_dir aside), then
runs, one after the other in this process, the baseline, the ablation (the
treatment with its privacy: and compression: sections removed, i.e. only its
other differences; skipped when there are none) and the treatment, and
reports each run's times, final and best evaluation accuracy and epsilon, with
ratios to the baseline and to the ablation (the cost of the mechanism alone).

  python experiments/benchmarks/privacy.py --configs experiments/configs/quickstart.yaml \
      experiments/configs/dp_fedavg.yaml --out dp_config_cost.json
"""

from __future__ import annotations

import argparse
import os
import sys

from report import COPY_MIB, MATMUL_N, ceilings, emit, machine  # next to this script

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


def _run_summary(c, summary: dict) -> dict:
  import numpy as np

  from fedjax_sim.runner.io import read_metrics
  records = read_metrics(os.path.join(c.output_dir, "metrics.jsonl"))
  seconds = [r["round_seconds"] for r in records]
  out = {"rounds": len(records), "wall_seconds": summary["wall_seconds"],
         "setup_seconds": summary["setup_seconds"], "train_seconds": summary["train_seconds"],
         "first_round_seconds": seconds[0],
         "median_round_seconds": float(np.median(seconds[1:] or seconds)),
         "train_seconds_after_first_round": float(np.sum(seconds[1:])),
         "mean_participating_clients": float(np.mean([r["participating_clients"]
                                                      for r in records])),
         "eval_accuracy": summary["final_eval"].get("eval_accuracy"),
         "eval_loss": summary["final_eval"].get("eval_loss"),
         "best_eval_accuracy": summary["best_eval_accuracy"]}
  if "privacy" in summary:
    out.update(epsilon=summary["privacy"]["epsilon"], delta=summary["privacy"]["delta"],
               noise_multiplier=summary["privacy"]["noise_multiplier"])
    if "dp_clip_norm" in records[-1]:
      out["final_clip_norm"] = records[-1]["dp_clip_norm"]
  return out


def compare_configs(baseline: str, treatment: str, overrides: list[str], runs_dir: str) -> dict:
  """Runs two configs (and the ablation between them) and reports what the treatment costs."""
  import dataclasses

  from fedjax_sim.runner.config import (config_differences, config_from_dict, load_config,
                                       to_dict)
  from fedjax_sim.runner.run import run_experiment

  base = load_config(baseline, overrides)
  treat = load_config(treatment, overrides)
  diffs = [{"key": k, "baseline": a, "treatment": b} for k, a, b in
           config_differences(to_dict(base), to_dict(treat)) if k != "output_dir"]
  tested = ("privacy", "compression")
  other = [d for d in diffs if d["key"].split(".")[0] not in tested]
  runs = {"baseline": base}
  if other:
    raw = to_dict(treat)
    for section in tested:
      raw.pop(section, None)
    runs["ablation"] = config_from_dict(raw)
  runs["treatment"] = treat
  log = lambda *a: print(*a, file=sys.stderr, flush=True)
  results = {}
  for name, c in runs.items():
    c = dataclasses.replace(c, output_dir=os.path.join(runs_dir, name), progress=False)
    log(f"# privacy.py --configs: running the {name}")
    results[name] = _run_summary(c, run_experiment(c, overwrite=True, log=log))
  for name, r in results.items():
    for ref in ("baseline", "ablation"):
      if ref in results and ref != name:
        b = results[ref]
        r[f"median_round_seconds_ratio_to_{ref}"] = (r["median_round_seconds"]
                                                    / b["median_round_seconds"])
        r[f"train_seconds_ratio_to_{ref}"] = r["train_seconds"] / b["train_seconds"]
        if b["train_seconds_after_first_round"] > 0:
          r[f"train_seconds_after_first_round_ratio_to_{ref}"] = (
              r["train_seconds_after_first_round"] / b["train_seconds_after_first_round"])
        if r["eval_accuracy"] is not None and b["eval_accuracy"] is not None:
          r[f"eval_accuracy_change_vs_{ref}"] = r["eval_accuracy"] - b["eval_accuracy"]
  return {"benchmark": "config_cost", "baseline_config": baseline, "treatment_config": treatment,
          "overrides": list(overrides), "differences": diffs,
          "non_tested_differences": [d["key"] for d in other],
          "ablation": ("the treatment with its privacy: and compression: sections removed"
                       if other else None),
          "runs": results}


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--clients-per-round", type=int, default=10_000)
  ap.add_argument("--dpsgd-clients", type=int, default=1_000)
  ap.add_argument("--rounds", type=int, default=6)
  ap.add_argument("--quick", action="store_true", help="K = 1,000 and 200, 4 rounds")
  ap.add_argument("--configs", nargs=2, metavar=("BASELINE", "TREATMENT"),
                  help="compare two experiment configs instead (see the module docstring)")
  ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                  help="with --configs: an override applied to both configs")
  ap.add_argument("--runs-dir", default="runs/config_cost",
                  help="with --configs: where the runs' folders go (replaced)")
  ap.add_argument("--matmul-n", type=int, default=MATMUL_N, help="side of the ceiling's matmul")
  ap.add_argument("--copy-mib", type=float, default=COPY_MIB, help="MiB of the ceiling's copy")
  ap.add_argument("--out", help="also write the JSON here")
  args = ap.parse_args(argv)
  if args.quick:
    args.clients_per_round, args.dpsgd_clients, args.rounds = 1_000, 200, 4
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:  # one XLA device per core, as the CLI
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={os.cpu_count()}"

  if args.configs:
    result = compare_configs(*args.configs, args.overrides, args.runs_dir)
    result.update(machine=machine(), ceilings=ceilings(args.matmul_n, args.copy_mib))
    return emit(result, args.out)

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
      "machine": machine(), "ceilings": ceilings(args.matmul_n, args.copy_mib),
  }
  return emit(result, args.out)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  main()
