"""Weight packing for the Triton inference kernels, and its cache.

Group packing (docs/triton_backend.md, "Group packing"). ``tl.dot`` needs K, N >= 16, but the group
width d of a ResNeXt grouped conv is often 4 or 8 (or not a power of two at
all: 14, 24, 40). Every group is padded to d_p = next_pow2(d) channels and the
"packed" channel index of real channel c (group g = c // d, i = c % d) is

    packed(c) = g * d_p + i.

The packed channels are cut into tiles of GT channels:

  * d_p <= 16: GT = 16, one tile holds 16 / d_p whole groups; its 3x3 weight
    per tap is a block-diagonal GT x GT matrix (zeros between groups).
  * d_p > 16:  GT = min(d_p, 64), a group spans KCH = d_p / GT tiles. An output
    tile's inputs are the *whole* group, so every output tile has KCH input
    chunks (the trap: reading only the tile's own chunk is
    right for d <= 16 and wrong for d = 64).

Padded channels carry zero weights and zero biases, so t1 and t2 are exactly
0 there (relu(0 + 0)) and contribute nothing to conv3.

Packed tensors (all contiguous, activation dtype unless noted):

  w1p [Cin, width_p]                      conv1, K-major (B operand of x @ w1p)
  b1p [width_p] fp32
  w2p [9, n_tiles, KCH, GT, GT]           tap (kh*3+kw), output tile, input chunk,
                                          input channel in chunk, output channel in tile
  b2p [width_p] fp32
  w3p [width_p, Cout]                     conv3, K-major
  b3p [Cout] fp32
  wdp [Cin, Cout], bdp [Cout] fp32        projection shortcut (None for identity)

width_p = n_tiles * GT (>= groups * d_p; the tail tile may hold padding groups).
"""

import torch

from ...common.sizes import cdiv, next_pow2
from ...common.weight_cache import WeightCache
from . import _common
from ._common import MAX_WEIGHT_ELEMENTS

# Largest tile of the grouped conv for d > 16. 64 keeps one tap's weight tile
# (64 x 64) and the t2 accumulator [BLOCK_P, 64] inside the register budget
# (docs/triton_backend.md, "Config heuristics").
MAX_GT = 64
MIN_GT = 16  # tl.dot (and the tensor-core MMAs) need K, N >= 16


class GroupTiling:
    """How the `groups` groups of width d are laid out in packed channels."""

    def __init__(self, width, groups):
        self.width = width
        self.groups = groups
        self.d = width // groups
        self.d_p = next_pow2(self.d)
        if self.d_p <= MIN_GT:
            self.gt = MIN_GT
            self.kch = 1
            groups_per_tile = MIN_GT // self.d_p
            self.n_tiles = cdiv(groups, groups_per_tile)
        else:
            self.gt = min(self.d_p, _common.FORCED.max_gt or MAX_GT)
            self.kch = self.d_p // self.gt
            self.n_tiles = groups * self.kch
        self.width_p = self.n_tiles * self.gt
        # Padded channels inside groups (d not a power of two) or whole
        # padding groups in the last tile: the kernels must keep them at 0.
        self.has_padding = self.d != self.d_p or self.groups * self.d_p != self.width_p
        # Several groups share a tile (block-diagonal w2p): the grouped conv's
        # zeros between them meet the other groups' inputs (0 * inf = NaN).
        self.mixes_groups = self.d_p < self.gt

    def packed_index(self, device):
        """Long tensor [width]: packed channel of each real channel."""
        c = torch.arange(self.width, device=device)
        return (c // self.d) * self.d_p + c % self.d


def pack_w2(w2, tiling):
    """w2 [width, d, 3, 3] -> [9, n_tiles, KCH, GT, GT] (see module docstring)."""
    t = tiling
    d, d_p, gt = t.d, t.d_p, t.gt
    # Per group, padded: wg[g, tap, i_in, j_out] (input channel first: the
    # kernel computes t1_window[P, in] @ w[in, out]).
    wg = w2.new_zeros(t.groups, 9, d_p, d_p)
    wg[:, :, :d, :d] = w2.reshape(t.groups, d, d, 9).permute(0, 3, 2, 1)
    if d_p <= MIN_GT:
        gpt = MIN_GT // d_p
        padded_groups = t.n_tiles * gpt
        wg_full = w2.new_zeros(padded_groups, 9, d_p, d_p)
        wg_full[: t.groups] = wg
        wg_full = wg_full.reshape(t.n_tiles, gpt, 9, d_p, d_p)
        packed = w2.new_zeros(9, t.n_tiles, 1, gt, gt)
        for lg in range(gpt):  # place each group on the tile's diagonal
            sl = slice(lg * d_p, (lg + 1) * d_p)
            packed[:, :, 0, sl, sl] = wg_full[:, lg].permute(1, 0, 2, 3)
        return packed.contiguous()
    kch = t.kch
    # wg[g, tap, kc*GT + i, s*GT + j] -> packed[tap, g*KCH + s, kc, i, j]
    packed = wg.reshape(t.groups, 9, kch, gt, kch, gt).permute(1, 0, 4, 2, 3, 5)
    return packed.reshape(9, t.n_tiles, kch, gt, gt).contiguous()


def unpack_w2(packed, tiling):
    """The inverse of pack_w2 on the real entries: packed [9, n_tiles, KCH,
    GT, GT] -> [width, d, 3, 3] (the training path's grouped-conv weight
    gradient is computed packed). Entries between groups and in padding are
    dropped."""
    t = tiling
    dev = packed.device
    co = torch.arange(t.width, device=dev)[:, None]  # real output channel
    i = torch.arange(t.d, device=dev)[None, :]  # input channel within the group
    q_out = (co // t.d) * t.d_p + co % t.d  # packed output channel
    q_in = (co // t.d) * t.d_p + i  # packed input channel
    w = packed[:, q_out // t.gt, i // t.gt, q_in % t.gt, q_out % t.gt]  # [9, width, d]
    return w.permute(1, 2, 0).reshape(t.width, t.d, 3, 3)


@torch.no_grad()
def pack_weights(w1, b1, w2, b2, w3, b3, wd, bd, groups):
    """Pack the folded weights for the kernels; returns (tiling, dict of tensors)."""
    width, cin = w1.shape[0], w1.shape[1]
    cout = w3.shape[0]
    t = GroupTiling(width, groups)
    idx = t.packed_index(w1.device)
    f32 = torch.float32
    w1p = w1.new_zeros(cin, t.width_p)
    w1p[:, idx] = w1.reshape(width, cin).t()
    b1p = torch.zeros(t.width_p, dtype=f32, device=w1.device)
    b1p[idx] = b1.to(f32)
    b2p = torch.zeros(t.width_p, dtype=f32, device=w1.device)
    b2p[idx] = b2.to(f32)
    w3p = w3.new_zeros(t.width_p, cout)
    w3p[idx] = w3.reshape(cout, width).t()
    packed = {
        "w1p": w1p,
        "b1p": b1p,
        "w2p": pack_w2(w2, t),
        "b2p": b2p,
        "w3p": w3p,
        "b3p": b3.to(f32).contiguous(),
        "wdp": None if wd is None else wd.reshape(cout, cin).t().contiguous(),
        "bdp": None if bd is None else bd.to(f32).contiguous(),
    }
    for name, p in packed.items():
        if p is not None and p.numel() >= MAX_WEIGHT_ELEMENTS:
            raise ValueError(f"the packed weight {name} has {p.numel()} elements; the triton kernels address "
                             f"weights with 32-bit offsets (fewer than {MAX_WEIGHT_ELEMENTS})")
    return t, packed


# Packed weights are cached under the same rules as the cuda backend's
# (identity + _version of every weight; see common.weight_cache.WeightCache).
PACK_CACHE = WeightCache()


def cached_pack_weights(w1, b1, w2, b2, w3, b3, wd, bd, groups):
    """pack_weights(...), computed once per set of weight tensors (PACK_CACHE)."""
    return PACK_CACHE.get(lambda: pack_weights(w1, b1, w2, b2, w3, b3, wd, bd, groups),
                          (w1, b1, w2, b2, w3, b3, wd, bd), groups)
