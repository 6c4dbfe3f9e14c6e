"""System heterogeneity: clients that drop out and clients that straggle.

Decided on the host for every round from its own generator
(`round_rng(seed, round, purpose)`), so a run is reproducible and a resumed
run sees the same failures.

* Dropout: a sampled client fails to report with probability `dropout` (the
  same for all clients), or with its own probability `p_i`, drawn once per
  run from Beta(dropout * kappa, (1 - dropout) * kappa) when
  `dropout_concentration = kappa` is given (mean `dropout`, smaller kappa =
  more heterogeneous availability). A dropped client costs nothing and
  contributes nothing; a round where every sampled client drops is failed.
* Stragglers: a fraction `straggler_fraction` of the surviving clients (the
  count rounded down, chosen uniformly) completes only part of its work; or,
  with `straggler_concentration = kappa`, every client has its own capability:
  it straggles independently with probability `s_i`, drawn once per run from
  Beta(f * kappa, (1 - f) * kappa) (mean f = `straggler_fraction`), so slow
  devices straggle round after round. A straggler does only part of its work:
  `straggler_work = "steps"`: a number of local steps uniform on
  `[1, full steps]`; `"epochs"`: a number of whole epochs uniform on
  `[1, E - 1]` (at least 1), as the FedProx reference code does
  (`randint(1, E)`). With `straggler_policy = "drop"` their updates are
  discarded (FedAvg's usual practice); with `"partial"` their partial work
  is kept (FedProx's).

References:
  Li et al. "Federated Optimization in Heterogeneous Networks", MLSys 2020,
  Sec. 5.2 (stragglers running fewer local updates); Bonawitz et al.
  "Towards Federated Learning at Scale: System Design", MLSys 2019 (dropout).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fedjax_sim.core.sampling import round_rng

_SYSTEM_PURPOSE = 0x5757
_AVAILABILITY_PURPOSE = 0xA7A1

NO_LIMIT = np.iinfo(np.int32).max


@dataclasses.dataclass(frozen=True)
class SystemConfig:
  dropout: float = 0.0
  dropout_concentration: float | None = None
  straggler_fraction: float = 0.0
  straggler_policy: str = "drop"
  straggler_work: str = "steps"
  straggler_concentration: float | None = None

  def __post_init__(self):
    if not 0.0 <= self.dropout <= 1.0:
      raise ValueError(f"dropout must be in [0, 1]; got {self.dropout}.")
    if self.dropout_concentration is not None and self.dropout_concentration <= 0:
      raise ValueError(f"dropout_concentration must be > 0; got {self.dropout_concentration}.")
    if self.straggler_concentration is not None and self.straggler_concentration <= 0:
      raise ValueError(f"straggler_concentration must be > 0; got "
                       f"{self.straggler_concentration}.")
    if not 0.0 <= self.straggler_fraction <= 1.0:
      raise ValueError(f"straggler_fraction must be in [0, 1]; got {self.straggler_fraction}.")
    if self.straggler_policy not in ("drop", "partial"):
      raise ValueError(f"straggler_policy must be 'drop' or 'partial'; got "
                       f"{self.straggler_policy!r}.")
    if self.straggler_work not in ("steps", "epochs"):
      raise ValueError(f"straggler_work must be 'steps' or 'epochs'; got "
                       f"{self.straggler_work!r}.")

  @property
  def active(self) -> bool:
    return self.dropout > 0 or self.straggler_fraction > 0


@dataclasses.dataclass(frozen=True)
class Participation:
  """Who of a sampled cohort trains this round, and how much."""

  sampled: int
  client_ids: np.ndarray  # the clients that train (sorted)
  step_limits: np.ndarray  # [len(client_ids)] int32 local steps allowed (NO_LIMIT: all)
  dropped: int  # failed to report
  stragglers: int  # straggled (dropped or partial, by policy)


class SystemModel:
  """Applies a `SystemConfig` to sampled cohorts."""

  def __init__(self, config: SystemConfig, num_clients: int, seed: int):
    self.config = config
    self.seed = seed
    self.dropout_prob = None
    rng = round_rng(seed, 0, _AVAILABILITY_PURPOSE)
    if config.dropout_concentration is not None and 0 < config.dropout < 1:
      k = config.dropout_concentration
      self.dropout_prob = rng.beta(config.dropout * k, (1 - config.dropout) * k, num_clients)
    self.straggle_prob = None
    if config.straggler_concentration is not None and 0 < config.straggler_fraction < 1:
      k, f = config.straggler_concentration, config.straggler_fraction
      self.straggle_prob = rng.beta(f * k, (1 - f) * k, num_clients)

  def apply(self, round_num: int, client_ids: np.ndarray, steps_per_epoch: np.ndarray,
            epochs: int = 1) -> Participation:
    """Decides dropouts and stragglers for a sampled cohort.

    Args:
      round_num: the round.
      client_ids: the sampled clients (sorted).
      steps_per_epoch: the local steps of one epoch of each client.
      epochs: local epochs in full.
    """
    ids = np.asarray(client_ids, np.int64)
    c = self.config
    limits = np.full(len(ids), NO_LIMIT, np.int32)
    if not c.active or len(ids) == 0:
      return Participation(len(ids), ids, limits, 0, 0)
    rng = round_rng(self.seed, round_num, _SYSTEM_PURPOSE)
    p = c.dropout if self.dropout_prob is None else self.dropout_prob[ids]
    report = rng.random(len(ids)) >= p
    alive = np.nonzero(report)[0]
    if self.straggle_prob is not None:  # per-client capability
      strag = alive[rng.random(len(alive)) < self.straggle_prob[ids[alive]]]
    else:
      n_strag = int(np.floor(c.straggler_fraction * len(alive)))
      strag = np.sort(rng.choice(alive, size=n_strag, replace=False)) if n_strag else alive[:0]
    n_strag = len(strag)
    keep = report.copy()
    if c.straggler_policy == "drop":
      keep[strag] = False
    else:
      per_epoch = np.maximum(np.asarray(steps_per_epoch, np.int64)[strag], 1)
      if c.straggler_work == "epochs":
        done = rng.integers(1, max(epochs, 2), size=len(strag))  # uniform on [1, E - 1]
        limits[strag] = (done * per_epoch).astype(np.int32)
      else:
        limits[strag] = (rng.integers(0, epochs * per_epoch) + 1).astype(np.int32)  # [1, full]
    return Participation(len(ids), ids[keep], limits[keep], int((~report).sum()), n_strag)
