"""A non-IID Gaussian-mixture classification task that scales to millions of clients.

Meant for benchmarking the simulator at population scale, where no real
dataset is large enough: 1,000,000 clients x 32 examples x 64 features is
8 GB of float32 features, generated into one preallocated array in bounded
extra memory (tens of MB, independent of the number of clients).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os

import numpy as np

from fedjax_sim.core.data import FederatedData, aligned_empty
from fedjax_sim.core.registry import DATASETS, DataSection
from fedjax_sim.core.schema import ConfigError, non_negative, option, positive
from fedjax_sim.datasets.synthetic import (_check_finite_float, _check_int, _check_nonneg_float,
                                           _check_seed)


_MIXTURE_PURPOSE = 0x6A55
_SIZES_PURPOSE = 0x1065

# Clients whose per-client parameters (class mixture, mean shift) are drawn at
# once, and the byte budget of one per-example temporary array. Both are fixed
# so the output depends only on the arguments, never on the machine.
_CLIENTS_PER_CHUNK = 16384
_TEMP_BYTES = 64 << 20
# Threads that generate chunks at once, at most (numpy's generators release the GIL
# while they fill arrays); each holds its own temporaries.
_MAX_THREADS = 16


def lognormal_sizes(num_clients: int, median: float = 32, sigma: float = 1.0,
                    max_size: int = 1024, min_size: int = 1, *, seed: int) -> np.ndarray:
  """Heterogeneous client sizes: `clip(round(median * exp(sigma * Z)), min_size, max_size)`.

  Args:
    num_clients: number of sizes to draw (>= 1).
    median: median size before clipping (> 0).
    sigma: standard deviation of the log size (>= 0; 0 gives `round(median)`).
    max_size: largest allowed size (>= max(min_size, 1)).
    min_size: smallest allowed size (>= 0).
    seed: non-negative integer seed.

  Returns:
    int64 array `[num_clients]`.

  Raises:
    ValueError: an argument is out of range.

  References:
    Log-normal client sizes as in Li et al. "Federated Optimization in
    Heterogeneous Networks" (FedProx), MLSys 2020, whose synthetic data draws
    sizes from a log-normal distribution.
  """
  _check_int("num_clients", num_clients, 1)
  _check_finite_float("median", median)
  if float(median) <= 0:
    raise ValueError(f"median must be a finite number > 0; got {median!r}.")
  _check_nonneg_float("sigma", sigma)
  _check_int("min_size", min_size, 0)
  _check_int("max_size", max_size, max(min_size, 1))
  _check_seed(seed)
  rng = np.random.default_rng(np.random.SeedSequence([seed, _SIZES_PURPOSE]))
  log_sizes = np.log(float(median)) + float(sigma) * rng.standard_normal(num_clients)
  # Clip in log space first so exp cannot overflow.
  log_sizes = np.minimum(log_sizes, np.log(float(max_size)) + 1.0)
  sizes = np.rint(np.exp(log_sizes))
  return np.clip(sizes, min_size, max_size).astype(np.int64)


def gaussian_mixture(
    num_clients: int,
    examples_per_client: int = 32,
    num_features: int = 64,
    num_classes: int = 10,
    *,
    seed: int,
    label_skew: float | None = 0.5,
    client_shift: float = 1.0,
    class_sep: float = 3.0,
    noise: float = 1.0,
    sizes=None,
    threads: int | None = None,
) -> FederatedData:
  """Generates a non-IID Gaussian-mixture classification task.

  Global class means `mu_c` (`[num_classes, num_features]`, entries
  `~ N(0, class_sep^2 / num_features)`, so `||mu_c|| ~= class_sep`) are fixed
  by the seed. Client k has class proportions `p_k ~ Dirichlet(label_skew *
  1_C)` (uniform `1/C` when `label_skew` is None) and a mean shift `s_k`
  (entries `~ N(0, client_shift^2 / num_features)`, so `||s_k|| ~=
  client_shift`). Each of its examples is `y ~ Categorical(p_k)`,
  `x = mu_y + s_k + noise * N(0, I)`.

  The features are written into one preallocated float32 array, generated in
  float32, a chunk of clients at a time, chunks on several threads; extra
  memory stays bounded (about 100 MB per thread at most for typical shapes)
  whatever the number of clients, so 1,000,000 clients x 32 x 64 needs the
  8 GB output plus that.

  Args:
    num_clients: number of clients (>= 1).
    examples_per_client: examples per client when `sizes` is None (>= 1).
    num_features: feature dimension (>= 1).
    num_classes: number of classes (>= 2).
    seed: non-negative integer seed; the output depends on nothing else.
    label_skew: Dirichlet concentration of each client's class mixture
      (> 0; small = each client sees few classes), or None for IID labels.
    client_shift: scale of the per-client feature shift (>= 0; 0 = none).
    class_sep: scale of the class means (>= 0).
    noise: per-feature standard deviation of the within-class noise (>= 0).
    sizes: optional per-client sizes, integer array `[num_clients]` of values
      >= 0 (e.g. from `lognormal_sizes`); overrides `examples_per_client`.
    threads: chunks of 16,384 clients generated at once (None: one per CPU
      core, at most 16). The output does not depend on it: the first chunk
      continues the seed's stream after the class means, and chunk k >= 1 has
      its own stream, `SeedSequence([seed, purpose, k])`. So the first
      `16384 * j` clients of a population are the population of `16384 * j`
      clients, and a population of at most 16,384 clients is what this
      function gave before it had threads.

  Returns:
    `FederatedData` with features `x` (float32 `[N, num_features]`) and `y`
    (int32 `[N]`), clients stored contiguously in order.

  Raises:
    ValueError: an argument is out of range.

  References:
    Label skew by per-client Dirichlet class mixtures as in Hsu, Qi, Brown.
    "Measuring the Effects of Non-Identical Data Distribution for Federated
    Visual Classification", arXiv:1909.06335, 2019; per-client feature shift
    ("covariate shift") as in Kairouz et al. "Advances and Open Problems in
    Federated Learning", FnTML 2021, Sec. 3.1.
  """
  _check_int("num_clients", num_clients, 1)
  _check_int("num_features", num_features, 1)
  _check_int("num_classes", num_classes, 2)
  _check_seed(seed)
  if label_skew is not None:
    _check_finite_float("label_skew", label_skew)
    if float(label_skew) <= 0:
      raise ValueError(f"label_skew must be a finite number > 0 or None; got {label_skew!r}.")
  _check_nonneg_float("client_shift", client_shift)
  _check_nonneg_float("class_sep", class_sep)
  _check_nonneg_float("noise", noise)
  if sizes is None:
    _check_int("examples_per_client", examples_per_client, 1)
    sizes = np.full(num_clients, examples_per_client, np.int64)
  else:
    sizes = np.asarray(sizes)
    if (sizes.shape != (num_clients,) or not np.issubdtype(sizes.dtype, np.integer)
        or sizes.min() < 0):
      raise ValueError(f"sizes must be an integer array of shape ({num_clients},) with "
                       f"values >= 0; got shape {sizes.shape}, dtype {sizes.dtype}.")
    sizes = sizes.astype(np.int64)

  rng = np.random.default_rng(np.random.SeedSequence([seed, _MIXTURE_PURPOSE]))
  means = rng.standard_normal((num_classes, num_features), dtype=np.float32)
  means *= np.float32(float(class_sep) / np.sqrt(num_features))
  shift_scale = np.float32(float(client_shift) / np.sqrt(num_features))
  noise32 = np.float32(noise)

  offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
  total = int(offsets[-1])
  # 64-byte aligned: CPU devices can then hold the data without a copy (core/resident.py).
  x = aligned_empty((total, num_features), np.float32)
  y = aligned_empty((total,), np.int32)
  # Examples per step: one [step, max(D, C)] float64/float32 temporary fits the budget.
  step = max(1024, _TEMP_BYTES // (8 * max(num_features, num_classes)))

  def fill(chunk: int, rng: np.random.Generator) -> None:
    c_lo = chunk * _CLIENTS_PER_CHUNK
    c_hi = min(c_lo + _CLIENTS_PER_CHUNK, num_clients)
    m = c_hi - c_lo
    if label_skew is None:
      cdf = None
    else:
      mix = rng.dirichlet(np.full(num_classes, float(label_skew)), size=m)
      cdf = np.cumsum(mix, axis=1)[:, :-1]  # label = #{j < C-1 : cdf_j <= u}
    shifts = rng.standard_normal((m, num_features), dtype=np.float32)
    shifts *= shift_scale
    local_offsets = offsets[c_lo:c_hi + 1]
    for e_lo in range(int(local_offsets[0]), int(local_offsets[-1]), step):
      e_hi = min(e_lo + step, int(local_offsets[-1]))
      client = np.searchsorted(local_offsets, np.arange(e_lo, e_hi), side="right") - 1
      if cdf is None:
        labels = rng.integers(0, num_classes, e_hi - e_lo, dtype=np.int32)
      else:
        u = rng.random(e_hi - e_lo)
        labels = np.count_nonzero(cdf[client] <= u[:, None], axis=1).astype(np.int32)
      y[e_lo:e_hi] = labels
      out = x[e_lo:e_hi]
      rng.standard_normal(out=out, dtype=np.float32)
      if noise32 != 1:
        out *= noise32
      out += means[labels]
      out += shifts[client]

  def chunk_rng(chunk: int) -> np.random.Generator:
    if chunk == 0:
      return rng  # the seed's stream, after the class means
    return np.random.default_rng(np.random.SeedSequence([seed, _MIXTURE_PURPOSE, chunk]))

  chunks = -(-num_clients // _CLIENTS_PER_CHUNK)
  if threads is None:
    threads = min(os.cpu_count() or 1, _MAX_THREADS)
  _check_int("threads", threads, 1)
  if threads == 1 or chunks == 1:
    for chunk in range(chunks):
      fill(chunk, chunk_rng(chunk))
  else:
    with concurrent.futures.ThreadPoolExecutor(min(threads, chunks)) as pool:
      for done in [pool.submit(fill, k, chunk_rng(k)) for k in range(chunks)]:
        done.result()  # raises a worker's error here

  return FederatedData.from_offsets({"x": x, "y": y}, offsets)


# -- registered as data.kind = gaussian_mixture -----------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class GaussianMixtureConfig(DataSection):
  """A non-IID Gaussian mixture (the benchmark workload)."""

  num_clients: int = option(100, check=(positive, "must be >= 1"))
  examples_per_client: int = option(32, check=(positive, "must be >= 1"))
  num_features: int = option(64, check=(positive, "must be >= 1"))
  label_skew: float = option(0.5, check=(positive, "must be > 0 (a Dirichlet concentration)"))
  size_sigma: float = option(0.0, check=(non_negative, "must be >= 0 (0 = equal sizes)"))
  max_client_size: int = option(1024, check=(positive, "must be >= 1"))

  def __post_init__(self):
    if self.size_sigma > 0 and self.max_client_size < self.examples_per_client:
      raise ConfigError("data.max_client_size must be >= data.examples_per_client (the median "
                        "size).")


@DATASETS.register("gaussian_mixture", GaussianMixtureConfig)
def _build(cfg: GaussianMixtureConfig, ctx) -> FederatedData:
  """A non-IID Gaussian mixture (the benchmark workload)."""
  sizes = None
  if cfg.size_sigma > 0:
    sizes = lognormal_sizes(cfg.num_clients, median=cfg.examples_per_client,
                            sigma=cfg.size_sigma, max_size=cfg.max_client_size, seed=ctx.seed)
  return gaussian_mixture(cfg.num_clients, cfg.examples_per_client, cfg.num_features,
                          cfg.num_classes, seed=ctx.seed, label_skew=cfg.label_skew, sizes=sizes)
