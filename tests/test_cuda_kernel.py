"""The CUDA kernel's correctness on CPU, through the emulation build: every
dtype mode, odd shapes, group widths, tile plans (width chunks, Cout slices,
x chunk buffering) and plan ranks against the fp64 reference (cuda_cases.py)."""

import pytest
import torch
from cuda_cases import (
    CASES,
    H100_SMEM_OPTIN,
    MAX_RANKS_PER_CASE,
    MODES,
    RANK_CASES,
    SPLIT_CASES,
    _check,
    _emulated,
    _mode_id,
    _plans,
    _reference,
    _smallest_limit,
    _spread,
    needs_emu,
)
from helpers import Block

from resnext_kernels.backends import cuda as cuda_backend
from resnext_kernels.ops import inference as ops


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
