// Host side of the fused block kernel, shared by the CUDA build
// (fused_block_cuda.cu) and the CPU emulation build
// (emulation/fused_block_emu.cpp): weight checks and packing (ATen ops on the
// weights' device; a separate op, so Python can cache the result), checks of
// the packed tensors and the output allocation; the tile/shared-memory plan
// is fused_block_plan.h.
// Include ATen before this header.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "fused_block_kernel.cuh"
#include "fused_block_plan.h"

namespace rk {

enum class Math { kHalf, kBf16, kTf32, kFp32 };

inline void check_weights(const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                          const at::Tensor& w3, const at::Tensor& b3, const std::optional<at::Tensor>& wd,
                          const std::optional<at::Tensor>& bd, int64_t groups, const char* op) {
  TORCH_CHECK(groups >= 1, op, ": groups must be >= 1");
  TORCH_CHECK(wd.has_value() == bd.has_value(), op, ": wd and bd must both be given or both be None");
  TORCH_CHECK(w1.dim() == 4 && w1.size(2) == 1 && w1.size(3) == 1, op, ": w1 must be [width, Cin, 1, 1], got ",
              w1.sizes());
  TORCH_CHECK(w1.scalar_type() == at::kHalf || w1.scalar_type() == at::kBFloat16 || w1.scalar_type() == at::kFloat,
              op, ": weights must be float16, bfloat16 or float32, got ", w1.scalar_type());
  const int64_t width = w1.size(0), cin = w1.size(1), cout = w3.size(0);
  TORCH_CHECK(width > 0 && cin > 0, op, ": w1 must be non-empty, got ", w1.sizes());
  TORCH_CHECK(width % groups == 0, op, ": groups=", groups, " does not divide width=", width);
  TORCH_CHECK(w2.dim() == 4 && w2.size(0) == width && w2.size(1) == width / groups && w2.size(2) == 3 &&
                  w2.size(3) == 3,
              op, ": w2 must be [width, width/groups, 3, 3], got ", w2.sizes());
  TORCH_CHECK(w3.dim() == 4 && w3.size(0) > 0 && w3.size(1) == width && w3.size(2) == 1 && w3.size(3) == 1, op,
              ": w3 must be [Cout, width=", width, ", 1, 1], got ", w3.sizes());
  TORCH_CHECK(b1.dim() == 1 && b1.size(0) == width, op, ": b1 must have ", width, " elements");
  TORCH_CHECK(b2.dim() == 1 && b2.size(0) == width, op, ": b2 must have ", width, " elements");
  TORCH_CHECK(b3.dim() == 1 && b3.size(0) == cout, op, ": b3 must have ", cout, " elements");
  std::vector<const at::Tensor*> all = {&w1, &b1, &w2, &b2, &w3, &b3};
  if (wd.has_value()) {
    TORCH_CHECK(wd->dim() == 4 && wd->size(0) == cout && wd->size(1) == cin && wd->size(2) == 1 && wd->size(3) == 1,
                op, ": wd must be [Cout, Cin, 1, 1], got ", wd->sizes());
    TORCH_CHECK(bd->dim() == 1 && bd->size(0) == cout, op, ": bd must have ", cout, " elements");
    all.push_back(&*wd);
    all.push_back(&*bd);
  }
  for (const at::Tensor* t : all) {
    TORCH_CHECK(t->scalar_type() == w1.scalar_type(), op, ": all weights must have w1's dtype ", w1.scalar_type(),
                ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == w1.device(), op, ": all weights must be on w1's device ", w1.device(), ", got ",
                t->device());
  }
}

// Packs the folded weights into the layouts FusedBlockParams documents:
// {w1p, b1p, w2p, b2p, w3p, b3p} plus wdp for a projection shortcut (bd is
// folded into b3p). Biases are fp32, the rest in the weights' dtype; all are
// contiguous and on the weights' device.
inline std::vector<at::Tensor> pack_weights(const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                                            const at::Tensor& b2, const at::Tensor& w3, const at::Tensor& b3,
                                            const std::optional<at::Tensor>& wd, const std::optional<at::Tensor>& bd,
                                            int64_t groups_, const char* op) {
  check_weights(w1, b1, w2, b2, w3, b3, wd, bd, groups_, op);
  const int groups = static_cast<int>(groups_);
  const int64_t width = w1.size(0), cin = w1.size(1), cout = w3.size(0);
  const int64_t d = width / groups;
  FusedBlockParams p{};
  set_padded_dims(p, static_cast<int>(cin), static_cast<int>(width), static_cast<int>(cout), groups);
  const auto opts = w1.options();
  const auto fopts = opts.dtype(at::kFloat);
  const auto dev = w1.device();
  // Index tensors are computed on the weights' device: a host-to-device copy
  // from pageable memory would synchronize the stream.
  const auto lopts = at::TensorOptions().dtype(at::kLong).device(dev);
  // Padded position of each real width channel c = g*d + j.
  const at::Tensor ch = at::arange(width, lopts);
  const at::Tensor idx = at::floor_divide(ch, d) * p.d_p + at::remainder(ch, d);

  at::Tensor w1p = at::zeros({p.Cin_p, p.Wp}, opts);
  w1p.narrow(0, 0, cin).index_copy_(1, idx, w1.reshape({width, cin}).t());
  at::Tensor b1p = at::zeros({p.Wp}, fopts);
  b1p.index_copy_(0, idx, b1.to(at::kFloat));
  at::Tensor b2p = at::zeros({p.Wp}, fopts);
  b2p.index_copy_(0, idx, b2.to(at::kFloat));
  at::Tensor w3p = at::zeros({p.Wp, p.Cout_p}, opts);
  w3p.narrow(1, 0, cout).index_copy_(0, idx, w3.reshape({cout, width}).t());
  at::Tensor b3p = at::zeros({p.Cout_p}, fopts);
  at::Tensor bias3 = b3.to(at::kFloat);
  if (bd.has_value()) bias3 = bias3 + bd->to(at::kFloat);
  b3p.narrow(0, 0, cout).copy_(bias3);

  // w2: gather row (c*d + ji) of w2 viewed [width*d, 9] for every (padded
  // output channel po, K position ri); a zero row past the end fills padding
  // and the off-diagonal blocks.
  const int ks = p.KT * 16;  // K span of one output tile per tap
  const at::Tensor po = at::arange(p.Wp, lopts).view({p.Wp, 1});
  const at::Tensor ri = at::arange(ks, lopts).view({1, ks});
  const at::Tensor g = at::floor_divide(po, p.d_p), jo = at::remainder(po, p.d_p);
  at::Tensor ji = ri.expand({p.Wp, ks});
  at::Tensor valid = (g < groups) & (jo < d);
  if (p.d_p <= 16) {
    const at::Tensor pi = at::floor_divide(po, 16) * 16 + ri;  // input channel in the same 16-tile
    valid = valid & (at::floor_divide(pi, p.d_p) == g);       // on the block diagonal
    ji = at::remainder(pi, p.d_p);
  }
  valid = valid & (ji < d);
  const at::Tensor gidx = at::where(valid, (g * d + jo) * d + ji, at::full({}, width * d, lopts)).reshape({-1});
  const at::Tensor w2f = at::cat({w2.reshape({width * d, 9}), at::zeros({1, 9}, opts)}, 0);
  at::Tensor w2p = w2f.index_select(0, gidx).view({p.Wp / 16, 16, p.KT, 16, 9}).permute({0, 4, 2, 3, 1}).contiguous();

  std::vector<at::Tensor> packed = {w1p, b1p, w2p, b2p, w3p, b3p};
  if (wd.has_value()) {
    at::Tensor wdp = at::zeros({p.Cin_p, p.Cout_p}, opts);
    wdp.narrow(0, 0, cin).narrow(1, 0, cout).copy_(wd->reshape({cout, cin}).t());
    packed.push_back(wdp);
  }
  return packed;
}

// The packed tensors come from Python (a cache), so each is checked against
// the layout this call needs: a stale or foreign tensor must fail here, not
// read out of bounds in the kernel.
inline void check_packed(const char* name, const at::Tensor& t, at::IntArrayRef shape, at::ScalarType dtype,
                         const at::Tensor& x, const char* op) {
  TORCH_CHECK(t.sizes() == shape, op, ": packed ", name, " must be ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": packed ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": packed ", name, " must be on x's device ", x.device(), ", got ",
              t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": packed ", name, " must be contiguous");
}

inline void check_args(const at::Tensor& x, const at::Tensor& w1p, const at::Tensor& b1p, const at::Tensor& w2p,
                       const at::Tensor& b2p, const at::Tensor& w3p, const at::Tensor& b3p,
                       const std::optional<at::Tensor>& wdp, int64_t width, int64_t cout, int64_t stride,
                       int64_t dilation, int64_t groups, const char* op) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D [N, Cin, H, W], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, op,
              ": x must be float16, bfloat16 or float32, got ", x.scalar_type());
  TORCH_CHECK(stride >= 1 && dilation >= 1 && groups >= 1, op, ": stride, dilation and groups must be >= 1");
  TORCH_CHECK(width >= 1 && cout >= 1 && width % groups == 0, op, ": width=", width, " and Cout=", cout,
              " must be >= 1 and groups=", groups, " must divide width");
  const int64_t cin = x.size(1);
  TORCH_CHECK(x.size(0) > 0 && cin > 0 && x.size(2) > 0 && x.size(3) > 0, op, ": x must be non-empty, got ",
              x.sizes());
  if (!wdp.has_value()) {
    TORCH_CHECK(cin == cout && stride == 1, op, ": an identity shortcut needs Cin == Cout and stride 1, got Cin=", cin,
                " Cout=", cout, " stride=", stride);
  }
  // The kernel indexes with 32-bit ints inside one image.
  TORCH_CHECK(x.size(2) * x.size(3) * std::max(cin, cout) < (int64_t(1) << 31), op, ": image too large");
  // Grid x is N * tiles per image (at most 2^31 - 1 blocks).
  TORCH_CHECK(x.size(0) * x.size(2) * x.size(3) < (int64_t(1) << 31), op, ": N*H*W too large, got ", x.sizes());
  FusedBlockParams p{};
  set_padded_dims(p, static_cast<int>(cin), static_cast<int>(width), static_cast<int>(cout), static_cast<int>(groups));
  const at::ScalarType wt = x.scalar_type();
  check_packed("w1p", w1p, {p.Cin_p, p.Wp}, wt, x, op);
  check_packed("b1p", b1p, {p.Wp}, at::kFloat, x, op);
  check_packed("w2p", w2p, {p.Wp / 16, 9, p.KT, 16, 16}, wt, x, op);
  check_packed("b2p", b2p, {p.Wp}, at::kFloat, x, op);
  check_packed("w3p", w3p, {p.Wp, p.Cout_p}, wt, x, op);
  check_packed("b3p", b3p, {p.Cout_p}, at::kFloat, x, op);
  if (wdp.has_value()) check_packed("wdp", *wdp, {p.Cin_p, p.Cout_p}, wt, x, op);
}

inline Math math_for(at::ScalarType t, bool allow_tf32) {
  if (t == at::kHalf) return Math::kHalf;
  if (t == at::kBFloat16) return Math::kBf16;
  return allow_tf32 ? Math::kTf32 : Math::kFp32;
}

// Runs the block on packed weights (pack_weights) with the tile plan of rank
// plan_rank among those that fit in smem_limit (plan_fused_block).
// launch(math, params, grid, smem_bytes) starts the kernel on the machine at
// hand. NCHW-contiguous x is
// converted to channels_last here, once (one copy of x); y is channels_last.
template <class Launch>
at::Tensor fused_block_forward(const at::Tensor& x_in, const at::Tensor& w1p, const at::Tensor& b1p,
                               const at::Tensor& w2p, const at::Tensor& b2p, const at::Tensor& w3p,
                               const at::Tensor& b3p, const std::optional<at::Tensor>& wdp, int64_t width,
                               int64_t cout, int64_t stride, int64_t dilation, int64_t groups, bool allow_tf32,
                               size_t smem_limit, int64_t plan_rank, const char* op, Launch&& launch) {
  check_args(x_in, w1p, b1p, w2p, b2p, w3p, b3p, wdp, width, cout, stride, dilation, groups, op);
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const int N = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3);
  const int Cout = static_cast<int>(cout);
  FusedBlockParams p{};
  const size_t smem = plan_fused_block(p, N, H, W, Cin, static_cast<int>(width), Cout, static_cast<int>(groups),
                                       static_cast<int>(stride), static_cast<int>(dilation),
                                       static_cast<int>(x.element_size()), smem_limit, plan_rank, op);
  // y first: the GPU tests poison the block the caching allocator hands out next.
  at::Tensor y = at::empty({N, Cout, p.Ho, p.Wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  p.x = x.data_ptr();
  p.y = y.data_ptr();
  p.w1p = w1p.data_ptr();
  p.b1p = b1p.data_ptr<float>();
  p.w2p = w2p.data_ptr();
  p.b2p = b2p.data_ptr<float>();
  p.w3p = w3p.data_ptr();
  p.b3p = b3p.data_ptr<float>();
  p.wdp = wdp.has_value() ? wdp->data_ptr() : nullptr;
  const int vec = 16 / static_cast<int>(x.element_size());
  p.vec_x = Cin % vec == 0 && reinterpret_cast<uintptr_t>(p.x) % 16 == 0;
  p.vec_y = Cout % vec == 0 && reinterpret_cast<uintptr_t>(p.y) % 16 == 0 && (wdp.has_value() || p.vec_x);
  for (const void* ptr : {p.w1p, p.w2p, p.w3p, p.wdp}) {
    // wmma reads weight tiles straight from global memory.
    TORCH_CHECK(reinterpret_cast<uintptr_t>(ptr) % 32 == 0, op, ": packed weights are not 32-byte aligned");
  }
  const auto [grid_x, grid_y] = plan_grid(p);
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
  launch(math_for(x.scalar_type(), allow_tf32), p, grid, smem);
  return y;
}

}  // namespace rk
