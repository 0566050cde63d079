#!/usr/bin/env bash
# One prepared GPU run: the kernel tests compiled (not interpreted), the kernel sweep, the
# decode-step benchmark, then tuning of the config table's untuned Llama-3-8B buckets.
# Everything goes to $OUT (default bench/results); at most 8 files come back from a device run,
# so the three benchmarks share one log. Each step has its own time limit (9 minutes in all)
# so a slow one cannot starve the rest; the tuner writes the table after each entry, so a cut-off
# tuning run keeps what it measured ($OUT/sm90.json: copy it to kernels/configs/).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
{ nvidia-smi; python3 -m pip install -q --no-deps --no-build-isolation -e .; } > "$OUT/env.log" 2>&1
export TRITON_CACHE_DIR="$(mktemp -d)"      # cold compiles: first-call times are compile times
export TRITON_INTERPRET=0
# The tuner's dry-run test (a CPU interpreter run, which CI covers) fails in Triton 3.6's
# interpreter there ("only 0-dimensional arrays can be converted to Python scalars").
timeout 150 python3 -m pytest -q -x tests/test_ops_kernels.py tests/test_kernel_configs.py \
    --deselect tests/test_kernel_configs.py::test_tuner_updates_a_table_the_loader_reads \
    > "$OUT/tests.log" 2>&1; echo "tests rc=$?" >> "$OUT/tests.log"
LOG="$OUT/run.log"
timeout 120 python3 bench/svf_perf.py --quick --out "$OUT" >> "$LOG" 2>&1
echo "sweep rc=$?" >> "$LOG"
timeout 100 python3 bench/decode_step.py --layers 2 --batch 1 32 --reps 5 --out "$OUT" \
    >> "$LOG" 2>&1; echo "decode rc=$?" >> "$LOG"
cp kernels/configs/sm90.json "$OUT/sm90.json"
timeout 150 python3 bench/tune_svf.py --update --quick --model llama3-8b \
    --buckets 32 128 256 512 1024 2048 --out "$OUT/sm90.json" >> "$LOG" 2>&1
echo "tune rc=$?" >> "$LOG"
