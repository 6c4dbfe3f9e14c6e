"""data.factory: a user's function builds the data; every way it can go wrong is named."""

import sys
import textwrap

import numpy as np
import pytest

from fedjax_sim.core.data import FederatedData
from fedjax_sim.core.registry import DATASETS, Context
from fedjax_sim.datasets import FactoryConfig, iid_partition
from fedjax_sim.runner.config import ConfigError, config_from_dict, to_dict

MODULE = "fedjax_sim_test_user_data"

SOURCE = textwrap.dedent('''
    """A user's datasets (written by the test)."""
    import numpy as np
    from fedjax_sim.core.data import FederatedData


    def arrays(n, seed):
      rng = np.random.default_rng(seed)
      return rng.normal(size=(n, 3)).astype(np.float32), rng.integers(0, 4, n)


    def natural(n=30, seed=0):
      x, y = arrays(n, seed)
      ids = np.array(["b", "a", "c"])[np.arange(n) % 3]
      return {"x": x, "y": y, "client_ids": ids}


    def partitioned(n=40, num_clients=4):
      x, y = arrays(n, 1)
      return {"x": x, "y": y, "partition": {"partition": "iid", "num_clients": num_clients}}


    def pachinko(n=60):
      x, y = arrays(n, 2)
      return {"x": x, "y": y, "coarse": y // 2,
              "partition": {"partition": "pachinko", "num_clients": 3, "pachinko_alpha": 0.5}}


    def packed(sizes=(2, 3)):
      x, y = arrays(sum(sizes), 3)
      return FederatedData.from_offsets({"x": x, "y": y.astype(np.int32)},
                                        np.concatenate([[0], np.cumsum(sizes)]))


    def pair():
      return packed((2, 2)), packed((1, 1, 1))


    def by_kwargs(**kwargs):
      return natural(**kwargs)


    class Loaders:
      @staticmethod
      def nested():
        return packed((4,))


    not_callable = 3


    def returns(what):
      x, y = arrays(5, 0)
      return {
          "list": [1, 2, 3],
          "triple": (packed(), packed(), packed()),
          "no_y": FederatedData.from_offsets({"x": x}, [0, 5]),
          "rows": {"x": x, "y": y[:4], "client_ids": np.zeros(5)},
          "both": {"x": x, "y": y, "client_ids": np.zeros(5), "partition": {}},
          "neither": {"x": x, "y": y},
          "extra": {"x": x, "y": y, "client_ids": np.zeros(5), "weights": y},
          "ids": {"x": x, "y": y, "client_ids": np.zeros(4)},
          "bad_partition": {"x": x, "y": y, "partition": {"num_clients": 2, "alpha": 1}},
          "too_many": {"x": x, "y": y, "partition": {"partition": "iid", "num_clients": 9}},
          "float_y": {"x": x, "y": y + 0.5, "client_ids": np.zeros(5)},
      }[what]


    def inner_bug():
      raise TypeError("a bug inside the function")
''')


@pytest.fixture(scope="module", autouse=True)
def user_modules(tmp_path_factory):
  folder = tmp_path_factory.mktemp("user")
  (folder / f"{MODULE}.py").write_text(SOURCE)
  (folder / f"{MODULE}_broken.py").write_text("import fedjax_sim_not_installed_xyz\n")
  (folder / f"{MODULE}_raises.py").write_text("raise RuntimeError('boom at import')\n")
  sys.path.insert(0, str(folder))
  yield
  sys.path.remove(str(folder))
  for name in [m for m in sys.modules if m.startswith(MODULE)]:
    del sys.modules[name]


def _build(data: dict, seed: int = 0):
  c = config_from_dict({"seed": seed, "data": data, "sampling": {"clients_per_round": 1}})
  return c, DATASETS.get("factory").build(c.data, Context(seed=seed, config=c))


def _user():
  return sys.modules[MODULE] if MODULE in sys.modules else __import__(MODULE)


def test_natural_client_ids_group_examples_sorted_by_id():
  c, data = _build({"kind": "factory", "factory": f"{MODULE}:natural", "kwargs": {"n": 30}},
                   seed=5)
  x, y = _user().arrays(30, 5)  # the run's seed was passed
  assert data.num_clients == 3
  for i, offset in enumerate((1, 0, 2)):  # ids sorted: "a", "b", "c"
    np.testing.assert_array_equal(data.client(i)["x"], x[offset::3])
    np.testing.assert_array_equal(data.client(i)["y"], y[offset::3].astype(np.int32))
  assert data.features["y"].dtype == np.int32
  assert isinstance(c.data, FactoryConfig) and c.data.kwargs == {"n": 30}


def test_the_factory_key_implies_the_kind_and_other_keys_are_kwargs():
  c, data = _build({"factory": f"{MODULE}:natural", "n": 12, "seed": 9, "test_fraction": 0.5})
  assert c.data.kind == "factory" and c.data.kwargs == {"n": 12, "seed": 9}
  assert c.data.test_fraction == 0.5  # the section's own key stays the config's
  x, _ = _user().arrays(12, 9)  # an explicit seed wins over the run's
  np.testing.assert_array_equal(data.client(0)["x"], x[1::3])
  d = to_dict(c)
  assert d["data"]["kind"] == "factory" and d["data"]["n"] == 12
  assert config_from_dict(d) == c


def test_partition_dict_federated_data_and_pairs():
  _, data = _build({"factory": f"{MODULE}:partitioned", "num_clients": 5}, seed=2)
  x, y = _user().arrays(40, 1)
  want = iid_partition(x, y, 5, seed=2)
  np.testing.assert_array_equal(data.features["x"], want.features["x"])
  _, data = _build({"factory": f"{MODULE}:pachinko"})
  np.testing.assert_array_equal(data.sizes, [20, 20, 20])
  _, data = _build({"factory": f"{MODULE}:packed"})
  assert isinstance(data, FederatedData) and list(data.sizes) == [2, 3]
  _, (train, test) = _build({"factory": f"{MODULE}:pair"})
  assert list(train.sizes) == [2, 2] and list(test.sizes) == [1, 1, 1]
  _, data = _build({"factory": f"{MODULE}:Loaders.nested"})
  assert list(data.sizes) == [4]
  _, data = _build({"factory": f"{MODULE}:by_kwargs", "n": 6})  # **kwargs: no seed passed
  assert data.num_examples == 6


@pytest.mark.parametrize("path,needle", [
    ("no_colon", "is not 'module:function'"),
    ("a.b:", "is not 'module:function'"),
    ("a b:c", "is not 'module:function'"),
])
def test_a_malformed_path_is_refused_at_parse_time(path, needle):
  with pytest.raises(ConfigError, match=needle):
    config_from_dict({"data": {"factory": path}})


@pytest.mark.parametrize("path,needle", [
    ("fedjax_sim_no_such_module:f",
     r"cannot import module 'fedjax_sim_no_such_module'.*PYTHONPATH.*`imports:`"),
    (f"{MODULE}_broken:f", r"imports 'fedjax_sim_not_installed_xyz', which is not installed"),
    (f"{MODULE}_raises:f", r"importing module .* raised RuntimeError: boom at import"),
    (f"{MODULE}:naturel", r"has no attribute 'naturel'. Did you mean 'natural'\?"),
    (f"{MODULE}:Loaders.nestd", r"Loaders has no attribute 'nestd'"),
    (f"{MODULE}:not_callable", r"is a int, not a function"),
])
def test_import_and_lookup_failures_are_named(path, needle):
  with pytest.raises(ConfigError, match=needle):
    _build({"factory": path})


def test_wrong_keyword_arguments_are_named():
  with pytest.raises(ConfigError, match=r"does not accept the keys given to it \(m, n\).*It takes "
                                        r"n; .*keyword arguments"):
    _build({"factory": f"{MODULE}:natural", "n": 3, "m": 4})
  with pytest.raises(ConfigError, match=r"test_fractoin.*Did you mean 'test_fraction'"):
    _build({"factory": f"{MODULE}:natural", "test_fractoin": 0.3})
  with pytest.raises(ConfigError, match="missing a required argument: 'what'"):
    _build({"factory": f"{MODULE}:returns"})
  with pytest.raises(TypeError, match="a bug inside the function"):  # not hidden
    _build({"factory": f"{MODULE}:inner_bug"})


@pytest.mark.parametrize("what,needle", [
    ("list", r"returned a list of \['int', 'int', 'int'\]; return a FederatedData"),
    ("triple", r"returned a tuple of .*; return a FederatedData"),
    ("no_y", r"features \['x'\]; the models read 'x' and 'y' \(y missing\)"),
    ("rows", r"'x' has shape \(5, 3\) and 'y' shape \(4,\)"),
    ("both", r"both 'client_ids' and 'partition'"),
    ("neither", r"neither of 'client_ids' and 'partition'"),
    ("extra", r"keys \['client_ids', 'weights', 'x', 'y'\]"),
    ("ids", r"'client_ids' has shape \(4,\); it needs one client id per example"),
    ("bad_partition", r"'partition' must be a mapping of npz partition keys .*\['alpha'\]"),
    ("too_many", r"data.partition = 'iid' cannot split the arrays .*num_clients must be in"),
    ("float_y", r"labels 'y' must be integer class ids.*y\[0\] = \d.5 is not a whole"),
])
def test_wrong_return_values_are_named(what, needle):
  with pytest.raises(ConfigError, match=needle):
    _build({"factory": f"{MODULE}:returns", "what": what})
