"""The Synthetic(alpha, beta) benchmark of FedProx.

Every client owns a multinomial logistic-regression "teacher" and a feature
distribution; `alpha` controls how much the teachers differ between clients,
`beta` how much the feature distributions differ. Synthetic-IID shares one
teacher and one feature distribution among all clients.

The generator follows the public reference that defines the benchmark,
`litian96/FedProx`: `data/synthetic_{0_0,0.5_0.5,1_1}/generate_synthetic.py`
(non-IID) and `data/synthetic_iid/generate_iid.py` (IID). The constants and
where they come from:

* 60 features, 10 classes, 30 clients: `dimension`, `NUM_CLASS`, `NUM_USER`
  in the reference scripts (the paper states the same in its Sec. 5.1).
* Client sizes: `int(lognormal(mean=4, sigma=2)) + 50`, i.e. the integer part
  (floor) of a log-normal draw whose log has mean 4 and standard deviation 2,
  plus 50. The paper only says sizes "follow a power law"; the scripts draw
  them this way. Every client therefore has at least 50 examples.
* `Sigma_jj = j ** -1.2`, j = 1..60, diagonal: the scripts' `cov_x`.
* `u_k ~ N(0, alpha)`, `B_k ~ N(0, beta)`, `W_k, b_k` entries `~ N(u_k, 1)`
  (W and b share the same mean `u_k`), `v_k` entries `~ N(B_k, 1)`,
  `x ~ N(v_k, Sigma)`, `y = argmax(softmax(W_k^T x + b_k))`.
* IID: one shared `W, b` with entries `~ N(0, 1)` and `v_k = 0` for every
  client, same `Sigma` and sizes.

`alpha` and `beta` are STANDARD DEVIATIONS here. The paper writes
`u_k ~ N(0, alpha)`, which in its own notation reads as a variance, but the
reference scripts call `np.random.normal(0, alpha, ...)`, whose second argument
is the standard deviation. We follow the reference code: it produced the
Synthetic(0,0), (0.5,0.5) and (1,1) datasets every published result uses.
(For alpha = 0 and alpha = 1 both readings agree; they differ at 0.5.)

What we do not copy from the scripts: their global, unseeded
`np.random` stream (we take an explicit `seed`), their per-example Python loop
and JSON output, and their 90/10 per-client train/test split (use
`FederatedData.split_examples(0.1)`; examples are i.i.d. within a client, so
the stored order is already a random order).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from fedjax_sim.core.data import FederatedData
from fedjax_sim.core.registry import DATASETS, DataSection
from fedjax_sim.core.schema import non_negative, option, positive


_SEED_PURPOSE = 0x5E7C1A

# Constants of the reference generator (litian96/FedProx, data/synthetic_*).
_REF_NUM_FEATURES = 60
_REF_NUM_CLASSES = 10
_REF_NUM_CLIENTS = 30
_REF_SIZE_LOG_MEAN = 4.0
_REF_SIZE_LOG_SIGMA = 2.0
_REF_MIN_SIZE = 50
_REF_COV_EXPONENT = 1.2


class SyntheticParams(NamedTuple):
  """The latent draws behind a Synthetic(alpha, beta) dataset.

  Attributes:
    u: `[num_clients]`, mean of the entries of client k's `W_k` and `b_k`
      (all zeros for IID).
    B: `[num_clients]`, mean of the entries of client k's feature mean `v_k`
      (all zeros for IID).
    v: `[num_clients, num_features]`, client k's feature mean.
    W: `[num_clients, num_features, num_classes]`, client k's teacher weights
      (the same matrix repeated for IID).
    b: `[num_clients, num_classes]`, client k's teacher bias.
    cov_diag: `[num_features]`, the diagonal of the feature covariance.
  """

  u: np.ndarray
  B: np.ndarray
  v: np.ndarray
  W: np.ndarray
  b: np.ndarray
  cov_diag: np.ndarray


def leaf_synthetic(
    alpha: float,
    beta: float,
    num_clients: int = _REF_NUM_CLIENTS,
    *,
    seed: int,
    iid: bool = False,
    num_features: int = _REF_NUM_FEATURES,
    num_classes: int = _REF_NUM_CLASSES,
    min_size: int = _REF_MIN_SIZE,
    max_size: int | None = None,
    size_log_mean: float = _REF_SIZE_LOG_MEAN,
    size_log_sigma: float = _REF_SIZE_LOG_SIGMA,
    cov_exponent: float = _REF_COV_EXPONENT,
    return_params: bool = False,
) -> FederatedData | tuple[FederatedData, SyntheticParams]:
  """Generates Synthetic(alpha, beta) (or Synthetic-IID) as packed client data.

  For client k (see the module docstring for the source of each constant):
  `u_k ~ N(0, alpha^2)`, `B_k ~ N(0, beta^2)` (alpha, beta are standard
  deviations, as in the reference code); `W_k` (`[d, C]`) and `b_k` (`[C]`)
  have entries `~ N(u_k, 1)`; `v_k` has entries `~ N(B_k, 1)`;
  `x ~ N(v_k, diag(j ** -cov_exponent))`; `y = argmax(x @ W_k + b_k)`
  (argmax of the softmax). Client sizes are
  `min(floor(LogNormal(size_log_mean, size_log_sigma)) + min_size, max_size)`.

  With `iid=True`, `alpha` and `beta` are ignored (the reference generates
  Synthetic-IID with alpha = beta = 0): every client uses one `W, b` with
  entries `~ N(0, 1)` and `v_k = 0`.

  Features are stored as float32; labels are the argmax computed in float64
  from the stored float32 features, so they are exactly the teacher's
  predictions on the data as stored.

  Args:
    alpha: standard deviation of the per-client teacher mean `u_k` (>= 0).
    beta: standard deviation of the per-client feature-mean center `B_k` (>= 0).
    num_clients: number of clients (>= 1); the reference uses 30.
    seed: non-negative integer seed; the output depends on nothing else.
    iid: generate Synthetic-IID instead.
    num_features: feature dimension d (reference: 60).
    num_classes: number of classes C (reference: 10).
    min_size: added to every log-normal size draw (reference: 50).
    max_size: optional cap on a client's size (>= min_size); None = no cap.
      The reference has no cap, and log-normal(4, 2) sizes are heavy-tailed.
    size_log_mean: mean of log size (reference: 4).
    size_log_sigma: standard deviation of log size (reference: 2).
    cov_exponent: `Sigma_jj = j ** -cov_exponent` (reference: 1.2).
    return_params: also return the latent draws (`SyntheticParams`).

  Returns:
    `FederatedData` with features `x` (float32 `[N, d]`) and `y` (int32
    `[N]`), clients stored contiguously in order; with `return_params`, the
    pair `(data, params)`.

  Raises:
    ValueError: an argument is out of range.

  References:
    Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith. "Federated Optimization in
    Heterogeneous Networks" (FedProx), MLSys 2020; reference generator in
    github.com/litian96/FedProx, data/synthetic_*/.
  """
  _check_nonneg_float("alpha", alpha)
  _check_nonneg_float("beta", beta)
  _check_int("num_clients", num_clients, 1)
  _check_seed(seed)
  _check_int("num_features", num_features, 1)
  _check_int("num_classes", num_classes, 2)
  _check_int("min_size", min_size, 0)
  if max_size is not None:
    _check_int("max_size", max_size, max(min_size, 1))
  _check_finite_float("size_log_mean", size_log_mean)
  _check_nonneg_float("size_log_sigma", size_log_sigma)
  _check_finite_float("cov_exponent", cov_exponent)

  rng = np.random.default_rng(np.random.SeedSequence([seed, _SEED_PURPOSE]))
  sizes = _draw_sizes(rng, num_clients, size_log_mean, size_log_sigma, min_size, max_size)

  cov_diag = np.arange(1, num_features + 1, dtype=np.float64) ** (-float(cov_exponent))
  std = np.sqrt(cov_diag)

  if iid:
    u = np.zeros(num_clients)
    B = np.zeros(num_clients)
    v = np.zeros((num_clients, num_features))
    W_shared = rng.normal(0.0, 1.0, (num_features, num_classes))
    b_shared = rng.normal(0.0, 1.0, num_classes)
    W = np.broadcast_to(W_shared, (num_clients, num_features, num_classes)).copy()
    b = np.broadcast_to(b_shared, (num_clients, num_classes)).copy()
  else:
    u = rng.normal(0.0, float(alpha), num_clients)
    B = rng.normal(0.0, float(beta), num_clients)
    v = rng.normal(B[:, None], 1.0, (num_clients, num_features))
    W = rng.normal(u[:, None, None], 1.0, (num_clients, num_features, num_classes))
    b = rng.normal(u[:, None], 1.0, (num_clients, num_classes))

  offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
  total = int(offsets[-1])
  x = np.empty((total, num_features), np.float32)
  y = np.empty(total, np.int32)
  for k in range(num_clients):
    lo, hi = int(offsets[k]), int(offsets[k + 1])
    if hi == lo:
      continue
    z = rng.standard_normal((hi - lo, num_features))
    x[lo:hi] = v[k] + z * std
    logits = x[lo:hi].astype(np.float64) @ W[k] + b[k]
    y[lo:hi] = np.argmax(logits, axis=1)

  data = FederatedData.from_offsets({"x": x, "y": y}, offsets)
  if return_params:
    return data, SyntheticParams(u=u, B=B, v=v, W=W, b=b, cov_diag=cov_diag)
  return data


def _draw_sizes(rng: np.random.Generator, num_clients: int, log_mean: float,
                log_sigma: float, min_size: int, max_size: int | None) -> np.ndarray:
  """`floor(LogNormal(log_mean, log_sigma)) + min_size`, capped at `max_size`."""
  raw = rng.lognormal(log_mean, log_sigma, num_clients)
  # Cap before the integer cast so an extreme draw cannot overflow int64.
  cap = float(max_size) if max_size is not None else 2.0 ** 52
  sizes = np.floor(np.minimum(raw, cap)).astype(np.int64) + int(min_size)
  if max_size is not None:
    sizes = np.minimum(sizes, int(max_size))
  return sizes


def _check_int(name: str, value, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}.")
  if value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}; got {value}.")


def _check_seed(seed) -> None:
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be a non-negative integer; got {seed!r}.")


def _check_finite_float(name: str, value) -> None:
  try:
    ok = np.isfinite(float(value)) and not isinstance(value, bool)
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(f"{name} must be a finite real number; got {value!r}.")


def _check_nonneg_float(name: str, value) -> None:
  _check_finite_float(name, value)
  if float(value) < 0:
    raise ValueError(f"{name} must be a finite real number >= 0; got {value!r}.")


# -- registered as data.kind = leaf_synthetic -------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class LeafSyntheticConfig(DataSection):
  """Synthetic(alpha, beta) of Li et al. 2020 (FedProx)."""

  num_clients: int = option(100, check=(positive, "must be >= 1"))
  alpha: float = option(0.5, check=(non_negative, "must be >= 0"))
  beta: float = option(0.5, check=(non_negative, "must be >= 0"))
  iid: bool = False


@DATASETS.register("leaf_synthetic", LeafSyntheticConfig)
def _build(cfg: LeafSyntheticConfig, ctx) -> FederatedData:
  """Synthetic(alpha, beta) of Li et al. 2020 (FedProx)."""
  return leaf_synthetic(cfg.alpha, cfg.beta, cfg.num_clients, seed=ctx.seed, iid=cfg.iid)
