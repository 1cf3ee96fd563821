#!/usr/bin/env bash
# The GPU check's build stage (scripts/gpu_check.sh): resnext_kernels._C for
# this machine's Python and torch, in place.
#
#   scripts/gpu_check_build.sh            use the carried prebuilt _C, else build
#   scripts/gpu_check_build.sh --digest   print the digest of the extension's sources
#
# scripts/gpu_check_prepare.sh builds _C on the CPU machine against the
# device's torch (scripts/gpu_check_versions.env) for sm_90 and leaves it in
# the carry folder (GPU_CHECK_CARRY, default .gpu_check_carry/) with the
# digest of csrc/ and setup.py it was built from, and its build log (ptxas -v).
# Here that prebuilt is used when the digest matches these sources and it
# loads with this torch, with its CUDA kernels; otherwise (no carry, other
# sources, another torch ABI) the extension is built in place with ptxas -v,
# as before. Either way the log says which, and the check's info stage shows
# what loaded.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
CARRY=${GPU_CHECK_CARRY:-.gpu_check_carry}

digest() {  # sha256 over the names and contents of everything the build compiles
  find csrc setup.py -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16
}

if [ "${1:-}" = --digest ]; then
  digest
  exit 0
fi

so_name=$("$PY" -c "import sysconfig; print('_C' + sysconfig.get_config_var('EXT_SUFFIX'))") || exit 1
loads_with_cuda='
import sys, torch
from resnext_kernels.common import extension as e
ext = e.extension()
if ext is None:
    sys.exit(e.extension_error())
if not ext.built_with_cuda():
    sys.exit("_C was built without the CUDA kernels")
print(f"_C loads: built against torch {ext.torch_version()}, running torch {torch.__version__}, CUDA kernels: yes")'

if [ -f "$CARRY/$so_name" ]; then
  want=$(digest)
  have=$(cat "$CARRY/_C.digest" 2>/dev/null)
  if [ "$have" != "$want" ]; then
    echo "carried $so_name was built from other sources (digest $have, these are $want): building here"
  elif cp "$CARRY/$so_name" resnext_kernels/ && "$PY" -c "$loads_with_cuda"; then
    echo "using the prebuilt $CARRY/$so_name (sources digest $want): nothing compiled here"
    if [ -f "$CARRY/build.log" ]; then
      echo "--- its build log (ptxas -v), from the CPU machine:"
      grep -E "ptxas|registers|spill|smem|archs" "$CARRY/build.log" | tail -n 40
    fi
    exit 0
  else
    echo "the prebuilt $so_name does not load here: building here"
    rm -f "resnext_kernels/$so_name"
  fi
else
  echo "no prebuilt $CARRY/$so_name: building here"
fi
RESNEXT_KERNELS_PTXAS_VERBOSE=1 "$PY" setup.py build_ext --inplace || exit 1
"$PY" -c "$loads_with_cuda"
