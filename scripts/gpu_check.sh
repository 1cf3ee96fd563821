#!/usr/bin/env bash
# GPU check: build, test, sanitize, benchmark and profile resnext_kernels on a
# machine with an NVIDIA GPU, its own torch and no network, within ONE device
# lease: 15 minutes of device time in all, the machine's start (1-2 min) and
# idle time included, at most 600 s per command.
#
#   scripts/gpu_check.sh OUTDIR [first|second|STAGE ...]    (default: first)
#
# The plan: at most 13 minutes of device time, counting 120 s for one start,
# in two calls (their limits are CALL_TABLE below; tests/test_gpu_check_script.py
# checks that the stage limits fit them):
#   call 1, timeout_s 480, carry [".gpu_check_carry"]:
#       scripts/gpu_check.sh $OUT first
#   call 2, timeout_s 180, carry [".gpu_check_carry"], at once after call 1
#   (the machine stays warm for 30 s only):
#       scripts/gpu_check.sh $OUT second
# 120 + 480 + 180 = 780 s = 13 min. The long call goes first: it holds stages
# 1-5 in the order of what only a GPU can tell us (build, correctness,
# memory errors, headline numbers, the training step), each publishing its
# results as it ends, so a lost second call (machine gone cold, budget spent)
# costs only stage 6 (tuned numbers, plans, ncu, model, CLI). Run call 2 only
# when call 1's reply says lease.warm is true; a fresh machine would cost
# another start. The carry folder is written by scripts/gpu_check_prepare.sh
# on the CPU machine (a prebuilt _C, a warmed Triton cache, the rehearsed
# versions; docs/benchmarks.md "The GPU check"); without it the check still
# runs, building _C here and compiling every Triton kernel here.
#
# Stages (STAGE_TABLE: call, limit in seconds, the signal that stops it):
#   build      _C: the carried prebuilt when it matches these sources and loads
#              with this torch, else setup.py build_ext --inplace with ptxas -v
#              (scripts/gpu_check_build.sh)
#   info       python -m resnext_kernels info
#   gpu_tests  the GPU-marked tests (pytest -m cuda) but the sweep, in parallel
#              (pytest-xdist, --dist loadgroup: the >2**31-element tests share a
#              worker), RESNEXT_KERNELS_AUTOTUNE=0 (the tests that tune set it
#              themselves); the 40 slowest tests' times go to the summary
#   sweep      tests/test_gpu_sweep.py: random configurations of every fused path
#              vs float64 in bf16/fp16/fp32 (inference cuda and triton, training
#              triton, the fine-tuning backward)
#   sanitizer  compute-sanitizer memcheck on one small block per kernel family
#              (scripts/gpu_sanitizer_cases.py)
#   headline   bf16 channels_last batch 128, s1-s4: cuda, triton, eager
#              (benchmarks/test_block_bench.py), heuristic configs
#              (RESNEXT_KERNELS_AUTOTUNE=0: no tuning time)
#   train      one training step, s1-s3: the fused triton path vs eager AMP
#   finetune   one fine-tuning step (FrozenBatchNorm2d) of s1-s3, the inference
#              op's triton forward + fused backward vs eager AMP, bf16, batch 32
#              (FINETUNE_BENCH, default benchmarks/test_finetune_bench.py)
#   compile    torch.compile baselines of the headline blocks, in whatever time
#              call 1 has left (limit "rest")
#   tuned      the headline's fused cases again with autotuning on
#   plans      python -m resnext_kernels.cuda_plans: the cuda kernel's tile plans timed
#   ncu        Nsight Compute on one forward of the cuda and triton backends at s1, s4
#   model      the whole model at batch 128, eager and fused, heuristic configs
#   cli        python -m resnext_kernels bench --quick on one shape (its JSON is
#              kept, its output is not parsed)
# Stages outside both calls (run by name): bench (the whole block suite without
# compile, every dtype), cuda_sanitizer (scripts/gpu_check_cuda.sh: memcheck,
# racecheck, synccheck of the CUDA kernel over many shapes and plans), tune
# (python -m resnext_kernels tune, resnext50_32x4d batch 32 bf16 channels_last,
# twice into a fresh tuning store: the second run must report "0 timed").
#
# Time: with a set, the script ends within its call's timeout_s minus
# CALL_MARGIN_S; otherwise (stages by name, or both sets at once) within
# GPU_CHECK_DEADLINE_S (default 540). Each
# stage runs under min(its limit, the time left); a stage with under 20 s left
# (a shorter stage: under its own limit) is skipped and reported. Benchmark and
# test stages are stopped with SIGINT, so pytest still reports (and
# pytest-benchmark still writes) what finished.
#
# Dry run (GPU_CHECK_DRY_RUN=1, CPU machine, scripts/gpu_check_prepare.sh):
# every stage's command is resolved instead of run (scripts/gpu_check_resolve.py:
# imports, test ids, CLI flags, file names), under the same table.
#
# Output: work files and logs go to GPU_CHECK_WORK (default .gpu_check/ in the
# repository, git-ignored; it survives between calls while the machine stays
# warm, so the second call's report includes the first call's results). After
# every stage OUTDIR receives at most 8 files (the device tool returns no more),
# named STEM_* with STEM = <YYYY-MM-DD>_<card>_<shortcommit>:
#   STEM_summary.md   versions line, stages with exit codes, seconds, limits and
#                     Triton kernels compiled here; test outcomes; plan table
#   STEM_logs.tar.gz  every log (build, tests + junit, sweep, sanitizer, train,
#                     finetune and tuned JSON, ncu report and its text, the CLI chart)
#   STEM.json  STEM_compile.json  STEM_model.json  STEM_cli.json  STEM_plans.json
#                     raw JSON (pytest-benchmark / bench CLI / cuda_plans)
#   STEM.md           markdown tables from the JSON files (python -m resnext_kernels.bench_report)
# Exit status: non-zero if any stage failed, timed out or was skipped.
set -uo pipefail
OUT="${1:?usage: scripts/gpu_check.sh OUTDIR [first|second|STAGE ...]}"
shift
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
REPO="$(pwd)"

# The plan, read by tests/test_gpu_check_script.py. A stage may have a row per
# call (build). limit_s "rest": whatever the call's deadline leaves.
read -r -d '' STAGE_TABLE <<'TABLE'
# stage         call  limit_s  stop
build           1     80       TERM
info            1     30       TERM
gpu_tests       1     140      INT
sweep           1     40       INT
sanitizer       1     45       TERM
headline        1     45       INT
train           1     40       INT
finetune        1     25       INT
compile         1     rest     INT
build           2     10       TERM
tuned           2     40       INT
plans           2     20       TERM
ncu             2     30       TERM
model           2     30       INT
cli             2     15       INT
bench           -     240      INT
cuda_sanitizer  -     150      TERM
tune            -     150      TERM
TABLE
read -r -d '' CALL_TABLE <<'TABLE'
# call  set     timeout_s
1       first   480
2       second  180
TABLE
CALL_MARGIN_S=15   # of a call's timeout_s: process start, the last publish, the tool's own overhead
RESERVE=15         # seconds kept for packing OUTDIR after the last stage
START_S=120        # device time counted for one machine start (the plan's 13 minutes include it)
PLAN_S=780         # the whole plan: 13 minutes

table_rows() { grep -v '^#' <<<"$STAGE_TABLE"; }
call_of_set() { awk -v s="$1" '$2 == s {print $1}' <<<"$CALL_TABLE"; }
timeout_of_call() { awk -v c="$1" '!/^#/ && $1 == c {print $3}' <<<"$CALL_TABLE"; }
stage_row() {  # stage call -> "limit stop" (call "" = the stage's first row)
  table_rows | awk -v s="$1" -v c="$2" '$1 == s && (c == "" || $2 == c) {print $3, $4; exit}'
}

STAGES=()       # the stages to run, in order
STAGE_CALLS=()  # the call whose table row gives each one's limit ("" for a stage named alone: its first row)
CALL=""         # the call, when exactly one set was given (it sets the deadline)
for arg in "${@:-first}"; do
  if [ -n "$(call_of_set "$arg")" ]; then
    [ -n "$CALL" ] && CALL=several || CALL=$(call_of_set "$arg")
    for stage in $(table_rows | awk -v c="$(call_of_set "$arg")" '$2 == c {print $1}'); do
      STAGES+=("$stage")
      STAGE_CALLS+=("$(call_of_set "$arg")")
    done
  elif [ -n "$(stage_row "$arg" "")" ]; then
    STAGES+=("$arg")
    STAGE_CALLS+=("")
  else
    echo "unknown stage or set: $arg" >&2
    exit 2
  fi
done

START=$(date +%s)
if [ -n "$CALL" ] && [ "$CALL" != several ]; then
  DEADLINE=${GPU_CHECK_DEADLINE_S:-$(( $(timeout_of_call "$CALL") - CALL_MARGIN_S ))}
else
  DEADLINE=${GPU_CHECK_DEADLINE_S:-540}
fi
DRY=${GPU_CHECK_DRY_RUN:-0}
WORK="${GPU_CHECK_WORK:-$REPO/.gpu_check}"
CARRY="${GPU_CHECK_CARRY:-$REPO/.gpu_check_carry}"
LOGS="$WORK/logs"
RES="$WORK/results"
mkdir -p "$LOGS" "$RES"
PY=${PYTHON:-$(command -v python || command -v python3)}  # the GPU machine may have only python3
export PYTHON="$PY" GPU_CHECK_CARRY="$CARRY"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PYTHONUNBUFFERED=1
# The package is built in place, not installed: every process imports it from here.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# Triton keeps autotuning results in its disk cache (triton >= 3.4): the bench,
# compile, cli and ncu processes tune each kernel and shape once between them.
export TRITON_CACHE_AUTOTUNING=1
# Triton's kernel cache: seeded once per machine from the carry (compiled on the
# CPU machine for sm_90 through Triton's own runtime, scripts/gpu_check_prepare.sh).
# Its index files name absolute paths, so they are rewritten to where it lies here.
export TRITON_CACHE_DIR="$WORK/triton_cache"
if [ "$DRY" != 1 ] && [ -d "$CARRY/triton_cache" ] && [ ! -d "$TRITON_CACHE_DIR" ]; then
  cp -r "$CARRY/triton_cache" "$TRITON_CACHE_DIR"
  $PY -m resnext_kernels.bench.triton_compile --relocate-cache "$TRITON_CACHE_DIR" > "$LOGS/triton_cache_seed.log" 2>&1
fi
mkdir -p "$TRITON_CACHE_DIR"
[ "$DRY" = 1 ] || unset TRITON_INTERPRET
SEED=${BENCH_SEED:-$(( START % 2147483647 ))}
FINETUNE_BENCH=${FINETUNE_BENCH:-benchmarks/test_finetune_bench.py}

STEM=$($PY -m resnext_kernels.bench_report --stem 2>/dev/null) || STEM="$(date -u +%F)_unknown-card_$(git rev-parse --short HEAD 2>/dev/null || echo nocommit)"
SUMMARY="$WORK/summary.md"
# One line: this machine's versions against the rehearsed ones (scripts/gpu_check_versions.env),
# then the details for the summary (one Python start: they cost every run seconds).
MACHINE=$(set -a; . scripts/gpu_check_versions.env; set +a; $PY - <<'PYEOF' 2>&1
import os, subprocess, sys
from importlib import metadata
found = {"python": "%d.%d.%d" % sys.version_info[:3]}
for name in ("torch", "torchvision", "triton"):
    try:
        found[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        found[name] = "not installed"
want = {"python": os.environ["DEVICE_PYTHON"], "torch": os.environ["DEVICE_TORCH"],
        "torchvision": os.environ["DEVICE_TORCHVISION"], "triton": os.environ["DEVICE_TRITON"]}
diff = [f"{k} {found[k]} (rehearsed {want[k]})" for k in want
        if (".".join(found[k].split(".")[:2]) if k == "python" else found[k].split("+")[0]) != want[k]]
if diff:
    print(f"VERSIONS DIFFER FROM THE REHEARSAL (scripts/gpu_check_versions.env): {'; '.join(diff)}")
else:
    print(f"versions as rehearsed (scripts/gpu_check_versions.env): {', '.join(f'{k} {v}' for k, v in found.items())}")
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
ptxas = triton.knobs.nvidia.ptxas.path  # its `--version` is part of every Triton cache key
release = [v for v in subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout.splitlines()
           if "release" in v]
print("triton's ptxas", ptxas, release)
from triton._C.libtriton import get_cache_invalidating_env_vars  # these enter the cache key too
print("triton cache-invalidating env vars set:", get_cache_invalidating_env_vars() or "none")
PYEOF
)
VERSIONS=$(head -n 1 <<<"$MACHINE")
echo "$VERSIONS"
failed=0
{
  echo
  echo "## GPU check $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), stages: ${STAGES[*]}${CALL:+ (call $CALL)}"
  echo
  echo "$VERSIONS"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader 2>&1
  tail -n +2 <<<"$MACHINE"
  nvcc --version 2>&1 | tail -n 1
  [ -f "$CARRY/rehearsal.txt" ] && sed 's/^/carry: /' "$CARRY/rehearsal.txt"
  echo "Triton cache $TRITON_CACHE_DIR: $(find "$TRITON_CACHE_DIR" -name "*.cubin" | wc -l) kernels at the start"
  echo "seed $SEED, deadline ${DEADLINE}s, MAX_JOBS $MAX_JOBS"
  [ "$DRY" = 1 ] && echo "DRY RUN: every stage's command resolved (scripts/gpu_check_resolve.py), not run"
  echo '```'
  echo
  echo "| stage | exit | seconds | limit | Triton kernels compiled |"
  echo "|---|---|---|---|---|"
} >> "$SUMMARY"

publish() {  # copy the results into OUTDIR (at most 8 files, all named STEM_*)
  cp "$SUMMARY" "$OUT/${STEM}_summary.md"
  local jsons=()
  for name in "$STEM.json" "${STEM}_compile.json" "${STEM}_model.json" "${STEM}_cli.json"; do
    [ -s "$RES/$name" ] && jsons+=("$RES/$name")
  done
  # The training, fine-tuning and tuned JSON travel in the logs archive (OUTDIR holds 8 files at most).
  for name in train.json finetune.json; do
    [ -s "$LOGS/$name" ] && jsons+=("$LOGS/$name")
  done
  if [ ${#jsons[@]} -gt 0 ]; then
    $PY -m resnext_kernels.bench_report "${jsons[@]}" > "$RES/$STEM.md" 2> "$LOGS/bench_report.log" || true
  fi
  if [ -s "$LOGS/tuned.json" ]; then
    $PY -m resnext_kernels.bench_report "$LOGS/tuned.json" > "$LOGS/tuned.md" 2>> "$LOGS/bench_report.log" || true
  fi
  for name in "$STEM.json" "${STEM}_compile.json" "${STEM}_model.json" "${STEM}_cli.json" "${STEM}_plans.json" \
              "$STEM.md"; do
    [ -s "$RES/$name" ] && cp "$RES/$name" "$OUT/$name"
  done
  tar -czf "$OUT/${STEM}_logs.tar.gz" -C "$WORK" logs 2>/dev/null
}

# Compiled kernels in the cache (one .cubin each; the launcher stubs Triton builds with gcc are .so files).
kernels_cached() { find "$TRITON_CACHE_DIR" -name "*.cubin" | wc -l; }

run_stage() {  # name command... (limit and stop signal from STAGE_TABLE)
  local name="$1" left rc start limit signal before
  shift
  read -r limit signal < <(stage_row "$name" "$STAGE_CALL")
  left=$(( DEADLINE - RESERVE - ($(date +%s) - START) ))
  local least=20  # a stage gets its own limit, or at least this much of it, or is skipped
  if [ "$limit" = rest ]; then
    limit=$left
  else
    (( limit < least )) && least=$limit
    (( left < limit )) && limit=$left
  fi
  echo "== $name (limit ${limit}s)"
  if (( limit < least )); then
    echo "| $name | skipped: no time left | 0 | $limit | - |" >> "$SUMMARY"
    failed=1
    return 0
  fi
  if [ "$DRY" = 1 ]; then  # resolve, don't run
    set -- "$PY" scripts/gpu_check_resolve.py -- "$@"
  fi
  start=$(date +%s)
  before=$(kernels_cached)
  timeout --signal="$signal" --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  local note=$rc
  (( rc == 124 || rc == 137 )) && note="$rc (time limit)"
  echo "| $name | $note | $(( $(date +%s) - start )) | $limit | $(( $(kernels_cached) - before )) |" >> "$SUMMARY"
  tail -n 4 "$LOGS/$name.log"
  (( rc != 0 )) && failed=1
  publish
  return 0
}

note_stage() {  # name text: a row for a stage that had nothing to run
  echo "| $1 | $2 | 0 | - | - |" >> "$SUMMARY"
  echo "== $1: $2"
}

have_module() { $PY -c "import $1" 2>/dev/null; }

test_summary() {  # log: outcome lines and the slowest tests into the summary
  grep -hE "^(FAILED|ERROR)|[0-9]+ (passed|failed|skipped)" "$1" | tail -n 30 | sed 's/^/    /' >> "$SUMMARY"
  grep -hE "^[0-9.]+s (call|setup|teardown) " "$1" | head -n 40 | sed 's/^/    /' >> "$SUMMARY"
}

PYTEST=("$PY" -m pytest -q -rs -p no:cacheprovider)
BENCH=("${PYTEST[@]}" --benchmark-only --bench-device cuda --bench-seed "$SEED")
HEADLINE=(--bench-shapes s1,s2,s3,s4 --bench-dtypes bfloat16)
XDIST=()
have_module xdist && XDIST=(-n "$(( $(nproc) < 12 ? $(nproc) : 12 ))" --dist loadgroup)
have_module pytest_timeout && XDIST+=(--timeout 120)

for i in "${!STAGES[@]}"; do
  stage=${STAGES[$i]}
  STAGE_CALL=${STAGE_CALLS[$i]}
  case "$stage" in
    build)
      run_stage build bash scripts/gpu_check_build.sh ;;
    info)
      run_stage info "$PY" -m resnext_kernels info ;;
    gpu_tests)
      run_stage gpu_tests env RESNEXT_KERNELS_AUTOTUNE=0 "${PYTEST[@]}" tests/ -m cuda \
        --deselect tests/test_gpu_sweep.py --durations=40 --junitxml="$LOGS/gpu_tests_junit.xml" "${XDIST[@]}"
      test_summary "$LOGS/gpu_tests.log"
      publish ;;
    sweep)
      run_stage sweep env RESNEXT_KERNELS_AUTOTUNE=0 "${PYTEST[@]}" tests/test_gpu_sweep.py --durations=20 \
        --junitxml="$LOGS/sweep_junit.xml" "${XDIST[@]}"
      test_summary "$LOGS/sweep.log"
      publish ;;
    sanitizer)
      # No caching allocator: each tensor its own cudaMalloc, so memcheck sees every tensor's bounds.
      run_stage sanitizer env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "${COMPUTE_SANITIZER:-compute-sanitizer}" \
        --tool memcheck --error-exitcode 99 "$PY" scripts/gpu_sanitizer_cases.py ;;
    headline)
      run_stage headline env RESNEXT_KERNELS_AUTOTUNE=0 "${BENCH[@]}" benchmarks/test_block_bench.py "${HEADLINE[@]}" \
        --bench-compile none -k "cuda or triton or eager_cl" --benchmark-json "$RES/$STEM.json" ;;
    train)
      run_stage train "${BENCH[@]}" benchmarks/test_training_bench.py --bench-shapes s1,s2,s3 \
        -k "test_training_block and (eager_amp or triton)" --benchmark-json "$LOGS/train.json" ;;
    finetune)
      if [ -f "$FINETUNE_BENCH" ]; then
        run_stage finetune "${BENCH[@]}" "$FINETUNE_BENCH" --bench-shapes s1,s2,s3 --bench-batch 32 \
          --benchmark-json "$LOGS/finetune.json"
      else
        note_stage finetune "missing: $FINETUNE_BENCH"
      fi ;;
    compile)
      run_stage compile "${BENCH[@]}" benchmarks/test_block_bench.py "${HEADLINE[@]}" -k compile \
        --bench-compile bfloat16 --benchmark-json "$RES/${STEM}_compile.json" ;;
    tuned)
      run_stage tuned env RESNEXT_KERNELS_AUTOTUNE=1 "${BENCH[@]}" benchmarks/test_block_bench.py "${HEADLINE[@]}" \
        --bench-compile none -k "cuda or triton" --benchmark-json "$LOGS/tuned.json" ;;
    plans)
      run_stage plans "$PY" -m resnext_kernels.cuda_plans --json "$RES/${STEM}_plans.json"
      sed 's/^/    /' "$LOGS/plans.log" | tail -n 80 >> "$SUMMARY"
      publish ;;
    ncu)
      # One forward per case (scripts/ncu_blocks.py), clocks left alone.
      run_stage ncu env RESNEXT_KERNELS_AUTOTUNE=0 ncu --clock-control none --profile-from-start off \
        --target-processes all --section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section ComputeWorkloadAnalysis --section Occupancy --section LaunchStats --section WarpStateStats \
        -f -o "$LOGS/ncu_blocks" "$PY" scripts/ncu_blocks.py --shapes s1,s4 --impls cuda,triton ;;
    model)
      run_stage model env RESNEXT_KERNELS_AUTOTUNE=0 "${BENCH[@]}" benchmarks/test_model_bench.py \
        -k "b128 and not compile and not reference" --bench-compile none --benchmark-json "$RES/${STEM}_model.json" ;;
    cli)
      plot=()
      have_module matplotlib && plot=(--plot "$LOGS/${STEM}_cli.png")
      run_stage cli "$PY" -m resnext_kernels bench --quick --device cuda --shapes s1 --dtypes bfloat16 \
        --seed "$SEED" --json "$RES/${STEM}_cli.json" "${plot[@]}" ;;
    bench)
      run_stage bench "${BENCH[@]}" benchmarks/test_block_bench.py -k "not compile" --bench-compile none \
        --benchmark-json "$LOGS/bench.json" ;;
    cuda_sanitizer)
      run_stage cuda_sanitizer bash scripts/gpu_check_cuda.sh "$LOGS" ;;
    tune)
      rm -rf "$WORK/tuning"
      run_stage tune env RESNEXT_KERNELS_CACHE_DIR="$WORK/tuning" bash scripts/gpu_check_tune.sh "$PY" ;;
  esac
done

if [ "$DRY" != 1 ] && [ -s "$LOGS/ncu_blocks.ncu-rep" ]; then
  ncu -i "$LOGS/ncu_blocks.ncu-rep" --page details > "$LOGS/ncu_blocks.txt" 2>&1
fi
echo >> "$SUMMARY"
echo "total $(( $(date +%s) - START )) s, exit $failed" >> "$SUMMARY"
publish
cat "$OUT/${STEM}_summary.md"
ls -l "$OUT"
exit "$failed"
