"""FedAvg with compressed uploads: accuracy against the total bits clients upload.

Workload W1 of the engine benchmark: a non-IID Gaussian mixture (label skew
0.3), 32 examples of 64 features per client, 10 classes, MLP 64-128-10
(9,610 parameters), FedAvg with 1 local epoch of batch-8 SGD (lr 0.1) and
server lr 1; 10,000 clients, 1,000 per round, evaluated every 10 rounds on
the held-out quarter of 2,000 clients' data.

Each setting is one ordinary run (a `compression:` section in its config):
no compression (32 bits per coordinate); stochastic quantization at 8, 4 and
2 bits (per vector min/max, and 2-bit after a random Hadamard rotation);
QSGD with 16 levels; DRIVE (1 bit after rotation); top-1 % and top-10 % with
error feedback; EF-signSGD (scaled sign with error feedback).

  python experiments/reproduce/compression_convergence.py              # about 2 min on 2 cores
  python experiments/reproduce/compression_convergence.py --rounds 10 --only none,q8

Writes OUT/accuracy_vs_bits.png, OUT/results.md and OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

SETTINGS = {
    "none": {"method": "none"},
    "q8": {"method": "quantize", "bits": 8},
    "q4": {"method": "quantize", "bits": 4},
    "q2": {"method": "quantize", "bits": 2},
    "q2_rotated": {"method": "quantize", "bits": 2, "rotation": True},
    "qsgd16": {"method": "qsgd", "levels": 16},
    "drive": {"method": "drive"},
    "top10%_ef": {"method": "top_k", "fraction": 0.1, "error_feedback": True},
    "top1%_ef": {"method": "top_k", "fraction": 0.01, "error_feedback": True},
    "ef_sign": {"method": "sign", "error_feedback": True},
}


def _config(name: str, args, out: str) -> dict:
  return {
      "seed": args.seed, "rounds": args.rounds, "output_dir": out, "progress": False,
      "data": {"kind": "gaussian_mixture", "num_clients": args.clients, "examples_per_client": 32,
               "num_features": 64, "num_classes": 10, "label_skew": 0.3, "test_fraction": 0.25},
      "model": {"kind": "mlp", "hidden": [128]},
      "algorithm": {"name": "fedavg", "batch_size": 8,
                    "client_optimizer": {"name": "sgd", "learning_rate": 0.1}},
      "sampling": {"scheme": "uniform", "clients_per_round": args.clients_per_round},
      "eval": {"every": args.eval_every, "max_clients": 2000},
      "checkpoint": {"every": 0, "keep": 1},
      "compression": SETTINGS[name],
  }


def run_setting(name: str, args) -> dict:
  from fedjax_sim.runner.config import config_from_dict
  from fedjax_sim.runner.io import read_metrics
  from fedjax_sim.runner.run import run_experiment
  out = os.path.join(args.out, "runs", name)
  summary = run_experiment(config_from_dict(_config(name, args, out)), overwrite=True,
                           log=lambda *a, **k: None)
  records = read_metrics(os.path.join(out, "metrics.jsonl"))
  curve = [(r["round"], r["total_bits"], r["eval_accuracy"]) for r in records
           if "eval_accuracy" in r]
  return {"setting": name, "bits_per_client": records[-1]["bits_per_client"],
          "total_bits": records[-1]["total_bits"], "accuracy": summary["final_eval"]["eval_accuracy"],
          "curve": curve, "seconds": summary["wall_seconds"]}


def _plot(results: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for r in results:
    _, bits, acc = zip(*r["curve"])
    ax.plot(bits, acc, "o-", ms=3, label=f"{r['setting']} ({r['bits_per_coordinate']:.2f} b/coord)")
  ax.set_xscale("log")
  ax.set_xlabel("total bits uploaded by all clients")
  ax.set_ylabel("eval accuracy")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  from fedjax_sim.runner.io import atomic_write
  atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
  plt.close(fig)


def _table(results: list[dict], args) -> str:
  base = next((r["accuracy"] for r in results if r["setting"] == "none"), None)
  lines = [f"W1 MLP, {args.clients} clients, {args.clients_per_round} per round, {args.rounds} "
           "rounds.", "", "| setting | bits/coordinate | total bits | final accuracy | vs none (pp) |",
           "|---|---|---|---|---|"]
  for r in results:
    gap = "" if base is None else f"{100 * (r['accuracy'] - base):+.2f}"
    lines.append(f"| {r['setting']} | {r['bits_per_coordinate']:.3f} | {r['total_bits']:.3e} | "
                 f"{r['accuracy']:.4f} | {gap} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--clients", type=int, default=10_000)
  p.add_argument("--clients-per-round", type=int, default=1_000)
  p.add_argument("--rounds", type=int, default=60)
  p.add_argument("--eval-every", type=int, default=10)
  p.add_argument("--only", help="comma-separated settings (default: all)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="runs/compression_convergence")
  args = p.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  names = args.only.split(",") if args.only else list(SETTINGS)
  unknown = [n for n in names if n not in SETTINGS]
  if unknown:
    p.error(f"unknown settings {unknown}; choose from {', '.join(SETTINGS)}")
  params = 64 * 128 + 128 + 128 * 10 + 10
  results = []
  for name in names:
    r = run_setting(name, args)
    r["bits_per_coordinate"] = r["bits_per_client"] / params
    results.append(r)
    print(json.dumps({k: v for k, v in r.items() if k != "curve"}), flush=True)
  from fedjax_sim.runner.io import atomic_write_json, atomic_write_text
  _plot(results, os.path.join(args.out, "accuracy_vs_bits.png"))
  atomic_write_text(os.path.join(args.out, "results.md"), _table(results, args))
  atomic_write_json(os.path.join(args.out, "results.json"), results)
  print(_table(results, args))
  return results


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  main()
