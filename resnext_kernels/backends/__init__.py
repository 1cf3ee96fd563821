"""Backends of the inference op: the registry and one room per backend.

registry     names, usability (and why not), resolving "auto", the kernel
             callable of each backend
reference    ATen composite ops (any device, the ground truth)
triton/      Triton kernels
cuda/        the CUDA kernel of resnext_kernels._C, and its CPU emulation

The registry imports the rooms; the rooms import only leaves
(resnext_kernels.common), never the registry or each other.
"""
