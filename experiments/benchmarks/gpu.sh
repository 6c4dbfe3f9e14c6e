#!/usr/bin/env bash
# The accelerator benchmarks in one go, writing JSON into OUT_DIR. Sized for an H100/H200-class
# GPU with about 128 GiB of host memory; not yet run on one, so its duration there is unmeasured
# (the 10,000,000-client population alone is 83 GB of float32, generated on the host by numpy,
# one thread per core up to 16). The cells run smallest first, so a run cut short by the
# machine's time limit still leaves the small cells' JSON.
# Run from the repository root:
#
#   pip install -e '.[cuda]'
#   bash experiments/benchmarks/gpu.sh OUT_DIR            # the full sizes
#   bash experiments/benchmarks/gpu.sh OUT_DIR --tiny     # seconds, on any machine (CI: CPU)
#
# It runs, each in its own process so every peak-memory figure is its own:
#   throughput_<model>_<K>.json  W1 rounds (experiments/benchmarks/throughput.py): logistic
#                                regression up to 10,000,000 clients per round, the MLP up to
#                                1,000,000; the same-device references (per-client loop,
#                                jit(vmap), tuned scans) up to 100,000 clients per round
#   emnist.json                  the EMNIST-shaped CNN (experiments/benchmarks/emnist.py) at
#                                100, 1,000 and 3,400 clients per round
#   compression.json             the compression kernels (experiments/benchmarks/compression.py)
#   device.txt                   nvidia-smi's description of the device, when present
# A cell that fails leaves its stderr in <name>.err and the script goes on; the exit status
# is the number of failed cells.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:?usage: gpu.sh OUT_DIR [--tiny]}
MODE=${2:-full}
mkdir -p "$OUT"
PY=${PYTHON:-python}
failed=0

run() {  # run NAME ARGS...: one cell, JSON to $OUT/NAME.json
  local name=$1; shift
  echo "# $name: $*" >&2
  if "$PY" "$@" --out "$OUT/$name.json" > /dev/null 2> "$OUT/$name.err"; then
    rm -f "$OUT/$name.err"
  else
    echo "# $name FAILED (see $OUT/$name.err)" >&2
    failed=$((failed + 1))
  fi
}

if [ "$MODE" = "--tiny" ]; then
  SMALL_K="100"; LARGE_MLP_K=""; LARGE_LOGREG_K=""; REF_MAX=100; ROUNDS=2
  EMNIST=(--clients-per-round 3 --num-clients 12 --mean-size 5 --rounds 2 --ref-rounds 2
          --block-size 2 --programs engine loop)
  COMPRESSION=(--d 1000 --reps 1 --no-target)
  CEILINGS=(--matmul-n 256 --copy-mib 8)
  TUNING=(--ref-blocks 16 --reference-rounds 2)  # one block size for the tuned references
else
  SMALL_K="10000 100000"; LARGE_MLP_K="1000000"; LARGE_LOGREG_K="1000000 10000000"
  REF_MAX=100000
  ROUNDS=4
  EMNIST=(--clients-per-round 100 1000 3400 --rounds 4)
  COMPRESSION=()
  CEILINGS=()
  TUNING=()
fi

command -v nvidia-smi > /dev/null && nvidia-smi -L > "$OUT/device.txt" 2>&1

throughput() {  # throughput MODEL K
  local refs=(); [ "$2" -gt "$REF_MAX" ] && refs=(--no-references)
  run "throughput_$1_$2" experiments/benchmarks/throughput.py --model "$1" \
    --clients-per-round "$2" --rounds "$ROUNDS" --cpu-devices 1 "${refs[@]}" "${CEILINGS[@]}" \
    "${TUNING[@]}"
}

# Smallest cells first, so that a machine lent for a limited time keeps the most results
# when the largest cells (10^6 MLP and 10^7 logistic-regression clients) do not finish.
for k in $SMALL_K; do
  throughput logreg "$k"
  throughput mlp "$k"
done
run emnist experiments/benchmarks/emnist.py "${EMNIST[@]}" "${CEILINGS[@]}"
run compression experiments/benchmarks/compression.py "${COMPRESSION[@]}"
for k in $LARGE_MLP_K; do throughput mlp "$k"; done
for k in $LARGE_LOGREG_K; do throughput logreg "$k"; done
echo "# done: $failed failed cell(s); JSON in $OUT" >&2
exit "$failed"
