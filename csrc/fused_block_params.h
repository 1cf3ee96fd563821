// The fused block kernel's launch constants and parameter block: plain C++
// (no CUDA or emulator headers), so the planner (fused_block_plan.h) can be
// compiled into resnext_kernels._C's C++ part and run without a GPU, while
// the kernel (fused_block_kernel.cuh) uses the very same definitions.
#pragma once

namespace rk {

constexpr int kThreads = 256;  // 8 warps per block
constexpr int kWarps = kThreads / 32;
constexpr int kTileW = 16;     // output tile width: one 16-row MMA tile per output row
constexpr int kMaxKC = 64;     // largest input-channel chunk (the planner's KC)
constexpr int kMaxAcc = 7;     // register accumulators per warp (conv1 pass, strip rows); TH <= kMaxAcc

// Everything the kernel needs, computed on the host (fused_block_plan.h, fused_block_host.h).
//
// Tensors (all contiguous, element type T of the policy unless noted):
//   x    [N, H, W, Cin]            NHWC activations (channels_last x)
//   y    [N, Ho, Wo, Cout]         NHWC output
//   w1p  [Cin_p, Wp]               conv1 as a K x N row-major GEMM operand;
//                                  column pc = g*d_p + j is channel j of group
//                                  g (padded width), padding rows/cols zero
//   b1p  [Wp] float
//   w2p  [Wp/16][9][KT][16][16]    grouped 3x3 conv: for output tile ot, tap
//                                  (ky*3+kx), K tile kt: a 16x16 row-major
//                                  (input row, output col) block. d_p <= 16:
//                                  block-diagonal over the 16/d_p groups of
//                                  the tile, KT = 1. d_p > 16: rows are input
//                                  channels kt*16.. of the tile's group,
//                                  KT = d_p/16.
//   b2p  [Wp] float
//   w3p  [Wp, Cout_p]              conv3, K x N row-major
//   b3p  [Cout_p] float            b3 (+ bd with a projection shortcut)
//   wdp  [Cin_p, Cout_p] or null   projection shortcut, K x N row-major
// Sizes: Cin_p = Cin rounded up to 16, Cout_p likewise, d_p = d rounded up
// to a power of two (d <= 16) or to a multiple of 16, Wp = groups*d_p rounded
// up to 16.
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
  int N, H, W, Cin, Cout, Ho, Wo;  // N: the batch (grid.z), used by the host
  int Cin_p, Wp, Cout_p, d_p, KT, stride, dil;
  // Tiling: blockIdx.x = (n * tiles_y + ty) * tiles_x + tx owns output rows
  // [ty*TH, ty*TH+TH) x cols [tx*16, tx*16+16) of image n; blockIdx.y owns
  // output channels [blockIdx.y*CS, +CS).
  int TH, tiles_x, tiles_y;
  int HWp;       // halo tile width (input pixels): 15*stride + 2*dil + 1
  int P1, Mp1;   // halo pixels ((TH-1)*stride + 2*dil + 1 rows x HWp), rounded up to 16
  int Mo;        // output pixels per tile = TH*16
  int KC;        // input-channel chunk streamed through shared memory
  int WC;        // width chunk (padded channels of t1/t2 kept at once)
  int CS;        // output-channel slice of one block
  // Shared memory (byte offsets from the dynamic base) and row pitches
  // (elements). xs (x chunk) and t2s alias; scratch is kWarps 16x16 fp32
  // tiles, one per warp.
  int off_xs, off_t1, off_y, off_scratch;
  int pitch_xs, pitch_t2, pitch_t1, pitch_y;
  int nbuf;    // x chunk buffers for conv1: 2 = prefetch the next chunk (cp.async)
  int xs_buf;  // elements per x chunk buffer (Mp1 * pitch_xs)
  // 16-byte vector access is possible: vec_x for x (Cin a multiple of the
  // vector width, x 16-byte aligned), vec_y for y and the identity shortcut.
  int vec_x, vec_y;
};

}  // namespace rk
