"""The op layer: torch.library ops of the ``resnext_kernels`` namespace.

``resnext_kernels::bottleneck_inference`` is the whole ResNeXt bottleneck
block with BatchNorm folded into the conv weights and biases:

    t1 = relu(conv1x1(x, w1) + b1)                                   [N, width, H, W]
    t2 = relu(conv3x3(t1, w2, stride, pad=dilation, dilation, groups) + b2)
    y  = relu(conv1x1(t2, w3) + b3 + shortcut)                        [N, Cout, Ho, Wo]
    shortcut = x (wd, bd None) or conv1x1(x, wd, stride) + bd

Shapes: x [N, Cin, H, W]; w1 [width, Cin, 1, 1]; w2 [width, width/groups, 3, 3];
w3 [Cout, width, 1, 1]; wd [Cout, Cin, 1, 1]; biases 1-D. Ho = (H-1)//stride+1.
The output is in x's dtype and x's memory format (common.layout): channels_last
x gives channels_last y, NCHW-contiguous x NCHW-contiguous y, like ATen's conv.
The fused kernels read x as channels_last, so they convert any other x once
(one copy of x) and write an NCHW y through its strides.

Like eager PyTorch, every backend propagates NaN and inf: relu(NaN) = NaN, and
a non-finite input or weight gives the non-finite outputs eager gives.

The op has a fake kernel (shape and strides for torch.compile), autocast
kernels for CPU and CUDA (under torch.autocast the op casts its floating
inputs to the autocast dtype, like conv2d; ``compute_dtype``) and autograd,
which gives gradients for x and every weight and bias that needs one. The
forward saves x, the weights and y only; the backward recomputes t1, t2.
After a triton or cuda forward (auto on CUDA) the backward is the fused
Triton one (op ``bottleneck_inference_backward``, ops/inference_backward.py;
registry.inference_backward_backend); after the others it is composed of
ATen ops (``_aten_backward``, the reference). ReLU gradients are torch's
threshold_backward in both. Every backend is deterministic: no atomics, so two identical calls are
bitwise equal.

Validation happens once per call: the Python wrapper ``bottleneck_inference``
checks only the Python types of its arguments (which the op's schema would
otherwise reject with a less helpful message); the op itself (its real and
its fake kernel) resolves the backend once and checks every value
(``resolve_and_check``), so direct ``torch.ops.resnext_kernels`` callers get
the same errors.
"""

import contextlib

import torch

from ..backends import registry
from ..common import settings, tuning, tuning_store
from ..common.layout import output_memory_format
from ..common.sizes import conv_output_size
from ..common.validation import check_like_x, check_positive_int
from .inference_backward import bottleneck_inference_backward

_NS = "resnext_kernels"


def check_argument_types(x, w1, b1, w2, b2, w3, b3, wd, bd, stride, dilation, groups):
    """The Python types the op's schema needs, checked before the dispatcher
    sees them: TypeError naming the argument unless the tensors are tensors
    (wd, bd: or None) and stride, dilation, groups are ints."""
    for name, t in (("x", x), ("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2), ("w3", w3), ("b3", b3)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("wd", wd), ("bd", bd)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    for name, v in (("stride", stride), ("dilation", dilation), ("groups", groups)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")


def check_inputs(x, w1, b1, w2, b2, w3, b3, wd, bd, stride, dilation, groups, backend="reference"):
    """Validate the values of the op's arguments (their types are the
    schema's) for `backend`, a concrete backend name; raise
    TypeError/ValueError naming the argument."""
    if (wd is None) != (bd is None):
        raise ValueError("wd and bd must both be given (projection shortcut) or both be None")
    for name, v in (("stride", stride), ("dilation", dilation), ("groups", groups)):
        check_positive_int(name, v)
    named = {"x": x, "w1": w1, "b1": b1, "w2": w2, "b2": b2, "w3": w3, "b3": b3}
    if wd is not None:
        named.update(wd=wd, bd=bd)

    allowed = registry.supported_dtypes(backend)
    if x.dtype not in allowed:
        raise TypeError(f"x has dtype {x.dtype}; backend {backend!r} supports {[str(d) for d in allowed]}")
    check_like_x(x, named, "all tensors must share one dtype")

    check_conv_weights(x, w1, w2, w3, wd, stride, groups)
    width, cout = w1.shape[0], w3.shape[0]
    biases = [("b1", b1, width), ("b2", b2, width), ("b3", b3, cout)]
    if wd is not None:
        biases.append(("bd", bd, cout))
    for name, t, n in biases:
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
        if t.shape[0] != n:
            raise ValueError(f"{name} must have {n} elements, got {t.shape[0]}")


def check_conv_weights(x, w1, w2, w3, wd, stride, groups):
    """The block's shape rules for x and the conv weights (shared with the
    training op): ValueError naming the argument. Dtypes and devices are the
    caller's to check."""
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    for name, t in (("w1", w1), ("w2", w2), ("w3", w3), ("wd", wd)):
        if t is not None and t.dim() != 4:
            raise ValueError(f"{name} must be 4-D, got shape {tuple(t.shape)}")
    cin = x.shape[1]
    width = w1.shape[0]
    cout = w3.shape[0]
    if tuple(w1.shape[1:]) != (cin, 1, 1):
        raise ValueError(f"w1 must have shape [width, Cin={cin}, 1, 1] to match x, got {tuple(w1.shape)}")
    if width % groups != 0:
        raise ValueError(f"groups={groups} does not divide width={width} (w1.shape[0])")
    if tuple(w2.shape) != (width, width // groups, 3, 3):
        raise ValueError(
            f"w2 must have shape [width={width}, width/groups={width // groups}, 3, 3], got {tuple(w2.shape)}"
        )
    if tuple(w3.shape[1:]) != (width, 1, 1):
        raise ValueError(f"w3 must have shape [Cout, width={width}, 1, 1], got {tuple(w3.shape)}")
    if wd is None:
        if cin != cout:
            raise ValueError(
                f"identity shortcut needs Cin == Cout, got Cin={cin} (x) and Cout={cout} (w3); pass wd/bd"
            )
        if stride != 1:
            raise ValueError(f"identity shortcut needs stride=1, got stride={stride}; pass wd/bd")
    elif tuple(wd.shape) != (cout, cin, 1, 1):
        raise ValueError(f"wd must have shape [Cout={cout}, Cin={cin}, 1, 1], got {tuple(wd.shape)}")
    if x.shape[2] == 0 or x.shape[3] == 0:  # as eager's conv; an empty batch (N = 0) is fine
        raise ValueError(f"x must be non-empty in H and W, got shape {tuple(x.shape)}")


def output_shape(x, w3, stride):
    n, _, h, w = x.shape
    return (n, w3.shape[0], conv_output_size(h, stride), conv_output_size(w, stride))


def resolve_and_check(args, backend):
    """The backends this call may run (one, or auto's candidates), after
    checking the op's `args` (x, w1, ..., groups) against the first of them.
    Raises BackendUnavailableError for an explicit backend that cannot run on
    x's device, TypeError/ValueError for bad arguments."""
    registry.check_backend_name(backend)
    x = args[0]
    if backend == "auto":
        candidates = registry.auto_candidates(x.device)
    else:
        candidates = (registry.resolve_backend(backend, x.device),)
    check_inputs(*args, candidates[0])
    return candidates


@torch.library.custom_op(f"{_NS}::bottleneck_inference", mutates_args=())
def _bottleneck_inference_op(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    w3: torch.Tensor,
    b3: torch.Tensor,
    wd: torch.Tensor | None,
    bd: torch.Tensor | None,
    stride: int,
    dilation: int,
    groups: int,
    backend: str,
) -> torch.Tensor:
    args = (x, w1, b1, w2, b2, w3, b3, wd, bd, stride, dilation, groups)
    candidates = resolve_and_check(args, backend)
    if x.shape[0] == 0:  # an empty batch: nothing to compute, on any backend (the backward gives zero weight grads)
        return torch.empty(output_shape(x, w3, stride), dtype=x.dtype, device=x.device,
                           memory_format=output_memory_format(x))
    chosen = candidates[0] if len(candidates) == 1 else choose_auto_backend(args, candidates)
    return registry.kernel(chosen)(*args)


AUTO_CHOICES = {}  # tuning.tune_key -> the backend "auto" runs for that problem


def choose_auto_backend(args, candidates):
    """The backend "auto" runs for the op's `args` (already checked) among
    several usable `candidates` (registry.auto_candidates: cuda and triton
    on a GPU): while settings.autotune_enabled(), the first call of a
    problem runs each candidate once to warm it up (its own tuning happens
    there) and times it (tuning.seconds_per_call), and AUTO_CHOICES keeps the
    faster for this and later calls (and the tuning store for later
    processes, as choice "auto"); both are correct, so only speed decides.
    Autotuning off, or a miss while a CUDA graph is being captured that the
    store cannot answer: the first candidate, untimed.
    """
    x, w1, _, _, _, w3, _, wd, _, stride, dilation, groups = args
    key = tuning.tune_key(x, w1.shape[0], w3.shape[0], stride, dilation, groups, wd is not None,
                          torch.backends.cudnn.allow_tf32)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        return tuning.select_fastest(
            AUTO_CHOICES, key, lambda: candidates,
            lambda name: tuning.seconds_per_call(lambda: registry.kernel(name)(*args), x.device),
            enabled=settings.autotune_enabled(), capturing=tuning.capturing(x.device), default=candidates[0],
            choice="auto", validity=lambda: tuning_store.validity(x.device))


@_bottleneck_inference_op.register_fake
def _(x, w1, b1, w2, b2, w3, b3, wd, bd, stride, dilation, groups, backend):
    # The same checks as the real kernel: "auto" is checked as the backend it
    # resolves to (the reference on CPU takes float64 too).
    resolve_and_check((x, w1, b1, w2, b2, w3, b3, wd, bd, stride, dilation, groups), backend)
    return torch.empty(output_shape(x, w3, stride), dtype=x.dtype, device=x.device,
                       memory_format=output_memory_format(x))


# -- autocast ---------------------------------------------------------------------
# Under torch.autocast the op casts like conv2d: every floating input on the
# autocast device except float64 goes to the autocast dtype, read at call
# time (torch.get_autocast_dtype), then the op runs with autocast off.
_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def _autocast_kernel(device_type):
    def kernel(*args):
        dtype = torch.get_autocast_dtype(device_type)

        def cast(a):
            eligible = (isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float64
                        and a.device.type == device_type)
            return a.to(dtype) if eligible else a

        with torch.autocast(device_type, enabled=False):
            return _bottleneck_inference_op(*(cast(a) for a in args))

    return kernel


for _device_type, _key in _AUTOCAST_KEYS.items():
    torch.library.impl(f"{_NS}::bottleneck_inference", _key)(_autocast_kernel(_device_type))


def compute_dtype(x):
    """The dtype the op computes in for `x` here: the autocast dtype while
    torch.autocast is on for x's device type and x is one autocast casts
    (floating, not float64), else x's dtype. The block folds its weights in
    it, so that the op's autocast cast of them is a no-op."""
    # Every call of the block asks, so the cheapest questions come first:
    # is_autocast_enabled() without an argument (CUDA's) skips parsing a
    # device string (~0.2 us instead of ~0.5 us).
    if x.is_cuda:
        device_type, enabled = "cuda", torch.is_autocast_enabled()
    else:
        device_type = "cpu"
        enabled = x.is_cpu and torch.is_autocast_enabled(device_type)
    if enabled and x.is_floating_point() and x.dtype != torch.float64:
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, w3, b3, wd, bd, stride, dilation, groups, backend = inputs
    ctx.conv = (stride, dilation, groups)
    ctx.has_projection = wd is not None
    # Fused (triton) or ATen backward, by the forward's backend and x's device.
    ctx.backward_backend = registry.inference_backward_backend(backend, x.device)
    ctx.save_for_backward(x, w1, b1, w2, b2, w3, b3, wd, bd, output)


def _conv_backward(grad, inp, weight, stride, padding, dilation, groups, need_input, need_weight):
    gi, gw, _ = torch.ops.aten.convolution_backward(
        grad, inp, weight, None, [stride] * 2, [padding] * 2, [dilation] * 2, False, [0, 0], groups,
        [need_input, need_weight, False],
    )
    return gi, gw


def _aten_backward(ctx, grad_y):
    """The backward in ATen ops: the reference's, and that of every backend
    without fused backward kernels (registry.inference_backward_backend)."""
    x, w1, b1, w2, b2, w3, _b3, wd, _bd, y = ctx.saved_tensors
    stride, dilation, groups = ctx.conv
    need = ctx.needs_input_grad  # (x, w1, b1, w2, b2, w3, b3, wd, bd, ...)
    f = torch.nn.functional
    # Recompute t1, t2 (cheap next to saving them; activation memory matters).
    t1 = f.relu(f.conv2d(x, w1, b1))
    t2 = f.relu(f.conv2d(t1, w2, b2, stride=stride, padding=dilation, dilation=dilation, groups=groups))

    # ReLU gradients exactly as torch's: zero where the output is <= 0, the
    # incoming gradient elsewhere (NaN outputs included); not grad * (out > 0),
    # which zeroes at NaN outputs and turns an inf gradient at 0 into NaN.
    relu_grad = torch.ops.aten.threshold_backward
    g3 = relu_grad(grad_y, y, 0)  # through the final ReLU; also the shortcut's gradient
    gb3 = g3.sum((0, 2, 3))
    gt2, gw3 = _conv_backward(g3, t2, w3, 1, 0, 1, 1, True, need[5])
    gx_short, gwd, gbd = None, None, None
    if ctx.has_projection:
        gx_short, gwd = _conv_backward(g3, x, wd, stride, 0, 1, 1, need[0], need[7])
        gbd = gb3
    elif need[0]:
        gx_short = g3
    g2 = relu_grad(gt2, t2, 0)
    gb2 = g2.sum((0, 2, 3))
    gt1, gw2 = _conv_backward(g2, t1, w2, stride, dilation, dilation, groups, True, need[3])
    g1 = relu_grad(gt1, t1, 0)
    gb1 = g1.sum((0, 2, 3))
    gx, gw1 = _conv_backward(g1, x, w1, 1, 0, 1, 1, need[0], need[1])
    if need[0]:
        gx = gx + gx_short
    return gx, gw1, gb1, gw2, gb2, gw3, gb3, gwd, gbd, None, None, None, None


def _backward(ctx, grad_y):
    # Grad mode is on in a backward only under create_graph=True (double
    # backward): the ATen ops record their graph, the fused op has none. An
    # empty batch has nothing for the kernels to do: ATen gives its zeros.
    if ctx.backward_backend == "reference" or torch.is_grad_enabled() or grad_y.shape[0] == 0:
        return _aten_backward(ctx, grad_y)
    x, w1, b1, w2, b2, w3, b3, wd, bd, y = ctx.saved_tensors
    stride, dilation, groups = ctx.conv
    need = ctx.needs_input_grad  # (x, w1, b1, w2, b2, w3, b3, wd, bd, ...)
    needs = (need[0], need[1], need[2], need[3], need[4], need[5], need[6] or need[8], need[7])
    gx, gw1, gb1, gw2, gb2, gw3, gb3, gwd = bottleneck_inference_backward(
        grad_y, x, w1, b1, w2, b2, w3, b3, wd, bd, y, stride, dilation, groups, needs, ctx.backward_backend)
    return (gx, gw1, gb1, gw2, gb2, gw3, gb3 if need[6] else None, gwd, gb3 if need[8] else None,
            None, None, None, None)


_bottleneck_inference_op.register_autograd(_backward, setup_context=_setup_context)


def bottleneck_inference(x, w1, b1, w2, b2, w3, b3, wd=None, bd=None, *, stride=1, dilation=1, groups=1,
                         backend="auto"):
    """Run the folded inference block (see the module docstring) on `backend`.

    backend: "auto" (fastest usable for x's device), "reference", "triton",
    "cuda" or "cuda_emulated". An explicit backend that cannot run raises
    BackendUnavailableError with the reason.
    """
    registry.check_backend_name(backend)
    check_argument_types(x, w1, b1, w2, b2, w3, b3, wd, bd, stride, dilation, groups)
    # The op resolves the backend and checks the values, once ("auto" stays
    # "auto": the op chooses at run time, with real tensors; under
    # torch.compile this wrapper only ever sees fake ones).
    return _bottleneck_inference_op(x, w1, b1, w2, b2, w3, b3, wd, bd, stride, dilation, groups, backend)
