"""Several processes on jax.distributed (loopback only): the same run as one process."""

import json
import os
import sys

import numpy as np
import pytest

from fedjax_sim.core.distributed import DistributedError, parse_spec
from tests.conftest import free_port, run_python, run_together, xla_flags


def test_the_spec_is_parsed_and_bad_specs_name_the_fix():
  assert parse_spec("coordinator=10.0.0.1:1234,num_processes=2,process_id=1") == {
      "coordinator": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}
  assert parse_spec("auto") == {} and parse_spec("") == {}
  assert parse_spec("coordinator=h:1,num_processes=2,process_id=0,local_device_ids=0;1")[
      "local_device_ids"] == [0, 1]
  with pytest.raises(DistributedError, match="expected comma-separated key=value"):
    parse_spec("coordinator=h:1,processes=2")
  with pytest.raises(DistributedError, match="not a valid int"):
    parse_spec("num_processes=two")
  with pytest.raises(DistributedError, match=r"process_id must be in \[0, 2\)"):
    parse_spec("coordinator=h:1,num_processes=2,process_id=2")


# SCAFFOLD (a per-client store) with the data streamed from the host, 2 rounds; params
# printed as JSON. (tests/runner/test_distributed_cli.py runs resident data.)
_RUN = """
import json, sys
import numpy as np
spec = sys.argv[1] if len(sys.argv) > 1 else ""
if spec:
  from fedjax_sim.core import distributed
  distributed.initialize(spec, timeout_s=60)
import jax
import fedjax_sim as fs
from fedjax_sim.algorithms import scaffold
from tests.conftest import packed_dataset
data = packed_dataset(np.random.default_rng(5).integers(0, 20, 40), seed=3)
model = fs.mlp((5,), 3, hidden=(8,))
local = fs.LocalConfig(batch_size=4, epochs=1)
out = {"devices": jax.device_count(), "local": jax.local_device_count(),
       "process": jax.process_index()}
for name, alg, placement in (("scaffold", scaffold(model, 0.1, local, data.num_clients), "host"),):
  sampler = lambda r: fs.sample_uniform(fs.round_rng(2, r), data.num_clients, 13)
  engine = fs.Engine(alg, data, fs.weighted_mean(), sampler, seed=2,
                     config=fs.EngineConfig(block_size=2, data_placement=placement))
  state = engine.init(model.init(jax.random.key(0)))
  for res in engine.rounds(state, 0, 2):
    state = res.state
  params = jax.tree.map(lambda a: np.asarray(a).tolist(), alg.params_of(state.server))
  out[name] = {"params": params, "loss": res.metrics["train_loss"],
               "clients": sorted(res.clients["client_id"].tolist())}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_two_processes_of_two_devices_equal_one_process_of_four():
  one = json.loads(run_python(_RUN, {"XLA_FLAGS": xla_flags(4),
                                     "JAX_PLATFORMS": "cpu"}).strip().splitlines()[-1])
  assert one["devices"] == 4
  port = free_port()
  env = dict(os.environ, XLA_FLAGS=xla_flags(2),
             JAX_PLATFORMS="cpu")
  outs = [json.loads(proc.stdout.strip().splitlines()[-1]) for proc in run_together(
      [[sys.executable, "-c", _RUN,
        f"coordinator=127.0.0.1:{port},num_processes=2,process_id={i}"] for i in range(2)],
      env)]
  for i, out in enumerate(outs):
    assert (out["devices"], out["local"], out["process"]) == (4, 2, i)
    for name in ("scaffold",):
      # Every process reports the whole round (its clients and the others').
      assert out[name]["clients"] == one[name]["clients"]
      np.testing.assert_allclose(out[name]["loss"], one[name]["loss"], rtol=1e-6)
      for a, b in zip(_leaves(out[name]["params"]), _leaves(one[name]["params"])):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def _leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]
