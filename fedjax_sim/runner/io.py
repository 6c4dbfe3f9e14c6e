"""Crash-safe output files.

Whole files (config, summary, plot) are written to a temporary file in the
same folder and renamed over the target, so a reader sees the old file or the
new one, never a torn one. `metrics.jsonl` grows by one line per round, each
line written with a single `write(2)` on an `O_APPEND` descriptor and synced,
so a kill leaves every completed round intact; `read_metrics` drops a torn
last line should the machine itself die mid-write.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable


def is_writer() -> bool:
  """Whether this process writes the run's files: the only one, or process 0 of several."""
  import jax
  return jax.process_index() == 0


def atomic_write(path: str, write: Callable[[str], None]) -> None:
  """Calls `write(tmp_path)`, syncs it, then renames it onto `path` (process 0 only)."""
  if not is_writer():
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  base, ext = os.path.splitext(os.path.basename(path))
  tmp = os.path.join(directory, f".{base}.tmp{os.getpid()}{ext}")
  try:
    write(tmp)
    with open(tmp, "rb") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def atomic_write_text(path: str, text: str) -> None:
  def write(tmp):
    with open(tmp, "w") as f:
      f.write(text)
  atomic_write(path, write)


def atomic_write_json(path: str, obj: Any) -> None:
  atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=True) + "\n")


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, float) and not math.isfinite(x):
    return str(x)  # JSON has no NaN/inf; keep them readable
  if hasattr(x, "item"):
    return _jsonable(x.item())
  return x


class MetricsLog:
  """Appends one JSON line per round to `metrics.jsonl` (process 0 of several only)."""

  def __init__(self, path: str):
    self.path = path
    self._fd = None
    if not is_writer():
      return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

  def append(self, record: dict) -> None:
    if self._fd is None:
      return
    line = (json.dumps(_jsonable(record), sort_keys=True) + "\n").encode()
    written = os.write(self._fd, line)
    if written != len(line):
      raise OSError(f"Short write to {self.path}: {written} of {len(line)} bytes.")
    os.fsync(self._fd)

  def close(self) -> None:
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def read_metrics(path: str) -> list[dict]:
  """Reads `metrics.jsonl`, ignoring a torn (unterminated) last line."""
  if not os.path.exists(path):
    return []
  with open(path, "rb") as f:
    data = f.read()
  lines = data.split(b"\n")
  complete = lines[:-1]  # the part after the last newline is torn or empty
  return [json.loads(line) for line in complete if line.strip()]
