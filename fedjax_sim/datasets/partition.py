"""Splitting one centralized dataset into clients.

Each partitioner takes in-memory arrays `x` (`[N, ...]`, any dtype) and `y`
(integer labels `[N]`), assigns every example to at most one client (every
example to exactly one, except `pachinko_partition`, which deals a fixed
number per client), and packs the result as `FederatedData` with features `x`
(same dtype and trailing shape as given: an image dataset stays uint8) and `y`
(int32). Within a client the examples are stored in a random order, so
`FederatedData.split_examples` gives a random per-client split.
"""

from __future__ import annotations

import numpy as np

from fedjax_sim.core.data import FederatedData
from fedjax_sim.datasets.synthetic import _check_int, _check_seed

_IID_PURPOSE = 0x11D
_DIRICHLET_PURPOSE = 0xD1C1
_SHARDS_PURPOSE = 0x5A4D
_QUANTITY_PURPOSE = 0x9A47
_PACHINKO_PURPOSE = 0xBA11


def _check_min_size(min_size: int, num_clients: int, n: int) -> None:
  _check_int("min_size", min_size, 0)
  if min_size * num_clients > n:
    raise ValueError(f"min_size must be at most N // num_clients = {n // num_clients} "
                     f"so that every client can get it; got {min_size}.")


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
  _check_positive("alpha", alpha)
  _check_seed(seed)
  _check_min_size(min_size, num_clients, n)
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


def quantity_skew_partition(x, y, num_clients: int, *, exponent: float, seed: int,
                            min_size: int = 1) -> FederatedData:
  """Quantity skew: client sizes follow a power law; the examples are dealt IID.

  Client k draws a weight `w_k = exp(E_k / a)` with `E_k ~ Exponential(1)`
  and `a = exponent`, i.e. `w_k` is Pareto (type I) with scale 1 and tail
  index `a`: `P(w_k > w) = w^-a` for `w >= 1`. Every client first gets
  `min_size` examples; the other `N - num_clients * min_size` are shared in
  proportion to the weights, rounded by largest remainder so that the sizes
  sum to N exactly. A smaller exponent gives a heavier tail: with `a <= 1`
  the weights have no mean and a few clients hold most of the data; as `a`
  grows the sizes approach `N / num_clients`. Which examples a client gets is
  uniformly random (no label skew), so quantity skew can be studied alone.

  Args:
    x: features, `[N, ...]`.
    y: integer labels, `[N]`.
    num_clients: number of clients K (>= 1).
    exponent: the power law's tail index a (> 0).
    seed: non-negative integer seed.
    min_size: examples every client gets at least (>= 0, at most N // K).

  Returns:
    `FederatedData` with features `x` and `y`; every example is used once.

  Raises:
    ValueError: bad shapes, dtypes or argument ranges.

  References:
    Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith. "Federated Optimization in
    Heterogeneous Networks", MLSys 2020 (device sizes following a power law);
    Li, Diao, Chen, He. "Federated Learning on Non-IID Data Silos: An
    Experimental Study", ICDE 2022 (quantity skew with IID labels).
  """
  x, y = _check_xy(x, y)
  n = len(y)
  _check_int("num_clients", num_clients, 1)
  _check_positive("exponent", exponent)
  _check_seed(seed)
  _check_min_size(min_size, num_clients, n)
  rng = np.random.default_rng(np.random.SeedSequence([seed, _QUANTITY_PURPOSE]))
  log_w = rng.standard_exponential(num_clients) / float(exponent)
  w = np.exp(log_w - log_w.max())  # the same proportions, without overflow for small a
  extra = n - min_size * num_clients
  share = extra * (w / w.sum())
  sizes = np.floor(share).astype(np.int64)
  short = extra - int(sizes.sum())
  sizes[np.argsort(-(share - sizes), kind="stable")[:short]] += 1
  sizes += min_size
  client_of = np.empty(n, np.int64)
  client_of[rng.permutation(n)] = np.repeat(np.arange(num_clients), sizes)
  return _pack(x, y, client_of, num_clients, rng)


def pachinko_partition(x, y, coarse, num_clients: int, examples_per_client: int, *,
                       alpha: float = 0.1, beta: float = 10.0, seed: int) -> FederatedData:
  """The Pachinko Allocation partition of Reddi et al. (federated CIFAR-100).

  For labels with a two-level hierarchy (CIFAR-100's 100 fine labels in 20
  coarse labels), clients are filled one after the other. Client k draws a
  distribution over the coarse labels that still have examples, `p ~
  Dir(alpha)`, and for each such coarse label c a distribution over its fine
  labels that still have examples, `q_c ~ Dir(beta)`. Each of its
  `examples_per_client` examples is drawn by picking a coarse label c from
  `p`, then a fine label f from `q_c`, then an example of label f uniformly at
  random, without replacement. When that takes the last example of f, f is
  removed and `q_c` renormalized over c's other fine labels; when c has no
  fine label left, c is removed and `p` renormalized. Exhausted labels stay
  removed for the later clients. (A distribution whose remaining mass is zero
  in floating point, possible with tiny alpha or beta, becomes uniform over
  what remains.) Small `alpha` concentrates a client on few coarse labels;
  large `beta` spreads it evenly over their fine labels. Reddi et al. use
  alpha = 0.1, beta = 10 and 100 examples per client (500 train clients, 100
  test clients).

  Draws are made in batches: a client's remaining draws are sampled at once
  and accepted up to the first one that exhausts a label, which is the
  sequential procedure above (draws are independent until a label runs out).

  Args:
    x: features, `[N, ...]`.
    y: integer (fine) labels, `[N]`.
    coarse: integer coarse labels, `[N]`; every fine label must always have
      the same coarse label.
    num_clients: number of clients K (>= 1).
    examples_per_client: examples each client gets (>= 1); K times it must
      not exceed N. The examples left over belong to no client.
    alpha: Dirichlet concentration over coarse labels (> 0).
    beta: Dirichlet concentration over a coarse label's fine labels (> 0).
    seed: non-negative integer seed.

  Returns:
    `FederatedData` with features `x` and `y` (fine labels), every client
    holding exactly `examples_per_client` examples, none used twice.

  Raises:
    ValueError: bad shapes, dtypes or argument ranges, or a fine label with
      two coarse labels.

  References:
    Reddi, Charles, Zaheer, Garrett, Rush, Konecny, Kumar, McMahan. "Adaptive
    Federated Optimization", ICLR 2021, Appendix (CIFAR-100), as documented
    in TensorFlow Federated's `tff.simulation.datasets.cifar100.load_data`;
    Li, McCallum. "Pachinko Allocation: DAG-Structured Mixture Models of
    Topic Correlations", ICML 2006. The removal and renormalization of
    exhausted labels follow FedEM's `pachinko_allocation_split` (Marfoq et
    al., NeurIPS 2021, github.com/omarfoq/FedEM, data/cifar100/utils.py).
  """
  x, y = _check_xy(x, y)
  n = len(y)
  coarse = np.asarray(coarse)
  if coarse.shape != y.shape or not np.issubdtype(coarse.dtype, np.integer):
    raise ValueError(f"coarse must be a 1-D array of integer coarse labels, one per example "
                     f"(shape {y.shape}); got shape {coarse.shape} and dtype {coarse.dtype}.")
  _check_int("num_clients", num_clients, 1)
  _check_int("examples_per_client", examples_per_client, 1)
  if num_clients * examples_per_client > n:
    raise ValueError(f"num_clients * examples_per_client must be at most N = {n}; got "
                     f"{num_clients} * {examples_per_client} = "
                     f"{num_clients * examples_per_client}.")
  _check_positive("alpha", alpha)
  _check_positive("beta", beta)
  _check_seed(seed)

  fine_values, fine = np.unique(y, return_inverse=True)
  pairs = np.unique(np.stack([fine, coarse.astype(np.int64)]), axis=1)
  if pairs.shape[1] != len(fine_values):
    f = pairs[0][np.flatnonzero(np.diff(pairs[0]) == 0)[0]]
    raise ValueError(f"every fine label must belong to one coarse label; label "
                     f"{fine_values[f]} has coarse labels "
                     f"{sorted(np.unique(coarse[fine == f]).tolist())}.")
  _, group = np.unique(pairs[1], return_inverse=True)  # coarse index of each fine label
  num_fine, num_coarse = len(fine_values), int(group.max()) + 1

  rng = np.random.default_rng(np.random.SeedSequence([seed, _PACHINKO_PURPOSE]))
  shuffled = rng.permutation(n)
  pool = shuffled[np.argsort(fine[shuffled], kind="stable")]  # each label's examples, shuffled
  left = np.bincount(fine, minlength=num_fine)
  next_ = np.concatenate([[0], np.cumsum(left)[:-1]])
  chosen = np.empty((num_clients, examples_per_client), np.int64)
  for k in range(num_clients):
    alive_c = np.bincount(group[left > 0], minlength=num_coarse) > 0
    p = np.zeros(num_coarse)
    p[alive_c] = rng.dirichlet(np.full(int(alive_c.sum()), float(alpha)))
    q = np.zeros(num_fine)
    for c in np.flatnonzero(alive_c):
      members = np.flatnonzero((group == c) & (left > 0))
      q[members] = rng.dirichlet(np.full(len(members), float(beta)))
    filled = 0
    while filled < examples_per_client:
      draws = rng.choice(num_fine, size=examples_per_client - filled,
                         p=_pachinko_weights(p, q, group, left > 0))
      rank = _occurrence_rank(draws)
      exhausting = np.flatnonzero(rank + 1 == left[draws])
      m = int(exhausting[0]) + 1 if len(exhausting) else len(draws)
      draws, rank = draws[:m], rank[:m]
      chosen[k, filled:filled + m] = pool[next_[draws] + rank]
      taken = np.bincount(draws, minlength=num_fine)
      next_ += taken
      left -= taken
      filled += m
  index = chosen.reshape(-1)
  offsets = np.arange(num_clients + 1, dtype=np.int64) * examples_per_client
  return FederatedData.from_offsets({"x": x[index], "y": y[index].astype(np.int32)}, offsets)


def _pachinko_weights(p: np.ndarray, q: np.ndarray, group: np.ndarray,
                      alive: np.ndarray) -> np.ndarray:
  """P(fine label f) = p(c) q_c(f) with p and each q_c renormalized over what is alive."""
  alive_c = np.bincount(group[alive], minlength=len(p)) > 0
  p = _renormalized(p, alive_c)
  q = np.where(alive, np.nan_to_num(q), 0.0)
  mass = np.bincount(group, weights=q, minlength=len(p))
  q = np.where(alive & (mass[group] <= 0), 1.0, q)  # a q_c with no mass left: uniform
  mass = np.bincount(group, weights=q, minlength=len(p))
  w = p[group] * q / np.where(mass[group] > 0, mass[group], 1.0)
  return w / w.sum()


def _renormalized(w: np.ndarray, alive: np.ndarray) -> np.ndarray:
  w = np.where(alive, np.nan_to_num(w), 0.0)
  total = w.sum()
  return w / total if total > 0 else alive / alive.sum()


def _occurrence_rank(values: np.ndarray) -> np.ndarray:
  """For each entry, how many earlier entries hold the same value."""
  order = np.argsort(values, kind="stable")
  ordered = values[order]
  rank = np.empty(len(values), np.int64)
  rank[order] = np.arange(len(values)) - np.searchsorted(ordered, ordered, side="left")
  return rank


def _check_positive(name: str, value) -> None:
  try:
    ok = not isinstance(value, bool) and float(value) > 0 and np.isfinite(float(value))
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(f"{name} must be a finite number > 0; got {value!r}.")


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
