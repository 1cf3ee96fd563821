"""K2a: grouped 3x3 conv + bias + ReLU -> t2, for the split path.

    t2[p, tile] = relu(sum_{tap, chunk} t1_window(tap, chunk) @ w2p[tap, tile, chunk] + b2p[tile])

t1 and t2 are NHWC in packed channels (packing.py). The split path
(__init__.py) runs K1, K2a, then conv3 + b3 + identity shortcut + ReLU as a
GEMM (K1's kernel with RESIDUAL): t2 is computed once and written, where the
fused K2 recomputes it once per Cout tile. `grouped_conv_tile` is the one
implementation of the grouped conv; K2 calls it too.
"""

import triton
import triton.language as tl

from ...common.sizes import cdiv, next_pow2
from ._common import MAX_SHARED, autotuned, dot_precision, first_kept_config, launch, real_channels, relu


@triton.jit
def grouped_conv_tile(t1_ptr, w2_ptr, b2_ptr, ot, img, ho, wo, p_mask, H, W, WIDTH_P, N_TILES, STRIDE, DIL, D,
                      REAL_END, BLOCK_P: tl.constexpr, GT: tl.constexpr, KCH: tl.constexpr, D_P: tl.constexpr,
                      PADDED: tl.constexpr, EXACT: tl.constexpr, PREC: tl.constexpr):
    """relu(grouped 3x3 + b2) of packed output tile `ot` at BLOCK_P output
    pixels (img, ho, wo; int64; p_mask: real pixels), [BLOCK_P, GT] fp32.

    t1_ptr: t1 [N*H*W, WIDTH_P] contiguous; w2_ptr: w2p [9, N_TILES, KCH, GT,
    GT] contiguous; b2_ptr: b2p [WIDTH_P] fp32. The input pixel of a tap is
    (ho*STRIDE + (kh-1)*DIL, wo*STRIDE + (kw-1)*DIL) (padding = DIL): outside
    the image the load mask gives the zero padding. The tap loop is dynamic
    on purpose (docs/triton_backend.md: a static one makes the pipeliner
    buffer all nine taps in shared memory).

    D_P: padded group width (packing.py); PADDED: the tile may hold padded
    channels (D < D_P or padding groups, REAL_END = groups * D_P), stored as
    exact zeros. EXACT (only for D_P < GT, KCH == 1): instead of one dot
    with the block-diagonal weight, each output channel sums its own group's
    D_P inputs with FMAs, so an inf or NaN of one group cannot reach the
    others through the zeros between them (0 * inf = NaN); the callers run
    it only when the dot's result holds a NaN (never on finite inputs).
    """
    offs_g = tl.arange(0, GT)
    # First packed channel of this output tile's group: its input chunks
    # (KCH > 1 when a group spans several tiles; else the tile itself).
    in_base = (ot // KCH) * (KCH * GT)
    t2 = tl.zeros((BLOCK_P, GT), dtype=tl.float32)
    for tap in range(9):
        hi = ho * STRIDE + (tap // 3 - 1) * DIL
        wi = wo * STRIDE + (tap % 3 - 1) * DIL
        valid = p_mask & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        row = ((img * H + hi) * W + wi) * WIDTH_P + in_base
        if EXACT:
            first = offs_g - offs_g % D_P  # each output channel's group, as a channel of the tile
            for i in range(D_P):  # dynamic: this rare path should not cost registers
                a = tl.load(t1_ptr + row[:, None] + (first + i)[None, :], mask=valid[:, None], other=0.0)
                # w2p[tap, ot, 0, first + i, :]
                w = tl.load(w2_ptr + ((tap * N_TILES + ot) * GT + first + i) * GT + offs_g)
                t2 += a.to(tl.float32) * w.to(tl.float32)[None, :]
        else:
            for kc in tl.static_range(KCH):
                a = tl.load(t1_ptr + row[:, None] + (kc * GT + offs_g)[None, :], mask=valid[:, None], other=0.0)
                w_off = (((tap * N_TILES + ot) * KCH + kc) * GT + offs_g[:, None]) * GT + offs_g[None, :]
                t2 = tl.dot(a, tl.load(w2_ptr + w_off), t2, input_precision=PREC)
    t2 = relu(t2 + tl.load(b2_ptr + ot * GT + offs_g)[None, :])
    if PADDED:
        t2 = tl.where(real_channels(ot * GT + offs_g, D, REAL_END, D_P)[None, :], t2, 0.0)
    return t2


@triton.jit
def has_nan(v):
    """Whether the tile `v` holds a NaN (one reduction over the program)."""
    return tl.max(tl.max((v != v).to(tl.int32), axis=1), axis=0) > 0


@triton.jit
def _grouped_conv_bias_relu_kernel(
    t1_ptr, w2_ptr, b2_ptr, t2_ptr,
    M_OUT, HWO, WO, H, W, WIDTH_P, N_TILES, STRIDE, DIL, D, REAL_END,
    BLOCK_P: tl.constexpr, GT: tl.constexpr, KCH: tl.constexpr, D_P: tl.constexpr, PADDED: tl.constexpr,
    PREC: tl.constexpr,
):
    """One program computes t2 for BLOCK_P output pixels x one packed tile of
    GT channels.

    t1_ptr, w2_ptr, b2_ptr, D, REAL_END, D_P, PADDED: as in
    grouped_conv_tile. t2_ptr: t2, [M_OUT, WIDTH_P] contiguous (NHWC, packed
    channels), act dtype; rounded to it as PyTorch rounds between convs.
    M_OUT = N*HO*WO output pixels, HWO = HO*WO, WO output width, H, W input
    size.
    Grid: (cdiv(M_OUT, BLOCK_P) * N_TILES,), tiles fastest so the programs
    reading the same t1 neighbourhood run together (t1 in L2).
    """
    pid = tl.program_id(0)
    pid_p = pid // N_TILES
    ot = pid % N_TILES
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < M_OUT
    p64 = offs_p.to(tl.int64)  # N*HO*WO*WIDTH_P can pass 2**31
    img = p64 // HWO
    rem = p64 % HWO
    t2 = grouped_conv_tile(t1_ptr, w2_ptr, b2_ptr, ot, img, rem // WO, rem % WO, p_mask, H, W, WIDTH_P, N_TILES,
                           STRIDE, DIL, D, REAL_END, BLOCK_P, GT, KCH, D_P, PADDED, False, PREC)
    if D_P < GT:
        # Several groups per tile: a NaN may be 0 * inf from another group.
        if has_nan(t2):
            t2 = grouped_conv_tile(t1_ptr, w2_ptr, b2_ptr, ot, img, rem // WO, rem % WO, p_mask, H, W, WIDTH_P,
                                   N_TILES, STRIDE, DIL, D, REAL_END, BLOCK_P, GT, KCH, D_P, PADDED, True, PREC)
    offs_c = ot * GT + tl.arange(0, GT)
    tl.store(t2_ptr + p64[:, None] * WIDTH_P + offs_c[None, :], t2.to(t2_ptr.dtype.element_ty),
             mask=p_mask[:, None])


# Autotune key: the shape, PREC and, implicitly, the dtypes of the tensor args.
TUNE_KEY = ["M_OUT", "HWO", "WIDTH_P", "STRIDE", "DIL", "GT", "KCH", "PREC"]

# (BLOCK_P, num_warps, num_stages) in preference order (_prune keeps it; with
# autotuning off the first kept config is launched, see heuristic_config):
# 128 pixels x GT channels on 4 warps (one warpgroup: a 128 x GT wgmma tile),
# then larger and smaller pixel tiles; 64 on 8 warps for "ieee" with wide
# groups (below). t1 and t2 rows are WIDTH_P (a multiple of 16) wide, so every
# shape is aligned. The kept ones compile for sm_90a without spills on
# compile_check.SHAPES, "ieee" included (docs/triton_backend.md).
_TILES = ((128, 4, 3), (256, 8, 3), (64, 4, 3), (64, 8, 3))


def _gpu_configs():
    return [triton.Config({"BLOCK_P": bp}, num_warps=warps, num_stages=stages) for bp, warps, stages in _TILES]


def _prune(configs, nargs, **kwargs):
    args = {**nargs, **kwargs}
    gt, kch, itemsize = args["GT"], args["KCH"], args["t1_ptr"].dtype.itemsize
    ieee = args["PREC"] == "ieee" and itemsize == 4
    # Pixel tiles larger than the problem only add masked rows.
    p_max = max(64, next_pow2(args["M_OUT"]))

    def fits(c):
        bp = c.kwargs["BLOCK_P"]
        # The pipeliner buffers num_stages taps of the KCH t1 windows
        # [BLOCK_P, GT] and w2p tiles [GT, GT] (matches ptxas for d=128).
        shared = c.num_stages * kch * (bp + gt) * gt * itemsize
        # "ieee" dots run on FMA units with the [BLOCK_P, KCH*GT] t1 windows
        # in registers: over 32 elements per thread spilled 170-260 bytes
        # (d=64, d=128; ptxas, sm_90a).
        in_registers = not ieee or bp * kch * gt <= 32 * 32 * c.num_warps
        return bp <= p_max and shared <= MAX_SHARED and in_registers

    kept = [c for c in configs if fits(c)]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_P"])]


_CONFIGS = _gpu_configs()  # in preference order; built once
_grouped_conv_bias_relu_tuned = autotuned(_grouped_conv_bias_relu_kernel, _CONFIGS, TUNE_KEY, _prune)


def heuristic_config(args):
    """K2a's config when autotuning is off: the first of _gpu_configs() that
    _prune keeps for `args` (kernel argument name -> value)."""
    return first_kept_config(_CONFIGS, _prune, args)


_INTERPRET_CONFIG = {"BLOCK_P": 128}


def _kernel_args(t1, tiling, packed, t2, stride, dilation):
    """(positional args, constexpr kwargs) of the K2a kernel; t1 [N, width_p,
    H, W] and t2 [N, width_p, Ho, Wo] are NHWC-contiguous (_common.nhwc_view)."""
    n, _, h, w = t1.shape
    _, _, ho, wo = t2.shape
    args = (t1, packed["w2p"], packed["b2p"], t2, n * ho * wo, ho * wo, wo, h, w, tiling.width_p, tiling.n_tiles,
            stride, dilation, *group_args(tiling))
    return args, {**group_consts(tiling), "PREC": dot_precision(t1.dtype)}


def group_args(tiling):
    """(D, REAL_END) of grouped_conv_tile: the real group width and the end
    of the real groups' packed channels (1, 1 when nothing is padded: then
    unread, and specialised away like every int 1)."""
    return (tiling.d, tiling.groups * tiling.d_p) if tiling.has_padding else (1, 1)


def group_consts(tiling):
    """The constexprs of grouped_conv_tile that describe the packing."""
    return {"GT": tiling.gt, "KCH": tiling.kch, "D_P": tiling.d_p, "PADDED": tiling.has_padding}


def grouped_conv_bias_relu(t1, tiling, packed, t2, stride, dilation):
    """Launch K2a. t1 [N, width_p, H, W] from K1 and t2 [N, width_p, Ho, Wo]
    (written completely), both NHWC-contiguous views of [pixels, width_p]
    buffers; tiling/packed from packing.pack_weights."""
    args, consts = _kernel_args(t1, tiling, packed, t2, stride, dilation)
    m_out, n_tiles = args[4], tiling.n_tiles

    def grid(meta):
        return (cdiv(m_out, meta["BLOCK_P"]) * n_tiles,)

    launch(_grouped_conv_bias_relu_kernel, _grouped_conv_bias_relu_tuned, grid, args, consts, _INTERPRET_CONFIG,
           heuristic_config)
    return t2


__all__ = ["group_args", "group_consts", "grouped_conv_bias_relu", "grouped_conv_tile", "has_nan"]
