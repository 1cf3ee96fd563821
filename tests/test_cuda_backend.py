"""The `cuda_emulated` backend's glue: the public op, the packed-weight cache,
opcheck of the inner ops, and the errors for bad arguments and bad packed
tensors."""

import pytest
import torch
from cuda_cases import (
    H100_SMEM_OPTIN,
    _backend,
    _check,
    _emulated,
    _packed_args,
    needs_emu,
)
from helpers import Block

from resnext_kernels.backends import cuda as cuda_backend
from resnext_kernels.ops import inference as ops


@needs_emu
def test_emulated_backend_through_public_op():
    block = Block(1, 24, 32, 24, 4, 7, 9)
    args = block.make(torch.float16, channels_last=False)  # NCHW input is converted once
    assert args[0].is_contiguous()
    y = ops.bottleneck_inference(*args, stride=1, dilation=1, groups=4, backend="cuda_emulated")
    _check(y, args, block, torch.float16, True, "cpu")


@pytest.fixture
def pack_calls(emu, monkeypatch):
    """Counts the emulated pack op's calls (the backend looks the op up on
    every call); starts and ends with an empty cache."""
    cuda_backend.PACK_CACHE.clear()
    lib = torch.ops.resnext_kernels_emu
    real = lib.fused_block_pack_weights
    calls = []
    monkeypatch.setattr(lib, "fused_block_pack_weights", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    yield calls
    cuda_backend.PACK_CACHE.clear()


@needs_emu
def test_emulated_pack_cache_hit_and_in_place_update(pack_calls):
    block = Block(1, 16, 32, 24, 4, 5, 6, stride=2, projection=True)
    args = block.make(torch.float32)
    y1 = _backend(args, block)
    y2 = _backend(args, block)
    assert len(pack_calls) == 1, "the second call with the same weights must not repack"
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    args[0] = block.make(torch.float32)[0]
    _backend(args, block)
    assert len(pack_calls) == 1, "the packing does not depend on x"
    args[3].mul_(-1.5)  # in-place update bumps w2's _version: must repack
    _backend(args, block)
    assert len(pack_calls) == 2
    args[8].add_(1.0)  # bd, folded into b3p
    _backend(args, block)
    assert len(pack_calls) == 3


@needs_emu
def test_emulated_pack_cache_freed_weight_at_same_address(pack_calls):
    """A new weight at a freed one's address, with the same shape, strides
    and _version, has the very same key: it must still be repacked."""
    block = Block(1, 16, 32, 16, 4, 5, 5)
    args = block.make(torch.float32)
    storage = torch.empty_like(args[3]).untyped_storage()

    def weight_in_storage(values):
        t = torch.empty(0, dtype=values.dtype).set_(storage, 0, values.shape, values.stride())
        t.copy_(values)  # the same steps every time, hence the same _version
        return t

    args[3] = weight_in_storage(args[3])
    _backend(args, block)
    first_key = (args[3].data_ptr(), args[3]._version)
    args[3] = None  # frees the weight; its cache entry stays until the next insertion
    args[3] = weight_in_storage(block.make(torch.float32)[3])
    assert (args[3].data_ptr(), args[3]._version) == first_key
    _backend(args, block)
    assert len(pack_calls) == 2


@needs_emu
def test_emulated_pack_cache_drops_entries_of_freed_weights(pack_calls):
    # Fresh weights each time, as with BN folded per forward; the widths
    # differ so the keys do (an equal key would replace the entry anyway).
    for width in (16, 32, 48):
        block = Block(1, 16, width, 16, 4, 3, 3)
        args = block.make(torch.float32)
        _backend(args, block)
        del args
    assert len(pack_calls) == 3
    assert len(cuda_backend.PACK_CACHE) == 1  # only the last entry: its weights are not yet known freed


@needs_emu
def test_emulated_pack_cache_inference_mode(pack_calls):
    """Inference tensors have no version counter, so an in-place update
    cannot be seen: they are packed on every call."""
    block = Block(1, 16, 32, 16, 4, 5, 5)
    with torch.inference_mode():
        args = block.make(torch.float32)
        _backend(args, block)
        args[3].mul_(-1.5)
        _backend(args, block)
    assert len(pack_calls) == 2


@needs_emu
def test_emulated_opcheck(emu):
    lib = torch.ops.resnext_kernels_emu
    # d = 16, 4 and 24: both padding rules of the fake's packed shapes.
    for block in (Block(1, 16, 32, 24, 2, 5, 6, stride=2, projection=True), Block(1, 16, 16, 16, 4, 5, 5),
                  Block(1, 8, 48, 20, 2, 3, 4, projection=True)):
        args = block.make(torch.float32)
        torch.library.opcheck(lib.fused_block_pack_weights.default, (*args[1:], block.groups))
        torch.library.opcheck(lib.fused_block_forward.default,
                              (*_packed_args(lib.fused_block_pack_weights, args, block), *block.conv, False, H100_SMEM_OPTIN,
                               1))


@needs_emu
def test_emulated_rejects_bad_arguments(emu):
    block = Block(1, 16, 16, 16, 4, 5, 5)
    args = block.make(torch.float32)
    bad_w2 = list(args)
    bad_w2[3] = bad_w2[3][:, :2]
    with pytest.raises(RuntimeError, match="w2 must be"):
        _emulated(bad_w2, block, False)
    mixed = list(args)
    mixed[2] = mixed[2].double()  # b1 (w1 sets the weights' dtype)
    with pytest.raises(RuntimeError, match="must have w1's dtype"):
        _emulated(mixed, block, False)
    packed = _packed_args(torch.ops.resnext_kernels_emu.fused_block_pack_weights, args, block)
    with pytest.raises(RuntimeError, match="identity shortcut"):
        torch.ops.resnext_kernels_emu.fused_block_forward(*packed, 2, 1, 4, False, H100_SMEM_OPTIN)


@needs_emu
def test_emulated_rejects_bad_packed_weights(emu):
    """Packed tensors that do not fit the call fail the checks, not the kernel."""
    lib = torch.ops.resnext_kernels_emu
    block = Block(1, 16, 32, 16, 4, 5, 5)  # d=8
    args = block.make(torch.float32)
    good = _packed_args(lib.fused_block_pack_weights, args, block)

    def run(packed, **conv):
        stride, dilation, groups = conv.get("stride", 1), conv.get("dilation", 1), conv.get("groups", 4)
        return lib.fused_block_forward(*packed, stride, dilation, groups, False, H100_SMEM_OPTIN)

    run(good)  # the baseline passes the checks
    with pytest.raises(RuntimeError, match="packed w2p must be"):
        run(good, groups=1)  # d=32: packed for another group width
    for i, name, bad in [
        (2, "b1p", good[2].double()),
        (3, "w2p", good[3].transpose(-1, -2)),
        (5, "w3p", good[5][:, :1]),
        (1, "w1p", good[1].half()),
    ]:
        packed = list(good)
        packed[i] = bad
        with pytest.raises(RuntimeError, match=f"packed {name} must be"):
            run(packed)
    proj = Block(1, 16, 32, 24, 4, 5, 5, projection=True)
    pargs = _packed_args(lib.fused_block_pack_weights, proj.make(torch.float32), proj)
    run(pargs)
    with pytest.raises(RuntimeError, match="packed w1p must be"):  # x with more channels than w1 was packed for
        run([torch.randn(1, 40, 5, 5), *pargs[1:]])
    pargs[7] = pargs[7][:, :1]
    with pytest.raises(RuntimeError, match="packed wdp must be"):
        run(pargs)
