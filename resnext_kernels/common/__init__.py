"""Leaves of the package: facts and primitives every layer above may use.

settings     dtypes, environment switches, device limits
sizes        integer helpers (cdiv, round_up, next_pow2) and the conv output size
layout       the output memory format rule (follows x: NCHW or channels_last)
validation   argument checks shared by the layers above
tolerance    the one "close to PyTorch" rule of tests and benchmarks
timing       synchronizing, timing rounds of calls, medians, cache size
tuning       choosing the fastest of correct alternatives, once per problem
extension    loading the compiled extension resnext_kernels._C
toolkit      finding the CUDA toolkit (also used by setup.py)
weight_cache the packed-weight cache of the fused backends

Nothing here imports anything else of resnext_kernels except other leaves.
"""
