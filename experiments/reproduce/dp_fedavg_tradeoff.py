"""Accuracy against epsilon for DP-FedAvg and DP-FTRL on a synthetic federated task.

Task: the non-IID Gaussian mixture (label skew 0.5), 32 features, 10 classes,
20 examples per client (a quarter held out per client for evaluation),
multinomial logistic regression; clients run 1 epoch of batch-5 SGD (lr 0.1).

  DP-FedAvg  Poisson sampling, rate q (expected m = qN clients), clip C,
             Gaussian noise z C on the sum, fixed denominator qN; server SGD,
             lr 1 (McMahan et al. 2018). Accounted with Poisson-subsampled
             Gaussians (RDP).
  DP-FTRL    shuffled epochs of m clients per round, tree-aggregated noise
             restarted every epoch, server FTRL with momentum 0.9 (SGD with
             momentum on the tree's increments; Kairouz et al. 2021).
             Accounted with dp-accounting's tree-aggregation event (RDP).

Each noise level is one run through the ordinary runner, so every point is
a real run folder with its privacy_report.json; delta = 1/N^1.1. Epsilon is
what the accountant reports after the run; accuracy is the final global
model's accuracy over the evaluation clients (example-weighted).

  python experiments/reproduce/dp_fedavg_tradeoff.py                     # about 70 s on 2 cores
  python experiments/reproduce/dp_fedavg_tradeoff.py --noise 0.5,1 --rounds 30

Writes OUT/accuracy_vs_epsilon.png, OUT/results.md and OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _config(mechanism: str, z: float | None, args, out: str) -> dict:
  raw = {
      "seed": args.seed, "rounds": args.rounds, "output_dir": out, "progress": False,
      "data": {"kind": "gaussian_mixture", "num_clients": args.clients, "examples_per_client": 20,
               "num_features": 32, "num_classes": 10, "label_skew": 0.5, "test_fraction": 0.25},
      "model": {"kind": "logreg"},
      "algorithm": {"name": "fedavg", "batch_size": 5, "weighting": "uniform",
                    "client_optimizer": {"name": "sgd", "learning_rate": 0.1}},
      "eval": {"every": 0, "max_clients": 2000},
      "checkpoint": {"every": 0, "keep": 1},
  }
  m = args.clients_per_round
  if mechanism == "dp_fedavg":
    raw["sampling"] = {"scheme": "poisson", "rate": m / args.clients}
  else:  # DP-FTRL and its non-private twin: shuffled epochs, FTRL-M server
    raw["sampling"] = {"scheme": "shuffle", "clients_per_round": m}
    raw["algorithm"].update(name="fedavgm", server_momentum=0.9,
                            server_optimizer={"learning_rate": args.ftrl_lr})
  if z is not None:
    raw["privacy"] = {"mechanism": mechanism, "clip_norm": args.clip, "noise_multiplier": z}
  return raw


def run_point(mechanism: str, z: float | None, args) -> dict:
  from fedjax_sim.runner.config import config_from_dict
  from fedjax_sim.runner.run import run_experiment
  name = f"{mechanism}_z{z}" if z is not None else f"{mechanism}_nonprivate"
  out = os.path.join(args.out, "runs", name)
  summary = run_experiment(config_from_dict(_config(mechanism, z, args, out)), overwrite=True,
                           log=lambda *a, **k: None)
  privacy = summary.get("privacy") or {}
  return {"mechanism": mechanism, "noise_multiplier": z,
          "epsilon": privacy.get("epsilon", float("inf")), "delta": privacy.get("delta"),
          "accuracy": summary["final_eval"]["eval_accuracy"], "run": out,
          "seconds": summary["wall_seconds"]}


def _plot(points: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  colors = {"dp_fedavg": "tab:blue", "dp_ftrl": "tab:orange"}
  labels = {"dp_fedavg": "DP-FedAvg (Poisson)", "dp_ftrl": "DP-FTRL (shuffled epochs)"}
  for mech, color in colors.items():
    private = sorted((p for p in points if p["mechanism"] == mech and p["noise_multiplier"]),
                     key=lambda p: p["epsilon"])
    ax.plot([p["epsilon"] for p in private], [p["accuracy"] for p in private], "o-",
            color=color, label=labels[mech])
    for p in private:
      ax.annotate(f"z={p['noise_multiplier']:g}", (p["epsilon"], p["accuracy"]), fontsize=7,
                  textcoords="offset points", xytext=(3, -9))
    base = [p for p in points if p["mechanism"] == mech and p["noise_multiplier"] is None]
    if base:
      ax.axhline(base[0]["accuracy"], color=color, ls="--", lw=1,
                 label=f"{labels[mech].split(' (')[0]} without DP")
  ax.set_xscale("log")
  ax.set_xlabel("epsilon (RDP accountant)")
  ax.set_ylabel("final eval accuracy")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  from fedjax_sim.runner.io import atomic_write
  atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
  plt.close(fig)


def _table(points: list[dict], args) -> str:
  lines = [f"N = {args.clients} clients, {args.clients_per_round} per round (expected), "
           f"{args.rounds} rounds, clip C = {args.clip}, delta = 1/N^1.1.", "",
           "| mechanism | noise multiplier | epsilon | accuracy |", "|---|---|---|---|"]
  for p in points:
    z = "none" if p["noise_multiplier"] is None else f"{p['noise_multiplier']:g}"
    eps = "inf" if p["noise_multiplier"] is None else f"{p['epsilon']:.3g}"
    lines.append(f"| {p['mechanism']} | {z} | {eps} | {p['accuracy']:.4f} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--clients", type=int, default=5000)
  p.add_argument("--clients-per-round", type=int, default=100)
  p.add_argument("--rounds", type=int, default=100)
  p.add_argument("--noise", default="0.5,1,2,4,8,16", help="noise multipliers, comma-separated")
  p.add_argument("--clip", type=float, default=0.5)
  p.add_argument("--ftrl-lr", type=float, default=0.2, help="DP-FTRL server learning rate")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="runs/dp_tradeoff")
  args = p.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  noise = [float(z) for z in args.noise.split(",")]
  points = []
  for mech in ("dp_fedavg", "dp_ftrl"):
    for z in [None, *noise]:
      points.append(run_point(mech, z, args))
      print(json.dumps(points[-1]), flush=True)
  from fedjax_sim.runner.io import atomic_write_json, atomic_write_text
  _plot(points, os.path.join(args.out, "accuracy_vs_epsilon.png"))
  atomic_write_text(os.path.join(args.out, "results.md"), _table(points, args))
  atomic_write_json(os.path.join(args.out, "results.json"), points)
  print(_table(points, args))
  return points


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  main()
