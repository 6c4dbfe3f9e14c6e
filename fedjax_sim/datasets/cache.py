"""Convert once, cache atomically, memory-map afterwards: how every file loader stores data.

A loader hands `cached(source, kind, version, convert)` a function that reads
its source file into a `FederatedData` and the clients' natural ids. The
first call converts and writes the packed store (`FederatedData.save`) plus
`client_ids.json` into a hidden temporary folder next to the cache entry, and
renames it into place only when complete, so a crash or a corrupt source
never leaves a half-written cache that a later run would use, and never
touches an existing entry. Later calls memory-map the entry (well under a
second). The entry's name holds a hash of the source's absolute path, size
and modification time and the converter's version, so a changed file or
converter is converted afresh.

Cache root: the `cache_dir` a config gives, else `$FEDJAX_SIM_DATA_CACHE`,
else `~/.cache/fedjax_sim/datasets`.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
import tempfile
from typing import Callable

from fedjax_sim.core.data import DataError, FederatedData

_COMPLETE = "conversion.json"


def cache_root(cache_dir: str = "") -> str:
  return os.path.expanduser(cache_dir or os.environ.get("FEDJAX_SIM_DATA_CACHE", "")
                            or "~/.cache/fedjax_sim/datasets")


def _stamp(source: str) -> str:
  """Path, size and modification time of a file, or of every file under a folder."""
  if not os.path.isdir(source):
    st = os.stat(source)
    return f"{os.path.abspath(source)}:{st.st_size}:{st.st_mtime_ns}"
  parts = [os.path.abspath(source)]
  for folder, dirs, files in sorted(os.walk(source)):
    dirs.sort()
    for name in sorted(files):
      st = os.stat(os.path.join(folder, name))
      parts.append(f"{os.path.relpath(os.path.join(folder, name), source)}:{st.st_size}:"
                   f"{st.st_mtime_ns}")
  return "|".join(parts)


def decompressed(path: str, cache_dir: str) -> str:
  """A `.lzma` file decompressed once into the cache (atomically); other paths as given."""
  if not path.endswith(".lzma"):
    return path
  st = os.stat(path)
  out = os.path.join(cache_root(cache_dir),
                     f"{os.path.basename(path)[:-5]}-{st.st_size}-{st.st_mtime_ns}")
  if not os.path.exists(out):
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = out + f".partial-{os.getpid()}"
    try:
      with lzma.open(path) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
      os.replace(tmp, out)
    except (lzma.LZMAError, EOFError) as e:
      raise DataError(f"{path} is not a complete LZMA file ({e}); download it again.") from e
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
  return out


def entry_path(source: str, kind: str, version: int, cache_dir: str = "") -> str:
  """The cache folder of `source` (a file or a folder) as converted by `kind` at `version`."""
  key = f"{kind}:{version}:{_stamp(source)}"
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  name = os.path.basename(os.path.normpath(source))
  return os.path.join(cache_root(cache_dir), f"{name}-{digest}")


def cached(source: str, kind: str, version: int,
           convert: Callable[[], tuple[FederatedData, list[str]]],
           cache_dir: str = "") -> tuple[FederatedData, list[str]]:
  """`(data memory-mapped from the cache, client ids)`, converting `source` first if needed."""
  final = entry_path(source, kind, version, cache_dir)
  if not os.path.exists(os.path.join(final, _COMPLETE)):
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".partial-", dir=os.path.dirname(final))
    try:
      data, ids = convert()
      if len(ids) != data.num_clients:
        raise DataError(f"{source}: {len(ids)} client ids for {data.num_clients} clients.")
      data.save(tmp)
      with open(os.path.join(tmp, "client_ids.json"), "w") as f:
        json.dump(list(ids), f)
      with open(os.path.join(tmp, _COMPLETE), "w") as f:
        json.dump({"source": os.path.abspath(source), "kind": kind, "version": version,
                   "num_clients": data.num_clients}, f)
      try:
        os.rename(tmp, final)
      except OSError:  # another process finished the same entry first: use theirs
        if not os.path.exists(os.path.join(final, _COMPLETE)):
          raise
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  try:
    with open(os.path.join(final, "client_ids.json")) as f:
      ids = json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f"The cache entry {final} is corrupt ({e}); delete the folder to convert "
                    f"{source} again.") from e
  return FederatedData.load(final, mmap=True), ids
