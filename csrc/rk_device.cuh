// The thin layer between the kernel sources and the machine they run on.
//
// Compiled by nvcc (__CUDACC__): the real CUDA headers and inline PTX.
// Compiled by g++ for the CPU emulation build (backend "cuda_emulated"):
// csrc/emulation/cuda_emu.h, which provides the same names. Everything here
// that the emulator cannot model exactly is listed in cuda_emu.h's header
// comment; this file only maps types, the dynamic shared-memory base
// pointer, 16-byte vector copies, cp.async, and the warp-level tensor-core
// instructions (ldmatrix, mma.sync, cvt.rna.tf32) with their per-lane
// register fragments:
//
//   ldmatrix<N, Trans>(r, row)   ldmatrix.sync.aligned.m8n8.xN{.trans}.shared.b16
//   mma_m16n8k16<T>(d, a, b)     d += a @ b, T = half_t or bf16_t, fp32 accumulators
//   mma_m16n8k8_tf32(d, a, b)    d += a @ b on tf32 operands
//   to_tf32(v)                   cvt.rna.tf32.f32
//   warp_any(pred)               __any_sync(0xffffffff, pred): the OR over the warp's 32 lanes
//   count_fma_macs(n)            no-op on the GPU; the emulation counts the
//                                CUDA-core multiply-accumulates with it
//   expect(ok, what)             no-op on the GPU; the emulation reports a broken invariant
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16 / m16n8k8"),
// for lane l, g = l / 4, t = l % 4:
//   m16n8k16 A: a[0] = A[g][2t, 2t+1], a[1] = A[g+8][2t, 2t+1], a[2] = A[g][2t+8, 2t+9],
//               a[3] = A[g+8][2t+8, 2t+9];  B: b[0] = B[2t, 2t+1][g], b[1] = B[2t+8, 2t+9][g]
//   m16n8k8 (tf32) A: a[0] = A[g][t], a[1] = A[g+8][t], a[2] = A[g][t+4], a[3] = A[g+8][t+4];
//               B: b[0] = B[t][g], b[1] = B[t+4][g]
//   C / D (both): d[0] = D[g][2t], d[1] = D[g][2t+1], d[2] = D[g+8][2t], d[3] = D[g+8][2t+1]
// (a pair of 16-bit elements shares a 32-bit register, the lower index in the low half).
#pragma once

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

namespace rk {
using half_t = __half;
using bf16_t = __nv_bfloat16;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// 16-byte copy / zero fill; both addresses must be 16-byte aligned.
__device__ __forceinline__ void copy16(void* dst, const void* src) {
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
}
__device__ __forceinline__ void zero16(void* dst) { *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0); }

// cp.async (sm_80+): a 16-byte global->shared copy that completes when the
// thread waits for its commit group; other threads see it after a barrier.
__device__ __forceinline__ void async_copy16(void* dst_shared, const void* src_global) {
  __pipeline_memcpy_async(dst_shared, src_global, 16);
}
__device__ __forceinline__ void async_commit() { __pipeline_commit(); }
// Waits until at most `n` of this thread's newest commit groups are pending.
__device__ __forceinline__ void async_wait_prior(int n) { __pipeline_wait_prior(n); }

// Small typed loads and stores (the emulation checks their alignment):
// 16-bit pairs packed into 32-bit registers, 8/16-byte vector loads, pairs
// of adjacent elements converted to/from float.
template <class T>
__device__ __forceinline__ uint32_t pack_pair(T lo, T hi) {
  uint16_t a, b;
  memcpy(&a, &lo, 2);
  memcpy(&b, &hi, 2);
  return static_cast<uint32_t>(a) | static_cast<uint32_t>(b) << 16;
}
__device__ __forceinline__ float bits_to_float(uint32_t v) { return __uint_as_float(v); }
template <class T>
__device__ __forceinline__ void load_u32x2(uint32_t (&r)[2], const T* p) {
  const uint2 v = *reinterpret_cast<const uint2*>(p);
  r[0] = v.x;
  r[1] = v.y;
}
template <int N>
__device__ __forceinline__ void load_vec(float (&v)[N], const float* p) {
  if constexpr (N == 4) {
    const float4 q = *reinterpret_cast<const float4*>(p);
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
  } else {
    static_assert(N == 2, "8- or 16-byte vectors");
    const float2 q = *reinterpret_cast<const float2*>(p);
    v[0] = q.x, v[1] = q.y;
  }
}
template <class T>
__device__ __forceinline__ void load_pair(float (&v)[2], const T* p) {
  if constexpr (sizeof(T) == 4) {
    load_vec(v, reinterpret_cast<const float*>(p));
  } else {
    const uint32_t u = *reinterpret_cast<const uint32_t*>(p);
    T a, b;
    const uint16_t lo = u & 0xFFFF, hi = u >> 16;
    memcpy(&a, &lo, 2);
    memcpy(&b, &hi, 2);
    v[0] = to_float(a);
    v[1] = to_float(b);
  }
}
template <class T>
__device__ __forceinline__ void store_pair(T* p, float a, float b) {
  if constexpr (sizeof(T) == 4) {
    *reinterpret_cast<float2*>(p) = make_float2(a, b);
  } else {
    *reinterpret_cast<uint32_t*>(p) = pack_pair(from_float<T>(a), from_float<T>(b));
  }
}

// Base of the block's dynamic shared memory (128-byte aligned).
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(128) unsigned char rk_dynamic_smem_[];
  return rk_dynamic_smem_;
}

template <int N, bool Trans = false>
__device__ __forceinline__ void ldmatrix(uint32_t (&r)[N], const void* row) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (N == 1 && !Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a));
  } else if constexpr (N == 1) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a));
  } else if constexpr (N == 2 && !Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(a));
  } else if constexpr (N == 2) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(a));
  } else if constexpr (!Trans) {
    static_assert(N == 4, "ldmatrix loads 1, 2 or 4 matrices");
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
  } else {
    static_assert(N == 4, "ldmatrix loads 1, 2 or 4 matrices");
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
  }
}

template <class T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    static_assert(std::is_same_v<T, __nv_bfloat16>, "m16n8k16 takes f16 or bf16");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ uint32_t to_tf32(float v) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(v));
  return r;
}

__device__ __forceinline__ bool warp_any(bool pred) { return __any_sync(0xffffffffu, pred); }

__device__ __forceinline__ void count_fma_macs(int) {}

// An invariant of the plan the emulation reports when broken (no check on the GPU).
__device__ __forceinline__ void expect(bool, const char*) {}
}  // namespace rk

#else  // CPU emulation build

#include "emulation/cuda_emu.h"

namespace rk {
using half_t = c10::Half;
using bf16_t = c10::BFloat16;

inline float to_float(float v) { return v; }
inline float to_float(c10::Half v) { return static_cast<float>(v); }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }

// c10's float->Half/BFloat16 conversions round to nearest even, like
// __float2half_rn / __float2bfloat16_rn.
template <class T>
inline T from_float(float v) {
  return static_cast<T>(v);
}

inline unsigned char* dynamic_smem() { return ::rk_emu::dynamic_smem(); }

inline void check_aligned(const void* p, size_t bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) {
    ::rk_emu::fail(std::string(what) + ": address not " + std::to_string(bytes) + "-byte aligned");
  }
}

template <class T>
inline uint32_t pack_pair(T lo, T hi) {
  uint16_t a, b;
  std::memcpy(&a, &lo, 2);
  std::memcpy(&b, &hi, 2);
  return static_cast<uint32_t>(a) | static_cast<uint32_t>(b) << 16;
}
inline float bits_to_float(uint32_t v) {
  float f;
  std::memcpy(&f, &v, 4);
  return f;
}
template <class T>
inline void load_u32x2(uint32_t (&r)[2], const T* p) {
  check_aligned(p, 8, "load_u32x2");
  std::memcpy(r, p, 8);
}
template <int N>
inline void load_vec(float (&v)[N], const float* p) {
  static_assert(N == 2 || N == 4, "8- or 16-byte vectors");
  check_aligned(p, 4 * N, "load_vec");
  std::memcpy(v, p, 4 * N);
}
template <class T>
inline void load_pair(float (&v)[2], const T* p) {
  check_aligned(p, 2 * sizeof(T), "load_pair");
  v[0] = to_float(p[0]);
  v[1] = to_float(p[1]);
}
template <class T>
inline void store_pair(T* p, float a, float b) {
  check_aligned(p, 2 * sizeof(T), "store_pair");
  p[0] = from_float<T>(a);
  p[1] = from_float<T>(b);
}

// A 16-byte vector access faults on hardware unless both addresses are
// 16-byte aligned; the emulator reports that instead.
inline void copy16(void* dst, const void* src) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0) {
    ::rk_emu::fail("copy16: address not 16-byte aligned");
  }
  std::memcpy(dst, src, 16);
}
inline void zero16(void* dst) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0) ::rk_emu::fail("zero16: address not 16-byte aligned");
  std::memset(dst, 0, 16);
}
inline void async_copy16(void* dst_shared, const void* src_global) { ::rk_emu::async_copy16(dst_shared, src_global); }
inline void async_commit() { ::rk_emu::async_commit(); }
inline void async_wait_prior(int n) { ::rk_emu::async_wait_prior(n); }

template <int N, bool Trans = false>
inline void ldmatrix(uint32_t (&r)[N], const void* row) {
  ::rk_emu::ldmatrix(r, N, Trans, row);
}

template <class T>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  static_assert(std::is_same_v<T, half_t> || std::is_same_v<T, bf16_t>, "m16n8k16 takes f16 or bf16");
  ::rk_emu::mma(std::is_same_v<T, half_t> ? ::rk_emu::kMmaF16 : ::rk_emu::kMmaBf16, d, a, b, d);
}

inline void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  ::rk_emu::mma(::rk_emu::kMmaTf32, d, a, b, d);
}

inline uint32_t to_tf32(float v) { return ::rk_emu::cvt_rna_tf32(v); }

inline bool warp_any(bool pred) { return ::rk_emu::warp_any(pred); }

inline void count_fma_macs(int n) { ::rk_emu::count_fma_macs(n); }

// An invariant of the plan the emulation reports when broken (no check on the GPU).
inline void expect(bool ok, const char* what) {
  if (!ok) ::rk_emu::fail(std::string("kernel invariant broken: ") + what);
}

// CUDA's integer min() is a global device function; kernels call it
// unqualified from namespace rk.
inline int min(int a, int b) { return a < b ? a : b; }
}  // namespace rk

#endif
