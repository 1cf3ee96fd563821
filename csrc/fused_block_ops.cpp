// The schemas of the fused block kernel's inner ops, written once.
//
// This file is compiled twice, with a different namespace each time:
//   * into resnext_kernels._C (setup.py): ops resnext_kernels::*, whose CUDA
//     implementations csrc/fused_block_cuda.cu registers;
//   * into the CPU emulation library (backends/cuda/emulation.py, with
//     -DRK_OPS_NAMESPACE=resnext_kernels_emu): ops resnext_kernels_emu::*,
//     whose CPU implementations csrc/emulation/fused_block_emu.cpp registers
//     (the same kernel source run by the emulator).
// The two builds never disagree on a schema, and the emulation library
// loads whether or not _C does.
//
// fused_block_pack_weights: packs the folded weights once (layouts in
// FusedBlockParams): [w1p, b1p, w2p, b2p, w3p, b3p] plus wdp when wd is given
// (bd is folded into b3p). The packing depends on the weights and groups
// only, so Python caches it across calls (resnext_kernels/backends/cuda).
//
// fused_block_forward: runs the whole block (one kernel launch) on those
// tensors; y has x's memory format (channels_last, else NCHW-contiguous). width and cout are the real channel counts (the packed ones are
// padded). allow_tf32: fp32 inputs use TF32 tensor cores when true, fp32 FMA
// when false (Python passes torch.backends.cudnn.allow_tf32). smem_limit:
// bytes of shared memory the tile plan may use; 0 means the device's opt-in
// maximum (the emulation has no device and needs it > 0; a smaller value
// forces the width/Cout split, for tests). plan_rank: which of the plans
// that fit to run, in the planner's order (0: the cheapest estimate; the
// backend times the first few, see fused_block_plan.h).
//
// fused_block_plans: the planner's candidate list for a problem, without a
// GPU (a CPU float64 tensor, rows in plan_rank order; columns in
// rk::plan_table). projection: a projection shortcut (wd given);
// allow_tf32: for fp32, whether the kernel will run on TF32 tensor cores
// (the cost model's rate). No tensor arguments, so no dispatch key: a catch-all
// kernel, the same code in both builds.
#include <torch/library.h>

#include "fused_block_plan.h"

#ifndef RK_OPS_NAMESPACE
#define RK_OPS_NAMESPACE resnext_kernels
#endif

namespace {

at::Tensor fused_block_plans(int64_t N, int64_t H, int64_t W, int64_t Cin, int64_t width, int64_t Cout,
                             int64_t groups, int64_t stride, int64_t dilation, bool projection, int64_t elem_bytes,
                             bool allow_tf32, int64_t smem_limit) {
  return rk::plan_table(N, H, W, Cin, width, Cout, groups, stride, dilation, projection, elem_bytes, allow_tf32,
                        smem_limit, "fused_block_plans");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(RK_OPS_NAMESPACE, m) {
  m.def(
      "fused_block_pack_weights(Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor w3, Tensor b3, Tensor? wd, "
      "Tensor? bd, int groups) -> Tensor[]");
  m.def(
      "fused_block_forward(Tensor x, Tensor w1p, Tensor b1p, Tensor w2p, Tensor b2p, Tensor w3p, Tensor b3p, "
      "Tensor? wdp, int width, int cout, int stride, int dilation, int groups, bool allow_tf32, "
      "int smem_limit=0, int plan_rank=0) -> Tensor");
  m.def(
      "fused_block_plans(int N, int H, int W, int Cin, int width, int Cout, int groups, int stride, int dilation, "
      "bool projection, int elem_bytes, bool allow_tf32, int smem_limit) -> Tensor",
      &fused_block_plans);
}
