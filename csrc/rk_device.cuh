// The thin layer between the kernel sources and the machine they run on.
//
// Compiled by nvcc (__CUDACC__): the real CUDA headers. Compiled by g++ for
// the CPU emulation build (backend "cuda_emulated"): csrc/emulation/cuda_emu.h,
// which provides the same names. Everything here that the emulator cannot
// model exactly is listed in cuda_emu.h's header comment; this file only
// maps types, the dynamic shared-memory base pointer, 16-byte vector copies
// and cp.async.
#pragma once

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <mma.h>

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

// Base of the block's dynamic shared memory (128-byte aligned).
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(128) unsigned char rk_dynamic_smem_[];
  return rk_dynamic_smem_;
}
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

// CUDA's integer min() is a global device function; kernels call it
// unqualified from namespace rk.
inline int min(int a, int b) { return a < b ? a : b; }
}  // namespace rk

#endif
