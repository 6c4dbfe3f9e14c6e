"""The cost model: step FLOPs against a hand count, simulated seconds by hand, presets."""

import jax
import numpy as np
import optax
import pytest

from fedjax_sim.aggregators import weighted_mean
from fedjax_sim.algorithms.fedavg import fedavg
from fedjax_sim.core import Engine, EngineConfig
from fedjax_sim.core.algorithm import LocalConfig
from fedjax_sim.models.flax_models import logistic_regression
from fedjax_sim.runner.cost import (PRESETS, DeviceProfile, StepCost, client_seconds,
                                    cost_summary, device_profile, round_cost, step_cost)
from tests.conftest import packed_dataset

D, K = 64, 10  # features, classes


def _logreg_cost(batch_size, epochs=1):
  model = logistic_regression((D,), K)
  alg = fedavg(model, optax.sgd(0.1), optax.sgd(1.0),
               LocalConfig(batch_size=batch_size, epochs=epochs))
  engine = Engine(alg, packed_dataset([20, 30], num_features=D, num_classes=K), weighted_mean(),
                  lambda r: np.arange(2), seed=0, config=EngineConfig(data_placement="host"))
  return step_cost(engine, alg.server_init(model.init(jax.random.key(0))))


def test_logistic_regression_step_flops_match_a_hand_count():
  # One SGD step of multinomial logistic regression on a batch of B examples, d features,
  # k classes: the forward logits x W (B x d times d x k) are B*d*k multiply-adds = 2Bdk
  # FLOPs; the backward needs only the weight gradient x^T g (d x B times B x k), another
  # 2Bdk (no gradient with respect to the inputs). Everything else (bias, softmax,
  # cross-entropy, accuracy, the SGD update of d*k + k weights, the shuffle) is O(Bk + dk).
  # So flops(B) = 4Bdk + O(Bk + dk): XLA's count may add its own conventions for the small
  # terms (exp, log and compares count as one FLOP each), so we allow up to 1.5x.
  counts = {b: _logreg_cost(b).step_flops for b in (8, 16, 32)}
  for b, flops in counts.items():
    assert 4 * b * D * K <= flops <= 1.5 * 4 * b * D * K, (b, flops)
  # The cost of one more example is 4dk plus O(k): between 1 and 1.2 times 4dk.
  per_example = (counts[32] - counts[16]) / 16
  assert 4 * D * K <= per_example <= 1.2 * 4 * D * K
  # Linear in the batch size: the second difference is (nearly) zero.
  assert abs((counts[32] - counts[16]) - 2 * (counts[16] - counts[8])) <= \
      0.01 * (counts[32] - counts[16])


def test_step_flops_count_one_step_whatever_the_epochs():
  # XLA counts a loop body once: the step loop and the epoch loop both count one step.
  one, three = _logreg_cost(8).step_flops, _logreg_cost(8, epochs=3).step_flops
  assert three == pytest.approx(one, rel=0.01)


def test_step_memory_and_message_sizes():
  small, large = _logreg_cost(8), _logreg_cost(64)
  assert small.broadcast_bytes == 4 * (D * K + K)  # float32 weights and biases
  assert small.upload_bits is None  # this engine's stage declares no size
  if jax.default_backend() == "cpu":  # XLA:CPU reports a memory analysis
    assert 0 < small.step_temp_bytes < large.step_temp_bytes  # activations grow with B
  assert small.step_temp_bytes is not None or "no memory analysis" in small.step_temp_bytes_note


def test_simulated_seconds_by_hand():
  cost = StepCost(step_flops=2e9, step_temp_bytes=None, step_temp_bytes_note="",
                  broadcast_bytes=1_000_000, upload_bits=4_000_000)
  phone = DeviceProfile("custom", gflops=10.0, downlink_mbps=8.0, uplink_mbps=2.0)
  # Download: 8e6 bits / 8e6 bit/s = 1 s. Compute: 2e9 FLOPs per step / 1e10 FLOP/s = 0.2 s a
  # step. Upload: 4e6 bits / 2e6 bit/s = 2 s, only for clients with examples.
  np.testing.assert_allclose(client_seconds(cost, phone, np.array([0, 5, 10]),
                                            np.array([0, 4e6, 4e6])), [1.0, 4.0, 5.0])
  clients = {"steps": np.array([0, 5, 10], np.float32),
             "examples": np.array([0, 20, 40], np.float32)}
  out = round_cost(cost, phone, clients, {"bits": 8e6})
  assert out["client_seconds_mean"] == pytest.approx(10 / 3)
  assert out["client_seconds_max"] == pytest.approx(5.0)
  assert out["client_gflops_total"] == pytest.approx(2.0 * 15)
  assert out["bytes_down"] == 3e6 and out["bytes_up"] == 1e6
  # A stage without a declared size: the round's measured bits per client instead.
  unsized = StepCost(2e9, None, "", 1_000_000, None)
  out = round_cost(unsized, phone, clients, {"bits": 2e6, "bits_per_client": 1e6})
  assert out["client_seconds_max"] == pytest.approx(1.0 + 2.0 + 0.5)
  empty = round_cost(cost, phone, {"steps": np.zeros(0), "examples": np.zeros(0)}, {})
  assert empty == {"client_seconds_mean": 0.0, "client_seconds_max": 0.0,
                   "client_gflops_total": 0.0, "bytes_down": 0.0, "bytes_up": 0.0}


def test_cost_summary_adds_the_rounds():
  cost = StepCost(1e9, 100, "note", 10, 80)
  profile = PRESETS["laptop"]
  records = [{"client_seconds_max": 2.0, "client_gflops_total": 3.0, "bytes_down": 10.0,
              "bytes_up": 20.0, "round_seconds": 0.5},
             {"client_seconds_max": 4.0, "client_gflops_total": 5.0, "bytes_down": 30.0,
              "bytes_up": 40.0, "round_seconds": 1.5}]
  s = cost_summary(cost, profile, records)
  assert (s["total_client_gflops"], s["total_bytes_down"], s["total_bytes_up"]) == (8, 40, 60)
  assert (s["simulated_seconds"], s["simulator_seconds"]) == (6.0, 2.0)
  assert s["simulated_round_seconds_mean"] == 3.0 and s["simulator_round_seconds_mean"] == 1.0
  assert s["simulated_seconds_per_simulator_second"] == 3.0
  assert s["step_gflops"] == 1.0 and s["device"]["name"] == "laptop"
  assert cost_summary(cost, profile, [])["simulated_seconds_per_simulator_second"] is None


def test_device_presets_and_custom_numbers():
  assert set(PRESETS) == {"phone", "laptop", "iot"}
  assert device_profile("phone") is PRESETS["phone"]
  custom = device_profile("laptop", gflops=5.0)
  assert (custom.name, custom.gflops, custom.downlink_mbps, custom.uplink_mbps) == \
      ("laptop+custom", 5.0, PRESETS["laptop"].downlink_mbps, PRESETS["laptop"].uplink_mbps)
  with pytest.raises(ValueError, match="No device preset 'tv'"):
    device_profile("tv")
  with pytest.raises(ValueError, match="gflops must be a finite number > 0"):
    DeviceProfile("x", gflops=0.0, downlink_mbps=1.0, uplink_mbps=1.0)
