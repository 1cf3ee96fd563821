// CPU emulation of the CUDA subset used by the fused-block kernels.
//
// The kernel sources (csrc/*.cuh) compile with g++ against this header when
// __CUDACC__ is not defined (see csrc/rk_device.cuh). What is emulated:
//
//  * Launch: blocks run one after another on the calling OS thread; the
//    threads of a block run as fibers (cuda_emu.cpp: a few instructions of
//    assembly per switch on x86-64, ucontext elsewhere), so __syncthreads()
//    keeps its meaning: a fiber runs until it reaches a barrier or returns,
//    and the barrier opens when every thread of the block waits at it. Fibers
//    run in forward order in even barrier phases and reverse order in odd
//    ones, so a read of shared memory written by another thread in the same
//    phase (a missing barrier) sees poison or stale data in at least one
//    ordering. A block stops at the first error it reports.
//  * __syncwarp(): a barrier of the 32 lanes of a warp (full mask only).
//  * __any_sync(0xffffffff, pred) (rk::warp_any): every lane of the warp
//    gets the OR of all 32 lanes' predicates (full mask only).
//  * Warp-level tensor-core instructions, per lane and per register exactly
//    as the PTX ISA lays out their fragments (section "Warp-level matrix
//    instructions"): ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{,.trans}.shared.b16,
//    mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 and
//    mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 (the tf32 operands'
//    low 13 bits ignored, as by the hardware), and cvt.rna.tf32.f32. Each
//    is a warp collective: every lane deposits its registers (or its row
//    address), waits until all 32 lanes have arrived at the same
//    instruction with the same shape, and then reads back its own result
//    registers, computed from the other lanes' deposits by the documented
//    layouts. So a kernel that puts a value in the wrong register or lane
//    gets a wrong product, exactly as on hardware. Checked: all 32 lanes
//    present, the same instruction in every lane, ldmatrix row addresses
//    16-byte aligned and inside the block's shared memory. The executed
//    MMA multiply-accumulates are counted per launch (mma_macs()), together
//    with those the kernel reports through count_fma_macs() for its
//    CUDA-core path.
//  * A barrier reached by only some threads (others returned or wait at a
//    different barrier) is reported as an error: on hardware it is undefined
//    behaviour or a deadlock.
//  * Asynchronous copies (cp.async via rk::async_copy16 / async_commit /
//    async_wait_prior): a copy lands in shared memory only when the thread
//    waits for its commit group, so reading before the wait (plus a barrier
//    for other threads' copies) sees poison. Copies never waited for, and
//    destinations outside the block's shared memory, are reported.
//  * Dynamic shared memory: one buffer per block, filled with 0xFF bytes
//    (NaN in fp32/fp16/bf16) before the block starts, so uninitialised reads
//    show up as NaN; a 4 KiB guard zone after it must keep its pattern
//    (writes past the end are reported).
//
// Not modelled (keep kernel code that depends on it out of the emulated
// source, or review it separately): the memory model between warps beyond
// barrier ordering, register limits and __launch_bounds__, bank conflicts,
// the hardware's summation order inside mma (here: fp32 FMA in k order) and
// its handling of denormals, and the per-block shared-memory limit (the
// host code checks its plan against the limit it is given).
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
constexpr size_t kSmemGuard = 4096;          // guard zone after the dynamic shared memory
constexpr unsigned char kGuardByte = 0xA5;

// A fiber's saved machine context (cuda_emu.cpp).
struct FiberContext {
  void* sp = nullptr;  // x86-64: the stack pointer saved by the switch
  ucontext_t uc;       // elsewhere
};
// Prepares c to start running entry() (which must never return) on the given stack.
void context_start(FiberContext& c, char* stack, size_t size, void (*entry)());
// Saves the running context in `from` and resumes `to`.
void context_switch(FiberContext& from, FiberContext& to);

enum class FiberState { kRunnable, kAtBarrier, kAtWarpBarrier, kDone };

// Warp-collective operations (the kind a lane waits at; 0 is __syncwarp).
enum Collective : int { kSyncwarp = 0, kLdmatrix = 1, kMmaF16 = 2, kMmaBf16 = 3, kMmaTf32 = 4, kVoteAny = 5 };

inline const char* collective_name(int kind) {
  switch (kind) {
    case kSyncwarp: return "__syncwarp()";
    case kLdmatrix: return "ldmatrix";
    case kMmaF16: return "mma.m16n8k16.f16";
    case kMmaBf16: return "mma.m16n8k16.bf16";
    case kMmaTf32: return "mma.m16n8k8.tf32";
    case kVoteAny: return "__any_sync";
  }
  return "?";
}

struct Fiber {
  FiberContext ctx;
  std::vector<char> stack;
  FiberState state = FiberState::kRunnable;
  int warp_wait = kSyncwarp;  // what the fiber waits at when kAtWarpBarrier
  dim3 tid;
  // Pending 16-byte async copies (dst, src): the open group and the
  // committed groups, oldest first.
  std::vector<std::pair<void*, const void*>> async_open;
  std::vector<std::vector<std::pair<void*, const void*>>> async_groups;
};

// The operands of one warp-collective instruction, deposited lane by lane,
// and its per-lane results, written when the last lane arrives.
struct WarpExchange {
  int kind = kSyncwarp;
  int shape = 0;  // ldmatrix: matrices | trans << 4
  int arrived = 0;
  const void* addr[kWarpSize];
  uint32_t a[kWarpSize][4];
  uint32_t b[kWarpSize][2];
  float c[kWarpSize][4];
  uint32_t r[kWarpSize][4];
  float d[kWarpSize][4];
};

// Per-OS-thread emulator state: the launch in progress.
struct State {
  dim3 grid_dim, block_dim, block_idx, thread_idx;
  std::vector<Fiber> fibers;
  std::vector<WarpExchange> exchange;  // one per warp
  int current = -1;  // index of the running fiber, -1 in the scheduler
  FiberContext sched;
  const std::function<void()>* body = nullptr;
  std::vector<unsigned char> smem_storage;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  uint64_t mma_macs = 0;  // multiply-accumulates of the launch's mma / counted FMA work
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

// The multiply-accumulates executed by the last launch (see header comment).
inline uint64_t mma_macs() { return cur().mma_macs; }

// Counts n multiply-accumulates done by the running thread on CUDA cores.
inline void count_fma_macs(int n) { cur().mma_macs += n; }

inline void yield_to_scheduler() {
  State& s = cur();
  context_switch(s.fibers[s.current].ctx, s.sched);
}

inline void fiber_main() {
  State& s = cur();
  (*s.body)();
  s.fibers[s.current].state = FiberState::kDone;
  yield_to_scheduler();  // never resumed
  std::abort();
}

inline void syncthreads() {
  State& s = cur();
  s.fibers[s.current].state = FiberState::kAtBarrier;
  yield_to_scheduler();
}

inline void syncwarp() {
  State& s = cur();
  Fiber& f = s.fibers[s.current];
  f.state = FiberState::kAtWarpBarrier;
  f.warp_wait = kSyncwarp;
  yield_to_scheduler();
}

inline bool in_shared(const void* p, size_t bytes);

inline void async_copy16(void* dst, const void* src) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0) {
    fail("async_copy16: address not 16-byte aligned");
  }
  if (!in_shared(dst, 16)) fail("async_copy16: the destination is not in the block's shared memory");
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

// ---------------------------------------------------------------------------
// Warp collectives. A lane calls begin_collective, deposits its operands in
// the returned exchange and calls end_collective, which computes every
// lane's result once the 32nd lane has arrived and then waits (like
// __syncwarp) until the warp is released; the lane then reads its result.
// The results of one instruction stay in place until all 32 lanes have
// arrived at the next one, by which time each has read its own.

inline WarpExchange& begin_collective(int kind, int shape) {
  State& s = cur();
  const int warp = linear_tid() / kWarpSize;
  const int nthreads = static_cast<int>(s.block_dim.x * s.block_dim.y * s.block_dim.z);
  if ((warp + 1) * kWarpSize > nthreads) {
    fail(std::string(collective_name(kind)) + " needs all 32 lanes of the warp; the block has " +
         std::to_string(nthreads) + " threads");
  }
  WarpExchange& x = s.exchange[warp];
  if (x.arrived == 0) {
    x.kind = kind;
    x.shape = shape;
  } else if (x.kind != kind || x.shape != shape) {
    fail("warp " + std::to_string(warp) + ": lanes issued different warp-collective instructions (" +
         collective_name(x.kind) + " shape " + std::to_string(x.shape) + " vs " + collective_name(kind) +
         " shape " + std::to_string(shape) + ")");
  }
  return x;
}

template <class Compute>
inline void end_collective(WarpExchange& x, Compute compute) {
  State& s = cur();
  if (++x.arrived == kWarpSize) {
    compute();
    x.arrived = 0;
  }
  Fiber& f = s.fibers[s.current];
  f.state = FiberState::kAtWarpBarrier;
  f.warp_wait = x.kind;
  yield_to_scheduler();
}

inline bool in_shared(const void* p, size_t bytes) {
  const State& s = cur();
  const unsigned char* c = static_cast<const unsigned char*>(p);
  return c >= s.smem && c + bytes <= s.smem + s.smem_bytes;
}

// ldmatrix.sync.aligned.m8n8.x{num}{.trans}.shared.b16: lanes 8i..8i+7
// give the addresses of rows 0..7 of matrix i (16 bytes each); lane l
// receives in r[i] the two b16 elements (row l/4, columns 2(l%4), 2(l%4)+1)
// of matrix i, or with .trans the elements (rows 2(l%4), 2(l%4)+1, column
// l/4), the lower-indexed one in the low half.
inline void ldmatrix(uint32_t* r, int num, bool trans, const void* row_addr) {
  const int lane = lane_id();
  WarpExchange& x = begin_collective(kLdmatrix, num | (trans ? 16 : 0));
  x.addr[lane] = row_addr;
  end_collective(x, [&x, num, trans]() {
    for (int l = 0; l < num * 8; ++l) {
      if (reinterpret_cast<uintptr_t>(x.addr[l]) % 16 != 0) {
        fail("ldmatrix: the row address of lane " + std::to_string(l) + " is not 16-byte aligned");
        return;
      }
      if (!in_shared(x.addr[l], 16)) {
        fail("ldmatrix: the row address of lane " + std::to_string(l) + " is not in the block's shared memory");
        return;
      }
    }
    auto elem = [&x](int i, int row, int col) {
      uint16_t v;
      std::memcpy(&v, static_cast<const unsigned char*>(x.addr[8 * i + row]) + 2 * col, 2);
      return static_cast<uint32_t>(v);
    };
    for (int l = 0; l < kWarpSize; ++l) {
      for (int i = 0; i < num; ++i) {
        x.r[l][i] = trans ? elem(i, 2 * (l % 4), l / 4) | elem(i, 2 * (l % 4) + 1, l / 4) << 16
                          : elem(i, l / 4, 2 * (l % 4)) | elem(i, l / 4, 2 * (l % 4) + 1) << 16;
      }
    }
  });
  for (int i = 0; i < num; ++i) r[i] = x.r[lane][i];
}

inline float tf32_truncate(float v) {
  // Tensor cores read only the tf32 bits of an fp32 operand.
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u &= 0xFFFFE000u;
  std::memcpy(&v, &u, 4);
  return v;
}

// cvt.rna.tf32.f32: round to nearest, ties away from zero, to 10 mantissa
// bits (the result is an fp32 bit pattern with the low 13 bits zero).
inline uint32_t cvt_rna_tf32(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if (!std::isfinite(v)) return u;
  return (u + 0x1000u) & 0xFFFFE000u;
}

inline float half_bits(uint32_t reg, int hi, int kind) {
  const uint16_t bits = static_cast<uint16_t>(hi ? reg >> 16 : reg);
  if (kind == kMmaF16) return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
  return static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits()));
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 (kind
// kMmaF16 / kMmaBf16) or m16n8k8.row.col.f32.tf32.tf32.f32 (kMmaTf32):
// d = a @ b + c with, for lane l (g = l/4, t = l%4), the PTX ISA's fragments
//   m16n8k16: a[0] = A[g][2t..2t+1]  a[1] = A[g+8][2t..]  a[2] = A[g][2t+8..]  a[3] = A[g+8][2t+8..]
//             b[0] = B[2t..2t+1][g]  b[1] = B[2t+8..2t+9][g]      (pairs: lower k in the low half)
//   m16n8k8:  a[0] = A[g][t]  a[1] = A[g+8][t]  a[2] = A[g][t+4]  a[3] = A[g+8][t+4]
//             b[0] = B[t][g]  b[1] = B[t+4][g]
//   c, d:     [0] = C[g][2t]  [1] = C[g][2t+1]  [2] = C[g+8][2t]  [3] = C[g+8][2t+1]
// Sums in fp32 FMA in k order.
inline void mma(int kind, float* d, const uint32_t* a, const uint32_t* b, const float* c) {
  const int lane = lane_id();
  WarpExchange& x = begin_collective(kind, 0);
  for (int i = 0; i < 4; ++i) x.a[lane][i] = a[i];
  for (int i = 0; i < 2; ++i) x.b[lane][i] = b[i];
  for (int i = 0; i < 4; ++i) x.c[lane][i] = c[i];
  end_collective(x, [&x, kind]() {
    const bool tf32 = kind == kMmaTf32;
    const int K = tf32 ? 8 : 16;
    auto A = [&](int r, int k) {
      if (tf32) {
        float v;
        std::memcpy(&v, &x.a[(r % 8) * 4 + k % 4][r / 8 + 2 * (k / 4)], 4);
        return tf32_truncate(v);
      }
      return half_bits(x.a[(r % 8) * 4 + (k % 8) / 2][r / 8 + 2 * (k / 8)], k % 2, kind);
    };
    auto B = [&](int k, int n) {
      if (tf32) {
        float v;
        std::memcpy(&v, &x.b[n * 4 + k % 4][k / 4], 4);
        return tf32_truncate(v);
      }
      return half_bits(x.b[n * 4 + (k % 8) / 2][k / 8], k % 2, kind);
    };
    for (int l = 0; l < kWarpSize; ++l) {
      for (int i = 0; i < 4; ++i) {
        const int r = l / 4 + 8 * (i / 2), n = 2 * (l % 4) + i % 2;
        float acc = x.c[(r % 8) * 4 + n / 2][(r / 8) * 2 + n % 2];
        for (int k = 0; k < K; ++k) acc = std::fma(A(r, k), B(k, n), acc);
        x.d[l][i] = acc;
      }
    }
    cur().mma_macs += 16 * 8 * K;
  });
  for (int i = 0; i < 4; ++i) d[i] = x.d[lane][i];
}

// __any_sync(0xffffffff, pred): the OR of the 32 lanes' predicates, in every lane.
inline bool warp_any(bool pred) {
  const int lane = lane_id();
  WarpExchange& x = begin_collective(kVoteAny, 0);
  x.r[lane][0] = pred ? 1u : 0u;
  end_collective(x, [&x]() {
    uint32_t any = 0;
    for (int l = 0; l < kWarpSize; ++l) any |= x.r[l][0];
    for (int l = 0; l < kWarpSize; ++l) x.r[l][1] = any;
  });
  return x.r[lane][1] != 0;
}

// Runs one block: all fibers to completion, honouring barriers; stops at
// the first error.
inline void run_block(State& s, int nthreads) {
  for (auto& x : s.exchange) x.arrived = 0;
  for (int t = 0; t < nthreads; ++t) {
    Fiber& f = s.fibers[t];
    f.state = FiberState::kRunnable;
    f.async_open.clear();
    f.async_groups.clear();
    f.tid = dim3(t % s.block_dim.x, (t / s.block_dim.x) % s.block_dim.y, t / (s.block_dim.x * s.block_dim.y));
    context_start(f.ctx, f.stack.data(), f.stack.size(), fiber_main);
  }
  long phase = 0;
  for (;;) {
    for (int i = 0; i < nthreads; ++i) {
      const int t = (phase % 2 == 0) ? i : nthreads - 1 - i;
      Fiber& f = s.fibers[t];
      if (f.state != FiberState::kRunnable) continue;
      s.current = t;
      s.thread_idx = f.tid;
      context_switch(s.sched, f.ctx);
    }
    s.current = -1;
    if (!s.error.empty()) return;  // abandon the block: its fibers hold no resources
    // Open the warp barriers every lane of the warp has reached.
    bool released = false;
    for (int w = 0; w * kWarpSize < nthreads; ++w) {
      const int lo = w * kWarpSize, hi = std::min(nthreads, lo + kWarpSize);
      int at = 0;
      for (int t = lo; t < hi; ++t) at += s.fibers[t].state == FiberState::kAtWarpBarrier;
      if (at == 0) continue;
      int kind = -1;
      for (int t = lo; t < hi; ++t) {
        if (s.fibers[t].state == FiberState::kAtWarpBarrier) kind = s.fibers[t].warp_wait;
      }
      if (at != hi - lo) {
        fail(std::string(collective_name(kind)) + " reached by " + std::to_string(at) + " lanes of warp " +
             std::to_string(w) + "; the others returned or wait at __syncthreads()");
        return;
      }
      for (int t = lo; t < hi; ++t) {
        if (s.fibers[t].warp_wait != kind) {
          fail("warp " + std::to_string(w) + ": lanes wait at different warp-level operations (" +
               collective_name(kind) + ", " + collective_name(s.fibers[t].warp_wait) + ")");
          return;
        }
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
  s.mma_macs = 0;
  if (static_cast<int>(s.fibers.size()) < nthreads) s.fibers.resize(nthreads);
  s.exchange.resize((nthreads + kWarpSize - 1) / kWarpSize);
  for (int t = 0; t < nthreads; ++t) {
    if (s.fibers[t].stack.size() != kFiberStack) s.fibers[t].stack.assign(kFiberStack, 0);
  }
  // 128-byte aligned storage for dynamic shared memory, followed by a guard
  // zone whose pattern must survive the block (a write past the block's
  // shared memory is reported).
  s.smem_storage.assign(smem_bytes + 128 + kSmemGuard, 0);
  const uintptr_t base = reinterpret_cast<uintptr_t>(s.smem_storage.data());
  s.smem = s.smem_storage.data() + ((128 - base % 128) % 128);
  s.smem_bytes = smem_bytes;
  for (unsigned bz = 0; bz < grid.z && s.error.empty(); ++bz)
    for (unsigned by = 0; by < grid.y && s.error.empty(); ++by)
      for (unsigned bx = 0; bx < grid.x && s.error.empty(); ++bx) {
        s.block_idx = dim3(bx, by, bz);
        std::memset(s.smem, 0xFF, smem_bytes);
        std::memset(s.smem + smem_bytes, kGuardByte, kSmemGuard);
        run_block(s, nthreads);
        for (size_t i = 0; i < kSmemGuard && s.error.empty(); ++i) {
          if (s.smem[smem_bytes + i] != kGuardByte) {
            fail("wrote past the block's " + std::to_string(smem_bytes) + " bytes of shared memory (at byte " +
                 std::to_string(smem_bytes + i) + ")");
          }
        }
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
