"""The Triton backend's strategies: batch chunks and the split path for
identity blocks (correctness in the interpreter), their arguments, and the
candidates timed on a GPU."""


import pytest
import torch
from helpers import Block
from triton_cases import DEVICE, DTYPES, SPLIT_BLOCKS, _check_block, needs_triton

from resnext_kernels.backends.triton import (
    bottleneck_inference_triton,
)

pytestmark = needs_triton


# Batch chunks: several K1/K2 launch pairs over batch slices sharing one t1
# buffer (the last chunk shorter), NaN-poisoned t1 and y.
CHUNK_BLOCKS = [
    Block(3, 32, 64, 32, 16, 7, 7),                             # identity, d=4
    Block(3, 24, 48, 40, 2, 7, 9, stride=2, projection=True),   # projection, stride 2, d=24
]


@pytest.mark.parametrize("batch_chunk", [1, 2, 5])
@pytest.mark.parametrize("block", CHUNK_BLOCKS, ids=repr)
def test_batch_chunks_match_fp64_reference(block, batch_chunk, allow_tf32, poisoned_empty):
    _check_block(block, torch.float32, False, DEVICE, allow_tf32, poisoned_empty, nan_out=True,
                 batch_chunk=batch_chunk)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_batch_chunk_rejects_bad_values(bad):
    block = CHUNK_BLOCKS[0]
    with pytest.raises(ValueError, match="batch_chunk must be a positive int or None"):
        bottleneck_inference_triton(*block.make(torch.float32, DEVICE), *block.conv, batch_chunk=bad)


def test_chunk_candidates_fill_fractions_of_l2():
    from resnext_kernels.backends.triton import chunk_candidates

    s1_t1 = 56 * 56 * 128 * 2  # bytes of one image's t1 at stage 1, bf16
    l2 = 50 * 2**20
    assert chunk_candidates(128, s1_t1, l2) == [128, l2 // 8 // s1_t1, l2 // 4 // s1_t1] == [128, 8, 16]
    assert chunk_candidates(8, s1_t1, l2) == [8]  # the whole batch is already a small chunk
    assert chunk_candidates(128, 7 * 7 * 1024 * 2, l2) == [128, 65]  # stage 4: 1/4 of L2 holds all 128
    assert chunk_candidates(4, 10 * l2, l2) == [4, 1]  # huge images: one at a time


@pytest.mark.parametrize("batch_chunk", [1, None], ids=["chunk1", "whole"])
@pytest.mark.parametrize("dtype,tf32", DTYPES[1:3])  # fp32 with TF32 off, fp16 (bf16 dots fail in the interpreter)
@pytest.mark.parametrize("block", SPLIT_BLOCKS, ids=repr)
def test_split_matches_fp64_reference(block, dtype, tf32, batch_chunk, allow_tf32, poisoned_empty):
    """NaN-poisoned t1, t2 and y (from torch.empty, or a NaN out= for the
    1-image chunks): every element written, within the fp64 bound."""
    _check_block(block, dtype, tf32, DEVICE, allow_tf32, poisoned_empty, nan_out=batch_chunk == 1,
                 strategy="split", batch_chunk=batch_chunk)


@pytest.mark.parametrize("bad", ["Split", "", 1, True])
def test_strategy_rejects_bad_values(bad):
    block = CHUNK_BLOCKS[0]
    with pytest.raises(ValueError, match="strategy must be one of"):
        bottleneck_inference_triton(*block.make(torch.float32, DEVICE), *block.conv, strategy=bad)


def test_split_refused_for_projection_blocks():
    block = CHUNK_BLOCKS[1]
    with pytest.raises(ValueError, match="strategy='split' is for identity blocks only"):
        bottleneck_inference_triton(*block.make(torch.float32, DEVICE), *block.conv, strategy="split")


def test_candidates_split_for_identity_blocks_only():
    from resnext_kernels.backends.triton import candidates, choose_candidate

    l2 = 50 * 2**20
    s1_t1 = 56 * 56 * 128 * 2  # bytes of one image's t1 at stage 1, bf16
    fused = [("fused", 128), ("fused", 8), ("fused", 16)]
    assert candidates(128, s1_t1, l2, False) == fused
    # Split chunks hold t1 and t2: half the images for the same L2 fraction.
    assert candidates(128, s1_t1, l2, True) == fused + [("split", 128), ("split", 4), ("split", 8)]
    s4_t1 = 7 * 7 * 1024 * 2
    assert candidates(128, s4_t1, l2, True) == [("fused", 128), ("fused", 65), ("split", 128), ("split", 32),
                                                ("split", 65)]
    assert candidates(4, s1_t1, l2, True) == [("fused", 4), ("split", 4)]
    # Not tuning (here: no CUDA tensor to time on): fused, whole batch.
    x = torch.empty(3, 8, 5, 5)
    assert choose_candidate(None, x, 16, True, run=None) == ("fused", 3)
