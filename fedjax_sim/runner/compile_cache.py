"""JAX's persistent compilation cache, on by default for runs.

A run compiles a handful of programs (one per chunk shape, the server step,
evaluation); on a small CPU that is often half the wall time of a short
experiment. With the persistent cache, XLA's compiled executables are stored
on disk keyed by the program, the devices and the JAX version, so running the
same config again (or a config with the same shapes) compiles nothing.

Where the cache lives, in order of precedence:
  1. `enable_compilation_cache(path)` / `fedjax-sim run --compile-cache PATH`;
  2. the environment variable `FEDJAX_SIM_COMPILE_CACHE` (a folder, or `off`);
  3. JAX's own `JAX_COMPILATION_CACHE_DIR` / `jax_compilation_cache_dir`, if
     the user set one;
  4. `$XDG_CACHE_HOME/fedjax_sim/xla` (default `~/.cache/fedjax_sim/xla`).
`off` (or `none`, `0`, `false`) disables it. Entries are only ever added; the
folder can be deleted at any time.
"""

from __future__ import annotations

import os
import warnings

import jax

ENV = "FEDJAX_SIM_COMPILE_CACHE"
_OFF = ("off", "none", "0", "false", "")


def default_cache_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "fedjax_sim", "xla")


class CompileCacheError(ValueError):
  """The compilation cache folder the user asked for cannot be used."""


def enable_compilation_cache(path: str | None = None) -> str | None:
  """Turns on JAX's persistent compilation cache; returns its folder (None: off).

  Args:
    path: the cache folder, or "off". None: the environment variable
      `FEDJAX_SIM_COMPILE_CACHE`, else a folder the user already gave JAX,
      else `default_cache_dir()`.

  Every compiled program is cached, however fast it compiled (JAX's default
  skips programs that compile in under a second, which on a CPU are most of
  a run's programs and together still cost seconds). JAX opens its cache
  once per process; a call that changes the folder (or turns it off) resets
  it, so the returned folder is the one in use.

  Raises:
    CompileCacheError: a folder given by argument or environment cannot be
      created. (If the default folder cannot be, the cache is turned off with
      a warning: a read-only home must not stop a run.)
  """
  chosen = path if path is not None else os.environ.get(ENV)
  if chosen is None:
    chosen = jax.config.jax_compilation_cache_dir or default_cache_dir()
    user_given = False
  else:
    user_given = True
  if chosen.strip().lower() in _OFF:
    _apply(None)
    return None
  chosen = os.path.abspath(os.path.expanduser(chosen))
  try:
    os.makedirs(chosen, exist_ok=True)
    if not os.access(chosen, os.W_OK):
      raise PermissionError(f"{chosen!r} is not writable")
  except OSError as e:
    if user_given:
      raise CompileCacheError(
          f"Cannot use the compilation cache folder {chosen!r} ({e}); pass --compile-cache "
          f"with a writable folder, or 'off' (environment: {ENV}).") from e
    warnings.warn(f"fedjax_sim: the compilation cache folder {chosen!r} cannot be created ({e}); "
                  f"compiling without a persistent cache. Set {ENV} to a writable folder.",
                  stacklevel=2)
    _apply(None)
    return None
  _apply(chosen)
  return chosen


def _apply(folder: str | None) -> None:
  """Points JAX's cache at `folder` (None: off), resetting it if it was open elsewhere."""
  from jax._src import compilation_cache  # reset_cache has no public alias
  enabled = bool(jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir)
  current = jax.config.jax_compilation_cache_dir if enabled else None
  if folder != current:  # JAX remembers its first answer to "is the cache used?"
    compilation_cache.reset_cache()
  if folder is None:
    jax.config.update("jax_enable_compilation_cache", False)
    jax.config.update("jax_compilation_cache_dir", None)
    return
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


class CompileClock:
  """Adds up the time JAX spends tracing, lowering and compiling, and cache hits.

  Listens to JAX's monitoring events while it is open (`with CompileClock()
  as clock: ...`); `clock.seconds` is the compile time (tracing, lowering and
  the backend step), `clock.backend_compiles` the programs that reached the
  backend step and `clock.cache_hits` those of them loaded from the persistent
  cache instead of compiled. Events from every thread are counted.
  """

  _EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
             "/jax/core/compile/jaxpr_to_mlir_module_duration",
             "/jax/core/compile/backend_compile_duration")

  def __init__(self):
    self.seconds = 0.0
    self.backend_compiles = 0
    self.cache_hits = 0
    self._open = False

  def _on_duration(self, event: str, duration: float, **_) -> None:
    if self._open and event in self._EVENTS:
      self.seconds += float(duration)
      if event.endswith("backend_compile_duration"):
        self.backend_compiles += 1

  def _on_event(self, event: str, **_) -> None:
    if self._open and event == "/jax/compilation_cache/cache_hits":
      self.cache_hits += 1

  def __enter__(self) -> "CompileClock":
    from jax import monitoring
    self._open = True
    monitoring.register_event_duration_secs_listener(self._on_duration)
    monitoring.register_event_listener(self._on_event)
    return self

  def __exit__(self, *exc) -> None:
    from jax._src import monitoring as _monitoring  # the public module has no unregister
    self._open = False
    for unregister, fn in ((_monitoring.unregister_event_duration_listener, self._on_duration),
                           (_monitoring.unregister_event_listener, self._on_event)):
      try:
        unregister(fn)
      except (AssertionError, ValueError, KeyError):
        pass


__all__ = ["CompileCacheError", "CompileClock", "default_cache_dir", "enable_compilation_cache"]
