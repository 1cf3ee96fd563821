// CPU implementations of the fused block ops for the emulation library:
// resnext_kernels_emu::fused_block_pack_weights and fused_block_forward,
// whose schemas are csrc/fused_block_ops.cpp compiled into this library with
// RK_OPS_NAMESPACE=resnext_kernels_emu (CPU tensors; the same packing and
// kernel source as the CUDA ops of _C, the kernel run by
// csrc/emulation/cuda_emu.h). Built on first use by
// resnext_kernels/backends/cuda/emulation.py; not part of resnext_kernels._C.
// Also the emulation-only helper ops last_launch_plan and last_launch_mma_macs.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstring>
#include <stdexcept>

#include "fused_block_host.h"

namespace {

// The plan of the last emulated launch, [TW, Mo, WC, CS, nbuf, smem bytes,
// grid.x, grid.y], so tests can see which plan a plan_rank ran, and the
// multiply-accumulates its MMAs executed (counted by the emulator).
std::vector<int64_t> last_plan;
int64_t last_macs = -1;

constexpr const char kOp[] = "resnext_kernels_emu::fused_block_forward";

template <class P>
void run(const rk::FusedBlockParams& p, dim3 grid, size_t smem) {
  rk_emu::launch(grid, dim3(rk::kThreads), smem, [&p]() { rk::fused_block_kernel<P>(p); });
}

std::vector<at::Tensor> fused_block_pack_weights(const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                                                 const at::Tensor& b2, const at::Tensor& w3, const at::Tensor& b3,
                                                 const std::optional<at::Tensor>& wd,
                                                 const std::optional<at::Tensor>& bd, int64_t groups) {
  TORCH_CHECK(w1.device().is_cpu(), "resnext_kernels_emu::fused_block_pack_weights: needs CPU tensors, got ",
              w1.device());
  return rk::pack_weights(w1, b1, w2, b2, w3, b3, wd, bd, groups, "resnext_kernels_emu::fused_block_pack_weights");
}

at::Tensor fused_block_forward(const at::Tensor& x, const at::Tensor& w1p, const at::Tensor& b1p,
                               const at::Tensor& w2p, const at::Tensor& b2p, const at::Tensor& w3p,
                               const at::Tensor& b3p, const std::optional<at::Tensor>& wdp, int64_t width,
                               int64_t cout, int64_t stride, int64_t dilation, int64_t groups, bool allow_tf32,
                               int64_t smem_limit, int64_t plan_rank) {
  TORCH_CHECK(x.device().is_cpu(), kOp, ": needs CPU tensors, got ", x.device());
  // No device to ask for its opt-in maximum: the caller names the budget
  // (Python passes H100's, settings.H100_SMEM_OPTIN).
  TORCH_CHECK(smem_limit > 0, kOp, ": smem_limit must be > 0 in the emulation (there is no device), got ",
              smem_limit);
  return rk::fused_block_forward(
      x, w1p, b1p, w2p, b2p, w3p, b3p, wdp, width, cout, stride, dilation, groups, allow_tf32,
      static_cast<size_t>(smem_limit), plan_rank, kOp,
      [](rk::Math math, const rk::FusedBlockParams& p, dim3 grid, size_t smem) {
        last_plan = {p.TW, p.Mo, p.WC, p.CS, p.nbuf, static_cast<int64_t>(smem), grid.x, grid.y};
        last_macs = -1;
        // Poison the output (NaN in every dtype) so unwritten elements fail.
        const int elem = math == rk::Math::kHalf || math == rk::Math::kBf16 ? 2 : 4;
        std::memset(p.y, 0xFF, static_cast<size_t>(p.N) * p.Ho * p.Wo * p.Cout * elem);
        try {
          switch (math) {
            case rk::Math::kHalf:
              run<rk::Mma16Policy<rk::half_t>>(p, grid, smem);
              break;
            case rk::Math::kBf16:
              run<rk::Mma16Policy<rk::bf16_t>>(p, grid, smem);
              break;
            case rk::Math::kTf32:
              run<rk::Tf32Policy>(p, grid, smem);
              break;
            case rk::Math::kFp32:
              run<rk::Fp32FmaPolicy>(p, grid, smem);
              break;
          }
        } catch (const std::runtime_error& e) {
          TORCH_CHECK(false, kOp, ": ", e.what());
        }
        last_macs = static_cast<int64_t>(rk_emu::mma_macs());
      });
}

std::vector<int64_t> last_launch_plan() {
  TORCH_CHECK(!last_plan.empty(), "last_launch_plan: no emulated fused block has run yet");
  return last_plan;
}

int64_t last_launch_mma_macs() {
  TORCH_CHECK(last_macs >= 0, "last_launch_mma_macs: no emulated fused block has completed yet");
  return last_macs;
}

}  // namespace

TORCH_LIBRARY_IMPL(resnext_kernels_emu, CPU, m) {
  m.impl("fused_block_pack_weights", &fused_block_pack_weights);
  m.impl("fused_block_forward", &fused_block_forward);
}

TORCH_LIBRARY_FRAGMENT(resnext_kernels_emu, m) {
  m.def("last_launch_plan() -> int[]", &last_launch_plan);
  m.def("last_launch_mma_macs() -> int", &last_launch_mma_macs);
}
