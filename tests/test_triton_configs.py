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
from resnext_kernels.backends.triton import grouped_conv_bias_relu as k2a
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


# ---------------------------------------------------------------------------
# The documented config heuristic (docs/triton_backend.md, "Config heuristics"),
# re-derived here by brute force over the candidate lists below, which copy the
# documented ones (test_candidate_lists_are_the_documented_ones). The expected
# configs are computed from the docs' rules, never read from the code's output.

K1_TILES = (  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), in preference order
    (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (128, 128, 32, 4, 4),
)
K2_TILES = {  # operand class: ((BLOCK_P, BLOCK_CO, warps, stages) for GT == 16, ... for GT >= 32)
    "16bit": (((128, 128, 8, 2), (64, 256, 8, 2), (64, 128, 8, 2), (64, 64, 8, 2)),
              ((128, 128, 8, 2), (64, 256, 8, 2), (64, 128, 8, 2), (64, 64, 8, 2))),
    "tf32": (((64, 128, 8, 2), (64, 64, 8, 2)), ((64, 128, 8, 2), (64, 64, 8, 2))),
    "ieee": (((64, 256, 8, 2), (64, 128, 8, 2)), ((64, 128, 8, 2), (64, 64, 8, 2))),
}
K2_UNALIGNED_TILE = (64, 64, 8, 2)
K2A_TILES = ((128, 4, 3), (256, 8, 3), (64, 4, 3), (64, 8, 3))  # (BLOCK_P, warps, stages), in preference order
SHARED_BYTES = settings.H100_SMEM_OPTIN  # 227 KB


def _pow2_at_least(n):
    p = 1
    while p < n:
        p *= 2
    return p


def _ceil_div(a, b):
    return (a + b - 1) // b


def _documented_packing(width, groups):
    """(GT, KCH, width_p) of the docs' group packing: groups padded to d_p =
    the next power of two of d; d_p <= 16: 16-channel tiles of 16 / d_p
    groups; else tiles of GT = min(d_p, 64) channels, KCH = d_p / GT per group."""
    d_p = _pow2_at_least(width // groups)
    if d_p <= 16:
        return 16, 1, _ceil_div(groups, 16 // d_p) * 16
    gt = min(d_p, 64)
    return gt, d_p // gt, groups * d_p


def _documented_k1(cin, nout, itemsize, ieee, residual=False):
    """The tiles K1's (with residual: K2b's) prune keeps, in preference
    order: the listed ones not dropped; the smallest (BLOCK_M*BLOCK_N*BLOCK_K)
    when all are."""
    acc_limits = []
    if cin % 16 or nout % 16:  # unaligned rows
        acc_limits.append(32 if ieee else 64)
    if residual:
        acc_limits.append(64)

    def kept(bm, bn, bk, warps, stages):
        return (bn <= max(16, _pow2_at_least(nout)) and bk <= max(16, _pow2_at_least(cin))
                and stages * (bm + bn) * bk * itemsize <= SHARED_BYTES
                and not (ieee and bm > 64)
                and all(bm * bn <= limit * 32 * warps for limit in acc_limits))

    tiles = [t for t in K1_TILES if kept(*t)] or [min(K1_TILES, key=lambda t: t[0] * t[1] * t[2])]
    return [_k1_params(*t) for t in tiles]


def _documented_k2(cin, cout, operand_class, gt, groups_per_tile):
    """(the tiles K2's prune keeps, widest BLOCK_CO first, then the larger
    BLOCK_P; the heuristic's tile). Both start from the allowed tiles (for
    "ieee" with several groups per tile none wider than 128 channels) no
    wider than the padded Cout (else the narrowest allowed). Kept: a t2
    recompute factor cdiv(Cout, BLOCK_CO) within 2x of the fewest. The
    heuristic: the largest BLOCK_P * BLOCK_CO among those with the fewest
    recomputes."""
    allowed = (K2_UNALIGNED_TILE,) if cin % 16 or cout % 16 else K2_TILES[operand_class][gt > 16]
    if operand_class == "ieee" and groups_per_tile > 1 and allowed != (K2_UNALIGNED_TILE,):
        allowed = tuple(t for t in allowed if t[1] <= 128)
    fitting = [t for t in allowed if t[1] <= max(16, _pow2_at_least(cout))] or [min(allowed, key=lambda t: t[1])]
    fewest = min(_ceil_div(cout, t[1]) for t in fitting)
    kept = sorted((t for t in fitting if _ceil_div(cout, t[1]) <= 2 * fewest), key=lambda t: (t[1], t[0]),
                  reverse=True)
    best = max((t for t in fitting if _ceil_div(cout, t[1]) == fewest), key=lambda t: (t[0] * t[1], t[1]))
    return [_k2_params(*t) for t in kept], _k2_params(*best)


def _documented_k2a(m_out, gt, kch, itemsize, ieee):
    """The tiles K2a's prune keeps, in preference order: the listed ones
    not dropped (larger than the problem, over the shared memory, over 32
    t1-window elements per thread for "ieee"); the smallest BLOCK_P when all
    are."""
    def kept(bp, warps, stages):
        return (bp <= max(64, _pow2_at_least(m_out)) and stages * kch * (bp + gt) * gt * itemsize <= SHARED_BYTES
                and (not ieee or bp * kch * gt <= 32 * 32 * warps))

    tiles = [t for t in K2A_TILES if kept(*t)] or [min(K2A_TILES, key=lambda t: t[0])]
    return [{"BLOCK_P": bp, "num_warps": warps, "num_stages": stages} for bp, warps, stages in tiles]


def documented_configs(shape, cls, batch=128):
    """{kernel: (candidates, heuristic config)} by the documented heuristic
    for `shape` (a BlockShape) at `batch` in operand class `cls`
    (OPERAND_CLASSES): K1, K2 and, for identity blocks, K2a and K2b.
    Candidates: the configs the autotuner benchmarks, in preference order;
    without autotuning K1, K2a and K2b launch their first candidate."""
    dtype, tf32 = OPERAND_CLASSES[cls]
    itemsize, ieee = dtype.itemsize, dtype == torch.float32 and not tf32
    operand_class = "16bit" if itemsize == 2 else ("ieee" if ieee else "tf32")
    gt, kch, width_p = _documented_packing(shape.width, shape.groups)
    kept = _documented_k1(shape.cin, width_p, itemsize, ieee)
    groups_per_tile = gt // _pow2_at_least(shape.width // shape.groups)
    found = {"K1": (kept, kept[0]), "K2": _documented_k2(shape.cin, shape.cout, operand_class, gt, groups_per_tile)}
    if not shape.projection:
        for name, kept in (("K2a", _documented_k2a(batch * shape.hw * shape.hw, gt, kch, itemsize, ieee)),
                           ("K2b", _documented_k1(width_p, shape.cout, itemsize, ieee, residual=True))):
            found[name] = (kept, kept[0])
    return found


def _code_configs(shape, cls, batch=128):
    """{kernel: (the configs its prune keeps, heuristic_config)} from the
    code, with the kernel arguments the launchers build (meta tensors); also
    checks heuristic_config is the same on a second call."""
    dtype, tf32 = OPERAND_CLASSES[cls]
    _, launches = compile_check.kernel_launches(shape, dtype, tf32, batch)
    found = {}
    for name, (kernel, mod, args, consts) in launches.items():
        named = _named(kernel, args, consts)
        chosen = _launch_params(mod.heuristic_config(named))
        assert chosen == _launch_params(mod.heuristic_config(named)), name
        found[name] = ([_launch_params(c) for c in mod._prune(mod._gpu_configs(), named)], chosen)
    return found


def test_candidate_lists_are_the_documented_ones():
    """The code's candidate lists hold the documented tiles (K1 and K2a in
    the documented preference order); K2's order is its documented rule,
    widest BLOCK_CO first, then the larger BLOCK_P."""
    assert [_launch_params(c) for c in k1._gpu_configs()] == [_k1_params(*t) for t in K1_TILES]
    assert [(_launch_params(c)["BLOCK_P"], c.num_warps, c.num_stages) for c in k2a._gpu_configs()] == list(K2A_TILES)
    assert k2._TILES == K2_TILES and k2._UNALIGNED_TILES == (K2_UNALIGNED_TILE,)
    tiles = {t for pair in K2_TILES.values() for group in pair for t in group} | {K2_UNALIGNED_TILE}
    order = sorted(tiles, key=lambda t: (t[1], t[0]), reverse=True)
    assert [_launch_params(c) for c in k2._gpu_configs()] == [_k2_params(*t) for t in order]


# The docs' worked examples of the rules ("Without autotuning"), to check the
# derivation above against the prose.
DOCUMENTED_EXAMPLES = [
    ("s1", "bf16", "K1", _k1_params(128, 128, 64, 8, 3)),   # the general-purpose tile first
    ("s1", "fp32-ieee", "K1", _k1_params(64, 128, 64, 4, 4)),  # BLOCK_M 64 for "ieee"
    ("s1", "bf16", "K2", _k2_params(64, 256, 8, 2)),          # 64x256 for 16-bit
    ("s3", "fp32-ieee", "K2", _k2_params(64, 256, 8, 2)),     # and for "ieee" with one group per 16-channel tile
    ("s1", "fp32-ieee", "K2", _k2_params(64, 128, 8, 2)),     # 64x128 for "ieee" with several groups per tile
    ("s4", "fp32-tf32", "K2", _k2_params(64, 128, 8, 2)),     # 64x128 for TF32
    ("s4", "fp32-ieee", "K2", _k2_params(64, 128, 8, 2)),     # and for "ieee" with GT >= 32
    ("odd_d14", "bf16", "K2", _k2_params(64, 64, 8, 2)),      # 64x64 for unaligned channel counts
    ("s4", "bf16", "K2a", {"BLOCK_P": 128, "num_warps": 4, "num_stages": 3}),
    ("d128", "fp32-ieee", "K2a", {"BLOCK_P": 64, "num_warps": 8, "num_stages": 3}),  # d = 128 in "ieee"
    ("s4", "bf16", "K2b", _k1_params(128, 128, 64, 8, 3)),
    ("s1", "fp32-ieee", "K2b", _k1_params(64, 128, 64, 4, 4)),
]


@pytest.mark.parametrize("name,cls,kernel,params", DOCUMENTED_EXAMPLES,
                         ids=[f"{n}-{c}-{k}" for n, c, k, _ in DOCUMENTED_EXAMPLES])
def test_derivation_gives_the_documented_examples(name, cls, kernel, params):
    assert documented_configs(HEURISTIC_SHAPES[name], cls)[kernel][1] == params


@pytest.mark.parametrize("cls", list(OPERAND_CLASSES))
@pytest.mark.parametrize("name", list(HEURISTIC_SHAPES))
def test_heuristic_config_without_autotuning(name, cls):
    """For every kernel, the configs the prune keeps (the autotune
    candidates) and heuristic_config (launched when
    RESNEXT_KERNELS_AUTOTUNE=0; the same on every call) are the ones the
    documented heuristic gives, derived above. Host logic on meta tensors."""
    shape = HEURISTIC_SHAPES[name]
    assert _code_configs(shape, cls) == documented_configs(shape, cls)


def test_heuristic_config_on_random_shapes():
    """The same on 40 random block shapes (any channel counts, d from 1 to
    256, stride 1 or 2, batch 1 to 256) per operand class, drawn from the
    test's seed."""
    def rint(lo, hi):
        return int(torch.randint(lo, hi + 1, ()))

    for i in range(40):
        groups, d = rint(1, 64), rint(1, 256)
        stride, cout = rint(1, 2), rint(1, 2100)
        cin = rint(1, 2100) if stride == 2 or torch.rand(()) < 0.5 else cout
        shape = BlockShape(f"random{i}", rint(1, 60), cin, groups * d, groups, cout, stride)
        batch = rint(1, 256)
        for cls in OPERAND_CLASSES:
            assert _code_configs(shape, cls, batch) == documented_configs(shape, cls, batch), (shape, batch, cls)


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


# Every config of every kernel's candidate list computes the block, not only
# the heuristic's pick: a projection block with stride 2 (Cin 40 and Cout 72
# are not multiples of the K and Cout tiles: partial tiles, two Cout tiles
# for BLOCK_CO 64) on the fused path, and an identity block with d = 32
# (GT 32; K2b's K loop over width_p 96) on the split path. fp16: every
# listed config fits in shared memory at 16 bits (K1's 128x256x64 tile does
# not at 32), so on a GPU all of them compile and run.
EVERY_CONFIG_CASES = [
    ("fused", Block(2, 40, 64, 72, 4, 7, 9, stride=2, projection=True)),
    ("split", Block(2, 48, 96, 48, 3, 7, 7)),
]


@pytest.mark.parametrize("strategy,block", EVERY_CONFIG_CASES, ids=[c[0] for c in EVERY_CONFIG_CASES])
def test_every_candidate_config_computes_the_block(strategy, block, monkeypatch, launches, allow_tf32,
                                                   poisoned_empty):
    """The launchers' untuned GPU branch (RESNEXT_KERNELS_AUTOTUNE=0) with
    heuristic_config replaced by each config of the kernels' lists in turn
    (K1's and K2b's lists are the same; the shorter list wraps), checked
    against the fp64 reference with NaN-poisoned buffers. Under the
    interpreter the tile sizes take effect (num_warps / num_stages do not);
    on a GPU every config is compiled and run."""
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    monkeypatch.setenv(settings.AUTOTUNE_ENV, "0")
    lists = {"K1": k1._CONFIGS, "K2": k2._CONFIGS} if strategy == "fused" else \
        {"K1": k1._CONFIGS, "K2a": k2a._CONFIGS, "K2b": k1._CONFIGS}
    for i in range(max(map(len, lists.values()))):
        pick = {name: configs[i % len(configs)] for name, configs in lists.items()}
        monkeypatch.setattr(k1, "heuristic_config", lambda args: pick["K2b" if args["RESIDUAL"] else "K1"])
        monkeypatch.setattr(k2, "heuristic_config", lambda args: pick["K2"])
        monkeypatch.setattr(k2a, "heuristic_config", lambda args: pick["K2a"])
        for rec in launches.values():
            rec["raw"].clear()
        try:
            _check_block(block, torch.float16, None, DEVICE, allow_tf32, poisoned_empty, nan_out=True,
                         strategy=strategy)
        except AssertionError as exc:
            raise AssertionError(f"configs {({k: _launch_params(c) for k, c in pick.items()})}: {exc}") from exc
        raw = [*launches["K1"]["raw"], *launches["K2"]["raw"], *launches["K2a"]["raw"]]
        names = ["K1", "K2"] if strategy == "fused" else ["K1", "K2b", "K2a"]
        for name, call in zip(names, raw, strict=True):
            assert {k: call[k] for k in pick[name].kwargs} == pick[name].kwargs, name


# Identity shapes of HEURISTIC_SHAPES plus an interpreter-sized unaligned one
# (Cout 24: no K2b tile fits, the prune falls back to its smallest).
SPLIT_HEURISTIC_SHAPES = {**{name: shape for name, shape in HEURISTIC_SHAPES.items() if not shape.projection},
                          "tiny_odd_id": BlockShape("tiny_odd_id", 9, 24, 32, 8, 24, 1)}


@pytest.mark.parametrize("cls", list(OPERAND_CLASSES))
@pytest.mark.parametrize("name", list(SPLIT_HEURISTIC_SHAPES))
def test_split_heuristic_configs_without_autotuning(name, cls):
    """K2a's and K2b's candidates and heuristic_config are the documented
    heuristic's (derived above; K2b keeps at most 64 accumulator elements
    per thread). Host logic on meta tensors."""
    shape = SPLIT_HEURISTIC_SHAPES[name]
    dtype, tf32 = OPERAND_CLASSES[cls]
    _, launches = compile_check.kernel_launches(shape, dtype, tf32)
    assert launches["K2b"][3]["RESIDUAL"] and not launches["K1"][3]["RESIDUAL"]
    assert _code_configs(shape, cls) == documented_configs(shape, cls)
