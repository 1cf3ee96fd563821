// The tile / shared-memory planner of the fused block kernel: which output
// tile height TH, width chunk WC, output-channel slice CS and number of x
// chunk buffers to run with, and where everything sits in shared memory.
// Plain C++ (no CUDA or emulator headers), shared by the CUDA op
// (fused_block_cuda.cu), the emulation build (emulation/fused_block_emu.cpp)
// and resnext_kernels._C's fused_block_plans op (fused_block_ops.cpp), which
// lists the candidate plans without a GPU.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

#include "fused_block_params.h"

namespace rk {

inline int round_up(int a, int b) { return (a + b - 1) / b * b; }
inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Group width padded for packing: a power of two up to 16 (16/d_p groups
// share one block-diagonal 16-wide tile), else a multiple of 16 (a group
// spans d_p/16 tiles).
inline int padded_group_width(int d) {
  if (d > 16) return round_up(d, 16);
  int dp = 1;
  while (dp < d) dp *= 2;
  return dp;
}

// The padded sizes the packed weights are laid out in. They depend on the
// channel counts and groups only, not on the tile plan, so one packing serves
// every input size and shared-memory limit.
inline void set_padded_dims(FusedBlockParams& p, int Cin, int width, int Cout, int groups) {
  p.Cin_p = round_up(Cin, 16);
  p.Cout_p = round_up(Cout, 16);
  p.d_p = padded_group_width(width / groups);
  p.KT = std::max(1, p.d_p / 16);
  p.Wp = round_up(groups * p.d_p, 16);
}

// Fills p's problem fields: sizes, padded sizes, output size, column tiles
// and the input-channel chunk (none of which depend on the plan).
inline void set_problem(FusedBlockParams& p, int N, int H, int W, int Cin, int width, int Cout, int groups,
                        int stride, int dil) {
  set_padded_dims(p, Cin, width, Cout, groups);
  p.N = N;
  p.H = H;
  p.W = W;
  p.Cin = Cin;
  p.Cout = Cout;
  p.stride = stride;
  p.dil = dil;
  p.Ho = (H - 1) / stride + 1;
  p.Wo = (W - 1) / stride + 1;
  p.tiles_x = ceil_div(p.Wo, kTileW);
  p.KC = std::min(kMaxKC, p.Cin_p);
}

// One candidate plan: its tiling, the dynamic shared memory it needs and its
// estimated cost (candidate_plans).
struct TilePlan {
  int TH, WC, CS, nbuf;
  size_t smem;
  double cost;
};

// Lays out the plan (th, wc, cs, nbuf) in p (problem fields from
// set_problem): the tiling and shared-memory fields. Returns the dynamic
// shared-memory bytes. The one place these fields are computed, for the
// candidates' sizes and costs as for the plan a launch runs with.
inline size_t apply_plan(FusedBlockParams& p, int th, int wc, int cs, int nbuf, int elem_bytes) {
  auto align = [](size_t v) { return (v + 127) / 128 * 128; };
  // Rows padded by 32 bytes: keeps every 16-row/16-column wmma tile pointer
  // 256-bit aligned and shifts consecutive rows by 8 banks.
  const int pad = 32 / elem_bytes;
  p.TH = th;
  p.tiles_y = ceil_div(p.Ho, th);
  p.HWp = (kTileW - 1) * p.stride + 2 * p.dil + 1;
  p.P1 = ((th - 1) * p.stride + 2 * p.dil + 1) * p.HWp;
  p.Mp1 = round_up(p.P1, 16);
  p.Mo = th * kTileW;
  p.WC = wc;
  p.CS = cs;
  p.pitch_xs = p.KC + pad;
  p.pitch_t2 = wc + pad;
  p.pitch_t1 = wc + pad;
  p.pitch_y = cs + 8;
  p.nbuf = nbuf;
  p.xs_buf = p.Mp1 * p.pitch_xs;
  const size_t xs_bytes = align(static_cast<size_t>(std::max(nbuf * p.xs_buf, p.Mo * p.pitch_t2)) * elem_bytes);
  const size_t t1_bytes = align(static_cast<size_t>(p.Mp1) * p.pitch_t1 * elem_bytes);
  const size_t y_bytes = align(static_cast<size_t>(p.Mo) * p.pitch_y * 4);
  const size_t scratch_bytes = static_cast<size_t>(kWarps) * 256 * 4;
  p.off_xs = 0;
  p.off_t1 = static_cast<int>(xs_bytes);
  p.off_y = static_cast<int>(xs_bytes + t1_bytes);
  p.off_scratch = static_cast<int>(xs_bytes + t1_bytes + y_bytes);
  return xs_bytes + t1_bytes + y_bytes + scratch_bytes;
}

// Grid of a launch with the plan laid out in p: (N * tile rows * tile
// columns, Cout slices).
inline std::pair<int64_t, int64_t> plan_grid(const FusedBlockParams& p) {
  return {static_cast<int64_t>(p.N) * p.tiles_y * p.tiles_x, ceil_div(p.Cout_p, p.CS)};
}

// Estimated work per output pixel of the plan laid out in p, in MAC units:
//   - conv1 is computed on the halo (Mp1 rows per Mo output rows) and, like
//     the grouped conv, once per Cout slice (recompute);
//   - x's halo is streamed once per width chunk, conv1 pass and slice, at
//     double the charge without the second x buffer (no prefetch);
//   - rows of the last tile row past the image are wasted.
// A guess never checked on a GPU: the backend times the top few candidates
// (resnext_kernels/cuda_backend.py), `python -m resnext_kernels.cuda_plans`
// times them all.
inline double plan_cost(const FusedBlockParams& p) {
  // Charge per re-streamed x element, in MAC units: an L2 read costs about
  // as much time as this many tensor-core MACs (rough, H100-class).
  constexpr double kRestreamCost = 16.0;
  const double row_waste = static_cast<double>(p.tiles_y * p.TH) / p.Ho;
  const int slices = ceil_div(p.Cout_p, p.CS);
  const int passes = ceil_div((p.Mp1 / 16) * (p.WC / 16), kWarps * kMaxAcc);
  const double halo = static_cast<double>(p.Mp1) / p.Mo;
  const double macs =
      slices * (halo * p.Cin_p * p.Wp + 9.0 * 16 * p.KT * p.Wp) + static_cast<double>(p.Wp) * p.Cout_p;
  const double restream = static_cast<double>(slices) * (p.Wp / p.WC) * passes * halo * p.Cin_p;
  // Loads not overlapped with MMAs (one buffer) are charged double.
  return row_waste * (macs + kRestreamCost * (3 - p.nbuf) * restream);
}

// Every plan that fits in smem_limit bytes, for the problem set in `problem`
// (set_problem), unordered. Candidates: TH from min(Ho, kMaxAcc) down to 1
// (a column strip holds one accumulator per output row), Cout slices CS from
// all of Cout down to 16 channels, width chunks WC of whole groups dividing
// the padded width, two x buffers (prefetch) or one.
inline std::vector<TilePlan> fitting_plans(const FusedBlockParams& problem, int elem_bytes, size_t smem_limit) {
  const int unit = std::max(16, problem.d_p);  // a chunk holds whole groups
  std::vector<TilePlan> plans;
  for (int th = std::min(problem.Ho, kMaxAcc); th >= 1; --th) {
    int prev_cs = -1;
    for (int nsl = 1; nsl <= problem.Cout_p / 16; ++nsl) {
      const int cs = round_up(ceil_div(problem.Cout_p, nsl), 16);
      if (cs == prev_cs) continue;
      prev_cs = cs;
      for (int wc = problem.Wp; wc >= unit; wc -= unit) {
        if (problem.Wp % wc != 0) continue;
        for (int nbuf = 2; nbuf >= 1; --nbuf) {
          FusedBlockParams p = problem;
          const size_t smem = apply_plan(p, th, wc, cs, nbuf, elem_bytes);
          if (smem <= smem_limit) plans.push_back({th, wc, cs, nbuf, smem, plan_cost(p)});
        }
      }
    }
  }
  return plans;
}

// The rank order: cheaper estimate first; equal estimates prefer the taller
// tile, then the wider Cout slice, the wider width chunk, two x buffers (the
// order the planner always broke ties in). A total order, so a rank names
// one plan however the list is sorted or selected.
inline bool ranks_before(const TilePlan& a, const TilePlan& b) {
  if (a.cost != b.cost) return a.cost < b.cost;
  return std::tie(b.TH, b.CS, b.WC, b.nbuf) < std::tie(a.TH, a.CS, a.WC, a.nbuf);
}

// Every plan that fits, in rank order (rank 0: the cheapest estimate).
inline std::vector<TilePlan> candidate_plans(const FusedBlockParams& problem, int elem_bytes, size_t smem_limit) {
  std::vector<TilePlan> plans = fitting_plans(problem, elem_bytes, smem_limit);
  std::sort(plans.begin(), plans.end(), ranks_before);
  return plans;
}

// Plans already selected by plan_fused_block, keyed by everything the
// selection depends on. Enumerating the candidates costs 5-20 us per launch
// (over a thousand plans for stage 4); a hit costs a map lookup. Cleared
// when it reaches kPlanCacheSize entries (a model has a handful of shapes).
using PlanKey = std::array<int64_t, 12>;
constexpr size_t kPlanCacheSize = 4096;

struct PlanCache {
  std::mutex mutex;
  std::map<PlanKey, TilePlan> plans;
};

inline PlanCache& plan_cache() {
  static PlanCache cache;
  return cache;
}

// Fills p with the problem and the plan of rank `rank` (candidate_plans'
// order) among those that fit in smem_limit, and returns its dynamic
// shared-memory bytes. Raises, naming `op`, when nothing fits or rank is out
// of range. Runs on every launch: the selected plan is cached (plan_cache),
// and a miss selects the one plan (nth_element) instead of sorting them all.
inline size_t plan_fused_block(FusedBlockParams& p, int N, int H, int W, int Cin, int width, int Cout, int groups,
                               int stride, int dil, int elem_bytes, size_t smem_limit, int64_t rank,
                               const char* op) {
  set_problem(p, N, H, W, Cin, width, Cout, groups, stride, dil);
  const PlanKey key = {N, H, W, Cin, width, Cout, groups, stride, dil, elem_bytes,
                       static_cast<int64_t>(smem_limit), rank};
  PlanCache& cache = plan_cache();
  {
    std::lock_guard<std::mutex> lock(cache.mutex);
    const auto hit = cache.plans.find(key);
    if (hit != cache.plans.end()) {
      const TilePlan& t = hit->second;
      return apply_plan(p, t.TH, t.WC, t.CS, t.nbuf, elem_bytes);
    }
  }
  std::vector<TilePlan> plans = fitting_plans(p, elem_bytes, smem_limit);
  TORCH_CHECK(!plans.empty(), op, ": no tile plan fits in ", smem_limit, " bytes of shared memory (Cin=", Cin,
              " width=", width, " Cout=", Cout, " stride=", stride, " dilation=", dil, ")");
  TORCH_CHECK(rank >= 0 && rank < static_cast<int64_t>(plans.size()), op, ": plan_rank=", rank,
              " is out of range: ", plans.size(), " tile plans fit in ", smem_limit,
              " bytes of shared memory (valid ranks 0..", plans.size() - 1, ")");
  std::nth_element(plans.begin(), plans.begin() + rank, plans.end(), ranks_before);
  const TilePlan& t = plans[rank];
  {
    std::lock_guard<std::mutex> lock(cache.mutex);
    if (cache.plans.size() >= kPlanCacheSize) cache.plans.clear();
    cache.plans.emplace(key, t);
  }
  return apply_plan(p, t.TH, t.WC, t.CS, t.nbuf, elem_bytes);
}

// Columns of plan_table.
constexpr int kPlanTableColumns = 9;

// The candidate plans of a problem, cheapest first, as a float64 tensor
// [count, 9] with columns TH, WC, CS, KC, nbuf, smem bytes, cost, grid.x,
// grid.y (count 0 when nothing fits). Checks the arguments, naming `op`.
inline at::Tensor plan_table(int64_t N, int64_t H, int64_t W, int64_t Cin, int64_t width, int64_t Cout,
                             int64_t groups, int64_t stride, int64_t dilation, int64_t elem_bytes,
                             int64_t smem_limit, const char* op) {
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
  FusedBlockParams p{};
  set_problem(p, N, H, W, Cin, width, Cout, groups, stride, dilation);
  const std::vector<TilePlan> plans = candidate_plans(p, elem_bytes, smem_limit);
  at::Tensor table = at::empty({static_cast<int64_t>(plans.size()), kPlanTableColumns}, at::kDouble);
  auto rows = table.accessor<double, 2>();
  for (size_t i = 0; i < plans.size(); ++i) {
    const TilePlan& t = plans[i];
    FusedBlockParams q = p;
    apply_plan(q, t.TH, t.WC, t.CS, t.nbuf, elem_bytes);
    const auto [gx, gy] = plan_grid(q);
    const double row[kPlanTableColumns] = {double(t.TH), double(t.WC), double(t.CS),  double(q.KC), double(t.nbuf),
                                           double(t.smem), t.cost,     double(gx),    double(gy)};
    for (int c = 0; c < kPlanTableColumns; ++c) rows[i][c] = row[c];
  }
  return table;
}

}  // namespace rk
