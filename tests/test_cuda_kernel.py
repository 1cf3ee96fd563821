"""The CUDA kernel's correctness on CPU, through the emulation build: every
dtype mode, odd shapes, group widths, tile plans (bands and runs, width
chunks, Cout slices, x chunk buffering) and plan ranks against the fp64
reference (cuda_cases.py); the executed MMA work of every emulated launch
against the planner's count; NaN/Inf propagation, the output's memory
format, determinism and the size limits."""

import pytest
import torch
from cuda_cases import (
    CASES,
    H100_SMEM_OPTIN,
    MAX_RANKS_PER_CASE,
    MODES,
    RANK_CASES,
    _check,
    _emulated,
    _launched,
    _mode_id,
    _plan_kinds,
    _plans,
    _reference,
    _smallest_limit,
    _spread,
    _wp,
    needs_emu,
)
from helpers import Block

from resnext_kernels.backends import cuda as cuda_backend
from resnext_kernels.backends.reference import bottleneck_inference_reference
from resnext_kernels.ops import inference as ops


@needs_emu
@pytest.mark.parametrize("mode", MODES, ids=_mode_id)
@pytest.mark.parametrize("block", CASES, ids=repr)
def test_emulated_matches_reference(emu, block, mode):
    dtype, tf32 = mode
    args = block.make(dtype)
    _check(_emulated(args, block, tf32), args, block, dtype, tf32, "cpu")
    _launched(emu, _plans(block, dtype, H100_SMEM_OPTIN, tf32=tf32)[0])


def _pick(options):
    return options[int(torch.randint(len(options), ()))]


def _rint(lo, hi):
    return int(torch.randint(lo, hi + 1, ()))


@needs_emu
def test_emulated_random_blocks(emu):
    """Random block shapes (H or W may be 1, d up to 40, dilation up to 3,
    any channel counts), modes and plans, drawn from the per-test seed
    (tests/conftest.py prints it; RESNEXT_KERNELS_TEST_SEED replays a
    failure). The plan is drawn by kind first (cuda_cases._plan_kinds: Cout
    slices, whole Cout, width chunks, one x buffer, short and long runs) and
    then among the plans of that kind, so every kernel path gets many cases;
    half the draws use a tight shared-memory limit."""
    seen = set()
    for _ in range(16):
        groups, d = _pick([1, 2, 3, 4, 8, 16]), _pick([1, 2, 3, 4, 5, 8, 12, 16, 17, 24, 32, 40])
        projection = bool(torch.rand(()) < 0.5)
        cin = _rint(1, 70)
        block = Block(_pick([1, 2]), cin, groups * d, _rint(1, 70) if projection else cin, groups, _rint(1, 12),
                      _rint(1, 20), stride=_pick([1, 2]) if projection else 1, dilation=_pick([1, 2, 3]),
                      projection=projection)
        dtype, tf32 = _pick(MODES)
        limit = H100_SMEM_OPTIN if torch.rand(()) < 0.5 else _rint(_smallest_limit(block, dtype), H100_SMEM_OPTIN)
        plans = _plans(block, dtype, limit, tf32=tf32)
        kinds = _plan_kinds(plans, block, dtype)
        kind = _pick(sorted(kinds))
        plan = _pick(kinds[kind])
        seen.add(kind)
        args = block.make(dtype)
        try:
            _check(_emulated(args, block, tf32, limit, plan.rank), args, block, dtype, tf32, "cpu")
            _launched(emu, plan)
        except AssertionError as exc:
            raise AssertionError(f"{block} {_mode_id((dtype, tf32))} smem_limit={limit} {kind} plan {plan}: "
                                 f"{exc}") from exc
    assert len(seen) >= 3, seen


EMU_STAGES = [  # ResNeXt-50 32x4d stage shapes at batch 1 (s2_first on a smaller image), H100 plans
    Block(1, 256, 256, 512, 32, 15, 15, stride=2, projection=True),
    Block(1, 1024, 512, 1024, 32, 14, 14),
    Block(1, 2048, 1024, 2048, 32, 7, 7),  # stage 4: d=32, width 1024, Cout 2048
]


@needs_emu
@pytest.mark.parametrize("block", EMU_STAGES, ids=repr)
def test_emulated_stage_shapes(emu, block):
    args = block.make(torch.bfloat16)
    _check(_emulated(args, block, True), args, block, torch.bfloat16, True, "cpu")
    _launched(emu, _plans(block, torch.bfloat16, H100_SMEM_OPTIN)[0])


# Blocks whose plans include several width chunks, Cout slices and one x
# buffer, several x chunks (Cin > 64 in 16-bit, > 32 in fp32), runs across
# band rows and stride or dilation 2.
SPLIT_CASES = [
    Block(1, 64, 128, 64, 2, 9, 9, stride=2, projection=True),
    Block(1, 40, 64, 72, 8, 7, 9, dilation=2, projection=True),
    Block(1, 96, 48, 96, 2, 5, 7),
]


@needs_emu
@pytest.mark.parametrize("mode", [(torch.bfloat16, True), (torch.float32, False)], ids=_mode_id)
@pytest.mark.parametrize("block", SPLIT_CASES, ids=repr)
def test_emulated_split_plans(emu, block, mode):
    """The cheapest plan with width chunks and Cout slices and one x buffer,
    the cheapest with width chunks and all of Cout, and the rank-0 plan at
    the smallest shared-memory limit any plan fits in (one byte less fits
    none)."""
    dtype, tf32 = mode
    wp = _wp(block, dtype)
    plans = _plans(block, dtype, H100_SMEM_OPTIN, tf32=tf32)
    chosen = [next(p for p in plans if p.WC < wp and p.grid_y > 1 and p.nbuf == 1),
              next(p for p in plans if p.WC < wp and p.grid_y == 1)]
    args = block.make(dtype)
    for plan in chosen:
        _check(_emulated(args, block, tf32, H100_SMEM_OPTIN, plan.rank), args, block, dtype, tf32, "cpu")
        _launched(emu, plan)
    limit = _smallest_limit(block, dtype)
    _check(_emulated(args, block, tf32, limit), args, block, dtype, tf32, "cpu")
    _launched(emu, _plans(block, dtype, limit, tf32=tf32)[0])
    with pytest.raises(RuntimeError, match="no tile plan fits"):
        _emulated(args, block, tf32, limit - 1)


@needs_emu
@pytest.mark.parametrize("mode", [(torch.float16, True), (torch.float32, True)], ids=_mode_id)
@pytest.mark.parametrize("nbuf", [2, 1], ids=["prefetch", "single_buffer"])
def test_emulated_x_chunk_buffering(emu, mode, nbuf):
    """Several x chunks, streamed with cp.async prefetch into two buffers
    or through one buffer, for conv1 and the projection."""
    dtype, tf32 = mode
    block = Block(1, 96, 64, 80, 4, 7, 9, projection=True)
    plan = next(p for p in _plans(block, dtype, H100_SMEM_OPTIN, tf32=tf32) if p.nbuf == nbuf)
    assert plan.KC < block.cin, plan
    args = block.make(dtype)
    _check(_emulated(args, block, tf32, H100_SMEM_OPTIN, plan.rank), args, block, dtype, tf32, "cpu")
    _launched(emu, plan)


@needs_emu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_emulated_unaligned_x(emu, dtype):
    """x whose data starts one element past an aligned address: the kernel
    must not use vector loads on it (the emulator reports misaligned vector
    accesses) and must still be correct."""
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
    from helpers import randomize_norms
    from torchvision.models.resnet import Bottleneck, ResNet

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


@needs_emu
@pytest.mark.parametrize("block,mode", RANK_CASES, ids=[f"{b!r}-{_mode_id(m)}" for b, m in RANK_CASES])
def test_emulated_every_plan_rank(emu, block, mode):
    dtype, tf32 = mode
    plans = _plans(block, dtype, H100_SMEM_OPTIN, tf32=tf32)
    assert len(plans) >= 4
    args = block.make(dtype)
    for rank in _spread(len(plans), MAX_RANKS_PER_CASE):
        try:
            _check(_emulated(args, block, tf32, H100_SMEM_OPTIN, rank), args, block, dtype, tf32, "cpu")
        except AssertionError as exc:
            raise AssertionError(f"plan rank {rank} {plans[rank]}: {exc}") from exc
        _launched(emu, plans[rank])


@needs_emu
def test_emulated_plan_rank_out_of_range(emu):
    block = Block(1, 16, 32, 16, 4, 5, 5)
    args = block.make(torch.float32)
    count = len(_plans(block, torch.float32, H100_SMEM_OPTIN, tf32=False))
    with pytest.raises(RuntimeError, match=f"plan_rank={count} is out of range: {count} tile plans fit in 232448 "):
        _emulated(args, block, False, H100_SMEM_OPTIN, count)
    with pytest.raises(RuntimeError, match="plan_rank=-1 is out of range"):
        _emulated(args, block, False, H100_SMEM_OPTIN, -1)


# -- NaN / Inf propagation, the output's memory format, determinism, sizes ---


POISON_TARGETS = ["x", "w1", "b1", "w2", "b2", "w3", "b3", "wd"]


@needs_emu
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("mode", [(torch.float16, True), (torch.float32, False)], ids=_mode_id)
def test_emulated_non_finite_positions_match_eager(emu, mode, value):
    """A NaN or +-Inf in x or in any weight or bias gives non-finite outputs
    at exactly the positions eager PyTorch (the reference backend, same
    dtype) gives them: every ReLU propagates NaN as torch.relu does
    (relu(NaN) = NaN, where max(v, 0) would give 0). A poisoned 3x3 weight
    sits at the centre tap, which never meets the zero padding: the kernel
    multiplies padding rows by the weights (0 * NaN = NaN), while eager's
    CPU fp32 conv skips padded taps and fp16 does not (implementation
    defined; docs/cuda_backend.md)."""
    dtype, tf32 = mode
    block = Block(1, 24, 32, 40, 4, 7, 9, projection=True)
    names = ["x", "w1", "b1", "w2", "b2", "w3", "b3", "wd", "bd"]
    plans = _plans(block, dtype, H100_SMEM_OPTIN, tf32=tf32)
    for target in POISON_TARGETS:
        args = block.make(dtype)
        t = args[names.index(target)]
        index = [int(torch.randint(size, ())) for size in t.shape]
        if target == "w2":
            index[2:] = [1, 1]  # the centre tap: see the docstring
        index = tuple(index)
        with torch.no_grad():
            t[index] = value
        eager = bottleneck_inference_reference(*args, *block.conv)
        rank = int(torch.randint(min(len(plans), 8), ()))
        y = _emulated(args, block, tf32, H100_SMEM_OPTIN, rank)
        if value != value:  # NaN reaches the output whatever it poisons (-Inf may be rectified away)
            assert torch.isnan(eager).any(), target
        assert torch.equal(~torch.isfinite(y), ~torch.isfinite(eager)), (target, index, plans[rank])
        assert torch.equal(torch.isnan(y).any(), torch.isnan(eager).any()), target


@needs_emu
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "ambiguous"])
def test_emulated_output_memory_format_follows_x(emu, layout):
    """y is NCHW-contiguous for NCHW-contiguous x and channels_last for
    channels_last x, as ATen's conv gives it (common.layout; x with C == 1
    is both, and gets NCHW), written by the kernel itself through y's
    strides: the emulated op fills y's storage with NaN before the launch,
    so an element the kernel does not write fails. The fake kernel
    agrees (opcheck)."""
    block = Block(2, 1, 16, 24, 4, 5, 7, projection=True) if layout == "ambiguous" else Block(2, 24, 16, 24, 4, 5, 7)
    args = block.make(torch.float32, channels_last=layout != "nchw")
    y = _emulated(args, block, False)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)
    assert y.is_contiguous() == (layout != "channels_last")
    _check(y, args, block, torch.float32, False, "cpu")
    from cuda_cases import _packed_args
    packed = _packed_args(emu.fused_block_pack_weights, args, block)
    torch.library.opcheck(emu.fused_block_forward.default, (*packed, *block.conv, False, H100_SMEM_OPTIN, 0))
    y2 = ops.bottleneck_inference(*args, stride=block.stride, dilation=block.dilation, groups=block.groups,
                                  backend="cuda_emulated")
    assert y2.stride() == y.stride()


@needs_emu
def test_emulated_is_deterministic(emu):
    """No atomics, a fixed summation order: two identical calls give
    bitwise-equal outputs, whatever the plan."""
    block = Block(2, 40, 48, 40, 2, 7, 9)
    args = block.make(torch.bfloat16)
    for rank in (0, 3):
        assert torch.equal(_emulated(args, block, True, H100_SMEM_OPTIN, rank),
                           _emulated(args, block, True, H100_SMEM_OPTIN, rank))


@needs_emu
def test_emulated_refuses_sizes_it_cannot_index(emu):
    """The kernel numbers the batch's pixels in 32 bits (offsets into x and
    y are 64-bit): N*H*W >= 2^31 is refused before anything is launched or
    copied (x is a broadcast view here; converting it would take 4 GiB)."""
    block = Block(1, 1, 8, 8, 2, 1, 1, projection=True)
    args = block.make(torch.float16)
    from cuda_cases import _packed_args
    packed = _packed_args(emu.fused_block_pack_weights, args, block)
    packed[0] = torch.zeros(1, 1, 1, 1, dtype=torch.float16).expand(2 ** 15, 1, 256, 256)
    with pytest.raises(RuntimeError, match=r"N\*H\*W must be < 2\^31"):
        emu.fused_block_forward(*packed, *block.conv, True, H100_SMEM_OPTIN, 0)
