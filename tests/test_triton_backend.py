"""Tests of the `triton` backend (resnext_kernels/triton_kernels).

On a machine without CUDA the kernels run on CPU tensors in the Triton
interpreter: tests/conftest.py sets TRITON_INTERPRET=1 before anything imports
triton. The line below repeats that for a run of this file alone without the
conftest; it is a no-op when triton was already imported (then conftest did it).

Interpreter caveats: `tl.dot` ignores input_precision there (numpy fp32), so
the TF32 on/off runs on CPU check that both settings run and are correct but
cannot see a TF32 difference; bf16 dots give garbage in the interpreter, so
bf16 is tested on CUDA only. Sizes stay small (H, W <= 9) because the
interpreter runs every program in Python.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import triton  # noqa: E402

from resnext_kernels import FusedResNeXtBlock  # noqa: E402
from resnext_kernels.backends import registry  # noqa: E402
from resnext_kernels.common import settings  # noqa: E402
from resnext_kernels.common.timing import cache_bytes  # noqa: E402
from resnext_kernels.ops import inference  # noqa: E402
from resnext_kernels.backends.reference import bottleneck_inference_reference  # noqa: E402
from resnext_kernels.backends.triton import _common, bottleneck_inference_triton, packing  # noqa: E402
from resnext_kernels.backends.triton import conv1x1_bias_relu as k1  # noqa: E402
from resnext_kernels.backends.triton import grouped_conv_bias_relu as k2a  # noqa: E402
from resnext_kernels.backends.triton import grouped_conv_conv3 as k2  # noqa: E402
from resnext_kernels.bench import triton_compile as compile_check  # noqa: E402
from resnext_kernels.bench.shapes import BlockShape  # noqa: E402
from helpers import Block, assert_close_to_reference, randomize_norms  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # subprocesses import the package from here
DEVICE = "cuda" if HAS_CUDA else "cpu"
cuda_only = (pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU (no CUDA device)"))

pytestmark = pytest.mark.skipif(
    registry.unavailable_reason("triton", DEVICE) is not None,
    reason=f"triton backend unusable: {registry.unavailable_reason('triton', DEVICE)}",
)


# Interpreter-sized blocks covering every packing regime: d = 1, 4, 8, 14
# (d_p <= 16: several groups per 16-channel block-diagonal tile), d = 24, 40,
# 64 (one group per tile, padded to d_p = GT), d = 128 (group spans two 64-wide
# tiles: the input-chunk sweep); Cin/Cout not multiples of 16, odd H/W, stride
# 2 on odd sizes, dilation 2, batch 1, a 1xW image, identity and projection.
CPU_BLOCKS = [
    Block(2, 32, 64, 32, 16, 9, 9),                                  # d=4, s1-like
    Block(2, 24, 32, 40, 8, 9, 9, projection=True),                  # d=4, s1_first-like
    Block(1, 48, 64, 72, 8, 9, 7, stride=2, projection=True),        # d=8, stride 2 on odd sizes
    Block(2, 20, 16, 20, 16, 7, 7),                                  # d=1
    Block(1, 28, 28, 28, 2, 7, 9, dilation=2),                       # d=14, dilation 2
    Block(1, 20, 48, 36, 2, 7, 7, stride=2, projection=True),        # d=24 -> d_p=32
    Block(1, 24, 80, 24, 2, 5, 7),                                   # d=40 -> d_p=64
    Block(1, 36, 128, 36, 2, 7, 7, dilation=2),                      # d=64
    Block(1, 24, 256, 40, 2, 5, 5, stride=2, projection=True),       # d=128: KCH=2
    Block(1, 16, 32, 24, 4, 1, 3, stride=2, projection=True),        # 1x3 image, padding only
    Block(2, 16, 32, 32, 4, 9, 9, stride=2, dilation=2, projection=True),  # stride 2 + dilation 2
]

# (dtype, allow_tf32): allow_tf32 is set for the fp32 runs only.
DTYPES = [
    pytest.param(torch.float32, True, id="fp32-tf32on"),
    pytest.param(torch.float32, False, id="fp32-tf32off"),
    pytest.param(torch.float16, None, id="fp16"),
    pytest.param(torch.bfloat16, None, id="bf16", marks=cuda_only),  # interpreter bf16 dots are garbage
]

# Floor of the relative error bound (helpers.assert_close_to_reference): for
# fp32 with TF32 on, a GPU convolution may or may not use TF32 while our dots
# always do, so eager's error does not bound ours; TF32 keeps 10 mantissa bits.
_TF32_FLOOR = 5e-3


@pytest.fixture
def allow_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    yield lambda flag: (setattr(torch.backends.cudnn, "allow_tf32", flag),
                        setattr(torch.backends.cuda.matmul, "allow_tf32", flag))
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Make torch.empty return NaN-filled floating tensors during the test.

    The launcher allocates t1 and y with torch.empty, so any element a kernel
    fails to write stays NaN and fails the finiteness check. Returns the list
    of poisoned allocations so a test can assert the poisoning happened.
    """
    real_empty = torch.empty
    made = []

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
            made.append(t)
        return t

    monkeypatch.setattr(torch, "empty", empty)
    return made


def _check_block(block, dtype, tf32, device, allow_tf32, poisoned=None, eager_device=None, nan_out=False,
                 strategy=None, batch_chunk=None):
    """Run the triton backend on `block` and compare with fp64 and eager at dtype.

    nan_out: pass a NaN-filled `out=` (else y comes from torch.empty).
    strategy, batch_chunk: the launcher's overrides (None: the backend chooses)."""
    if tf32 is not None:
        allow_tf32(tf32)
    inputs = block.make(dtype, device)
    expected = bottleneck_inference_reference(*_fp64_cpu(inputs), *block.conv)
    eager = bottleneck_inference_reference(*inputs, *block.conv)
    n_poisoned = len(poisoned) if poisoned is not None else 0
    ho, wo = (block.h - 1) // block.stride + 1, (block.w - 1) // block.stride + 1
    out = None
    if nan_out:
        out = torch.full((block.n, block.cout, ho, wo), float("nan"), dtype=dtype, device=device)
        out = out.contiguous(memory_format=torch.channels_last)
    y = bottleneck_inference_triton(*inputs, *block.conv, out=out, strategy=strategy, batch_chunk=batch_chunk)
    assert out is None or y is out
    if poisoned is not None:
        expected_empties = (1 if nan_out else 2) + (strategy == "split")
        assert len(poisoned) - n_poisoned >= expected_empties, \
            "t1 (t2 when split, y) should come from the poisoned torch.empty"
    assert y.shape == (block.n, block.cout, ho, wo)
    assert y.dtype == dtype and y.device == inputs[0].device
    assert y.is_contiguous(memory_format=torch.channels_last)
    floor = _TF32_FLOOR if (tf32 and device == "cuda") else 1e-6
    assert_close_to_reference(y.cpu(), expected, eager.cpu(), floor=floor)


def _fp64_cpu(inputs):
    return [None if t is None else t.detach().to("cpu", torch.float64) for t in inputs]


@pytest.mark.parametrize("dtype,tf32", DTYPES)
@pytest.mark.parametrize("block", CPU_BLOCKS, ids=repr)
def test_blocks_match_fp64_reference(block, dtype, tf32, allow_tf32, poisoned_empty):
    _check_block(block, dtype, tf32, DEVICE, allow_tf32, poisoned_empty)


@pytest.mark.parametrize("max_gt", [16, 32])
@pytest.mark.parametrize("block", [
    Block(1, 24, 128, 40, 2, 5, 5, stride=2, projection=True),  # d=64 in 4 or 2 chunks
    Block(1, 20, 48, 20, 2, 5, 7),                              # d=24 (d_p=32) in 2 or 1 chunks
], ids=repr)
def test_group_split_across_tiles(block, max_gt, monkeypatch, allow_tf32, poisoned_empty):
    """d > GT: every output tile must sweep all input chunks of its group
    (a kernel reading only its own tile passes d <= 16 and fails here)."""
    monkeypatch.setattr(packing, "MAX_GT", max_gt)
    packing.PACK_CACHE.clear()  # entries packed with another GT must not be reused
    try:
        tiling = packing.GroupTiling(block.width, block.groups)
        assert tiling.gt == min(max_gt, tiling.d_p) and tiling.kch == tiling.d_p // tiling.gt
        _check_block(block, torch.float32, False, DEVICE, allow_tf32, poisoned_empty)
    finally:
        packing.PACK_CACHE.clear()


@pytest.mark.parametrize("width,groups", [(64, 16), (28, 2), (48, 2), (256, 2), (24, 24)])
def test_packed_w2_is_the_grouped_conv(width, groups):
    """Unpacking w2p through the packed channel map gives back the dense
    block-diagonal 3x3 weight, per tap, including the chunk layout for d > GT."""
    d = width // groups
    w2 = torch.randn(width, d, 3, 3, dtype=torch.float64)
    ones = torch.ones(width, dtype=torch.float64)
    tiling, packed = packing.pack_weights(
        torch.randn(width, 8, 1, 1, dtype=torch.float64), ones, w2, ones,
        torch.randn(8, width, 1, 1, dtype=torch.float64), torch.ones(8, dtype=torch.float64), None, None, groups)
    t = tiling
    # dense[tap, in_p, out_p] from the packed tiles
    dense = torch.zeros(9, t.width_p, t.width_p, dtype=torch.float64)
    w2p = packed["w2p"]
    assert w2p.shape == (9, t.n_tiles, t.kch, t.gt, t.gt)
    for ot in range(t.n_tiles):
        for kc in range(t.kch):
            in0 = (ot // t.kch) * t.kch * t.gt + kc * t.gt
            dense[:, in0:in0 + t.gt, ot * t.gt:(ot + 1) * t.gt] = w2p[:, ot, kc]
    # expected dense weight over real channels: w[tap, c_in, c_out], zero across groups
    expected = torch.zeros(9, width, width, dtype=torch.float64)
    for g in range(groups):
        sl = slice(g * d, (g + 1) * d)
        expected[:, sl, sl] = w2[sl].reshape(d, d, 9).permute(2, 1, 0)
    idx = t.packed_index("cpu")
    torch.testing.assert_close(dense[:, idx][:, :, idx], expected, rtol=0, atol=0)
    # Nothing else: weights outside the real channels are zero.
    dense[:, idx[:, None], idx[None, :]] = 0
    assert dense.abs().max() == 0


def test_nchw_input_and_op_wrapper(allow_tf32):
    """Through inference.bottleneck_inference(backend="triton"): NCHW-contiguous and
    channels_last inputs give the same, correct channels_last output."""
    allow_tf32(False)
    block = Block(2, 24, 32, 40, 8, 7, 9, stride=2, projection=True)
    inputs = block.make(torch.float32, DEVICE, channels_last=False)
    assert inputs[0].is_contiguous()
    kwargs = dict(stride=block.stride, dilation=block.dilation, groups=block.groups, backend="triton")
    y_nchw = inference.bottleneck_inference(*inputs, **kwargs)
    inputs[0] = inputs[0].contiguous(memory_format=torch.channels_last)
    y_cl = inference.bottleneck_inference(*inputs, **kwargs)
    assert y_nchw.is_contiguous(memory_format=torch.channels_last)
    expected = bottleneck_inference_reference(*_fp64_cpu(inputs), *block.conv)
    eager = bottleneck_inference_reference(*inputs, *block.conv)
    assert_close_to_reference(y_nchw.cpu(), expected, eager.cpu())
    torch.testing.assert_close(y_nchw, y_cl, rtol=0, atol=0)


def test_out_argument_is_written_completely(allow_tf32):
    allow_tf32(False)
    block = Block(1, 16, 32, 24, 4, 5, 7, projection=True)
    inputs = block.make(torch.float32, DEVICE)
    out = torch.full((1, 24, 5, 7), float("nan"), device=DEVICE).contiguous(memory_format=torch.channels_last)
    y = bottleneck_inference_triton(*inputs, *block.conv, out=out)
    assert y is out
    expected = bottleneck_inference_reference(*_fp64_cpu(inputs), *block.conv)
    assert_close_to_reference(y.cpu(), expected, bottleneck_inference_reference(*inputs, *block.conv).cpu())
    with pytest.raises(ValueError, match="out must be"):
        bottleneck_inference_triton(*inputs, *block.conv, out=torch.empty(1, 24, 5, 7, device=DEVICE))


def test_packed_weights_are_cached_and_invalidated(monkeypatch, allow_tf32):
    allow_tf32(False)
    calls = []
    real_pack = packing.pack_weights

    def counting_pack(*args):
        calls.append(1)
        return real_pack(*args)

    monkeypatch.setattr(packing, "pack_weights", counting_pack)
    block = Block(1, 16, 32, 16, 4, 5, 5)
    inputs = block.make(torch.float32, DEVICE)
    y1 = bottleneck_inference_triton(*inputs, *block.conv)
    y2 = bottleneck_inference_triton(*inputs, *block.conv)
    assert len(calls) == 1, "the second call with the same weights must not repack"
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    inputs[3].mul_(-1.5)  # in-place weight update bumps _version: must repack
    y3 = bottleneck_inference_triton(*inputs, *block.conv)
    assert len(calls) == 2
    expected = bottleneck_inference_reference(*_fp64_cpu(inputs), *block.conv)
    assert_close_to_reference(y3.cpu(), expected, bottleneck_inference_reference(*inputs, *block.conv).cpu())


def test_pack_cache_drops_entries_of_freed_weights():
    packing.PACK_CACHE.clear()
    block = Block(1, 16, 32, 16, 4, 3, 3)
    for _ in range(3):  # fresh weights each time, as with BN folded per forward
        inputs = block.make(torch.float32, DEVICE)
        bottleneck_inference_triton(*inputs, *block.conv)
        del inputs
    assert len(packing.PACK_CACHE) == 1  # only the last entry, not yet purged
    packing.PACK_CACHE.clear()


def test_tf32_flag_read_at_call_time(allow_tf32):
    allow_tf32(True)
    assert _common.dot_precision(torch.float32) == "tf32"
    allow_tf32(False)
    assert _common.dot_precision(torch.float32) == "ieee"
    assert _common.dot_precision(torch.float16) == "tf32"  # no effect on 16-bit dots


def test_opcheck(allow_tf32):
    allow_tf32(False)
    block = Block(1, 16, 32, 24, 4, 5, 5, stride=2, projection=True)
    inputs = block.make(torch.float32, DEVICE)
    torch.library.opcheck(
        torch.ops.resnext_kernels.bottleneck_inference.default,
        (*inputs, *block.conv, "triton"),
    )


def test_fused_module_triton_backend(allow_tf32):
    """FusedResNeXtBlock(..., backend="triton") runs (on CPU tensors under the interpreter)."""
    allow_tf32(False)
    down = torch.nn.Sequential(torch.nn.Conv2d(24, 32, 1, stride=2, bias=False), torch.nn.BatchNorm2d(32))
    block = FusedResNeXtBlock(24, 8, stride=2, downsample=down, groups=4, base_width=16, backend="triton")
    randomize_norms(block).eval()
    x = torch.randn(2, 24, 7, 7).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = block.to(DEVICE)(x.to(DEVICE))
        block.backend = "reference"
        eager = block.cpu()(x)
        expected = block.double()(x.double())
    assert_close_to_reference(y.cpu(), expected, eager)


def _meta_kernel_args(shape, dtype):
    """(tiling, K1 (args, consts), K2 (args, consts)) as the launchers build
    them for a compile_check.SHAPES-style `shape` at batch 128, on meta
    tensors (host logic only), with the current TF32 flag."""
    tiling, launches = compile_check.kernel_launches(shape, dtype, torch.backends.cudnn.allow_tf32)
    return tiling, launches["K1"][2:], launches["K2"][2:]


def _named(kernel, args, consts):
    """Kernel argument name -> value, as the autotuner hands them to the prune callback."""
    return {**dict(zip(kernel.arg_names, args)), **consts}


# (dtype, allow_tf32) of the three operand classes of the GPU config tables.
OPERAND_CLASSES = {
    "bf16": (torch.bfloat16, True),
    "fp32-tf32": (torch.float32, True),
    "fp32-ieee": (torch.float32, False),
}


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
        assert allowed == k2._TILES[k2._operand_class(t1, consts["PREC"])][tiling.gt > 16]
    assert all(k2._tile(c) in allowed for c in kept)
    best = triton.cdiv(cout, max(bco for _, bco, _, _ in allowed))
    assert max(triton.cdiv(cout, c.kwargs["BLOCK_CO"]) for c in kept) <= 2 * best


def _launch_params(config):
    """A triton.Config as plain values (Config has no __eq__)."""
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def _k1_params(bm, bn, bk, warps, stages):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages}


def _k2_params(bp, bco, warps, stages):
    return {"BLOCK_P": bp, "BLOCK_CO": bco, "BLOCK_K": 64, "num_warps": warps, "num_stages": stages}


# The canonical shapes plus an interpreter-sized unaligned block (Cin 24,
# Cout 40) where no K1 tile fits and the prune falls back to its smallest.
HEURISTIC_SHAPES = {**compile_check.SHAPES, "tiny_odd": BlockShape("tiny_odd", 9, 24, 32, 8, 40, 1)}

# Spot checks of the configs launched with RESNEXT_KERNELS_AUTOTUNE=0
# (K1, K2): the general 128x128 K1 tile and K2's widest Cout tile (no t2
# recompute for Cout 256) where they are allowed; BLOCK_M 64 for "ieee";
# the narrowest K2 tile for unaligned channel counts.
EXPECTED_HEURISTIC = {
    ("s1", "bf16"): (_k1_params(128, 128, 64, 8, 3), _k2_params(64, 256, 8, 2)),
    ("s1", "fp32-ieee"): (_k1_params(64, 128, 64, 4, 4), _k2_params(64, 256, 8, 2)),
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


class _LaunchSpy:
    """Stands in for a kernel object (`kernel[grid](...)`): records each
    launch's keyword arguments, then forwards the launch to `kernel` if given."""

    def __init__(self, kernel, record):
        self.kernel, self.record = kernel, record
        self.arg_names = getattr(kernel, "arg_names", None)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.record.append(kwargs)
            if self.kernel is not None:
                self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture
def launches(monkeypatch):
    """Records, per kernel ("K1", "K2", "K2a"; K2b is K1's kernel, so under
    "K1"), the launchers' GPU-branch launches: "tuned" (the triton.autotune
    wrapper, replaced: nothing runs, as the CPU cannot autotune and a GPU test
    must not), "raw" (the @triton.jit kernel, forwarded) and "picked" (the
    configs heuristic_config returned)."""
    records = {}
    for name, mod, raw, tuned in (("K1", k1, "_conv1x1_bias_relu_kernel", "_conv1x1_bias_relu_tuned"),
                                  ("K2", k2, "_grouped_conv_conv3_kernel", "_grouped_conv_conv3_tuned"),
                                  ("K2a", k2a, "_grouped_conv_bias_relu_kernel", "_grouped_conv_bias_relu_tuned")):
        rec = records[name] = {"tuned": [], "raw": [], "picked": []}
        monkeypatch.setattr(mod, tuned, _LaunchSpy(None, rec["tuned"]))
        monkeypatch.setattr(mod, raw, _LaunchSpy(getattr(mod, raw), rec["raw"]))

        def pick(args, real=mod.heuristic_config, picked=rec["picked"]):
            picked.append(real(args))
            return picked[-1]

        monkeypatch.setattr(mod, "heuristic_config", pick)
    return records


# Launches per kernel of each strategy (K1's kernel runs twice when split: K1, K2b).
STRATEGY_LAUNCHES = {"fused": {"K1": 1, "K2": 1, "K2a": 0}, "split": {"K1": 2, "K2": 0, "K2a": 1}}


def _assert_heuristic_launches(records, strategy="fused"):
    """The kernels of `strategy` ran raw, once each, with the meta-parameters,
    num_warps and num_stages of the config heuristic_config picked; never
    autotuned. K1's kernel ran without RESIDUAL (K1), then with it (K2b)."""
    for name, rec in records.items():
        assert not rec["tuned"], f"{name} went through the autotuner with {settings.AUTOTUNE_ENV}=0"
        assert len(rec["picked"]) == len(rec["raw"]) == STRATEGY_LAUNCHES[strategy][name], name
        for picked, raw in zip(rec["picked"], rec["raw"]):
            params = _launch_params(picked)
            assert {k: raw.get(k) for k in params} == params, name
    assert [raw["RESIDUAL"] for raw in records["K1"]["raw"]] == [False, True][:STRATEGY_LAUNCHES[strategy]["K1"]]


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


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU error outside the interpreter; this machine has CUDA")
def test_cpu_tensors_rejected_without_interpreter():
    code = (
        "import torch, resnext_kernels as rk\n"
        "x = torch.randn(1, 4, 3, 3)\n"
        "w1, w2, w3, b = torch.randn(4, 4, 1, 1), torch.randn(4, 4, 3, 3), torch.randn(4, 4, 1, 1), torch.randn(4)\n"
        "try:\n"
        "    rk.bottleneck_inference(x, w1, b, w2, b, w3, b, backend='triton')\n"
        "except rk.BackendUnavailableError as e:\n"
        "    print('RAISED', e)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=120)
    assert "RAISED" in res.stdout and "TRITON_INTERPRET=1" in res.stdout, res.stdout + res.stderr


# ---------------------------------------------------------------- GPU only
# Same regimes at realistic-ish sizes, plus the canonical ResNeXt-50 32x4d
# shapes (bench.shapes.SHAPES) at batch 2.
GPU_BLOCKS = [
    Block(4, 64, 128, 256, 32, 28, 28, projection=True),               # s1_first, 28x28
    Block(2, 256, 128, 256, 32, 56, 56),                               # s1
    Block(2, 256, 256, 512, 32, 56, 56, stride=2, projection=True),    # s2_first
    Block(2, 512, 256, 512, 32, 28, 28),                               # s2
    Block(2, 1024, 512, 1024, 32, 14, 14),                             # s3 (d=16)
    Block(2, 2048, 1024, 2048, 32, 7, 7),                              # s4 (d=32)
    Block(2, 256, 512, 256, 8, 32, 32),                                # cifar29 (d=64)
    Block(2, 200, 280, 328, 20, 13, 15, stride=2, projection=True),    # d=14, odd everything
    Block(1, 96, 384, 96, 3, 17, 17, dilation=2),                      # d=128, dilation 2
    Block(2, 72, 96, 72, 96, 13, 13),                                  # d=1
    Block(2, 120, 240, 136, 6, 11, 9, stride=2, projection=True),      # d=40
]


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


# ------------------------------------------------ split path (identity blocks)
# K1, K2a (t2 = relu(grouped 3x3 + b2) written once), K2b (K1's kernel with
# RESIDUAL: relu(t2 @ w3 + b3 + x)). Every packing regime: d = 1, 4, 14
# (dilation 2), 24 (d_p 32), 64, 128 (a group spans two 64-channel tiles,
# KCH = 2); unaligned channel counts; odd H/W; batch 2 so chunks of 1 reuse
# the t1/t2 buffers.
SPLIT_BLOCKS = [
    Block(2, 20, 16, 20, 16, 7, 7),               # d=1
    Block(2, 32, 64, 32, 16, 9, 9),               # d=4
    Block(2, 28, 28, 28, 2, 7, 9, dilation=2),    # d=14, dilation 2
    Block(2, 20, 48, 20, 2, 5, 7),                # d=24 -> d_p=32
    Block(2, 36, 128, 36, 2, 7, 7),               # d=64
    Block(2, 24, 256, 24, 2, 5, 5),               # d=128: KCH=2
]


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
