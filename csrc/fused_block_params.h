// The fused block kernel's launch constants, parameter block and tile
// geometry: plain C++ (no CUDA or emulator headers), so the planner
// (fused_block_plan.h) compiles into resnext_kernels._C's C++ part and runs
// without a GPU, while the kernel (fused_block_kernel.cuh) uses the very
// same definitions. The geometry functions are the one home of the tile and
// halo arithmetic: the kernel calls them per block, the planner per block
// (or per period of blocks) to size shared memory and count the MMA work.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define RK_HD __host__ __device__ __forceinline__
#else
#define RK_HD inline
#endif

namespace rk {

constexpr int kThreads = 256;  // 8 warps per block
constexpr int kWarps = kThreads / 32;
constexpr int kWarpM = 2;         // 16-row MMA tiles per warp job
constexpr int kWarpN = 8;         // 8-column MMA tiles per warp job
constexpr int kJobRows = kWarpM * 16;
constexpr int kJobCols = kWarpN * 8;
constexpr int kXChunkBytes = 128;  // bytes of an x row chunk streamed through shared memory (KC elements)
constexpr int kRowPadBytes = 16;   // shared-memory rows are padded by 16 bytes (ldmatrix rows in distinct banks)

RK_HD int imin(int a, int b) { return a < b ? a : b; }
RK_HD int imax(int a, int b) { return a > b ? a : b; }
RK_HD int cdiv(int a, int b) { return (a + b - 1) / b; }

// Everything the kernel needs, computed on the host (fused_block_plan.h, fused_block_host.h).
//
// Tensors (element type T of the policy unless noted; packed tensors are
// contiguous):
//   x    NHWC activations [N, H, W, Cin] (channels_last x, contiguous in that order)
//   y    [N, Cout, Ho, Wo] written through the strides ys_n, ys_c, ys_h, ys_w
//        (elements): channels_last or NCHW-contiguous, as x came in
//   Weights are packed in MMA fragment order (pack_weights): a K x N
//   operand B is cut into kK x 8 tiles (kK = 16 for fp16/bf16, 8 for fp32),
//   and tile (ks, nt) holds 32 lanes x E elements, lane l's B fragment of
//   mma.m16n8k16 (E = 4: B[2t][g], B[2t+1][g], B[2t+8][g], B[2t+9][g]) or
//   m16n8k8 (E = 2: B[t][g], B[t+4][g]), g = l/4, t = l%4, so a warp loads
//   a tile with one 8-byte load per lane.
//   w1p  [Cin_p/kK][Wp/8][32][E]    conv1, K = input channel, N = padded width channel
//   b1p  [Wp] float
//   w2p  [Wp/8][KS2][32][E]         grouped 3x3: for output tile nt (8 padded width
//                                   channels), K runs over K2 = 9 * max(8, d_p)
//                                   positions (tap, input channel), see grouped_k
//   b2p  [Wp] float
//   w3p  [Wp/kK][Cout_p/8][32][E]   conv3
//   b3p  [Cout_p] float             b3 (+ bd with a projection shortcut)
//   wdp  [Cin_p/kK][Cout_p/8][32][E] or null: projection shortcut
// Padded sizes: Cin_p = Cin rounded up to 16, Cout_p = Cout rounded up to
// 8, d_p = d rounded up to a power of two (d <= 8) or to a multiple of 8;
// padded width channel g*d_p + j is channel j of group g; Wp = groups*d_p
// rounded up to 16. Padding has zero weights and biases.
struct FusedBlockParams {
  const void* x;
  void* y;
  const void* w1p;
  const float* b1p;
  const void* w2p;
  const float* b2p;
  const void* w3p;
  const float* b3p;
  const void* wdp;
  int N, H, W, Cin, Cout, Ho, Wo, stride, dil;
  bool proj;       // projection shortcut (wdp given), else identity
  int Cin_p, Wp, Cout_p, d_p;
  int d, groups;   // real channels per group, groups: padded width channels (and their t1, t2) are exact 0
  int Wg;          // padded width channels of real groups: groups*d_p rounded up to 8 (t2 is 0 past it)
  int kK;          // K of one MMA step: 16 (fp16/bf16) or 8 (fp32)
  int atom;        // grouped conv: contiguous input channels per K atom, min(8, d_p)
  int KS2;         // grouped conv: MMA K steps per output tile, ceil(9 * max(8, d_p) / kK)
  int KC;          // input channels per x chunk: min(kXChunkBytes / element size, Cin_p)
  long long ys_n, ys_c, ys_h, ys_w;
  // Tiling. The output is seen as one image of N*Ho stacked rows, cut into
  // vertical bands of TW columns (the last one narrower); a band's pixels
  // are enumerated row by row, and block (band, run) owns the run of Mo
  // consecutive pixels [run*Mo, run*Mo + Mo) of that enumeration (run_tile).
  // blockIdx.y owns output channels [blockIdx.y*CS, +CS).
  int TW, Mo, WC, CS, nbuf;
  int bands, runs_full, runs_last;  // runs per band: all bands but the last, the last
  int halo_cap;                     // the largest halo run of any block (rows of t1s after the zero row)
  // Shared memory (byte offsets from the dynamic base) and row pitches
  // (elements). t2s [Mo_p][Wp]; t1s [1 + halo][WC] (row 0 all zeros: the 3x3
  // conv's padding); xs: nbuf x chunk buffers of x rows (conv1: halo pixels;
  // aliased with t1s for the projection: output pixels); rows: the x pixel
  // index of every row of the round being streamed.
  int off_t2, off_t1, off_xs1, off_xsp, off_rows;
  int pitch_t2, pitch_t1, pitch_xs;
  int xs_buf1, xs_bufp;  // elements per x chunk buffer: conv1, projection
  // 16-byte vector copies of x chunks (Cin a multiple of the vector width,
  // x 16-byte aligned); element pairs in the epilogue for y (channels_last,
  // Cout even, y 4/8-byte aligned) and for the identity shortcut's x.
  int vec_x, pair_y, pair_x;
};

// The block's output run and the halo run of input pixels its grouped conv reads.
//
// Halo pixels are enumerated over the stacked input (N*H rows) restricted
// to the band's halo columns [hx_l, hx_l + hc): position (iy_stacked * hc +
// ix - hx_l). The run needs positions [p_lo, p_lo + m1): from the top-left
// tap of its first pixel to the bottom-right tap of its last, clipped to
// their images (taps outside an image read the zero row instead). Every
// position in between is a real pixel of some image; those no tap reads
// cost conv1 work but are never wrong.
struct RunTile {
  int ox0, twb;      // band: first output column, width
  long long q0;      // first output pixel of the run in the band's enumeration
  int mout;          // output pixels of the run
  int hx_l, hc;      // halo columns
  long long p_lo;    // first halo position
  int m1;            // halo pixels
};

// Blocks (runs) of all bands: grid.x.
RK_HD long long run_count(const FusedBlockParams& p) {
  return static_cast<long long>(p.bands - 1) * p.runs_full + p.runs_last;
}

RK_HD RunTile run_tile(const FusedBlockParams& p, long long block) {
  const long long full = static_cast<long long>(p.bands - 1) * p.runs_full;
  const int band = block < full ? static_cast<int>(block / p.runs_full) : p.bands - 1;
  const long long run = block < full ? block % p.runs_full : block - full;
  const int s = p.stride, dil = p.dil;
  RunTile t;
  t.ox0 = band * p.TW;
  t.twb = imin(p.TW, p.Wo - t.ox0);
  const long long total = static_cast<long long>(p.N) * p.Ho * t.twb;
  t.q0 = run * p.Mo;
  const long long q1 = (t.q0 + p.Mo < total ? t.q0 + p.Mo : total) - 1;
  t.mout = static_cast<int>(q1 - t.q0 + 1);
  t.hx_l = imax(0, t.ox0 * s - dil);
  t.hc = imin(p.W - 1, (t.ox0 + t.twb - 1) * s + dil) - t.hx_l + 1;
  const long long ra = t.q0 / t.twb, rb = q1 / t.twb;
  const int ca = static_cast<int>(t.q0 % t.twb), cb = static_cast<int>(q1 % t.twb);
  const long long na = ra / p.Ho, nb = rb / p.Ho;
  const int iya = static_cast<int>(ra % p.Ho) * s - dil, iyb = static_cast<int>(rb % p.Ho) * s + dil;
  // The top-left tap's row is read only by the first output row (from its
  // first pixel on); clipped to the image, the row is read whole.
  t.p_lo = iya >= 0 ? (na * p.H + iya) * t.hc + imax((t.ox0 + ca) * s - dil - t.hx_l, 0) : na * p.H * t.hc;
  const long long p_hi = iyb <= p.H - 1 ? (nb * p.H + iyb) * t.hc + imin((t.ox0 + cb) * s + dil - t.hx_l, t.hc - 1)
                                        : (nb * p.H + p.H - 1) * t.hc + t.hc - 1;
  t.m1 = static_cast<int>(p_hi - t.p_lo + 1);
  return t;
}

// 8-column tiles per warp job of a GEMM phase (conv1, conv3 with the
// projection) over mt 16-row tiles and ncols columns: kWarpN, halved (down
// to 1) while the jobs would leave warps of a round idle. Narrower jobs
// reload A per fewer columns, idle warps waste the SM's tensor cores.
RK_HD int job_tiles_n(int mt, int ncols) {
  const int mblocks = cdiv(mt, kWarpM);
  int n = kWarpN;
  while (n > 1 && mblocks * cdiv(ncols, 8 * n) < kWarps) n /= 2;
  return n;
}

// The grouped conv's warp jobs: kWarpM 16-row tiles x this many 8-channel
// output tiles, which share their A operand: a group's tiles (d_p >= 8, at
// most kWarpN), or one tile of 8/d_p groups (d_p < 8).
RK_HD int grouped_job_tiles(int d_p) { return d_p >= 8 ? imin(kWarpN, d_p / 8) : 1; }

// Output pixel m of the run: image n, row oy, column ox.
struct OutPixel {
  int n, oy, ox;
};
RK_HD OutPixel out_pixel(const FusedBlockParams& p, const RunTile& t, int m) {
  const long long q = t.q0 + m;
  const long long r = q / t.twb;
  return {static_cast<int>(r / p.Ho), static_cast<int>(r % p.Ho), t.ox0 + static_cast<int>(q % t.twb)};
}

// Input pixel index (stacked row * W + column) of halo position h of the run.
RK_HD long long halo_pixel(const FusedBlockParams& p, const RunTile& t, int h) {
  const long long pos = t.p_lo + h;
  return (pos / t.hc) * p.W + t.hx_l + pos % t.hc;
}

// Whether padded width channel c (chunk-independent index) is a real
// channel: channel c % d_p of group c / d_p, with groups * d_p channels in
// all. Padded channels have zero weights, but 0 * inf is NaN: the kernel
// stores exact zeros there instead of computing them.
RK_HD bool real_width_channel(const FusedBlockParams& p, int c) { return c < p.groups * p.d_p && c % p.d_p < p.d; }

// The grouped conv's K position k (< KS2*kK) of output tile nt: tap (0..8,
// 9 or more: K padding) and the input channel, relative to the width chunk
// (whose first channel is a multiple of 8 and of d_p). K runs over atoms of
// `atom` contiguous channels: atoms_per_tap = max(8, d_p)/atom atoms per
// tap. d_p >= 8: tile nt is 8 output channels of one group and its atoms
// are that group's input channels; d_p < 8: tile nt is 8/d_p whole groups
// and atom i of a tap is group i's d_p input channels (the other groups'
// weights are zero: block-diagonal).
struct GroupedK {
  int tap, channel;
};
RK_HD GroupedK grouped_k(int d_p, int atom, int nt, int k) {
  const int a = k / atom, j = k % atom;
  const int atoms_per_tap = (d_p > 8 ? d_p : 8) / atom;
  const int base = (nt * 8 / d_p) * d_p;  // first input channel: the tile's (first) group
  return {a / atoms_per_tap, base + (a % atoms_per_tap) * atom + j};
}

}  // namespace rk
