// Schemas of the fused bottleneck inference kernel's ops
// (csrc/fused_block_kernel.cuh). Compiled into _C with or without CUDA; the
// CUDA implementations are registered by csrc/fused_block_cuda.cu.
//
// fused_block_pack_cuda: packs the folded weights once (layouts in
// FusedBlockParams): [w1p, b1p, w2p, b2p, w3p, b3p] plus wdp when wd is given
// (bd is folded into b3p). The packing depends on the weights and groups only,
// so Python caches it across calls (resnext_kernels/cuda_backend.py).
//
// fused_block_packed_cuda: runs the block on those tensors. width and cout
// are the real channel counts (the packed ones are padded). allow_tf32: fp32
// inputs use TF32 tensor cores when true, fp32 FMA when false (Python passes
// torch.backends.cudnn.allow_tf32). smem_limit: bytes of shared memory the
// tile plan may use; 0 means the device's opt-in maximum (a smaller value
// forces the width/Cout split, for tests).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(resnext_kernels, m) {
  m.def(
      "fused_block_pack_cuda(Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor w3, Tensor b3, Tensor? wd, "
      "Tensor? bd, int groups) -> Tensor[]");
  m.def(
      "fused_block_packed_cuda(Tensor x, Tensor w1p, Tensor b1p, Tensor w2p, Tensor b2p, Tensor w3p, Tensor b3p, "
      "Tensor? wdp, int width, int cout, int stride, int dilation, int groups, bool allow_tf32, "
      "int smem_limit=0) -> Tensor");
}
