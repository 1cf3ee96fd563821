"""Tests of the CUDA emulator itself (csrc/emulation/cuda_emu.h).

Small kernels with known results (csrc/emulation/emu_selftest.cpp) run
through the emulator: barrier semantics, a shared-memory tree reduction,
the mma.sync / ldmatrix fragment layouts (per lane and register, as the
PTX ISA documents them) against a plain matrix product, cp.async
completion, and the errors the emulator must report.
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


@pytest.mark.parametrize("sync", [1, 2], ids=["syncwarp", "syncthreads"])
def test_mma_store_then_read_needs_barrier(emu, sync):
    c = torch.randn(3, 16, 8)  # one tile per warp
    good = emu.mma_readback(c, sync)
    torch.testing.assert_close(good, c.reshape(3, 1, 128).expand(3, 32, 128).reshape(96, 128), rtol=0, atol=0)
    # Without a barrier a lane reads elements other lanes have not stored yet.
    assert torch.isnan(emu.mma_readback(c, 0)).any()


def test_divergent_barrier_is_reported(emu):
    with pytest.raises(RuntimeError, match="__syncthreads"):
        emu.divergent_barrier(64)
    # The abandoned block's fibers do not leak into the next launch.
    x = torch.randn(128)
    torch.testing.assert_close(emu.smem_shift(x, 64, True), x.view(2, 64).roll(-1, dims=1).reshape(-1))


def test_divergent_syncwarp_is_reported(emu):
    with pytest.raises(RuntimeError, match="__syncwarp"):
        emu.divergent_syncwarp()


def test_warp_any_is_the_or_of_its_warp(emu):
    # Warp 0: one lane set (the last); warp 1: none; warp 2: all; warp 3: one (the first).
    pred = torch.zeros(4, 32)
    pred[0, 31] = pred[3, 0] = 1.0
    pred[2] = 1.0
    expected = pred.amax(dim=1, keepdim=True).expand(4, 32).reshape(-1)
    torch.testing.assert_close(emu.warp_any(pred.reshape(-1)), expected, rtol=0, atol=0)


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


# -- mma.sync / ldmatrix fragments (PTX ISA layouts, per lane and register) ---


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_mma_fragment_layouts_match_matmul(emu, dtype):
    """Fragments built by hand from the PTX ISA's tables (m16n8k16 for
    f16/bf16, m16n8k8 for tf32): the emulated mma gives A @ B + C."""
    k = 8 if dtype == torch.float32 else 16
    a, b, c = torch.randn(16, k).to(dtype), torch.randn(k, 8).to(dtype), torch.randn(16, 8)
    d = emu.mma_fragments(a, b, c, 0)
    if dtype == torch.float32:
        a, b = _tf32(a), _tf32(b)
    expected = a.double() @ b.double() + c.double()
    torch.testing.assert_close(d.double(), expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("wrong", [1, 2, 3], ids=["A_register", "B_register", "D_register"])
def test_mma_wrong_fragment_index_gives_wrong_product(emu, dtype, wrong):
    """The emulator really lays fragments out per lane and register: a
    kernel that swaps two A, B or D registers gets a wrong product."""
    k = 8 if dtype == torch.float32 else 16
    a, b, c = torch.randn(16, k).to(dtype), torch.randn(k, 8).to(dtype), torch.randn(16, 8)
    good = emu.mma_fragments(a, b, c, 0)
    bad = emu.mma_fragments(a, b, c, wrong)
    assert (bad - good).abs().max() > 0.1


def _ldmatrix_expected(rows, num, trans):
    """Lane l's register i per the PTX ISA: the b16 pair (row l/4, cols
    2(l%4), 2(l%4)+1) of matrix i, or with .trans (rows 2(l%4), 2(l%4)+1,
    col l/4); the first element in the low half."""
    m = rows.view(num, 8, 8).to(torch.int64) & 0xFFFF
    out = torch.empty(32, num, dtype=torch.int64)
    for lane in range(32):
        for i in range(num):
            if trans:
                lo, hi = m[i, 2 * (lane % 4), lane // 4], m[i, 2 * (lane % 4) + 1, lane // 4]
            else:
                lo, hi = m[i, lane // 4, 2 * (lane % 4)], m[i, lane // 4, 2 * (lane % 4) + 1]
            out[lane, i] = lo | hi << 16
    return out


@pytest.mark.parametrize("num", [1, 2, 4])
@pytest.mark.parametrize("trans", [False, True], ids=["plain", "trans"])
def test_ldmatrix_lane_layout(emu, num, trans):
    rows = torch.randint(-(2 ** 15), 2 ** 15, (num * 8, 8), dtype=torch.int16)
    got = emu.ldmatrix_lanes(rows, num, trans).to(torch.int64) & 0xFFFFFFFF
    assert torch.equal(got, _ldmatrix_expected(rows, num, trans))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_ldmatrix_feeds_mma(emu, dtype):
    """A through ldmatrix.x4 (row addresses per lane), B through
    ldmatrix.x2.trans (16-bit) or by hand (tf32), then mma: A @ B. The
    emulator counts the tile's multiply-accumulates."""
    k = 8 if dtype == torch.float32 else 16
    a, b = torch.randn(16, k).to(dtype), torch.randn(k, 8).to(dtype)
    d = emu.ldmatrix_mma(a, b)
    if dtype == torch.float32:
        a, b = _tf32(a), _tf32(b)
    torch.testing.assert_close(d.double(), a.double() @ b.double(), rtol=1e-6, atol=1e-5)
    assert emu.mma_macs_of(a, b).item() == 16 * 8 * k


@pytest.mark.parametrize("mode,message", [
    (0, "ldmatrix: the row address of lane 0 is not 16-byte aligned"),
    (1, "not in the block's shared memory"),
    (2, "lanes issued different warp-collective instructions"),
    (3, "lanes wait at different warp-level operations"),
    (4, "needs all 32 lanes of the warp"),
], ids=["misaligned", "global_address", "different_shapes", "syncwarp_vs_mma", "half_warp"])
def test_collective_misuse_is_reported(emu, mode, message):
    with pytest.raises(RuntimeError, match=message):
        emu.collective_misuse(mode)
    # The emulator stays usable.
    a, b = torch.randn(16, 16).half(), torch.randn(16, 8).half()
    torch.testing.assert_close(emu.ldmatrix_mma(a, b).double(), a.double() @ b.double(), rtol=1e-6, atol=1e-5)
