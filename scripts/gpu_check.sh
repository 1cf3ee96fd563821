#!/usr/bin/env bash
# GPU check: run on a machine with an NVIDIA GPU, its own torch, and no network.
#
#   scripts/gpu_check.sh OUTDIR [STAGE ...]
#
# Stages (default: all, in this order):
#   build      compile resnext_kernels._C in place against this machine's torch
#   info       python -m resnext_kernels info
#   tests      the whole test suite with CUDA enabled (GPU tests run, not skip)
#   sanitizer  compute-sanitizer memcheck + racecheck on the CUDA kernel (scripts/gpu_check_cuda.sh)
#   bench      benchmark suite + `bench --json` (scripts/gpu_bench.sh)
# Each stage writes OUTDIR/<stage>.log and has its own time limit; OUTDIR/summary.md
# lists every stage with its exit code and duration. The script exits non-zero if
# any stage failed. Build + tests are sized to finish within 8 minutes on an H100.
set -uo pipefail
OUT="${1:?usage: scripts/gpu_check.sh OUTDIR [STAGE ...]}"
shift
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(build info tests sanitizer bench)
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."

export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
unset TRITON_INTERPRET

failed=0
{
  echo "# GPU check $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1
  echo '```'
  echo
  echo "| stage | exit | seconds |"
  echo "|---|---|---|"
} > "$OUT/summary.md"

run_stage() {  # name time_limit_s command...
  local name="$1" limit="$2"
  shift 2
  local start rc
  start=$(date +%s)
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "| $name | $rc | $(( $(date +%s) - start )) |" >> "$OUT/summary.md"
  tail -n 5 "$OUT/$name.log"
  [ "$rc" -ne 0 ] && failed=1
  return 0
}

for stage in "${STAGES[@]}"; do
  case "$stage" in
    build) run_stage build 300 python setup.py build_ext --inplace ;;
    info) run_stage info 60 python -m resnext_kernels info ;;
    tests) run_stage tests 300 python -m pytest tests/ -q -rs -p no:cacheprovider --junitxml="$OUT/junit.xml" ;;
    sanitizer)
      if [ -f scripts/gpu_check_cuda.sh ]; then run_stage sanitizer 240 bash scripts/gpu_check_cuda.sh "$OUT"
      else echo "| sanitizer | missing scripts/gpu_check_cuda.sh | 0 |" >> "$OUT/summary.md"; failed=1; fi ;;
    bench)
      if [ -f scripts/gpu_bench.sh ]; then run_stage bench 420 bash scripts/gpu_bench.sh "$OUT"
      else echo "| bench | missing scripts/gpu_bench.sh | 0 |" >> "$OUT/summary.md"; failed=1; fi ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done

grep -hE "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" 2>/dev/null | tail -n 20 >> "$OUT/summary.md"
cat "$OUT/summary.md"
exit "$failed"
