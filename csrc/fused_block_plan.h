// The tile / shared-memory planner of the fused block kernel: which band
// width TW, run length Mo, width chunk WC, output-channel slice CS and
// number of x chunk buffers to run with, where everything sits in shared
// memory, how many multiply-accumulates the MMAs execute and what the plan
// is estimated to cost. Plain C++ (no CUDA or emulator headers), shared by
// the CUDA op (fused_block_cuda.cu), the emulation build
// (emulation/fused_block_emu.cpp) and resnext_kernels._C's
// fused_block_plans op (fused_block_ops.cpp), which lists the candidate
// plans without a GPU.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <map>
#include <mutex>
#include <numeric>
#include <tuple>
#include <utility>
#include <vector>

#include "fused_block_params.h"

namespace rk {

inline int round_up(int a, int b) { return (a + b - 1) / b * b; }
inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Group width padded for packing: a power of two up to 8 (8/d_p groups
// share one block-diagonal 8-channel MMA tile), else a multiple of 8 (a
// group spans d_p/8 tiles).
inline int padded_group_width(int d) {
  if (d > 8) return round_up(d, 8);
  int dp = 1;
  while (dp < d) dp *= 2;
  return dp;
}

// The padded sizes the packed weights are laid out in, and the MMA shape of
// the element size. They depend on the channel counts, groups and dtype
// only, not on the tile plan, so one packing serves every input size and
// shared-memory limit.
inline void set_padded_dims(FusedBlockParams& p, int Cin, int width, int Cout, int groups, int elem_bytes) {
  p.Cin_p = round_up(Cin, 16);
  p.Cout_p = round_up(Cout, 8);
  p.d = width / groups;
  p.groups = groups;
  p.d_p = padded_group_width(p.d);
  p.Wp = round_up(groups * p.d_p, 16);
  p.Wg = round_up(groups * p.d_p, 8);
  p.kK = elem_bytes == 2 ? 16 : 8;
  p.atom = std::min(8, p.d_p);
  p.KS2 = ceil_div(9 * std::max(8, p.d_p), p.kK);
  p.KC = std::min(kXChunkBytes / elem_bytes, p.Cin_p);
}

// Fills p's problem fields: sizes, padded sizes, output size (none of which
// depend on the plan).
inline void set_problem(FusedBlockParams& p, int N, int H, int W, int Cin, int width, int Cout, int groups,
                        int stride, int dil, bool projection, int elem_bytes) {
  set_padded_dims(p, Cin, width, Cout, groups, elem_bytes);
  p.proj = projection;
  p.N = N;
  p.H = H;
  p.W = W;
  p.Cin = Cin;
  p.Cout = Cout;
  p.stride = stride;
  p.dil = dil;
  p.Ho = (H - 1) / stride + 1;
  p.Wo = (W - 1) / stride + 1;
}

// Sets the tiling fields of p for band width tw and run length mo.
inline void set_tiling(FusedBlockParams& p, int tw, int mo) {
  p.TW = tw;
  p.Mo = mo;
  p.bands = ceil_div(p.Wo, tw);
  const int last = p.Wo - (p.bands - 1) * tw;
  auto runs = [&](int twb) {
    return static_cast<int>((static_cast<long long>(p.N) * p.Ho * twb + mo - 1) / mo);
  };
  p.runs_full = runs(tw);
  p.runs_last = runs(last);
}

// What the blocks of a tiling (TW, Mo) amount to, from run_tile: how many
// blocks have each number of 16-row halo tiles (conv1) and output tiles,
// the largest halo, and the halo pixels in all. Computed over one period of
// runs per band (a run's halo depends on where it starts inside an image),
// so it costs O(Ho * Wo), not O(blocks).
struct TilingStats {
  int m1_max = 0;
  long long blocks = 0, halo_pixels = 0, out_pixels = 0;
  std::map<int, long long> mt1_count;                  // ceil(m1/16) -> blocks
  std::map<int, long long> mto_count;                  // ceil(mout/16) -> blocks
  std::map<std::pair<int, int>, long long> mt_count;   // (ceil(m1/16), ceil(mout/16)) -> blocks
};

inline TilingStats tiling_stats(const FusedBlockParams& p) {
  TilingStats st;
  auto add = [&](const RunTile& t, long long times) {
    if (times == 0) return;
    const int mt1 = ceil_div(t.m1, 16), mto = ceil_div(t.mout, 16);
    st.m1_max = std::max(st.m1_max, t.m1);
    st.blocks += times;
    st.halo_pixels += times * t.m1;
    st.out_pixels += times * t.mout;
    st.mt1_count[mt1] += times;
    st.mto_count[mto] += times;
    st.mt_count[{mt1, mto}] += times;
  };
  // Bands differ (the first and last are clipped at the image border, and
  // with dilation > stride the last but one may be too); there are at most
  // 8 (band_widths).
  for (int band = 0; band < p.bands; ++band) {
    const bool last = band == p.bands - 1;
    const int runs = last ? p.runs_last : p.runs_full;
    const long long first = static_cast<long long>(band) * p.runs_full;
    const int twb = std::min(p.TW, p.Wo - band * p.TW);
    // Runs 0 .. runs-2 are whole (Mo pixels); their halos repeat with the
    // run's start inside an image, i.e. with period image / gcd(Mo, image).
    const long long image = static_cast<long long>(p.Ho) * twb;
    const long long period = image / std::gcd(static_cast<long long>(p.Mo), image);
    const long long whole = runs - 1;
    const long long distinct = std::min(whole, period);
    for (long long j = 0; j < distinct; ++j) {
      add(run_tile(p, first + j), whole / period + (j < whole % period ? 1 : 0));
    }
    add(run_tile(p, first + runs - 1), 1);
  }
  return st;
}

// One candidate plan: its tiling, the dynamic shared memory it needs, the
// largest halo, the multiply-accumulates its MMAs execute in the whole
// launch, and its estimated cost.
struct TilePlan {
  int TW, Mo, WC, CS, nbuf;
  size_t smem;
  int halo;
  double mma_macs;
  double cost;
  bool budget_pick = false;  // the cheapest plan within kMmaWorkBudget (ranks first)
};

// The MMA-work budget: executed MMA multiply-accumulates (halo recompute,
// padding, Cout-slice recompute included) over the block's own. Past it the
// block stops being memory-bound on an H100/H200 (docs/cuda_backend.md,
// "MMA work"), so rank 0 is the cheapest estimate within it when any plan
// is; the cost model, a guess, still orders everything else, and the
// backend's autotuning times rank 0 against the next cheapest estimates.
constexpr double kMmaWorkBudget = 1.25;

// The block's own multiply-accumulates: conv1, the grouped 3x3, conv3 and
// the projection (the same count as bench.shapes.block_flops / 2; the plan
// table's MMA work column is checked against it in the tests).
inline double block_macs(int N, int H, int W, int Cin, int width, int Cout, int groups, int stride,
                         bool projection) {
  const double in_px = double(N) * H * W;
  const double out_px = double(N) * ((H - 1) / stride + 1) * ((W - 1) / stride + 1);
  return in_px * Cin * width + out_px * width * (width / groups) * 9.0 + out_px * width * Cout +
         (projection ? out_px * Cin * Cout : 0.0);
}

// Rows of the x chunk buffer a streamed GEMM phase needs: the jobs (m-block
// of kWarpM 16-row tiles, n-group of job_tiles_n 8-column tiles), n-group
// fastest, run kWarps at a time, and each round streams the rows of its
// m-blocks (at most mt 16-row tiles, ncols output columns). Fewer n-groups
// put more m-blocks in a round.
inline int round_rows_max(int mt, int ncols) {
  const int ngroups = ceil_div(ncols, 8 * job_tiles_n(mt, ncols));
  const int jobs = ceil_div(mt, kWarpM) * ngroups;
  int rows = 0;
  for (int r0 = 0; r0 < jobs; r0 += kWarps) {
    const int lo = r0 / ngroups, hi = (std::min(jobs, r0 + kWarps) - 1) / ngroups;
    rows = std::max(rows, std::min((hi + 1) * kJobRows, mt * 16) - lo * kJobRows);
  }
  return rows;
}

// Lays out the plan (TW, Mo, WC, CS, nbuf) in p (problem fields from
// set_problem, tiling and stats of the same TW, Mo). Returns the dynamic
// shared-memory bytes. The one place these fields are computed, for the
// candidates' sizes as for the plan a launch runs with.
inline size_t apply_plan(FusedBlockParams& p, const TilingStats& st, int wc, int cs, int nbuf, int elem_bytes) {
  auto align = [](size_t v) { return (v + 127) / 128 * 128; };
  const int pad = kRowPadBytes / elem_bytes;
  p.WC = wc;
  p.CS = cs;
  p.nbuf = nbuf;
  p.pitch_t2 = p.Wp + pad;
  p.pitch_t1 = wc + pad;
  p.pitch_xs = p.KC + pad;
  const int mo_p = round_up(p.Mo, 16);
  const int mt1 = ceil_div(st.m1_max, 16);
  const int last_wc = p.Wp - (ceil_div(p.Wp, wc) - 1) * wc;  // the last width chunk may be narrower
  int rows1 = 0;
  for (int mt = 1; mt <= mt1; ++mt) {  // a block's halo may have fewer tiles, hence wider jobs
    rows1 = std::max({rows1, round_rows_max(mt, wc), round_rows_max(mt, last_wc)});
  }
  const int last_cs = p.Cout_p - (ceil_div(p.Cout_p, cs) - 1) * cs;
  int rowsp = 0;
  for (int mt = 1; p.proj && mt <= mo_p / 16; ++mt) {
    rowsp = std::max({rowsp, round_rows_max(mt, std::min(cs, p.Cout_p)), round_rows_max(mt, last_cs)});
  }
  p.xs_buf1 = rows1 * p.pitch_xs;
  p.xs_bufp = rowsp * p.pitch_xs;
  const size_t t2 = align(static_cast<size_t>(mo_p) * p.pitch_t2 * elem_bytes);
  p.halo_cap = st.m1_max;
  const size_t t1 = align(static_cast<size_t>(1 + st.m1_max) * p.pitch_t1 * elem_bytes);
  const size_t xs1 = align(static_cast<size_t>(nbuf) * p.xs_buf1 * elem_bytes);
  const size_t xsp = align(static_cast<size_t>(nbuf) * p.xs_bufp * elem_bytes);
  const size_t rows = align(static_cast<size_t>(std::max(rows1, rowsp)) * 4);
  p.off_t2 = 0;
  p.off_t1 = static_cast<int>(t2);
  p.off_xs1 = static_cast<int>(t2 + t1);
  p.off_xsp = static_cast<int>(t2);  // the projection streams x after the last grouped conv: t1s and xs1 are free
  p.off_rows = static_cast<int>(t2 + std::max(t1 + xs1, xsp));
  return p.off_rows + rows;
}

// The multiply-accumulates the kernel's MMAs execute in the whole launch
// with the plan in p (the loops of fused_block_kernel.cuh): per block and
// Cout slice, conv1 on ceil(m1/16) 16-row tiles x Wp x Cin_p and the
// grouped conv on ceil(mout/16) tiles x Wg x KS2*kK (both recomputed by
// every Cout slice; Wg: the channels of real groups, t2 is zero past them);
// per block, conv3 on ceil(mout/16) tiles x Cout_p x Wp and the projection
// x Cout_p x Cin_p. The emulator counts the same on every launch
// (tests/test_cuda_kernel.py), and tests/cuda_cases.py re-derives it block
// by block.
inline double plan_mma_macs(const FusedBlockParams& p, const TilingStats& st) {
  const int slices = ceil_div(p.Cout_p, p.CS);
  double rows1 = 0, rowso = 0;
  for (const auto& [mt, n] : st.mt1_count) rows1 += 16.0 * mt * n;
  for (const auto& [mt, n] : st.mto_count) rowso += 16.0 * mt * n;
  const double conv1 = rows1 * p.Wp * p.Cin_p;
  const double grouped = rowso * p.Wg * static_cast<double>(p.KS2) * p.kK;
  const double conv3 = rowso * p.Cout_p * (static_cast<double>(p.Wp) + (p.proj ? p.Cin_p : 0));
  return slices * (conv1 + grouped) + conv3;
}

// The cost model: an estimate of the launch's time in SM clock cycles on
// an H100-class GPU (kSms SMs, one block per SM). A guess never checked on
// a GPU: the backend times the top few candidates (backends/cuda/planner.py)
// and `python -m resnext_kernels.cuda_plans` times them all. Per block:
//   - MMA time: each phase runs its warp jobs in rounds of kWarps; the 8
//     warps share the SM's 4 tensor-core partitions, so a round takes
//     ceil(jobs/4) job times (a round of 1 job runs at a quarter of the
//     SM's rate); rates per SM and clock: kMacRate16 (fp16/bf16 mma.sync:
//     half of H100's dense wgmma peak of ~2048), kMacRateTf32, kMacRateFma
//     (fp32 on the 128 CUDA cores);
//   - L2 time: x streamed through shared memory (conv1: the halo, once per
//     width chunk and Cout slice; the projection: the output pixels, once
//     per round holding the m-block), the weights once per block and slice,
//     the identity shortcut and y, at kL2Bytes per SM and clock (~5.5 TB/s);
//   - with two x buffers loads overlap the MMAs (max), with one they do not
//     (sum);
// summed over blocks and spread over kSms SMs, but never under the HBM
// floor (x, y and the weights once, kHbmBytes per SM and clock), and
// divided by the last wave's utilisation.
constexpr double kSms = 132;
constexpr double kMacRate16 = 1024, kMacRateTf32 = 512, kMacRateFma = 128;
constexpr double kL2Bytes = 24, kHbmBytes = 14.5;

// Clocks of one GEMM phase: mt 16-row tiles x ncols output columns, K
// deep, in warp jobs of kWarpM tiles x job_cols columns (0: job_tiles_n's), m-block major,
// kWarps jobs per round. Warp w runs on tensor-core partition w % 4, so a
// round takes as long as its busiest partition's jobs (a job's time is its
// tiles' MACs at a quarter of the SM's rate).
inline double phase_clocks(int mt, int ncols, int job_cols, int K, double rate) {
  if (job_cols == 0) job_cols = 8 * job_tiles_n(mt, ncols);
  const int ngroups = ceil_div(ncols, job_cols);
  const int jobs = ceil_div(mt, kWarpM) * ngroups;
  double clocks = 0;
  for (int r0 = 0; r0 < jobs; r0 += kWarps) {
    double busiest = 0;
    for (int part = 0; part < 4; ++part) {
      double macs = 0;
      for (int job = r0 + part; job < std::min(jobs, r0 + kWarps); job += 4) {
        const int rows = 16 * std::min(kWarpM, mt - (job / ngroups) * kWarpM);
        const int cols = std::min(job_cols, ncols - (job % ngroups) * job_cols);
        macs += static_cast<double>(rows) * cols * K;
      }
      busiest = std::max(busiest, macs);
    }
    clocks += busiest * 4 / rate;
  }
  return clocks;
}

inline double plan_cost(const FusedBlockParams& p, const TilingStats& st, int elem_bytes, bool fma) {
  const double rate = elem_bytes == 2 ? kMacRate16 : fma ? kMacRateFma : kMacRateTf32;
  const int slices = ceil_div(p.Cout_p, p.CS);
  const int chunks = ceil_div(p.Wp, p.WC);
  const double e = elem_bytes;
  double mma = 0, l2 = 0;
  for (const auto& [mts, n] : st.mt_count) {
    const auto [mt1, mto] = mts;
    double per_slice = 0;
    for (int c = 0; c < chunks; ++c) {
      const int wc = std::min(p.WC, p.Wp - c * p.WC);
      per_slice += phase_clocks(mt1, wc, 0, p.Cin_p, rate);
      const int real = std::max(0, std::min(wc, p.Wg - c * p.WC));
      if (real > 0) per_slice += phase_clocks(mto, real, grouped_job_tiles(p.d_p) * 8, p.KS2 * p.kK, rate);
    }
    double conv3 = 0;
    for (int cs0 = 0; cs0 < p.Cout_p; cs0 += p.CS) {
      conv3 += phase_clocks(mto, std::min(p.CS, p.Cout_p - cs0), 0, p.Wp + (p.proj ? p.Cin_p : 0), rate);
    }
    mma += n * (slices * per_slice + conv3);
  }
  // L2 bytes: x halos per chunk and slice, the projection's x per round,
  // weights per block and slice, identity x and y.
  const double rounds_per_mblock = ceil_div(ceil_div(p.CS, kJobCols), kWarps);
  l2 += e * st.halo_pixels * p.Cin_p * chunks * slices;
  if (p.proj) l2 += e * st.out_pixels * p.Cin_p * rounds_per_mblock * slices;
  const double weights = e * (static_cast<double>(p.Cin_p) * p.Wp + static_cast<double>(p.Wp) * p.KS2 * p.kK +
                              static_cast<double>(p.CS) * (p.Wp + (p.proj ? p.Cin_p : 0)));
  l2 += weights * st.blocks * slices;
  l2 += e * st.out_pixels * p.Cout * (p.proj ? 1 : 2);
  const double hbm = e * (static_cast<double>(p.N) * p.H * p.W * p.Cin + static_cast<double>(st.out_pixels) * p.Cout);
  const double busy = p.nbuf == 2 ? std::max(mma, l2 / kL2Bytes) : mma + l2 / kL2Bytes;
  const double grid = static_cast<double>(st.blocks) * slices;
  const double waves = std::ceil(grid / kSms);
  return std::max(busy / kSms, hbm / (kHbmBytes * kSms)) * (waves * kSms / grid);
}

// Candidate band widths: the whole output width, and about a 2nd ... 8th
// of it (at least 4 columns).
inline std::vector<int> band_widths(int wo) {
  std::vector<int> tw = {wo};
  for (int k = 2; k <= 8; ++k) {
    const int w = ceil_div(wo, k);
    if (w >= 4 && std::find(tw.begin(), tw.end(), w) == tw.end()) tw.push_back(w);
  }
  return tw;
}

// Candidate width chunks: whole groups (multiples of max(8, d_p)), one per
// chunk count 1..8, 16, 32, ... (the smallest chunk giving that count).
inline std::vector<int> width_chunks(int wp, int d_p) {
  const int unit = std::max(8, d_p);
  std::vector<int> wcs;
  for (int c = 1; c <= ceil_div(wp, unit); c = c < 8 ? c + 1 : c * 2) {
    const int wc = std::min(wp, round_up(ceil_div(wp, c), unit));
    if (std::find(wcs.begin(), wcs.end(), wc) == wcs.end()) wcs.push_back(wc);
  }
  return wcs;
}

// Candidate Cout slices: all of Cout_p, about a half, a quarter, an eighth.
inline std::vector<int> cout_slices(int cout_p) {
  std::vector<int> css;
  for (int k = 1; k <= 8; k *= 2) {
    const int cs = round_up(ceil_div(cout_p, k), 8);
    if (std::find(css.begin(), css.end(), cs) == css.end()) css.push_back(cs);
  }
  return css;
}

constexpr int kMaxRun = 512;  // longest run (output pixels per block) considered

// Every plan that fits in smem_limit bytes, for the problem set in `problem`
// (set_problem), unordered. Candidates: band widths (band_widths) x runs of
// 16, 32, ... kMaxRun output pixels (at most the band's pixels) x width
// chunks x Cout slices x two x buffers (prefetch) or one. `fma`: fp32
// without TF32 (the cost model's rate).
inline bool ranks_before(const TilePlan& a, const TilePlan& b);

// Every plan that fits in smem_limit, unordered; the cheapest one whose MMA
// work is within kMmaWorkBudget of useful_macs (block_macs) is marked.
inline std::vector<TilePlan> fitting_plans(const FusedBlockParams& problem, double useful_macs, int elem_bytes,
                                           size_t smem_limit, bool fma) {
  std::vector<TilePlan> plans;
  for (const int tw : band_widths(problem.Wo)) {
    const long long band_pixels = static_cast<long long>(problem.N) * problem.Ho * tw;
    for (int mo = 16; mo <= kMaxRun; mo += 16) {
      if (mo - 16 >= band_pixels) break;  // one run holds the whole band already
      FusedBlockParams p = problem;
      set_tiling(p, tw, mo);
      // t2s alone must fit
      if (static_cast<size_t>(round_up(mo, 16)) * (p.Wp * elem_bytes + kRowPadBytes) > smem_limit) break;
      const TilingStats st = tiling_stats(p);
      for (const int wc : width_chunks(p.Wp, p.d_p)) {
        for (const int cs : cout_slices(p.Cout_p)) {
          for (int nbuf = 2; nbuf >= 1; --nbuf) {
            const size_t smem = apply_plan(p, st, wc, cs, nbuf, elem_bytes);
            if (smem > smem_limit) continue;
            plans.push_back({tw, mo, wc, cs, nbuf, smem, st.m1_max, plan_mma_macs(p, st),
                             plan_cost(p, st, elem_bytes, fma)});
          }
        }
      }
    }
  }
  TilePlan* pick = nullptr;
  for (TilePlan& t : plans) {
    if (t.mma_macs <= kMmaWorkBudget * useful_macs && (pick == nullptr || ranks_before(t, *pick))) pick = &t;
  }
  if (pick != nullptr) pick->budget_pick = true;
  return plans;
}

// The rank order: the budget pick first (see kMmaWorkBudget); then cheaper
// estimate first; equal estimates (plans at the HBM floor, say) prefer fewer
// executed MMA multiply-accumulates, then the longer run, the wider band,
// the wider width chunk, the wider Cout slice, two x buffers. A total order,
// so a rank names one plan however the list is sorted or selected.
inline bool ranks_before(const TilePlan& a, const TilePlan& b) {
  if (a.budget_pick != b.budget_pick) return a.budget_pick;
  if (a.cost != b.cost) return a.cost < b.cost;
  if (a.mma_macs != b.mma_macs) return a.mma_macs < b.mma_macs;
  return std::tie(b.Mo, b.TW, b.WC, b.CS, b.nbuf) < std::tie(a.Mo, a.TW, a.WC, a.CS, a.nbuf);
}

// Every plan that fits, in rank order (rank 0: the cheapest estimate within
// the MMA-work budget).
inline std::vector<TilePlan> candidate_plans(const FusedBlockParams& problem, double useful_macs, int elem_bytes,
                                             size_t smem_limit, bool fma) {
  std::vector<TilePlan> plans = fitting_plans(problem, useful_macs, elem_bytes, smem_limit, fma);
  std::sort(plans.begin(), plans.end(), ranks_before);
  return plans;
}

// Plans already selected by plan_fused_block, keyed by everything the
// selection depends on. Enumerating the candidates costs a few ms for a
// new problem; a hit costs a map lookup. Cleared when it reaches
// kPlanCacheSize entries (a model has a handful of shapes).
using PlanKey = std::array<int64_t, 14>;
constexpr size_t kPlanCacheSize = 4096;

struct PlanCache {
  std::mutex mutex;
  std::map<PlanKey, std::pair<FusedBlockParams, size_t>> plans;  // laid out, and its shared memory
};

inline PlanCache& plan_cache() {
  static PlanCache cache;
  return cache;
}

// Lays out plan t for the problem in p (tiling, stats, shared memory).
inline size_t lay_out(FusedBlockParams& p, const TilePlan& t, int elem_bytes) {
  set_tiling(p, t.TW, t.Mo);
  return apply_plan(p, tiling_stats(p), t.WC, t.CS, t.nbuf, elem_bytes);
}

// Fills p with the problem and the plan of rank `rank` (candidate_plans'
// order) among those that fit in smem_limit, and returns its dynamic
// shared-memory bytes. Raises, naming `op`, when nothing fits or rank is out
// of range. Runs on every launch: the selected plan is cached (plan_cache),
// and a miss selects the one plan (nth_element) instead of sorting them all.
inline size_t plan_fused_block(FusedBlockParams& p, int N, int H, int W, int Cin, int width, int Cout, int groups,
                               int stride, int dil, bool projection, int elem_bytes, bool fma, size_t smem_limit,
                               int64_t rank, const char* op) {
  set_problem(p, N, H, W, Cin, width, Cout, groups, stride, dil, projection, elem_bytes);
  const PlanKey key = {N,          H,  W,   Cin, width, Cout, groups, stride, dil, projection, elem_bytes, fma,
                       static_cast<int64_t>(smem_limit), rank};
  PlanCache& cache = plan_cache();
  {
    std::lock_guard<std::mutex> lock(cache.mutex);
    const auto hit = cache.plans.find(key);
    if (hit != cache.plans.end()) {
      p = hit->second.first;
      return hit->second.second;
    }
  }
  std::vector<TilePlan> plans =
      fitting_plans(p, block_macs(N, H, W, Cin, width, Cout, groups, stride, projection), elem_bytes, smem_limit, fma);
  TORCH_CHECK(!plans.empty(), op, ": no tile plan fits in ", smem_limit, " bytes of shared memory (Cin=", Cin,
              " width=", width, " Cout=", Cout, " stride=", stride, " dilation=", dil, ")");
  TORCH_CHECK(rank >= 0 && rank < static_cast<int64_t>(plans.size()), op, ": plan_rank=", rank,
              " is out of range: ", plans.size(), " tile plans fit in ", smem_limit,
              " bytes of shared memory (valid ranks 0..", plans.size() - 1, ")");
  std::nth_element(plans.begin(), plans.begin() + rank, plans.end(), ranks_before);
  const size_t smem = lay_out(p, plans[rank], elem_bytes);
  {
    std::lock_guard<std::mutex> lock(cache.mutex);
    if (cache.plans.size() >= kPlanCacheSize) cache.plans.clear();
    cache.plans.emplace(key, std::make_pair(p, smem));
  }
  return smem;
}

// Columns of plan_table.
constexpr int kPlanTableColumns = 12;

// The candidate plans of a problem, cheapest first, as a float64 tensor
// [count, 12] with columns TW, Mo, WC, CS, KC, nbuf, smem bytes, cost,
// grid.x, grid.y, largest halo (input pixels of one block), executed MMA
// multiply-accumulates (count 0 when nothing fits). Checks the arguments,
// naming `op`.
inline at::Tensor plan_table(int64_t N, int64_t H, int64_t W, int64_t Cin, int64_t width, int64_t Cout,
                             int64_t groups, int64_t stride, int64_t dilation, bool projection, int64_t elem_bytes,
                             bool allow_tf32, int64_t smem_limit, const char* op) {
  const std::pair<const char*, int64_t> sizes[] = {{"N", N},       {"H", H},           {"W", W},
                                                   {"Cin", Cin},   {"width", width},   {"Cout", Cout},
                                                   {"groups", groups}, {"stride", stride}, {"dilation", dilation},
                                                   {"smem_limit", smem_limit}};
  for (const auto& [name, value] : sizes) {
    TORCH_CHECK(value >= 1 && value < (int64_t(1) << 31), op, ": ", name, " must be in [1, 2^31), got ", value);
  }
  TORCH_CHECK(width % groups == 0, op, ": groups=", groups, " does not divide width=", width);
  TORCH_CHECK(elem_bytes == 2 || elem_bytes == 4, op, ": elem_bytes must be 2 (fp16/bf16) or 4 (fp32), got ",
              elem_bytes);
  TORCH_CHECK(N * H * W < (int64_t(1) << 31), op, ": N*H*W must be < 2^31, got ", N * H * W);
  FusedBlockParams p{};
  set_problem(p, N, H, W, Cin, width, Cout, groups, stride, dilation, projection, elem_bytes);
  const bool fma = elem_bytes == 4 && !allow_tf32;
  const std::vector<TilePlan> plans = candidate_plans(
      p, block_macs(N, H, W, Cin, width, Cout, groups, stride, projection), elem_bytes, smem_limit, fma);
  at::Tensor table = at::empty({static_cast<int64_t>(plans.size()), kPlanTableColumns}, at::kDouble);
  auto rows = table.accessor<double, 2>();
  for (size_t i = 0; i < plans.size(); ++i) {
    const TilePlan& t = plans[i];
    FusedBlockParams q = p;
    set_tiling(q, t.TW, t.Mo);
    const double row[kPlanTableColumns] = {double(t.TW),   double(t.Mo),   double(t.WC),
                                           double(t.CS),   double(q.KC),   double(t.nbuf),
                                           double(t.smem), t.cost,         double(run_count(q)),
                                           double(ceil_div(q.Cout_p, t.CS)), double(t.halo), t.mma_macs};
    for (int c = 0; c < kPlanTableColumns; ++c) rows[i][c] = row[c];
  }
  return table;
}

}  // namespace rk
