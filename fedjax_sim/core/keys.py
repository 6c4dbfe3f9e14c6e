"""Every PRNG key of a run, derived from its seed by one function.

A run has one integer seed. Each stream of randomness (model initialisation,
local training, encoding of uploads, server-side noise, evaluation) has its
own root key, `run_key(seed, purpose)`, so no two purposes ever draw from the
same key, and adding a purpose never changes the others' streams. Inside the
engine, a root is further specialised with `fold_in(root, round)` and then
`fold_in(., client_id)`, so a client's randomness does not depend on how
clients are blocked, chunked or sharded.

Host-side randomness (sampling cohorts, dropouts, stragglers) uses numpy
generators seeded from `(seed, round)` instead (`core.sampling.round_rng`):
it never shares a stream with the device keys.
"""

from __future__ import annotations

import enum

import jax


class Purpose(enum.IntEnum):
  """What a root key is for (the value is folded into the seed's key)."""

  TRAIN = 1  # local training: minibatch order, dropout, local DP-SGD noise
  ENCODE = 2  # per-client encoding of uploads: dithers, random rotations, sparsity masks
  FINALIZE = 3  # server side: DP noise on the aggregate
  INIT = 4  # the global model's initial parameters
  EVAL = 5  # evaluation (only models that are stochastic at evaluation use it)


def run_key(seed: int, purpose: Purpose) -> jax.Array:
  """The root key of `purpose` for the run with this seed (a typed key)."""
  return jax.random.fold_in(jax.random.key(seed), int(Purpose(purpose)))


__all__ = ["Purpose", "run_key"]
