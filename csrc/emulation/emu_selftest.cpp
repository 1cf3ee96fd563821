// Small kernels whose results are known, run through the CUDA emulator
// (cuda_emu.h) by tests/test_cuda_emulator.py: barrier semantics, a
// shared-memory tree reduction, the mma.sync / ldmatrix fragment layouts
// against a plain matrix product, cp.async completion, and the emulator's
// error reports (misalignment, divergent barriers, divergent warp
// collectives). Ops live in namespace resnext_kernels_emu.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstring>
#include <stdexcept>
#include <type_traits>
#include <utility>

#include "rk_device.cuh"

namespace {

// out[b*n + t] = in[b*n + (t+1) % n] through shared memory.
__global__ void smem_shift_kernel(const float* in, float* out, bool barrier) {
  float* s = reinterpret_cast<float*>(rk::dynamic_smem());
  const int t = threadIdx.x, n = blockDim.x, base = blockIdx.x * n;
  s[t] = in[base + t];
  if (barrier) __syncthreads();
  out[base + t] = s[(t + 1) % n];
}

// out[b] = sum of in[b*n .. b*n+n), n a power of two.
__global__ void block_reduce_kernel(const float* in, float* out) {
  float* s = reinterpret_cast<float*>(rk::dynamic_smem());
  const int t = threadIdx.x, n = blockDim.x;
  s[t] = in[blockIdx.x * n + t];
  __syncthreads();
  for (int half = n / 2; half > 0; half /= 2) {
    if (t < half) s[t] += s[t + half];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = s[0];
}

// ---------------------------------------------------------------------------
// mma.sync fragments built by hand from the PTX ISA's layout tables (not
// from the emulator's code): D = A @ B + C for one m16n8k16 (T = half_t,
// bf16_t) or m16n8k8 (T = float: tf32) tile, A [16, K] and B [K, 8] and C,
// D [16, 8] row-major in global memory. `wrong` breaks one index on purpose
// (1: A rows g+8 and columns +8 swapped between a[1] and a[2]; 2: B's two
// registers swapped; 3: D's registers 1 and 2 swapped on the store), so a
// test can show that a wrong fragment index gives a wrong product.

template <class T>
uint32_t pack2(const T* p) {  // two 16-bit elements, the first in the low half
  uint16_t lo, hi;
  std::memcpy(&lo, p, 2);
  std::memcpy(&hi, p + 1, 2);
  return static_cast<uint32_t>(lo) | static_cast<uint32_t>(hi) << 16;
}

template <class T>
__global__ void mma_fragment_kernel(const T* A, const T* B, const float* C, float* D, int wrong) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  uint32_t a[4], b[2];
  float d[4] = {C[g * 8 + 2 * t], C[g * 8 + 2 * t + 1], C[(g + 8) * 8 + 2 * t], C[(g + 8) * 8 + 2 * t + 1]};
  if constexpr (std::is_same_v<T, float>) {  // m16n8k8, K = 8
    a[0] = rk::to_tf32(A[g * 8 + t]);
    a[1] = rk::to_tf32(A[(g + 8) * 8 + t]);
    a[2] = rk::to_tf32(A[g * 8 + t + 4]);
    a[3] = rk::to_tf32(A[(g + 8) * 8 + t + 4]);
    b[0] = rk::to_tf32(B[t * 8 + g]);
    b[1] = rk::to_tf32(B[(t + 4) * 8 + g]);
  } else {  // m16n8k16, K = 16
    a[0] = pack2(A + g * 16 + 2 * t);
    a[1] = pack2(A + (g + 8) * 16 + 2 * t);
    a[2] = pack2(A + g * 16 + 2 * t + 8);
    a[3] = pack2(A + (g + 8) * 16 + 2 * t + 8);
    const T col[4] = {B[(2 * t) * 8 + g], B[(2 * t + 1) * 8 + g], B[(2 * t + 8) * 8 + g], B[(2 * t + 9) * 8 + g]};
    b[0] = pack2(col);
    b[1] = pack2(col + 2);
  }
  if (wrong == 1) std::swap(a[1], a[2]);
  if (wrong == 2) std::swap(b[0], b[1]);
  if constexpr (std::is_same_v<T, float>) {
    rk::mma_m16n8k8_tf32(d, a, b);
  } else {
    rk::mma_m16n8k16<T>(d, a, b);
  }
  if (wrong == 3) std::swap(d[1], d[2]);
  D[g * 8 + 2 * t] = d[0];
  D[g * 8 + 2 * t + 1] = d[1];
  D[(g + 8) * 8 + 2 * t] = d[2];
  D[(g + 8) * 8 + 2 * t + 1] = d[3];
}

// ldmatrix of `num` 8x8 b16 matrices: rows is [num*8, 8] b16 (matrix i row
// j at row 8i+j), copied to shared memory in reverse row order with a
// 24-element pitch (so the rows are neither contiguous nor in order: each
// lane must bring its own row address); out[lane][i] = the lane's register i.
template <int N, bool Trans>
__global__ void ldmatrix_kernel(const uint16_t* rows, uint32_t* out) {
  uint16_t* s = reinterpret_cast<uint16_t*>(rk::dynamic_smem());
  constexpr int kPitch = 24, kRows = N * 8;
  const int lane = threadIdx.x;
  for (int r = lane; r < kRows; r += 32) {
    for (int c = 0; c < 8; ++c) s[(kRows - 1 - r) * kPitch + c] = rows[r * 8 + c];
  }
  __syncwarp();
  uint32_t r[N];
  const int row = lane % kRows;  // lanes past the used ones give some valid address
  rk::ldmatrix<N, Trans>(r, s + (kRows - 1 - row) * kPitch);
  for (int i = 0; i < N; ++i) out[lane * N + i] = r[i];
}

// The way the fused kernel feeds the tensor cores: A [16, K] through
// ldmatrix.x4 from shared memory (lane l gives row l%16 at column
// (l/16)*K/2), B [K, 8] through ldmatrix.x2.trans from a k-major shared
// tile (16-bit) or by hand (tf32), then mma; D [16, 8] = A @ B.
template <class T>
__global__ void ldmatrix_mma_kernel(const T* A, const T* B, float* D) {
  constexpr bool kTf32 = std::is_same_v<T, float>;
  constexpr int K = kTf32 ? 8 : 16, kPitchA = K + 16 / sizeof(T), kPitchB = 8 + 16 / sizeof(T);
  T* sa = reinterpret_cast<T*>(rk::dynamic_smem());
  T* sb = sa + 16 * kPitchA;
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  for (int i = lane; i < 16 * K; i += 32) sa[(i / K) * kPitchA + i % K] = A[i];
  for (int i = lane; i < K * 8; i += 32) sb[(i / 8) * kPitchB + i % 8] = B[i];
  __syncwarp();
  uint32_t a[4], b[2];
  rk::ldmatrix<4>(a, sa + (lane % 16) * kPitchA + (lane / 16) * (K / 2));
  float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  if constexpr (kTf32) {
    for (uint32_t& v : a) {
      float f;
      std::memcpy(&f, &v, 4);
      v = rk::to_tf32(f);
    }
    b[0] = rk::to_tf32(sb[t * kPitchB + g]);
    b[1] = rk::to_tf32(sb[(t + 4) * kPitchB + g]);
    rk::mma_m16n8k8_tf32(d, a, b);
  } else {
    rk::ldmatrix<2, true>(b, sb + (lane % 16) * kPitchB);
    rk::mma_m16n8k16<T>(d, a, b);
  }
  D[g * 8 + 2 * t] = d[0];
  D[g * 8 + 2 * t + 1] = d[1];
  D[(g + 8) * 8 + 2 * t] = d[2];
  D[(g + 8) * 8 + 2 * t + 1] = d[3];
}

// Misuses the emulator must report. mode 0: an ldmatrix row address 8
// bytes past a 16-byte boundary; 1: an ldmatrix address in global memory;
// 2: lane 0 issues ldmatrix.x2 while the others issue .x4; 3: lane 0 waits
// at __syncwarp() while the others issue mma; 4: an mma in a block of 16
// threads (half a warp).
__global__ void collective_misuse_kernel(const rk::half_t* global, int mode) {
  rk::half_t* s = reinterpret_cast<rk::half_t*>(rk::dynamic_smem());
  const int lane = threadIdx.x % 32;
  uint32_t r[4] = {0, 0, 0, 0}, b[2] = {0, 0};
  float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (mode == 0) rk::ldmatrix<4>(r, s + (lane % 16) * 8 + 4);
  if (mode == 1) rk::ldmatrix<4>(r, global + (lane % 16) * 8);
  if (mode == 2) {
    if (lane == 0) {
      uint32_t r2[2];
      rk::ldmatrix<2>(r2, s + lane * 8);
    } else {
      rk::ldmatrix<4>(r, s + lane * 8);
    }
  }
  if (mode == 3) {
    if (lane == 0) {
      __syncwarp();
    } else {
      rk::mma_m16n8k16<rk::half_t>(d, r, b);
    }
  }
  if (mode == 4) rk::mma_m16n8k16<rk::half_t>(d, r, b);
}

// Each warp runs one mma (A = identity, so D = C) and stores D to its
// shared-memory slot by the accumulator layout, then every lane reads the
// whole tile back. sync: 0 none (lanes see elements other lanes have not
// stored yet), 1 __syncwarp(), 2 __syncthreads().
__global__ void mma_readback_kernel(const float* c, float* out, int sync) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  float* s = reinterpret_cast<float*>(rk::dynamic_smem()) + warp * 128;
  const float* cw = c + warp * 128;
  const rk::half_t one = rk::from_float<rk::half_t>(1.0f), zero = rk::from_float<rk::half_t>(0.0f);
  uint32_t a[4], b[2] = {0, 0};
  for (int i = 0; i < 4; ++i) {  // A = I: a[i] holds A[g + 8(i%2)][2t + 8(i/2), +1]
    const int row = g + 8 * (i % 2), col = 2 * t + 8 * (i / 2);
    a[i] = rk::pack_pair(row == col ? one : zero, row == col + 1 ? one : zero);
  }
  float d[4] = {cw[g * 8 + 2 * t], cw[g * 8 + 2 * t + 1], cw[(g + 8) * 8 + 2 * t], cw[(g + 8) * 8 + 2 * t + 1]};
  rk::mma_m16n8k16<rk::half_t>(d, a, b);  // B = 0: D = C
  s[g * 8 + 2 * t] = d[0];
  s[g * 8 + 2 * t + 1] = d[1];
  s[(g + 8) * 8 + 2 * t] = d[2];
  s[(g + 8) * 8 + 2 * t + 1] = d[3];
  if (sync == 1) __syncwarp();
  if (sync == 2) __syncthreads();
  for (int i = 0; i < 128; ++i) out[threadIdx.x * 128 + i] = s[i];
}

// Each thread copies 16 bytes of `in` to shared memory with cp.async, then
// reads its neighbour's 16 bytes after a barrier. mode 0: wait for the copy
// before the barrier (correct); 1: wait only after reading (a bug: the read
// sees poison); 2: never wait (reported).
__global__ void async_copy_kernel(const float* in, float* out, int mode) {
  float* s = reinterpret_cast<float*>(rk::dynamic_smem());
  const int t = threadIdx.x, n = blockDim.x;
  rk::async_copy16(s + 4 * t, in + 4 * t);
  rk::async_commit();
  if (mode == 0) rk::async_wait_prior(0);
  __syncthreads();
  for (int j = 0; j < 4; ++j) out[4 * t + j] = s[4 * ((t + 1) % n) + j];
  if (mode == 1) rk::async_wait_prior(0);
}

// Lane 0 skips a __syncwarp() the other lanes wait at.
__global__ void divergent_syncwarp_kernel(float* out) {
  if (threadIdx.x % 32 != 0) __syncwarp();
  out[threadIdx.x] = 1.0f;
}

// Thread 0 returns before a barrier the others wait at.
__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x == 0) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

// out[t] = __any_sync over thread t's warp of (pred[t] != 0).
__global__ void warp_any_kernel(const float* pred, float* out) {
  out[threadIdx.x] = rk_emu::warp_any(pred[threadIdx.x] != 0.0f) ? 1.0f : 0.0f;
}

void launch(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  try {
    rk_emu::launch(grid, block, smem, body);
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, e.what());
  }
}

at::Tensor smem_shift(const at::Tensor& x, int64_t threads, bool barrier) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.numel() % threads == 0);
  at::Tensor out = at::empty_like(x);
  const float* in = x.data_ptr<float>();
  float* o = out.data_ptr<float>();
  launch(dim3(x.numel() / threads), dim3(threads), threads * 4, [=]() { smem_shift_kernel(in, o, barrier); });
  return out;
}

at::Tensor block_reduce(const at::Tensor& x, int64_t threads) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.numel() % threads == 0);
  at::Tensor out = at::empty({x.numel() / threads}, x.options());
  const float* in = x.data_ptr<float>();
  float* o = out.data_ptr<float>();
  launch(dim3(out.numel()), dim3(threads), threads * 4, [=]() { block_reduce_kernel(in, o); });
  return out;
}

at::Tensor mma_fragments(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, int64_t wrong) {
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous() && c.is_contiguous() && c.scalar_type() == at::kFloat &&
              a.scalar_type() == b.scalar_type());
  const int K = a.scalar_type() == at::kFloat ? 8 : 16;
  TORCH_CHECK(a.sizes() == at::IntArrayRef({16, K}) && b.sizes() == at::IntArrayRef({K, 8}) &&
              c.sizes() == at::IntArrayRef({16, 8}));
  at::Tensor d = at::empty({16, 8}, c.options());
  const float* pc = c.data_ptr<float>();
  float* pd = d.data_ptr<float>();
  const int w = static_cast<int>(wrong);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* pa = static_cast<const T*>(a.data_ptr());
    const T* pb = static_cast<const T*>(b.data_ptr());
    launch(dim3(1), dim3(32), 0, [=]() { mma_fragment_kernel<T>(pa, pb, pc, pd, w); });
  };
  if (a.scalar_type() == at::kFloat) {
    run(float{});
  } else if (a.scalar_type() == at::kHalf) {
    run(rk::half_t{});
  } else {
    TORCH_CHECK(a.scalar_type() == at::kBFloat16);
    run(rk::bf16_t{});
  }
  return d;
}

at::Tensor ldmatrix_lanes(const at::Tensor& rows, int64_t num, bool trans) {
  TORCH_CHECK(rows.scalar_type() == at::kShort && rows.is_contiguous() && rows.numel() == num * 64);
  at::Tensor out = at::empty({32, num}, rows.options().dtype(at::kInt));
  const uint16_t* pr = reinterpret_cast<const uint16_t*>(rows.data_ptr());
  uint32_t* po = reinterpret_cast<uint32_t*>(out.data_ptr());
  const size_t smem = num * 8 * 24 * 2;
  auto go = [&](auto kernel) { launch(dim3(1), dim3(32), smem, [=]() { kernel(pr, po); }); };
  if (num == 1) trans ? go(ldmatrix_kernel<1, true>) : go(ldmatrix_kernel<1, false>);
  else if (num == 2) trans ? go(ldmatrix_kernel<2, true>) : go(ldmatrix_kernel<2, false>);
  else {
    TORCH_CHECK(num == 4);
    trans ? go(ldmatrix_kernel<4, true>) : go(ldmatrix_kernel<4, false>);
  }
  return out;
}

at::Tensor ldmatrix_mma(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous() && a.scalar_type() == b.scalar_type());
  at::Tensor d = at::empty({16, 8}, a.options().dtype(at::kFloat));
  float* pd = d.data_ptr<float>();
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* pa = static_cast<const T*>(a.data_ptr());
    const T* pb = static_cast<const T*>(b.data_ptr());
    launch(dim3(1), dim3(32), 4096, [=]() { ldmatrix_mma_kernel<T>(pa, pb, pd); });
  };
  if (a.scalar_type() == at::kFloat) {
    run(float{});
  } else if (a.scalar_type() == at::kHalf) {
    run(rk::half_t{});
  } else {
    TORCH_CHECK(a.scalar_type() == at::kBFloat16);
    run(rk::bf16_t{});
  }
  return d;
}

at::Tensor mma_macs_of(const at::Tensor& a, const at::Tensor& b) {
  // The MAC count the emulator records for one ldmatrix_mma launch.
  ldmatrix_mma(a, b);
  return at::scalar_tensor(static_cast<int64_t>(rk_emu::mma_macs()), at::kLong);
}

void collective_misuse(int64_t mode) {
  at::Tensor g = at::zeros({512}, at::TensorOptions().dtype(at::kHalf));
  const rk::half_t* pg = static_cast<const rk::half_t*>(g.data_ptr());
  const int m = static_cast<int>(mode);
  launch(dim3(1), dim3(mode == 4 ? 16 : 32), 1024, [=]() { collective_misuse_kernel(pg, m); });
}

at::Tensor mma_readback(const at::Tensor& c, int64_t sync) {
  TORCH_CHECK(c.dim() == 3 && c.size(1) == 16 && c.size(2) == 8 && c.is_contiguous() && c.scalar_type() == at::kFloat);
  const int warps = c.size(0);
  at::Tensor out = at::empty({warps * 32, 128}, c.options());
  const float* pc = c.data_ptr<float>();
  float* o = out.data_ptr<float>();
  launch(dim3(1), dim3(warps * 32), warps * 128 * 4, [=]() { mma_readback_kernel(pc, o, static_cast<int>(sync)); });
  return out;
}

at::Tensor async_copy(const at::Tensor& x, int64_t mode) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.numel() % 4 == 0);
  at::Tensor out = at::empty_like(x);
  const float* in = x.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int threads = x.numel() / 4;
  launch(dim3(1), dim3(threads), x.numel() * 4, [=]() { async_copy_kernel(in, o, static_cast<int>(mode)); });
  return out;
}

at::Tensor divergent_syncwarp() {
  at::Tensor out = at::zeros({64}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  launch(dim3(1), dim3(64), 0, [=]() { divergent_syncwarp_kernel(o); });
  return out;
}

at::Tensor divergent_barrier(int64_t threads) {
  at::Tensor out = at::zeros({threads}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  launch(dim3(1), dim3(threads), 0, [=]() { divergent_barrier_kernel(o); });
  return out;
}

at::Tensor warp_any(const at::Tensor& pred) {
  TORCH_CHECK(pred.scalar_type() == at::kFloat && pred.is_contiguous() && pred.dim() == 1 &&
              pred.numel() % 32 == 0 && pred.numel() <= 1024);
  at::Tensor out = at::empty_like(pred);
  const float* in = pred.data_ptr<float>();
  float* o = out.data_ptr<float>();
  launch(dim3(1), dim3(pred.numel()), 0, [=]() { warp_any_kernel(in, o); });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(resnext_kernels_emu, m) {
  m.def("smem_shift(Tensor x, int threads, bool barrier) -> Tensor", &smem_shift);
  m.def("block_reduce(Tensor x, int threads) -> Tensor", &block_reduce);
  m.def("mma_readback(Tensor c, int sync) -> Tensor", &mma_readback);
  m.def("mma_fragments(Tensor a, Tensor b, Tensor c, int wrong) -> Tensor", &mma_fragments);
  m.def("ldmatrix_lanes(Tensor rows, int num, bool trans) -> Tensor", &ldmatrix_lanes);
  m.def("ldmatrix_mma(Tensor a, Tensor b) -> Tensor", &ldmatrix_mma);
  m.def("mma_macs_of(Tensor a, Tensor b) -> Tensor", &mma_macs_of);
  m.def("collective_misuse(int mode) -> ()", &collective_misuse);
  m.def("divergent_syncwarp() -> Tensor", &divergent_syncwarp);
  m.def("async_copy(Tensor x, int mode) -> Tensor", &async_copy);
  m.def("divergent_barrier(int threads) -> Tensor", &divergent_barrier);
  m.def("warp_any(Tensor pred) -> Tensor", &warp_any);
}
