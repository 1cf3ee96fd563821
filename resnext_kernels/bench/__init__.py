"""Benchmark tooling, the top layer: nothing else in the package imports it.

shapes          the canonical block shapes, dtypes, FLOP and byte-floor counts
measure         device settings, timing with rotating inputs, ceilings
cases           the implementations compared, blocks, inputs, error vs float64
cli             python -m resnext_kernels bench
report          markdown tables from result JSON (python -m resnext_kernels.bench_report)
plans           the CUDA kernel's tile plans, listed or timed (python -m resnext_kernels.cuda_plans)
triton_compile  ahead-of-time sm_90a compile check of the Triton kernels
"""
