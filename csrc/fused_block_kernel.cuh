// The fused ResNeXt bottleneck inference kernel (one launch per block).
//
// Compiled by nvcc for the GPU (csrc/fused_block_cuda.cu) and by g++ for the
// CPU emulation build (csrc/emulation/fused_block_emu.cpp); rk_device.cuh
// selects the machine. Algorithm and memory plan: docs/cuda_backend.md.
#pragma once

#include "fused_block_params.h"
#include "rk_device.cuh"

namespace rk {

// ---------------------------------------------------------------------------
// Warp-level 16x16 tile products. Each policy provides:
//   Elem          element type of A/B operands in memory
//   kK            K depth of one MMA step (16, or 8 for tf32)
//   Acc           a 16x16 fp32 accumulator held by the warp
//   FragA, FragB  operand tiles: A [16 x kK], B [kK x 16], row-major in memory
//   zero(acc), load_acc(acc, p, ld), store_acc(p, ld, acc)   row-major fp32
//   load_a(a, p, ld), load_b(b, p, ld), mma(acc, a, b): acc += a * b
// All 32 lanes of a warp call every one of them with the same arguments.
// ---------------------------------------------------------------------------

namespace wmma = nvcuda::wmma;

template <class T>
struct WmmaPolicy16 {  // fp16 / bf16 tensor cores, fp32 accumulation
  using Elem = T;
  static constexpr int kK = 16;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
  static __device__ __forceinline__ void zero(Acc& a) { wmma::fill_fragment(a, 0.0f); }
  static __device__ __forceinline__ void load_acc(Acc& a, const float* p, int ld) {
    wmma::load_matrix_sync(a, p, ld, wmma::mem_row_major);
  }
  static __device__ __forceinline__ void store_acc(float* p, int ld, const Acc& a) {
    wmma::store_matrix_sync(p, a, ld, wmma::mem_row_major);
  }
  static __device__ __forceinline__ void load_a(FragA& a, const T* p, int ld) { wmma::load_matrix_sync(a, p, ld); }
  static __device__ __forceinline__ void load_b(FragB& b, const T* p, int ld) { wmma::load_matrix_sync(b, p, ld); }
  static __device__ __forceinline__ void mma(Acc& acc, const FragA& a, const FragB& b) {
    wmma::mma_sync(acc, a, b, acc);
  }
};

struct Tf32Policy {  // fp32 data on TF32 tensor cores (allow_tf32)
  using Elem = float;
  static constexpr int kK = 8;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  static __device__ __forceinline__ void zero(Acc& a) { wmma::fill_fragment(a, 0.0f); }
  static __device__ __forceinline__ void load_acc(Acc& a, const float* p, int ld) {
    wmma::load_matrix_sync(a, p, ld, wmma::mem_row_major);
  }
  static __device__ __forceinline__ void store_acc(float* p, int ld, const Acc& a) {
    wmma::store_matrix_sync(p, a, ld, wmma::mem_row_major);
  }
  // The programming guide requires tf32 operands to be converted after loading.
  static __device__ __forceinline__ void load_a(FragA& a, const float* p, int ld) {
    wmma::load_matrix_sync(a, p, ld);
    for (int i = 0; i < a.num_elements; ++i) a.x[i] = wmma::__float_to_tf32(a.x[i]);
  }
  static __device__ __forceinline__ void load_b(FragB& b, const float* p, int ld) {
    wmma::load_matrix_sync(b, p, ld);
    for (int i = 0; i < b.num_elements; ++i) b.x[i] = wmma::__float_to_tf32(b.x[i]);
  }
  static __device__ __forceinline__ void mma(Acc& acc, const FragA& a, const FragB& b) {
    wmma::mma_sync(acc, a, b, acc);
  }
};

struct Fp32FmaPolicy {  // full fp32 (allow_tf32 off): plain FMA on CUDA cores
  using Elem = float;
  static constexpr int kK = 16;
  // Lane l owns row l/2, columns (l%2)*8 .. +8 of the 16x16 tile. Operand
  // "fragments" only remember where the tile is; mma reads it from memory.
  struct Acc {
    float v[8];
  };
  struct FragA {
    const float* p;
    int ld;
  };
  using FragB = FragA;
  static __device__ __forceinline__ int row() { return (threadIdx.x & 31) >> 1; }
  static __device__ __forceinline__ int col0() { return (threadIdx.x & 1) * 8; }
  static __device__ __forceinline__ void zero(Acc& a) {
    for (int j = 0; j < 8; ++j) a.v[j] = 0.0f;
  }
  static __device__ __forceinline__ void load_acc(Acc& a, const float* p, int ld) {
    for (int j = 0; j < 8; ++j) a.v[j] = p[row() * ld + col0() + j];
  }
  static __device__ __forceinline__ void store_acc(float* p, int ld, const Acc& a) {
    for (int j = 0; j < 8; ++j) p[row() * ld + col0() + j] = a.v[j];
  }
  static __device__ __forceinline__ void load_a(FragA& a, const float* p, int ld) { a = FragA{p, ld}; }
  static __device__ __forceinline__ void load_b(FragB& b, const float* p, int ld) { b = FragB{p, ld}; }
  static __device__ __forceinline__ void mma(Acc& acc, const FragA& a, const FragB& b) {
    const float* a_row = a.p + row() * a.ld;
    const float* b_col = b.p + col0();
    // Partial unroll: full unrolling lets the compiler hoist all 128 B values
    // of a strip's shared B tile into registers and spill.
#pragma unroll 4
    for (int k = 0; k < 16; ++k) {
      const float av = a_row[k];
      for (int j = 0; j < 8; ++j) acc.v[j] = fmaf(av, b_col[k * b.ld + j], acc.v[j]);
    }
  }
};

// Column strips: the MMA phases after conv1 give each warp jobs of one
// 16-column tile `nt` x a group of up to kMaxAcc consecutive 16-row tiles,
// so a B fragment (weights, read from global memory) is loaded once per k
// step and reused across the rows. Rows are split into groups only as far as
// needed to give every warp a job.
struct StripJobs {
  int cols, groups, rows_per_group;
  __device__ __forceinline__ StripJobs(int cols_, int rows) : cols(cols_) {
    groups = min(rows, (kWarps + cols - 1) / cols);
    rows_per_group = (rows + groups - 1) / groups;  // <= rows <= TH <= kMaxAcc
  }
  __device__ __forceinline__ int count() const { return cols * groups; }
};

// acc[r] += A(r) @ B over K (a multiple of 16) for the strip's rows
// r < nrows: a_at(r, k) / b_at(k) give the row-major [16 x kK] / [kK x 16]
// operand tiles at K offset k.
template <class P, class AAt, class BAt>
__device__ __forceinline__ void strip_mma(typename P::Acc (&acc)[kMaxAcc], int nrows, int K, int lda, int ldb,
                                          AAt a_at, BAt b_at) {
  for (int k = 0; k < K; k += P::kK) {
    typename P::FragB b;
    P::load_b(b, b_at(k), ldb);
#pragma unroll
    for (int r = 0; r < kMaxAcc; ++r) {
      if (r < nrows) {
        typename P::FragA a;
        P::load_a(a, a_at(r, k), lda);
        P::mma(acc[r], a, b);
      }
    }
  }
}

// yacc[rows*16][cols*16] (fp32 shared, pitch ldy) += A @ B over K, in
// column strips: a_at(r, k) is the A tile of 16-row tile r, b_at(nt, k) the
// B tile of column tile nt.
template <class P, class AAt, class BAt>
__device__ __forceinline__ void accumulate_y(float* ys, int ldy, int rows, int cols, int warp, int K, int lda,
                                             int ldb, AAt a_at, BAt b_at) {
  const StripJobs sj(cols, rows);
  for (int job = warp; job < sj.count(); job += kWarps) {
    const int nt = job % sj.cols;
    const int r0 = (job / sj.cols) * sj.rows_per_group;
    const int nrows = min(sj.rows_per_group, rows - r0);
    typename P::Acc acc[kMaxAcc];
#pragma unroll
    for (int r = 0; r < kMaxAcc; ++r) {
      if (r < nrows) P::load_acc(acc[r], ys + (r0 + r) * 16 * ldy + nt * 16, ldy);
    }
    strip_mma<P>(
        acc, nrows, K, lda, ldb, [&](int r, int k) { return a_at(r0 + r, k); }, [&](int k) { return b_at(nt, k); });
#pragma unroll
    for (int r = 0; r < kMaxAcc; ++r) {
      if (r < nrows) P::store_acc(ys + (r0 + r) * 16 * ldy + nt * 16, ldy, acc[r]);
    }
  }
}

// Copies channels [k0, k0+kc) of `rows` pixels of x into dst (row pitch
// `pitch` elements). row_src(r) is the element offset of pixel r's channel 0
// in x, or -1 for a zero row (outside the image or the tile); channels at or
// past cin are zero.
// Vector copies go through cp.async: the caller commits and waits.
template <class T, class RowSrc>
__device__ __forceinline__ void stage_x(T* dst, int pitch, int rows, int kc, int k0, int cin, bool vec,
                                        const T* __restrict__ x, RowSrc row_src) {
  if (vec) {
    // Rows are walked in steps of kMaxKC channels (a compile-time count of
    // vectors, so no division by a runtime value); vectors past kc skip.
    constexpr int kVec = 16 / sizeof(T);
    constexpr int kRowVec = kMaxKC / kVec;
    for (int i = threadIdx.x; i < rows * kRowVec; i += kThreads) {
      const int r = i / kRowVec, c = (i % kRowVec) * kVec;
      if (c >= kc) continue;
      const long long src = row_src(r);
      T* d = dst + r * pitch + c;
      if (src >= 0 && k0 + c < cin) {  // cin is a multiple of kVec here
        async_copy16(d, x + src + k0 + c);
      } else {
        zero16(d);
      }
    }
  } else {
    for (int i = threadIdx.x; i < rows * kc; i += kThreads) {
      const int r = i / kc, c = i - r * kc;
      const long long src = row_src(r);
      dst[r * pitch + c] = (src >= 0 && k0 + c < cin) ? x[src + k0 + c] : from_float<T>(0.0f);
    }
  }
}

// Streams channels of `rows` pixels of x through the x chunk buffers in KC
// chunks: chunk kci goes to buffer kci % nbuf, and with two buffers chunk
// kci+1 is in flight (cp.async) while body(kci, k0, kc, chunk) multiplies
// chunk kci. row_src as for stage_x. Every thread calls it (it holds
// barriers); the first barrier also orders it after earlier readers of the
// buffers (t2s aliases them).
template <class T, class RowSrc, class Body>
__device__ __forceinline__ void stream_x(T* xs, const FusedBlockParams& p, int rows, const T* __restrict__ x,
                                         RowSrc row_src, Body body) {
  const int nk = (p.Cin_p + p.KC - 1) / p.KC;
  auto stage = [&](int kci) {
    const int k0 = kci * p.KC;
    stage_x(xs + (kci % p.nbuf) * p.xs_buf, p.pitch_xs, rows, min(p.KC, p.Cin_p - k0), k0, p.Cin, p.vec_x,
                  x, row_src);
  };
  __syncthreads();
  stage(0);
  async_commit();
  for (int kci = 0; kci < nk; ++kci) {
    const int k0 = kci * p.KC;
    if (p.nbuf == 2 && kci + 1 < nk) stage(kci + 1);
    async_commit();  // possibly empty: keeps "all but the newest group" = chunk kci
    async_wait_prior(1);
    __syncthreads();  // every thread's part of chunk kci has landed
    body(kci, k0, min(p.KC, p.Cin_p - k0), static_cast<const T*>(xs + (kci % p.nbuf) * p.xs_buf));
    __syncthreads();  // this buffer is refilled next (one buffer) or after next (two)
    if (p.nbuf == 1 && kci + 1 < nk) {
      stage(kci + 1);
      async_commit();
    }
  }
}

// ---------------------------------------------------------------------------
// The kernel. Grid: (N*tiles_y*tiles_x, ceil(Cout_p/CS)); block: kThreads.
// Per block, for each width chunk [w0, w0+WC):
//   1. conv1 over the halo, x streamed through xs in KC-channel chunks
//      (stream_x: double-buffered with cp.async when shared memory allows); the
//      16x16 output tiles (halo px x chunk channels) are spread over the
//      warps, at most kMaxAcc register accumulators per warp and pass (more
//      tiles take more passes, each re-streaming x).
//   2. t1s = relu(conv1 + b1) for halo pixels inside the image, else 0
//      (the 3x3 conv's zero padding applies to t1), written by each warp
//      from its accumulators through a per-warp 16x16 fp32 scratch tile.
//   3. grouped 3x3 over t1s (9 taps x KT K tiles), 4. t2s = relu(. + b2) the
//      same way; t2s aliases xs.
//   5. yacc[out px][CS] (fp32, shared) += t2s @ w3p[chunk, slice].
//   Phases 3 and 5 and the projection run in column strips (StripJobs).
// then yacc += x_strided @ wdp (projection), and
//   y = relu(yacc + b3p + (identity ? x : 0)), written once.
// ---------------------------------------------------------------------------
template <class P>
__global__ void __launch_bounds__(kThreads, 1) fused_block_kernel(const FusedBlockParams p) {
  using T = typename P::Elem;
  using Acc = typename P::Acc;
  unsigned char* smem = dynamic_smem();
  T* xs = reinterpret_cast<T*>(smem + p.off_xs);
  T* t2s = xs;
  T* t1s = reinterpret_cast<T*>(smem + p.off_t1);
  float* ys = reinterpret_cast<float*>(smem + p.off_y);

  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  float* scratch = reinterpret_cast<float*>(smem + p.off_scratch) + warp * 256;  // this warp's 16x16 tile
  const int tiles = p.tiles_y * p.tiles_x;
  const int n = blockIdx.x / tiles;
  const int oy0 = (blockIdx.x % tiles / p.tiles_x) * p.TH;
  const int ox0 = (blockIdx.x % p.tiles_x) * kTileW;
  const int cs0 = blockIdx.y * p.CS;
  const int cs_len = min(p.CS, p.Cout_p - cs0);
  const int s = p.stride, dil = p.dil;
  const int iy0 = oy0 * s - dil, ix0 = ox0 * s - dil;  // input coords of halo (0, 0)
  const T* __restrict__ x = static_cast<const T*>(p.x) + static_cast<size_t>(n) * p.H * p.W * p.Cin;
  const T* __restrict__ w1p = static_cast<const T*>(p.w1p);
  const T* __restrict__ w2p = static_cast<const T*>(p.w2p);
  const T* __restrict__ w3p = static_cast<const T*>(p.w3p);
  const T* __restrict__ wdp = static_cast<const T*>(p.wdp);
  const int wc16 = p.WC / 16;
  const int cs16 = cs_len / 16;
  // Output rows of the tile that exist (the tile may overhang the image).
  const int th_valid = min(p.TH, p.Ho - oy0);
  const int jobs1 = (p.Mp1 / 16) * wc16;  // conv1 output tiles per chunk

  for (int i = tid; i < p.Mo * cs_len; i += kThreads) ys[(i / cs_len) * p.pitch_y + i % cs_len] = 0.0f;

  for (int w0 = 0; w0 < p.Wp; w0 += p.WC) {
    // ---- 1 + 2. conv1 (+ b1, ReLU, zero outside the image) -> t1s ----
    for (int pass0 = 0; pass0 < jobs1; pass0 += kWarps * kMaxAcc) {
      Acc acc[kMaxAcc];
      stream_x(
          xs, p, p.Mp1, x,
          [&](int px) -> long long {
            const int iy = iy0 + px / p.HWp, ix = ix0 + px % p.HWp;
            if (px >= p.P1 || iy < 0 || iy >= p.H || ix < 0 || ix >= p.W) return -1;
            return (static_cast<long long>(iy) * p.W + ix) * p.Cin;
          },
          [&](int kci, int k0, int kc, const T* xcur) {
            // k outer, tiles inner: a warp's tiles (warp + i*kWarps) share one
            // column tile when wc16 divides kWarps, so B is loaded once per k.
            for (int kk = 0; kk < kc; kk += P::kK) {
              typename P::FragB b;
              int b_nt = -1;
#pragma unroll
              for (int i = 0; i < kMaxAcc; ++i) {
                const int job = pass0 + warp + i * kWarps;
                if (job < jobs1) {
                  const int mt = job / wc16, nt = job % wc16;
                  if (kci == 0 && kk == 0) P::zero(acc[i]);
                  if (nt != b_nt) {
                    P::load_b(b, w1p + static_cast<size_t>(k0 + kk) * p.Wp + w0 + nt * 16, p.Wp);
                    b_nt = nt;
                  }
                  typename P::FragA a;
                  P::load_a(a, xcur + mt * 16 * p.pitch_xs + kk, p.pitch_xs);
                  P::mma(acc[i], a, b);
                }
              }
            }
          });
#pragma unroll
      for (int i = 0; i < kMaxAcc; ++i) {
        const int job = pass0 + warp + i * kWarps;
        if (job < jobs1) {
          const int mt = job / wc16, nt = job % wc16;
          P::store_acc(scratch, 16, acc[i]);
          __syncwarp();
          // The lane's elements e = lane + 32j are halo pixels px = px0 + 2j
          // of one channel c; (hy, hx) follows px without a division per step.
          const int c = nt * 16 + lane % 16;
          const float bias = p.b1p[w0 + c];
          int px = mt * 16 + lane / 16;
          int hy = px / p.HWp, hx = px % p.HWp;
          for (int e = lane; e < 256; e += 32) {
            const int iy = iy0 + hy, ix = ix0 + hx;
            float v = 0.0f;
            if (px < p.P1 && iy >= 0 && iy < p.H && ix >= 0 && ix < p.W) v = fmaxf(scratch[e] + bias, 0.0f);
            t1s[px * p.pitch_t1 + c] = from_float<T>(v);
            px += 2;
            hx += 2;  // HWp >= 18 > 2: at most one wrap
            if (hx >= p.HWp) {
              hx -= p.HWp;
              ++hy;
            }
          }
          __syncwarp();  // scratch is rewritten by the next tile
        }
      }
    }
    __syncthreads();
    // ---- 3 + 4. grouped 3x3 (+ b2, ReLU) -> t2s. Output row oy of the tile
    // is one 16-row M tile; its tap (ky, kx) operand starts at halo pixel
    // (oy*s + ky*dil, kx*dil) and steps s pixels per row. The K range of
    // output tile ot is 9 taps x KT K tiles ----
    {
      const StripJobs sj(wc16, th_valid);
      for (int job = warp; job < sj.count(); job += kWarps) {
        const int ot = job % sj.cols;  // 16-channel output tile inside the chunk
        const int r0 = (job / sj.cols) * sj.rows_per_group;
        const int nrows = min(sj.rows_per_group, th_valid - r0);
        // First input column (chunk-local) of the tile's K range.
        const int in0 = p.d_p <= 16 ? ot * 16 : (ot * 16 / p.d_p) * p.d_p;
        const T* w2t = w2p + static_cast<size_t>(w0 / 16 + ot) * 9 * p.KT * 256;
        Acc acc[kMaxAcc];
#pragma unroll
        for (int r = 0; r < kMaxAcc; ++r) P::zero(acc[r]);
        strip_mma<P>(
            acc, nrows, 9 * p.KT * 16, s * p.pitch_t1, 16,
            [&](int r, int k) {
              const int t = k / 16, tap = t / p.KT, kt = t % p.KT;
              const int hy = (r0 + r) * s + (tap / 3) * dil, hx = (tap % 3) * dil;
              return t1s + (hy * p.HWp + hx) * p.pitch_t1 + in0 + kt * 16 + k % 16;
            },
            [&](int k) { return w2t + (k / 16) * 256 + (k % 16) * 16; });
#pragma unroll
        for (int r = 0; r < kMaxAcc; ++r) {
          if (r < nrows) {
            P::store_acc(scratch, 16, acc[r]);
            __syncwarp();
            for (int e = lane; e < 256; e += 32) {
              const int m = (r0 + r) * 16 + e / 16, c = ot * 16 + e % 16;
              t2s[m * p.pitch_t2 + c] = from_float<T>(fmaxf(scratch[e] + p.b2p[w0 + c], 0.0f));
            }
            __syncwarp();  // scratch is rewritten by the next tile
          }
        }
      }
    }
    __syncthreads();
    // ---- 5. yacc += t2 @ w3p[chunk rows, slice cols] ----
    accumulate_y<P>(ys, p.pitch_y, th_valid, cs16, warp, p.WC, p.pitch_t2, p.Cout_p,
                    [&](int r, int k) { return t2s + r * 16 * p.pitch_t2 + k; },
                    [&](int nt, int k) { return w3p + static_cast<size_t>(w0 + k) * p.Cout_p + cs0 + nt * 16; });
  }

  if (wdp != nullptr) {
    // ---- projection shortcut: yacc += x[oy*s, ox*s] @ wdp ----
    stream_x(
        xs, p, th_valid * 16, x,
        [&](int m) -> long long {
          const int gy = oy0 + m / 16, gx = ox0 + m % 16;
          if (gx >= p.Wo) return -1;
          return (static_cast<long long>(gy * s) * p.W + gx * s) * p.Cin;
        },
        [&](int, int k0, int kc, const T* xcur) {
          accumulate_y<P>(ys, p.pitch_y, th_valid, cs16, warp, kc, p.pitch_xs, p.Cout_p,
                          [&](int r, int k) { return xcur + r * 16 * p.pitch_xs + k; },
                          [&](int nt, int k) { return wdp + static_cast<size_t>(k0 + k) * p.Cout_p + cs0 + nt * 16; });
        });
  }
  __syncthreads();

  // ---- epilogue: y = relu(yacc + b3 + shortcut), channels fastest so that
  // consecutive threads write consecutive addresses ----
  const int c_real = min(cs_len, p.Cout - cs0);
  T* y = static_cast<T*>(p.y) + static_cast<size_t>(n) * p.Ho * p.Wo * p.Cout;
  // Vector width: 1, or 16 bytes of T (c_real is then a multiple of it:
  // Cout and cs0 are).
  constexpr int kVec = 16 / sizeof(T);
  const int vw = p.vec_y ? kVec : 1;
  const int cv = c_real / vw;
  for (int i = tid; i < th_valid * 16 * cv; i += kThreads) {
    const int m = i / cv, c = (i - m * cv) * vw;
    const int gy = oy0 + m / 16, gx = ox0 + m % 16;
    if (gx >= p.Wo) continue;
    // identity shortcut: stride 1 and Cin == Cout, so x has y's indexing
    const T* xin = x + (static_cast<size_t>(gy) * p.W + gx) * p.Cin + cs0 + c;
    T* yout = y + (static_cast<size_t>(gy) * p.Wo + gx) * p.Cout + cs0 + c;
    if (p.vec_y) {
      alignas(16) T xv[kVec];
      alignas(16) T out[kVec];
      if (wdp == nullptr) copy16(xv, xin);
      for (int j = 0; j < kVec; ++j) {
        float v = ys[m * p.pitch_y + c + j] + p.b3p[cs0 + c + j];
        if (wdp == nullptr) v += to_float(xv[j]);
        out[j] = from_float<T>(fmaxf(v, 0.0f));
      }
      copy16(yout, out);
    } else {
      float v = ys[m * p.pitch_y + c] + p.b3p[cs0 + c];
      if (wdp == nullptr) v += to_float(*xin);
      *yout = from_float<T>(fmaxf(v, 0.0f));
    }
  }
}

}  // namespace rk
