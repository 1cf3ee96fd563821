"""Tests of the CUDA emulator itself (csrc/emulation/cuda_emu.h).

Small kernels with known results (csrc/emulation/emu_selftest.cpp) run
through the emulator: barrier semantics, a shared-memory tree reduction,
WMMA load/mma/store against matmul, cp.async completion, and the errors the
emulator must report.
The first test in a fresh environment builds the emulation library (under a
minute, cached afterwards).
"""

import pytest
import torch

from resnext_kernels.backends.cuda import emulation

_reason = emulation.unavailable_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"CUDA emulation unusable: {_reason}")


@pytest.fixture(scope="module")
def emu():
    emulation.load()
    return torch.ops.resnext_kernels_emu


@pytest.mark.parametrize("threads", [32, 96, 256])
def test_barrier_orders_shared_memory(emu, threads):
    x = torch.randn(3 * threads)
    out = emu.smem_shift(x, threads, True)
    torch.testing.assert_close(out, x.view(3, threads).roll(-1, dims=1).reshape(-1), rtol=0, atol=0)


def test_missing_barrier_is_visible(emu):
    # Without the barrier, some thread reads a neighbour's slot before it is
    # written and sees the 0xFF poison (NaN): the emulator exposes the race.
    x = torch.randn(2 * 64)
    out = emu.smem_shift(x, 64, False)
    assert torch.isnan(out).any()


@pytest.mark.parametrize("threads", [64, 256, 1024])
def test_shared_memory_tree_reduction(emu, threads):
    x = torch.randn(7 * threads)
    out = emu.block_reduce(x, threads)
    torch.testing.assert_close(out, x.view(7, threads).double().sum(1).float(), rtol=1e-5, atol=1e-5)


def _tf32(t):
    # cvt.rna.tf32.f32: round to nearest, ties away from zero, 10 mantissa bits.
    bits = t.view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b_col_major", [False, True])
def test_wmma_matches_matmul(emu, dtype, b_col_major):
    a = torch.randn(16, 16).to(dtype)
    b = torch.randn(16, 16).to(dtype)
    c = torch.randn(16, 16)
    b_mem = b.t().contiguous() if b_col_major else b
    d = emu.wmma_mma(a, b_mem, c, b_col_major)
    expected = a.double() @ b.double() + c.double()
    # Products of fp16/bf16 values are exact in fp32; only the fp32 sums round.
    torch.testing.assert_close(d.double(), expected, rtol=1e-6, atol=1e-5)


def test_wmma_tf32_rounds_operands(emu):
    a = torch.randn(16, 8)
    b = torch.randn(8, 16)
    c = torch.randn(16, 16)
    d = emu.wmma_mma(a, b, c, False)
    expected = _tf32(a).double() @ _tf32(b).double() + c.double()
    torch.testing.assert_close(d.double(), expected, rtol=1e-6, atol=1e-5)
    # And it differs from full fp32 (the operands really were rounded).
    assert (d.double() - (a.double() @ b.double() + c.double())).abs().max() > 1e-5


@pytest.mark.parametrize("sync", [1, 2], ids=["syncwarp", "syncthreads"])
def test_wmma_store_then_read_needs_barrier(emu, sync):
    c = torch.randn(3, 16, 16)  # one tile per warp
    good = emu.wmma_readback(c, sync)
    torch.testing.assert_close(good, c.reshape(3, 1, 256).expand(3, 32, 256).reshape(96, 256), rtol=0, atol=0)
    # Without a barrier a lane reads elements other lanes have not stored yet.
    assert torch.isnan(emu.wmma_readback(c, 0)).any()


def test_wmma_misaligned_pointer_is_reported(emu):
    a = torch.randn(512).half()
    with pytest.raises(RuntimeError, match="not 256-bit aligned"):
        emu.wmma_misaligned(a)


def test_wmma_divergent_lanes_are_reported(emu):
    a = torch.randn(512).half()
    with pytest.raises(RuntimeError, match="different sequences of warp-collective"):
        emu.wmma_divergent(a)


def test_divergent_barrier_is_reported(emu):
    with pytest.raises(RuntimeError, match="__syncthreads"):
        emu.divergent_barrier(64)
    # The abandoned block's fibers do not leak into the next launch.
    x = torch.randn(128)
    torch.testing.assert_close(emu.smem_shift(x, 64, True), x.view(2, 64).roll(-1, dims=1).reshape(-1))


def test_divergent_syncwarp_is_reported(emu):
    with pytest.raises(RuntimeError, match="__syncwarp"):
        emu.divergent_syncwarp()


def test_async_copy_lands_at_wait(emu):
    x = torch.randn(64 * 4)
    expected = x.view(64, 4).roll(-1, dims=0).reshape(-1)
    torch.testing.assert_close(emu.async_copy(x, 0), expected, rtol=0, atol=0)
    # Reading before waiting for the copy sees the shared-memory poison.
    assert torch.isnan(emu.async_copy(x, 1)).any()
    with pytest.raises(RuntimeError, match="never waited for"):
        emu.async_copy(x, 2)
    # A reported error leaves the emulator usable.
    torch.testing.assert_close(emu.async_copy(x, 0), expected, rtol=0, atol=0)
