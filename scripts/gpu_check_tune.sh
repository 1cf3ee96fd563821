#!/usr/bin/env bash
# The GPU check's opt-in `tune` stage: python -m resnext_kernels tune twice into
# the tuning store named by RESNEXT_KERNELS_CACHE_DIR (fresh: the caller empties
# it). The first run times every distinct block problem of resnext50_32x4d; the
# second must find them all in the store and report "0 timed".
#   scripts/gpu_check_tune.sh PYTHON
set -euo pipefail
PY=${1:?usage: gpu_check_tune.sh PYTHON}
tune=("$PY" -m resnext_kernels tune --model resnext50_32x4d --batch 32 --dtype bfloat16 --channels-last)
"${tune[@]}"
second=$("${tune[@]}" | tee /dev/stderr | tail -n 1)
case "$second" in
  *": 0 timed,"*) ;;
  *) echo "the second tune run timed something: $second" >&2; exit 1 ;;
esac
