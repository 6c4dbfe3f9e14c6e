"""Small contractions of vmapped clients as unrolled sums of products (XLA:CPU).

Vmapping a client update over a block of clients turns every matrix product
of two per-client operands into a batched `dot_general`. Those whose
contraction is short are the gradient products of a small batch: the
weight gradient `x^T g` of a dense layer contracts over the batch's
examples (8 in the W1 benchmark workload), and the MLP's back-propagated
error `g W^T` over the classes. XLA:CPU runs such a batched product as one
tiny matrix product per client, far below the machine's matmul rate.

`unrolled_small_contractions()` is a context manager under which vmap
batches such a product differently: for contraction length k <= `max_k`,
as `sum_i a_i (x) b_i`, k broadcast products of the operands' slices added
in order i = 0..k-1, which XLA fuses into one loop over the block. The
arithmetic is the same products, summed in a fixed order that may differ
from the matrix product's, so results agree to float rounding, not bit
for bit, with the un-rewritten program; a program traced under the context
is itself deterministic. Products with an unbatched operand (the first
local step's forward pass against the shared server model is one large
matrix product), with batch dimensions of their own, with several
contracting dimensions, or with a longer contraction keep JAX's rule.

The engine traces its chunk programs under this context on CPU devices
(`EngineConfig.small_contractions`; 0 turns it off). The first use puts
this module's rule in JAX's batching rule table for `dot_general` (a
private table, `jax._src`); outside the context (a thread-local JAX config
state, part of JAX's trace and compilation cache keys) the rule hands every
product to JAX's own rule. Where that table is missing (another JAX
version), `available()` is False and programs are traced as usual.

What it buys is measured by `experiments/benchmarks/throughput.py`, whose
`scan_vmap_sharded_unrolled` reference is the hand-written round traced
under this context beside the plain one, in the same run; the figures are
in the README (Round throughput).
"""

from __future__ import annotations

import contextlib
import threading

import jax.numpy as jnp

try:  # JAX internals: the batching rule table and config states (checked by `available`).
  from jax._src import config as _config
  from jax._src.interpreters import batching as _batching
  from jax._src.lax import lax as _lax
  _TABLE = _batching.fancy_primitive_batchers
  _JAX_RULE = _TABLE[_lax.dot_general_p]
  # The setting is part of JAX's trace and compilation cache keys, so a function traced
  # with it on is never served to a trace with it off (or with another length), and back.
  _MAX_K = _config.int_state(
      "fedjax_sim_small_contractions", 0,
      "fedjax_sim: vmap batches dot_generals contracting at most this many elements as "
      "unrolled sums of products (0: JAX's rule)",
      include_in_jit_key=True, include_in_trace_context=True)
except (ImportError, AttributeError, KeyError, TypeError):  # pragma: no cover
  _TABLE = _JAX_RULE = _MAX_K = None

# The contraction lengths the engine unrolls on CPU: 8 (the batch of the W1 workload) and
# 10 (its classes) were faster unrolled in the engine's round, 64 (its features) much slower
# (an exploratory comparison on the 2-core CPU, 2026-11-30, not a benchmark).
CPU_MAX_K = 16

_LOCK = threading.Lock()


def available() -> bool:
  """Whether this JAX version has the batching rule table the rewrite replaces."""
  return _JAX_RULE is not None


def _unrolled(lhs, rhs, lhs_bdim: int, rhs_bdim: int, lhs_k: int, rhs_k: int, dtype):
  """`sum_i lhs[.., i, ..] (x) rhs[.., i, ..]` with the vmapped dimension first.

  `lhs_k`, `rhs_k`: the contracting dims, numbered without the vmapped dim.
  """
  a = jnp.moveaxis(jnp.moveaxis(lhs, lhs_bdim, 0), lhs_k + 1, 1)  # [B, k, lhs free...]
  b = jnp.moveaxis(jnp.moveaxis(rhs, rhs_bdim, 0), rhs_k + 1, 1)  # [B, k, rhs free...]
  n_lhs, n_rhs = a.ndim - 2, b.ndim - 2
  out = None
  for i in range(a.shape[1]):
    term = (a[:, i].reshape(a.shape[:1] + a.shape[2:] + (1,) * n_rhs).astype(dtype)
            * b[:, i].reshape(b.shape[:1] + (1,) * n_lhs + b.shape[2:]).astype(dtype))
    out = term if out is None else out + term
  return out


def _rule(axis_data, batched_args, batch_dims, *, dimension_numbers, precision=None,
          preferred_element_type=None, out_sharding=None, **params):
  lhs, rhs = batched_args
  lbd, rbd = batch_dims
  (lc, rc), (lb, rb) = dimension_numbers
  max_k = _MAX_K.value
  if (max_k and lbd is not None and rbd is not None and not lb and not rb and len(lc) == 1
      and lhs.dtype == rhs.dtype and jnp.issubdtype(lhs.dtype, jnp.floating)
      and lhs.shape[lbd] == rhs.shape[rbd]):
    # Contracting dims are numbered without the vmapped dim.
    k = lhs.shape[lc[0] + (lc[0] >= lbd)]
    if k <= max_k:
      # The sum runs in float32 at least, as XLA's matrix products accumulate.
      dtype = jnp.dtype(preferred_element_type or lhs.dtype)
      acc = jnp.promote_types(dtype, jnp.float32)
      return _unrolled(lhs, rhs, lbd, rbd, lc[0], rc[0], acc).astype(dtype), 0
  return _JAX_RULE(axis_data, batched_args, batch_dims, dimension_numbers=dimension_numbers,
                   precision=precision, preferred_element_type=preferred_element_type,
                   out_sharding=out_sharding, **params)


@contextlib.contextmanager
def unrolled_small_contractions(max_k: int = CPU_MAX_K):
  """Within the block, vmap batches products contracting <= `max_k` elements as sums.

  Raises:
    ValueError: `max_k` is negative.

  Only tracing is affected (what vmap emits). The length is a JAX config
  state of this thread, part of JAX's cache keys: a program traced under
  the context is traced again outside it, and the reverse. `max_k` = 0 (or
  a JAX without the rule table) leaves everything as it is; other threads
  trace as usual.
  """
  if int(max_k) < 0:
    raise ValueError(f"small_contractions must be >= 0 (0 = off); got {max_k}.")
  if not available():
    yield
    return
  _install()
  with _MAX_K(int(max_k)):
    yield


def _install() -> None:
  """Puts `_rule` in JAX's table once; with the state at 0 it defers to JAX's rule."""
  with _LOCK:
    if _TABLE[_lax.dot_general_p] is not _rule:
      _TABLE[_lax.dot_general_p] = _rule
