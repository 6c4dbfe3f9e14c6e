"""The contract suite: every registered component of a kind passes it, with no test of its own.

Parametrized over the registry (built-ins and `tests.runner.plugin_algorithm`,
registered from outside the package): each component is built through the
config, as a user's run builds it, with the settings it declares valid
(`traits["example"]`).

- Algorithms and aggregation stages: a round keeps the server state's (and
  per-client stores') structure, shapes and dtypes; the second round compiles
  nothing; two runs under the same seed are bit-identical; the result does
  not depend on the block size, nor on the number of devices (1 vs 2
  CPU devices, in subprocesses of 2 devices); and the model moves.
- Compressors: the bits a round reports are the declared `bits(d)`; a
  compressor declared unbiased is, to Monte-Carlo precision.
- Models: initialize, apply to a batch (a classifier's images or vectors, or
  the batch the model's `example` trait makes, e.g. token rows), give
  per-example losses and metrics (per-example values or ratio pairs), and
  differentiate to a gradient with the parameters' structure and no zero or
  non-finite leaf.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim.compression import Compressor
from fedjax_sim.core.data import FederatedData
from fedjax_sim.core.registry import ALGORITHMS, COMPRESSION, MODELS, PRIVACY, Context
from fedjax_sim.models.flax_models import num_params
from fedjax_sim.runner.config import config_from_dict
from tests.conftest import packed_dataset, run_python, xla_flags
from tests.core import contracts

_CASES = contracts.cases()
_IDS = [contracts.case_id(case) for case in _CASES]
# The cases split into groups, one subprocess of 2 CPU devices each, so that the groups
# run side by side on the workers.
_GROUPS = 4


def test_the_suite_covers_every_registered_component():
  covered = {v for case in _CASES for v in case.values()}
  assert set(contracts.names(ALGORITHMS)) <= covered
  assert "scaled_fedavg" in covered  # the plugin algorithm, registered outside the package
  assert {c for c in contracts.names(COMPRESSION) if c != "none"} <= covered
  assert {p for p in contracts.names(PRIVACY) if p != "none"} <= covered
  assert len({i % _GROUPS for i in range(len(_IDS))}) == _GROUPS  # every group has cases


@pytest.mark.slow
@pytest.mark.parametrize("group", range(_GROUPS))
def test_rounds_keep_shapes_compile_once_are_deterministic_and_free_of_devices_and_blocks(group):
  # `contracts.check_rounds` for every case of the group: 1 device vs 2, blocks of 2 vs 8.
  ids = _IDS[group::_GROUPS]
  code = ("import json\n"
          "from tests.core import contracts\n"
          f"print(json.dumps(contracts.check_cases({ids!r})))\n")
  out = run_python(code, {"XLA_FLAGS": xla_flags(2), "JAX_PLATFORMS": "cpu"}, timeout=600)
  import json
  broken = json.loads(out.strip().splitlines()[-1])
  assert set(broken) == set(ids)
  assert not any(broken.values()), {k: v for k, v in broken.items() if v}


@pytest.mark.parametrize("method", [c for c in contracts.names(COMPRESSION) if c != "none"])
def test_compressors_meet_their_declared_bits_and_unbiasedness(method):
  cfg = config_from_dict({"compression": {"method": method}}).compression
  channel = COMPRESSION.get(method).build(cfg, Context())
  if not isinstance(channel, Compressor):  # a stage replacing the mean (majority vote)
    exp = contracts.experiment(compression=method)
    (_, results, _, _) = contracts.run(exp, rounds=1)
    d = num_params(exp.model)
    assert results[0].metrics["bits_per_client"] == exp.engine.aggregator.upload_bits(
        jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                     exp.model.init(jax.random.key(0)))) == d  # one bit per coordinate
    return
  exp = contracts.experiment(compression=method)
  (_, results, _, _) = contracts.run(exp, rounds=1)
  d = num_params(exp.model)
  # The round bills each uploading client exactly the declared count, and the
  # channel compresses: fewer bits than the float32 update.
  assert results[0].metrics["bits_per_client"] == channel.bits(d) < 32 * d
  if not channel.unbiased:
    return
  # E[decode(encode(x))] = x: the mean of n independent encodings is within
  # 6 standard errors of x on every coordinate.
  x = jax.random.normal(jax.random.key(1), (d,))
  n = 4000
  decoded = jax.jit(jax.vmap(lambda k: channel.encode(x, k)))(
      jax.random.split(jax.random.key(2), n))
  mean = np.asarray(jnp.mean(decoded, 0), np.float64)
  stderr = np.asarray(jnp.std(decoded, 0), np.float64) / np.sqrt(n)
  bound = 6 * stderr + 1e-6 * float(jnp.linalg.norm(x))
  assert np.all(np.abs(mean - np.asarray(x)) <= bound), (method, np.max(np.abs(mean - x) / bound))


@pytest.mark.parametrize("kind", contracts.model_names())
def test_models_initialize_apply_and_differentiate(kind):
  # A model's `example` trait: a classifier's per-example `input_shape` (random
  # features, 3 classes), or its own `batch(rng, n)` and `num_classes`; plus
  # `config` keys (small sizes) for the section.
  example = MODELS.get(kind).traits.get("example", {})
  n, num_classes = 10, example.get("num_classes", 3)
  if "batch" in example:
    arrays = example["batch"](np.random.default_rng(0), n)
    data = FederatedData.from_offsets(arrays, np.array([0, 6, n]))
  else:
    shape = example.get("input_shape", (5,))
    data = packed_dataset([6, 4], num_features=int(np.prod(shape)), num_classes=num_classes)
    data = type(data).from_offsets({"x": data.features["x"].reshape((-1, *shape)),
                                    "y": data.features["y"]}, np.cumsum([0, 6, 4]))
  cfg = config_from_dict({"model": {"kind": kind, **example.get("config", {})}}).model
  model = MODELS.get(kind).build(cfg, Context(train=data, num_classes=num_classes))
  # Compiled whole (op-by-op dispatch of a deep model's gradient is many times slower).
  p = jax.jit(model.init)(jax.random.key(0))
  batch = {k: jnp.asarray(v) for k, v in data.features.items()}
  out = jax.jit(lambda q, b: model.apply(q, b, train=False, key=None))(p, batch)
  if "batch" in example:
    assert out.shape[0] == n
  else:
    assert out.shape == (n, num_classes)
  losses = model.loss(out, batch)
  assert losses.shape == (n,) and bool(jnp.all(jnp.isfinite(losses)))
  # A metric is per-example values [n], or a ratio: a pair (numerator, denominator) of them.
  metrics = model.metrics(out, batch)
  assert metrics
  for name, value in metrics.items():
    parts = value if isinstance(value, tuple) else (value,)
    assert len(parts) in (1, 2), name
    assert all(v.shape == (n,) and bool(jnp.all(jnp.isfinite(v))) for v in parts), name
  grads = jax.jit(jax.grad(lambda q: jnp.mean(model.loss(
      model.apply(q, batch, train=True, key=jax.random.key(1)), batch))))(p)
  chex.assert_trees_all_equal_shapes_and_dtypes(grads, p)
  for g in jax.tree.leaves(grads):
    assert bool(jnp.all(jnp.isfinite(g))) and bool(jnp.any(g != 0))
