"""What every benchmark script records about the machine, and how it emits its JSON."""

from __future__ import annotations

import json
import os
import platform


def machine() -> dict:
  import jax
  return {"platform": platform.platform(), "processor": platform.processor(),
          "cpu_count": os.cpu_count(), "devices": [str(d) for d in jax.devices()],
          "jax": jax.__version__, "python": platform.python_version()}


def emit(result: dict, out: str | None) -> dict:
  """Prints the result as JSON and, if `out` is given, writes it there too."""
  text = json.dumps(result, indent=2)
  print(text)
  if out:
    with open(out, "w") as f:
      f.write(text + "\n")
  return result
