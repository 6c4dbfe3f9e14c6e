"""A per-client cost model: FLOPs, bytes and simulated on-device seconds of every client.

For each round the simulator already knows, per client, how many local steps
it ran (`RoundResult.clients["steps"]`, real steps over all epochs; a
straggler's partial work counts only the steps it took) and whether it
uploaded. The cost model adds what one step and one message cost:

  * `step_flops`: FLOPs of one local step of one client, by XLA's cost
    analysis of the lowered, unoptimized program of `client_update` on one
    batch (`core.program.step_flops`, the figure the engine uses to choose
    its client loop). XLA counts a loop body once, so the local-step loop
    and the epoch loop count one step; the work `client_update` does once
    per round outside that loop (the optimizer's init, the shuffle, the
    update `delta`, q-FFL's loss evaluation) is counted with it, so a
    client's FLOPs `step_flops x steps` are a slight over-estimate.
  * `step_temp_bytes`: XLA's temporary buffer bytes of that compiled
    program (`compiled.memory_analysis().temp_size_in_bytes`): the
    activations, gradients and loop carries of a step, i.e. the peak working
    memory beyond the model and the batch. None where the backend reports
    no memory analysis (the reason is in `step_temp_bytes_note`).
  * `broadcast_bytes`: bytes a client downloads, the broadcast's arrays
    (`jax.eval_shape(algorithm.broadcast, server_state)`).
  * `upload_bits`: the exact bits one client uploads (`Engine.upload_bits`,
    declared by the aggregation stage from shapes); where a stage declares
    none, the round's measured `bits_per_client` is used instead.

A client's simulated seconds on a `DeviceProfile` are

    8 * broadcast_bytes / (downlink_mbps * 1e6)
  + step_flops * steps / (gflops * 1e9)
  + upload_bits / (uplink_mbps * 1e6)          (0 for a client that uploads nothing)

i.e. download, compute and upload one after another at the sustained rates,
with no latency, contention or energy model. A round's simulated duration is
its slowest client's (the server waits for every planned client; dropouts
are removed before planning and cost nothing here).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from fedjax_sim.core.program import lowered_flops


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
  """A simulated client device.

  Attributes:
    name: the preset's name, or "custom".
    gflops: sustained GFLOP/s of local training (not a peak rate).
    downlink_mbps: download rate in Mbit/s (10^6 bits per second).
    uplink_mbps: upload rate in Mbit/s.
  """

  name: str
  gflops: float
  downlink_mbps: float
  uplink_mbps: float

  def __post_init__(self):
    for field in ("gflops", "downlink_mbps", "uplink_mbps"):
      value = getattr(self, field)
      if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"DeviceProfile.{field} must be a finite number > 0; got {value!r}.")


# The presets are assumptions of the right order of magnitude, not measurements:
#
# * network rates: Ookla's Speedtest Global Index for July 2021 gave global
#   medians of about 55 Mbit/s down on mobile and 107.5 Mbit/s down on fixed
#   broadband; uploads are taken as about a fifth of the download rate, as is
#   typical of mobile and cable links. The `iot` link is an assumed
#   constrained one (a weak Wi-Fi or cellular IoT modem).
# * compute rates: the sustained rate of training (forward, backward and the
#   optimizer) reaches only a fraction of a chip's peak. Assumed: a mid-range
#   phone's CPU cores reach about 10 GFLOP/s (its peak is a few tens of
#   GFLOP/s in float32), a 4-core x86 laptop with AVX2 about 100 GFLOP/s (its
#   peak is several hundred), a Raspberry-Pi-4-class board about 2 GFLOP/s
#   (Linpack measures around 10 on it).
PRESETS: dict[str, DeviceProfile] = {
    "phone": DeviceProfile("phone", gflops=10.0, downlink_mbps=50.0, uplink_mbps=10.0),
    "laptop": DeviceProfile("laptop", gflops=100.0, downlink_mbps=100.0, uplink_mbps=20.0),
    "iot": DeviceProfile("iot", gflops=2.0, downlink_mbps=10.0, uplink_mbps=2.0),
}


def device_profile(preset: str = "phone", *, gflops: float | None = None,
                   downlink_mbps: float | None = None,
                   uplink_mbps: float | None = None) -> DeviceProfile:
  """A preset of `PRESETS`, with any of its numbers replaced (then named "<preset>+custom")."""
  if preset not in PRESETS:
    raise ValueError(f"No device preset {preset!r}; use one of {', '.join(PRESETS)}.")
  base = PRESETS[preset]
  given = {k: v for k, v in (("gflops", gflops), ("downlink_mbps", downlink_mbps),
                             ("uplink_mbps", uplink_mbps)) if v is not None}
  if not given:
    return base
  return dataclasses.replace(base, name=f"{preset}+custom", **given)


@dataclasses.dataclass(frozen=True)
class StepCost:
  """What one local step and one message of a client cost (see the module docstring)."""

  step_flops: float
  step_temp_bytes: int | None
  step_temp_bytes_note: str
  broadcast_bytes: int
  upload_bits: int | None

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def one_client_program(engine, server_state):
  """`(fn, args)`: one client's `client_update` on one batch, as abstract arguments
  (`Engine.one_client_args`, the dummy client the engine learns its structure from)."""
  alg = engine.algorithm

  def one_client(bcast, data, client_state):
    return alg.client_update(bcast, data, client_state, jax.random.key(0))

  return one_client, engine.one_client_args(server_state)


def step_cost(engine, server_state, *, memory: bool = True) -> StepCost:
  """The cost of one local step and one message of `engine`'s clients.

  Args:
    engine: a `core.Engine` after `init` (its `upload_bits` is known then).
    server_state: the server state (sizes the broadcast).
    memory: compile the one-client program for its memory analysis (the
      FLOPs need only its lowering).
  """
  fn, args = one_client_program(engine, server_state)
  lowered = jax.jit(fn).lower(*args)  # traced once, for the FLOPs and the memory
  flops = lowered_flops(lowered)
  temp, note = None, "not computed (memory=False)"
  if memory:
    stats = lowered.compile().memory_analysis()
    if stats is None or getattr(stats, "temp_size_in_bytes", None) is None:
      note = f"the {jax.default_backend()} backend reports no memory analysis"
    else:
      temp = int(stats.temp_size_in_bytes)
      note = ("XLA temp buffer bytes of one client's compiled step program "
              f"({jax.default_backend()} backend)")
  bcast = jax.eval_shape(engine.algorithm.broadcast, server_state)
  down = int(sum(math.prod(s.shape) * np.dtype(s.dtype).itemsize for s in jax.tree.leaves(bcast)))
  up = engine.upload_bits
  return StepCost(step_flops=float(flops), step_temp_bytes=temp, step_temp_bytes_note=note,
                  broadcast_bytes=down, upload_bits=None if up is None else int(up))


def client_seconds(cost: StepCost, profile: DeviceProfile, steps: np.ndarray,
                   upload_bits: np.ndarray) -> np.ndarray:
  """Simulated seconds of each client: download + compute + upload (module docstring)."""
  steps = np.asarray(steps, np.float64)
  down = 8.0 * cost.broadcast_bytes / (profile.downlink_mbps * 1e6)
  compute = cost.step_flops * steps / (profile.gflops * 1e9)
  up = np.asarray(upload_bits, np.float64) / (profile.uplink_mbps * 1e6)
  return down + compute + up


# The per-round keys `round_cost` adds to metrics.jsonl.
ROUND_KEYS = ("client_seconds_mean", "client_seconds_max", "client_gflops_total", "bytes_down",
              "bytes_up")


def round_cost(cost: StepCost, profile: DeviceProfile, clients: dict[str, np.ndarray],
               metrics: dict) -> dict[str, float]:
  """One round's cost figures from its per-client record and its metrics.

  Args:
    cost: the step and message costs.
    profile: the simulated device.
    clients: `RoundResult.clients` (every planned client: `steps`, `examples`).
    metrics: the round's public metrics (`bits`, and `bits_per_client` where
      the stage declares no exact upload size).

  Returns:
    `client_seconds_mean` and `client_seconds_max` (simulated, over the
    planned clients; the max is the round's simulated duration),
    `client_gflops_total` (step FLOPs x steps, summed), `bytes_down` (the
    broadcast, once per planned client) and `bytes_up` (the round's exact
    uploaded bits / 8). A client without examples uploads nothing; a round
    with no planned client costs zeros.
  """
  steps = np.asarray(clients.get("steps", np.zeros(0)), np.float64)
  examples = np.asarray(clients.get("examples", np.zeros(0)), np.float64)
  per_upload = (cost.upload_bits if cost.upload_bits is not None
                else float(metrics.get("bits_per_client", 0.0)))
  uploads = np.where(examples > 0, float(per_upload), 0.0)
  seconds = client_seconds(cost, profile, steps, uploads)
  return {
      "client_seconds_mean": float(np.mean(seconds)) if len(seconds) else 0.0,
      "client_seconds_max": float(np.max(seconds)) if len(seconds) else 0.0,
      "client_gflops_total": float(cost.step_flops * np.sum(steps) / 1e9),
      "bytes_down": float(cost.broadcast_bytes * len(steps)),
      "bytes_up": float(metrics.get("bits", 0.0)) / 8.0,
  }


def cost_summary(cost: StepCost, profile: DeviceProfile, records: list[dict]) -> dict:
  """The run's cost figures for summary.json, from every round's metrics.jsonl record.

  `simulated_seconds` adds the rounds' simulated durations (rounds run one
  after another, each as long as its slowest client); `simulator_seconds`
  adds the simulator's own `round_seconds`; their ratio
  `simulated_seconds_per_simulator_second` is how much faster than the
  simulated devices the simulator ran (compilation included).
  """
  rows = [r for r in records if "client_seconds_max" in r]
  simulated = float(sum(r["client_seconds_max"] for r in rows))
  simulator = float(sum(r.get("round_seconds", 0.0) for r in rows))
  n = len(rows)
  return {
      "device": dataclasses.asdict(profile),
      **cost.as_dict(),
      "step_gflops": cost.step_flops / 1e9,
      "total_client_gflops": float(sum(r["client_gflops_total"] for r in rows)),
      "total_bytes_down": float(sum(r["bytes_down"] for r in rows)),
      "total_bytes_up": float(sum(r["bytes_up"] for r in rows)),
      "simulated_seconds": simulated,
      "simulator_seconds": simulator,
      "simulated_round_seconds_mean": simulated / n if n else 0.0,
      "simulator_round_seconds_mean": simulator / n if n else 0.0,
      "simulated_seconds_per_simulator_second": simulated / simulator if simulator > 0 else None,
  }


__all__ = ["DeviceProfile", "PRESETS", "ROUND_KEYS", "StepCost", "client_seconds", "cost_summary",
           "device_profile", "one_client_program", "round_cost", "step_cost"]
