"""The CUDA kernel's tile planner: candidate plans (from _C and from the
emulation build), their order, argument errors, the plan-rank autotuning
and the MMA-work count."""

import contextlib
import functools
import types

import pytest
import torch
from cuda_cases import (
    H100_SMEM_OPTIN,
    _backend,
    _canonical_plans,
    _check,
    _plans,
    needs_c,
    needs_emu,
)
from helpers import Block, fake_timer

from resnext_kernels.backends import cuda as cuda_backend
from resnext_kernels.backends.cuda import planner
from resnext_kernels.bench import plans as cuda_plans
from resnext_kernels.bench.shapes import SHAPES
from resnext_kernels.common import settings, tuning

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
