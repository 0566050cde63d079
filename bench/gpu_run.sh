#!/usr/bin/env bash
# One prepared GPU run. Steps (arguments; default all four, in this order):
#   tests   the kernel tests compiled (not interpreted)
#   sweep   the kernel sweep (bench/svf_perf.py --quick)
#   decode  the decode-step benchmark
#   tune    tuning of the config table's untuned Llama-3-8B buckets and of Qwen2.5-7B's
#           buckets 16, 64 and 4096 ($OUT/sm90.json: copy it to kernels/configs/)
# Everything goes to $OUT (default bench/results); at most 8 files come back from a device run,
# so the benchmarks share one log. Each step has its own time limit (9 minutes for all four) so
# a slow one cannot starve the rest; the tuner writes the table after each entry, so a cut-off
# tuning run keeps what it measured. TUNE_S sets the tuning limit (default 150 s).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
STEPS=${*:-tests sweep decode tune}
for step in $STEPS; do
  case $step in tests|sweep|decode|tune) ;;
    *) echo "gpu_run.sh: unknown step '$step' (expected tests, sweep, decode or tune)" >&2
       exit 2 ;;
  esac
done
mkdir -p "$OUT"
{ nvidia-smi; python3 -m pip install -q --no-deps --no-build-isolation -e .; } > "$OUT/env.log" 2>&1
export TRITON_CACHE_DIR="$(mktemp -d)"      # cold compiles: first-call times are compile times
export TRITON_INTERPRET=0
LOG="$OUT/run.log"
for step in $STEPS; do
  case $step in
    tests)
      # The tuner's dry-run test (a CPU interpreter run, which CI covers) fails in Triton 3.6's
      # interpreter there ("only 0-dimensional arrays can be converted to Python scalars").
      timeout 150 python3 -m pytest -q tests/test_ops_kernels.py tests/test_kernel_configs.py \
          --deselect tests/test_kernel_configs.py::test_tuner_updates_a_table_the_loader_reads \
          > "$OUT/tests.log" 2>&1; echo "tests rc=$?" >> "$OUT/tests.log" ;;
    sweep)
      timeout 120 python3 bench/svf_perf.py --quick --out "$OUT" >> "$LOG" 2>&1
      echo "sweep rc=$?" >> "$LOG" ;;
    decode)
      timeout 100 python3 bench/decode_step.py --layers 2 --batch 1 32 --reps 5 --out "$OUT" \
          >> "$LOG" 2>&1; echo "decode rc=$?" >> "$LOG" ;;
    tune)
      cp kernels/configs/sm90.json "$OUT/sm90.json"
      timeout "${TUNE_S:-150}" bash -c "
        python3 bench/tune_svf.py --update --quick --model llama3-8b \
            --buckets 32 128 256 512 1024 2048 --out '$OUT/sm90.json' &&
        python3 bench/tune_svf.py --update --quick --model qwen2.5-7b \
            --buckets 16 64 4096 --out '$OUT/sm90.json'" >> "$LOG" 2>&1
      echo "tune rc=$?" >> "$LOG" ;;
  esac
done
