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

// Rearranges dense K x N operands b [..., Kp, Np] (Kp a multiple of kK, Np
// of 8) into MMA fragment order [..., Kp/kK, Np/8, 32, kK/4] (see
// FusedBlockParams): lane g*4 + t of tile (ks, nt) holds B[k][nt*8 + g] for
// k = ks*kK + 2t + e%2 + 8*(e/2) (kK = 16) or ks*kK + t + 4e (kK = 8),
// e = 0 .. kK/4 - 1.
inline at::Tensor fragment_order(const at::Tensor& b, int kK) {
  const int64_t kp = b.size(-2), np = b.size(-1), e = kK / 4;
  const auto lopts = at::TensorOptions().dtype(at::kLong).device(b.device());
  const at::Tensor t = at::arange(4, lopts).view({4, 1}), ei = at::arange(e, lopts).view({1, e});
  const at::Tensor k = (kK == 16 ? 2 * t + at::remainder(ei, 2) + 8 * at::floor_divide(ei, 2) : t + 4 * ei).reshape(-1);
  std::vector<int64_t> lead(b.sizes().begin(), b.sizes().end() - 2);
  const int64_t nlead = static_cast<int64_t>(lead.size());
  std::vector<int64_t> split = lead;
  for (int64_t v : {kp / kK, static_cast<int64_t>(kK), np / 8, int64_t(8)}) split.push_back(v);
  std::vector<int64_t> tiles = lead;
  for (int64_t v : {kp / kK, int64_t(4), e, np / 8, int64_t(8)}) tiles.push_back(v);
  // [..., ks, (t, e), nt, g] -> [..., ks, nt, g, t, e]
  std::vector<int64_t> perm;
  for (int64_t i = 0; i < nlead; ++i) perm.push_back(i);
  for (int64_t i : {0, 3, 4, 1, 2}) perm.push_back(nlead + i);
  std::vector<int64_t> out = lead;
  for (int64_t v : {kp / kK, np / 8, int64_t(32), e}) out.push_back(v);
  return b.reshape(split).index_select(nlead + 1, k).view(tiles).permute(perm).contiguous().view(out);
}

// Packs the folded weights into the layouts FusedBlockParams documents:
// {w1p, b1p, w2p, b2p, w3p, b3p} plus wdp for a projection shortcut (bd is
// folded into b3p). Biases are fp32, the rest in the weights' dtype (whose
// size sets the MMA shape, so the fp32 packing serves TF32 and FMA); all
// are contiguous and on the weights' device.
inline std::vector<at::Tensor> pack_weights(const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                                            const at::Tensor& b2, const at::Tensor& w3, const at::Tensor& b3,
                                            const std::optional<at::Tensor>& wd, const std::optional<at::Tensor>& bd,
                                            int64_t groups_, const char* op) {
  check_weights(w1, b1, w2, b2, w3, b3, wd, bd, groups_, op);
  const int groups = static_cast<int>(groups_);
  const int64_t width = w1.size(0), cin = w1.size(1), cout = w3.size(0);
  const int64_t d = width / groups;
  FusedBlockParams p{};
  set_padded_dims(p, static_cast<int>(cin), static_cast<int>(width), static_cast<int>(cout), groups,
                  static_cast<int>(w1.element_size()));
  const auto opts = w1.options();
  const auto fopts = opts.dtype(at::kFloat);
  // Index tensors are computed on the weights' device: a host-to-device copy
  // from pageable memory would synchronize the stream.
  const auto lopts = at::TensorOptions().dtype(at::kLong).device(w1.device());
  // Padded position of each real width channel c = g*d + j.
  const at::Tensor ch = at::arange(width, lopts);
  const at::Tensor idx = at::floor_divide(ch, d) * p.d_p + at::remainder(ch, d);

  at::Tensor w1d = at::zeros({p.Cin_p, p.Wp}, opts);
  w1d.narrow(0, 0, cin).index_copy_(1, idx, w1.reshape({width, cin}).t());
  at::Tensor b1p = at::zeros({p.Wp}, fopts);
  b1p.index_copy_(0, idx, b1.to(at::kFloat));
  at::Tensor b2p = at::zeros({p.Wp}, fopts);
  b2p.index_copy_(0, idx, b2.to(at::kFloat));
  at::Tensor w3d = at::zeros({p.Wp, p.Cout_p}, opts);
  w3d.narrow(1, 0, cout).index_copy_(0, idx, w3.reshape({cout, width}).t());
  at::Tensor b3p = at::zeros({p.Cout_p}, fopts);
  at::Tensor bias3 = b3.to(at::kFloat);
  if (bd.has_value()) bias3 = bias3 + bd->to(at::kFloat);
  b3p.narrow(0, 0, cout).copy_(bias3);

  // w2: for output tile nt, K position k and column n, the weight of
  // (output channel nt*8 + n, grouped_k(nt, k)), gathered from w2 viewed
  // flat [width * d * 9] with one zero appended for padding and the
  // block-diagonal zeros.
  const int64_t nt_w = p.Wp / 8, k2 = static_cast<int64_t>(p.KS2) * p.kK;
  const int64_t apt = std::max(8, p.d_p) / p.atom;
  const at::Tensor nt = at::arange(nt_w, lopts).view({nt_w, 1, 1});
  const at::Tensor k = at::arange(k2, lopts).view({1, k2, 1});
  const at::Tensor n = at::arange(8, lopts).view({1, 1, 8});
  const at::Tensor a = at::floor_divide(k, p.atom);
  const at::Tensor tap = at::floor_divide(a, apt);
  const at::Tensor ci = at::floor_divide(nt * 8, p.d_p) * p.d_p + at::remainder(a, apt) * p.atom +
                        at::remainder(k, p.atom);
  const at::Tensor po = nt * 8 + n;
  const at::Tensor go = at::floor_divide(po, p.d_p), jo = at::remainder(po, p.d_p);
  const at::Tensor gi = at::floor_divide(ci, p.d_p), ji = at::remainder(ci, p.d_p);
  const at::Tensor valid = (tap < 9) & (gi == go) & (go < groups) & (jo < d) & (ji < d);
  const at::Tensor gidx = at::where(valid, ((go * d + jo) * d + ji) * 9 + tap, at::full({}, width * d * 9, lopts));
  const at::Tensor w2f = at::cat({w2.reshape({-1}), at::zeros({1}, opts)});
  const at::Tensor w2d = w2f.index_select(0, gidx.reshape({-1})).view({nt_w, k2, 8});

  std::vector<at::Tensor> packed = {fragment_order(w1d, p.kK), b1p,
                                    fragment_order(w2d, p.kK).view({nt_w, p.KS2, 32, p.kK / 4}),
                                    b2p, fragment_order(w3d, p.kK), b3p};
  if (wd.has_value()) {
    at::Tensor wdd = at::zeros({p.Cin_p, p.Cout_p}, opts);
    wdd.narrow(0, 0, cin).narrow(1, 0, cout).copy_(wd->reshape({cout, cin}).t());
    packed.push_back(fragment_order(wdd, p.kK));
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
  // Offsets into x and y are 64-bit (pixel index * channels, strides); the
  // kernel numbers pixels of the whole batch in 32 bits (stacked rows *
  // width + column), and so does the grid (blocks of at least 16 pixels).
  TORCH_CHECK(x.size(0) * x.size(2) * x.size(3) < (int64_t(1) << 31), op,
              ": N*H*W must be < 2^31 (the kernel numbers the batch's pixels in 32 bits), got x of shape ",
              x.sizes());
  TORCH_CHECK(std::max({cin, width, cout}) < (int64_t(1) << 24), op, ": channel counts must be < 2^24, got Cin=",
              cin, " width=", width, " Cout=", cout);
  FusedBlockParams p{};
  set_padded_dims(p, static_cast<int>(cin), static_cast<int>(width), static_cast<int>(cout),
                  static_cast<int>(groups), static_cast<int>(x.element_size()));
  const at::ScalarType wt = x.scalar_type();
  const int64_t e = p.kK / 4;
  check_packed("w1p", w1p, {p.Cin_p / p.kK, p.Wp / 8, 32, e}, wt, x, op);
  check_packed("b1p", b1p, {p.Wp}, at::kFloat, x, op);
  check_packed("w2p", w2p, {p.Wp / 8, p.KS2, 32, e}, wt, x, op);
  check_packed("b2p", b2p, {p.Wp}, at::kFloat, x, op);
  check_packed("w3p", w3p, {p.Wp / p.kK, p.Cout_p / 8, 32, e}, wt, x, op);
  check_packed("b3p", b3p, {p.Cout_p}, at::kFloat, x, op);
  if (wdp.has_value()) check_packed("wdp", *wdp, {p.Cin_p / p.kK, p.Cout_p / 8, 32, e}, wt, x, op);
}

inline Math math_for(at::ScalarType t, bool allow_tf32) {
  if (t == at::kHalf) return Math::kHalf;
  if (t == at::kBFloat16) return Math::kBf16;
  return allow_tf32 ? Math::kTf32 : Math::kFp32;
}

// The output's memory format, as ATen's conv gives it for NCHW-ordered
// weights: channels_last when x is channels_last (and not also
// NCHW-contiguous, as when C == 1 or H == W == 1), else NCHW-contiguous.
// The same rule as resnext_kernels/common/layout.py (the fake kernels').
inline at::MemoryFormat output_memory_format(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous() ? at::MemoryFormat::ChannelsLast
                                                                               : at::MemoryFormat::Contiguous;
}

// Runs the block on packed weights (pack_weights) with the tile plan of rank
// plan_rank among those that fit in smem_limit (plan_fused_block).
// launch(math, params, grid, smem_bytes) starts the kernel on the machine at
// hand. The kernel reads x channels_last (NCHW-contiguous x is converted
// here, once: one copy of x) and writes y directly in output_memory_format(x)
// through y's strides.
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
  const int elem = static_cast<int>(x.element_size());
  const Math math = math_for(x.scalar_type(), allow_tf32);
  FusedBlockParams p{};
  const size_t smem = plan_fused_block(p, N, H, W, Cin, static_cast<int>(width), Cout, static_cast<int>(groups),
                                       static_cast<int>(stride), static_cast<int>(dilation), wdp.has_value(), elem,
                                       math == Math::kFp32, smem_limit, plan_rank, op);
  // y first: the GPU tests poison the block the caching allocator hands out next.
  at::Tensor y = at::empty({N, Cout, p.Ho, p.Wo}, x.options().memory_format(output_memory_format(x_in)));
  p.x = x.data_ptr();
  p.y = y.data_ptr();
  p.w1p = w1p.data_ptr();
  p.b1p = b1p.data_ptr<float>();
  p.w2p = w2p.data_ptr();
  p.b2p = b2p.data_ptr<float>();
  p.w3p = w3p.data_ptr();
  p.b3p = b3p.data_ptr<float>();
  p.wdp = wdp.has_value() ? wdp->data_ptr() : nullptr;
  p.ys_n = y.stride(0);
  p.ys_c = y.stride(1);
  p.ys_h = y.stride(2);
  p.ys_w = y.stride(3);
  const int vec = 16 / elem;
  p.vec_x = Cin % vec == 0 && reinterpret_cast<uintptr_t>(p.x) % 16 == 0;
  p.pair_x = Cin % 2 == 0 && reinterpret_cast<uintptr_t>(p.x) % (2 * elem) == 0;
  p.pair_y = p.ys_c == 1 && Cout % 2 == 0 && reinterpret_cast<uintptr_t>(p.y) % (2 * elem) == 0;
  for (const void* ptr : {p.w1p, p.w2p, p.w3p, p.wdp}) {
    // B fragments are read with 8-byte (16-bit) or 16-byte (fp32 FMA) loads.
    TORCH_CHECK(reinterpret_cast<uintptr_t>(ptr) % 16 == 0, op, ": packed weights are not 16-byte aligned");
  }
  const dim3 grid(static_cast<unsigned>(run_count(p)), static_cast<unsigned>(ceil_div(p.Cout_p, p.CS)));
  launch(math, p, grid, smem);
  return y;
}

}  // namespace rk
