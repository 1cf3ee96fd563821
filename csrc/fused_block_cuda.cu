// CUDA implementations of resnext_kernels::fused_block_pack_weights and
// fused_block_forward (schemas in fused_block_ops.cpp): the packing runs
// as ATen ops on the weights' device; the block op instantiates the kernel of
// fused_block_kernel.cuh for fp16, bf16, fp32-on-TF32 and fp32-FMA and
// launches it on the current stream of x's device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "fused_block_host.h"

namespace {

template <class P>
void launch(const rk::FusedBlockParams& p, dim3 grid, size_t smem, cudaStream_t stream) {
  auto kernel = rk::fused_block_kernel<P>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  kernel<<<grid, rk::kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::vector<at::Tensor> fused_block_pack_weights(const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                                              const at::Tensor& b2, const at::Tensor& w3, const at::Tensor& b3,
                                              const std::optional<at::Tensor>& wd,
                                              const std::optional<at::Tensor>& bd, int64_t groups) {
  TORCH_CHECK(w1.is_cuda(), "fused_block_pack_weights: needs CUDA tensors, got ", w1.device());
  const c10::cuda::CUDAGuard guard(w1.device());
  return rk::pack_weights(w1, b1, w2, b2, w3, b3, wd, bd, groups, "fused_block_pack_weights");
}

at::Tensor fused_block_forward(const at::Tensor& x, const at::Tensor& w1p, const at::Tensor& b1p,
                                   const at::Tensor& w2p, const at::Tensor& b2p, const at::Tensor& w3p,
                                   const at::Tensor& b3p, const std::optional<at::Tensor>& wdp, int64_t width,
                                   int64_t cout, int64_t stride, int64_t dilation, int64_t groups, bool allow_tf32,
                                   int64_t smem_limit, int64_t plan_rank) {
  TORCH_CHECK(x.is_cuda(), "fused_block_forward: needs CUDA tensors, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, x.device().index()));
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.device().index()));
  TORCH_CHECK(major >= 8, "fused_block_forward: needs compute capability >= 8.0 (bf16/tf32 tensor cores), got ", major,
              ".x");
  const size_t limit = smem_limit > 0 ? std::min<size_t>(smem_limit, optin) : static_cast<size_t>(optin);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  return rk::fused_block_forward(x, w1p, b1p, w2p, b2p, w3p, b3p, wdp, width, cout, stride, dilation, groups,
                                 allow_tf32, limit, plan_rank, "fused_block_forward",
                                 [stream](rk::Math math, const rk::FusedBlockParams& p, dim3 grid, size_t smem) {
                                   switch (math) {
                                     case rk::Math::kHalf:
                                       launch<rk::Mma16Policy<rk::half_t>>(p, grid, smem, stream);
                                       break;
                                     case rk::Math::kBf16:
                                       launch<rk::Mma16Policy<rk::bf16_t>>(p, grid, smem, stream);
                                       break;
                                     case rk::Math::kTf32:
                                       launch<rk::Tf32Policy>(p, grid, smem, stream);
                                       break;
                                     case rk::Math::kFp32:
                                       launch<rk::Fp32FmaPolicy>(p, grid, smem, stream);
                                       break;
                                   }
                                 });
}

}  // namespace

TORCH_LIBRARY_IMPL(resnext_kernels, CUDA, m) {
  m.impl("fused_block_pack_weights", &fused_block_pack_weights);
  m.impl("fused_block_forward", &fused_block_forward);
}
