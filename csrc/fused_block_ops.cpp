// Schema of resnext_kernels::fused_block_cuda, the fused bottleneck inference
// kernel (csrc/fused_block_kernel.cuh). Compiled into _C with or without
// CUDA; the CUDA implementation is registered by csrc/fused_block_cuda.cu.
//
// allow_tf32: fp32 inputs use TF32 tensor cores when true, fp32 FMA when
// false (Python passes torch.backends.cudnn.allow_tf32). smem_limit: bytes of
// shared memory the tile plan may use; 0 means the device's opt-in maximum
// (a smaller value forces the width/Cout split, for tests).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(resnext_kernels, m) {
  m.def(
      "fused_block_cuda(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor w3, Tensor b3, "
      "Tensor? wd, Tensor? bd, int stride, int dilation, int groups, bool allow_tf32, int smem_limit=0) -> Tensor");
}
