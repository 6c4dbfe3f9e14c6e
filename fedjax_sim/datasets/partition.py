"""Splitting one centralized dataset into clients.

Each partitioner takes in-memory arrays `x` (`[N, ...]`, any dtype) and `y`
(integer labels `[N]`), assigns every example to exactly one client, and packs
the result as `FederatedData` with features `x` (same dtype and trailing shape
as given: an image dataset stays uint8) and `y` (int32). Within a client the
examples are stored in a random order, so `FederatedData.split_examples` gives
a random per-client split.
"""

from __future__ import annotations

import numpy as np

from fedjax_sim.core.data import FederatedData
from fedjax_sim.datasets.synthetic import _check_int, _check_seed

_IID_PURPOSE = 0x11D
_DIRICHLET_PURPOSE = 0xD1C1
_SHARDS_PURPOSE = 0x5A4D


def iid_partition(x, y, num_clients: int, *, seed: int) -> FederatedData:
  """Deals the examples uniformly at random into `num_clients` near-equal clients.

  Client sizes differ by at most one.

  Args:
    x: features, `[N, ...]`.
    y: integer labels, `[N]`.
    num_clients: number of clients, in `[1, N]`.
    seed: non-negative integer seed.

  Returns:
    `FederatedData` with features `x` and `y`.

  Raises:
    ValueError: bad shapes, dtypes or argument ranges.

  References:
    McMahan, Moore, Ramage, Hampson, Aguera y Arcas. "Communication-Efficient
    Learning of Deep Networks from Decentralized Data", AISTATS 2017 (the IID
    baseline partition).
  """
  x, y = _check_xy(x, y)
  n = len(y)
  _check_int("num_clients", num_clients, 1)
  if num_clients > n:
    raise ValueError(f"num_clients must be in [1, {n}] (the number of examples); "
                     f"got {num_clients}.")
  _check_seed(seed)
  rng = np.random.default_rng(np.random.SeedSequence([seed, _IID_PURPOSE]))
  client_of = np.empty(n, np.int64)
  client_of[rng.permutation(n)] = np.repeat(np.arange(num_clients), _even_sizes(n, num_clients))
  return _pack(x, y, client_of, num_clients, rng)


def dirichlet_partition(x, y, num_clients: int, alpha: float, *, seed: int,
                        min_size: int = 0, max_tries: int = 1000) -> FederatedData:
  """Label-skewed partition: each class is split among clients by Dir(alpha).

  For every class c, its examples (in random order) are cut among the clients
  in proportions `p_c ~ Dirichlet(alpha * 1_K)`, rounding the cut points to
  whole examples. Small `alpha` (e.g. 0.1) gives each class to a few clients;
  large `alpha` approaches a balanced, IID-like split. If `min_size > 0`, the
  whole draw is repeated until every client holds at least `min_size`
  examples (at most `max_tries` times).

  This is the per-class form of Hsu et al.'s Dirichlet label skew (they draw
  each client's class mixture from a Dirichlet; splitting each class instead
  guarantees every example is used exactly once), as used by Yurochkin et al.
  2019 and the NIID-Bench of Li et al. 2022.

  Args:
    x: features, `[N, ...]`.
    y: integer labels, `[N]`.
    num_clients: number of clients K (>= 1).
    alpha: Dirichlet concentration (> 0).
    seed: non-negative integer seed.
    min_size: minimum examples per client (>= 0, at most N // K).
    max_tries: redraws allowed to meet `min_size` (>= 1).

  Returns:
    `FederatedData` with features `x` and `y`; clients may be empty when
    `min_size == 0`.

  Raises:
    ValueError: bad arguments, or `min_size` not met after `max_tries` draws.

  References:
    Hsu, Qi, Brown. "Measuring the Effects of Non-Identical Data Distribution
    for Federated Visual Classification", arXiv:1909.06335, 2019; Yurochkin et
    al. "Bayesian Nonparametric Federated Learning of Neural Networks", ICML
    2019; Li, Diao, Chen, He. "Federated Learning on Non-IID Data Silos: An
    Experimental Study", ICDE 2022.
  """
  x, y = _check_xy(x, y)
  n = len(y)
  _check_int("num_clients", num_clients, 1)
  try:
    alpha_ok = float(alpha) > 0 and np.isfinite(float(alpha)) and not isinstance(alpha, bool)
  except (TypeError, ValueError):
    alpha_ok = False
  if not alpha_ok:
    raise ValueError(f"alpha must be a finite number > 0; got {alpha!r}.")
  _check_seed(seed)
  _check_int("min_size", min_size, 0)
  if min_size * num_clients > n:
    raise ValueError(f"min_size must be at most N // num_clients = {n // num_clients} "
                     f"so that every client can get it; got {min_size}.")
  _check_int("max_tries", max_tries, 1)

  rng = np.random.default_rng(np.random.SeedSequence([seed, _DIRICHLET_PURPOSE]))
  _, label_index = np.unique(y, return_inverse=True)
  by_class = np.argsort(label_index, kind="stable")
  class_bounds = np.concatenate([[0], np.cumsum(np.bincount(label_index))])
  concentration = np.full(num_clients, float(alpha))
  client_of = np.empty(n, np.int64)
  for _ in range(max_tries):
    for lo, hi in zip(class_bounds[:-1], class_bounds[1:]):
      members = rng.permutation(by_class[lo:hi])
      p = rng.dirichlet(concentration)
      cuts = np.rint(np.cumsum(p) * len(members)).astype(np.int64)
      cuts = np.clip(cuts, 0, len(members))
      cuts[-1] = len(members)
      counts = np.diff(np.concatenate([[0], cuts]))
      client_of[members] = np.repeat(np.arange(num_clients), counts)
    if min_size == 0 or np.bincount(client_of, minlength=num_clients).min() >= min_size:
      return _pack(x, y, client_of, num_clients, rng)
  raise ValueError(f"Could not give every client min_size={min_size} examples in "
                   f"max_tries={max_tries} Dirichlet draws with alpha={alpha}; lower "
                   "min_size, raise alpha, or raise max_tries.")


def shards_partition(x, y, num_clients: int, shards_per_client: int = 2, *,
                     seed: int) -> FederatedData:
  """Pathological label skew: sort by label, deal out contiguous shards.

  The examples are sorted by label (random order within a label), cut into
  `num_clients * shards_per_client` shards of near-equal size (sizes differ by
  at most one), and each client receives `shards_per_client` shards chosen
  uniformly at random without replacement. With balanced classes and shards
  no larger than a class, each client sees at most `2 * shards_per_client`
  labels (McMahan et al.: 200 shards of 300 MNIST digits, 2 per client).

  Args:
    x: features, `[N, ...]`.
    y: integer labels, `[N]`.
    num_clients: number of clients (>= 1).
    shards_per_client: shards per client (>= 1); `num_clients *
      shards_per_client` must not exceed N.
    seed: non-negative integer seed.

  Returns:
    `FederatedData` with features `x` and `y`.

  Raises:
    ValueError: bad shapes, dtypes or argument ranges.

  References:
    McMahan, Moore, Ramage, Hampson, Aguera y Arcas. "Communication-Efficient
    Learning of Deep Networks from Decentralized Data", AISTATS 2017.
  """
  x, y = _check_xy(x, y)
  n = len(y)
  _check_int("num_clients", num_clients, 1)
  _check_int("shards_per_client", shards_per_client, 1)
  num_shards = num_clients * shards_per_client
  if num_shards > n:
    raise ValueError(f"num_clients * shards_per_client must be at most N = {n}; got "
                     f"{num_clients} * {shards_per_client} = {num_shards}.")
  _check_seed(seed)
  rng = np.random.default_rng(np.random.SeedSequence([seed, _SHARDS_PURPOSE]))
  shuffled = rng.permutation(n)
  sorted_by_label = shuffled[np.argsort(y[shuffled], kind="stable")]
  shard_of_position = np.repeat(np.arange(num_shards), _even_sizes(n, num_shards))
  client_of_shard = np.empty(num_shards, np.int64)
  client_of_shard[rng.permutation(num_shards)] = np.arange(num_shards) // shards_per_client
  client_of = np.empty(n, np.int64)
  client_of[sorted_by_label] = client_of_shard[shard_of_position]
  return _pack(x, y, client_of, num_clients, rng)


def _even_sizes(total: int, parts: int) -> np.ndarray:
  """`parts` sizes summing to `total` that differ by at most one."""
  bounds = (np.arange(parts + 1, dtype=np.int64) * total) // parts
  return np.diff(bounds)


def _check_xy(x, y) -> tuple[np.ndarray, np.ndarray]:
  x = np.asarray(x)
  y = np.asarray(y)
  if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"y must be a 1-D array of integer labels; got shape {y.shape} "
                     f"and dtype {y.dtype}.")
  if x.ndim < 1 or len(x) != len(y):
    raise ValueError(f"x must have shape [N, ...] with N = len(y) = {len(y)}; got shape "
                     f"{x.shape}.")
  if len(y) == 0:
    raise ValueError("x and y must hold at least one example; got N = 0.")
  info = np.iinfo(np.int32)
  if y.min() < info.min or y.max() > info.max:
    raise ValueError(f"y labels must fit in int32; got range [{y.min()}, {y.max()}].")
  return x, y


def _pack(x: np.ndarray, y: np.ndarray, client_of: np.ndarray, num_clients: int,
          rng: np.random.Generator) -> FederatedData:
  """Groups examples by client (random order within a client) and packs them."""
  shuffled = rng.permutation(len(y))
  order = shuffled[np.argsort(client_of[shuffled], kind="stable")]
  counts = np.bincount(client_of, minlength=num_clients)
  offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
  return FederatedData.from_offsets({"x": x[order], "y": y[order].astype(np.int32)}, offsets)
