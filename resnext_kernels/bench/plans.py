"""``python -m resnext_kernels.cuda_plans``: how good is the cuda planner's cost model?

The planner (csrc/fused_block_plan.h) ranks every tile plan that fits in
shared memory by an estimated cost whose constants were never checked on a
GPU. For each benchmark shape (SHAPES, batch 128, bfloat16 by default)
this times the kernel at every plan rank up to a cap (--ranks, default 8)
with CUDA events on rotating inputs (time_per_call), checks each rank's
output against the float64 reference (Case), and prints a markdown
table: the plans, their estimated cost and measured time, and per shape the
rank the cost model picks (0), the fastest rank, and the rank the backend's
autotuner would pick (the fastest of the first planner.AUTOTUNE_TOP_K).
--json PATH writes the raw numbers.

--list prints the candidate plans only (no timing, no GPU needed; at the
H100 opt-in limit of 232448 bytes unless --smem-limit or a visible GPU says
otherwise). Timing without a usable cuda backend exits with status 2; a rank
whose output is outside tolerance makes the status 1.
"""

import argparse
import json
import sys

import torch

from ..backends import registry
from ..backends.cuda import planner
from ..block import FusedResNeXtBlock
from ..common import settings
from ..common.timing import median
from .cases import Case, max_abs_error
from .measure import backend_settings, device_name, time_per_call
from .report import _table
from .shapes import SHAPES, block_flops, dtype_name, parse_dtype, parse_shapes


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m resnext_kernels.cuda_plans",
        description="Time the fused CUDA kernel at each candidate tile plan of the benchmark shapes, to check the "
                    "planner's cost model (or --list the candidates, no GPU needed).")
    parser.add_argument("--shapes", nargs="+", default=None, metavar="SHAPE",
                        help=f"shape names ({', '.join(SHAPES)}) or NAME=H:CIN:WIDTH:GROUPS:COUT:STRIDE; "
                             "default: all named shapes")
    parser.add_argument("--batch", type=_positive_int, default=128)
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16, float16 or float32 (fp32 runs without TF32, "
                        "as in the benchmarks, unless --tf32)")
    parser.add_argument("--tf32", action="store_true", help="--list only: float32 on TF32 tensor cores (the "
                        "kernel's TF32 path) instead of full fp32 FMA")
    parser.add_argument("--ranks", type=_positive_int, default=8, help="plan ranks per shape, from rank 0")
    parser.add_argument("--smem-limit", type=_positive_int, default=None,
                        help="shared-memory bytes per block, --list only (default: the GPU's opt-in maximum, "
                             f"else {settings.H100_SMEM_OPTIN}); timing uses the GPU's")
    parser.add_argument("--seconds", type=_positive_float, default=0.1, help="timing budget per rank")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and inputs")
    parser.add_argument("--list", action="store_true", help="print the candidate plans only (no timing, no GPU)")
    parser.add_argument("--json", metavar="PATH", default=None, help="write the raw numbers as JSON")
    args = parser.parse_args(argv)
    if args.smem_limit is not None and not args.list:
        parser.error("--smem-limit applies to --list only (timing uses the GPU's limit)")
    try:
        args.shapes = parse_shapes(args.shapes or list(SHAPES))
        args.dtype = parse_dtype(args.dtype)
    except ValueError as exc:
        parser.error(str(exc))
    if args.tf32 and (args.dtype != torch.float32 or not args.list):
        parser.error("--tf32 applies to --list with --dtype float32 only (timing runs fp32 without TF32, as the "
                     "benchmarks do)")
    return args


def math_name(args):
    """The kernel's math mode for the dtype: its MMA class."""
    if args.dtype != torch.float32:
        return dtype_name(args.dtype)
    return "float32 (TF32 tensor cores)" if args.tf32 else "float32 (FMA, no TF32)"


def shape_plans(shape, batch, dtype, smem_limit, allow_tf32):
    """The candidate plans of a benchmark shape (dilation 1), in rank order."""
    return planner.candidate_plans(batch, shape.hw, shape.hw, shape.cin, shape.width, shape.cout, shape.groups,
                                   shape.stride, 1, dtype, smem_limit, projection=shape.projection,
                                   allow_tf32=allow_tf32)


def mma_work(shape, batch, plan):
    """MACs the kernel's MMAs execute with this plan (the planner's count,
    plan.mma_macs: halo recompute, M padding of the last 16-row tile, the
    grouped conv's block-diagonal and K padding, channel padding and the
    Cout slices' recompute of conv1 and the grouped conv) over the block's
    own MACs (block_flops / 2). Derived from the kernel's loops (the
    emulator counts the same), not measured."""
    return plan.mma_macs / (block_flops(shape, batch) / 2)


def _plan_cells(name, plan):
    """Table cells of a plan (a TilePlan's _asdict(), or a timed entry)."""
    return ([name] + [str(plan[f]) for f in ("rank", "TW", "Mo", "WC", "CS", "nbuf", "smem", "halo")]
            + [f"{plan['cost']:.4g}", f"{plan['mma_work']:.3f}x"])


_PLAN_HEADER = ["shape", "rank", "TW", "Mo", "WC", "CS", "nbuf", "smem (B)", "halo px", "est. cost", "MMA work"]


def list_plans(args):
    limit = args.smem_limit
    if limit is None:
        limit = (torch.cuda.get_device_properties(0).shared_memory_per_block_optin if torch.cuda.is_available()
                 else settings.H100_SMEM_OPTIN)
    shapes, lines = [], []
    for shape in args.shapes:
        plans = shape_plans(shape, args.batch, args.dtype, limit, args.tf32)
        listed = [{**p._asdict(), "mma_work": mma_work(shape, args.batch, p)} for p in plans[:args.ranks]]
        shapes.append({"shape": shape.name, "spec": shape.spec(), "plans_fitting": len(plans), "plans": listed})
        lines += [_plan_cells(shape.name, p) + [f"{p['grid_x']}, {p['grid_y']}"] for p in listed]
    print(f"Candidate tile plans, batch {args.batch}, {math_name(args)}, shared-memory limit {limit} B "
          f"(first {args.ranks} ranks of each shape; rank 0 is the cost model's choice; MMA work = executed MMA "
          "multiply-accumulates / the block's)\n")
    print(_table(_PLAN_HEADER + ["grid"], lines))
    print("\n" + ", ".join(f"{s['shape']}: {s['plans_fitting']} plans fit" for s in shapes))
    return {"batch": args.batch, "dtype": dtype_name(args.dtype), "math": math_name(args), "smem_limit": limit,
            "shapes": shapes}


def _time_shape(shape, args, limit, device):
    """Timings and errors of the first args.ranks plans of one shape."""
    case = Case(shape, args.batch, args.dtype, device, args.seed)
    module = FusedResNeXtBlock.from_bottleneck(case.block, backend="cuda").eval().to(device=device, dtype=args.dtype)
    with torch.no_grad():
        w1, b1, w2, b2, w3, b3, wd, bd = module.folded_parameters(args.dtype)
        packed = torch.ops.resnext_kernels.fused_block_pack_weights(w1, b1, w2, b2, w3, b3, wd, bd, shape.groups)
    wdp = packed[6] if wd is not None else None
    inputs = case.inputs_for("cuda")
    k = case.y_ref.shape[0]
    plans = shape_plans(shape, args.batch, args.dtype, limit, args.tf32)
    results = []
    for plan in plans[:args.ranks]:
        def run(x, rank=plan.rank):
            return torch.ops.resnext_kernels.fused_block_forward(
                x, *packed[:6], wdp, shape.width, shape.cout, shape.stride, 1, shape.groups,
                False, 0, rank)

        with torch.no_grad():
            error = max_abs_error(run(inputs[0])[:k], case.y_ref)
            times = time_per_call(run, inputs, device, args.seconds)
        results.append({**plan._asdict(), "mma_work": mma_work(shape, args.batch, plan),
                        "ms": median(times) * 1e3, "rounds": len(times),
                        **case.error_info(error)})
    return {"shape": shape.name, "spec": shape.spec(), "plans_fitting": len(plans), "n_inputs": case.n_inputs,
            "plans": results}


def summarize(entry, top_k=planner.AUTOTUNE_TOP_K):
    """Adds the fastest rank and the autotuner's pick (fastest of the first top_k) to a shape's entry."""
    ms = [p["ms"] for p in entry["plans"]]
    fastest = min(range(len(ms)), key=ms.__getitem__)
    tuned = min(range(min(top_k, len(ms))), key=ms.__getitem__)
    entry.update(fastest_rank=fastest, autotune_rank=tuned, model_vs_fastest=ms[0] / ms[fastest],
                 autotune_vs_fastest=ms[tuned] / ms[fastest])
    return entry


def time_plans(args):
    device = torch.device("cuda")
    limit = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    shapes = []
    with backend_settings(device) as settings:
        for shape in args.shapes:
            shapes.append(summarize(_time_shape(shape, args, limit, device)))
            torch.cuda.empty_cache()
    lines, summary = [], []
    for s in shapes:
        best = s["plans"][s["fastest_rank"]]["ms"]
        for p in s["plans"]:
            mark = " (fastest)" if p["rank"] == s["fastest_rank"] else ""
            lines.append(_plan_cells(s["shape"], p) + [f"{p['ms']:.4f}{mark}", f"{p['ms'] / best:.2f}x",
                                                        "yes" if p["within_tolerance"] else "NO"])
        summary.append([s["shape"], str(s["plans_fitting"]), str(len(s["plans"])), str(s["fastest_rank"]),
                        f"{s['model_vs_fastest']:.2f}x", str(s["autotune_rank"]), f"{s['autotune_vs_fastest']:.2f}x"])
    print(f"Tile plans timed on {device_name(device)}, batch {args.batch}, {math_name(args)}, "
          f"shared-memory limit {limit} B, median of CUDA-event rounds over rotating inputs\n")
    print(_table(_PLAN_HEADER + ["ms", "vs fastest", "within tol."], lines))
    print()
    print(_table(["shape", "plans fit", "ranks timed", "fastest rank", "rank 0 vs fastest",
                  f"autotune pick (top {planner.AUTOTUNE_TOP_K})", "its time vs fastest"], summary))
    return {"device": device_name(device), "batch": args.batch, "dtype": dtype_name(args.dtype), "math": math_name(args),
            "smem_limit": limit, "settings": settings, "seconds_per_rank": args.seconds,
            "autotune_top_k": planner.AUTOTUNE_TOP_K, "shapes": shapes}


def main(argv=None):
    args = parse_args(argv)
    if args.list:
        try:
            doc = list_plans(args)
        except RuntimeError as exc:  # no _C, or one built before fused_block_plans existed
            print(f"cuda_plans: {exc}", file=sys.stderr)
            return 2
    else:
        reason = registry.unavailable_reason("cuda", "cuda")
        if reason is not None:
            print(f"cuda_plans: timing the plans needs the cuda backend on a GPU: {reason}. "
                  "--list prints the candidate plans without one.", file=sys.stderr)
            return 2
        doc = time_plans(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    if args.list:
        return 0
    bad = [(s["shape"], p["rank"]) for s in doc["shapes"] for p in s["plans"] if not p["within_tolerance"]]
    if bad:
        print(f"outside tolerance (shape, rank): {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
