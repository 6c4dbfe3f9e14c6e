"""Reproduces the synthetic-data experiments of FedProx (Li et al., MLSys 2020).

"Federated Optimization in Heterogeneous Networks", Figure 1 (and Figure 2's
IID panel): training loss of FedAvg and FedProx on Synthetic(0,0),
Synthetic(0.5,0.5), Synthetic(1,1) and Synthetic-IID, with 0 %, 50 % and 90 %
stragglers.

Settings, each checked against the paper (Sec. 5.1 and Appendix C.2-C.3) and
the reference code (github.com/litian96/FedProx, flearn/trainers/fedprox.py
and the synthetic generators):
  * 30 devices per dataset (reference generators: NUM_USER = 30); each
    device's data is split at random 80 % train / 20 % test (Appendix C.1).
  * Model: multinomial logistic regression, 60 features -> 10 classes.
  * 10 devices per round, uniformly without replacement (select_clients).
  * 20 local epochs, batch size 10, local SGD with learning rate 0.01
    (Appendix C.3: "learning rate 0.01" for synthetic data), 200 rounds.
  * Stragglers: the given fraction of the selected devices runs a number of
    epochs drawn from randint(1, 20), i.e. 1..19 (reference code); FedAvg
    drops them, FedProx keeps their partial work.
  * Methods: FedAvg (drop stragglers), FedProx with mu = 0 and with mu = 1
    (Figure 1's mu for the synthetic data). Server aggregation: average
    weighted by the number of training examples (reference `aggregate`).
  * Metric: the global model's loss on all devices' training data, weighted by
    example count (reference `train_error_and_loss`), and test accuracy.
Stragglers and sampling depend only on (seed, round), so the three methods see
the same devices and the same stragglers in every round, as in the
reference code (np.random.seed(round)).

  python experiments/reproduce/fedprox_synthetic.py                 # the full grid, about 32 min on 2 cores
  python experiments/reproduce/fedprox_synthetic.py --rounds 20 --datasets 0.5,0.5

Writes OUT/training_loss.png, OUT/results.md and OUT/results.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

DATASETS = {"0,0": (0.0, 0.0, False), "0.5,0.5": (0.5, 0.5, False), "1,1": (1.0, 1.0, False),
            "iid": (0.0, 0.0, True)}
STRAGGLERS = (0.0, 0.5, 0.9)
METHODS = ("FedAvg", "FedProx (mu=0)", "FedProx (mu=1)")


def run_setting(data_key: str, stragglers: float, method: str, rounds: int, seed: int,
                eval_every: int, epochs: int = 20) -> dict:
  import jax
  import numpy as np
  import optax

  import fedjax_sim as fs
  from fedjax_sim.algorithms import fedavg, fedprox
  from fedjax_sim.core.heterogeneity import SystemConfig
  from fedjax_sim.datasets import leaf_synthetic

  alpha, beta, iid = DATASETS[data_key]
  data = leaf_synthetic(alpha, beta, 30, seed=seed, iid=iid).shuffle_within_clients(seed)
  train, test = data.split_examples(0.2)
  model = fs.logistic_regression((60,), 10)
  local = fs.LocalConfig(batch_size=10, epochs=epochs, shuffle=True)
  client_opt, server_opt = optax.sgd(0.01), optax.sgd(1.0)
  if method == "FedAvg":
    alg, policy = fedavg(model, client_opt, server_opt, local), "drop"
  else:
    mu = 0.0 if "mu=0" in method else 1.0
    alg, policy = fedprox(model, client_opt, server_opt, local, mu=mu), "partial"
  system = SystemConfig(straggler_fraction=stragglers, straggler_policy=policy,
                        straggler_work="epochs")
  sampler = lambda r: fs.sample_uniform(fs.round_rng(seed, r), train.num_clients, 10)
  engine = fs.Engine(alg, train, fs.weighted_mean(), sampler, seed=seed, system=system,
                     config=fs.EngineConfig(block_size=8))
  eval_key = fs.run_key(seed, fs.Purpose.EVAL)
  on_train = fs.Evaluator(model, train, mesh=engine.mesh, key=eval_key)
  on_test = fs.Evaluator(model, test, mesh=engine.mesh, key=eval_key)
  state = engine.init(model.init(fs.run_key(seed, fs.Purpose.INIT)))
  curve = {"round": [0], "train_loss": [on_train(state.server.params)["eval_loss"]],
           "test_accuracy": [on_test(state.server.params)["eval_accuracy"]]}
  for res in engine.rounds(state, 0, rounds):
    state = res.state
    r = res.round_num + 1
    if r % eval_every == 0 or r == rounds:
      curve["round"].append(r)
      curve["train_loss"].append(on_train(state.server.params)["eval_loss"])
      curve["test_accuracy"].append(on_test(state.server.params)["eval_accuracy"])
  curve["final_train_loss"] = curve["train_loss"][-1]
  curve["final_test_accuracy"] = curve["test_accuracy"][-1]
  curve["diverged"] = bool(not np.isfinite(curve["final_train_loss"]))
  return curve


def _plot(results: dict, datasets, stragglers, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(len(stragglers), len(datasets), squeeze=False,
                           figsize=(4 * len(datasets), 3.2 * len(stragglers)))
  colors = {"FedAvg": "tab:green", "FedProx (mu=0)": "tab:blue", "FedProx (mu=1)": "tab:red"}
  for i, s in enumerate(stragglers):
    for j, d in enumerate(datasets):
      ax = axes[i][j]
      for m in METHODS:
        c = results[f"{d}|{s}|{m}"]
        ax.plot(c["round"], c["train_loss"], label=m, color=colors[m])
      name = "Synthetic-IID" if d == "iid" else f"Synthetic({d})"
      ax.set_title(f"{name}, {int(s * 100)}% stragglers", fontsize=9)
      ax.set_xlabel("round")
      ax.set_ylabel("training loss")
      ax.grid(alpha=0.3)
      top = max(max(results[f"{d}|{s}|{m}"]["train_loss"][:3]) for m in METHODS)
      ax.set_ylim(0, min(top * 1.5, 6))
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  from fedjax_sim.runner.io import atomic_write
  atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))


def _table(results: dict, datasets, stragglers) -> str:
  lines = ["| dataset | stragglers | method | final training loss | test accuracy |",
           "| --- | ---: | --- | ---: | ---: |"]
  for d in datasets:
    for s in stragglers:
      for m in METHODS:
        c = results[f"{d}|{s}|{m}"]
        name = "Synthetic-IID" if d == "iid" else f"Synthetic({d})"
        lines.append(f"| {name} | {int(s * 100)}% | {m} | {c['final_train_loss']:.4f} | "
                     f"{c['final_test_accuracy']:.4f} |")
  return "\n".join(lines) + "\n"


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--rounds", type=int, default=200)
  p.add_argument("--datasets", default="0,0;0.5,0.5;1,1;iid",
                 help="semicolon-separated: 0,0 0.5,0.5 1,1 iid")
  p.add_argument("--stragglers", default="0,0.5,0.9")
  p.add_argument("--eval-every", type=int, default=2)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--local-epochs", type=int, default=20,
                 help="local epochs E (the paper's: 20; fewer only for a quick check)")
  p.add_argument("--out", default="runs/fedprox_synthetic")
  args = p.parse_args()
  datasets = [d.strip() for d in args.datasets.split(";") if d.strip()]
  for d in datasets:
    if d not in DATASETS:
      sys.exit(f"error: unknown dataset {d!r}; choose from {', '.join(DATASETS)}.")
  stragglers = [float(s) for s in args.stragglers.split(",")]
  if any(not 0 <= s < 1 for s in stragglers):
    sys.exit("error: --stragglers must be fractions in [0, 1).")
  os.makedirs(args.out, exist_ok=True)
  results = {}
  for d in datasets:
    for s in stragglers:
      for m in METHODS:
        t = time.perf_counter()
        results[f"{d}|{s}|{m}"] = run_setting(d, s, m, args.rounds, args.seed, args.eval_every,
                                                 args.local_epochs)
        c = results[f"{d}|{s}|{m}"]
        print(f"{d:8s} stragglers={s:.1f} {m:15s} loss={c['final_train_loss']:.4f} "
              f"acc={c['final_test_accuracy']:.4f} ({time.perf_counter() - t:.1f}s)", flush=True)
  from fedjax_sim.runner.io import atomic_write_json, atomic_write_text
  atomic_write_json(os.path.join(args.out, "results.json"), {"settings": vars(args), "results": results})
  atomic_write_text(os.path.join(args.out, "results.md"), _table(results, datasets, stragglers))
  _plot(results, datasets, stragglers, os.path.join(args.out, "training_loss.png"))
  print(f"wrote {args.out}/training_loss.png, results.md, results.json")


if __name__ == "__main__":
  main()
