"""The Triton kernels' GPU configurations, on the host: the autotune prunes,
the heuristic configs without autotuning, the launch path with the switch
and the ahead-of-time compile for sm_90a (no GPU needed)."""

import json
import os
import subprocess
import sys

import pytest
import torch
import triton
from helpers import Block
from triton_cases import (
    DEVICE,
    DTYPES,
    HEURISTIC_SHAPES,
    OPERAND_CLASSES,
    REPO_ROOT,
    SPLIT_BLOCKS,
    STRATEGY_LAUNCHES,
    _assert_heuristic_launches,
    _check_block,
    _k1_params,
    _k2_params,
    _launch_params,
    _meta_kernel_args,
    _named,
    needs_triton,
)

from resnext_kernels.backends.triton import (
    _common,
    bottleneck_inference_triton,
)
from resnext_kernels.backends.triton import conv1x1_bias_relu as k1
from resnext_kernels.backends.triton import grouped_conv_conv3 as k2
from resnext_kernels.bench import triton_compile as compile_check
from resnext_kernels.bench.shapes import BlockShape
from resnext_kernels.common import settings

pytestmark = needs_triton


@pytest.mark.parametrize("dtype,tf32", list(OPERAND_CLASSES.values()), ids=list(OPERAND_CLASSES))
@pytest.mark.parametrize("name", list(compile_check.SHAPES))
def test_gpu_config_heuristics(name, dtype, tf32, allow_tf32):
    """The GPU autotune candidates for each canonical shape (batch 128): the
    prune callbacks accept the real kernel arguments, K1 stays within shared
    memory, K2 keeps only the measured spill-free tiles of its operand class
    (the narrowest tile for unaligned channel counts), and the t2 recompute
    factor cdiv(Cout, BLOCK_CO) stays within 2x of the best allowed tile.
    Meta tensors: host logic only (compilation is checked by
    test_kernels_compile_for_sm90)."""
    cin, cout = compile_check.SHAPES[name].cin, compile_check.SHAPES[name].cout
    allow_tf32(tf32)
    tiling, k1_launch, (args, consts) = _meta_kernel_args(compile_check.SHAPES[name], dtype)
    t1 = args[0]

    def pruned(mod, kernel, args, consts):
        assert set(mod.TUNE_KEY) | set(consts) <= set(kernel.arg_names)
        kept = mod._prune(mod._gpu_configs(), dict(zip(kernel.arg_names, args)), **consts)
        assert kept
        return kept

    for c in pruned(k1, k1._conv1x1_bias_relu_kernel, *k1_launch):
        k = c.kwargs
        shared = c.num_stages * (k["BLOCK_M"] + k["BLOCK_N"]) * k["BLOCK_K"] * dtype.itemsize
        assert shared <= compile_check.SM90_MAX_SHARED
    assert consts["PREC"] == ("ieee" if dtype == torch.float32 and not tf32 else "tf32")
    kept = pruned(k2, k2._grouped_conv_conv3_kernel, args, consts)
    allowed = k2._allowed_tiles(_named(k2._grouped_conv_conv3_kernel, args, consts))
    if cin % 16 == 0 and cout % 16 == 0:
        table = k2._TILES[k2._operand_class(t1, consts["PREC"])][tiling.gt > 16]
        assert set(allowed) <= set(table)
        if consts["PREC"] == "ieee" and dtype == torch.float32 and tiling.mixes_groups:
            # Multi-group tiles in "ieee": the 64x256 tile spills with the exact path.
            assert allowed == tuple(t for t in table if t[1] <= 128)
        else:
            assert allowed == table
    assert all(k2._tile(c) in allowed for c in kept)
    best = triton.cdiv(cout, max(bco for _, bco, _, _ in allowed))
    assert max(triton.cdiv(cout, c.kwargs["BLOCK_CO"]) for c in kept) <= 2 * best


# Spot checks of the configs launched with RESNEXT_KERNELS_AUTOTUNE=0
# (K1, K2): the general 128x128 K1 tile and K2's widest Cout tile (no t2
# recompute for Cout 256) where they are allowed; BLOCK_M 64 for "ieee";
# the narrowest K2 tile for unaligned channel counts.
EXPECTED_HEURISTIC = {
    ("s1", "bf16"): (_k1_params(128, 128, 64, 8, 3), _k2_params(64, 256, 8, 2)),
    ("s1", "fp32-ieee"): (_k1_params(64, 128, 64, 4, 4), _k2_params(64, 128, 8, 2)),  # d=4: no 64x256 in "ieee"
    ("s3", "fp32-ieee"): (_k1_params(64, 128, 64, 4, 4), _k2_params(64, 256, 8, 2)),  # d=16: one group per tile
    ("s4", "fp32-tf32"): (_k1_params(128, 128, 64, 8, 3), _k2_params(64, 128, 8, 2)),
    ("s4", "fp32-ieee"): (_k1_params(64, 128, 64, 4, 4), _k2_params(64, 128, 8, 2)),
    ("odd_d14", "bf16"): (_k1_params(128, 128, 64, 8, 3), _k2_params(64, 64, 8, 2)),
    ("odd_d14", "fp32-ieee"): (_k1_params(64, 64, 64, 4, 4), _k2_params(64, 64, 8, 2)),
    ("tiny_odd", "bf16"): (_k1_params(64, 64, 64, 4, 4), _k2_params(64, 64, 8, 2)),
}


@pytest.mark.parametrize("cls", list(OPERAND_CLASSES))
@pytest.mark.parametrize("name", list(HEURISTIC_SHAPES))
def test_heuristic_config_without_autotuning(name, cls, allow_tf32):
    """heuristic_config (the config launched when RESNEXT_KERNELS_AUTOTUNE=0)
    is the first config the prune keeps, so one the autotuner would benchmark;
    the same on every call; for K2 the largest tile among the kept ones with
    the fewest t2 recomputes. Host logic on meta tensors."""
    dtype, tf32 = OPERAND_CLASSES[cls]
    allow_tf32(tf32)
    shape = HEURISTIC_SHAPES[name]
    _, k1_launch, k2_launch = _meta_kernel_args(shape, dtype)
    chosen, kept = [], []
    for mod, kernel, launch in ((k1, k1._conv1x1_bias_relu_kernel, k1_launch),
                                (k2, k2._grouped_conv_conv3_kernel, k2_launch)):
        args = _named(kernel, *launch)
        chosen.append(_launch_params(mod.heuristic_config(args)))
        kept.append([_launch_params(c) for c in mod._prune(mod._gpu_configs(), args)])
        assert chosen[-1] == kept[-1][0]
        assert _launch_params(mod.heuristic_config(args)) == chosen[-1]

    k2_chosen, k2_kept = chosen[1], kept[1]

    def recompute(c):
        return triton.cdiv(shape.cout, c["BLOCK_CO"])

    fewest = [c for c in k2_kept if recompute(c) == min(map(recompute, k2_kept))]
    assert k2_chosen in fewest
    assert k2_chosen["BLOCK_P"] * k2_chosen["BLOCK_CO"] == max(c["BLOCK_P"] * c["BLOCK_CO"] for c in fewest)
    if (name, cls) in EXPECTED_HEURISTIC:
        assert tuple(chosen) == EXPECTED_HEURISTIC[name, cls]


def test_k2_configs_in_preference_order():
    """K2's candidate list is strictly ordered widest BLOCK_CO first, then
    largest BLOCK_P: a total order, so the first kept config (the one launched
    without autotuning) does not depend on set iteration order."""
    order = [(c.kwargs["BLOCK_CO"], c.kwargs["BLOCK_P"]) for c in k2._gpu_configs()]
    assert order == sorted(set(order), reverse=True)


# Interpreter-sized: the s1_first-like canonical regime (d = 4, projection)
# and unaligned channel counts with stride 2.
SWITCH_BLOCKS = [
    Block(2, 64, 128, 256, 32, 7, 9, projection=True),
    Block(1, 48, 64, 72, 8, 9, 7, stride=2, projection=True),
]


@pytest.mark.parametrize("dtype,tf32", DTYPES[1:3])  # fp32 with TF32 off, fp16 (bf16 dots fail in the interpreter)
@pytest.mark.parametrize("block", SWITCH_BLOCKS, ids=repr)
def test_autotune_switch_in_gpu_launch_path(block, dtype, tf32, monkeypatch, launches, allow_tf32, poisoned_empty):
    """The launchers' GPU branch, run by the interpreter (it ignores
    num_warps/num_stages): RESNEXT_KERNELS_AUTOTUNE is read at every call;
    "0" launches the raw kernels with heuristic_config's config and gives the
    right y in a NaN-filled out=; "1" goes through the autotune wrappers;
    anything else raises."""
    monkeypatch.setattr(_common, "interpreting", lambda: False)  # the launch rule's GPU branches
    monkeypatch.setenv(settings.AUTOTUNE_ENV, "0")
    _check_block(block, dtype, tf32, DEVICE, allow_tf32, poisoned_empty, nan_out=True)
    _assert_heuristic_launches(launches)

    inputs = block.make(dtype, DEVICE)
    monkeypatch.setenv(settings.AUTOTUNE_ENV, "1")
    bottleneck_inference_triton(*inputs, *block.conv)
    assert [len(launches[k]["tuned"]) for k in ("K1", "K2")] == [1, 1]
    assert [len(launches[k]["raw"]) for k in ("K1", "K2")] == [1, 1]  # only the earlier "0" launches
    monkeypatch.setenv(settings.AUTOTUNE_ENV, "off")
    with pytest.raises(ValueError, match=settings.AUTOTUNE_ENV):
        bottleneck_inference_triton(*inputs, *block.conv)


@pytest.mark.parametrize("dtype,shapes", [
    ("bfloat16", ["s1_first", "s3", "s4", "cifar29_s1", "d128", "odd_d14"]),
    ("float32", ["s2_first", "s3", "s4", "d128"]),  # TF32 dots (allow_tf32 defaults to True)
], ids=["bf16", "fp32-tf32"])
def test_kernels_compile_for_sm90(dtype, shapes):
    """Every config the autotuner would benchmark compiles for sm_90a (Triton
    + the bundled ptxas, no GPU needed) with zero spill stores, shared memory
    within 227 KB, and tensor-core MMAs. Run in a subprocess because the
    kernels must not be interpreted there."""
    cmd = [sys.executable, "-m", "resnext_kernels.bench.triton_compile", "--json", "--dtype", dtype, *shapes]
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    res = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads(res.stdout)
    assert {r["shape"] for r in results} == set(shapes)
    for shape in shapes:  # split kernels for identity blocks only
        kernels = {r["kernel"] for r in results if r["shape"] == shape}
        assert kernels == {"K1", "K2"} | (set() if compile_check.SHAPES[shape].projection else {"K2a", "K2b"}), shape
    bad = [r for r in results
           if r["spill_stores"] or r["shared"] > compile_check.SM90_MAX_SHARED or not r["tensor_cores"]]
    assert not bad, bad


# The split path's GPU launches, run by the interpreter: identity, d=4 and
# unaligned d=14 with dilation 2.
SPLIT_SWITCH_BLOCKS = [Block(2, 64, 128, 64, 32, 7, 9), SPLIT_BLOCKS[2]]


@pytest.mark.parametrize("dtype,tf32", DTYPES[1:3])
@pytest.mark.parametrize("block", SPLIT_SWITCH_BLOCKS, ids=repr)
def test_split_autotune_switch_in_gpu_launch_path(block, dtype, tf32, monkeypatch, launches, allow_tf32,
                                                  poisoned_empty):
    """RESNEXT_KERNELS_AUTOTUNE=0: strategy="split" launches K1, K2a and K2b
    raw with their heuristic configs and fills a NaN out= correctly; no
    strategy (and no timing) is the fused path; "1" autotunes all three."""
    monkeypatch.setattr(_common, "interpreting", lambda: False)  # the launch rule's GPU branches
    monkeypatch.setenv(settings.AUTOTUNE_ENV, "0")
    _check_block(block, dtype, tf32, DEVICE, allow_tf32, poisoned_empty, nan_out=True, strategy="split")
    _assert_heuristic_launches(launches, "split")

    inputs = block.make(dtype, DEVICE)
    for rec in launches.values():
        for calls in rec.values():
            calls.clear()
    bottleneck_inference_triton(*inputs, *block.conv)
    _assert_heuristic_launches(launches, "fused")

    monkeypatch.setenv(settings.AUTOTUNE_ENV, "1")
    bottleneck_inference_triton(*inputs, *block.conv, strategy="split")
    assert {k: len(rec["tuned"]) for k, rec in launches.items()} == STRATEGY_LAUNCHES["split"]
    assert [call["RESIDUAL"] for call in launches["K1"]["tuned"]] == [False, True]


# Identity shapes of HEURISTIC_SHAPES plus an interpreter-sized unaligned one
# (Cout 24: no K2b tile fits, the prune falls back to its smallest).
SPLIT_HEURISTIC_SHAPES = {**{name: shape for name, shape in HEURISTIC_SHAPES.items() if not shape.projection},
                          "tiny_odd_id": BlockShape("tiny_odd_id", 9, 24, 32, 8, 24, 1)}


# Spot checks (K2a, K2b) with RESNEXT_KERNELS_AUTOTUNE=0: K2a's 128-pixel
# tile; K2b K1's 128x128 tile (64 accumulators per thread), BLOCK_M 64 for
# "ieee", the smallest tile for unaligned Cout.
EXPECTED_SPLIT_HEURISTIC = {
    ("s4", "bf16"): ({"BLOCK_P": 128, "num_warps": 4, "num_stages": 3}, _k1_params(128, 128, 64, 8, 3)),
    ("s1", "fp32-ieee"): ({"BLOCK_P": 128, "num_warps": 4, "num_stages": 3}, _k1_params(64, 128, 64, 4, 4)),
    ("tiny_odd_id", "fp32-tf32"): ({"BLOCK_P": 128, "num_warps": 4, "num_stages": 3}, _k1_params(64, 64, 64, 4, 4)),
}


@pytest.mark.parametrize("cls", list(OPERAND_CLASSES))
@pytest.mark.parametrize("name", list(SPLIT_HEURISTIC_SHAPES))
def test_split_heuristic_configs_without_autotuning(name, cls):
    """K2a's and K2b's heuristic_config is the first config their prune
    keeps (so one the autotuner would benchmark and compile_check compiles),
    the same on every call; K2b (RESIDUAL) keeps only tiles with at most 64
    accumulator elements per thread (its residual tile doubles them; 128
    spilled). Host logic on meta tensors."""
    dtype, tf32 = OPERAND_CLASSES[cls]
    _, launches = compile_check.kernel_launches(SPLIT_HEURISTIC_SHAPES[name], dtype, tf32)
    assert launches["K2b"][3]["RESIDUAL"] and not launches["K1"][3]["RESIDUAL"]
    chosen = []
    for kname in ("K2a", "K2b"):
        kernel, mod, args, consts = launches[kname]
        named = _named(kernel, args, consts)
        kept = mod._prune(mod._gpu_configs(), named)
        chosen.append(_launch_params(mod.heuristic_config(named)))
        assert chosen[-1] == _launch_params(kept[0]) == _launch_params(mod.heuristic_config(named)), kname
    k2b_kept = k1._prune(k1._gpu_configs(), _named(launches["K2b"][0], *launches["K2b"][2:]))
    assert all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 32 * c.num_warps for c in k2b_kept)
    if (name, cls) in EXPECTED_SPLIT_HEURISTIC:
        assert tuple(chosen) == EXPECTED_SPLIT_HEURISTIC[name, cls]
