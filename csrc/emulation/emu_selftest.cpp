// Small kernels whose results are known, run through the CUDA emulator
// (cuda_emu.h) by tests/test_cuda_emulator.py: barrier semantics, a
// shared-memory tree reduction, wmma load/mma/store against matmul, cp.async
// completion, and the
// emulator's error reports (misalignment, divergent barriers, divergent
// warp collectives). Ops live in namespace resnext_kernels_emu.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <stdexcept>

#include "rk_device.cuh"

namespace {

namespace wmma = nvcuda::wmma;

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

// d = a @ b + c for one 16x16x16 tile (a row-major [16,16]; b row-major or
// column-major [16,16] in memory; c, d row-major fp32).
template <class T, class LayoutB>
__global__ void wmma16_kernel(const T* a, const T* b, const float* c, float* d) {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LayoutB> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::load_matrix_sync(fa, a, 16);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::load_matrix_sync(fc, c, 16, wmma::mem_row_major);
  wmma::mma_sync(fc, fa, fb, fc);
  wmma::store_matrix_sync(d, fc, 16, wmma::mem_row_major);
}

// d = a @ b + c for a 16x8 tf32 a and 8x16 b, operands converted as the
// programming guide requires.
__global__ void wmma_tf32_kernel(const float* a, const float* b, const float* c, float* d) {
  wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 8, float> fc;
  wmma::load_matrix_sync(fa, a, 8);
  wmma::load_matrix_sync(fb, b, 16);
  for (int i = 0; i < fa.num_elements; ++i) fa.x[i] = wmma::__float_to_tf32(fa.x[i]);
  for (int i = 0; i < fb.num_elements; ++i) fb.x[i] = wmma::__float_to_tf32(fb.x[i]);
  wmma::load_matrix_sync(fc, c, 16, wmma::mem_row_major);
  wmma::mma_sync(fc, fa, fb, fc);
  wmma::store_matrix_sync(d, fc, 16, wmma::mem_row_major);
}

// Each warp stores a tile to its shared-memory slot and every lane reads all
// of it back. sync: 0 none (lanes see elements other lanes have not stored
// yet), 1 __syncwarp(), 2 __syncthreads().
__global__ void wmma_readback_kernel(const float* c, float* out, int sync) {
  const int warp = threadIdx.x / 32;
  float* s = reinterpret_cast<float*>(rk::dynamic_smem()) + warp * 256;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::load_matrix_sync(fc, c + warp * 256, 16, wmma::mem_row_major);
  wmma::store_matrix_sync(s, fc, 16, wmma::mem_row_major);
  if (sync == 1) __syncwarp();
  if (sync == 2) __syncthreads();
  for (int i = 0; i < 256; ++i) out[threadIdx.x * 256 + i] = s[i];
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

// A wmma load from a pointer 2 bytes past an aligned one.
__global__ void wmma_misaligned_kernel(const rk::half_t* a, float* d) {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, rk::half_t, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, rk::half_t, wmma::row_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::fill_fragment(fc, 0.0f);
  wmma::load_matrix_sync(fa, a + 1, 16);
  wmma::load_matrix_sync(fb, a, 16);
  wmma::mma_sync(fc, fa, fb, fc);
  wmma::store_matrix_sync(d, fc, 16, wmma::mem_row_major);
}

// Lane 0 loads a different tile than the other lanes of its warp.
__global__ void wmma_divergent_kernel(const rk::half_t* a, float* d) {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, rk::half_t, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, rk::half_t, wmma::row_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::fill_fragment(fc, 0.0f);
  wmma::load_matrix_sync(fa, a + (threadIdx.x == 0 ? 256 : 0), 16);
  wmma::load_matrix_sync(fb, a, 16);
  wmma::mma_sync(fc, fa, fb, fc);
  wmma::store_matrix_sync(d, fc, 16, wmma::mem_row_major);
}

// Thread 0 returns before a barrier the others wait at.
__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x == 0) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
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

at::Tensor wmma_mma(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, bool b_col_major) {
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous() && c.is_contiguous() && c.scalar_type() == at::kFloat);
  at::Tensor d = at::empty({16, 16}, c.options());
  const float* pc = c.data_ptr<float>();
  float* pd = d.data_ptr<float>();
  if (a.scalar_type() == at::kFloat) {
    const float* pa = a.data_ptr<float>();
    const float* pb = b.data_ptr<float>();
    launch(dim3(1), dim3(32), 0, [=]() { wmma_tf32_kernel(pa, pb, pc, pd); });
    return d;
  }
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* pa = static_cast<const T*>(a.data_ptr());
    const T* pb = static_cast<const T*>(b.data_ptr());
    if (b_col_major) {
      launch(dim3(1), dim3(32), 0, [=]() { wmma16_kernel<T, wmma::col_major>(pa, pb, pc, pd); });
    } else {
      launch(dim3(1), dim3(32), 0, [=]() { wmma16_kernel<T, wmma::row_major>(pa, pb, pc, pd); });
    }
  };
  if (a.scalar_type() == at::kHalf) {
    run(rk::half_t{});
  } else {
    TORCH_CHECK(a.scalar_type() == at::kBFloat16);
    run(rk::bf16_t{});
  }
  return d;
}

at::Tensor wmma_readback(const at::Tensor& c, int64_t sync) {
  TORCH_CHECK(c.dim() == 3 && c.size(1) == 16 && c.size(2) == 16 && c.is_contiguous() && c.scalar_type() == at::kFloat);
  const int warps = c.size(0);
  at::Tensor out = at::empty({warps * 32, 256}, c.options());
  const float* pc = c.data_ptr<float>();
  float* o = out.data_ptr<float>();
  launch(dim3(1), dim3(warps * 32), warps * 256 * 4, [=]() { wmma_readback_kernel(pc, o, static_cast<int>(sync)); });
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

at::Tensor wmma_misaligned(const at::Tensor& a) {
  at::Tensor d = at::empty({16, 16}, a.options().dtype(at::kFloat));
  const rk::half_t* pa = static_cast<const rk::half_t*>(a.data_ptr());
  float* pd = d.data_ptr<float>();
  launch(dim3(1), dim3(32), 0, [=]() { wmma_misaligned_kernel(pa, pd); });
  return d;
}

at::Tensor wmma_divergent(const at::Tensor& a) {
  at::Tensor d = at::empty({16, 16}, a.options().dtype(at::kFloat));
  const rk::half_t* pa = static_cast<const rk::half_t*>(a.data_ptr());
  float* pd = d.data_ptr<float>();
  launch(dim3(1), dim3(32), 0, [=]() { wmma_divergent_kernel(pa, pd); });
  return d;
}

at::Tensor divergent_barrier(int64_t threads) {
  at::Tensor out = at::zeros({threads}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  launch(dim3(1), dim3(threads), 0, [=]() { divergent_barrier_kernel(o); });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(resnext_kernels_emu, m) {
  m.def("smem_shift(Tensor x, int threads, bool barrier) -> Tensor", &smem_shift);
  m.def("block_reduce(Tensor x, int threads) -> Tensor", &block_reduce);
  m.def("wmma_mma(Tensor a, Tensor b, Tensor c, bool b_col_major) -> Tensor", &wmma_mma);
  m.def("wmma_readback(Tensor c, int sync) -> Tensor", &wmma_readback);
  m.def("divergent_syncwarp() -> Tensor", &divergent_syncwarp);
  m.def("async_copy(Tensor x, int mode) -> Tensor", &async_copy);
  m.def("wmma_misaligned(Tensor a) -> Tensor", &wmma_misaligned);
  m.def("wmma_divergent(Tensor a) -> Tensor", &wmma_divergent);
  m.def("divergent_barrier(int threads) -> Tensor", &divergent_barrier);
}
