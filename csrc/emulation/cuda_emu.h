// CPU emulation of the CUDA subset used by the fused-block kernels.
//
// The kernel sources (csrc/*.cuh) compile with g++ against this header when
// __CUDACC__ is not defined (see csrc/rk_device.cuh). What is emulated:
//
//  * Launch: blocks run one after another on the calling OS thread; the
//    threads of a block run as fibers (ucontext), so __syncthreads() keeps
//    its meaning: a fiber runs until it reaches a barrier or returns, and the
//    barrier opens when every thread of the block waits at it. Fibers run in
//    forward order in even barrier phases and reverse order in odd ones, so a
//    read of shared memory written by another thread in the same phase (a
//    missing barrier) sees poison or stale data in at least one ordering.
//  * __syncwarp(): a barrier of the 32 lanes of a warp (full mask only).
//  * A barrier reached by only some threads (others returned or wait at a
//    different barrier) is reported as an error: on hardware it is undefined
//    behaviour or a deadlock.
//  * Asynchronous copies (cp.async via rk::async_copy16 / async_commit /
//    async_wait_prior): a copy lands in shared memory only when the thread
//    waits for its commit group, so reading before the wait (plus a barrier
//    for other threads' copies) sees poison. Copies never waited for are
//    reported.
//  * Dynamic shared memory: one buffer per block, filled with 0xFF bytes
//    (NaN in fp32/fp16/bf16) before the block starts, so uninitialised reads
//    show up as NaN.
//  * nvcuda::wmma (16x16x16 half/bf16, 16x16x8 tf32, fp32 accumulators) with
//    the CUDA C++ Programming Guide's semantics: load/store/mma are warp-wide
//    collectives whose element-to-thread mapping is unspecified. Here every
//    lane's fragment holds the whole tile after a load, but mma_sync computes
//    and store_matrix_sync writes only the elements the lane "owns" (row-major
//    element index i with (i / 8) % 32 == lane). So a lane that reads back a
//    tile stored by its warp without a barrier in between, or a kernel that
//    assumes a particular fragment mapping, gets wrong numbers here.
//    Checked: pointers 256-bit aligned, ldm a multiple of 16 bytes, and all
//    lanes of a warp issuing the same sequence of wmma calls with the same
//    arguments (compared when the block ends).
//
// Not modelled (keep kernel code that depends on it out of the emulated
// source, or review it separately): the memory model between warps beyond
// barrier ordering, register limits and __launch_bounds__, bank conflicts,
// real fragment layouts, the hardware's summation order inside mma (here:
// fp32 FMA in k order), and the per-block shared-memory limit (the host code
// checks its plan against the limit it is given).
#pragma once

#include <ucontext.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace rk_emu {

constexpr int kWarpSize = 32;
constexpr size_t kFiberStack = 256 * 1024;

enum class FiberState { kRunnable, kAtBarrier, kAtWarpBarrier, kDone };

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  FiberState state = FiberState::kRunnable;
  dim3 tid;
  // Running fingerprint of this lane's warp-collective calls (wmma).
  uint64_t coll_hash = 1469598103934665603ull;
  uint64_t coll_count = 0;
  // Pending 16-byte async copies (dst, src): the open group and the
  // committed groups, oldest first.
  std::vector<std::pair<void*, const void*>> async_open;
  std::vector<std::vector<std::pair<void*, const void*>>> async_groups;
};

// Per-OS-thread emulator state: the launch in progress.
struct State {
  dim3 grid_dim, block_dim, block_idx, thread_idx;
  std::vector<Fiber> fibers;
  int current = -1;  // index of the running fiber, -1 in the scheduler
  ucontext_t sched;
  const std::function<void()>* body = nullptr;
  std::vector<unsigned char> smem_storage;
  unsigned char* smem = nullptr;
  std::string error;
};

inline State& cur() {
  static thread_local State s;
  return s;
}

inline void fail(const std::string& msg) {
  State& s = cur();
  if (s.error.empty()) {
    s.error = "block (" + std::to_string(s.block_idx.x) + "," + std::to_string(s.block_idx.y) + "," +
              std::to_string(s.block_idx.z) + ") thread " + std::to_string(s.current) + ": " + msg;
  }
}

inline int linear_tid() {
  const State& s = cur();
  return s.thread_idx.x + s.block_dim.x * (s.thread_idx.y + s.block_dim.y * s.thread_idx.z);
}
inline int lane_id() { return linear_tid() % kWarpSize; }

inline void fiber_main() {
  State& s = cur();
  (*s.body)();
  s.fibers[s.current].state = FiberState::kDone;
  // uc_link returns to the scheduler.
}

inline void syncthreads() {
  State& s = cur();
  Fiber& f = s.fibers[s.current];
  f.state = FiberState::kAtBarrier;
  swapcontext(&f.ctx, &s.sched);
}

inline void syncwarp() {
  State& s = cur();
  Fiber& f = s.fibers[s.current];
  f.state = FiberState::kAtWarpBarrier;
  swapcontext(&f.ctx, &s.sched);
}

inline void async_copy16(void* dst, const void* src) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0) {
    fail("async_copy16: address not 16-byte aligned");
  }
  State& s = cur();
  s.fibers[s.current].async_open.emplace_back(dst, src);
}

inline void async_commit() {
  State& s = cur();
  Fiber& f = s.fibers[s.current];
  f.async_groups.push_back(std::move(f.async_open));
  f.async_open.clear();
}

// Completes this thread's committed groups except the newest `n`.
inline void async_wait_prior(int n) {
  State& s = cur();
  Fiber& f = s.fibers[s.current];
  while (static_cast<int>(f.async_groups.size()) > n) {
    for (const auto& c : f.async_groups.front()) std::memcpy(c.first, c.second, 16);
    f.async_groups.erase(f.async_groups.begin());
  }
}

// Which lane of a warp holds accumulator element i (row-major index) after
// mma_sync / writes it in store_matrix_sync.
inline int owner_lane(int i) { return (i / 8) % kWarpSize; }

inline void record_collective(uint64_t op, const void* ptr, uint64_t ldm, uint64_t extra) {
  State& s = cur();
  Fiber& f = s.fibers[s.current];
  for (uint64_t v : {op, static_cast<uint64_t>(reinterpret_cast<uintptr_t>(ptr)), ldm, extra}) {
    f.coll_hash = (f.coll_hash ^ v) * 1099511628211ull;
  }
  ++f.coll_count;
}

// Runs one block: all fibers to completion, honouring barriers.
inline void run_block(State& s, int nthreads) {
  for (int t = 0; t < nthreads; ++t) {
    Fiber& f = s.fibers[t];
    f.state = FiberState::kRunnable;
    f.coll_hash = 1469598103934665603ull;
    f.coll_count = 0;
    f.async_open.clear();
    f.async_groups.clear();
    f.tid = dim3(t % s.block_dim.x, (t / s.block_dim.x) % s.block_dim.y, t / (s.block_dim.x * s.block_dim.y));
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = &s.sched;
    makecontext(&f.ctx, fiber_main, 0);
  }
  long phase = 0;
  for (;;) {
    for (int i = 0; i < nthreads; ++i) {
      const int t = (phase % 2 == 0) ? i : nthreads - 1 - i;
      Fiber& f = s.fibers[t];
      if (f.state != FiberState::kRunnable) continue;
      s.current = t;
      s.thread_idx = f.tid;
      swapcontext(&s.sched, &f.ctx);
    }
    s.current = -1;
    // Open the warp barriers every lane of the warp has reached.
    bool released = false;
    for (int w = 0; w * kWarpSize < nthreads; ++w) {
      const int lo = w * kWarpSize, hi = std::min(nthreads, lo + kWarpSize);
      int at = 0;
      for (int t = lo; t < hi; ++t) at += s.fibers[t].state == FiberState::kAtWarpBarrier;
      if (at == 0) continue;
      if (at != hi - lo) {
        fail("__syncwarp() reached by " + std::to_string(at) + " lanes of warp " + std::to_string(w) +
             "; the others returned or wait at __syncthreads()");
        return;
      }
      for (int t = lo; t < hi; ++t) s.fibers[t].state = FiberState::kRunnable;
      released = true;
    }
    if (released) {
      ++phase;
      continue;
    }
    int done = 0, waiting = 0;
    for (int t = 0; t < nthreads; ++t) {
      done += s.fibers[t].state == FiberState::kDone;
      waiting += s.fibers[t].state == FiberState::kAtBarrier;
    }
    if (done == nthreads) break;
    if (done > 0) {
      // Abandon the block: the waiting fibers' stacks hold no resources.
      fail("__syncthreads() reached by " + std::to_string(waiting) + " of " + std::to_string(nthreads) +
           " threads; the others returned (undefined behaviour on hardware)");
      return;
    }
    for (int t = 0; t < nthreads; ++t) s.fibers[t].state = FiberState::kRunnable;
    ++phase;
  }
  for (int t = 0; t < nthreads; ++t) {
    size_t pending = s.fibers[t].async_open.size();
    for (const auto& g : s.fibers[t].async_groups) pending += g.size();
    if (pending != 0) {
      s.current = t;  // names the thread in the message
      fail(std::to_string(pending) + " async copies were never waited for");
      s.current = -1;
      return;
    }
  }
  for (int w = 0; w * kWarpSize < nthreads; ++w) {
    const Fiber& lane0 = s.fibers[w * kWarpSize];
    for (int l = 1; l < kWarpSize && w * kWarpSize + l < nthreads; ++l) {
      const Fiber& f = s.fibers[w * kWarpSize + l];
      if (f.coll_hash != lane0.coll_hash || f.coll_count != lane0.coll_count) {
        fail("warp " + std::to_string(w) + ": lanes 0 and " + std::to_string(l) +
             " issued different sequences of warp-collective (wmma) calls");
        return;
      }
    }
  }
}

// Emulated kernel launch: `body` is the kernel call, run by every thread of
// every block. Throws std::runtime_error with the first error found.
inline void launch(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body) {
  State& s = cur();
  if (s.current != -1) throw std::runtime_error("rk_emu::launch called from inside an emulated kernel");
  const int nthreads = static_cast<int>(block.x * block.y * block.z);
  if (nthreads <= 0 || nthreads > 1024) throw std::runtime_error("rk_emu::launch: bad block size");
  s.grid_dim = grid;
  s.block_dim = block;
  s.body = &body;
  s.error.clear();
  if (static_cast<int>(s.fibers.size()) < nthreads) s.fibers.resize(nthreads);
  for (int t = 0; t < nthreads; ++t) {
    if (s.fibers[t].stack.size() != kFiberStack) s.fibers[t].stack.assign(kFiberStack, 0);
  }
  // 128-byte aligned storage for dynamic shared memory.
  s.smem_storage.assign(smem_bytes + 128, 0);
  const uintptr_t base = reinterpret_cast<uintptr_t>(s.smem_storage.data());
  s.smem = s.smem_storage.data() + ((128 - base % 128) % 128);
  for (unsigned bz = 0; bz < grid.z && s.error.empty(); ++bz)
    for (unsigned by = 0; by < grid.y && s.error.empty(); ++by)
      for (unsigned bx = 0; bx < grid.x && s.error.empty(); ++bx) {
        s.block_idx = dim3(bx, by, bz);
        std::memset(s.smem, 0xFF, smem_bytes);
        run_block(s, nthreads);
      }
  s.body = nullptr;
  if (!s.error.empty()) throw std::runtime_error("emulated kernel error: " + s.error);
}

inline unsigned char* dynamic_smem() { return cur().smem; }

}  // namespace rk_emu

#define threadIdx (::rk_emu::cur().thread_idx)
#define blockIdx (::rk_emu::cur().block_idx)
#define blockDim (::rk_emu::cur().block_dim)
#define gridDim (::rk_emu::cur().grid_dim)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __syncthreads() ::rk_emu::syncthreads()
#define __syncwarp(...) ::rk_emu::syncwarp()

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

template <class T>
struct storage {
  using type = T;
};
template <>
struct storage<precision::tf32> {
  using type = float;
};

template <class Use, int M, int N, int K>
struct tile_dims;
template <int M, int N, int K>
struct tile_dims<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct tile_dims<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct tile_dims<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert((M == 16 && N == 16 && K == 16) || (M == 16 && N == 16 && K == 8 &&
                                                     (std::is_same<T, precision::tf32>::value ||
                                                      std::is_same<Use, accumulator>::value)),
                "emulated wmma supports m16n16k16 (half, bf16) and m16n16k8 (tf32)");
  using element_type = typename storage<T>::type;
  static constexpr int rows = tile_dims<Use, M, N, K>::rows;
  static constexpr int cols = tile_dims<Use, M, N, K>::cols;
  // Every lane holds the whole tile (see the header comment); kernels may
  // only apply the same operation to all num_elements entries.
  static constexpr int num_elements = rows * cols;
  element_type x[rows * cols];
};

inline float __float_to_tf32(float v) {
  // cvt.rna.tf32.f32: round to nearest, ties away from zero, keep 10
  // mantissa bits.
  if (!std::isfinite(v)) return v;
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u = (u + 0x1000u) & 0xFFFFE000u;
  std::memcpy(&v, &u, 4);
  return v;
}

namespace detail {

inline float tf32_truncate(float v) {
  // Tensor cores read only the tf32 bits of an fp32 operand.
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u &= 0xFFFFE000u;
  std::memcpy(&v, &u, 4);
  return v;
}

template <class E>
inline void check_access(const char* what, const void* ptr, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0) {
    ::rk_emu::fail(std::string(what) + ": pointer not 256-bit aligned");
  }
  if ((ldm * sizeof(E)) % 16 != 0) {
    ::rk_emu::fail(std::string(what) + ": ldm=" + std::to_string(ldm) + " is not a multiple of 16 bytes");
  }
}

template <class F>
inline float operand(const F& f, int idx, bool tf32) {
  const float v = static_cast<float>(f.x[idx]);
  return tf32 ? tf32_truncate(v) : v;
}

}  // namespace detail

template <class Use, int M, int N, int K, class T, class Layout, class E>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const E* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  static_assert(!std::is_same<Use, accumulator>::value, "accumulator loads need a layout_t");
  static_assert(std::is_same<E, typename F::element_type>::value, "pointer type must match the fragment");
  detail::check_access<E>("load_matrix_sync", p, ldm);
  constexpr bool col = std::is_same<Layout, col_major>::value;
  ::rk_emu::record_collective(1, p, ldm, col);
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) f.x[r * F::cols + c] = col ? p[c * ldm + r] : p[r * ldm + c];
}

template <int M, int N, int K>
inline void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p, unsigned ldm, layout_t layout) {
  detail::check_access<float>("load_matrix_sync", p, ldm);
  ::rk_emu::record_collective(2, p, ldm, layout);
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) f.x[r * N + c] = layout == mem_col_major ? p[c * ldm + r] : p[r * ldm + c];
}

template <int M, int N, int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm,
                              layout_t layout) {
  detail::check_access<float>("store_matrix_sync", p, ldm);
  ::rk_emu::record_collective(3, p, ldm, layout);
  const int lane = ::rk_emu::lane_id();
  for (int i = 0; i < M * N; ++i) {
    if (::rk_emu::owner_lane(i) != lane) continue;
    const int r = i / N, c = i % N;
    (layout == mem_col_major ? p[c * ldm + r] : p[r * ldm + c]) = f.x[i];
  }
}

template <class Use, int M, int N, int K, class T, class Layout>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, typename fragment<Use, M, N, K, T, Layout>::element_type v) {
  for (auto& e : f.x) e = v;
}

template <int M, int N, int K, class T, class LA, class LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
                     const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  constexpr bool tf32 = std::is_same<T, precision::tf32>::value;
  ::rk_emu::record_collective(4, nullptr, 0, 0);
  const int lane = ::rk_emu::lane_id();
  for (int i = 0; i < M * N; ++i) {
    if (::rk_emu::owner_lane(i) != lane) continue;
    const int r = i / N, col = i % N;
    float acc = c.x[i];
    for (int k = 0; k < K; ++k) {
      acc = std::fma(detail::operand(a, r * K + k, tf32), detail::operand(b, k * N + col, tf32), acc);
    }
    d.x[i] = acc;
  }
}

}  // namespace wmma
}  // namespace nvcuda
