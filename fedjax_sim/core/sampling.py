"""Client sampling on the host.

Every round draws from its own `numpy.random.Generator`, seeded by
`(seed, round, purpose)`, so the cohort of round r is the same whether the run
started at round 0 or resumed at round r, and sampling randomness never shares
a stream with training or noise randomness.
"""

from __future__ import annotations

import numpy as np

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
