"""The loop-friendly convolution: JAX's values and gradients, canonical convolutions in loops."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fedjax_sim.models.conv import conv_general_dilated

_DN = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize("strides, padding, shape, kernel", [
    ((1, 1), "VALID", (3, 9, 9, 4), (3, 3)),
    ((1, 1), "SAME", (2, 7, 8, 3), (5, 5)),
    ((2, 2), "SAME", (2, 9, 9, 3), (3, 3)),
    ((2, 1), ((1, 2), (0, 1)), (2, 8, 7, 2), (3, 2)),
    ((2, 2), "VALID", (1, 8, 8, 3), (1, 1)),
    ((1, 1), ((0, 2), (3, 1)), (2, 6, 7, 2), (3, 2)),
])
def test_values_and_gradients_equal_lax(strides, padding, shape, kernel):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=kernel + (shape[-1], 5)), jnp.float32)
  ours = lambda x, w: jnp.sum(jnp.sin(conv_general_dilated(x, w, strides, padding,
                                                           dimension_numbers=_DN)))
  ref = lambda x, w: jnp.sum(jnp.sin(lax.conv_general_dilated(x, w, strides, padding,
                                                              dimension_numbers=_DN)))
  np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-6)
  for a, b in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(ref, (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


def test_other_layouts_and_dilations_fall_back_to_lax():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 3, 9, 9)), jnp.float32)  # NCHW
  w = jnp.asarray(rng.normal(size=(4, 3, 3, 3)), jnp.float32)  # OIHW
  for kwargs in ({"dimension_numbers": ("NCHW", "OIHW", "NCHW")},
                 {"dimension_numbers": ("NCHW", "OIHW", "NCHW"), "rhs_dilation": (2, 2)}):
    f = lambda x, w: jnp.sum(conv_general_dilated(x, w, (1, 1), "SAME", **kwargs) ** 2)
    g = lambda x, w: jnp.sum(lax.conv_general_dilated(x, w, (1, 1), "SAME", **kwargs) ** 2)
    for a, b in zip(jax.grad(f, (0, 1))(x, w), jax.grad(g, (0, 1))(x, w)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU lowering property")
def test_inside_a_loop_every_convolution_is_canonical():
  """The slow case: XLA:CPU leaves a weight gradient inside a loop body as a
  non-canonical convolution (batch as the contraction); ours is canonical."""
  x = jnp.zeros((4, 2, 10, 10, 3))
  w = jnp.zeros((3, 3, 3, 8))

  def hlo(conv):
    grad = jax.grad(lambda w, x: jnp.sum(conv(x, w, (1, 1), "VALID",
                                              dimension_numbers=_DN) ** 2))
    fn = jax.jit(lambda w, xs: lax.scan(lambda c, xb: (c, grad(w, xb)), 0, xs)[1])
    return fn.lower(w, x).compile().as_text()

  labels = lambda text: set(re.findall(r"convolution\(.*dim_labels=(\S+?)[,\s]", text))
  assert labels(hlo(conv_general_dilated)) <= {"b01f_01io->b01f"}
