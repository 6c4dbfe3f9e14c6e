"""Compression from the config: exact bits in the metrics, EF across resume, bad settings."""

import json
import os

import pytest

from fedjax_sim.runner.config import ConfigError, config_from_dict
from fedjax_sim.runner.io import read_metrics
from fedjax_sim.runner.run import run_experiment

BASE = {
    "seed": 2, "rounds": 4, "progress": False,
    "data": {"kind": "gaussian_mixture", "num_clients": 60, "examples_per_client": 8,
             "num_features": 6, "num_classes": 3},
    "model": {"kind": "logreg"},  # 6 x 3 + 3 = 21 parameters
    "algorithm": {"name": "fedavg", "batch_size": 4,
                  "client_optimizer": {"name": "sgd", "learning_rate": 0.1}},
    "sampling": {"scheme": "uniform", "clients_per_round": 12},
    "eval": {"every": 0},
    "checkpoint": {"every": 2},
}


def _config(out, compression, **top):
  raw = json.loads(json.dumps(BASE))
  raw.update(top)
  raw.update(output_dir=out, compression=compression)
  return config_from_dict(raw)


def _records(out):
  return read_metrics(os.path.join(out, "metrics.jsonl"))


def test_bits_in_the_metrics_are_the_hand_count(tmp_out):
  run_experiment(_config(tmp_out, {"method": "quantize", "bits": 4, "rotation": True}),
                 log=lambda *a: None)
  records = _records(tmp_out)
  per_client = 32 * 4 + 2 * 32 + 32  # 21 -> 32 padded coordinates, min and max, seed
  assert all(r["bits_per_client"] == per_client for r in records)
  assert all(r["bits"] == 12 * per_client for r in records)
  assert [r["total_bits"] for r in records] == [12 * per_client * k for k in range(1, 5)]
  plain = _config(tmp_out + "_plain", {"method": "none"})
  run_experiment(plain, log=lambda *a: None)
  assert _records(tmp_out + "_plain")[0]["bits_per_client"] == 21 * 32


def test_error_feedback_state_survives_a_resume_bit_for_bit(tmp_out):
  ef = {"method": "top_k", "fraction": 0.2, "error_feedback": True}
  run_experiment(_config(tmp_out, ef), log=lambda *a: None)
  half = tmp_out + "_half"
  run_experiment(_config(half, ef, rounds=2), log=lambda *a: None)
  run_experiment(_config(half, ef), resume=True, log=lambda *a: None)
  strip = lambda rs: [{k: v for k, v in r.items() if "seconds" not in k and "per_second" not in k
                       and not k.startswith("eval_")}
                      for r in rs]
  assert strip(_records(half)) == strip(_records(tmp_out))


def test_majority_vote_and_dp_with_compression_run(tmp_out):
  run_experiment(_config(tmp_out, {"method": "majority_vote", "vote_step": 0.01}),
                 log=lambda *a: None)
  assert _records(tmp_out)[-1]["bits_per_client"] == 21
  dp = _config(tmp_out + "_dp", {"method": "drive"},
               algorithm={**BASE["algorithm"], "weighting": "uniform"},
               privacy={"mechanism": "dp_fedavg", "noise_multiplier": 1.0, "delta": 1e-3})
  run_experiment(dp, log=lambda *a: None)
  records = _records(tmp_out + "_dp")
  assert records[-1]["bits_per_client"] == 32 + 32 + 32 and records[-1]["dp_epsilon"] > 0


@pytest.mark.parametrize("compression,extra,needle", [
    ({"method": "top_k", "bits": 4}, {}, "compression.bits is set but compression.method = 'top_k'"),
    ({"method": "quantize", "bits": 0}, {}, "compression.bits = 0 must be in 1..16"),
    ({"method": "zip"}, {}, "compression.method: 'zip' is not a registered compression method"),
    ({"method": "majority_vote"}, {"algorithm": {"name": "scaffold"}}, "uploads more than a model delta"),
    ({"method": "top_k", "error_feedback": True},
     {"algorithm": {"weighting": "uniform"},
      "privacy": {"mechanism": "dp_fedavg", "noise_multiplier": 1.0}}, "error_feedback"),
])
def test_bad_compression_settings_name_the_problem(compression, extra, needle):
  raw = json.loads(json.dumps(BASE))
  for k, v in extra.items():
    raw[k] = {**raw.get(k, {}), **v}
  raw["compression"] = compression
  with pytest.raises(ConfigError, match=needle):
    config_from_dict(raw)


def test_drive_rotation_rounds_reach_the_compressor_and_apply_only_to_drive():
  from fedjax_sim.runner.build import build_compressor
  c = config_from_dict({"compression": {"method": "drive", "rotation_rounds": 3}})
  assert build_compressor(c).name == "drive_hd3"
  assert build_compressor(config_from_dict({"compression": {"method": "drive"}})).name == "drive"
  with pytest.raises(ConfigError, match="rotation_rounds is set but compression.method = 'quantize' ignores it"):
    config_from_dict({"compression": {"method": "quantize", "rotation_rounds": 2}})
  with pytest.raises(ConfigError, match="must be >= 1"):
    config_from_dict({"compression": {"method": "drive", "rotation_rounds": 0}})


@pytest.mark.parametrize("algorithm", ["qffl", "fednova"])
def test_algorithms_whose_server_divides_by_a_sent_scalar_refuse_compression(algorithm):
  # Compressed with the update as one vector, q-FFL's h_k or FedNova's ||a_i||_1 is lost
  # (top_k keeps only the scalar, DRIVE returns it alone) or sets the step (sign).
  with pytest.raises(ConfigError, match=f"cannot be combined with algorithm.name = '{algorithm}'"):
    config_from_dict({"algorithm": {"name": algorithm}, "compression": {"method": "top_k"}})
  config_from_dict({"algorithm": {"name": algorithm}})
