"""K2: grouped 3x3 conv + bias + ReLU, consumed in registers by conv3 + bias
+ shortcut + ReLU; one store of y.

Per program: BLOCK_P output pixels x BLOCK_CO output channels. For each
packed width tile of GT channels (packing.py; the grouped conv is
grouped_conv_bias_relu.grouped_conv_tile, shared with the split path's K2a):

    t2_tile = relu(sum_{tap, chunk} t1_window(tap, chunk) @ w2p[tap, tile, chunk] + b2p[tile])
    acc    += t2_tile.to(dtype) @ w3p[tile, co_tile]

t1_window is the [BLOCK_P, GT] slice of t1 at the tap's input pixel
(stride, dilation; zero padding through the load mask). The chunks of an
output tile are the GT-channel pieces of its group's input (KCH of them when
d_p > GT, else just the tile itself: block-diagonal packing). Epilogue:
+ b3, + shortcut (identity: x at the same pixel; projection: x at the strided
pixel @ wdp + bdp, a K loop over Cin in the same program), ReLU, store.
t2 and the shortcut never touch global memory.

Rounding: t2 is rounded to the activation dtype before the conv3 dot (as
PyTorch does between convs); conv3 + shortcut are summed in fp32 and rounded
once, where eager PyTorch rounds twice.
"""

import triton
import triton.language as tl

from ...common.sizes import cdiv, next_pow2
from ._common import autotuned, dot_precision, first_kept_config, launch, relu
from .grouped_conv_bias_relu import group_args, group_consts, grouped_conv_tile, has_nan


@triton.jit
def _conv3_of_grouped_conv(t1_ptr, w2_ptr, b2_ptr, w3_ptr, img, ho, wo, p_mask, offs_co, co_mask, H, W, WIDTH_P,
                           N_TILES, COUT, STRIDE, DIL, D, REAL_END, BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr,
                           GT: tl.constexpr, KCH: tl.constexpr, D_P: tl.constexpr, PADDED: tl.constexpr,
                           EXACT: tl.constexpr, PREC: tl.constexpr, DTYPE: tl.constexpr):
    """conv3 of t2 without bias, [BLOCK_P, BLOCK_CO] fp32: for each packed
    width tile, t2 = grouped_conv_tile(...) rounded to DTYPE (as PyTorch
    rounds between convs), then acc += t2 @ w3p[tile, co tile]."""
    offs_g = tl.arange(0, GT)
    acc = tl.zeros((BLOCK_P, BLOCK_CO), dtype=tl.float32)
    for ot in range(N_TILES):
        t2 = grouped_conv_tile(t1_ptr, w2_ptr, b2_ptr, ot, img, ho, wo, p_mask, H, W, WIDTH_P, N_TILES, STRIDE, DIL,
                               D, REAL_END, BLOCK_P, GT, KCH, D_P, PADDED, EXACT, PREC).to(DTYPE)
        w3 = tl.load(w3_ptr + (ot * GT + offs_g)[:, None] * COUT + offs_co[None, :], mask=co_mask[None, :], other=0.0)
        acc = tl.dot(t2, w3, acc, input_precision=PREC)
    return acc


@triton.jit
def _grouped_conv_conv3_kernel(
    t1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, x_ptr, wd_ptr, bd_ptr, y_ptr,
    M_OUT, HWO, WO, H, W, WIDTH_P, N_TILES, CIN, COUT, STRIDE, DIL, D, REAL_END,
    sxn, sxc, sxh, sxw,
    syn, syc, syh, syw,
    BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr,
    GT: tl.constexpr, KCH: tl.constexpr, D_P: tl.constexpr, PADDED: tl.constexpr, PROJECTION: tl.constexpr,
    Y_NCHW: tl.constexpr, PREC: tl.constexpr,
):
    """One program computes y for BLOCK_P output pixels x BLOCK_CO channels.

    t1_ptr: t1, [N*H*W, WIDTH_P] contiguous (NHWC, packed channels), act dtype.
    w2_ptr: w2p, [9, N_TILES, KCH, GT, GT] contiguous: tap kh*3+kw, output
            tile, input chunk, input channel in the chunk, output channel in
            the tile.
    b2_ptr: b2p, [WIDTH_P] fp32.
    w3_ptr: w3p, [WIDTH_P, COUT] contiguous (row = packed t2 channel).
    b3_ptr: b3, [COUT] fp32.
    x_ptr:  x, [N, CIN, H, W], element (n, c, h, w) at
            n*sxn + c*sxc + h*sxh + w*sxw (the shortcut's input; channels_last,
            so c*sxc = c stays int32).
    wd_ptr: wdp, [CIN, COUT] contiguous; bd_ptr: bd, [COUT] fp32. Only read
            when PROJECTION (else any pointer, e.g. w3p / b3p).
    y_ptr:  y, [N, COUT, HO, WO], element (n, c, h, w) at
            n*syn + c*syc + h*syh + w*syw, act dtype: channels_last, or
            with Y_NCHW NCHW-contiguous (x's format; syw = 1, syh = WO).
    M_OUT = N*HO*WO output pixels; HWO = HO*WO; WO output width; H, W input
    size; N_TILES width tiles of GT packed channels (WIDTH_P = N_TILES*GT);
    STRIDE, DIL of the 3x3 conv (padding = DIL); the projection reads x at
    (ho*STRIDE, wo*STRIDE). D, REAL_END, D_P, PADDED: the packing, as in
    grouped_conv_tile. PREC: tl.dot input_precision (fp32 only).
    Offsets from pixel indices are int64 (N*HO*WO*COUT can pass 2**31).
    Grid: (cdiv(M_OUT, BLOCK_P) * cdiv(COUT, BLOCK_CO),), Cout tiles fastest
    so the programs that recompute the same t2 tiles run together (t1 in L2);
    with Y_NCHW (N * cdiv(HWO, BLOCK_P) * cdiv(COUT, BLOCK_CO),): each
    program's pixels lie in one image, so their NCHW y offsets are visibly
    contiguous and the stores are vectorized along pixels (with the flat
    mapping the compiler cannot see it through the div/mod, and the
    per-element 64-bit addresses spilled kilobytes).
    """
    pid = tl.program_id(0)
    n_co = tl.cdiv(COUT, BLOCK_CO)
    pid_p = pid // n_co
    pid_co = pid % n_co
    dtype = y_ptr.dtype.element_ty

    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_mask = offs_co < COUT
    if Y_NCHW:
        n_rows = tl.cdiv(HWO, BLOCK_P)  # pixel blocks per image
        img = (pid_p // n_rows).to(tl.int64)  # one image per program
        offs_r = (pid_p % n_rows) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = offs_r < HWO
        rem = offs_r.to(tl.int64)
    else:
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = offs_p < M_OUT
        p64 = offs_p.to(tl.int64)
        img = p64 // HWO
        rem = p64 % HWO
    ho = rem // WO
    wo = rem % WO

    acc = _conv3_of_grouped_conv(t1_ptr, w2_ptr, b2_ptr, w3_ptr, img, ho, wo, p_mask, offs_co, co_mask, H, W,
                                 WIDTH_P, N_TILES, COUT, STRIDE, DIL, D, REAL_END, BLOCK_P, BLOCK_CO, GT, KCH, D_P,
                                 PADDED, False, PREC, dtype)
    if D_P < GT:
        # Several groups per tile: a NaN in t2 reaches every conv3 output of
        # its pixel, and it may be 0 * inf from another group of the tile
        # (the block-diagonal zeros). Only then, recompute without them.
        if has_nan(acc):
            acc = _conv3_of_grouped_conv(t1_ptr, w2_ptr, b2_ptr, w3_ptr, img, ho, wo, p_mask, offs_co, co_mask, H, W,
                                         WIDTH_P, N_TILES, COUT, STRIDE, DIL, D, REAL_END, BLOCK_P, BLOCK_CO, GT, KCH,
                                         D_P, PADDED, True, PREC, dtype)

    acc += tl.load(b3_ptr + offs_co, mask=co_mask, other=0.0)[None, :]
    x_row = img * sxn + (ho * STRIDE) * sxh + (wo * STRIDE) * sxw
    if PROJECTION:
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(0, CIN, BLOCK_K):
            k = k0 + offs_k
            k_mask = k < CIN
            xk = tl.load(x_ptr + x_row[:, None] + k[None, :] * sxc, mask=p_mask[:, None] & k_mask[None, :], other=0.0)
            wk = tl.load(wd_ptr + k[:, None] * COUT + offs_co[None, :], mask=k_mask[:, None] & co_mask[None, :],
                         other=0.0)
            acc = tl.dot(xk, wk, acc, input_precision=PREC)
        acc += tl.load(bd_ptr + offs_co, mask=co_mask, other=0.0)[None, :]
    else:
        # Identity: STRIDE == 1 and CIN == COUT (checked by the op layer).
        acc += tl.load(x_ptr + x_row[:, None] + offs_co[None, :] * sxc, mask=p_mask[:, None] & co_mask[None, :],
                       other=0.0).to(tl.float32)

    y = relu(acc).to(dtype)
    if Y_NCHW:
        y_row = img * syn + rem * syw  # ho*syh + wo*syw, written so the contiguity shows
    else:
        y_row = img * syn + ho * syh + wo * syw
    # int64 channel offsets: NCHW y has syc = HO*WO.
    tl.store(y_ptr + y_row[:, None] + offs_co.to(tl.int64)[None, :] * syc, y, mask=p_mask[:, None] & co_mask[None, :])


# (BLOCK_P, BLOCK_CO, num_warps, num_stages) per operand class and group
# tile width: the tiles that ptxas compiles for sm_90a without a single spill
# for every shape of compile_check.SHAPES and projection variants of them
# (measured with bench/triton_compile.py, triton 3.8). Large pixel tiles feed Hopper
# wgmma; BLOCK_CO up to 256 so Cout <= 256 needs no t2 recompute and stage 4
# (Cout 2048) recomputes t2 8x, not 16x. fp32 operands take twice the
# registers of 16-bit ones, and "ieee" dots run on FMA units with their
# operands in registers, hence the smaller tiles (and see "ieee" below).
_TILES = {
    # class: (tiles for GT == 16, tiles for GT >= 32)
    "16bit": (((128, 128, 8, 2), (64, 256, 8, 2), (64, 128, 8, 2), (64, 64, 8, 2)),
              ((128, 128, 8, 2), (64, 256, 8, 2), (64, 128, 8, 2), (64, 64, 8, 2))),
    "tf32": (((64, 128, 8, 2), (64, 64, 8, 2)),
             ((64, 128, 8, 2), (64, 64, 8, 2))),
    # No tile is spill-free for every GT >= 32 shape with "ieee" (a few dozen
    # bytes at stage 4 or d=128); the full-fp32 mode is a precision fallback.
    "ieee": (((64, 256, 8, 2), (64, 128, 8, 2)),
             ((64, 128, 8, 2), (64, 64, 8, 2))),
}


_UNALIGNED_TILES = ((64, 64, 8, 2),)


def _operand_class(ptr, prec):
    if ptr.dtype.itemsize == 2:
        return "16bit"
    return "tf32" if prec == "tf32" else "ieee"


# Autotune key: the shape, PREC (the tiles depend on it) and, implicitly, the
# dtypes of the tensor args.
TUNE_KEY = ["M_OUT", "WIDTH_P", "CIN", "COUT", "STRIDE", "DIL", "GT", "KCH", "PROJECTION", "Y_NCHW", "PREC"]


def _gpu_configs():
    # Preference order (_prune keeps it; with autotuning off the first kept
    # config is the one launched, see heuristic_config): widest BLOCK_CO
    # first, because the t2 recompute factor cdiv(Cout, BLOCK_CO) never grows
    # with BLOCK_CO, so the first kept config has the fewest recomputes; then
    # the larger BLOCK_P (the larger wgmma tile, fewer programs). Sorting the
    # set makes the order independent of set iteration order.
    tiles = sorted({t for pair in _TILES.values() for group in pair for t in group} | set(_UNALIGNED_TILES),
                   key=lambda t: (t[1], t[0], t[2], t[3]), reverse=True)
    return [
        triton.Config({"BLOCK_P": bp, "BLOCK_CO": bco, "BLOCK_K": 64}, num_warps=warps, num_stages=stages)
        for bp, bco, warps, stages in tiles
    ]


def _tile(config):
    k = config.kwargs
    return (k["BLOCK_P"], k["BLOCK_CO"], config.num_warps, config.num_stages)


def _allowed_tiles(args):
    """The (BLOCK_P, BLOCK_CO, warps, stages) tiles allowed for these kernel args."""
    if args["CIN"] % 16 or args["COUT"] % 16:
        # Channel counts that are not multiples of 16 make the x/y/weight row
        # strides unaligned: no vector loads, per-element 64-bit addresses,
        # and the wider tiles spill kilobytes (ptxas). Such blocks are rare
        # (every ResNeXt stage is aligned); they get the narrowest tile.
        return _UNALIGNED_TILES
    operand_class = _operand_class(args["t1_ptr"], args["PREC"])
    tiles = _TILES[operand_class][args["GT"] > 16]
    if operand_class == "ieee" and args["D_P"] < args["GT"]:
        # Several groups per tile: the NaN check and the exact grouped-conv
        # path (grouped_conv_tile EXACT) push the 64x256 "ieee" tile (230-255
        # registers without them) to 1-2 KB of spill stores (ptxas, sm_90a);
        # the 64x128 one stays spill-free.
        tiles = tuple(t for t in tiles if t[1] <= 128)
    return tiles


def _prune(configs, nargs, **kwargs):
    args = {**nargs, **kwargs}
    allowed = _allowed_tiles(args)
    co_max = max(16, next_pow2(args["COUT"]))
    kept = [c for c in configs if _tile(c) in allowed and c.kwargs["BLOCK_CO"] <= co_max]
    if not kept:  # Cout tiny: the narrowest allowed tile
        kept = [min((c for c in configs if _tile(c) in allowed), key=lambda c: c.kwargs["BLOCK_CO"])]
    # Every Cout tile recomputes the grouped conv (factor cdiv(Cout, BLOCK_CO)):
    # only configs within 2x of the fewest recomputes go to the benchmark,
    # which also keeps autotuning (one compile per config) short. With
    # autotuning off this runs at every launch: plain cdiv, not triton.cdiv
    # (a ConstexprFunction, ~2 us a call in triton 3.8).
    cout = args["COUT"]
    fewest = min(cdiv(cout, c.kwargs["BLOCK_CO"]) for c in kept)
    return [c for c in kept if cdiv(cout, c.kwargs["BLOCK_CO"]) <= 2 * fewest]


_CONFIGS = _gpu_configs()  # in preference order; built once
_grouped_conv_conv3_tuned = autotuned(_grouped_conv_conv3_kernel, _CONFIGS, TUNE_KEY, _prune)


def heuristic_config(args):
    """K2's config when autotuning is off: the first of _gpu_configs() that
    _prune keeps for `args` (kernel argument name -> value), i.e. the largest
    allowed tile among those with the fewest t2 recomputes."""
    return first_kept_config(_CONFIGS, _prune, args)


_INTERPRET_CONFIG = {"BLOCK_P": 128, "BLOCK_CO": 64, "BLOCK_K": 32}


def _kernel_args(t1, x, tiling, packed, y, stride, dilation):
    """(positional args, constexpr kwargs) of the K2 kernel for these tensors."""
    n, cin, h, w = x.shape
    _, cout, ho, wo = y.shape
    projection = packed["wdp"] is not None
    wd = packed["wdp"] if projection else packed["w3p"]
    bd = packed["bdp"] if projection else packed["b3p"]
    args = (
        t1, packed["w2p"], packed["b2p"], packed["w3p"], packed["b3p"], x, wd, bd, y,
        n * ho * wo, ho * wo, wo, h, w, tiling.width_p, tiling.n_tiles, cin, cout, stride, dilation,
        *group_args(tiling), *x.stride(), *y.stride(),
    )
    # NCHW y (an NCHW x): channels are not its contiguous dimension.
    y_nchw = y.stride(1) != 1
    assert not y_nchw or (y.stride(3) == 1 and y.stride(2) == wo), y.stride()
    consts = {**group_consts(tiling), "PROJECTION": projection, "Y_NCHW": y_nchw, "PREC": dot_precision(x.dtype)}
    return args, consts


def grouped_conv_conv3(t1, x, tiling, packed, y, stride, dilation):
    """Launch K2. t1 [N*H*W, width_p] from K1; x [N, Cin, H, W] (strided);
    tiling/packed from packing.pack_weights; y [N, Cout, Ho, Wo]
    channels_last or NCHW-contiguous (written completely)."""
    args, consts = _kernel_args(t1, x, tiling, packed, y, stride, dilation)
    n, cout, ho, wo = y.shape
    m_out = n * ho * wo

    def grid(meta):
        pixel_blocks = n * cdiv(ho * wo, meta["BLOCK_P"]) if consts["Y_NCHW"] else cdiv(m_out, meta["BLOCK_P"])
        return (pixel_blocks * cdiv(cout, meta["BLOCK_CO"]),)

    launch(_grouped_conv_conv3_kernel, _grouped_conv_conv3_tuned, grid, args, consts, _INTERPRET_CONFIG,
           heuristic_config)
    return y


__all__ = ["grouped_conv_conv3"]
