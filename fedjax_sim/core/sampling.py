"""Client sampling on the host.

Every round draws from its own `numpy.random.Generator`, seeded by
`(seed, round, purpose)`, so the cohort of round r is the same whether the run
started at round 0 or resumed at round r, and sampling randomness never shares
a stream with training or noise randomness.

Schemes (`make_sampler` builds a round sampler for any of them):

* `uniform`: `clients_per_round` distinct clients, uniformly.
* `poisson`: every client independently with probability `rate`.
* `shuffle`: epochs of a fresh permutation cut into cohorts.
* `data_proportional`: `clients_per_round` distinct clients drawn one after
  another, each with probability proportional to its number of training
  examples among the clients not yet drawn (q-FFL's sampling, Li et al. 2020).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
from numpy.typing import ArrayLike

from fedjax_sim.core.registry import SAMPLERS, SamplingSection
from fedjax_sim.core.schema import ConfigError, option, positive


_SAMPLING_PURPOSE = 0xC0407


def round_rng(seed: int, round_num: int, purpose: int = _SAMPLING_PURPOSE) -> np.random.Generator:
  """The host generator for one purpose in one round."""
  return np.random.default_rng(np.random.SeedSequence([int(seed), int(round_num), int(purpose)]))


def sample_uniform(rng: np.random.Generator, num_clients: int, clients_per_round: int) -> np.ndarray:
  """`clients_per_round` distinct clients, uniformly without replacement, sorted."""
  if not 0 < clients_per_round <= num_clients:
    raise ValueError(f"clients_per_round must be in [1, {num_clients}]; got {clients_per_round}.")
  return np.sort(rng.choice(num_clients, size=clients_per_round, replace=False)).astype(np.int64)


def sample_poisson(rng: np.random.Generator, num_clients: int, rate: float) -> np.ndarray:
  """Each client independently with probability `rate` (the DP-friendly scheme), sorted.

  Drawn as a Binomial(num_clients, rate) cohort size followed by a uniform
  subset of that size, which has exactly the distribution of independent
  Bernoulli(rate) inclusions but costs O(cohort) instead of O(population).
  """
  if not 0.0 < rate <= 1.0:
    raise ValueError(f"Poisson sampling rate must be in (0, 1]; got {rate}.")
  k = int(rng.binomial(num_clients, rate))
  if k == 0:
    return np.zeros(0, np.int64)
  return np.sort(rng.choice(num_clients, size=k, replace=False)).astype(np.int64)


def rounds_per_epoch(num_clients: int, clients_per_round: int) -> int:
  """Full cohorts of `clients_per_round` in one pass over the population."""
  if not 0 < clients_per_round <= num_clients:
    raise ValueError(f"clients_per_round must be in [1, {num_clients}]; got {clients_per_round}.")
  return num_clients // clients_per_round


def sample_shuffled(seed: int, round_num: int, num_clients: int,
                    clients_per_round: int) -> np.ndarray:
  """Epoch-wise shuffling: no client takes part twice in one epoch.

  Epoch `e = round_num // R` (R = `rounds_per_epoch`) draws one permutation of
  the population; its round `i` takes the clients at positions
  `[i * m, (i + 1) * m)`, and the last `num_clients % m` clients of the
  permutation sit the epoch out. This is the participation pattern DP-FTRL's
  accounting assumes (Kairouz et al. 2021: every client in at most one round
  per epoch), and it is reproducible from `(seed, round_num)` alone.
  """
  per_epoch = rounds_per_epoch(num_clients, clients_per_round)
  epoch, i = divmod(int(round_num), per_epoch)
  perm = round_rng(seed, epoch, _SHUFFLE_PURPOSE).permutation(num_clients)
  return np.sort(perm[i * clients_per_round:(i + 1) * clients_per_round]).astype(np.int64)


_SHUFFLE_PURPOSE = 0x5A0FF1E


def sample_data_proportional(rng: np.random.Generator, sizes: ArrayLike,
                             clients_per_round: int) -> np.ndarray:
  """`clients_per_round` distinct clients, drawn with weights `p_k = n_k / n`, sorted.

  Successive sampling: each draw picks a client with probability proportional
  to its example count among those not drawn yet (numpy's
  `choice(replace=False, p=...)`). This is how the q-FFL authors' code samples
  (Li et al. 2020, `fair_flearn`, `select_clients` with `sampling = 2`, used
  for every q-FedAvg experiment); their Algorithm 2 states only that device k
  is chosen with probability p_k. The engine trains each id once per round, so
  sampling without replacement is also the variant it can run: a client drawn
  twice would have to count twice in the server's sum. A client's inclusion
  probability is then increasing in n_k but not exactly proportional to it
  once `clients_per_round` is a sizeable share of the population. Clients
  without examples are never drawn.

  Args:
    rng: the round's generator (`round_rng`).
    sizes: training examples of every client of the population.
    clients_per_round: cohort size.

  Raises:
    ValueError: fewer than `clients_per_round` clients have examples.
  """
  sizes = np.asarray(sizes, np.float64)
  _check_data_proportional(sizes, clients_per_round)
  p = sizes / sizes.sum()
  ids = rng.choice(len(sizes), size=clients_per_round, replace=False, p=p)
  return np.sort(ids).astype(np.int64)


def _check_data_proportional(sizes: np.ndarray, clients_per_round: int) -> None:
  if sizes.ndim != 1 or np.any(sizes < 0):
    raise ValueError("sizes must be a 1-D array of non-negative example counts.")
  with_data = int(np.count_nonzero(sizes))
  if not 0 < clients_per_round <= with_data:
    raise ValueError(f"data_proportional sampling draws distinct clients that have examples: "
                     f"clients_per_round must be in [1, {with_data}] ({with_data} of "
                     f"{len(sizes)} clients have examples); got {clients_per_round}.")


SCHEMES = ("uniform", "poisson", "shuffle", "data_proportional")


def make_sampler(scheme: str, seed: int, num_clients: int, clients_per_round: int,
                 rate: float, sizes: ArrayLike | None = None) -> Callable[[int], np.ndarray]:
  """The round sampler `round_num -> sorted client ids` of a scheme.

  Every scheme draws from `round_rng(seed, round_num)` (`shuffle` from its
  epoch's generator), so a round's cohort depends only on `(seed, round)`.

  Args:
    scheme: one of `SCHEMES`.
    seed: the run's seed.
    num_clients: the population size.
    clients_per_round: cohort size (uniform, shuffle, data_proportional).
    rate: inclusion probability (poisson).
    sizes: every client's number of training examples (data_proportional).

  Raises:
    ValueError: an unknown scheme, or settings the scheme cannot draw from
      (checked here, before any round).
  """
  if scheme == "poisson":
    if not 0.0 < rate <= 1.0:
      raise ValueError(f"Poisson sampling rate must be in (0, 1]; got {rate}.")
    return lambda round_num: sample_poisson(round_rng(seed, round_num), num_clients, rate)
  if scheme not in SCHEMES:
    raise ValueError(f"sampling scheme must be one of {SCHEMES}; got {scheme!r}.")
  if not 0 < clients_per_round <= num_clients:
    raise ValueError(f"clients_per_round must be in [1, {num_clients}]; got {clients_per_round}.")
  if scheme == "shuffle":
    return lambda round_num: sample_shuffled(seed, round_num, num_clients, clients_per_round)
  if scheme == "uniform":
    return lambda round_num: sample_uniform(round_rng(seed, round_num), num_clients,
                                            clients_per_round)
  if sizes is None:
    raise ValueError("data_proportional sampling needs the clients' example counts (sizes).")
  sizes = np.asarray(sizes, np.float64).copy()
  if sizes.shape != (num_clients,):
    raise ValueError(f"sizes must hold one count per client ({num_clients}); got shape "
                     f"{sizes.shape}.")
  _check_data_proportional(sizes, clients_per_round)
  return lambda round_num: sample_data_proportional(round_rng(seed, round_num), sizes,
                                                    clients_per_round)


# -- registered schemes (config section `sampling`) ------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class CohortConfig(SamplingSection):
  """A fixed number of distinct clients per round."""

  clients_per_round: int = option(10, check=(positive, "must be >= 1"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShuffleConfig(CohortConfig):
  """Epochs: a fresh permutation per epoch cut into cohorts; nobody twice in an epoch."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataProportionalConfig(CohortConfig):
  """Distinct clients, each draw proportional to the training examples (q-FFL's sampling)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PoissonConfig(SamplingSection):
  """Every client independently with probability `rate`."""

  rate: float = option(0.1, check=(lambda x: 0 < x <= 1, "must be in (0, 1]"),
                       help="Poisson inclusion probability")


def _build_scheme(scheme: str):
  def build(cfg, ctx):
    train = ctx.train
    try:
      return make_sampler(scheme, ctx.seed, train.num_clients,
                          getattr(cfg, "clients_per_round", 0), getattr(cfg, "rate", 0.0),
                          train.sizes)
    except ValueError as err:
      raise ConfigError(f"sampling.scheme = {scheme!r}: {err}") from err
  build.__doc__ = f"The {scheme} sampler."
  return build


# `accounted_as`: the sampling dp-accounting has an event for, which user-level DP
# mechanisms account this scheme as (None: none; DP refuses the scheme).
SAMPLERS.register("uniform", CohortConfig, accounted_as="uniform")(_build_scheme("uniform"))
SAMPLERS.register("shuffle", ShuffleConfig, accounted_as="shuffle")(_build_scheme("shuffle"))
SAMPLERS.register("data_proportional", DataProportionalConfig, accounted_as=None)(
    _build_scheme("data_proportional"))
SAMPLERS.register("poisson", PoissonConfig, accounted_as="poisson")(_build_scheme("poisson"))
