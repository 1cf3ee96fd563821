// CPU emulation build of the fused block kernel: ops
// resnext_kernels::fused_block_pack_cuda_emulated and
// fused_block_packed_cuda_emulated (CPU tensors; the same packing and kernel
// source as the CUDA ops of fused_block_ops.cpp, the kernel run by
// csrc/emulation/cuda_emu.h). Built on first use
// by resnext_kernels/cuda_backend.py (torch.utils.cpp_extension.load); not
// part of resnext_kernels._C.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstring>
#include <stdexcept>

#include "fused_block_host.h"

namespace {

// H100's cudaDevAttrMaxSharedMemoryPerBlockOptin: the emulated op plans for
// it unless a smaller limit is passed (tests use that to force splits).
constexpr size_t kDefaultSmemLimit = 232448;

// The plan of the last emulated launch, [TH, WC, CS, nbuf, smem bytes,
// grid.x, grid.y], so tests can see which plan a plan_rank ran.
std::vector<int64_t> last_plan;

template <class P>
void run(const rk::FusedBlockParams& p, dim3 grid, size_t smem) {
  rk_emu::launch(grid, dim3(rk::kThreads), smem, [&p]() { rk::fused_block_kernel<P>(p); });
}

std::vector<at::Tensor> fused_block_pack_cuda_emulated(const at::Tensor& w1, const at::Tensor& b1,
                                                       const at::Tensor& w2, const at::Tensor& b2,
                                                       const at::Tensor& w3, const at::Tensor& b3,
                                                       const std::optional<at::Tensor>& wd,
                                                       const std::optional<at::Tensor>& bd, int64_t groups) {
  TORCH_CHECK(w1.device().is_cpu(), "fused_block_pack_cuda_emulated: needs CPU tensors, got ", w1.device());
  return rk::pack_weights(w1, b1, w2, b2, w3, b3, wd, bd, groups, "fused_block_pack_cuda_emulated");
}

at::Tensor fused_block_packed_cuda_emulated(const at::Tensor& x, const at::Tensor& w1p, const at::Tensor& b1p,
                                            const at::Tensor& w2p, const at::Tensor& b2p, const at::Tensor& w3p,
                                            const at::Tensor& b3p, const std::optional<at::Tensor>& wdp,
                                            int64_t width, int64_t cout, int64_t stride, int64_t dilation,
                                            int64_t groups, bool allow_tf32, int64_t smem_limit,
                                            int64_t plan_rank) {
  TORCH_CHECK(x.device().is_cpu(), "fused_block_packed_cuda_emulated: needs CPU tensors, got ", x.device());
  const size_t limit = smem_limit > 0 ? static_cast<size_t>(smem_limit) : kDefaultSmemLimit;
  return rk::fused_block_forward(
      x, w1p, b1p, w2p, b2p, w3p, b3p, wdp, width, cout, stride, dilation, groups, allow_tf32, limit, plan_rank,
      "fused_block_packed_cuda_emulated",
      [](rk::Math math, const rk::FusedBlockParams& p, dim3 grid, size_t smem) {
        last_plan = {p.TH, p.WC, p.CS, p.nbuf, static_cast<int64_t>(smem), grid.x, grid.y};
        // Poison the output (NaN in every dtype) so unwritten elements fail.
        const int elem = math == rk::Math::kHalf || math == rk::Math::kBf16 ? 2 : 4;
        std::memset(p.y, 0xFF, static_cast<size_t>(p.N) * p.Ho * p.Wo * p.Cout * elem);
        try {
          switch (math) {
            case rk::Math::kHalf:
              run<rk::WmmaPolicy16<rk::half_t>>(p, grid, smem);
              break;
            case rk::Math::kBf16:
              run<rk::WmmaPolicy16<rk::bf16_t>>(p, grid, smem);
              break;
            case rk::Math::kTf32:
              run<rk::Tf32Policy>(p, grid, smem);
              break;
            case rk::Math::kFp32:
              run<rk::Fp32FmaPolicy>(p, grid, smem);
              break;
          }
        } catch (const std::runtime_error& e) {
          TORCH_CHECK(false, "fused_block_packed_cuda_emulated: ", e.what());
        }
      });
}

// The candidate plans of the emulated op, cheapest first (rk::plan_table's
// columns; the same planner as resnext_kernels::fused_block_plans in _C, but
// compiled with the kernel this library runs, and smem_limit 0 meaning the
// emulated op's default).
at::Tensor fused_block_plans(int64_t N, int64_t H, int64_t W, int64_t Cin, int64_t width, int64_t Cout,
                             int64_t groups, int64_t stride, int64_t dilation, int64_t elem_bytes,
                             int64_t smem_limit) {
  return rk::plan_table(N, H, W, Cin, width, Cout, groups, stride, dilation, elem_bytes,
                        smem_limit > 0 ? smem_limit : static_cast<int64_t>(kDefaultSmemLimit),
                        "resnext_kernels_emu::fused_block_plans");
}

std::vector<int64_t> last_launch_plan() {
  TORCH_CHECK(!last_plan.empty(), "last_launch_plan: no emulated fused block has run yet");
  return last_plan;
}

}  // namespace

// Same schemas as the CUDA ops (fused_block_ops.cpp).
TORCH_LIBRARY_FRAGMENT(resnext_kernels, m) {
  m.def(
      "fused_block_pack_cuda_emulated(Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor w3, Tensor b3, Tensor? wd, "
      "Tensor? bd, int groups) -> Tensor[]");
  m.def(
      "fused_block_packed_cuda_emulated(Tensor x, Tensor w1p, Tensor b1p, Tensor w2p, Tensor b2p, Tensor w3p, "
      "Tensor b3p, Tensor? wdp, int width, int cout, int stride, int dilation, int groups, bool allow_tf32, "
      "int smem_limit=0, int plan_rank=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(resnext_kernels, CPU, m) {
  m.impl("fused_block_pack_cuda_emulated", &fused_block_pack_cuda_emulated);
  m.impl("fused_block_packed_cuda_emulated", &fused_block_packed_cuda_emulated);
}

TORCH_LIBRARY(resnext_kernels_emu, m) {
  m.def(
      "fused_block_plans(int N, int H, int W, int Cin, int width, int Cout, int groups, int stride, int dilation, "
      "int elem_bytes, int smem_limit=0) -> Tensor",
      &fused_block_plans);
  m.def("last_launch_plan() -> int[]", &last_launch_plan);
}
