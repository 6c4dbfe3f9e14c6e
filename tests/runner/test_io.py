import json
import os

import numpy as np
import pytest

from fedjax_sim.runner.io import (MetricsLog, atomic_write, atomic_write_json, atomic_write_text,
                                  read_metrics)


def test_atomic_write_text_creates_and_replaces_without_leftovers(tmp_path):
  path = tmp_path / "sub" / "notes.txt"  # the folder is created
  atomic_write_text(str(path), "first\n")
  assert path.read_text() == "first\n"
  atomic_write_text(str(path), "second")
  assert path.read_text() == "second"
  assert os.listdir(path.parent) == ["notes.txt"]


def test_atomic_write_json_replaces_and_is_valid_json(tmp_path):
  path = tmp_path / "summary.json"
  path.write_text("{ torn")
  atomic_write_json(str(path), {"b": np.float32(1.5), "a": [np.int64(2), (3, 4)],
                                "bad": float("nan"), 7: "seven"})
  assert json.loads(path.read_text()) == {"a": [2, [3, 4]], "b": 1.5, "bad": "nan", "7": "seven"}
  atomic_write_json(str(path), {"x": 1})
  assert json.loads(path.read_text()) == {"x": 1}
  assert os.listdir(tmp_path) == ["summary.json"]


def test_failed_atomic_write_keeps_the_old_file_and_no_temp_file(tmp_path):
  path = tmp_path / "config.yaml"
  path.write_text("old")

  def broken(tmp):
    with open(tmp, "w") as f:
      f.write("half")
    raise RuntimeError("disk full")

  with pytest.raises(RuntimeError, match="disk full"):
    atomic_write(str(path), broken)
  assert path.read_text() == "old"
  assert os.listdir(tmp_path) == ["config.yaml"]


def test_metrics_log_appends_one_line_per_record_across_reopenings(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  with MetricsLog(path) as log:
    log.append({"round": 1, "loss": np.float32(0.5)})
    log.append({"round": 2, "loss": 0.25})
  with MetricsLog(path) as log:
    log.append({"round": 3, "loss": float("inf")})
  with open(path) as f:
    lines = f.read().split("\n")
  assert lines[-1] == "" and len(lines) == 4  # three newline-terminated lines
  assert [json.loads(line) for line in lines[:3]] == [
      {"round": 1, "loss": 0.5}, {"round": 2, "loss": 0.25}, {"round": 3, "loss": "inf"}]
  assert read_metrics(path) == [json.loads(line) for line in lines[:3]]


def test_read_metrics_drops_a_torn_last_line_only(tmp_path):
  path = tmp_path / "metrics.jsonl"
  complete = [{"round": 1, "train_loss": 2.0}, {"round": 2, "train_loss": 1.5}]
  body = "".join(json.dumps(r) + "\n" for r in complete)
  path.write_text(body + '{"round": 3, "train_lo')
  assert read_metrics(str(path)) == complete
  # An unterminated line is torn even when it happens to parse.
  path.write_text(body + '{"round": 3}')
  assert read_metrics(str(path)) == complete
  path.write_text(body)
  assert read_metrics(str(path)) == complete


def test_read_metrics_of_missing_or_empty_file(tmp_path):
  assert read_metrics(str(tmp_path / "none.jsonl")) == []
  path = tmp_path / "empty.jsonl"
  path.write_text("")
  assert read_metrics(str(path)) == []
  path.write_text('{"round": 1, "tr')
  assert read_metrics(str(path)) == []
