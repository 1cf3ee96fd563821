#!/usr/bin/env bash
# Benchmarks on a GPU machine; called by scripts/gpu_check.sh (bench stage, 420 s limit).
#
#   scripts/gpu_bench.sh OUTDIR
#
# Writes into OUTDIR, with STEM = <YYYY-MM-DD>_<card>_<shortcommit>:
#   STEM.json          raw pytest-benchmark JSON of the benchmarks/ suite (all cases except torch.compile)
#   STEM_compile.json  raw pytest-benchmark JSON of the torch.compile baseline cases (bfloat16)
#   STEM_cli.json      JSON of `python -m resnext_kernels bench --quick`
#   STEM.md            markdown tables generated from the three JSON files by
#                      `python -m resnext_kernels.bench_report` (never edited by hand)
#   STEM_*.log         console output of each step
# The compile cases run in their own pytest process with their own time limit, so a
# slow max-autotune compile cannot cost the other results: pytest is stopped with
# SIGINT at the limit and pytest-benchmark still writes the cases that finished.
# Environment: BENCH_SUITE_S, BENCH_COMPILE_S, BENCH_CLI_S time limits in seconds;
# BENCH_DEVICE (default cuda; cpu gives a dry run of this script on a CPU machine);
# BENCH_SEED (default: from the clock; the same for all three steps);
# BENCH_PYTEST_ARGS, BENCH_CLI_ARGS extra arguments (e.g. "--bench-shapes s1,s4").
# Exits non-zero if any step failed or timed out (the tables are written anyway).
set -uo pipefail
OUT="${1:?usage: scripts/gpu_bench.sh OUTDIR}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
SUITE_S=${BENCH_SUITE_S:-170}
COMPILE_S=${BENCH_COMPILE_S:-130}
CLI_S=${BENCH_CLI_S:-70}
DEVICE=${BENCH_DEVICE:-cuda}
SEED=${BENCH_SEED:-$(( $(date +%s) % 2147483647 ))}
# Triton autotuning results go to Triton's disk cache (triton >= 3.4), so the
# three steps autotune each kernel and shape once, not three times.
export TRITON_CACHE_AUTOTUNING=${TRITON_CACHE_AUTOTUNING:-1}
read -r -a PYTEST_EXTRA <<< "${BENCH_PYTEST_ARGS:-}"
read -r -a CLI_EXTRA <<< "${BENCH_CLI_ARGS:-}"

STEM=$($PY -m resnext_kernels.bench_report --stem) || { echo "cannot compute the result name" >&2; exit 2; }
echo "results: $OUT/$STEM.* (device $DEVICE, seed $SEED)"
failed=0

step() {  # name limit_s command...
  local name="$1" limit="$2" rc start
  shift 2
  start=$(date +%s)
  timeout --signal=INT --kill-after=5 "$limit" "$@" > "$OUT/${STEM}_$name.log" 2>&1
  rc=$?
  echo "$name: exit $rc after $(( $(date +%s) - start )) s (limit $limit s)"
  tail -n 3 "$OUT/${STEM}_$name.log"
  [ "$rc" -ne 0 ] && failed=1
  return 0
}

# Suite step: the model cases first, then the block cases dtype-major (conftest.py),
# so a time limit cuts float32 block cases, not the model or whole shapes.
# Compile step: blocks first; the whole-model max-autotune compile is the slowest part.
PYTEST=("$PY" -m pytest --benchmark-only -q -rs -p no:cacheprovider --bench-device "$DEVICE"
        --bench-seed "$SEED" "${PYTEST_EXTRA[@]}")
MODEL=benchmarks/test_model_bench.py
BLOCK=benchmarks/test_block_bench.py
if $PY -c "import pytest_benchmark" 2>/dev/null; then
  step suite "$SUITE_S" "${PYTEST[@]}" "$MODEL" "$BLOCK" -k "not compile" --bench-compile none \
    --benchmark-json "$OUT/$STEM.json"
  step compile "$COMPILE_S" "${PYTEST[@]}" "$BLOCK" "$MODEL" -k "compile" --bench-compile bfloat16 \
    --benchmark-json "$OUT/${STEM}_compile.json"
else
  echo "pytest-benchmark is not installed: suite and compile steps skipped" | tee "$OUT/${STEM}_suite.log"
  failed=1
fi
PLOT=()  # the chart is optional: only where matplotlib is installed
$PY -c "import matplotlib" 2>/dev/null && PLOT=(--plot "$OUT/${STEM}_cli.png")
step cli "$CLI_S" "$PY" -m resnext_kernels bench --quick --device "$DEVICE" --seed "$SEED" "${CLI_EXTRA[@]}" \
  --json "$OUT/${STEM}_cli.json" "${PLOT[@]}"

jsons=()
for f in "$OUT/$STEM.json" "$OUT/${STEM}_compile.json" "$OUT/${STEM}_cli.json"; do
  [ -s "$f" ] && jsons+=("$f")
done
if [ ${#jsons[@]} -gt 0 ]; then
  $PY -m resnext_kernels.bench_report "${jsons[@]}" > "$OUT/$STEM.md" || failed=1
else
  echo "no JSON results were written" >&2
  failed=1
fi
exit "$failed"
