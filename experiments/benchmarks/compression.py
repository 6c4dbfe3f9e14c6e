"""Compressor kernels: encode/decode throughput against a memory copy, and NMSE against theory.

For each d and compressor, a batch of clients' float32 vectors (standard
normal) goes through `vmap(compress)` (client side) and `vmap(decompress)`
(server side), each jitted and timed on its own (the best of --reps calls
after a compiling one). Throughput is the float32 input size over the time,
in GB/s, next to `memcpy_gbps`: a jitted `-x` over the same array in the same
run (one read and one write of every value, the machine's bandwidth limit
for any encoder). NMSE is the mean over the batch of ||x_hat - x||^2 /
||x||^2; `nmse_theory` is the literature's value where one exists, averaged
over the same clients (exact
expectation for stochastic quantization on this x, QSGD's variance bound,
2 ln(d) / (2^b - 1)^2 for rotated b-bit quantization, pi/2 - 1 for DRIVE,
d/k - 1 for unbiased random-k), else null.

The `target` record: rotation + 8-bit quantization encode of 10,000 clients
x 10^5 parameters, streamed as the engine streams a round: one call per
block of --block clients (default 16), each block sliced from a 100 MB
chunk of client vectors, fresh keys for every client; against a memory
copy of the chunk in the same run.

  python experiments/benchmarks/compression.py --out compression.json   # d in 1e4, 1e6, 1e7
  python experiments/benchmarks/compression.py --quick                  # about a minute
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from report import emit, machine  # experiments/benchmarks/report.py, next to this script

BATCH_VALUES = 1 << 24  # values per timed call (64 MiB of float32)


def _compressors():
  from fedjax_sim.compression import (drive, qsgd, random_k, rotated, scaled_sign,
                                      stochastic_quantizer, top_k)
  out = [stochastic_quantizer(b) for b in (1, 2, 4, 8)]
  out.append(stochastic_quantizer(8, block_size=256))
  out += [rotated(stochastic_quantizer(b)) for b in (1, 2, 4, 8)]
  out += [qsgd(4), qsgd(16), drive(), top_k(fraction=0.01), random_k(fraction=0.01),
          scaled_sign()]
  return out


def _best(fn, *args, reps: int) -> float:
  import jax
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return min(times)


def measure(compressor, d: int, clients: int, reps: int, memcpy_s: float, x, keys) -> dict:
  import jax
  import numpy as np
  compress = jax.jit(jax.vmap(compressor.compress))
  decompress = jax.jit(jax.vmap(lambda p, k: compressor.decompress(p, k, d)))
  payload = compress(x, keys)
  x_hat = decompress(payload, keys)
  t_enc = _best(compress, x, keys, reps=reps)
  t_dec = _best(decompress, payload, keys, reps=reps)
  xs, xh = np.asarray(x, np.float64), np.asarray(x_hat, np.float64)
  nmse = float(np.mean(np.sum((xh - xs) ** 2, axis=1) / np.sum(xs ** 2, axis=1)))
  gb = clients * d * 4 / 1e9
  values = [compressor.nmse_theory(v) for v in np.asarray(x)]  # per client, as the NMSE is
  theory = None if values[0] is None else float(np.mean(values))
  return {"compressor": compressor.name, "bits_per_coordinate": compressor.bits(d) / d, "d": d,
          "clients": clients, "nmse": nmse, "nmse_theory": theory, "unbiased": compressor.unbiased,
          "encode_gbps": gb / t_enc, "decode_gbps": gb / t_dec, "memcpy_gbps": gb / memcpy_s,
          "encode_seconds": t_enc, "decode_seconds": t_dec}


def target(clients: int, d: int, block: int, reps: int, chunk: int = 256) -> dict:
  """Rotation + 8-bit encode of `clients` x d, streamed in blocks of `block` clients.

  The engine runs a round the same way: a loop over blocks of clients,
  each block vmapped. Every call encodes a block sliced from a chunk of
  `chunk` clients' vectors (100 MB at d = 1e5, far larger than the cache, so
  each block is read from memory, not from a cache warmed by the last
  call), with fresh keys for every client. The memory copy runs over the
  same chunk.
  """
  import jax
  import jax.numpy as jnp
  from fedjax_sim.compression import rotated, stochastic_quantizer
  c = rotated(stochastic_quantizer(8))
  if not 1 <= block <= clients:
    raise ValueError(f"--block must be between 1 and the {clients} clients; got {block}.")
  chunk = max(chunk, block)  # the chunk holds at least one block
  x = jax.random.normal(jax.random.key(0), (chunk, d))
  keys = jax.random.split(jax.random.key(1), clients)
  per_chunk = chunk // block
  calls = clients // block

  @jax.jit
  def encode(x, keys, i):
    xs = jax.lax.dynamic_slice_in_dim(x, (i % per_chunk) * block, block)
    return jax.vmap(c.compress)(xs, jax.lax.dynamic_slice_in_dim(keys, i * block, block))

  copy = jax.jit(lambda v: -v)
  index = [jnp.int32(i) for i in range(calls)]
  jax.block_until_ready((encode(x, keys, index[0]), copy(x)))

  def run(step, n, group):
    # Waits for every call (the CPU client may run independent calls side by
    # side, so waiting for the last one alone would not time the others),
    # a group of calls at a time.
    best = float("inf")
    for _ in range(reps):
      t = time.perf_counter()
      for start in range(0, n, group):
        jax.block_until_ready([step(i) for i in range(start, min(n, start + group))])
      best = min(best, time.perf_counter() - t)
    return best

  enc_gbps = calls * block * d * 4 / 1e9 / run(lambda i: encode(x, keys, index[i]), calls,
                                               per_chunk)
  copies = max(1, calls * block // chunk)
  mem_gbps = copies * chunk * d * 4 / 1e9 / run(lambda i: copy(x), copies, 1)
  return {"compressor": c.name, "clients": calls * block, "d": d, "block_clients": block,
          "encode_gbps": enc_gbps, "memcpy_gbps": mem_gbps, "fraction_of_memcpy": enc_gbps / mem_gbps,
          "target_fraction": 0.25, "met": enc_gbps / mem_gbps >= 0.25}


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--d", default="10000,1000000,10000000", help="vector lengths, comma-separated")
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--quick", action="store_true", help="d in 1e4, 1e5; a small target run")
  ap.add_argument("--no-target", action="store_true")
  ap.add_argument("--block", type=int, default=16, help="clients per block in the target run")
  ap.add_argument("--out", help="also write the JSON here")
  args = ap.parse_args(argv)
  dims = [10_000, 100_000] if args.quick else [int(float(v)) for v in args.d.split(",")]

  import jax
  import numpy as np
  records = []
  for d in dims:
    clients = int(np.clip(BATCH_VALUES // d, 2, 1000))
    x = jax.random.normal(jax.random.key(d), (clients, d))
    keys = jax.random.split(jax.random.key(d + 1), clients)
    memcpy_s = _best(jax.jit(lambda v: -v), x, reps=args.reps)
    for c in _compressors():
      records.append(measure(c, d, clients, args.reps, memcpy_s, x, keys))
      print(json.dumps(records[-1]), file=sys.stderr, flush=True)
  result = {"benchmark": "compression", "records": records,
            "machine": machine()}
  if not args.no_target:
    result["target"] = target(1_000 if args.quick else 10_000, 100_000, args.block, args.reps)
  return emit(result, args.out)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  main()
