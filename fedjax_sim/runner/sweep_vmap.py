"""A sweep's `vmap` mode: the members' runs in lockstep, their rounds one compiled program.

Every member is still a run of its own: a `run.RunSession` per member builds
its experiment (population, model, engine, evaluator, privacy plan), writes
its folder (metrics.jsonl, evaluations, checkpoints, privacy report,
telemetry, summary.json, convergence.png) through the runner's own code, and
evaluates on its own schedule. Only the training rounds are shared:
`core/members.MemberRounds` runs round r of every member as one program
vmapped over the member axis, the members' differing hyperparameters
entering it as traced values (`_builder` calls the algorithm's registered
factory inside the traced function, the grid's keys replaced by the
member's scalars, and likewise the central DP stage's factory with the
member's clip norm and noise multiplier).

Eligibility (`config_reason` from the configs, then `prepare` once the
members are built). Members may differ in:

- their seed;
- float keys of the `algorithm` section (client and server learning rates,
  FedProx's mu, momentum, ...) whose factory takes them as values (a probe
  traces the factories, one client update and the server step with abstract
  scalars, so a key a factory uses as a Python number is refused, naming it);
- `privacy.clip_norm`, `privacy.noise_multiplier` and
  `privacy.target_epsilon` with the central mechanisms (`dp_fedavg`, with or
  without adaptive clipping, and `dp_ftrl`): each member's plan resolves its
  noise multiplier on the host (given, calibrated for its target epsilon, or
  the one a resumed member started with) and keeps its own accounting and
  report; the two scalars that differ enter the program traced, the stage
  built by the plan's factory (`PrivacyPlan.stage`). Under adaptive clipping
  the clip norm is the stage state, so each member starts from its own;
- the `system` section (dropouts, stragglers: each member's engine applies
  them when it plans on the host), and the runner-only sections eval,
  checkpoint and telemetry.

Everything else must be equal. Refused, naming the key: other privacy keys,
whether they shape the stage (`mechanism`, `adaptive_clipping`,
`target_quantile`, `clip_learning_rate`, `clip_count_stddev`,
`tree_restart`: Python constants of the program) or not (`delta`,
`accountant`, `budget_epsilon`, which vmap mode does not vary); a
`local_dp_sgd` grid or members whose local DP-SGD settings differ (its clip
norm and noise multiplier are static settings of the clients' training); a
grid key of any other section. The members' built pieces must agree: client
count, feature shapes, message structure, client loop, and the DP stage's
settings other than the two scalars (denominator, adaptive clipping's
settings, tree restarts, compression). Components that call a user's
function (`factory`, `script`, `imports`) are refused, since a user's
factory may read anything.

`auto` picks vmap for eligible sweeps whose rounds are small (`AUTO_MAX_FLOPS`)
and many enough to pay for vmap's one-off cost (`AUTO_EXTRA_SECONDS`): in small
rounds a round's cost is dispatch and host work per program call, which one
call for all members pays once; compute-bound rounds gain nothing from the
member axis and lose the padding to common shapes.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.core.distributed import is_multiprocess
from fedjax_sim.core.engine import finish_round
from fedjax_sim.core.keys import Purpose, run_key
from fedjax_sim.core.members import MemberError, MemberRounds
from fedjax_sim.core.registry import ALGORITHMS, FAMILIES
from fedjax_sim.runner.config import Config, SweepMember

# Privacy keys a member may vary (central DP): they reach the DP stage only as its clip norm and
# noise multiplier, which `_builder` passes to the plan's stage factory as traced scalars (a
# target epsilon through the noise multiplier each member's plan calibrates on the host).
DP_GRID_KEYS = ("privacy.clip_norm", "privacy.noise_multiplier", "privacy.target_epsilon")
_DP_TEXT = ("privacy.clip_norm and privacy.noise_multiplier (or privacy.target_epsilon, "
            "calibrated per member) of dp_fedavg and dp_ftrl")
# Privacy keys that set the mechanism or the form of its stage (Python constants of the program).
_PRIVACY_PROGRAM_KEYS = ("mechanism", "adaptive_clipping", "target_quantile", "clip_learning_rate",
                         "clip_count_stddev", "tree_restart")

# Sections a member may vary beyond the algorithm's floats: the runner's own settings, and
# `system` (dropouts and stragglers), which only each member's engine reads, on the host, when
# it plans its cohort (no algorithm, stage or privacy plan is built from it).
_HOST_SECTIONS = ("eval", "checkpoint", "telemetry", "progress", "system")

# `auto` runs vmap when one lockstep round trains at most this many FLOPs (all members,
# 6 FLOPs per parameter per example, forward and backward): such rounds are dispatch-bound.
# Basis: XLA:CPU does about 10-20 GFLOP/s on these models, so 1 GFLOP is 50-100 ms of
# compute, beside which a round's fixed cost (5-7 ms of dispatch and host work per member on
# the 2-core CPU) no longer matters; and a compute-bound round is slower vmapped (the
# benchmark's compute case, about 15 GFLOP a member-round, 2 members: 1.63 s a lockstep
# round against 2 x 0.65 s in loop mode, measured 2026-11-30). The accelerator figure is
# not measured.
AUTO_MAX_FLOPS = {"cpu": 1e9, "other": 1e11}
# ... and when the rounds it saves pay for what it costs once. Measured on the 2-core CPU with
# experiments/benchmarks/sweep.py (small case, 8 members, 20 rounds, 2026-11-30): a loop
# member's round took 5.7 ms and a lockstep round of all 8 took 9.4 ms, i.e. each member
# beyond the first saved 5.2 ms a round; the vmap sweep took 16.5 s and the loop sweep 16.8 s,
# so vmap's one-off cost (compiling the member program and the vmapped server step, stacking
# states) was about 0.4 s more than loop's. On this shared machine two runs differ by about a
# second, so the rule takes 1 s.
AUTO_SAVED_SECONDS_PER_MEMBER_ROUND = 5.2e-3
AUTO_EXTRA_SECONDS = 1.0


def _replace_dotted(obj, path: list[str], value):
  """`obj` (a frozen config dataclass) with the dotted field replaced (optimizer kwargs too)."""
  head, rest = path[0], path[1:]
  names = {f.name for f in dataclasses.fields(obj)}
  if head not in names:  # an open section's extra key (an optax keyword argument)
    extra = getattr(obj, getattr(obj, "extra_keys", ""), None)
    if not isinstance(extra, dict) or head not in extra or rest:
      raise KeyError(head)
    return dataclasses.replace(obj, **{obj.extra_keys: {**extra, head: value}})
  if not rest:
    return dataclasses.replace(obj, **{head: value})
  return dataclasses.replace(obj, **{head: _replace_dotted(getattr(obj, head), rest, value)})


def traced_keys(c: Config) -> list[str]:
  """The grid keys of the algorithm section, which enter the program as traced values.

  The DP stage's traced scalars are not grid keys alone (a calibrated noise
  multiplier differs with `privacy.target_epsilon`), so `prepare` reads them
  from the members' built plans (`_dp_scalars`).
  """
  return [k for k in c.sweep.grid if k.startswith("algorithm.")]


def _refuse_privacy_key(c: Config, key: str) -> str | None:
  """Why a grid over the privacy key `key` cannot run vmapped (None: it can)."""
  name = key.split(".", 1)[1]
  if key in DP_GRID_KEYS:
    if c.privacy.mechanism == "local_dp_sgd":
      return (f"sweep.grid key {key!r} varies local DP-SGD, whose clip norm and noise "
              "multiplier are static settings of the clients' local training (LocalConfig), "
              "not traced values; vmap mode varies only the central DP stages' (dp_fedavg, "
              "dp_ftrl)")
    return None
  if name in _PRIVACY_PROGRAM_KEYS:
    return (f"sweep.grid key {key!r} changes what the compiled program is (it sets the DP "
            f"mechanism or the form of its stage); of the privacy section only {_DP_TEXT} "
            "enter it, as the DP stage's traced clip norm and noise multiplier")
  return (f"sweep.grid key {key!r} is not varied in vmap mode; of the privacy section only "
          f"{_DP_TEXT} are, as the DP stage's traced clip norm and noise multiplier")


def config_reason(c: Config, members: list[SweepMember]) -> str | None:
  """Why these members cannot run as one program, from their configs alone (None: they may)."""
  if len(members) < 2:
    return "a sweep of one member has nothing to vmap over"
  if is_multiprocess():
    return "vmap mode runs in one process (jax.distributed runs are not supported)"
  if c.imports:
    return (f"imports = {list(c.imports)}: a module of yours may register components whose "
            "factories read any key")
  for section, family in FAMILIES.items():
    name = family.name_of(getattr(c, section))
    if name in ("factory", "script") or not family.get(name).build.__module__.startswith(
        "fedjax_sim."):
      return (f"{section} = {name!r} calls a user's function, which may read the seed or any "
              "key, so the members' programs may differ")
  for key in c.sweep.grid:
    top = key.split(".")[0]
    if top in _HOST_SECTIONS:
      continue
    if top == "privacy":
      why = _refuse_privacy_key(c, key)
      if why is not None:
        return why
      continue
    values = [m.values[key] for m in members]  # as each member's config resolves them
    if top != "algorithm" or not all(isinstance(v, float) for v in values):
      what = ("its values are not floats" if top == "algorithm" else
              f"the {top} section shapes the program or the population")
      return (f"sweep.grid key {key!r} changes what the compiled program is ({what}); only "
              f"float keys of the algorithm section (learning rates, mu, momentum, ...) and "
              f"{_DP_TEXT} enter it as traced values, beside the seed and the system, eval, "
              "checkpoint and telemetry sections")
  return None


def _builder(exps, keys: list[str], dp_keys: list[str]):
  """`build(h) -> (algorithm, stage)`: the registered factories called with traced values.

  The algorithm: the first member's config and factory context, its grid
  keys replaced by the scalars `h` (also in `ctx.config`, for factories that
  read the whole config). The stage: with DP scalars in `h` (`dp_keys`), the
  first member's privacy plan's stage factory (`PrivacyPlan.stage`, every
  other setting checked equal) called with the member's clip norm and noise
  multiplier; else the first member's stage (equal inputs, checked).
  """
  exp0 = exps[0]
  c0, ctx0, stage0, plan0 = exp0.config, exp0.context, exp0.engine.aggregator, exp0.privacy

  def build(h):
    section = c0.algorithm
    for key in keys:
      section = _replace_dotted(section, key.split(".")[1:], h[key])
    ctx = dataclasses.replace(ctx0, config=dataclasses.replace(c0, algorithm=section))
    stage = stage0
    if dp_keys:
      stage = plan0.stage(h.get("privacy.clip_norm", plan0.info["clip_norm"]),
                          h.get("privacy.noise_multiplier", plan0.noise_multiplier))
    return ALGORITHMS.of(section).build(section, ctx), stage

  return build


def _dp_scalars(exps) -> tuple[dict[str, list[float]], str | None]:
  """The DP stage scalars that differ between the members (name -> values), or why they can't.

  Each member's value is its own plan's: its config's clip norm and its
  resolved noise multiplier (given, calibrated on the host from its target
  epsilon, or the one a resumed member started with).
  """
  plans = [e.privacy for e in exps]
  if all(p is None for p in plans):
    return {}, None
  kinds = [None if p is None else p.mechanism for p in plans]
  if len(set(kinds)) > 1:
    return {}, f"the members' DP mechanisms differ ({kinds})"
  if plans[0].stage is None:  # local DP-SGD: (clip, z) are static in the clients' LocalConfig
    local = sorted({p.local_dp for p in plans})
    if len(local) > 1:
      return {}, (f"the members' local DP-SGD settings (clip norm, noise multiplier) differ "
                  f"({local}); they are static settings of the clients' local training, not "
                  "traced values (only the central dp_fedavg and dp_ftrl stages take them as "
                  "traced values)")
    return {}, None
  s0 = plans[0].stage_settings
  for i, p in enumerate(plans[1:], 1):
    for k in sorted(set(s0) | set(p.stage_settings)):
      if s0.get(k) != p.stage_settings.get(k):
        return {}, (f"member {i}'s DP stage differs from member 0's in {k} "
                    f"({s0.get(k)!r} vs {p.stage_settings.get(k)!r}); only its clip norm and "
                    "noise multiplier are traced values")
  values = {"privacy.clip_norm": [float(p.info["clip_norm"]) for p in plans],
            "privacy.noise_multiplier": [float(p.noise_multiplier) for p in plans]}
  return {k: v for k, v in values.items() if len(set(v)) > 1}, None


def _probe(build, engine, server, stage_state, h) -> None:
  """Traces the factory, one client update and the server step with abstract scalars `h`."""
  bcast_like, data, client_state = engine.one_client_args(server)
  stats_like = engine.stats_like

  def run(h, server, stage_state, data, client_state):
    alg, agg = build(h)
    out = alg.client_update(alg.broadcast(server), data, client_state, jax.random.key(0))
    acc = (agg.zeros(out.update), {k: jnp.zeros(s.shape, s.dtype) for k, s in stats_like.items()})
    key = jax.random.key_data(jax.random.key(0))
    return finish_round(alg, agg, server, stage_state, acc, jnp.float32(1), key)

  jax.eval_shape(run, h, server, stage_state, data, client_state)


def prepare(exps, members: list[SweepMember], c: Config):
  """The members' driver, or why they cannot share one program.

  Args:
    exps: the members' built experiments (`RunSession.build`).
    members: the members, in the same order.
    c: the sweep's config.

  Returns:
    `(MemberRounds, None)` or `(None, reason)`. Each engine is initialised
    (structure learned) from its member's initial parameters.
  """
  keys = traced_keys(c)
  dp, why = _dp_scalars(exps)
  if why is not None:
    return None, why
  states = []
  for i, (e, m) in enumerate(zip(exps, members)):
    if i and not keys and not dp:
      # Equal configs but for the seed: equal structure, learned once (a jaxpr and a FLOP
      # count per engine otherwise). With traced keys each engine learns its own, and
      # MemberRounds checks that they agree.
      _copy_structure(exps[0].engine, e.engine)
    states.append(e.engine.init(e.model.init(run_key(m.config.seed, Purpose.INIT))))
  build = _builder(exps, keys, list(dp))
  h = {k: np.asarray([m.values[k] for m in members], np.float32) for k in keys}
  h.update({k: np.asarray(v, np.float32) for k, v in dp.items()})
  try:
    _probe(build, exps[0].engine, states[0].server, states[0].aggregator,
           {k: jax.ShapeDtypeStruct((), jnp.float32) for k in h})
  except Exception as e:  # the factory or the program used a key as a Python value
    return None, (f"the algorithm or the aggregation stage cannot take {', '.join(h)} as "
                  "traced values (a factory or an update uses them as Python numbers: "
                  f"{type(e).__name__}: {str(e).splitlines()[0][:200]})")
  try:
    driver = MemberRounds([e.engine for e in exps], build, h)
  except MemberError as e:
    return None, f"the members' built pieces differ: {e}"
  return driver, None


def _copy_structure(source, engine) -> None:
  """What `Engine._learn_structure` derives, taken from an engine of the same structure."""
  for name in ("update_like", "stats_like", "client_loop", "upload_bits"):
    setattr(engine, name, getattr(source, name))


def round_flops(exps) -> float:
  """Training FLOPs of one lockstep round, estimated from the first round's plans."""
  total = 0.0
  for e in exps:
    params = sum(math.prod(x.shape) for x in jax.tree.leaves(e.engine.update_like))
    total += 6.0 * params * e.engine.plan(0).real_examples
  return total


def pays_back(rounds: list[int]) -> tuple[bool, str]:
  """Whether the members' shared rounds save more dispatch than vmap costs once.

  Args:
    rounds: the rounds each member has left to run.
  """
  shared = sum(rounds) - max(rounds)  # member-rounds that ride along in another's call
  saved = shared * AUTO_SAVED_SECONDS_PER_MEMBER_ROUND
  pays = saved >= AUTO_EXTRA_SECONDS
  return pays, (f"its {shared} shared member-rounds would save about {saved:.3g} s of "
                f"dispatch, {'at least' if pays else 'less than'} the about "
                f"{AUTO_EXTRA_SECONDS:g} s vmap costs once (compiling the member program)")


def expected_faster(exps, rounds: list[int]) -> tuple[bool, str]:
  """`auto`'s rule: vmap when rounds are dispatch-bound and enough of them run together.

  Args:
    exps: the members' built experiments.
    rounds: the rounds each member has left to run.

  Returns:
    (whether vmap is expected faster, the numbers behind it, for sweep.json).
  """
  flops = round_flops(exps)
  kind = "cpu" if jax.default_backend() == "cpu" else "other"
  limit = AUTO_MAX_FLOPS[kind]
  small = flops <= limit
  why = (f"a round of all {len(exps)} members trains about {flops / 1e6:.3g} MFLOP "
         f"({'at most' if small else 'more than'} the {limit / 1e6:.3g} MFLOP up to which "
         f"rounds are dispatch-bound on {kind} devices)")
  if not small:
    return False, why
  pays, numbers = pays_back(rounds)
  return pays, f"{why}, and {numbers}"


def run_lockstep(sessions, driver: MemberRounds) -> int:
  """Advances the sessions' runs together, round by round, until each stops.

  A member that stops (last round, divergence, a signal, its privacy budget)
  leaves; the others go on in a driver over the rest.

  Returns:
    The member programs compiled (every driver's).
  """
  active = [i for i, s in enumerate(sessions) if s.start < s.stop]
  if len(active) < len(sessions):
    driver = driver.subset(active) if active else None
  drivers = [driver] if driver is not None else []
  rounds = [s.start for s in sessions]
  stacked = driver.stack([sessions[i].state for i in active]) if active else None
  while active:
    stacked, results = driver.run_round(stacked, [rounds[i] for i in active])
    cache = []

    def states():
      if not cache:
        cache.append(driver.unstack(stacked))
      return cache[0]

    keep = []
    for j, i in enumerate(active):
      rounds[i] += 1
      if sessions[i].on_round(results[j], lambda j=j: states()[j]):
        keep.append(j)
    if len(keep) < len(active):
      if not keep:
        break
      members = states()
      driver = driver.subset(keep)
      drivers.append(driver)
      stacked = driver.stack([members[j] for j in keep])
      active = [active[j] for j in keep]
  return sum(d.traces for d in drivers)


__all__ = ["AUTO_EXTRA_SECONDS", "AUTO_MAX_FLOPS", "AUTO_SAVED_SECONDS_PER_MEMBER_ROUND",
           "config_reason", "pays_back", "expected_faster", "prepare", "run_lockstep",
           "traced_keys"]
