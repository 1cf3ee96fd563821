"""Group packing of the Triton backend's weights (block-diagonal tiles) and
the packed-weight cache."""


import pytest
import torch
from helpers import Block, assert_close_to_reference
from triton_cases import DEVICE, _fp64_cpu, needs_triton

from resnext_kernels.backends.reference import bottleneck_inference_reference
from resnext_kernels.backends.triton import bottleneck_inference_triton, packing

pytestmark = needs_triton


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
