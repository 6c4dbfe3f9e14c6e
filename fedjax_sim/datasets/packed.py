"""A population saved by `FederatedData.save` (registered as `data.kind = packed`)."""

from __future__ import annotations

import dataclasses

from fedjax_sim.core.data import FederatedData
from fedjax_sim.core.registry import DATASETS, DataSection
from fedjax_sim.core.schema import ConfigError


@dataclasses.dataclass(frozen=True, kw_only=True)
class PackedConfig(DataSection):
  """A folder written by `FederatedData.save`, optionally memory-mapped."""

  path: str = ""
  mmap: bool = False

  def __post_init__(self):
    if not self.path:
      raise ConfigError("data.path is required when data.kind = 'packed'.")


@DATASETS.register("packed", PackedConfig)
def _build(cfg: PackedConfig, ctx) -> FederatedData:
  """A folder written by `FederatedData.save` (memory-mapped with `mmap: true`)."""
  del ctx
  return FederatedData.load(cfg.path, mmap=cfg.mmap)
