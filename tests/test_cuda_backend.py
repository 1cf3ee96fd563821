"""Tests of the fused CUDA kernel (csrc/fused_block_kernel.cuh).

On CPU the kernel runs through the emulation build (backend
"cuda_emulated"): the same source compiled by g++ against
csrc/emulation/cuda_emu.h. Tests marked `cuda` run the real kernel and are
skipped without a GPU.

Every case uses fresh random inputs; the emulated op fills its output with NaN
before the kernel runs (the GPU tests get the same effect by freeing a
NaN-filled tensor of the output's size just before the call, which the caching
allocator hands back). Tolerance: the kernel's max relative error vs the fp64
reference must be at most 2x PyTorch's own error at the same dtype (+ a small
floor). The TF32 path is held to eager fp16's error (the same 10-bit
mantissa): eager CPU convolutions cannot use TF32, and on a GPU cuDNN may
run some of the block's convs (the grouped one in particular) without TF32
even when it is allowed, which would make eager fp32 an unfair yardstick.
"""

import contextlib
import functools
import json
import types

import pytest
import torch

from resnext_kernels.backends import cuda as cuda_backend
from resnext_kernels.backends import registry
from resnext_kernels.backends.cuda import emulation, planner
from resnext_kernels.backends.reference import bottleneck_inference_reference
from resnext_kernels.bench import plans as cuda_plans
from resnext_kernels.bench.shapes import SHAPES
from resnext_kernels.common import extension, settings, tuning
from resnext_kernels.ops import inference as ops
from helpers import Block, assert_close_to_reference, fake_timer

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
    assert y.is_contiguous(memory_format=torch.channels_last)
    ref = _reference(args, block.conv)
    eager = _eager_yardstick(args, block.conv, dtype, tf32)
    assert_close_to_reference(y.cpu(), ref, eager.cpu(), factor=2.0, floor=1e-6)


def _packed_args(pack_op, args, block):
    """x, the packed weights (wdp None for identity) and the real width and Cout."""
    packed = pack_op(*args[1:], block.groups)
    assert len(packed) == (7 if block.projection else 6)
    return [args[0], *packed[:6], packed[6] if block.projection else None, block.width, block.cout]


def _emulated(args, block, tf32, smem_limit=H100_SMEM_OPTIN, plan_rank=0):
    lib = torch.ops.resnext_kernels_emu
    return lib.fused_block_forward(*_packed_args(lib.fused_block_pack_weights, args, block),
                                                *block.conv, tf32, smem_limit, plan_rank)


@pytest.fixture(scope="module")
def emu():
    emulation.load()
    return torch.ops.resnext_kernels_emu


@needs_emu
@pytest.mark.parametrize("mode", MODES, ids=_mode_id)
@pytest.mark.parametrize("block", CASES, ids=repr)
def test_emulated_matches_reference(emu, block, mode):
    dtype, tf32 = mode
    args = block.make(dtype)
    _check(_emulated(args, block, tf32), args, block, dtype, tf32, "cpu")


@needs_emu
def test_emulated_random_blocks(emu):
    """Random block shapes (H or W may be 1, d up to 40, dilation up to 3,
    any channel counts), modes and shared-memory limits, drawn from the
    per-test seed (tests/conftest.py prints it; RESNEXT_KERNELS_TEST_SEED
    replays a failure)."""

    def pick(options):
        return options[int(torch.randint(len(options), ()))]

    def rint(lo, hi):
        return int(torch.randint(lo, hi + 1, ()))

    checked = 0
    while checked < 12:
        groups, d = pick([1, 2, 3, 4, 8, 16]), pick([1, 2, 3, 4, 5, 8, 12, 16, 17, 24, 32, 40])
        projection = bool(torch.rand(()) < 0.5)
        cin = rint(1, 70)
        block = Block(pick([1, 2]), cin, groups * d, rint(1, 70) if projection else cin, groups, rint(1, 12),
                      rint(1, 20), stride=pick([1, 2]) if projection else 1, dilation=pick([1, 2, 3]),
                      projection=projection)
        dtype, tf32 = pick(MODES)
        limit = pick([H100_SMEM_OPTIN, 60000, 90000])
        args = block.make(dtype)
        try:
            y = _emulated(args, block, tf32, limit)
        except RuntimeError as exc:  # a tight limit may fit no plan for big halos
            assert limit < H100_SMEM_OPTIN and "no tile plan fits" in str(exc), (block, exc)
            continue
        try:
            _check(y, args, block, dtype, tf32, "cpu")
        except AssertionError as exc:
            raise AssertionError(f"{block} {_mode_id((dtype, tf32))} smem_limit={limit}: {exc}") from exc
        checked += 1


EMU_STAGES = [  # ResNeXt-50 32x4d stage shapes at batch 1 (s2_first on a smaller image), H100 plans
    Block(1, 256, 256, 512, 32, 15, 15, stride=2, projection=True),
    Block(1, 1024, 512, 1024, 32, 14, 14),
    Block(1, 2048, 1024, 2048, 32, 7, 7),  # stage 4: two width chunks, d=32 sweeps 2 K tiles
]


@needs_emu
@pytest.mark.parametrize("block", EMU_STAGES, ids=repr)
def test_emulated_stage_shapes(emu, block):
    args = block.make(torch.bfloat16)
    _check(_emulated(args, block, True), args, block, torch.bfloat16, True, "cpu")


def _plans(block, dtype, limit, emulated=True):
    """The candidate plans in plan_rank order: those of the emulation build
    (the planner the emulated op runs), or with emulated=False those of _C."""
    return planner.candidate_plans(block.n, block.h, block.w, block.cin, block.width, block.cout, block.groups,
                                        block.stride, block.dilation, dtype, limit, emulated=emulated)


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


SPLIT_CASES = [
    Block(1, 64, 128, 64, 2, 9, 9, stride=2, projection=True),
    Block(1, 40, 64, 72, 8, 7, 9, dilation=2, projection=True),
    Block(1, 48, 48, 48, 2, 5, 7),
]


@needs_emu
@pytest.mark.parametrize("mode", [(torch.bfloat16, True), (torch.float32, False)], ids=_mode_id)
@pytest.mark.parametrize("block", SPLIT_CASES, ids=repr)
def test_emulated_split_plan(emu, block, mode):
    """A small shared-memory limit forces width chunks and Cout slices (recompute)."""
    dtype, tf32 = mode
    limit = _smallest_limit(block, dtype)
    full = _plans(block, dtype, H100_SMEM_OPTIN)[0]
    tight = _plans(block, dtype, limit)[0]
    assert full.grid_y == 1
    # Several width chunks (WC < width) and several Cout slices.
    assert tight.grid_y > 1 and tight.WC < block.width, tight
    args = block.make(dtype)
    _check(_emulated(args, block, tf32, limit), args, block, dtype, tf32, "cpu")
    with pytest.raises(RuntimeError, match="no tile plan fits"):
        _emulated(args, block, tf32, limit - 1)


@needs_emu
@pytest.mark.parametrize("mode", [(torch.float16, True), (torch.float32, True)], ids=_mode_id)
@pytest.mark.parametrize("tight", [False, True], ids=["prefetch", "single_buffer"])
def test_emulated_x_chunk_buffering(emu, mode, tight):
    """Several x chunks, streamed with cp.async prefetch into two buffers
    (default limit) or through one buffer (tightest limit)."""
    dtype, tf32 = mode
    block = Block(1, 96, 64, 80, 4, 7, 9, projection=True)
    limit = _smallest_limit(block, dtype) if tight else H100_SMEM_OPTIN
    plan = _plans(block, dtype, limit)[0]
    assert plan.nbuf == (1 if tight else 2) and plan.KC < block.cin, plan
    args = block.make(dtype)
    _check(_emulated(args, block, tf32, limit), args, block, dtype, tf32, "cpu")


@needs_emu
def test_emulated_backend_through_public_op():
    block = Block(1, 24, 32, 24, 4, 7, 9)
    args = block.make(torch.float16, channels_last=False)  # NCHW input is converted once
    assert args[0].is_contiguous()
    y = ops.bottleneck_inference(*args, stride=1, dilation=1, groups=4, backend="cuda_emulated")
    _check(y, args, block, torch.float16, True, "cpu")


@needs_emu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_emulated_unaligned_x(emu, dtype):
    """x whose data starts one element past an aligned address: the kernel
    must not use 16-byte vector loads on it (the emulator reports misaligned
    vector accesses) and must still be correct."""
    block = Block(1, 32, 32, 32, 4, 5, 7)
    args = block.make(dtype)
    x = args[0]
    storage = torch.empty(x.numel() + 1, dtype=dtype)
    shifted = storage[1:].as_strided(x.shape, x.stride())
    shifted.copy_(x)
    assert shifted.is_contiguous(memory_format=torch.channels_last) and shifted.data_ptr() % 16 != 0
    args[0] = shifted
    _check(_emulated(args, block, False), args, block, dtype, False, "cpu")


@needs_emu
def test_emulated_whole_model(emu, monkeypatch):
    """A small torchvision ResNeXt converted to the emulated backend (eval,
    fp32 without TF32) gives the fp64 model's logits and features."""
    pytest.importorskip("torchvision")
    from torchvision.models.resnet import Bottleneck, ResNet

    from helpers import randomize_norms
    import resnext_kernels as rk

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    calls = []
    real = cuda_backend.bottleneck_inference_cuda_emulated
    monkeypatch.setattr(cuda_backend, "bottleneck_inference_cuda_emulated",
                        lambda *a: calls.append(1) or real(*a))
    tv = randomize_norms(ResNet(Bottleneck, [1, 2, 1, 1], groups=4, width_per_group=4, num_classes=10)).eval()
    fused = rk.convert(ResNet(Bottleneck, [1, 2, 1, 1], groups=4, width_per_group=4, num_classes=10),
                       backend="cuda_emulated").eval()
    fused.load_state_dict(tv.state_dict(), strict=True)
    assert sum(isinstance(m, rk.FusedResNeXtBlock) for m in fused.modules()) == 5
    x = torch.randn(2, 3, 40, 40).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = tv.double()(x.double())
        got = fused(x)
    assert len(calls) == 5  # every block ran the emulated kernel
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@needs_emu
def test_emulated_tf32_flag_is_honoured(emu, monkeypatch):
    block = Block(1, 32, 32, 32, 4, 7, 7)
    args = block.make(torch.float32)
    outs = {}
    for flag in (True, False):
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", flag)
        outs[flag] = ops.bottleneck_inference(*args, groups=4, backend="cuda_emulated")
    ref = _reference(args, block.conv)
    err = {k: (v.double() - ref).abs().max().item() for k, v in outs.items()}
    # Full fp32 is far more accurate than TF32 (10-bit mantissa).
    assert err[False] < 1e-4 * ref.abs().max().item() < err[True], err


@pytest.fixture
def pack_calls(emu, monkeypatch):
    """Counts the emulated pack op's calls (the backend looks the op up on
    every call); starts and ends with an empty cache."""
    cuda_backend.PACK_CACHE.clear()
    lib = torch.ops.resnext_kernels_emu
    real = lib.fused_block_pack_weights
    calls = []
    monkeypatch.setattr(lib, "fused_block_pack_weights", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    yield calls
    cuda_backend.PACK_CACHE.clear()


def _backend(args, block):
    y = cuda_backend.bottleneck_inference_cuda_emulated(*args, *block.conv)
    _check(y, args, block, torch.float32, False, "cpu")
    return y


@needs_emu
def test_emulated_pack_cache_hit_and_in_place_update(pack_calls):
    block = Block(1, 16, 32, 24, 4, 5, 6, stride=2, projection=True)
    args = block.make(torch.float32)
    y1 = _backend(args, block)
    y2 = _backend(args, block)
    assert len(pack_calls) == 1, "the second call with the same weights must not repack"
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    args[0] = block.make(torch.float32)[0]
    _backend(args, block)
    assert len(pack_calls) == 1, "the packing does not depend on x"
    args[3].mul_(-1.5)  # in-place update bumps w2's _version: must repack
    _backend(args, block)
    assert len(pack_calls) == 2
    args[8].add_(1.0)  # bd, folded into b3p
    _backend(args, block)
    assert len(pack_calls) == 3


@needs_emu
def test_emulated_pack_cache_freed_weight_at_same_address(pack_calls):
    """A new weight at a freed one's address, with the same shape, strides
    and _version, has the very same key: it must still be repacked."""
    block = Block(1, 16, 32, 16, 4, 5, 5)
    args = block.make(torch.float32)
    storage = torch.empty_like(args[3]).untyped_storage()

    def weight_in_storage(values):
        t = torch.empty(0, dtype=values.dtype).set_(storage, 0, values.shape, values.stride())
        t.copy_(values)  # the same steps every time, hence the same _version
        return t

    args[3] = weight_in_storage(args[3])
    _backend(args, block)
    first_key = (args[3].data_ptr(), args[3]._version)
    args[3] = None  # frees the weight; its cache entry stays until the next insertion
    args[3] = weight_in_storage(block.make(torch.float32)[3])
    assert (args[3].data_ptr(), args[3]._version) == first_key
    _backend(args, block)
    assert len(pack_calls) == 2


@needs_emu
def test_emulated_pack_cache_drops_entries_of_freed_weights(pack_calls):
    # Fresh weights each time, as with BN folded per forward; the widths
    # differ so the keys do (an equal key would replace the entry anyway).
    for width in (16, 32, 48):
        block = Block(1, 16, width, 16, 4, 3, 3)
        args = block.make(torch.float32)
        _backend(args, block)
        del args
    assert len(pack_calls) == 3
    assert len(cuda_backend.PACK_CACHE) == 1  # only the last entry: its weights are not yet known freed


@needs_emu
def test_emulated_pack_cache_inference_mode(pack_calls):
    """Inference tensors have no version counter, so an in-place update
    cannot be seen: they are packed on every call."""
    block = Block(1, 16, 32, 16, 4, 5, 5)
    with torch.inference_mode():
        args = block.make(torch.float32)
        _backend(args, block)
        args[3].mul_(-1.5)
        _backend(args, block)
    assert len(pack_calls) == 2


@needs_emu
def test_emulated_opcheck(emu):
    lib = torch.ops.resnext_kernels_emu
    # d = 16, 4 and 24: both padding rules of the fake's packed shapes.
    for block in (Block(1, 16, 32, 24, 2, 5, 6, stride=2, projection=True), Block(1, 16, 16, 16, 4, 5, 5),
                  Block(1, 8, 48, 20, 2, 3, 4, projection=True)):
        args = block.make(torch.float32)
        torch.library.opcheck(lib.fused_block_pack_weights.default, (*args[1:], block.groups))
        torch.library.opcheck(lib.fused_block_forward.default,
                              (*_packed_args(lib.fused_block_pack_weights, args, block), *block.conv, False, H100_SMEM_OPTIN,
                               1))


@needs_emu
def test_emulated_rejects_bad_arguments(emu):
    block = Block(1, 16, 16, 16, 4, 5, 5)
    args = block.make(torch.float32)
    bad_w2 = list(args)
    bad_w2[3] = bad_w2[3][:, :2]
    with pytest.raises(RuntimeError, match="w2 must be"):
        _emulated(bad_w2, block, False)
    mixed = list(args)
    mixed[2] = mixed[2].double()  # b1 (w1 sets the weights' dtype)
    with pytest.raises(RuntimeError, match="must have w1's dtype"):
        _emulated(mixed, block, False)
    packed = _packed_args(torch.ops.resnext_kernels_emu.fused_block_pack_weights, args, block)
    with pytest.raises(RuntimeError, match="identity shortcut"):
        torch.ops.resnext_kernels_emu.fused_block_forward(*packed, 2, 1, 4, False, H100_SMEM_OPTIN)


@needs_emu
def test_emulated_rejects_bad_packed_weights(emu):
    """Packed tensors that do not fit the call fail the checks, not the kernel."""
    lib = torch.ops.resnext_kernels_emu
    block = Block(1, 16, 32, 16, 4, 5, 5)  # d=8
    args = block.make(torch.float32)
    good = _packed_args(lib.fused_block_pack_weights, args, block)

    def run(packed, **conv):
        stride, dilation, groups = conv.get("stride", 1), conv.get("dilation", 1), conv.get("groups", 4)
        return lib.fused_block_forward(*packed, stride, dilation, groups, False, H100_SMEM_OPTIN)

    run(good)  # the baseline passes the checks
    with pytest.raises(RuntimeError, match="packed w2p must be"):
        run(good, groups=1)  # d=32: packed for another group width
    for i, name, bad in [
        (2, "b1p", good[2].double()),
        (3, "w2p", good[3].transpose(-1, -2)),
        (5, "w3p", good[5][:, :8]),
        (1, "w1p", good[1].half()),
    ]:
        packed = list(good)
        packed[i] = bad
        with pytest.raises(RuntimeError, match=f"packed {name} must be"):
            run(packed)
    proj = Block(1, 16, 32, 24, 4, 5, 5, projection=True)
    pargs = _packed_args(lib.fused_block_pack_weights, proj.make(torch.float32), proj)
    run(pargs)
    with pytest.raises(RuntimeError, match="packed w1p must be"):  # x with more channels than w1 was packed for
        run([torch.randn(1, 40, 5, 5), *pargs[1:]])
    pargs[7] = pargs[7][:, :16]
    with pytest.raises(RuntimeError, match="packed wdp must be"):
        run(pargs)


# ---------------------------------------------------------------------------
# Tile plan ranks (plan_rank), the candidate list and the plan autotuning.
# ---------------------------------------------------------------------------


# Rank 0 at the H100 opt-in limit, batch 128: the table in docs/cuda_backend.md
# (what the planner chose before plans were ranked).
DOC_PLANS = [  # shape, dtype, TH, WC, CS, nbuf, smem bytes, grid
    ("s1_first", torch.bfloat16, 7, 64, 256, 2, 210944, (4096, 1)),
    ("s1", torch.bfloat16, 7, 64, 256, 2, 210944, (4096, 1)),
    ("s2_first", torch.bfloat16, 2, 256, 512, 2, 226816, (3584, 1)),
    ("s2", torch.bfloat16, 4, 128, 512, 2, 209408, (1792, 1)),
    ("s3", torch.bfloat16, 2, 256, 1024, 2, 209408, (896, 1)),
    ("s4", torch.bfloat16, 1, 512, 2048, 2, 227840, (896, 1)),
    ("cifar29_s1", torch.bfloat16, 4, 256, 256, 2, 172544, (2048, 1)),
    ("s1", torch.float32, 4, 128, 256, 2, 201216, (7168, 1)),
    ("s4", torch.float32, 1, 128, 2048, 2, 211456, (896, 1)),
]


def _canonical_plans(name, dtype, limit):
    """_C's candidate plans of a benchmark shape at batch 128."""
    s = SHAPES[name]
    return planner.candidate_plans(128, s.hw, s.hw, s.cin, s.width, s.cout, s.groups, s.stride, 1, dtype, limit)


@needs_c
@pytest.mark.parametrize("name,dtype,th,wc,cs,nbuf,smem,grid", DOC_PLANS,
                         ids=[f"{d[0]}-{str(d[1])[6:]}" for d in DOC_PLANS])
def test_candidate_plans_of_canonical_shapes(name, dtype, th, wc, cs, nbuf, smem, grid):
    plans = _canonical_plans(name, dtype, H100_SMEM_OPTIN)
    assert len(plans) > planner.AUTOTUNE_TOP_K
    assert [p.rank for p in plans] == list(range(len(plans)))
    assert [p.cost for p in plans] == sorted(p.cost for p in plans)
    assert all(0 < p.smem <= H100_SMEM_OPTIN for p in plans)
    assert len({(p.TH, p.WC, p.CS, p.nbuf) for p in plans}) == len(plans)
    first = plans[0]
    assert (first.TH, first.WC, first.CS, first.nbuf, first.smem, (first.grid_x, first.grid_y)) == (
        th, wc, cs, nbuf, smem, grid)
    # A smaller limit drops the plans that no longer fit and keeps the order.
    limit = 150000
    tight = _canonical_plans(name, dtype, limit)
    assert tight and [p[1:] for p in tight] == [p[1:] for p in plans if p.smem <= limit]


# Equal estimates (about one random shape in ten ties at rank 0) keep the
# order the planner always broke ties in: taller tile, then wider width chunk
# (then wider Cout slice, then two x buffers). Rank 0 of each is what the
# planner chose before plans were ranked.
TIES = [  # (N, H, W, Cin, width, Cout, groups, stride, dilation, dtype, smem_limit), ranks 0 and 1 (TH, WC, CS, nbuf)
    ((4, 60, 6, 108, 36, 426, 3, 1, 1, torch.float32, 150000), (3, 48, 432, 1), (2, 48, 432, 2)),
    ((3, 6, 21, 119, 1536, 499, 64, 2, 1, torch.bfloat16, 232448), (3, 64, 512, 2), (3, 32, 512, 2)),
    ((1, 40, 30, 396, 192, 470, 16, 1, 1, torch.float32, 150000), (2, 128, 480, 1), (2, 64, 480, 2)),
]


@needs_c
@pytest.mark.parametrize("problem,first,second", TIES)
def test_candidate_plans_break_ties_as_before(problem, first, second):
    plans = planner.candidate_plans(*problem)
    assert plans[0].cost == plans[1].cost
    assert [(p.TH, p.WC, p.CS, p.nbuf) for p in plans[:2]] == [first, second]


@needs_c
@needs_emu
def test_candidate_plans_match_the_emulation_build(emu):
    """_C's planner (the CLI's) and the emulation library's (the emulated
    op's) are the same source: a stale _C shows up here."""
    for block in (Block(128, 256, 128, 256, 32, 56, 56), Block(2, 20, 24, 40, 3, 7, 11, stride=2, projection=True)):
        for dtype in (torch.bfloat16, torch.float32):
            assert _plans(block, dtype, 100000, emulated=False) == _plans(block, dtype, 100000)


@needs_c
def test_candidate_plans_argument_errors():
    block = Block(1, 16, 32, 16, 4, 5, 5)
    with pytest.raises(RuntimeError, match="smem_limit must be in"):
        _plans(block, torch.float32, 0, emulated=False)
    with pytest.raises(RuntimeError, match="groups=3 does not divide width=32"):
        planner.candidate_plans(1, 5, 5, 16, 32, 16, 3, 1, 1, torch.float32, H100_SMEM_OPTIN)
    with pytest.raises(RuntimeError, match="stride must be in"):
        planner.candidate_plans(1, 5, 5, 16, 32, 16, 4, 0, 1, torch.float32, H100_SMEM_OPTIN)
    with pytest.raises(ValueError, match="dtype must be one of"):
        _plans(block, torch.float64, H100_SMEM_OPTIN, emulated=False)
    assert _plans(block, torch.float32, 20000, emulated=False) == []  # nothing fits: an empty list


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


@needs_emu
@pytest.mark.parametrize("block,mode", RANK_CASES, ids=[f"{b!r}-{_mode_id(m)}" for b, m in RANK_CASES])
def test_emulated_every_plan_rank(emu, block, mode):
    dtype, tf32 = mode
    plans = _plans(block, dtype, H100_SMEM_OPTIN)
    assert len(plans) >= 4
    args = block.make(dtype)
    for rank in _spread(len(plans), MAX_RANKS_PER_CASE):
        try:
            _check(_emulated(args, block, tf32, H100_SMEM_OPTIN, rank), args, block, dtype, tf32, "cpu")
        except AssertionError as exc:
            raise AssertionError(f"plan rank {rank} {plans[rank]}: {exc}") from exc
        p = plans[rank]
        assert emu.last_launch_plan() == [p.TH, p.WC, p.CS, p.nbuf, p.smem, p.grid_x, p.grid_y], rank


@needs_emu
def test_emulated_plan_rank_out_of_range(emu):
    block = Block(1, 16, 32, 16, 4, 5, 5)
    args = block.make(torch.float32)
    count = len(_plans(block, torch.float32, H100_SMEM_OPTIN))
    with pytest.raises(RuntimeError, match=f"plan_rank={count} is out of range: {count} tile plans fit in 232448 "):
        _emulated(args, block, False, H100_SMEM_OPTIN, count)
    with pytest.raises(RuntimeError, match="plan_rank=-1 is out of range"):
        _emulated(args, block, False, H100_SMEM_OPTIN, -1)


def test_select_plan_rank_times_the_top_ranks_once_per_key():
    cache = {}
    time_rank, timed = fake_timer([3.0, 1.0, 2.0, 1.0, 0.5])
    pick = functools.partial(planner.select_plan_rank, cache, enabled=True, capturing=False)
    # Rank 4 is fastest but beyond the top 4; ranks 1 and 3 tie: the lower wins.
    assert pick("a", time_rank, lambda: 5) == 1
    assert timed == [0, 1, 2, 3] and cache == {"a": 1}
    assert pick("a", time_rank, lambda: 5) == 1
    assert timed == [0, 1, 2, 3], "a cached key is not timed again"
    assert pick("b", time_rank, lambda: 2) == 1  # fewer plans than the top 4
    assert timed == [0, 1, 2, 3, 0, 1] and cache == {"a": 1, "b": 1}
    assert pick("c", time_rank, lambda: 1) == 0 and pick("d", time_rank, lambda: 0) == 0
    assert timed == [0, 1, 2, 3, 0, 1], "nothing to time with fewer than two plans"


def test_select_plan_rank_never_times_while_capturing():
    cache = {"a": 2}
    time_rank, timed = fake_timer([3.0, 1.0, 2.0])

    def no_count():
        raise AssertionError("counted plans while capturing")

    capture = functools.partial(planner.select_plan_rank, cache, enabled=True, capturing=True)
    assert capture("a", time_rank, no_count) == 2  # the cached rank
    assert capture("b", time_rank, no_count) == 0  # a miss: rank 0, nothing cached
    assert timed == [] and cache == {"a": 2}
    assert planner.select_plan_rank(cache, "b", time_rank, lambda: 3, enabled=True, capturing=False) == 1
    assert timed == [0, 1, 2] and cache == {"a": 2, "b": 1}


def test_select_plan_rank_off_is_rank_0():
    cache = {"a": 2}
    time_rank, timed = fake_timer([3.0, 1.0, 2.0])
    for capturing in (False, True):
        for key in ("a", "b"):
            assert planner.select_plan_rank(cache, key, time_rank, lambda: 3, enabled=False,
                                                 capturing=capturing) == 0
    assert timed == [] and cache == {"a": 2}


@needs_c
@needs_emu
def test_autotune_glue_withfake_timer(emu, monkeypatch):
    """The backend's tuning path end to end on CPU: the emulated block op
    stands in for the CUDA one, a fake timer for the CUDA events and mocks
    for the CUDA device queries. Also: the emulated backend never tunes."""
    lib = torch.ops.resnext_kernels_emu
    real_op = lib.fused_block_forward
    ranks = []

    def block_op(*args):
        ranks.append(args[-1])
        return real_op(*args)

    def fake_seconds_per_call(fn, device):
        fn()  # block_op records the rank it ran
        return [3.0, 2.0, 1.0, 4.0, 0.5][ranks[-1]]

    capturing = [False]
    monkeypatch.setattr(planner, "TUNED_PLAN_RANKS", {})
    monkeypatch.setattr(tuning, "seconds_per_call", fake_seconds_per_call)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(shared_memory_per_block_optin=H100_SMEM_OPTIN))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setenv(settings.AUTOTUNE_ENV, "1")
    block = Block(1, 16, 32, 24, 4, 5, 6, stride=2, projection=True)
    assert len(_plans(block, torch.float32, H100_SMEM_OPTIN)) > 4
    args = block.make(torch.float32)

    def run(x):
        ranks.clear()
        ops_ = types.SimpleNamespace(fused_block_pack_weights=lib.fused_block_pack_weights,
                                     fused_block_forward=block_op)
        y = cuda_backend._run(ops_, x, *args[1:], *block.conv, smem_limit=H100_SMEM_OPTIN, autotune=True)
        _check(y, [x, *args[1:]], block, torch.float32, False, "cpu")
        return list(ranks)

    assert run(args[0]) == [0, 1, 2, 3, 2]  # 4 ranks timed, then the fastest runs
    assert run(args[0]) == [2]  # cached
    assert list(planner.TUNED_PLAN_RANKS.values()) == [2]
    capturing[0] = True
    assert run(args[0]) == [2]  # a cached rank is used under capture
    assert run(args[0].contiguous()) == [0]  # a new key under capture: rank 0, not timed, not cached
    assert len(planner.TUNED_PLAN_RANKS) == 1
    capturing[0] = False
    monkeypatch.setenv(settings.AUTOTUNE_ENV, "0")
    assert run(args[0]) == [0]
    monkeypatch.setenv(settings.AUTOTUNE_ENV, "1")
    monkeypatch.setattr(lib, "fused_block_forward", block_op)
    ranks.clear()
    _backend(args, block)
    assert ranks == [0], "the emulated backend never tunes"


@needs_c
def test_cuda_plans_cli_list(tmp_path, capsys):
    out = tmp_path / "plans.json"
    assert cuda_plans.main(["--list", "--shapes", "s1", "s4", "--ranks", "3", "--smem-limit", str(H100_SMEM_OPTIN),
                            "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| shape | rank | TH | WC | CS | nbuf | smem (B) | est. cost | MMA work | grid |" in text
    assert "| s1 | 0 | 7 | 64 | 256 | 2 | 210944 |" in text and "s4: " in text
    doc = json.loads(out.read_text())
    assert doc["smem_limit"] == H100_SMEM_OPTIN and [s["shape"] for s in doc["shapes"]] == ["s1", "s4"]
    for entry in doc["shapes"]:
        plans = _canonical_plans(entry["shape"], torch.bfloat16, H100_SMEM_OPTIN)
        assert entry["plans_fitting"] == len(plans)
        shape = SHAPES[entry["shape"]]
        assert entry["plans"] == [{**p._asdict(), "mma_work": cuda_plans.mma_work(shape, 128, p)} for p in plans[:3]]


@pytest.mark.skipif(registry.unavailable_reason("cuda", "cuda") is None, reason="the cuda backend is usable here")
def test_cuda_plans_cli_timing_needs_a_gpu(capsys):
    assert cuda_plans.main(["--shapes", "s4"]) == 2
    err = capsys.readouterr().err
    assert "needs the cuda backend on a GPU" in err and "--list" in err


def test_cuda_plans_cli_list_without_the_planner(monkeypatch, capsys):
    def missing(*args, **kwargs):
        raise RuntimeError("resnext_kernels._C with the fused_block_plans op is needed to list tile plans: ...")

    monkeypatch.setattr(planner, "candidate_plans", missing)
    assert cuda_plans.main(["--list", "--shapes", "s1"]) == 2
    assert "cuda_plans: resnext_kernels._C with the fused_block_plans op is needed" in capsys.readouterr().err


def test_cuda_plans_cli_rejects_bad_arguments(capsys):
    for argv, message in ((["--ranks", "0"], "--ranks: must be >= 1"), (["--dtype", "int8"], "unknown dtype"),
                          (["--shapes", "nope"], "unknown shape"),
                          (["--smem-limit", "1000"], "--smem-limit applies to --list only")):
        with pytest.raises(SystemExit):
            cuda_plans.main(argv)
        assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------
# GPU: the real kernel.
# ---------------------------------------------------------------------------

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


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("mode", MODES, ids=_mode_id)
@pytest.mark.parametrize("block", CASES, ids=repr)
def test_cuda_matches_reference(block, mode):
    dtype, tf32 = mode
    args = block.make(dtype, device="cuda")
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        _check(_cuda_run(args, block, tf32), args, block, dtype, tf32, "cuda")
    finally:
        torch.backends.cudnn.allow_tf32 = prev


STAGES = [  # ResNeXt-50 32x4d stages at batch 2, plus the CIFAR d=64 block
    Block(2, 64, 128, 256, 32, 56, 56, projection=True),
    Block(2, 256, 256, 512, 32, 56, 56, stride=2, projection=True),
    Block(2, 512, 256, 512, 32, 28, 28),
    Block(2, 1024, 512, 1024, 32, 14, 14),
    Block(2, 2048, 1024, 2048, 32, 7, 7),
    Block(2, 256, 512, 256, 8, 32, 32),
]


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("block", STAGES, ids=repr)
def test_cuda_stage_shapes(block, dtype):
    args = block.make(dtype, device="cuda")
    _check(_cuda_run(args, block, True), args, block, dtype, True, "cuda")


@pytest.mark.cuda
@needs_cuda
def test_cuda_split_plan_and_backend():
    block = Block(2, 64, 128, 64, 2, 9, 9, stride=2, projection=True)
    args = block.make(torch.bfloat16, device="cuda")
    _check(_cuda_run(args, block, True, smem_limit=40000), args, block, torch.bfloat16, True, "cuda")
    y = ops.bottleneck_inference(*args, stride=2, groups=2, backend="cuda")
    _check(y, args, block, torch.bfloat16, True, "cuda")
    lib = torch.ops.resnext_kernels
    torch.library.opcheck(lib.fused_block_pack_weights.default, (*args[1:], block.groups))
    torch.library.opcheck(lib.fused_block_forward.default,
                          (*_packed_args(lib.fused_block_pack_weights, args, block), *block.conv, True, 0))


@pytest.mark.cuda
@needs_cuda
def test_cuda_pack_cache(monkeypatch):
    """The `cuda` backend packs once per weight version (the cache itself is
    tested on the emulated backend)."""
    cuda_backend.PACK_CACHE.clear()
    lib = torch.ops.resnext_kernels
    real = lib.fused_block_pack_weights
    calls = []
    monkeypatch.setattr(lib, "fused_block_pack_weights", lambda *a: calls.append(1) or real(*a))
    block = Block(2, 64, 128, 64, 8, 9, 9)
    args = block.make(torch.float16, device="cuda")
    for _ in range(2):
        cuda_backend.bottleneck_inference_cuda(*args, *block.conv)
    assert len(calls) == 1
    args[3].mul_(-1.5)
    y = cuda_backend.bottleneck_inference_cuda(*args, *block.conv)
    assert len(calls) == 2
    _check(y, args, block, torch.float16, True, "cuda")
    cuda_backend.PACK_CACHE.clear()


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("block,mode", RANK_CASES, ids=[f"{b!r}-{_mode_id(m)}" for b, m in RANK_CASES])
def test_cuda_every_plan_rank(block, mode, monkeypatch):
    dtype, tf32 = mode
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)  # the eager yardstick's convs
    limit = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    plans = _plans(block, dtype, limit, emulated=False)
    args = block.make(dtype, device="cuda")
    for rank in range(len(plans)):
        try:
            _check(_cuda_run(args, block, tf32, plan_rank=rank), args, block, dtype, tf32, "cuda")
        except AssertionError as exc:
            raise AssertionError(f"plan rank {rank} {plans[rank]}: {exc}") from exc
    with pytest.raises(RuntimeError, match=f"plan_rank={len(plans)} is out of range: {len(plans)} tile plans"):
        _cuda_run(args, block, tf32, plan_rank=len(plans))


@pytest.mark.cuda
@needs_cuda
def test_cuda_backend_autotune_on_and_off(monkeypatch):
    monkeypatch.setattr(planner, "TUNED_PLAN_RANKS", {})
    block = Block(2, 64, 128, 72, 8, 13, 15, stride=2, projection=True)
    args = block.make(torch.float16, device="cuda")
    for flag in ("0", "1"):
        monkeypatch.setenv(settings.AUTOTUNE_ENV, flag)
        for _ in range(2):  # the second call of "1" uses the cached rank
            y = cuda_backend.bottleneck_inference_cuda(*args, *block.conv)
            torch.cuda.synchronize()
            _check(y, args, block, torch.float16, True, "cuda")
        if flag == "0":
            assert planner.TUNED_PLAN_RANKS == {}
    ((key, rank),) = planner.TUNED_PLAN_RANKS.items()
    assert 0 <= rank < planner.AUTOTUNE_TOP_K and key[0] == tuple(args[0].shape)


@pytest.mark.cuda
@needs_cuda
def test_cuda_backend_autotune_under_graph_capture(monkeypatch):
    """A shape first seen while a CUDA graph is captured runs rank 0 untimed
    (timing would be recorded into the graph); the graph replays correctly."""
    monkeypatch.setattr(planner, "TUNED_PLAN_RANKS", {})
    monkeypatch.setenv(settings.AUTOTUNE_ENV, "1")
    block = Block(2, 32, 64, 32, 4, 9, 9)
    args = block.make(torch.float16, device="cuda")
    cuda_backend.bottleneck_inference_cuda(*args, *block.conv)  # packs the weights and tunes batch 2
    assert len(planner.TUNED_PLAN_RANKS) == 1
    x = torch.randn(1, 32, 9, 9, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = cuda_backend.bottleneck_inference_cuda(x, *args[1:], *block.conv)
    assert len(planner.TUNED_PLAN_RANKS) == 1
    graph.replay()
    torch.cuda.synchronize()
    _check(y, [x, *args[1:]], block, torch.float16, True, "cuda")


@pytest.mark.cuda
@needs_cuda
def test_cuda_plans_cli_times_ranks(tmp_path):
    out = tmp_path / "timed.json"
    assert cuda_plans.main(["--shapes", "s1_14=14:256:128:32:256:1", "s4", "--batch", "2", "--ranks", "3",
                            "--seconds", "0.01", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [s["shape"] for s in doc["shapes"]] == ["s1_14", "s4"]
    for entry in doc["shapes"]:
        assert [p["rank"] for p in entry["plans"]] == [0, 1, 2]
        assert all(p["ms"] > 0 and p["within_tolerance"] for p in entry["plans"])
        assert 0 <= entry["fastest_rank"] < 3 and entry["model_vs_fastest"] >= 1.0


@needs_c
def test_mma_work_counts_the_kernels_loops():
    shape = SHAPES["s1"]
    plan = _canonical_plans("s1", torch.bfloat16, H100_SMEM_OPTIN)[0]
    assert (plan.TH, plan.CS, plan.grid_x, plan.grid_y) == (7, 256, 4096, 1)
    # Per block: conv1 on the 9 x 18 halo (rounded up to 176 rows), the grouped
    # conv as 16x16 block-diagonal tiles (9 taps), conv3, over 7 x 16 outputs.
    per_block = 176 * 256 * 128 + 112 * 128 * 9 * 16 + 112 * 256 * 128
    useful = 128 * 56 * 56 * (256 * 128 + 128 * 4 * 9 + 128 * 256)
    assert cuda_plans.mma_work(shape, 128, plan) == pytest.approx(4096 * per_block / useful)
    for name in SHAPES:
        for p in _canonical_plans(name, torch.bfloat16, H100_SMEM_OPTIN)[:4]:
            assert cuda_plans.mma_work(SHAPES[name], 128, p) > 1.0
