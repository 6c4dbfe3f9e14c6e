"""A convolution whose weight gradient stays fast inside loops on XLA:CPU.

Local training runs its steps in a loop (`lax.scan`/`while`), and on XLA:CPU
the weight gradient of a convolution inside a loop body is lowered to its
generic convolution emitter: outside a loop, XLA rewrites that gradient
(a convolution contracting over the batch) into transposes around a
canonical NHWC convolution that its fast kernels run, but not inside a loop.
Measured on the 2-core CPU (`experiments/benchmarks/conv_in_loop.py`): the
weight gradient of a 3x3, 32 -> 64 channel layer on 20 images of 26x26,
eight times, takes 30x longer in a `lax.scan` than called from Python, and
eight SGD steps of the EMNIST CNN 15x longer; with this convolution both
take the same time either way.

`conv_general_dilated` here is `lax.conv_general_dilated` with a custom VJP
whose weight gradient is written as that canonical convolution explicitly
(dW[a, b, i, o] = sum over n, h, w of x[n, h*s + a, w*s + b, i] g[n, h, w, o]:
a convolution of the input, batch and feature axes swapped, with the output
gradient as kernel, dilated by the stride), so XLA's fast path applies in and
out of loops; for stride 1 the input gradient is written the same way (the
padded output gradient correlated with the flipped kernel), for other strides
it is JAX's own. Values are those of
`lax.conv_general_dilated` (tested against it); layouts other than 2-D
NHWC/HWIO, dilations and grouped convolutions fall back to it unchanged.
Pass it to Flax: `nn.Conv(..., conv_general_dilated=conv_general_dilated)`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")


def _plain(lhs, rhs, strides, pads):
  return lax.conv_general_dilated(lhs, rhs, strides, pads, dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(lhs, rhs, strides, pads):
  return _plain(lhs, rhs, strides, pads)


def _conv_fwd(lhs, rhs, strides, pads):
  return _plain(lhs, rhs, strides, pads), (lhs, rhs)


def _conv_bwd(strides, pads, residuals, g):
  lhs, rhs = residuals
  kh, kw = rhs.shape[:2]
  if strides == (1, 1):
    # The input gradient as a canonical convolution too: the output gradient,
    # padded by the kernel size - 1, correlated with the flipped kernel (in and
    # out channels swapped), then the forward padding cropped off.
    full = lax.conv_general_dilated(g, jnp.transpose(rhs[::-1, ::-1], (0, 1, 3, 2)), (1, 1),
                                    [(kh - 1, kh - 1), (kw - 1, kw - 1)],
                                    dimension_numbers=_NHWC)
    d_lhs = full[:, pads[0][0]:pads[0][0] + lhs.shape[1],
                 pads[1][0]:pads[1][0] + lhs.shape[2]].astype(lhs.dtype)
  else:  # strided: JAX's own rule (a convolution with a dilated input)
    _, input_vjp = jax.vjp(lambda x: _plain(x, rhs, strides, pads), lhs)
    (d_lhs,) = input_vjp(g)
  padded = jnp.pad(lhs, [(0, 0), pads[0], pads[1], (0, 0)])
  # Batch <-> feature swapped: [i, H, W, n] convolved with the gradient as an
  # [h, w, n, o] kernel dilated by the stride gives [i, a, b, o] (cropped to the kernel).
  out = lax.conv_general_dilated(jnp.transpose(padded, (3, 1, 2, 0)),
                                 jnp.transpose(g, (1, 2, 0, 3)), (1, 1), "VALID",
                                 rhs_dilation=strides, dimension_numbers=_NHWC)
  d_rhs = jnp.transpose(out[:, :kh, :kw, :], (1, 2, 0, 3)).astype(rhs.dtype)
  return d_lhs, d_rhs


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated`, with a loop-friendly weight gradient where it applies."""
  args = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
              dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
              batch_group_count=batch_group_count, precision=precision,
              preferred_element_type=preferred_element_type)
  simple = (lhs.ndim == 4 and feature_group_count == 1 and batch_group_count == 1
            and precision is None and preferred_element_type is None
            and all(d == 1 for d in (lhs_dilation or (1, 1)))
            and all(d == 1 for d in (rhs_dilation or (1, 1))))
  if simple:
    given = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    simple = given == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  if not simple:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **args)
  strides = tuple(int(s) for s in window_strides)
  if isinstance(padding, str):
    pads = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
  else:
    pads = padding
  return _conv(lhs, rhs, strides, tuple((int(lo), int(hi)) for lo, hi in pads))


__all__ = ["conv_general_dilated"]
