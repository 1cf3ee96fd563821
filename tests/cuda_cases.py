"""Shared cases and helpers of the CUDA kernel tests (test_cuda_*.py).

On CPU the kernel runs through the emulation build (backend
"cuda_emulated"): the same source compiled by g++ against
csrc/emulation/cuda_emu.h. Tests marked `cuda` run the real kernel and are
skipped without a GPU.

Every case uses fresh random inputs; the emulated op fills its output with NaN
before the kernel runs (the GPU tests get the same effect by freeing a
NaN-filled tensor of the output's size just before the call, which the caching
allocator hands back). Tolerance: the package's rule
(resnext_kernels.common.tolerance): the kernel's max relative error vs the
fp64 reference must be at most 2x PyTorch's own error at the same dtype (+ a
small floor). The TF32 path is held to eager fp16's error (the same 10-bit
mantissa): eager CPU convolutions cannot use TF32, and on a GPU cuDNN may
run some of the block's convs (the grouped one in particular) without TF32
even when it is allowed, which would make eager fp32 an unfair yardstick.
"""

import pytest
import torch
from helpers import Block, assert_close_to_reference

from resnext_kernels.backends import cuda as cuda_backend
from resnext_kernels.backends import registry
from resnext_kernels.backends.cuda import emulation, planner
from resnext_kernels.backends.reference import bottleneck_inference_reference
from resnext_kernels.bench.shapes import SHAPES
from resnext_kernels.common import extension, settings
from resnext_kernels.common.layout import output_memory_format

_emu_reason = emulation.unavailable_reason()


needs_emu = pytest.mark.skipif(_emu_reason is not None, reason=f"CUDA emulation unusable: {_emu_reason}")


# The _C planner op: without _C (not built) these tests skip; a _C built
# before the op existed fails them (candidate_plans says to rebuild).
needs_c = pytest.mark.skipif(extension.extension() is None, reason=f"{extension.extension_error()}")


_cuda_reason = registry.unavailable_reason("cuda", "cuda")


needs_cuda = pytest.mark.skipif(_cuda_reason is not None, reason=f"cuda backend unusable: {_cuda_reason}")


# The emulation has no device to ask: its plans are for an H100's shared memory.
H100_SMEM_OPTIN = settings.H100_SMEM_OPTIN


# Odd sizes, channel counts off multiples of 16, stride 2 on odd inputs,
# dilation 2, group widths d in {1, 3, 4, 8, 14, 24, 64}, several column tiles.
CASES = [
    Block(2, 32, 32, 32, 8, 9, 9),                                # d=4
    Block(1, 20, 24, 40, 3, 7, 11, stride=2, projection=True),    # d=8, odd channels
    Block(1, 16, 64, 16, 1, 9, 9, dilation=2, projection=True),   # d=64: 4 K tiles per group
    Block(1, 24, 28, 24, 2, 13, 13),                              # d=14 -> 16
    Block(1, 8, 16, 24, 16, 7, 9, stride=2, dilation=2, projection=True),  # d=1
    Block(2, 48, 48, 48, 2, 5, 7),                                # d=24 -> 32
    Block(1, 64, 128, 64, 2, 9, 9, stride=2, projection=True),    # d=64, stride 2
    Block(1, 32, 96, 48, 32, 9, 9, projection=True),              # d=3 -> 4
    Block(1, 17, 16, 17, 4, 9, 9),                                # odd Cin == Cout
    Block(1, 16, 32, 16, 8, 5, 37),                               # 3 column tiles
    Block(1, 32, 48, 32, 6, 9, 9),                                # 3 width tiles (B reload per tile)
    Block(1, 16, 256, 40, 32, 5, 5, projection=True),             # 16 width tiles, 2 conv1 passes
    Block(1, 80, 32, 80, 4, 7, 7),                                # 2 input-channel chunks (64 + 16)
    Block(1, 144, 32, 48, 4, 5, 9, stride=2, projection=True),    # 3 input-channel chunks, odd Cout
]


# (dtype, allow_tf32) modes of the kernel.
MODES = [(torch.float16, True), (torch.bfloat16, True), (torch.float32, True), (torch.float32, False)]


def _mode_id(mode):
    dtype, tf32 = mode
    name = str(dtype).replace("torch.", "")
    return f"{name}_tf32" if dtype == torch.float32 and tf32 else name


def _reference(args, conv):
    return bottleneck_inference_reference(*[a if a is None else a.double().cpu() for a in args], *conv)


def _eager_yardstick(args, conv, dtype, tf32):
    """PyTorch's own result at the kernel's precision (see module docstring)."""
    if dtype == torch.float32 and tf32:
        dtype = torch.float16
    return bottleneck_inference_reference(*[a if a is None else a.to(dtype) for a in args], *conv)


def _check(y, args, block, dtype, tf32, device):
    n, _, h, w = args[0].shape
    assert y.shape == (n, block.cout, (h - 1) // block.stride + 1, (w - 1) // block.stride + 1)
    assert y.dtype == dtype and y.device.type == device
    assert y.is_contiguous(memory_format=output_memory_format(args[0]))
    ref = _reference(args, block.conv)
    eager = _eager_yardstick(args, block.conv, dtype, tf32)
    assert_close_to_reference(y.cpu(), ref, eager.cpu())


def _packed_args(pack_op, args, block):
    """x, the packed weights (wdp None for identity) and the real width and Cout."""
    packed = pack_op(*args[1:], block.groups)
    assert len(packed) == (7 if block.projection else 6)
    return [args[0], *packed[:6], packed[6] if block.projection else None, block.width, block.cout]


def _emulated(args, block, tf32, smem_limit=H100_SMEM_OPTIN, plan_rank=0):
    lib = torch.ops.resnext_kernels_emu
    return lib.fused_block_forward(*_packed_args(lib.fused_block_pack_weights, args, block),
                                   *block.conv, tf32, smem_limit, plan_rank)


def _launched(emu, plan):
    """Asserts the last emulated launch ran `plan` and that its MMAs executed
    exactly the multiply-accumulates the planner counts for it (the emulator
    counts every mma.sync and every FMA of the fp32 path)."""
    assert emu.last_launch_plan() == [plan.TW, plan.Mo, plan.WC, plan.CS, plan.nbuf, plan.smem, plan.grid_x,
                                      plan.grid_y], plan
    assert emu.last_launch_mma_macs() == plan.mma_macs, plan


def _wp(block, dtype):
    """The padded width of the block's packing."""
    elem = torch.empty((), dtype=dtype).element_size()
    return planner.padded_dims(block.cin, block.width, block.cout, block.groups, elem).wp


def _plan_kinds(plans, block, dtype):
    """The plans by the kernel path they take: Cout slices (grid.y > 1:
    conv1 and the grouped conv recomputed per slice, the epilogue offset by
    the slice), all of Cout in one block, width chunks (WC < padded width:
    conv1 re-streams x per chunk), one x buffer (no prefetch), runs shorter
    than a band row (Mo < TW) and runs across band rows (Mo > TW)."""
    wp = _wp(block, dtype)
    kinds = {
        "cout_slices": [p for p in plans if p.grid_y > 1],
        "whole_cout": [p for p in plans if p.grid_y == 1],
        "width_chunks": [p for p in plans if p.WC < wp],
        "one_buffer": [p for p in plans if p.nbuf == 1],
        "short_runs": [p for p in plans if p.Mo < p.TW],
        "long_runs": [p for p in plans if p.Mo > p.TW],
    }
    return {k: v for k, v in kinds.items() if v}


def _plans(block, dtype, limit, emulated=True, tf32=True):
    """The candidate plans in plan_rank order: those of the emulation build
    (the planner the emulated op runs), or with emulated=False those of _C."""
    return planner.candidate_plans(block.n, block.h, block.w, block.cin, block.width, block.cout, block.groups,
                                   block.stride, block.dilation, dtype, limit, projection=block.projection,
                                   allow_tf32=tf32, emulated=emulated)


def _smallest_limit(block, dtype):
    """The smallest shared-memory limit any plan fits in (binary search)."""
    lo, hi = 1, H100_SMEM_OPTIN
    while lo < hi:
        mid = (lo + hi) // 2
        if _plans(block, dtype, mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _backend(args, block):
    y = cuda_backend.bottleneck_inference_cuda_emulated(*args, *block.conv)
    _check(y, args, block, torch.float32, False, "cpu")
    return y


def _canonical_plans(name, dtype, limit, tf32=True):
    """_C's candidate plans of a benchmark shape at batch 128."""
    s = SHAPES[name]
    return planner.candidate_plans(128, s.hw, s.hw, s.cin, s.width, s.cout, s.groups, s.stride, 1, dtype, limit,
                                   projection=s.projection, allow_tf32=tf32)


# Every plan rank of these blocks runs on the emulator: they have 24 to 48
# plans at the default limit (4 s in all on an idle 2-core machine, ~30 s
# under load). Should the planner come to offer more, MAX_RANKS_PER_CASE
# ranks spread evenly from the first to the last run instead, to bound the
# emulator's time. Between them: stride 2, dilation 2, odd H and W, Cin/Cout
# off multiples of 16, projection and identity, d = 4 and d = 24 (a group
# spans two 16-channel K tiles), one and two x chunks, all four modes.
MAX_RANKS_PER_CASE = 48


RANK_CASES = [
    (Block(1, 20, 32, 24, 8, 5, 7, stride=2, projection=True), (torch.bfloat16, True)),  # d=4
    (Block(1, 24, 48, 24, 2, 3, 5, dilation=2), (torch.float32, False)),  # d=24
    (Block(2, 40, 48, 40, 2, 3, 3, stride=2, dilation=2, projection=True), (torch.float16, True)),  # d=24
    (Block(1, 80, 32, 72, 8, 3, 5, projection=True), (torch.float32, True)),  # 2 x chunks: 1 or 2 buffers
]


def _spread(count, cap):
    """Ranks 0..count-1, or cap of them evenly spread including the first and the last."""
    if count <= cap:
        return list(range(count))
    return sorted({round(i * (count - 1) / (cap - 1)) for i in range(cap)})


def _poison_next_allocation(shape, dtype):
    # The caching allocator hands this block back for the next same-size
    # allocation, so elements the kernel fails to write stay NaN.
    torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    torch.cuda.synchronize()


def _cuda_run(args, block, tf32, smem_limit=0, plan_rank=0):
    lib = torch.ops.resnext_kernels
    packed = _packed_args(lib.fused_block_pack_weights, args, block)  # before the poisoning: it allocates
    n, _, h, w = args[0].shape
    _poison_next_allocation((n, block.cout, (h - 1) // block.stride + 1, (w - 1) // block.stride + 1), args[0].dtype)
    y = lib.fused_block_forward(*packed, *block.conv, tf32, smem_limit, plan_rank)
    torch.cuda.synchronize()
    return y


def documented_tiling(n, h, w, cin, width, cout, groups, stride, dilation, projection, dtype, plan,
                      check_taps=False):
    """The launch's blocks re-derived from the tiling docs/cuda_backend.md
    documents ("Tiles and halos"), independently of the C++ planner (which
    sums over one period of runs): returns (the multiply-accumulates the
    kernel's MMAs execute, the largest halo). With check_taps, also checks
    that every input pixel a run's 3x3 taps read lies in its halo run."""
    elem = torch.empty((), dtype=dtype).element_size()
    dims = planner.padded_dims(cin, width, cout, groups, elem)
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    wg = -(-groups * dims.d_p // 8) * 8
    slices = -(-dims.cout_p // plan.CS)
    macs, halo_max = 0, 0
    for ox0 in range(0, wo, plan.TW):
        twb = min(plan.TW, wo - ox0)
        hx_l = max(0, ox0 * stride - dilation)
        hc = min(w - 1, (ox0 + twb - 1) * stride + dilation) - hx_l + 1
        pixels = n * ho * twb
        for q0 in range(0, pixels, plan.Mo):
            q1 = min(pixels, q0 + plan.Mo) - 1
            (na, oya), ca = divmod(q0 // twb, ho), q0 % twb
            (nb, oyb), cb = divmod(q1 // twb, ho), q1 % twb
            top, bottom = oya * stride - dilation, oyb * stride + dilation
            p_lo = ((na * h + top) * hc + max((ox0 + ca) * stride - dilation - hx_l, 0) if top >= 0
                    else na * h * hc)
            p_hi = ((nb * h + bottom) * hc + min((ox0 + cb) * stride + dilation - hx_l, hc - 1) if bottom <= h - 1
                    else (nb * h + h - 1) * hc + hc - 1)
            m1, mout = p_hi - p_lo + 1, q1 - q0 + 1
            halo_max = max(halo_max, m1)
            rows1, rowso = -(-m1 // 16) * 16, -(-mout // 16) * 16
            macs += slices * (rows1 * dims.wp * dims.cin_p + rowso * wg * dims.ks2 * dims.kk)
            macs += rowso * dims.cout_p * (dims.wp + (dims.cin_p if projection else 0))
            if check_taps:
                for q in range(q0, q1 + 1):
                    (img, oy), ox = divmod(q // twb, ho), ox0 + q % twb
                    for ky in range(3):
                        for kx in range(3):
                            iy, ix = oy * stride + (ky - 1) * dilation, ox * stride + (kx - 1) * dilation
                            if 0 <= iy < h and 0 <= ix < w:
                                assert p_lo <= (img * h + iy) * hc + ix - hx_l <= p_hi, (plan, q, ky, kx)
    return macs, halo_max
