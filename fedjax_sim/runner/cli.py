"""`fedjax-sim`: run or validate an experiment config.

    fedjax-sim run CONFIG.yaml [--set key=value ...] [--overwrite | --resume OUTDIR]
                   [--distributed coordinator=HOST:PORT,num_processes=N,process_id=I]
    fedjax-sim validate CONFIG.yaml [--set key=value ...]
    fedjax-sim components [SECTION] [--import MODULE ...]
"""

from __future__ import annotations

import argparse
import shlex
import sys


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="fedjax-sim", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)
  c = sub.add_parser("components", help="list the registered components and their config keys")
  c.add_argument("section", nargs="?", default=None,
                 help="algorithm, data, model, sampling, privacy or compression (default: all)")
  c.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                 help="import a module that registers components of its own first")
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
      s.add_argument("--distributed", metavar="SPEC", default=None,
                     help="run as one of several processes on jax.distributed: "
                          "coordinator=HOST:PORT,num_processes=N,process_id=I "
                          "[,local_device_ids=0;1], or 'auto' (JAX's environment variables "
                          "or cluster detection, e.g. SLURM); every process runs the same "
                          "command, process 0 writes the outputs")
      s.add_argument("--compile-cache", metavar="DIR", default=None,
                     help="folder of JAX's persistent compilation cache, or 'off' (default: "
                          "$FEDJAX_SIM_COMPILE_CACHE, else ~/.cache/fedjax_sim/xla)")
  return p


def describe_components(section: str | None = None) -> str:
  """Every registered component of `section` (or of all), with its keys, types and defaults."""
  import dataclasses
  import typing

  from fedjax_sim.core.registry import FAMILIES
  from fedjax_sim.core.schema import ConfigError, to_plain, type_name
  families = FAMILIES if section is None else {section: FAMILIES.get(section)}
  if None in families.values():
    raise ConfigError(f"No component section {section!r}; use one of {', '.join(FAMILIES)}.")
  lines = []
  for family in families.values():
    lines.append(f"{family.section}.{family.selector}:")
    for name in family.names():
      component = family.get(name)
      lines.append(f"  {name}: {component.doc}")
      hints = typing.get_type_hints(component.config)
      for f in dataclasses.fields(component.config):
        default = (f.default if f.default is not dataclasses.MISSING else
                   f.default_factory() if f.default_factory is not dataclasses.MISSING else "")
        note = f.metadata.get("help", "")
        default = to_plain(default)
        if isinstance(default, dict):  # an optimizer section, as YAML writes it
          default = "{" + ", ".join(f"{k}: {v}" for k, v in default.items()) + "}"
        else:
          default = repr(default)
        lines.append(f"      {f.name}: {type_name(hints[f.name])} = {default}"
                     + (f"  ({note})" if note else ""))
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  if args.command == "components":
    import importlib

    from fedjax_sim.runner import config as _registers_every_package  # noqa: F401
    from fedjax_sim.core.schema import ConfigError
    try:
      for module in args.imports:
        importlib.import_module(module)
      print(describe_components(args.section))
    except (ConfigError, ImportError) as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    return 0
  if args.command == "run":
    from fedjax_sim.runner.devices import use_cpu_devices  # before JAX starts its backends
    try:
      use_cpu_devices(args.cpu_devices)
    except ValueError as e:
      print(f"error: --cpu-devices: {e}", file=sys.stderr)
      return 2
    if args.distributed is not None:
      from fedjax_sim.core.distributed import DistributedError, initialize
      try:
        initialize(args.distributed)
      except DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
  # Imported here so that the device flags above are in place before JAX starts.
  from fedjax_sim.runner.config import ConfigError, load_config, sweep_members
  from fedjax_sim.core.data import DataError
  from fedjax_sim.runner.checkpoint import CheckpointError
  from fedjax_sim.core.distributed import DistributedError
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
      members = f" (a sweep of {len(sweep_members(config))} members)" if config.sweep.active else ""
      print(f"{args.config}: valid{members}")
      return 0
    if args.no_progress:
      import dataclasses
      config = dataclasses.replace(config, progress=False)
    if config.sweep.active:  # every member, in this process (runner/sweep.py)
      from fedjax_sim.runner.sweep import run_sweep
      run_sweep(config, overwrite=args.overwrite, resume=bool(args.resume),
                compile_cache=args.compile_cache)
      return 0
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
  except (ConfigError, DataError, RunError, CheckpointError, DistributedError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
