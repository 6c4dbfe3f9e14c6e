"""Small vmapped contractions as unrolled sums: the same products as numpy's matmul."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim.core import contractions
from fedjax_sim.core.contractions import unrolled_small_contractions

pytestmark = pytest.mark.skipif(not contractions.available(),
                                reason="this JAX has no dot_general batching table")

_RNG = np.random.default_rng(0)


def _r(*shape):
  return _RNG.normal(size=shape).astype(np.float32)


def _count_dots(fn, *args):
  return str(jax.make_jaxpr(fn)(*args)).count("dot_general")


# (per-client function, per-client operand shapes, the numpy product per client)
_CASES = {
    "weight gradient x^T g (k=8)": (lambda x, g: x.T @ g, ((8, 5), (8, 3)),
                                    lambda x, g: x.T @ g),
    "back-propagated error g W^T (k=3)": (lambda g, w: g @ w.T, ((8, 3), (5, 3)),
                                          lambda g, w: g @ w.T),
    "vector times matrix (k=4)": (lambda v, m: v @ m, ((4,), (4, 6)), lambda v, m: v @ m),
    "extra free dims (k=2)": (lambda a, b: jnp.einsum("ikl,km->ilm", a, b), ((3, 2, 4), (2, 5)),
                              lambda a, b: np.einsum("ikl,km->ilm", a, b)),
}


@pytest.mark.parametrize("name", list(_CASES))
@pytest.mark.parametrize("axes", [(0, 0), (1, 0), (0, 1)])
def test_unrolled_products_equal_numpy_and_leave_no_dot(name, axes):
  fn, shapes, reference = _CASES[name]
  clients = 5
  args = []
  for shape, axis in zip(shapes, axes):
    if axis >= len(shape) + 1:
      pytest.skip("no such axis")
    args.append(np.moveaxis(_r(clients, *shape), 0, axis))
  batched = jax.vmap(fn, in_axes=axes)
  with unrolled_small_contractions(16):
    got = jax.jit(batched)(*args)
    dots = _count_dots(batched, *args)
  want = np.stack([reference(*(np.moveaxis(a, ax, 0)[c] for a, ax in zip(args, axes)))
                   for c in range(clients)])
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  assert dots == 0  # the product became elementwise work
  assert _count_dots(batched, *args) == 1  # outside the context: JAX's own rule again


def test_long_contractions_shared_operands_and_integers_keep_jax_rule():
  x, w = _r(5, 8, 32), _r(5, 32, 3)
  with unrolled_small_contractions(16):
    assert _count_dots(jax.vmap(lambda a, b: a @ b), x, w) == 1  # k = 32 > 16
    assert _count_dots(jax.vmap(lambda a: a @ w[0]), x) == 1  # one operand unbatched
    ints = np.ones((5, 4, 3), np.int32)
    assert _count_dots(jax.vmap(lambda a, b: a.T @ b), ints, ints) == 1
  with unrolled_small_contractions(0):  # 0: off
    assert _count_dots(jax.vmap(lambda a, b: a.T @ b), x, x) == 1


def test_gradients_of_a_vmapped_mlp_equal_without_the_rewrite():
  # The engine's case: per-client gradients of a small MLP, vmapped over clients.
  w1, w2 = _r(6, 16) * 0.3, _r(16, 3) * 0.3
  x, y = _r(7, 8, 6), _RNG.integers(0, 3, (7, 8))

  def loss(params, xb, yb):
    h = jnp.tanh(xb @ params[0])
    logits = h @ params[1]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], 1))

  grads = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0)))
  plain = grads((w1, w2), x, y)
  with unrolled_small_contractions(16):
    unrolled = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0)))((w1, w2), x, y)
  for a, b in zip(plain, unrolled):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["logreg", "mlp"])
def test_engine_rounds_with_and_without_the_rewrite_agree(kind):
  import optax

  from fedjax_sim.aggregators import weighted_mean
  from fedjax_sim.algorithms import fedavg
  from fedjax_sim.core import Engine, EngineConfig, LocalConfig, round_rng, sample_uniform
  from fedjax_sim.models import logistic_regression, mlp
  from tests.conftest import packed_dataset

  data = packed_dataset(np.random.default_rng(1).integers(4, 20, 24), num_features=6,
                        num_classes=4, seed=3)
  model = (logistic_regression((6,), 4) if kind == "logreg" else mlp((6,), 4, hidden=(8,)))
  local = LocalConfig(batch_size=4, epochs=2)
  finals, engines = [], []
  for k in (None, 0):  # None: the CPU default (16); 0: JAX's batched products
    alg = fedavg(model, optax.sgd(0.2), optax.sgd(1.0), local)
    engine = Engine(alg, data, weighted_mean(), lambda r: sample_uniform(round_rng(0, r), 24, 10),
                    seed=0, config=EngineConfig(block_size=4, small_contractions=k))
    state = engine.init(model.init(jax.random.key(0)))
    for result in engine.rounds(state, 0, 3):
      pass
    finals.append(jax.tree.leaves(alg.params_of(result.state.server)))
    engines.append(engine)
  assert engines[0].small_contractions == contractions.CPU_MAX_K
  assert engines[1].small_contractions == 0
  start = jax.tree.leaves(model.init(jax.random.key(0)))
  for a, b, s in zip(*finals, start):
    assert not np.allclose(a, s)  # the model moved
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_bfloat16_products_sum_in_float32_and_a_negative_length_is_refused():
  # 16 bfloat16 products summed in bfloat16 would lose about 2 digits; in float32 (as XLA's
  # matrix products accumulate) the result is the exact sum rounded once to bfloat16.
  x = _r(3, 16, 4).astype(jnp.bfloat16)
  g = _r(3, 16, 5).astype(jnp.bfloat16)
  exact = np.einsum("bnf,bnc->bfc", np.asarray(x, np.float64), np.asarray(g, np.float64))
  with unrolled_small_contractions(16):
    got = jax.jit(jax.vmap(lambda a, b: a.T @ b))(x, g)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float64), exact, rtol=2 ** -8, atol=1e-2)
  with pytest.raises(ValueError, match="small_contractions must be >= 0"):
    with unrolled_small_contractions(-1):
      pass


def test_engine_refuses_a_negative_small_contractions():
  import optax

  from fedjax_sim.aggregators import weighted_mean
  from fedjax_sim.algorithms import fedavg
  from fedjax_sim.core import Engine, EngineConfig, LocalConfig
  from fedjax_sim.models import logistic_regression
  from tests.conftest import packed_dataset

  model = logistic_regression((6,), 4)
  alg = fedavg(model, optax.sgd(0.1), optax.sgd(1.0), LocalConfig(batch_size=4))
  with pytest.raises(ValueError, match="small_contractions must be >= 0"):
    Engine(alg, packed_dataset([4, 4], num_features=6, num_classes=4), weighted_mean(),
           lambda r: np.arange(2), seed=0, config=EngineConfig(small_contractions=-1))
