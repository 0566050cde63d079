#!/usr/bin/env bash
# One prepared GPU run. Steps (arguments; default: tests sweep decode, in this order):
#   tests   the kernel tests compiled (not interpreted), the batch-invariance test of the real
#           sm_90 plans included (tests/test_svf_groups.py)
#   sweep   the kernel sweep (bench/svf_perf.py --quick: the layer's four ops and the whole
#           layer at T = 1, 16, 64, 4096)
#   decode  the decode step of the full Llama-3-8B (32 layers, vocabulary 128256) at batch
#           1/8/32/64: unpatched, per-row mixtures, one merged mixture
#   tune    tuning of the deterministic plans of the Llama-3-8B layer ops at buckets 16, 64 and
#           4096, every other bucket and shape given the heuristic's entry first
#           ($OUT/sm90.json: copy it to t2fast/kernels/configs/)
# Everything goes to $OUT (default bench/results); at most 8 files come back from a device run,
# so the benchmarks share one log. Each step has its own time limit (tests 120 s, sweep 150 s,
# decode 270 s: 9 minutes for the default steps) so a slow one cannot starve the rest; the tuner
# writes the table after each entry, so a cut-off tuning run keeps what it measured. TUNE_S sets
# the tuning limit (default 150 s).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
STEPS=${*:-tests sweep decode}
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
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # t2fast importable even if pip failed
export PYTHONUNBUFFERED=1                   # a step cut off by its time limit keeps its log
LOG="$OUT/run.log"
for step in $STEPS; do
  case $step in
    tests)
      # The tuner's dry run (a CPU interpreter run, which CI covers) fails in Triton 3.6's
      # interpreter there ("only 0-dimensional arrays can be converted to Python scalars").
      # Cold compiles dominate this step: with pytest-xdist (in the GPU image) eight workers
      # compile in parallel, sharing the cache directory.
      XDIST=$(python3 -c 'import xdist' 2>/dev/null && echo "-n 8")
      timeout 120 python3 -m pytest -q $XDIST --durations=10 tests/test_svf_groups.py \
          tests/test_ops_kernels.py tests/test_kernel_configs.py \
          --deselect tests/test_kernel_configs.py::test_tuner_updates_a_table_the_loader_reads \
          > "$OUT/tests.log" 2>&1; echo "tests rc=$?" >> "$OUT/tests.log" ;;
    sweep)
      timeout 150 python3 bench/svf_perf.py --quick --out "$OUT" >> "$LOG" 2>&1
      echo "sweep rc=$?" >> "$LOG" ;;
    decode)
      timeout 270 python3 bench/decode_step.py --batch 1 8 32 64 --reps 3 --out "$OUT" \
          >> "$LOG" 2>&1; echo "decode rc=$?" >> "$LOG" ;;
    tune)
      cp t2fast/kernels/configs/sm90.json "$OUT/sm90.json"
      # every bucket and shape gets an entry first (the heuristic's plan, untuned): a lookup
      # falls back to the next bucket up and the nearest shape, so without them the entries
      # tuned below would change plans they never measured
      python3 bench/tune_svf.py --untuned --update --arch sm90 --out "$OUT/sm90.json" \
          >> "$LOG" 2>&1
      timeout "${TUNE_S:-150}" python3 bench/tune_svf.py --update --quick --model llama3-8b \
          --buckets 16 64 4096 --out "$OUT/sm90.json" >> "$LOG" 2>&1
      echo "tune rc=$?" >> "$LOG" ;;
  esac
done
