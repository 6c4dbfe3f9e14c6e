"""model: {factory: "module:function", ...}: the implied selector, what the function may
return (a Model, a linen Module, an NNX class or factory), and errors naming model.factory."""

import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim.core.registry import MODELS, Context
from fedjax_sim.core.schema import ConfigError
from fedjax_sim.models import FactoryConfig, num_params
from fedjax_sim.runner.config import config_from_dict
from tests.conftest import packed_dataset

_MODULE = textwrap.dedent('''
    """User models for the factory tests."""
    import flax.linen as nn
    from flax import nnx

    from fedjax_sim.models import mlp

    CALLS = []


    def make_mlp(input_shape, num_classes, width=4):
      CALLS.append((tuple(input_shape), num_classes, width))
      return mlp(input_shape, num_classes, hidden=(width,))


    def plain(width):
      return mlp((5,), 3, hidden=(width,))


    class Dropped(nn.Module):
      num_classes: int
      rate: float = 0.5

      @nn.compact
      def __call__(self, x, train: bool = False):
        x = nn.Dropout(self.rate, deterministic=not train)(nn.Dense(8)(x))
        return nn.Dense(self.num_classes)(x)


    class Net(nnx.Module):
      def __init__(self, input_shape, num_classes, *, rngs):
        self.dense = nnx.Linear(input_shape[0], num_classes, rngs=rngs)

      def __call__(self, x):
        return self.dense(x)


    def nnx_factory(num_classes):
      return lambda rngs: Net((5,), num_classes, rngs=rngs)


    def nnx_instance():
      return Net((5,), 3, rngs=nnx.Rngs(0))


    def wrong_type():
      return 42


    def raises_type_error(width):
      return len(width)


    NOT_CALLABLE = 3
''')


@pytest.fixture
def user_module(tmp_path, monkeypatch):
  (tmp_path / "user_models_for_tests.py").write_text(_MODULE)
  (tmp_path / "broken_user_models.py").write_text("import a_package_that_is_not_installed\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  yield "user_models_for_tests"
  for name in ("user_models_for_tests", "broken_user_models"):
    sys.modules.pop(name, None)


def _data():
  return packed_dataset([4, 2], num_features=5, num_classes=3)


def _build(section):
  cfg = config_from_dict({"model": section}).model
  return MODELS.get(cfg.kind).build(cfg, Context(train=_data(), num_classes=3))


def test_the_factory_key_selects_the_component_and_the_other_keys_are_its_arguments(user_module):
  cfg = config_from_dict({"model": {"factory": f"{user_module}:make_mlp", "width": 6}}).model
  assert isinstance(cfg, FactoryConfig) and cfg.kind == "factory"
  assert cfg.kwargs == {"width": 6}
  model = MODELS.get("factory").build(cfg, Context(train=_data(), num_classes=3))
  # input_shape and num_classes come from the data, since the signature names them.
  assert sys.modules[user_module].CALLS[-1] == ((5,), 3, 6)
  assert num_params(model) == 5 * 6 + 6 + 6 * 3 + 3
  # A function without them gets only the section's keys.
  plain = _build({"factory": f"{user_module}:plain", "width": 2})
  assert num_params(plain) == 5 * 2 + 2 + 2 * 3 + 3


def test_a_linen_module_is_wrapped_and_its_dropout_draws_from_the_key(user_module):
  model = _build({"factory": f"{user_module}:Dropped", "rate": 0.5})
  params = model.init(jax.random.key(0))
  batch = {"x": jnp.asarray(_data().features["x"])}
  k1, k2 = jax.random.key(1), jax.random.key(2)
  a = model.apply(params, batch, train=True, key=k1)
  assert a.shape == (6, 3)
  np.testing.assert_array_equal(a, model.apply(params, batch, train=True, key=k1))
  assert not np.allclose(a, model.apply(params, batch, train=True, key=k2))
  np.testing.assert_array_equal(model.apply(params, batch, train=False),
                                model.apply(params, batch, train=False, key=k1))


def test_nnx_classes_and_factories_build_parameters_from_the_key(user_module):
  for section in ({"factory": f"{user_module}:Net"},
                  {"factory": f"{user_module}:nnx_factory"}):
    model = _build(section)
    a, b = model.init(jax.random.key(0)), model.init(jax.random.key(1))
    assert num_params(model) == 5 * 3 + 3
    assert not np.allclose(jax.tree.leaves(a)[-1], jax.tree.leaves(b)[-1])
    assert model.apply(a, {"x": jnp.ones((2, 5))}).shape == (2, 3)


def test_errors_name_model_factory_and_what_is_wrong(user_module):
  with pytest.raises(ConfigError, match=r"model.factory = 'no_colon' must be 'module:function'"):
    config_from_dict({"model": {"factory": "no_colon"}})
  with pytest.raises(ConfigError, match="model.factory is required"):
    config_from_dict({"model": {"kind": "factory"}})
  with pytest.raises(ConfigError, match=r"cannot import module 'not_a_module_anywhere'.*"
                                        r"PYTHONPATH.*imports:"):
    _build({"factory": "not_a_module_anywhere:make"})
  with pytest.raises(ConfigError, match=r"importing module 'broken_user_models' failed.*"
                                        r"a_package_that_is_not_installed"):
    _build({"factory": "broken_user_models:make"})
  with pytest.raises(ConfigError, match=r"has no attribute 'make_mpl'. Did you mean 'make_mlp'"):
    _build({"factory": f"{user_module}:make_mpl"})
  with pytest.raises(ConfigError, match="is a int, not a function"):
    _build({"factory": f"{user_module}:NOT_CALLABLE"})
  with pytest.raises(ConfigError, match=r"does not accept the section's arguments.*depth.*"
                                        r"It takes input_shape, num_classes, width"):
    _build({"factory": f"{user_module}:make_mlp", "depth": 3})
  with pytest.raises(ConfigError, match="calling it with .* raised TypeError"):
    _build({"factory": f"{user_module}:raises_type_error", "width": 3})
  with pytest.raises(ConfigError, match="returned a int; it must return a fedjax_sim Model"):
    _build({"factory": f"{user_module}:wrong_type"})
  with pytest.raises(ConfigError, match="returned an nnx.Module instance"):
    _build({"factory": f"{user_module}:nnx_instance"})
