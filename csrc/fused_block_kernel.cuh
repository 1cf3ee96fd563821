// The fused ResNeXt bottleneck inference kernel (one launch per block).
//
// Compiled by nvcc for the GPU (csrc/fused_block_cuda.cu) and by g++ for the
// CPU emulation build (csrc/emulation/fused_block_emu.cpp); rk_device.cuh
// selects the machine. Algorithm and memory plan: docs/cuda_backend.md.
#pragma once

#include "fused_block_params.h"
#include "rk_device.cuh"

namespace rk {

// relu that propagates NaN as PyTorch's does (relu(NaN) = NaN; fmaxf and
// max(v, 0) would return 0).
__device__ __forceinline__ float relu(float v) { return v < 0.0f ? 0.0f : v; }

// ---------------------------------------------------------------------------
// Warp-level MMA policies. An MMA step is D[16 x 8] += A[16 x kK] B[kK x 8]
// with fp32 accumulators held per lane in the mma C/D layout (acc[i] =
// D[g + 8*(i/2)][2t + i%2], g = lane/4, t = lane%4; rk_device.cuh). Each
// policy provides
//   Elem, kK, FragA, FragB
//   load_a(a, wide, a_at): a_at(slot, k) is the address of element (row of
//     `slot`, k) of the A tile; slot 0 is row lane%16, slot 1 row g, slot 2
//     row g+8. wide: runs of 16 bytes starting at k = 0 and kK/2 are
//     contiguous and 16-byte aligned (ldmatrix), else each element is
//     addressed on its own.
//   load_b(b, tile): the B tile in fragment order (32 lanes x kK/4 elements,
//     see FusedBlockParams)
//   mma(acc, a, b): acc += a * b
// All 32 lanes of a warp call every one of them.
// ---------------------------------------------------------------------------

__device__ __forceinline__ int lane_id() { return threadIdx.x & 31; }

// The row of a 16-row tile that `slot` names for this lane (see above).
__device__ __forceinline__ int slot_row(int slot) {
  const int lane = lane_id();
  return slot == 0 ? lane & 15 : (lane >> 2) + (slot == 2 ? 8 : 0);
}

template <class T>
struct Mma16Policy {  // fp16 / bf16: mma.m16n8k16, fp32 accumulation
  using Elem = T;
  static constexpr int kK = 16;
  struct FragA {
    uint32_t r[4];
  };
  struct FragB {
    uint32_t r[2];
  };
  template <class AAt>
  static __device__ __forceinline__ void load_a(FragA& a, bool wide, AAt a_at) {
    const int lane = lane_id(), t = lane & 3;
    if (wide) {
      ldmatrix<4>(a.r, a_at(0, (lane >> 4) * 8));
      return;
    }
    for (int i = 0; i < 4; ++i) {
      const int slot = 1 + (i & 1), k = 2 * t + 8 * (i >> 1);
      a.r[i] = pack_pair(*a_at(slot, k), *a_at(slot, k + 1));
    }
  }
  static __device__ __forceinline__ void load_b(FragB& b, const T* tile) { load_u32x2(b.r, tile + lane_id() * 4); }
  static __device__ __forceinline__ void mma(float (&acc)[4], const FragA& a, const FragB& b) {
    mma_m16n8k16<T>(acc, a.r, b.r);
  }
};

struct Tf32Policy {  // fp32 data on TF32 tensor cores (allow_tf32): mma.m16n8k8
  using Elem = float;
  static constexpr int kK = 8;
  struct FragA {
    uint32_t r[4];
  };
  struct FragB {
    uint32_t r[2];
  };
  template <class AAt>
  static __device__ __forceinline__ void load_a(FragA& a, bool wide, AAt a_at) {
    const int lane = lane_id(), t = lane & 3;
    if (wide) {
      ldmatrix<4>(a.r, a_at(0, (lane >> 4) * 4));
      for (uint32_t& r : a.r) r = to_tf32(bits_to_float(r));
      return;
    }
    for (int i = 0; i < 4; ++i) a.r[i] = to_tf32(*a_at(1 + (i & 1), t + 4 * (i >> 1)));
  }
  static __device__ __forceinline__ void load_b(FragB& b, const float* tile) {
    float v[2];
    load_vec(v, tile + lane_id() * 2);
    b.r[0] = to_tf32(v[0]);
    b.r[1] = to_tf32(v[1]);
  }
  static __device__ __forceinline__ void mma(float (&acc)[4], const FragA& a, const FragB& b) {
    mma_m16n8k8_tf32(acc, a.r, b.r);
  }
};

// Full fp32 (allow_tf32 off): the m16n8k8 step on CUDA cores. A lane
// computes its own accumulators, so its "fragments" are the A rows g and
// g+8 and the B columns 2t and 2t+1 it needs (16 values each), read
// straight from shared memory and from the tf32-ordered B tile: lane
// (n*4 + q) holds B[q][n], B[q+4][n], so columns 2t, 2t+1 are the 16
// consecutive floats from 16t.
struct Fp32FmaPolicy {
  using Elem = float;
  static constexpr int kK = 8;
  struct FragA {
    float v[2][8];  // rows g, g+8
  };
  struct FragB {
    float v[16];  // column 2t + n, k: v[n*8 + 2*(k%4) + k/4]
  };
  template <class AAt>
  static __device__ __forceinline__ void load_a(FragA& a, bool wide, AAt a_at) {
    for (int r = 0; r < 2; ++r) {
      if (wide) {
        load_vec(*reinterpret_cast<float(*)[4]>(&a.v[r][0]), a_at(1 + r, 0));
        load_vec(*reinterpret_cast<float(*)[4]>(&a.v[r][4]), a_at(1 + r, 4));
      } else {
        for (int k = 0; k < 8; ++k) a.v[r][k] = *a_at(1 + r, k);
      }
    }
  }
  static __device__ __forceinline__ void load_b(FragB& b, const float* tile) {
    const float* p = tile + 16 * (lane_id() & 3);
    for (int i = 0; i < 4; ++i) load_vec(*reinterpret_cast<float(*)[4]>(&b.v[4 * i]), p + 4 * i);
  }
  static __device__ __forceinline__ void mma(float (&acc)[4], const FragA& a, const FragB& b) {
#pragma unroll
    for (int k = 0; k < 8; ++k) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        acc[i] = fmaf(a.v[i >> 1][k], b.v[(i & 1) * 8 + 2 * (k & 3) + (k >> 2)], acc[i]);
      }
    }
    count_fma_macs(32);
  }
};

// One warp job's accumulators: kWarpM 16-row tiles x kWarpN 8-column tiles.
struct JobAcc {
  float v[kWarpM][kWarpN][4];
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < kWarpM; ++i)
#pragma unroll
      for (int j = 0; j < kWarpN; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) v[i][j][e] = 0.0f;
  }
};

// acc[i][j] += A_i @ B_j over one MMA step for the job's tiles i < mi,
// j < nj: a_at(i, slot, k) addresses A tile i (see the policies), b_tile(j)
// is B tile j's fragment-ordered data.
template <class P, class AAt, class BTile>
__device__ __forceinline__ void mma_step(JobAcc& acc, int mi, int nj, bool wide, AAt a_at, BTile b_tile) {
  typename P::FragA a[kWarpM];
#pragma unroll
  for (int i = 0; i < kWarpM; ++i) {
    if (i < mi) P::load_a(a[i], wide, [&](int slot, int k) { return a_at(i, slot, k); });
  }
#pragma unroll
  for (int j = 0; j < kWarpN; ++j) {
    if (j < nj) {
      typename P::FragB b;
      P::load_b(b, b_tile(j));
#pragma unroll
      for (int i = 0; i < kWarpM; ++i) {
        if (i < mi) P::mma(acc.v[i][j], a[i], b);
      }
    }
  }
}

// Calls f(i, j, e, row, col) for every accumulator element of the job's
// tiles i < mi, j < nj: row (0..kJobRows) and col (0..kJobCols) inside the job.
template <class F>
__device__ __forceinline__ void for_each_acc(int mi, int nj, F f) {
  const int lane = lane_id(), g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < kWarpM; ++i)
#pragma unroll
    for (int j = 0; j < kWarpN; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (i < mi && j < nj) f(i, j, e, i * 16 + g + 8 * (e >> 1), j * 8 + 2 * t + (e & 1));
      }
}

// Copies channels [k0, k0+kc) of `rows` pixels of x into dst (row pitch
// `pitch` elements). rows_tab[r] is the pixel index of row r in x (channel
// 0 at pixel * cin) or -1 for a zero row; channels at or past cin are zero.
// Vector copies go through cp.async: the caller commits and waits.
template <class T>
__device__ __forceinline__ void stage_x(T* dst, int pitch, int rows, int kc, int k0, int cin, bool vec,
                                        const T* __restrict__ x, const int* rows_tab) {
  if (vec) {
    // Rows are walked in steps of a whole chunk (a compile-time count of
    // vectors); vectors past kc skip.
    constexpr int kVec = 16 / sizeof(T);
    constexpr int kRowVec = kXChunkBytes / 16;
    for (int i = threadIdx.x; i < rows * kRowVec; i += kThreads) {
      const int r = i / kRowVec, c = (i % kRowVec) * kVec;
      if (c >= kc) continue;
      const int pix = rows_tab[r];
      T* d = dst + r * pitch + c;
      if (pix >= 0 && k0 + c < cin) {  // cin is a multiple of kVec here
        async_copy16(d, x + static_cast<long long>(pix) * cin + k0 + c);
      } else {
        zero16(d);
      }
    }
  } else {
    for (int i = threadIdx.x; i < rows * kc; i += kThreads) {
      const int r = i / kc, c = i - r * kc;
      const int pix = rows_tab[r];
      dst[r * pitch + c] = (pix >= 0 && k0 + c < cin) ? x[static_cast<long long>(pix) * cin + k0 + c] : from_float<T>(0.0f);
    }
  }
}

// Streams all Cin_p channels of `rows` pixels of x (rows_tab, see stage_x)
// through x chunk buffers of buf_elems elements at xs in KC chunks: chunk
// kci goes to buffer kci % nbuf, and with two buffers chunk kci+1 is in
// flight (cp.async) while body(k0, kc, chunk) multiplies chunk kci. Every
// thread calls it (it holds barriers); the first barrier also orders it
// after earlier readers of the buffers and writers of rows_tab.
template <class T, class Body>
__device__ __forceinline__ void stream_x(T* xs, int buf_elems, const FusedBlockParams& p, int rows,
                                         const T* __restrict__ x, const int* rows_tab, Body body) {
  const int nk = (p.Cin_p + p.KC - 1) / p.KC;
  expect(rows * p.pitch_xs <= buf_elems, "a round streams more x rows than the plan's buffer holds");
  auto stage = [&](int kci) {
    const int k0 = kci * p.KC;
    stage_x(xs + (kci % p.nbuf) * buf_elems, p.pitch_xs, rows, min(p.KC, p.Cin_p - k0), k0, p.Cin, p.vec_x, x,
            rows_tab);
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
    body(k0, min(p.KC, p.Cin_p - k0), static_cast<const T*>(xs + (kci % p.nbuf) * buf_elems));
    __syncthreads();  // this buffer is refilled next (one buffer) or after next (two)
    if (p.nbuf == 1 && kci + 1 < nk) {
      stage(kci + 1);
      async_commit();
    }
  }
}

// A GEMM phase's warp jobs: (m-block of kWarpM 16-row tiles, n-group of
// nt 8-column tiles), n-group fastest, kWarps jobs per round; a streamed
// phase's round streams the rows of its m-blocks. nt: kWarpN, or fewer when
// the jobs would leave warps idle (job_tiles_n).
struct Rounds {
  int mt, ncols, nt, ngroups, jobs;
  __device__ __forceinline__ Rounds(int mt_, int ncols_) : mt(mt_), ncols(ncols_) {
    nt = job_tiles_n(mt, ncols);
    ngroups = cdiv(ncols, 8 * nt);
    jobs = cdiv(mt, kWarpM) * ngroups;
  }
  // Tiles of job `job`: m-tiles (of kWarpM) and 8-column tiles (of nt).
  __device__ __forceinline__ int mi(int job) const { return min(kWarpM, mt - job / ngroups * kWarpM); }
  __device__ __forceinline__ int nj(int job) const { return min(nt, cdiv(ncols, 8) - job % ngroups * nt); }
  __device__ __forceinline__ int row0(int r0) const { return (r0 / ngroups) * kJobRows; }
  __device__ __forceinline__ int rows(int r0) const {
    const int hi = (min(jobs, r0 + kWarps) - 1) / ngroups;
    return min((hi + 1) * kJobRows, mt * 16) - row0(r0);
  }
};

// ---------------------------------------------------------------------------
// The kernel. Grid: (run_count(p), ceil(Cout_p/CS)); block: kThreads.
// Block (run, slice) computes output pixels [q0, q0+mout) of its band
// (run_tile) and output channels [cs0, cs0+CS):
//   for each width chunk [w0, w0+WC) of the padded width:
//     1. conv1 on the halo run (m1 input pixels): x streamed through xs in
//        KC-channel chunks (stream_x: cp.async, double-buffered when shared
//        memory allows), warp jobs in rounds (Rounds) with register
//        accumulators; t1s[1 + h] = relu(acc + b1) (row 0 stays zero: the
//        3x3 conv's padding, read by taps outside the image; padded
//        channels are stored as exact zeros, see real_width_channel);
//     2. grouped 3x3 over t1s: warp jobs of kWarpM output tiles x the
//        output tiles sharing A (grouped_job_tiles); the A rows of tap
//        (ky, kx) are gathered per lane (ldmatrix row addresses), so
//        stride, dilation, image borders and runs across rows and images
//        cost nothing; t2s[m][w0 + c] = relu(acc + b2) (padded channels 0;
//        multi-group tiles holding a NaN are recomputed per group);
//   3. conv3 (+ the projection, x streamed at the output pixels) over the
//      whole t2s for each job of the slice, in registers; epilogue
//      y = relu(acc + b3 (+ x for identity)) written through y's strides.
// t1 and t2 never leave shared memory; every MMA accumulates in registers.
// ---------------------------------------------------------------------------
template <class P>
__global__ void __launch_bounds__(kThreads, 1) fused_block_kernel(const FusedBlockParams p) {
  using T = typename P::Elem;
  constexpr int kTile = 32 * P::kK / 4;  // elements of a packed B tile (kK x 8: kK/4 per lane)
  unsigned char* smem = dynamic_smem();
  T* t2s = reinterpret_cast<T*>(smem + p.off_t2);
  T* t1s = reinterpret_cast<T*>(smem + p.off_t1);
  T* xs1 = reinterpret_cast<T*>(smem + p.off_xs1);
  T* xsp = reinterpret_cast<T*>(smem + p.off_xsp);
  int* rows_tab = reinterpret_cast<int*>(smem + p.off_rows);

  const int tid = threadIdx.x, warp = tid / 32;
  const RunTile tile = run_tile(p, blockIdx.x);
  const int cs0 = blockIdx.y * p.CS;
  const int cs_len = min(p.CS, p.Cout_p - cs0);
  const int mt1 = cdiv(tile.m1, 16), mto = cdiv(tile.mout, 16);
  expect(tile.m1 <= p.halo_cap && tile.mout <= p.Mo, "the block's halo or run exceeds the plan's shared memory");
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ w1p = static_cast<const T*>(p.w1p);
  const T* __restrict__ w2p = static_cast<const T*>(p.w2p);
  const T* __restrict__ w3p = static_cast<const T*>(p.w3p);
  const T* __restrict__ wdp = static_cast<const T*>(p.wdp);
  const int nt_w = p.Wp / 8, nt_c = p.Cout_p / 8;  // 8-column tiles of the padded width / Cout

  // The zero row of t1s (row 0): the 3x3 conv's padding.
  for (int c = tid; c < p.WC; c += kThreads) t1s[c] = from_float<T>(0.0f);

  for (int w0 = 0; w0 < p.Wp; w0 += p.WC) {
    const int wc = min(p.WC, p.Wp - w0);
    // ---- 1. conv1 on the halo run -> t1s ----
    const Rounds r1(mt1, wc);
    for (int r0 = 0; r0 < r1.jobs; r0 += kWarps) {
      const int job = r0 + warp, row0 = r1.row0(r0), rows = r1.rows(r0);
      const bool active = job < r1.jobs;
      const int mb = job / r1.ngroups, ng = job % r1.ngroups, mi = r1.mi(job), nj = r1.nj(job);
      for (int r = tid; r < rows; r += kThreads) {
        const int h = row0 + r;
        rows_tab[r] = h < tile.m1 ? static_cast<int>(halo_pixel(p, tile, h)) : -1;
      }
      JobAcc acc;
      acc.zero();
      stream_x(xs1, p.xs_buf1, p, rows, x, rows_tab, [&](int k0, int kc, const T* xcur) {
        if (!active) return;
        for (int kk = 0; kk < kc; kk += P::kK) {
          const int ks = (k0 + kk) / P::kK;
          mma_step<P>(
              acc, mi, nj, true,
              [&](int i, int slot, int k) {
                return xcur + (mb * kJobRows + i * 16 + slot_row(slot) - row0) * p.pitch_xs + kk + k;
              },
              [&](int j) { return w1p + (static_cast<size_t>(ks) * nt_w + w0 / 8 + ng * r1.nt + j) * kTile; });
        }
      });
      if (active) {
        for_each_acc(mi, nj, [&](int i, int j, int e, int row, int col) {
          const int h = mb * kJobRows + row, c = ng * r1.nt * 8 + col;
          const float v = real_width_channel(p, w0 + c) ? relu(acc.v[i][j][e] + p.b1p[w0 + c]) : 0.0f;
          if (h < tile.m1) t1s[(1 + h) * p.pitch_t1 + c] = from_float<T>(v);
        });
      }
    }
    __syncthreads();
    // ---- 2. grouped 3x3 over t1s -> t2s[:, w0 .. w0+wc) ----
    {
      // Output tiles of real groups in the chunk (past them the padding
      // channels' t2 is 0: written below, not computed).
      const int tiles = cdiv(imax(0, min(wc, p.Wg - w0)), 8);
      const int tg = p.d_p >= 8 ? p.d_p / 8 : 1;  // output tiles sharing A (a group's)
      const int span = grouped_job_tiles(p.d_p);
      const int per_group = cdiv(tg, span), njobs_n = cdiv(tiles, tg) * per_group;
      const bool wide = p.atom * static_cast<int>(sizeof(T)) >= 16;
      const int jobs = cdiv(mto, kWarpM) * njobs_n;
      const int pad_cols = wc - tiles * 8;
      for (int i = tid; i < mto * 16 * pad_cols; i += kThreads) {
        t2s[(i / pad_cols) * p.pitch_t2 + w0 + tiles * 8 + i % pad_cols] = from_float<T>(0.0f);
      }
      for (int job = warp; job < jobs; job += kWarps) {
        const int mb = job / njobs_n, jn = job % njobs_n;
        const int nt0 = (jn / per_group) * tg + (jn % per_group) * span;  // first output tile (chunk-local)
        const int mi = min(kWarpM, mto - mb * kWarpM);
        const int nj = min(min(span, tg - (jn % per_group) * span), tiles - nt0);
        // Per m-tile and row slot: the t1s row of tap (0, 0) minus 1 and the
        // taps inside the image (bit ky*3 + kx).
        int base[kWarpM][3], taps[kWarpM][3];
#pragma unroll
        for (int i = 0; i < kWarpM; ++i) {
#pragma unroll
          for (int slot = 0; slot < 3; ++slot) {
            const int m = mb * kJobRows + i * 16 + slot_row(slot);
            taps[i][slot] = 0;
            base[i][slot] = 0;
            if (i < mi && m < tile.mout) {
              const OutPixel o = out_pixel(p, tile, m);
              const int iy = o.oy * p.stride - p.dil, ix = o.ox * p.stride - p.dil;
              base[i][slot] = static_cast<int>((static_cast<long long>(o.n) * p.H + iy) * tile.hc + ix - tile.hx_l -
                                               tile.p_lo);
              for (int ky = 0; ky < 3; ++ky)
                for (int kx = 0; kx < 3; ++kx) {
                  const int y = iy + ky * p.dil, xx = ix + kx * p.dil;
                  if (y >= 0 && y < p.H && xx >= 0 && xx < p.W) taps[i][slot] |= 1 << (ky * 3 + kx);
                }
            }
          }
        }
        JobAcc acc;
        acc.zero();
        for (int ks = 0; ks < p.KS2; ++ks) {
          mma_step<P>(
              acc, mi, nj, wide,
              [&](int i, int slot, int k) {
                const GroupedK gk = grouped_k(p.d_p, p.atom, nt0, ks * P::kK + k);
                int row = 0;  // the zero row
                if (gk.tap < 9 && (taps[i][slot] >> gk.tap & 1)) {
                  row = 1 + base[i][slot] + (gk.tap / 3) * p.dil * tile.hc + (gk.tap % 3) * p.dil;
                }
                return static_cast<const T*>(t1s + row * p.pitch_t1 + gk.channel);
              },
              [&](int j) { return w2p + (static_cast<size_t>(w0 / 8 + nt0 + j) * p.KS2 + ks) * kTile; });
        }
        // d_p < 8: the tile is 8/d_p groups with block-diagonal weights, so an
        // inf in one group's t1 times another group's zero weight is NaN where
        // eager has a finite value. Only non-finite t1 can do that (rare): a
        // warp whose tile came out with a NaN recomputes it group by group,
        // reading the other groups' channels from the zero row.
        if (p.d_p < 8) {
          bool nan = false;
          for_each_acc(mi, nj, [&](int i, int j, int e, int, int) { nan = nan || acc.v[i][j][e] != acc.v[i][j][e]; });
          if (warp_any(nan)) {
            for (int gi = 0; gi < 8 / p.d_p; ++gi) {
              float exact[kWarpM][4];
#pragma unroll
              for (auto& r : exact)
#pragma unroll
                for (float& v : r) v = 0.0f;
              for (int ks = 0; ks < p.KS2; ++ks) {
                typename P::FragB b;  // nj == 1 here: grouped_job_tiles(d_p < 8) is one tile
                P::load_b(b, w2p + (static_cast<size_t>(w0 / 8 + nt0) * p.KS2 + ks) * kTile);
#pragma unroll
                for (int i = 0; i < kWarpM; ++i) {
                  if (i >= mi) continue;
                  typename P::FragA a;
                  P::load_a(a, false, [&](int slot, int k) {
                    const GroupedK gk = grouped_k(p.d_p, p.atom, nt0, ks * P::kK + k);
                    int row = 0;  // the zero row: K padding, taps outside the image, other groups
                    if (gk.tap < 9 && (taps[i][slot] >> gk.tap & 1) && (gk.channel - nt0 * 8) / p.d_p == gi) {
                      row = 1 + base[i][slot] + (gk.tap / 3) * p.dil * tile.hc + (gk.tap % 3) * p.dil;
                    }
                    return static_cast<const T*>(t1s + row * p.pitch_t1 + gk.channel);
                  });
                  P::mma(exact[i], a, b);
                }
              }
              for_each_acc(mi, nj, [&](int i, int j, int e, int, int col) {
                if (col / p.d_p == gi) acc.v[i][j][e] = exact[i][e];
              });
            }
          }
        }
        for_each_acc(mi, nj, [&](int i, int j, int e, int row, int col) {
          const int m = mb * kJobRows + row, c = w0 + nt0 * 8 + col;
          const float v = real_width_channel(p, c) ? relu(acc.v[i][j][e] + p.b2p[c]) : 0.0f;
          t2s[m * p.pitch_t2 + c] = from_float<T>(v);
        });
      }
    }
    __syncthreads();
  }

  // ---- 3. conv3 (+ projection) over the slice, epilogue ----
  const Rounds r3(mto, cs_len);
  auto conv3 = [&](JobAcc& acc, int mb, int ng, int mi, int nj) {
    for (int k = 0; k < p.Wp; k += P::kK) {
      mma_step<P>(
          acc, mi, nj, true,
          [&](int i, int slot, int kk) {
            return static_cast<const T*>(t2s + (mb * kJobRows + i * 16 + slot_row(slot)) * p.pitch_t2 + k + kk);
          },
          [&](int j) {
            return w3p + (static_cast<size_t>(k / P::kK) * nt_c + cs0 / 8 + ng * r3.nt + j) * kTile;
          });
    }
  };
  auto epilogue = [&](const JobAcc& acc, int mb, int ng, int mi, int nj) {
    T* y = static_cast<T*>(p.y);
    for_each_acc(mi, nj, [&](int i, int j, int e, int row, int col) {
      if (e & 1) return;  // pairs (e, e+1): adjacent channels of one pixel
      const int m = mb * kJobRows + row, c = cs0 + ng * r3.nt * 8 + col;
      if (m >= tile.mout || c >= p.Cout) return;
      const OutPixel o = out_pixel(p, tile, m);
      const bool two = c + 1 < p.Cout;
      float v[2] = {acc.v[i][j][e] + p.b3p[c], two ? acc.v[i][j][e + 1] + p.b3p[c + 1] : 0.0f};
      if (!p.proj) {  // identity: stride 1 and Cin == Cout, x has y's pixels
        const T* xin = x + (static_cast<long long>(o.n * p.H + o.oy) * p.W + o.ox) * p.Cin + c;
        if (two && p.pair_x) {
          float xv[2];
          load_pair(xv, xin);
          v[0] += xv[0];
          v[1] += xv[1];
        } else {
          v[0] += to_float(xin[0]);
          if (two) v[1] += to_float(xin[1]);
        }
      }
      T* yout = y + o.n * p.ys_n + o.oy * p.ys_h + o.ox * p.ys_w + c * p.ys_c;
      if (two && p.pair_y) {
        store_pair(yout, relu(v[0]), relu(v[1]));
      } else {
        yout[0] = from_float<T>(relu(v[0]));
        if (two) yout[p.ys_c] = from_float<T>(relu(v[1]));
      }
    });
  };
  if (!p.proj) {
    for (int job = warp; job < r3.jobs; job += kWarps) {
      const int mb = job / r3.ngroups, ng = job % r3.ngroups, mi = r3.mi(job), nj = r3.nj(job);
      JobAcc acc;
      acc.zero();
      conv3(acc, mb, ng, mi, nj);
      epilogue(acc, mb, ng, mi, nj);
    }
    return;
  }
  for (int r0 = 0; r0 < r3.jobs; r0 += kWarps) {
    const int job = r0 + warp, row0 = r3.row0(r0), rows = r3.rows(r0);
    const bool active = job < r3.jobs;
    const int mb = job / r3.ngroups, ng = job % r3.ngroups, mi = r3.mi(job), nj = r3.nj(job);
    for (int r = tid; r < rows; r += kThreads) {
      const int m = row0 + r;
      int pix = -1;
      if (m < tile.mout) {
        const OutPixel o = out_pixel(p, tile, m);
        pix = (o.n * p.H + o.oy * p.stride) * p.W + o.ox * p.stride;
      }
      rows_tab[r] = pix;
    }
    JobAcc acc;
    acc.zero();
    if (active) conv3(acc, mb, ng, mi, nj);
    stream_x(xsp, p.xs_bufp, p, rows, x, rows_tab, [&](int k0, int kc, const T* xcur) {
      if (!active) return;
      for (int kk = 0; kk < kc; kk += P::kK) {
        const int ks = (k0 + kk) / P::kK;
        mma_step<P>(
            acc, mi, nj, true,
            [&](int i, int slot, int k) {
              return xcur + (mb * kJobRows + i * 16 + slot_row(slot) - row0) * p.pitch_xs + kk + k;
            },
            [&](int j) { return wdp + (static_cast<size_t>(ks) * nt_c + cs0 / 8 + ng * r3.nt + j) * kTile; });
      }
    });
    if (active) epilogue(acc, mb, ng, mi, nj);
  }
}

}  // namespace rk
