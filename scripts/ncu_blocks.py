"""Profile target for Nsight Compute (scripts/gpu_check.sh, stage "ncu").

For each shape and implementation: builds the block with resnext_kernels.bench.cases
(fresh random weights and input, error vs the float64 reference printed), runs
it twice outside the profiled range (torch.compile, Triton autotuning, the
packed-weight caches and the CUDA plan tuning all happen there), then once
between torch.cuda.profiler.start() and stop(), so that

    ncu --profile-from-start off python scripts/ncu_blocks.py ...

profiles exactly one forward per case. Needs a CUDA device.
"""

import argparse
import sys

import torch

from resnext_kernels.bench.cases import Case, impl_unavailable_reason
from resnext_kernels.bench.shapes import parse_dtype, parse_shapes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="s1,s4", help="comma-separated bench shape names (default: s1,s4)")
    parser.add_argument("--impls", default="cuda,triton", help="comma-separated bench impls (default: cuda,triton)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("ncu_blocks.py needs a CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    dtype = parse_dtype(args.dtype)
    impls = args.impls.split(",")
    for shape in parse_shapes([args.shapes]):
        case = Case(shape, args.batch, dtype, device, args.seed, n_inputs=1)
        for impl in impls:
            reason = impl_unavailable_reason(impl, device, dtype)
            if reason is not None:
                print(f"{shape.name} {impl}: skipped: {reason}")
                continue
            fn, _, error = case.build(impl)
            x = case.inputs_for(impl)[0]
            fn(x)
            torch.cuda.synchronize()
            torch.cuda.nvtx.range_push(f"{shape.name}-{impl}")
            torch.cuda.profiler.start()
            fn(x)
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
            torch.cuda.nvtx.range_pop()
            status = "ok" if error <= case.tolerance else "OUT OF TOLERANCE"
            print(f"{shape.name} {impl}: max abs error {error:.3g} (tolerance {case.tolerance:.3g}) {status}")
        del case
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
