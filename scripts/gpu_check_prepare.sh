#!/usr/bin/env bash
# CPU rehearsal of the GPU check (scripts/gpu_check.sh), and the folder its
# device calls carry.
#
#   scripts/gpu_check_prepare.sh [--no-suite]
#
# 1. A venv with the GPU machine's versions (scripts/gpu_check_versions.env:
#    Python 3.12, torch 2.11.0 (PyPI's is the CUDA 13.0 build), torchvision
#    0.26.0, triton 3.6.0), numpy < 2.4 (the Triton interpreter's tl.dot needs
#    it) and the test dependencies of pyproject.toml, at GPU_CHECK_VENV
#    (default ~/.cache/resnext_kernels/gpu_check_venv, outside the repository;
#    ~5 GB, made once, reused). Base interpreter: GPU_CHECK_BASE_PYTHON, else
#    python3.12 on PATH, else pyenv's newest 3.12.
# 2. _C built in place against that torch for sm_90 (H100/H200) with ptxas -v,
#    copied into the carry folder with the digest of its sources
#    (scripts/gpu_check_build.sh --digest) and its build log; skipped when the
#    carried one already matches the sources.
# 3. Triton's kernel cache warmed for sm_90 through Triton's runtime
#    (python -m resnext_kernels.bench.triton_compile --warm-cache): every config
#    the autotuner keeps for the inference kernels of s1-s4 in bf16 (the
#    headline, tuned, ncu and model stages) and one training step of s1-s3
#    (the train stage); kept as .cubin + .json only. The seconds each kernel
#    took to compile here go to triton_warm.txt.
# 4. Unless --no-suite: the CPU test suite in the venv (~10 min on 2 busy cores).
# 5. A dry run of both device calls in the venv (GPU_CHECK_DRY_RUN=1): every
#    stage's command must resolve (imports, test ids, CLI flags, file names).
# 6. The carry folder's size, and the whole upload's, against the device
#    tool's 64 MiB.
#
# The carry folder: GPU_CHECK_CARRY (default .gpu_check_carry/ in the
# repository, git-ignored). The device calls name it in `carry`
# (docs/benchmarks.md "The GPU check"). Exit status: non-zero when a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
RUN_SUITE=1
[ "${1:-}" = --no-suite ] && RUN_SUITE=0
set -a
. scripts/gpu_check_versions.env
set +a
VENV=${GPU_CHECK_VENV:-$HOME/.cache/resnext_kernels/gpu_check_venv}
CARRY=${GPU_CHECK_CARRY:-$REPO/.gpu_check_carry}
VPY="$VENV/bin/python"
CARRY_LIMIT=$(( 64 * 1024 * 1024 ))
status=0
say() { echo "== $*"; }

# 1. the venv
if [ ! -x "$VPY" ]; then
  base=${GPU_CHECK_BASE_PYTHON:-$(command -v "python$DEVICE_PYTHON" || ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$DEVICE_PYTHON".*/bin/python 2>/dev/null | sort -V | tail -n 1)}
  [ -x "$base" ] || { echo "no Python $DEVICE_PYTHON found (set GPU_CHECK_BASE_PYTHON)"; exit 1; }
  say "creating $VENV from $base"
  "$base" -m venv "$VENV" || exit 1
fi
# The test extra's own torchvision pin is CI's; the device's replaces it.
mapfile -t TEST_DEPS < <("$VPY" -c '
import tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["test"]
print("\n".join(d for d in deps if not d.startswith("torchvision")))')
say "installing torch==$DEVICE_TORCH torchvision==$DEVICE_TORCHVISION triton==$DEVICE_TRITON into $VENV"
"$VPY" -m pip install -q "torch==$DEVICE_TORCH" "torchvision==$DEVICE_TORCHVISION" "triton==$DEVICE_TRITON" \
  "numpy<2.4" ninja "setuptools>=64" wheel "${TEST_DEPS[@]}" 2>&1 | grep -v "^WARNING: Location" || true
"$VPY" -c "import torch, torchvision, triton, numpy, sys; print('venv: python', sys.version.split()[0], 'torch', torch.__version__, 'torchvision', torchvision.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)" \
  || { echo "the venv does not import torch/torchvision/triton"; exit 1; }
VERSIONS=$("$VPY" -c "import torch, torchvision, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'torchvision', torchvision.__version__, 'triton', triton.__version__)")

# 2. the prebuilt _C
mkdir -p "$CARRY"
DIGEST=$(bash scripts/gpu_check_build.sh --digest)
SO_NAME=$("$VPY" -c "import sysconfig; print('_C' + sysconfig.get_config_var('EXT_SUFFIX'))")
if [ -f "$CARRY/$SO_NAME" ] && [ "$(cat "$CARRY/_C.digest" 2>/dev/null)" = "$DIGEST" ]; then
  say "carried $SO_NAME matches these sources ($DIGEST): not rebuilt"
  cp "$CARRY/$SO_NAME" resnext_kernels/
else
  say "building _C for sm_90 against torch $DEVICE_TORCH (log: $CARRY/build.log)"
  start=$(date +%s)
  rm -f "$CARRY/$SO_NAME" "$CARRY/_C.digest"
  if TORCH_CUDA_ARCH_LIST=9.0 RESNEXT_KERNELS_PTXAS_VERBOSE=1 MAX_JOBS=${MAX_JOBS:-2} \
      "$VPY" setup.py build_ext --inplace > "$CARRY/build.log" 2>&1; then
    cp "resnext_kernels/$SO_NAME" "$CARRY/" && echo "$DIGEST" > "$CARRY/_C.digest"
    say "built in $(( $(date +%s) - start )) s"
  else
    tail -n 20 "$CARRY/build.log"
    echo "FAILED: the _C build (the device will build it itself)"
    status=1
  fi
fi
"$VPY" -c "from resnext_kernels.common import extension as e; ext = e.extension(); print('_C:', e.extension_error() or f'loads, torch {ext.torch_version()}, CUDA kernels {ext.built_with_cuda()}')"

# 3. the Triton cache
say "warming Triton's kernel cache for sm_90 (log: $CARRY/triton_warm.txt)"
rm -rf "$CARRY/triton_cache"
start=$(date +%s)
if TRITON_CACHE_DIR="$CARRY/triton_cache" TRITON_INTERPRET=0 OMP_NUM_THREADS=1 "$VPY" -m resnext_kernels.bench.triton_compile \
    --warm-cache s1 s2 s3 s4 --training-shapes s1 s2 s3 > "$CARRY/triton_warm.txt" 2>&1; then
  find "$CARRY/triton_cache" -type f ! -name "*.cubin" ! -name "*.json" -delete
  tail -n 1 "$CARRY/triton_warm.txt"
  say "warmed in $(( $(date +%s) - start )) s"
  # Reused after a move, as on the GPU machine: a copy elsewhere, relocated, compiles nothing.
  moved=$(mktemp -d)/triton_cache
  cp -r "$CARRY/triton_cache" "$moved"
  "$VPY" -m resnext_kernels.bench.triton_compile --relocate-cache "$moved" > /dev/null
  before=$(find "$moved" -name "*.cubin" | wc -l)
  TRITON_CACHE_DIR="$moved" TRITON_INTERPRET=0 "$VPY" -m resnext_kernels.bench.triton_compile \
    --warm-cache s1 s2 s3 s4 --training-shapes s1 s2 s3 > /dev/null 2>&1
  after=$(find "$moved" -name "*.cubin" | wc -l)
  if [ "$before" = "$after" ]; then
    echo "the cache, moved and relocated, is reused: $before kernels, none compiled again"
  else
    echo "FAILED: the moved cache compiled $(( after - before )) of its kernels again"
    status=1
  fi
  rm -rf "$(dirname "$moved")"
else
  tail -n 20 "$CARRY/triton_warm.txt"
  echo "FAILED: warming the Triton cache (the device compiles everything itself)"
  rm -rf "$CARRY/triton_cache"
  status=1
fi
{
  echo "rehearsed $(date -u +%Y-%m-%dT%H:%MZ) at commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!.gpu_check_carry' || echo '+changes')"
  echo "venv: $VERSIONS"
  echo "_C sources digest $DIGEST"
} > "$CARRY/rehearsal.txt"

# 4. the CPU suite in the device-version venv
if [ "$RUN_SUITE" = 1 ]; then
  say "CPU test suite in the venv (log: $CARRY/suite.log)"
  start=$(date +%s)
  OMP_NUM_THREADS=1 "$VPY" -m pytest tests/ -q -rs -p no:cacheprovider > "$CARRY/suite.log" 2>&1 || status=1
  tail -n 1 "$CARRY/suite.log"
  say "suite: $(( $(date +%s) - start )) s"
  echo "suite: $(tail -n 1 "$CARRY/suite.log")" >> "$CARRY/rehearsal.txt"
fi

# 5. the dry run of both calls
dry=$(mktemp -d)
for set in first second; do
  say "dry run: scripts/gpu_check.sh OUT $set"
  if GPU_CHECK_DRY_RUN=1 PYTHON="$VPY" GPU_CHECK_WORK="$dry/work" GPU_CHECK_CARRY="$CARRY" \
      bash scripts/gpu_check.sh "$dry/out_$set" "$set" > "$dry/$set.txt" 2>&1; then
    echo "dry run $set: every stage resolves"
  else
    echo "FAILED: dry run $set; unresolved stages:"
    grep -hE "^unresolved|^\| " "$dry/$set.txt" | grep -vE "\| 0 \||stage \||---" | sed 's/^/  /'
    grep -h "^unresolved" "$dry"/work/logs/*.log 2>/dev/null | sed 's/^/  /'
    status=1
  fi
done
grep -h "^VERSIONS\|^versions" "$dry/first.txt" | head -n 1
rm -rf "$dry"

# 6. sizes
carry_bytes=$(du -sb "$CARRY" | cut -f1)
tree_bytes=$(git ls-files -z -co --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
say "carry $CARRY: $(( carry_bytes / 1024 )) KiB; with the working tree ($(( tree_bytes / 1024 )) KiB)" \
    "$(( (carry_bytes + tree_bytes) / 1024 )) KiB of the device tool's $(( CARRY_LIMIT / 1024 )) KiB"
if (( carry_bytes + tree_bytes > CARRY_LIMIT )); then
  echo "FAILED: the upload is over the device tool's 64 MiB"
  status=1
fi
du -sh "$CARRY"/* | sed 's/^/  /'
exit $status
