"""Checkpoints of a run, written with orbax.

A checkpoint holds the whole `SimState` (server state, aggregator state, the
per-client store, each restored with its sharding) and the number of
completed rounds. Nothing else is needed to continue: host sampling, system
heterogeneity and device keys are all functions of `(seed, round)`, so a
resumed run repeats exactly what the uninterrupted run would have done.

orbax writes a checkpoint into a temporary folder and renames it when
complete, so a run killed mid-save leaves the previous checkpoints intact.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint is missing, unreadable, or does not fit the run."""


def checkpoint_dir(output_dir: str) -> str:
  return os.path.join(os.path.abspath(output_dir), "checkpoints")


class Checkpointer:
  """Saves and restores a run's state under `output_dir/checkpoints/<rounds done>`."""

  def __init__(self, output_dir: str, keep: int = 2):
    self.directory = checkpoint_dir(output_dir)
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def save(self, rounds_done: int, state, layout: dict | None = None) -> None:
    """Saves the state after `rounds_done` rounds (blocks until it is on disk).

    `layout` records how the per-client store is laid out (device count, rows
    per device), so that a resume on another number of devices can move each
    client's row to where the new layout expects it.
    """
    meta = {"rounds_done": int(rounds_done), "layout": layout or {}}
    self._manager.save(rounds_done, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    self._manager.wait_until_finished()

  def latest(self) -> int | None:
    return self._manager.latest_step()

  def saved_layout(self, rounds_done: int | None = None) -> dict:
    """The per-client store layout a checkpoint was written with ({} if none is recorded)."""
    step = self.latest() if rounds_done is None else rounds_done
    if step is None:
      return {}
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types; all mean "cannot use this checkpoint"
      raise CheckpointError(
          f"The checkpoint {os.path.join(self.directory, str(step))} has no readable metadata "
          f"({type(e).__name__}: {str(e)[:300]}); it is corrupt and has been left as it is. "
          "Start a fresh run in another output_dir.") from e
    return dict(meta.meta.get("layout") or {})

  def restore(self, like, rounds_done: int | None = None, layout: dict | None = None):
    """Restores the state saved after `rounds_done` rounds (default: the latest).

    Args:
      like: a state of the same structure (e.g. `Engine.init(params)`); its
        shapes, dtypes and shardings are the restore target.

    Raises:
      CheckpointError: no checkpoint, or one that cannot be read into `like`
        (corrupt files, or a run with a different model/algorithm). The
        checkpoint is left untouched.
    """
    step = self.latest() if rounds_done is None else rounds_done
    if step is None:
      raise CheckpointError(f"No checkpoint in {self.directory}. Start the run without --resume "
                            "(with --overwrite to replace its outputs).")
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                          like)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types; all mean "cannot use this checkpoint"
      raise CheckpointError(
          f"The checkpoint {os.path.join(self.directory, str(step))} cannot be restored into "
          f"this run ({type(e).__name__}: {str(e)[:300]}). It is corrupt or was written by a "
          "different model or algorithm; it has been left as it is. Resume from a matching "
          "config, or start a fresh run in another output_dir.") from e
    saved_layout = restored.meta.get("layout") or {}
    if layout is not None and saved_layout and saved_layout != layout:
      raise CheckpointError(
          f"The checkpoint {step} in {self.directory} was written with the per-client store laid "
          f"out for {saved_layout} and this run has {layout}: the rows would belong to other "
          f"clients. Restore it with the saved layout and re-lay it out "
          f"(`Engine.store_like` / `Engine.relayout`; `fedjax-sim run --resume` does this).")
    if restored.meta.get("rounds_done") != step:
      raise CheckpointError(f"The checkpoint {step} in {self.directory} says it holds "
                            f"{restored.meta.get('rounds_done')} rounds; it is corrupt.")
    return restored.state, step

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
