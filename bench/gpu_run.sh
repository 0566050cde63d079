#!/usr/bin/env bash
# One prepared GPU run: the kernel tests compiled (not interpreted), the kernel sweep and the
# decode-step benchmark. Everything goes to $OUT (default bench/results). Each step has its own
# time limit (7.5 minutes in all) so a slow one cannot starve the rest. The decode
# benchmark runs 2 layers here (its SVDs and weight hashes dominate its start-up).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
# $OUT brings back at most 8 files: machine facts and the install share one log.
{ nvidia-smi; python3 -m pip install -q --no-deps --no-build-isolation -e .; } > "$OUT/env.log" 2>&1
export TRITON_CACHE_DIR="$(mktemp -d)"      # cold compiles: first-call times are compile times
export TRITON_INTERPRET=0
# The tuner's dry-run test (a CPU interpreter run, which CI covers) fails in Triton 3.6's
# interpreter there ("only 0-dimensional arrays can be converted to Python scalars").
timeout 180 python3 -m pytest -q -x tests/test_ops_kernels.py tests/test_kernel_configs.py \
    --deselect tests/test_kernel_configs.py::test_tuner_updates_a_table_the_loader_reads \
    > "$OUT/tests.log" 2>&1; echo "tests rc=$?" >> "$OUT/tests.log"
timeout 150 python3 bench/svf_perf.py --quick --out "$OUT" > "$OUT/sweep.log" 2>&1
echo "sweep rc=$?" >> "$OUT/sweep.log"
timeout 120 python3 bench/decode_step.py --layers 2 --batch 1 32 --reps 5 --out "$OUT" \
    > "$OUT/decode.log" 2>&1; echo "decode rc=$?" >> "$OUT/decode.log"
