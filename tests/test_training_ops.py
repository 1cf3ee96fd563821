"""The training ops as torch.library ops: opcheck, gradcheck of the
reference formula, input checks, backend resolution, torch.compile, and the
fused path running no ATen convolution or batch norm (dispatch mode)."""

import copy

import pytest
import torch
import torch._functorch.config as functorch_config
import torch._inductor.config as inductor_config
from torch import nn
from training_cases import CASES, DEVICE, OpRecorder, TrainCase, forbidden_ops, needs_triton

import resnext_kernels as rk
from resnext_kernels import FusedResNeXtBlock
from resnext_kernels.backends import registry
from resnext_kernels.common.batch_stats import LOCAL, BatchNormArgs, StatisticsExchange, merge_rows
from resnext_kernels.ops import training

OP = torch.ops.resnext_kernels.bottleneck_training.default
BACKWARD_OP = torch.ops.resnext_kernels.bottleneck_training_backward.default
F64 = torch.float64


def _op_args(case, dtype, backend, requires_grad=False, device="cpu"):
    """Flat arguments of the forward op for a TrainCase (batch statistics,
    running stats where tracked)."""
    tv = case.torchvision_block().to(device=device, dtype=dtype)
    x = torch.randn(case.n, case.inplanes, case.h, case.w, dtype=dtype, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    convs = [tv.conv1.weight, tv.conv2.weight, tv.conv3.weight, tv.downsample[0].weight if tv.downsample else None]
    norms = [m for m in tv.modules() if isinstance(m, nn.BatchNorm2d)]
    bn_tensors = [t for bn in norms for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)]
    bn_tensors += [None] * (16 - len(bn_tensors))
    leaves = [x] + convs + bn_tensors
    leaves = [None if t is None else t.detach().clone() for t in leaves]
    for i, t in enumerate(leaves):
        # running stats (positions 3, 4 of each norm's four) never require grad
        if t is not None and requires_grad and not (i >= 5 and (i - 5) % 4 >= 2):
            t.requires_grad_(True)
    momentum = [0.1 if bn.momentum is not None else 0.5 for bn in norms]
    return (*leaves, case.stride, case.dilation, case.groups, [True] * len(norms), momentum,
            [bn.eps for bn in norms], backend)


OPCHECK = [
    pytest.param("reference", F64, id="reference-fp64"),
    pytest.param("triton", torch.float32, id="triton-fp32", marks=needs_triton),
]


@pytest.mark.parametrize("backend,dtype", OPCHECK)
def test_opcheck_forward(backend, dtype):
    case = TrainCase(16, 4, 2, 64, 5, 5, stride=2)  # projection, every output non-empty
    torch.library.opcheck(OP, _op_args(case, dtype, backend, requires_grad=True, device=DEVICE))


@pytest.mark.parametrize("backend,dtype", OPCHECK)
@pytest.mark.parametrize("need_x_grad", [True, False])
def test_opcheck_backward(backend, dtype, need_x_grad):
    case = TrainCase(16, 4, 4, 32, 5, 5)  # identity: dwd is empty
    args = _op_args(case, dtype, backend, device=DEVICE)
    out, y1, y2, y3, yd, bn_stats, _ = OP(*args)
    x, w1, w2, w3, wd = args[:5]
    grad = torch.randn_like(out)
    affine = [t for i in range(4) for t in args[5 + 4 * i:7 + 4 * i]]
    torch.library.opcheck(BACKWARD_OP, (grad, x, w1, w2, w3, wd, out, y1, y2, y3, yd, bn_stats, *affine,
                                        case.stride, case.dilation, case.groups, [True] * 3, need_x_grad, backend))


def test_gradcheck_reference_formula():
    """The backward formula (the reference backend's, which the triton
    kernels implement) against numerical differentiation in float64: x,
    every conv weight and BN parameter, projection with stride 2."""
    case = TrainCase(8, 2, 2, 64, 4, 3, stride=2, n=2)
    args = list(_op_args(case, F64, "reference", requires_grad=True))
    inputs = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]

    def f(*diff):
        call = list(args)
        for i, t in zip(inputs, diff):
            call[i] = t
        return OP(*call)[0]

    assert torch.autograd.gradcheck(f, [args[i] for i in inputs], eps=1e-6, atol=1e-6, fast_mode=True)


def test_explicit_backends_without_training_kernels_raise():
    """cuda and cuda_emulated have no training kernels: an explicit request
    raises naming training, on the op and on a block in train mode (no
    silent ATen run)."""
    case = CASES[0]
    for backend in ("cuda", "cuda_emulated"):
        with pytest.raises(rk.BackendUnavailableError, match=f"backend '{backend}' cannot run training.*no training"):
            OP(*_op_args(case, torch.float32, backend))
        block = FusedResNeXtBlock.from_bottleneck(case.torchvision_block().float(), backend=backend).train()
        with pytest.raises(rk.BackendUnavailableError, match="training"):
            block(torch.randn(2, case.inplanes, 5, 5))
        # ... while eval mode (the inference op) is unaffected by the training registry
        assert registry.training_unavailable_reason(backend, "cpu") is not None


def test_auto_resolves_per_device():
    assert registry.resolve_training_backend("auto", "cpu") == "reference"
    expect_cuda = "triton" if registry.unavailable_reason("triton", "cuda") is None else "reference"
    assert registry.resolve_training_backend("auto", "cuda") == expect_cuda
    with pytest.raises(ValueError, match="backend"):
        registry.resolve_training_backend("nope", "cpu")


def test_bad_inputs_raise_clear_errors():
    case = CASES[1]  # projection
    good = _op_args(case, torch.float32, "reference")

    def call(**changes):
        names = ["x", "w1", "w2", "w3", "wd"] + [f"bn{i}.{t}" for i in "123d"
                                                 for t in ("weight", "bias", "running_mean", "running_var")]
        args = list(good)
        for name, value in changes.items():
            args[names.index(name.replace("_", ".", 1) if name.startswith("bn") else name)] = value
        return OP(*args)

    with pytest.raises(TypeError, match="w1 has dtype"):
        call(w1=good[1].double())
    with pytest.raises(TypeError, match="x has dtype"):
        call(x=good[0].to(torch.int32))
    with pytest.raises(ValueError, match=r"bn2.weight must have shape \(32,\)"):
        call(bn2_weight=torch.ones(31))
    with pytest.raises(ValueError, match="w2 must have shape"):
        call(w2=good[2][:, :-1])
    with pytest.raises(ValueError, match="running_mean and running_var must both"):
        call(bn1_running_var=None)
    with pytest.raises(ValueError, match="expected more than 1 value per channel"):
        OP(torch.randn(1, case.inplanes, 1, 1).contiguous(memory_format=torch.channels_last), *good[1:])
    args = list(good)
    args[-4] = [True, True]  # batch_stats for 2 norms, momentum/eps for 4
    with pytest.raises(ValueError, match="one entry per norm"):
        OP(*args)
    # the Python wrapper checks Python types first
    norms = [BatchNormArgs(None, None, None, None, True, 0.1, 1e-5)] * 4
    with pytest.raises(TypeError, match="w3 must be a torch.Tensor"):
        training.bottleneck_training(good[0], good[1], good[2], "w3", good[4], norms, stride=2)
    with pytest.raises(TypeError, match=r"norms\[1\] must be a BatchNormArgs"):
        training.bottleneck_training(*good[:5], [norms[0], (1, 2)], stride=2)
    with pytest.raises(TypeError, match="stride must be an int"):
        training.bottleneck_training(*good[:5], norms, stride=2.0)


# BatchNorm semantics through the block on the reference backend, float64,
# two steps against torchvision at 1e-10: momentum None (cumulative
# average), affine=False, track_running_stats=False (batch stats, also in
# eval mode), a custom eps, and a block whose norms mix batch and running
# statistics (bn2 in eval mode; FrozenBatchNorm2d in the shortcut).
SEMANTICS = {
    "momentum-None": dict(momentum=None),
    "no-affine": dict(affine=False),
    "no-running-stats": dict(track_running_stats=False),
    "eps": dict(eps=0.1),
}


def _two_steps(tv, fused, shape, tol=1e-10):
    """Two training steps of both blocks: output, gradients, buffers equal within tol."""
    for _ in range(2):
        x = torch.randn(shape, dtype=tv.conv1.weight.dtype)
        x1, x2 = x.clone().requires_grad_(True), x.clone().to(fused.conv1.weight.dtype).requires_grad_(True)
        y1, y2 = tv(x1), fused(x2)
        g = torch.randn_like(y1)
        torch.testing.assert_close(y2.to(y1.dtype), y1, rtol=tol, atol=tol)
        y1.backward(g)
        y2.backward(g.to(y2.dtype))
        torch.testing.assert_close(x2.grad.to(x1.dtype), x1.grad, rtol=tol, atol=tol)
        for (name, p1), (_, p2) in zip(tv.named_parameters(), fused.named_parameters()):
            assert (p1.grad is None) == (p2.grad is None), name
            if p1.grad is not None:
                torch.testing.assert_close(p2.grad.to(p1.dtype), p1.grad, rtol=tol, atol=tol, msg=name)
            p1.grad = p2.grad = None
        for (name, b1), (_, b2) in zip(tv.named_buffers(), fused.named_buffers()):
            torch.testing.assert_close(b2.to(b1.dtype), b1, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("name", SEMANTICS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batch_norm_semantics_reference(name, mode):
    case = TrainCase(16, 4, 2, 64, 5, 7, stride=2, **SEMANTICS[name])
    tv = case.torchvision_block().train(mode == "train")
    fused = FusedResNeXtBlock.from_bottleneck(tv, backend="reference")
    assert fused.uses_batch_statistics() == (mode == "train" or name == "no-running-stats")
    _two_steps(tv, fused, (2, 16, 5, 7))


def _mixed_norms(tv):
    """The shortcut's norm a FrozenBatchNorm2d (the tests then put bn2 in
    eval mode: running statistics while bn1 and bn3 use batch statistics)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    frozen = FrozenBatchNorm2d(tv.downsample[1].num_features).to(tv.conv1.weight.dtype)
    frozen.load_state_dict({k: v for k, v in tv.downsample[1].state_dict().items() if k != "num_batches_tracked"})
    tv.downsample[1] = frozen
    return tv


def test_mixed_batch_and_running_statistics_reference():
    tv = _mixed_norms(TrainCase(16, 4, 2, 64, 5, 7, stride=2).torchvision_block())
    fused = FusedResNeXtBlock.from_bottleneck(tv, backend="reference")
    # After the conversion: from_bottleneck puts every submodule of both
    # blocks (its probe uses tv's own modules) in the block's mode.
    tv.bn2.eval()
    fused.bn2.eval()
    assert fused.uses_batch_statistics()
    _two_steps(tv, fused, (2, 16, 5, 7))


@needs_triton
def test_mixed_batch_and_running_statistics_triton(allow_tf32):
    allow_tf32(False)
    tv = _mixed_norms(TrainCase(16, 4, 2, 64, 5, 7, stride=2).torchvision_block())
    fused = FusedResNeXtBlock.from_bottleneck(tv, backend="triton").float()
    tv.bn2.eval()
    fused.bn2.eval()
    _two_steps(tv, fused, (2, 16, 5, 7), tol=1e-4)


@needs_triton
def test_fused_train_path_runs_no_aten_convolution_or_batch_norm():
    """Forward and backward of a train-mode block on triton, at two levels:
    the block (the ops, their autograd glue, the running-stat copies) and
    the triton backend's own forward and backward functions (what runs
    inside the ops). The same recorder on the reference backend sees ATen
    convolutions and batch norms, so the check can fail."""
    case = CASES[1]  # projection, stride 2
    fused = FusedResNeXtBlock.from_bottleneck(case.torchvision_block().float(), backend="triton")
    x = torch.randn(2, case.inplanes, case.h, case.w, device=DEVICE).requires_grad_(True)
    with OpRecorder() as block_level:
        y = fused(x)
        y.backward(torch.randn_like(y))
    assert {"resnext_kernels.bottleneck_training", "resnext_kernels.bottleneck_training_backward"} <= block_level.seen
    assert not forbidden_ops(block_level.seen)

    for backend, expect_forbidden in (("triton", False), ("reference", True)):
        args = _op_args(case, torch.float32, backend, device=DEVICE)
        forward, backward = registry.training_kernels(backend)
        norms = [BatchNormArgs(*args[5 + 4 * i:9 + 4 * i], True, 0.1, 1e-5) for i in range(4)]
        with OpRecorder() as inside:
            saved = forward(*args[:5], norms, case.stride, case.dilation, case.groups)
            backward(torch.randn_like(saved[0]), *args[:5], *saved[:6], [n[:2] for n in norms], [True] * 4,
                     case.stride, case.dilation, case.groups, True)
        found = forbidden_ops(inside.seen)
        assert bool(found) == expect_forbidden, (backend, found)
        if expect_forbidden:
            assert any("convolution" in op for op in found) and any("batch_norm" in op for op in found), found


@needs_triton
def test_compile_fullgraph_training_step_through_fused_blocks(allow_tf32):
    """torch.compile(fullgraph=True) of a training step's forward and loss
    through two fused blocks on triton (the interpreter on CPU); the
    backward runs the compiled backward graph. Same loss, gradients and
    running statistics as the uncompiled blocks."""
    allow_tf32(False)
    torch._dynamo.reset()
    # a stride-2 projection block (16 -> 16 channels, 7x7 -> 4x4), then an identity block (8 groups of 2)
    first = FusedResNeXtBlock.from_bottleneck(TrainCase(16, 4, 4, 32, 7, 7, stride=2).torchvision_block().float(),
                                              backend="triton")
    second = FusedResNeXtBlock.from_bottleneck(TrainCase(16, 4, 8, 32, 4, 4).torchvision_block().float(),
                                               backend="triton")
    model = nn.Sequential(first, second).to(DEVICE)
    twin = copy.deepcopy(model)

    def loss_fn(m, x):
        return m(x).square().mean()

    compiled = torch.compile(loss_fn, fullgraph=True)
    x = torch.randn(2, 16, 7, 7, device=DEVICE).contiguous(memory_format=torch.channels_last)
    # Inductor's caches key a graph on its code, not on the custom ops' fake
    # kernels: a graph cached before a fake changed would be reused.
    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        eager_loss, compiled_loss = loss_fn(model, x), compiled(twin, x)
        torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
        eager_loss.backward()
        compiled_loss.backward()
    for (name, p1), (_, p2) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-5, atol=1e-6, msg=name)
    for (name, b1), (_, b2) in zip(model.named_buffers(), twin.named_buffers()):
        torch.testing.assert_close(b2, b1, rtol=1e-6, atol=1e-7, msg=name)


class _RecordingExchange(StatisticsExchange):
    """A one-process exchange that merges its rows first (as a multi-GPU one
    would before its all_gather) and records what crosses the seam."""

    def __init__(self):
        self.gathered, self.reduced = [], []

    def gather_statistics(self, rows):
        self.gathered.append([tuple(r.mean.shape) for r in rows])
        return [merge_rows(r) for r in rows]

    def reduce_gradient_sums(self, sums, count):
        self.reduced.append((tuple(sums.shape), count))
        return sums, count


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "reference"])
def test_statistics_exchange_seam(allow_tf32, backend):
    """Both backends pass the statistics rows of each point of the block
    through exchange.gather_statistics before its finalize and each backward
    reduction through exchange.reduce_gradient_sums (the SyncBatchNorm seam,
    docs/training.md), batched where norms are finalized together; an
    exchange that merges the rows first gives the same result as the local
    one (for the reference: its exchanged-statistics path against ATen's
    training-mode batch norm)."""
    allow_tf32(False)
    forward, backward = registry.training_kernels(backend)
    case = CASES[1]  # projection: four norms
    dtype = torch.float32 if backend == "triton" else F64  # the reference's two paths agree to rounding
    args = _op_args(case, dtype, backend, device=DEVICE)
    norms = [BatchNormArgs(*args[5 + 4 * i:9 + 4 * i], True, 0.1, 1e-5) for i in range(4)]
    conv = (case.stride, case.dilation, case.groups)
    grad = torch.randn(case.n, 32, 5, 4, device=DEVICE, dtype=dtype)
    results = []
    for exchange in (LOCAL, _RecordingExchange()):
        saved = forward(*args[:5], norms, *conv, exchange=exchange)
        grads = backward(grad, *args[:5], *saved[:6], [n[:2] for n in norms], [True] * 4, *conv, True,
                         exchange=exchange)
        results.append((saved, grads))
    width, cout = case.d * case.groups, 4 * case.planes
    # one exchange per point of the block: bn1, bn2, then bn3 and bn_d together
    assert [[s[1] for s in rows] for rows in exchange.gathered] == [[width], [width], [cout, cout]]
    # tail (bn3 + bn_d), bn2, bn1, each with this process's count
    ho, wo = (case.h - 1) // case.stride + 1, (case.w - 1) // case.stride + 1
    out_count = case.n * ho * wo
    assert exchange.reduced == [((3, cout), out_count), ((2, width), out_count), ((2, width), case.n * case.h * case.w)]
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for a, b in zip(results[0][0][:1] + results[0][0][5:] + results[0][1], results[1][0][:1] + results[1][0][5:]
                    + results[1][1]):
        torch.testing.assert_close(b, a, **tol)
