"""The Triton backend on a GPU (marked `cuda`, skipped without one): bf16 and
real TF32, canonical shapes, heuristic configs, the tuned (strategy, chunk)
choice and the split path."""


import pytest
import torch
from helpers import Block
from triton_cases import (
    DTYPES,
    GPU_BLOCKS,
    HAS_CUDA,
    _assert_heuristic_launches,
    _check_block,
    needs_triton,
)

from resnext_kernels.common import settings
from resnext_kernels.common.timing import cache_bytes

pytestmark = needs_triton


@pytest.mark.parametrize("dtype,tf32", DTYPES)
@pytest.mark.parametrize("block", GPU_BLOCKS, ids=repr)
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU (no CUDA device)")
def test_gpu_blocks_match_fp64_reference(block, dtype, tf32, allow_tf32, poisoned_empty):
    _check_block(block, dtype, tf32, "cuda", allow_tf32, poisoned_empty)


# Without autotuning: canonical stage 1 (d = 4, Cout 256: no t2 recompute
# in 16-bit), stage 4 (d = 32, GT 32, Cout 2048: t2 recomputed per Cout tile)
# and the unaligned d = 14 block (narrowest K2 tile, unaligned K1 limits).
@pytest.mark.parametrize("dtype,tf32", DTYPES)
@pytest.mark.parametrize("block", [GPU_BLOCKS[1], GPU_BLOCKS[5], GPU_BLOCKS[7]], ids=repr)
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU (no CUDA device)")
def test_gpu_heuristic_configs_match_fp64_reference(block, dtype, tf32, monkeypatch, launches, allow_tf32,
                                                     poisoned_empty):
    """RESNEXT_KERNELS_AUTOTUNE=0 on the GPU: each kernel compiled and run
    once with its heuristic config (num_warps/num_stages included), y written
    completely into a NaN-filled out= and within the fp64 bound."""
    monkeypatch.setenv(settings.AUTOTUNE_ENV, "0")
    _check_block(block, dtype, tf32, "cuda", allow_tf32, poisoned_empty, nan_out=True)
    _assert_heuristic_launches(launches)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU (no CUDA device)")
def test_strategy_and_chunk_are_tuned_on_gpu(monkeypatch, allow_tf32):
    from resnext_kernels.backends import triton as triton_kernels

    monkeypatch.setattr(triton_kernels, "CHOICES", {})
    monkeypatch.setenv(settings.AUTOTUNE_ENV, "1")
    block = Block(32, 256, 128, 256, 32, 56, 56)  # stage 1 at batch 32: chunks and split are candidates
    _check_block(block, torch.bfloat16, None, "cuda", allow_tf32, nan_out=True)
    (choice,) = triton_kernels.CHOICES.values()
    assert choice in triton_kernels.candidates(32, 56 * 56 * 128 * 2, cache_bytes(torch.device("cuda")), True)


# Stage-3/4-like identity blocks (the shapes where the fused K2 recomputes
# the grouped conv 4x / 8x) on the split path, bf16, autotune on and off.
@pytest.mark.parametrize("autotune", ["1", "0"])
@pytest.mark.parametrize("block", [GPU_BLOCKS[4], GPU_BLOCKS[5]], ids=repr)
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU (no CUDA device)")
def test_gpu_split_matches_fp64_reference(block, autotune, request, monkeypatch, allow_tf32, poisoned_empty):
    monkeypatch.setenv(settings.AUTOTUNE_ENV, autotune)
    records = request.getfixturevalue("launches") if autotune == "0" else None  # spies would stop autotuning
    _check_block(block, torch.bfloat16, None, "cuda", allow_tf32, poisoned_empty, nan_out=True, strategy="split")
    if records is not None:
        _assert_heuristic_launches(records, "split")
