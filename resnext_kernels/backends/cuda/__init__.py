"""The `cuda` and `cuda_emulated` backends.

``cuda``: the fused block kernel of csrc/fused_block_kernel.cuh compiled into
``resnext_kernels._C``, as two ops: ``resnext_kernels::fused_block_pack_weights``
packs the folded weights into the kernel's padded layouts and
``resnext_kernels::fused_block_forward`` runs the block on them (one launch).

``cuda_emulated`` (testing only): the same ops, schemas and kernel source
compiled for the CPU against an emulator (emulation.py), as
``resnext_kernels_emu::fused_block_pack_weights`` / ``fused_block_forward``.

Both backends pack the weights once and keep the result in PACK_CACHE
(common.weight_cache.WeightCache: a weight modified in place or freed is
repacked; weights made under torch.inference_mode are packed on every call).
The forward op takes x, the packed tensors, the real width and Cout, stride,
dilation, groups, ``allow_tf32`` (fp32 inputs on TF32 tensor cores when True,
fp32 FMA when False; the backends pass ``torch.backends.cudnn.allow_tf32``
like cuDNN convolutions do), ``smem_limit`` (bytes the tile plan may use;
0 = the device's opt-in maximum on CUDA; the emulation plans for
``settings.H100_SMEM_OPTIN``) and ``plan_rank`` (which of the tile plans that
fit to run, in the order of the planner's cost estimate; planner.py lists
them and, on CUDA, times the first few).
"""

import torch

from ...common import extension, settings, tuning
from ...common.layout import output_memory_format
from ...common.sizes import conv_output_size
from ...common.weight_cache import WeightCache
from . import emulation, planner

PACK_CACHE = WeightCache()


def _fake_pack_weights(w1, b1, w2, b2, w3, b3, wd, bd, groups):
    dims = planner.padded_dims(w1.shape[1], w1.shape[0], w3.shape[0], groups, w1.element_size())
    e = dims.kk // 4  # elements per lane of a fragment-ordered B tile
    f32 = torch.float32
    packed = [
        w1.new_empty(dims.cin_p // dims.kk, dims.wp // 8, 32, e),
        w1.new_empty(dims.wp, dtype=f32),
        w1.new_empty(dims.wp // 8, dims.ks2, 32, e),
        w1.new_empty(dims.wp, dtype=f32),
        w1.new_empty(dims.wp // dims.kk, dims.cout_p // 8, 32, e),
        w1.new_empty(dims.cout_p, dtype=f32),
    ]
    if wd is not None:
        packed.append(w1.new_empty(dims.cin_p // dims.kk, dims.cout_p // 8, 32, e))
    return packed


def _fake_forward(x, w1p, b1p, w2p, b2p, w3p, b3p, wdp, width, cout, stride, dilation, groups, allow_tf32,
                  smem_limit=0, plan_rank=0):
    n, _, h, w = x.shape
    shape = (n, cout, conv_output_size(h, stride), conv_output_size(w, stride))
    return x.new_empty(shape).contiguous(memory_format=output_memory_format(x))


def _register_fakes(namespace):
    torch.library.register_fake(f"{namespace}::fused_block_pack_weights")(_fake_pack_weights)
    torch.library.register_fake(f"{namespace}::fused_block_forward")(_fake_forward)


if extension.extension() is not None and hasattr(torch.ops.resnext_kernels, "fused_block_forward"):
    _register_fakes("resnext_kernels")
emulation.on_load(lambda: _register_fakes(emulation.NAMESPACE))


def _run(lib, x, w1, b1, w2, b2, w3, b3, wd, bd, stride, dilation, groups, smem_limit, autotune, emulated=False):
    packed = PACK_CACHE.get(
        lambda: lib.fused_block_pack_weights(w1, b1, w2, b2, w3, b3, wd, bd, groups),
        (w1, b1, w2, b2, w3, b3, wd, bd),
        # Nothing else goes into the packing: not x, not the tile plan (the
        # tensors' device tells the CUDA and emulated packings apart).
        groups,
    )
    wdp = packed[6] if wd is not None else None
    args = (x, *packed[:6], wdp, w1.shape[0], w3.shape[0], stride, dilation, groups, torch.backends.cudnn.allow_tf32,
            smem_limit)
    rank = planner.autotuned_rank(lib.fused_block_forward, args, emulated=emulated) if autotune else 0
    return lib.fused_block_forward(*args, rank)


def bottleneck_inference_cuda(x, w1, b1, w2, b2, w3, b3, wd, bd, stride, dilation, groups):
    """The `cuda` backend: one fused kernel launch on x's current stream
    (plus the packing when the weights are not in PACK_CACHE, and the timing
    of the top plans on a tune key's first call)."""
    return _run(torch.ops.resnext_kernels, x, w1, b1, w2, b2, w3, b3, wd, bd, stride, dilation, groups,
                smem_limit=0, autotune=True)


def bottleneck_inference_cuda_emulated(x, w1, b1, w2, b2, w3, b3, wd, bd, stride, dilation, groups):
    """The `cuda_emulated` backend: the CUDA kernel run by the CPU emulator,
    planned for an H100's shared memory; tuned only inside a tune() run
    (tuning.in_tune_run: a testing mode, since emulated timings say nothing
    about a GPU), rank 0 otherwise."""
    emulation.load()
    return _run(getattr(torch.ops, emulation.NAMESPACE), x, w1, b1, w2, b2, w3, b3, wd, bd, stride, dilation,
                groups, smem_limit=settings.H100_SMEM_OPTIN, autotune=tuning.in_tune_run(), emulated=True)
