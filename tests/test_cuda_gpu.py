"""The CUDA kernel on a GPU (marked `cuda`, skipped without one): correctness
at canonical and odd shapes, the split plans, the pack cache, every plan
rank, plan autotuning (also under CUDA graph capture), the plan timing
CLI, NCHW output, determinism and offsets past 2^31 elements."""

import json

import pytest
import torch
from cuda_cases import (
    CASES,
    MODES,
    RANK_CASES,
    _check,
    _cuda_run,
    _mode_id,
    _packed_args,
    _plans,
    needs_cuda,
)
from helpers import Block

from resnext_kernels.backends import cuda as cuda_backend
from resnext_kernels.backends.cuda import planner
from resnext_kernels.bench import plans as cuda_plans
from resnext_kernels.common import settings
from resnext_kernels.ops import inference as ops


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
    plans = _plans(block, dtype, limit, emulated=False, tf32=tf32)
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


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
def test_cuda_output_memory_format_and_determinism(channels_last):
    """y has x's memory format (written by the kernel through y's strides)
    and two identical calls are bitwise equal (no atomics)."""
    block = Block(2, 48, 64, 48, 8, 13, 11)
    args = block.make(torch.float16, device="cuda", channels_last=channels_last)
    y = _cuda_run(args, block, True)
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    _check(y, args, block, torch.float16, True, "cuda")
    assert torch.equal(y, _cuda_run(args, block, True))


@pytest.mark.cuda
@needs_cuda
def test_cuda_offsets_past_2_31():
    """x and y with more than 2^31 elements (4.3 GB each in fp16): the
    kernel's offsets are 64-bit. Checked on the last image, where they are
    largest, against the reference run on that image alone."""
    n, cin, h = 520, 1024, 64  # n*h*h*cin = 2.18e9 elements
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2 ** 30:
        pytest.skip(f"needs ~12 GiB of free GPU memory, has {free / 2 ** 30:.1f}")
    block = Block(1, cin, 32, cin, 8, h, h)
    args = block.make(torch.float16, device="cuda")
    x = torch.empty(n, cin, h, h, device="cuda", dtype=torch.float16, memory_format=torch.channels_last)
    x.normal_()
    assert x.numel() > 2 ** 31
    packed = _packed_args(torch.ops.resnext_kernels.fused_block_pack_weights, args, block)
    y = torch.ops.resnext_kernels.fused_block_forward(x, *packed[1:], *block.conv, True, 0, 0)
    last = [x[-1:].contiguous(memory_format=torch.channels_last), *args[1:]]
    _check(y[-1:], last, block, torch.float16, True, "cuda")
