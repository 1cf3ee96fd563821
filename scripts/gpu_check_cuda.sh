#!/usr/bin/env bash
# GPU check of the fused CUDA kernel under compute-sanitizer.
#
# usage: scripts/gpu_check_cuda.sh OUTDIR
#
# Runs the kernel (all four math modes: fp16, bf16, fp32 on TF32, fp32 FMA)
# at small shapes that cover identity/projection shortcuts, stride 2,
# dilation 2, odd sizes, channel counts off multiples of 16, d in {1, 8, 24,
# 64}, other tile plans at tighter shared-memory limits, and NCHW input
# (y written through NCHW strides), under the memcheck, racecheck and
# synccheck tools. Logs go to OUTDIR/sanitizer_<tool>.log. Exits non-zero
# on any sanitizer report or failed check. Needs resnext_kernels built with
# CUDA (pip install --no-build-isolation --no-deps -e .).
set -euo pipefail
OUT=${1:?usage: scripts/gpu_check_cuda.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
SAN=${COMPUTE_SANITIZER:-compute-sanitizer}
# Without PyTorch's caching allocator every tensor is its own cudaMalloc, so
# memcheck sees each tensor's bounds (not just those of a pooled segment).
export PYTORCH_NO_CUDA_MEMORY_CACHING=1

CASES=$(cat <<'PYEOF'
import torch
from resnext_kernels.backends.reference import bottleneck_inference_reference as ref

def block(n, cin, width, cout, groups, h, w, stride, dil, proj, dtype):
    d = width // groups
    t = lambda *s, sc=1.0: (torch.randn(*s, dtype=torch.float64) * sc).to("cuda", dtype)
    args = [t(n, cin, h, w).contiguous(memory_format=torch.channels_last),
            t(width, cin, 1, 1, sc=cin ** -0.5), t(width, sc=0.3), t(width, d, 3, 3, sc=(9 * d) ** -0.5),
            t(width, sc=0.3), t(cout, width, 1, 1, sc=width ** -0.5), t(cout, sc=0.3)]
    args += [t(cout, cin, 1, 1, sc=cin ** -0.5), t(cout)] if proj else [None, None]
    return args

shapes = [(1, 20, 24, 40, 3, 7, 11, 2, 1, True), (1, 16, 64, 16, 1, 9, 9, 1, 2, True),
          (2, 32, 32, 32, 8, 9, 9, 1, 1, False), (1, 8, 16, 24, 16, 7, 9, 2, 2, True),
          (1, 48, 48, 48, 2, 5, 19, 1, 1, False)]
modes = [(torch.float16, True), (torch.bfloat16, True), (torch.float32, True), (torch.float32, False)]
for shape in shapes:
    for dtype, tf32 in modes:
        # 0: the device's limit; the others force width chunks / Cout slices
        # where a plan fits in them at all.
        for limit in (0, 64000, 40000):
            a = block(*shape, dtype)
            if limit == 40000:  # y written through NCHW strides (x NCHW-contiguous)
                a[0] = a[0].contiguous()
            p = torch.ops.resnext_kernels.fused_block_pack_weights(*a[1:], shape[4])
            try:
                y = torch.ops.resnext_kernels.fused_block_forward(
                    a[0], *p[:6], p[6] if shape[9] else None, shape[2], shape[3], shape[7], shape[8], shape[4],
                    tf32, limit)
            except RuntimeError as exc:
                if limit and "no tile plan fits" in str(exc):
                    continue
                raise
            # Reference and error on the CPU: only the kernel under test (and
            # the small ATen ops that pack its weights) run on the GPU.
            r = ref(*[v if v is None else v.double().cpu() for v in a], shape[7], shape[8], shape[4])
            err = ((y.double().cpu() - r).abs().max() / r.abs().max()).item()
            assert err < 5e-2, (shape, dtype, tf32, limit, err)
torch.cuda.synchronize()
print("sanitizer cases ok")
PYEOF
)

# racecheck and synccheck instrument only the fused kernel where this
# compute-sanitizer can filter by kernel name (the ATen kernels that pack the
# weights and compare results are not under test, and instrumenting them is
# slow); memcheck checks every kernel.
FILTER=()
"$SAN" --help 2>/dev/null | grep -q -- "--kernel-name " && FILTER=(--kernel-name kns=fused_block_kernel)

status=0
for tool in memcheck racecheck synccheck; do
  extra=()
  [ "$tool" != memcheck ] && extra=("${FILTER[@]}")
  [ "$tool" = racecheck ] && extra+=(--racecheck-report hazard)
  echo "== compute-sanitizer --tool $tool" | tee "$OUT/sanitizer_$tool.log"
  if ! "$SAN" --tool "$tool" "${extra[@]}" --error-exitcode 99 \
      "$PY" -c "$CASES" >>"$OUT/sanitizer_$tool.log" 2>&1; then
    echo "FAILED: $tool (see $OUT/sanitizer_$tool.log)"
    status=1
  fi
  tail -n 3 "$OUT/sanitizer_$tool.log"
done
exit $status
