"""A seed sweep run as one sweep against the same members run as separate `fedjax-sim run`s.

For each case, in the same run on the same machine:

  sweep      one `fedjax-sim run SWEEP.yaml` (a `sweep:` section with N seeds): one
             process, the members one after another (runner/sweep.py, mode loop)
  vmap       the same sweep with `sweep.mode: vmap`: one process, the members' rounds
             as one compiled program over a member axis (core/members.py)
  separate   N `fedjax-sim run BASE.yaml --set seed=S --set output_dir=...`, one after
             another, each its own process (as a user would run them)

Every arm starts from its own empty compile cache (`--cache cold`, the default:
the first run of each arm compiles, later ones find its programs on disk), or
both from one cache filled by an untimed run of the base config first
(`--cache warm`). Wall times are measured around the processes, Python's start
included. Every member's metrics are compared between the arms (both sweeps must
reproduce the separate runs).

Cases:
  small    dispatch-bound rounds: 200 clients of 16 examples, MLP 16-16-4, 20 clients
           per round (a few ms of compute per round)
  compute  compute-bound rounds: 4,000 clients of 64 examples, MLP 64-512-10, 1,000
           clients per round (about 15 GFLOP a round)

  python experiments/benchmarks/sweep.py --out docs/results/sweep.json
  python experiments/benchmarks/sweep.py --members 2 --rounds 2 --cases small   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import yaml

from report import COPY_MIB, MATMUL_N, ceilings, emit, machine  # next to this script

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CASES = {
    "small": {
        "data": {"kind": "gaussian_mixture", "num_clients": 200, "examples_per_client": 16,
                 "num_features": 16, "num_classes": 4},
        "model": {"kind": "mlp", "hidden": [16]},
        "sampling": {"clients_per_round": 20},
    },
    "compute": {
        "data": {"kind": "gaussian_mixture", "num_clients": 4000, "examples_per_client": 64,
                 "num_features": 64, "num_classes": 10},
        "model": {"kind": "mlp", "hidden": [512]},
        "sampling": {"clients_per_round": 1000},
    },
}

# Wall-clock fields of metrics.jsonl; every other field must agree between the arms.
TIMING = ("round_seconds", "clients_per_second", "examples_per_second", "eval_seconds")


def _cli() -> list[str]:
  script = os.path.join(os.path.dirname(sys.executable), "fedjax-sim")
  return [script] if os.path.exists(script) else [sys.executable, "-m", "fedjax_sim.runner.cli"]


def _run(args: list[str]) -> float:
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the CLI splits the CPU itself, as for a user
  t = time.perf_counter()
  proc = subprocess.run(_cli() + args, capture_output=True, text=True, cwd=REPO, env=env)
  seconds = time.perf_counter() - t
  if proc.returncode != 0:
    raise RuntimeError(f"fedjax-sim {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
  return seconds


def _metrics(folder: str) -> list[dict]:
  with open(os.path.join(folder, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in f if line.strip()]


def _max_relative_difference(a: list[dict], b: list[dict]) -> float:
  if [r["round"] for r in a] != [r["round"] for r in b] or any(set(x) != set(y)
                                                               for x, y in zip(a, b)):
    return float("inf")
  worst = 0.0
  for x, y in zip(a, b):
    for k in x:
      scale = max(abs(x[k]), abs(y[k]), 1e-12)
      worst = max(worst, abs(x[k] - y[k]) / scale)
  return worst


def run_case(name: str, members: int, rounds: int, cache: str, work: str) -> dict:
  base = {"rounds": rounds, "progress": False, **CASES[name],
          "eval": {"every": max(1, rounds // 2)}, "checkpoint": {"every": max(1, rounds // 2)}}
  seeds = list(range(members))
  folder = os.path.join(work, name)
  os.makedirs(folder)
  base_path, sweep_path = os.path.join(folder, "base.yaml"), os.path.join(folder, "sweep.yaml")
  vmap_path = os.path.join(folder, "vmap.yaml")
  with open(base_path, "w") as f:
    yaml.safe_dump({**base, "output_dir": os.path.join(folder, "separate", "warmup")}, f)
  for path, arm, mode in ((sweep_path, "sweep", "loop"), (vmap_path, "vmap", "vmap")):
    with open(path, "w") as f:
      yaml.safe_dump({**base, "output_dir": os.path.join(folder, arm),
                      "sweep": {"seeds": seeds, "mode": mode}}, f)
  caches = {arm: os.path.join(folder, f"xla_{arm}") for arm in ("sweep", "vmap", "separate")}
  if cache == "warm":  # one cache for both arms, filled by an untimed run
    caches = {arm: os.path.join(folder, "xla") for arm in caches}
    _run(["run", base_path, "--compile-cache", caches["sweep"], "--no-progress"])

  load = {"before": os.getloadavg()[0]}  # other work on the machine skews both arms
  sweep_seconds = _run(["run", sweep_path, "--compile-cache", caches["sweep"], "--no-progress"])
  load["after_sweep"] = os.getloadavg()[0]
  vmap_seconds = _run(["run", vmap_path, "--compile-cache", caches["vmap"], "--no-progress"])
  load["after_vmap"] = os.getloadavg()[0]
  separate_seconds = []
  for s in seeds:
    out = os.path.join(folder, "separate", f"seed={s}")
    separate_seconds.append(_run(["run", base_path, "--set", f"seed={s}", "--set",
                                  f"output_dir={out}", "--compile-cache", caches["separate"],
                                  "--no-progress"]))

  load["after_separate"] = os.getloadavg()[0]
  with open(os.path.join(folder, "sweep", "sweep.json")) as f:
    gathered = json.load(f)
  differences, vmap_differences = ([_max_relative_difference(
      _metrics(os.path.join(folder, arm, "members", f"seed={s}")),
      _metrics(os.path.join(folder, "separate", f"seed={s}"))) for s in seeds]
      for arm in ("sweep", "vmap"))
  with open(os.path.join(folder, "vmap", "sweep.json")) as f:
    vmapped = json.load(f)
  with open(os.path.join(folder, "vmap", "members", f"seed={seeds[0]}", "metrics.jsonl")) as f:
    lockstep = sorted(json.loads(line)["round_seconds"] for line in f if line.strip())[1:] or [0.0]
  vmap_summary = json.load(open(os.path.join(folder, "vmap", "members", f"seed={seeds[0]}",
                                             "summary.json")))
  summaries = [json.load(open(os.path.join(folder, "separate", f"seed={s}", "summary.json")))
               for s in seeds]
  in_sweep = [r["seconds_in_this_sweep"] for r in gathered["results"]]
  # Steady-state round time (rounds after each run's first, which compiles): how much of a run
  # is compute, as against start-up and compilation.
  steady = []
  for s in seeds:
    with open(os.path.join(folder, "separate", f"seed={s}", "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    steady += [r["round_seconds"] for r in rows[1:] or rows]
  steady.sort()
  return {
      "case": name, "config": base, "members": members, "seeds": seeds,
      "sweep": {"wall_seconds": sweep_seconds, "mode": gathered["mode"],
                "mode_reason": gathered["mode_reason"],
                "member_seconds": in_sweep,
                "first_member_seconds": in_sweep[0],
                "later_member_seconds_mean": (sum(in_sweep[1:]) / (members - 1)
                                              if members > 1 else None),
                "sharing_groups": len(gathered["sharing"]["groups"])},
      "separate": {"wall_seconds": sum(separate_seconds), "process_seconds": separate_seconds,
                   "runner_wall_seconds": [s["wall_seconds"] for s in summaries],
                   "compiled_programs": [s["compiled_programs"] for s in summaries]},
      "vmap": {"wall_seconds": vmap_seconds, "mode": vmapped["mode"],
               "mode_reason": vmapped["mode_reason"],
               "lockstep_seconds": vmapped["results"][0]["seconds_in_this_sweep"],
               # One round of all members (after the first, which compiles).
               "median_lockstep_round_seconds_after_first": lockstep[len(lockstep) // 2],
               "compile_seconds": vmap_summary["compile_seconds"],
               "members_match_separate_runs": all(d <= 1e-5 for d in vmap_differences),
               "max_relative_difference": max(vmap_differences)},
      "speedup": sum(separate_seconds) / sweep_seconds,
      "vmap_speedup": sum(separate_seconds) / vmap_seconds,
      "vmap_over_loop": sweep_seconds / vmap_seconds,
      "median_round_seconds_after_first": steady[len(steady) // 2],
      "rounds_seconds_per_member": sum(steady) / members,
      "load_average_1min": load,
      "members_match_separate_runs": all(d <= 1e-5 for d in differences),
      "max_relative_difference": max(differences),
  }


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--members", type=int, default=8, help="seeds in the sweep (default 8)")
  p.add_argument("--rounds", type=int, default=20)
  p.add_argument("--cases", default="small,compute", help="comma-separated: small, compute")
  p.add_argument("--cache", choices=("cold", "warm"), default="cold")
  p.add_argument("--keep", default=None, metavar="DIR", help="keep the runs in DIR")
  p.add_argument("--matmul-n", type=int, default=MATMUL_N)
  p.add_argument("--copy-mib", type=float, default=COPY_MIB)
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  cases = [c for c in args.cases.split(",") if c]
  unknown = sorted(set(cases) - set(CASES))
  if unknown:
    p.error(f"unknown case(s) {unknown}; known: {sorted(CASES)}")
  work = args.keep or tempfile.mkdtemp(prefix="fedjax_sim_sweep_bench_")
  os.makedirs(work, exist_ok=True)
  try:
    results = [run_case(c, args.members, args.rounds, args.cache, work) for c in cases]
  finally:
    if args.keep is None:
      shutil.rmtree(work, ignore_errors=True)
  return emit({"benchmark": "sweep", "cache": args.cache, "machine": machine(),
               "ceilings": ceilings(args.matmul_n, args.copy_mib), "results": results},
              args.out)


if __name__ == "__main__":
  main()
