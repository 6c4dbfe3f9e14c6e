"""`fedjax-sim`: run or validate an experiment config.

    fedjax-sim run CONFIG.yaml [--set key=value ...] [--overwrite | --resume OUTDIR]
    fedjax-sim validate CONFIG.yaml [--set key=value ...]
"""

from __future__ import annotations

import argparse
import shlex
import sys


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="fedjax-sim", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)
  for name, help_text in (("run", "run an experiment"), ("validate", "check a config only")):
    s = sub.add_parser(name, help=help_text)
    s.add_argument("config", help="YAML config file")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set rounds=3 --set sampling.rate=0.01")
    if name == "run":
      s.add_argument("--overwrite", action="store_true",
                     help="replace a previous run in the same output_dir")
      s.add_argument("--resume", metavar="OUTDIR",
                     help="continue the run in OUTDIR from its latest checkpoint")
      s.add_argument("--cpu-devices", default="auto", metavar="N",
                     help="on CPU, split the host into N devices (default: one per core)")
      s.add_argument("--no-progress", action="store_true", help="no progress bar")
      s.add_argument("--compile-cache", metavar="DIR", default=None,
                     help="folder of JAX's persistent compilation cache, or 'off' (default: "
                          "$FEDJAX_SIM_COMPILE_CACHE, else ~/.cache/fedjax_sim/xla)")
  return p


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  if args.command == "run":
    if args.cpu_devices != "auto" and not args.cpu_devices.isdigit():
      print(f"error: --cpu-devices must be 'auto' or a positive integer, got {args.cpu_devices!r}",
            file=sys.stderr)
      return 2
    from fedjax_sim.runner.devices import use_cpu_devices  # before JAX starts its backends
    use_cpu_devices(args.cpu_devices)
  # Imported here so that the device flags above are in place before JAX starts.
  from fedjax_sim.runner.config import ConfigError, load_config
  from fedjax_sim.core.data import DataError
  from fedjax_sim.runner.checkpoint import CheckpointError
  from fedjax_sim.runner.run import Interrupted, RunError, run_experiment

  try:
    overrides = list(args.overrides)
    if getattr(args, "resume", None):
      if args.overwrite:
        print("error: --resume and --overwrite exclude each other.", file=sys.stderr)
        return 2
      overrides.append(f"output_dir={args.resume}")
    config = load_config(args.config, overrides)
    if args.command == "validate":
      print(f"{args.config}: valid")
      return 0
    if args.no_progress:
      import dataclasses
      config = dataclasses.replace(config, progress=False)
    run_experiment(config, overwrite=args.overwrite, resume=bool(args.resume),
                   compile_cache=args.compile_cache)
  except Interrupted as e:
    sets = "".join(f" --set {shlex.quote(o)}" for o in args.overrides)
    print(f"fedjax_sim: {e}\nContinue it with:\n  fedjax-sim run {shlex.quote(args.config)}"
          f"{sets} --resume {shlex.quote(e.output_dir)}", file=sys.stderr)
    return 128 + e.signal_number  # the shell convention for "stopped by this signal"
  except KeyboardInterrupt:
    print("fedjax_sim: stopped at once (second signal); metrics.jsonl and the checkpoints "
          "written so far are intact.", file=sys.stderr)
    return 130
  except (ConfigError, DataError, RunError, CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
