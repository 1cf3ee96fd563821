"""Helpers shared by the kernels and their launchers (no kernels here)."""

import collections
import contextlib
import dataclasses
import inspect

import torch
import triton
import triton.language as tl

from ...common import settings, tuning_store
from ...common.sizes import next_pow2

# Largest dynamic shared memory per block on H100/H200 (227 KB). The
# pipeliner keeps num_stages copies of a loop's operand tiles there.
MAX_SHARED = settings.H100_SMEM_OPTIN

# Program offsets (pid * BLOCK + arange(BLOCK), every BLOCK <= 256) are
# int32, so pixel counts stay below this; every element offset computed from
# a pixel index is int64 (pixels x channels passes 2**31 at large batch).
# Weight offsets are int32: a packed weight must have fewer than 2**31 elements.
MAX_PIXELS = 2**31 - 1024
MAX_WEIGHT_ELEMENTS = 2**31


@triton.jit
def relu(v):
    """torch.relu with NaN kept: tl.maximum's default (PTX max, like fmaxf)
    maps NaN to 0 and would hide a diverging network from a NaN check or a
    GradScaler. propagate_nan=ALL is PTX max.NaN, which ptxas (sm_90a) folds
    into the conversion to 16 bits (cvt.relu: F2FP...RELU), so it costs no
    more than the old ReLU; an explicit select (tl.where(v < 0, 0, v)) cost
    up to 33 more registers and 344 more SASS instructions
    (docs/triton_backend.md). Only -0.0 differs from torch.relu: it gives +0."""
    return tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)


def interpreting():
    """True when kernels run in the Triton interpreter (TRITON_INTERPRET=1).

    The interpreter runs every program sequentially in numpy, so the launchers
    use one fixed, large-tile config there instead of autotuning.
    """
    return settings.triton_interpreter_enabled()


def dot_precision(dtype):
    """`tl.dot` input_precision, read at call time.

    fp32 follows torch.backends.cudnn.allow_tf32 like PyTorch's convolutions:
    "tf32" while it is True, full fp32 ("ieee") when False. fp16/bf16 dots are
    exact products with fp32 accumulation whatever the flag says; they get
    "tf32" (Triton's default) so that one compiled variant serves both flag
    values. The interpreter ignores the setting (numpy matmul in fp32).
    """
    if dtype == torch.float32 and not torch.backends.cudnn.allow_tf32:
        return "ieee"
    return "tf32"


def first_kept_config(configs, prune, args):
    """The config launched when autotuning is off (settings.autotune_enabled()).

    `configs` is a launcher's autotune list in its documented preference
    order and `prune` its early_config_prune, which keeps that order. Taking
    the first kept config makes the choice deterministic and always one the
    autotuner would also benchmark (and bench/triton_compile compiles). `args`:
    kernel argument name -> value, as the autotuner passes them to `prune`
    (tensors may be on the meta device: only dtypes are read).
    """
    return prune(configs, args)[0]


def autotuned(kernel, configs, key, prune):
    """The triton.autotune wrapper of `kernel`: configs in preference order,
    re-tuned per `key`, pruned per call by `prune` (early_config_prune).

    Its results persist in Triton's own on-disk autotune cache
    (cache_results, in Triton's cache directory, TRITON_CACHE_DIR; keyed by
    Triton's version, the GPU's target arch, the kernel's source, the tuning
    key and the configs) unless the tuning store's disk part is off
    (RESNEXT_KERNELS_CACHE_DIR=off, read when this module is imported).
    Triton's knob TRITON_CACHE_AUTOTUNING=1 turns it on for every kernel."""
    persist = {}
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        persist["cache_results"] = tuning_store.store_path() is not None
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune},
                           **persist)(kernel)


def launch(kernel, tuned, grid, args, consts, interpret_config, pick_config):
    """Launch one of the kernels, by the rule they all follow: the
    interpreter runs the raw @triton.jit `kernel` with its fixed
    interpret_config; on a GPU `tuned` (its autotuned() wrapper) autotunes,
    or, with settings.autotune_enabled() off, `kernel` runs once with the
    config pick_config(kernel argument name -> value) returns (its
    meta-parameters, num_warps and num_stages), untimed. grid(meta) -> the
    launch grid for a config's meta-parameters."""
    if interpreting():
        kernel[grid(interpret_config)](*args, **consts, **interpret_config)
    elif settings.autotune_enabled():
        tuned[grid](*args, **consts)
    else:
        config = pick_config({**dict(zip(kernel.arg_names, args)), **consts})
        kernel[grid](*args, **consts, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def nhwc_view(buf, n, h, w):
    """[N, C, H, W] view (channels_last strides) of an NHWC activation buffer
    [n*h*w, C] (t1, t2), for the kernels that read [N, C, H, W] inputs."""
    return buf.view(n, h, w, buf.shape[1]).permute(0, 3, 1, 2)


def pixel_rows(t):
    """[N*H*W, C] view of a channels_last-contiguous [N, C, H, W] tensor (y,
    x and their batch slices), for K1's out and residual; the inverse of
    nhwc_view. Raises rather than copies when t is not one."""
    return t.permute(0, 2, 3, 1).view(-1, t.shape[1])


# -- the training kernels: fixed configs, no autotuning ----------------------
#
# The training kernels (issue 11) launch one config per kernel, chosen by the
# rules below; autotuning them is future work (docs/training.md). Under the
# interpreter the tiles are as large as the problem allows (fewer programs,
# fewer numpy round trips).


def training_gemm_tiles(n_cols, k_depth, itemsize, prec):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of a training GEMM
    whose output has n_cols columns and whose reduction is k_depth deep:
    128 x min(128, N) x min(64, K) tiles on 8 warps, 3 stages; full-fp32
    ("ieee") dots keep their operands in registers, so they get 64-row tiles;
    fp32 operands get 2 stages (3 needed up to 297 KB of shared memory for
    the dgrad on sm_90a, over the 227 KB; bench/triton_compile.py --training)."""
    block_n = min(128, max(16, next_pow2(n_cols)))
    block_k = min(64, max(16, next_pow2(k_depth)))
    block_m = 64 if (itemsize == 4 and prec == "ieee") else 128
    if interpreting():
        block_m = interpreter_pixels()
    return block_m, block_n, block_k, 8 if block_n >= 128 else 4, 2 if itemsize == 4 else 3


# -- test-only knobs: the tilings a GPU chooses, forced onto small CPU shapes --
#
# Under the interpreter the training kernels take 128-pixel tiles, one pixel
# range per wgrad and (at the tests' d <= 64) one tile per group, so the
# paths that only GPU-sized shapes reach (several tiles per group, split
# wgrad reductions, many statistics tiles) would never run on CPU. The
# tests force them with forced_tiling(); nothing else may set FORCED.


@dataclasses.dataclass
class ForcedTiling:
    """Test-only overrides (None: the normal rule).

    max_gt: the grouped conv's largest tile width (packing.GroupTiling), so
        that d = 32 or 64 spans KCH = d_p / max_gt tiles.
    wgrad_splits: pixel ranges of every wgrad reduction (conv1x1_wgrad.splits;
        fewer where the pixels run out: each range is whole pixel steps).
    pixels: pixels per program under the interpreter (interpreter_pixels):
        rows of the statistics tiles and of the backward's partial sums, and
        the wgrads' reduction step; a power of two >= 16 (tl.dot's minimum).
    """

    max_gt: int | None = None
    wgrad_splits: int | None = None
    pixels: int | None = None


FORCED = ForcedTiling()


@contextlib.contextmanager
def forced_tiling(max_gt=None, wgrad_splits=None, pixels=None):
    """Test-only: within, the training kernels use the ForcedTiling given."""
    global FORCED
    if pixels is not None and (pixels < 16 or pixels & (pixels - 1)):
        raise ValueError(f"pixels must be a power of two >= 16, got {pixels}")
    saved, FORCED = FORCED, ForcedTiling(max_gt, wgrad_splits, pixels)
    try:
        yield FORCED
    finally:
        FORCED = saved


def interpreter_pixels():
    """Pixels per program of the training kernels under the interpreter:
    128 (fewer programs, fewer numpy round trips), or FORCED.pixels."""
    return FORCED.pixels or 128


_RECORDED = None  # a list while recording_launches() is active
_COUNTED = None  # a Counter while counting_launches() is active


@contextlib.contextmanager
def recording_launches():
    """Within, launch_fixed records (kernel, args, consts, num_warps,
    num_stages) in the yielded list instead of launching: the sm_90a compile
    check (bench/triton_compile.py) runs a training step on meta tensors this
    way to compile exactly what a GPU would launch."""
    global _RECORDED
    saved, _RECORDED = _RECORDED, []
    try:
        yield _RECORDED
    finally:
        _RECORDED = saved


@contextlib.contextmanager
def counting_launches():
    """Test-only: within, launch_fixed also counts its launches (they run as
    usual) in the yielded Counter, keyed by launch_key: the tests check
    that every code path they force has run."""
    global _COUNTED
    saved, _COUNTED = _COUNTED, collections.Counter()
    try:
        yield _COUNTED
    finally:
        _COUNTED = saved


def launch_key(kernel, grid, consts):
    """(kernel name, its constexprs as a sorted tuple of (name, value), the
    grid's second dimension or 1: a wgrad's pixel ranges)."""
    name = kernel.fn.__name__.strip("_").removesuffix("_kernel")
    return name, tuple(sorted(consts.items())), grid[1] if len(grid) > 1 else 1


def launch_fixed(kernel, grid, args, consts, num_warps, num_stages):
    """Launch a training kernel with one config (no autotuning); the
    interpreter ignores num_warps and num_stages."""
    if _RECORDED is not None:
        _RECORDED.append((kernel, args, consts, num_warps, num_stages))
        return
    if _COUNTED is not None:
        _COUNTED[launch_key(kernel, grid, consts)] += 1
    kernel[grid](*args, **consts, num_warps=num_warps, num_stages=num_stages)


@triton.jit
def real_channels(c, D, REAL_END, D_P: tl.constexpr):
    """Which packed channels `c` hold a real channel (packing.py: channel i
    of group g sits at g*D_P + i, i < D; REAL_END = groups * D_P). The others
    are padding, kept exactly 0 by the kernels that write t1 and t2: their
    zero weights would turn an inf or NaN input into NaN there (0 * inf),
    which conv3 and the grouped conv would then spread to real channels."""
    return ((c % D_P) < D) & (c < REAL_END)
