"""The training ops: the ResNeXt bottleneck block with BatchNorm using batch
statistics, forward and backward.

``resnext_kernels::bottleneck_training`` computes exactly torchvision's
train-mode block (nn.BatchNorm2d semantics, see below):

    y1 = conv1x1(x, w1)                                    t1 = relu(bn1(y1))
    y2 = conv3x3(t1, w2, stride, pad=dilation, dilation, groups)   t2 = relu(bn2(y2))
    y3 = conv1x1(t2, w3)
    out = relu(bn3(y3) + shortcut),  shortcut = x, or bn_d(yd) with yd = conv1x1(x, wd, stride)

and returns (out, y1, y2, y3, yd, bn_stats, new_running): the block's
output, what the backward needs (the raw conv outputs y*, and bn_stats
[SAVED_ROWS, C_total], the per-channel mean and invstd of every norm;
common/batch_stats.py) and the running statistics after this step,
new_running [2, C_total] (mean, variance). The op is functional: the
running stats passed in are not modified; FusedResNeXtBlock copies
new_running into its buffers. Its autograd formula calls the second op,
``resnext_kernels::bottleneck_training_backward``, which returns the
gradients of x, every conv weight and every BN weight and bias. The
auxiliary outputs (y*, bn_stats, new_running) are marked non-differentiable.
Double backward: while autograd records a graph of the gradients
(create_graph=True) the formula does not call the backward op; it
recomputes the block with the differentiable reference composite (ATen
ops) and differentiates that, on every backend
(ops/training_double_backward.py), so gradients of gradients are eager's.

BatchNorm semantics, per norm (common.batch_stats.BatchNormArgs): with
batch_stats, normalize with the batch mean and biased variance; the
running mean/var (when given) become (1 - m) * old + m * batch, the variance
unbiased (n / (n - 1)), m the exponential average factor (nn.BatchNorm2d's
momentum, or 1/num_batches_tracked for momentum=None; the module computes
it); without batch_stats the norm normalizes with its running statistics
(an eval-mode norm in a block whose other norms use batch statistics).
Statistics come from the conv outputs rounded to the activation dtype, as
in eager. ReLU's gradient is zero at exactly 0 and NaN/Inf propagate as in
eager (threshold_backward on the output).

SyncBatchNorm (issue 12): ``group_name`` (both ops; None by default) names
a torch.distributed process group (its ProcessGroup.group_name, as torch's
functional collectives name groups). With one, the batch-statistics norms
are synchronized over the group as nn.SyncBatchNorm's are: statistics
gathered before each finalize, BN's backward sums and counts all-reduced
(common/process_group_exchange.py); this process's BN weight and bias
gradients are its own, for DistributedDataParallel to average. Every rank of
the group must call the op with the same block; ranks' batch sizes may
differ, and a rank's batch may be empty (it takes part in the collectives
with a zero count, as with nn.SyncBatchNorm). None: one process.

Empty batch (N = 0, both ops, every backend): as eager, an empty output
and activations, the running statistics unchanged (without an exchange),
zero weight gradients; no kernel runs (ops/empty_batch.py).

Backends: "reference" (ATen ops, any floating dtype) and "triton" (Triton
kernels, docs/training.md), both through the same exchange. "auto" runs triton for CUDA tensors and the
reference for CPU ones (registry.resolve_training_backend); "cuda" and
"cuda_emulated" have no training kernels and raise BackendUnavailableError
saying so. Validation happens once per call, in the op (and its fake).

``batch_stats`` is an int list (0/1 per norm; Python bools pass) rather than
a bool list: torch.jit.trace cannot record a list of bools ("Tracing a list
of bool type is currently not supported"), and a traced train-mode model
must record this op.
"""

import torch

from ..backends import registry
from ..common.batch_stats import LOCAL, SAVED_ROWS, BatchNormArgs, norm_columns, stats_dtype
from ..common.layout import output_memory_format
from ..common.process_group_exchange import ProcessGroupExchange
from ..common.sizes import conv_output_size
from ..common.validation import check_like_x, check_positive_int
from . import empty_batch
from .inference import check_conv_weights
from .training_double_backward import training_gradients_with_graph

_NS = "resnext_kernels"
NORM_NAMES = ("bn1", "bn2", "bn3", "bn_d")
_NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")
Tensor = torch.Tensor
OptTensor = torch.Tensor | None


def check_training_inputs(x, w1, w2, w3, wd, norms, stride, dilation, groups, backend, synchronized=False):
    """Validate the values of the training op's arguments for `backend` (a
    concrete name); TypeError/ValueError naming the argument. synchronized:
    the batch statistics are the process group's (each process needs one
    value per channel, the group more than one)."""
    for name, v in (("stride", stride), ("dilation", dilation), ("groups", groups)):
        check_positive_int(name, v)
    allowed = registry.supported_dtypes(backend)
    if x.dtype not in allowed:
        raise TypeError(f"x has dtype {x.dtype}; backend {backend!r} supports {[str(d) for d in allowed]}")
    check_like_x(x, {"w1": w1, "w2": w2, "w3": w3, "wd": wd}, "the conv weights must share x's dtype")
    check_conv_weights(x, w1, w2, w3, wd, stride, groups)
    width, cout = w1.shape[0], w3.shape[0]
    channels = (width, width, cout, cout)
    if len(norms) != 3 + (wd is not None):
        raise ValueError(f"expected {3 + (wd is not None)} norms (bn1, bn2, bn3{', bn_d' if wd is not None else ''}), "
                         f"got {len(norms)}")
    n, _, h, w = x.shape
    ho, wo = conv_output_size(h, stride), conv_output_size(w, stride)
    for i, bn in enumerate(norms):
        name = NORM_NAMES[i]
        for tname, t in zip(_NORM_TENSORS, bn[:4]):
            if t is None:
                continue
            if not t.is_floating_point():
                raise TypeError(f"{name}.{tname} has dtype {t.dtype}; expected a floating dtype")
            if t.device != x.device:
                raise ValueError(f"{name}.{tname} is on {t.device} but x is on {x.device}")
            if tuple(t.shape) != (channels[i],):
                raise ValueError(f"{name}.{tname} must have shape ({channels[i]},), got {tuple(t.shape)}")
        if (bn.running_mean is None) != (bn.running_var is None):
            raise ValueError(f"{name}: running_mean and running_var must both be given or both be None")
        if not bn.batch_stats and bn.running_mean is None:
            raise ValueError(f"{name}: normalizing without batch statistics needs running_mean and running_var")
        # nn.BatchNorm2d's rule: one value per channel cannot be normalized;
        # an empty batch (count 0) can (ops/empty_batch.py), and a
        # synchronized norm's values are the group's.
        count = n * (h * w if i == 0 else ho * wo)
        if bn.batch_stats and not synchronized and count == 1:
            raise ValueError(f"{name}: expected more than 1 value per channel when training, got {count} "
                             f"(x of shape {tuple(x.shape)})")


def _check_group_name(group_name):
    if group_name is not None and not isinstance(group_name, str):
        raise TypeError(f"group_name must be a str (a ProcessGroup's group_name) or None, "
                        f"got {type(group_name).__name__}")


def _exchange(group_name):
    """The statistics exchange of a call: over the named process group, or LOCAL for None."""
    return LOCAL if group_name is None else ProcessGroupExchange.from_name(group_name)


def _resolve_and_check(x, w1, w2, w3, wd, norms, stride, dilation, groups, backend, group_name):
    """The concrete training backend for this call, after checking the arguments."""
    _check_group_name(group_name)
    name = registry.resolve_training_backend(backend, x.device)
    check_training_inputs(x, w1, w2, w3, wd, norms, stride, dilation, groups, name,
                          synchronized=group_name is not None)
    return name


def _norms(tensors, batch_stats, momentum, eps):
    """BatchNormArgs per norm from the op's flat arguments (4 tensors per norm)."""
    if not (len(batch_stats) == len(momentum) == len(eps)):
        raise ValueError(f"batch_stats, momentum and eps must have one entry per norm, got {len(batch_stats)}, "
                         f"{len(momentum)}, {len(eps)}")
    return [BatchNormArgs(*tensors[4 * i:4 * i + 4], bool(b), float(m), float(e))
            for i, (b, m, e) in enumerate(zip(batch_stats, momentum, eps))]


@torch.library.custom_op(f"{_NS}::bottleneck_training", mutates_args=())
def _training_op(
    x: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, wd: OptTensor,
    bn1_weight: OptTensor, bn1_bias: OptTensor, bn1_running_mean: OptTensor, bn1_running_var: OptTensor,
    bn2_weight: OptTensor, bn2_bias: OptTensor, bn2_running_mean: OptTensor, bn2_running_var: OptTensor,
    bn3_weight: OptTensor, bn3_bias: OptTensor, bn3_running_mean: OptTensor, bn3_running_var: OptTensor,
    bnd_weight: OptTensor, bnd_bias: OptTensor, bnd_running_mean: OptTensor, bnd_running_var: OptTensor,
    stride: int, dilation: int, groups: int,
    batch_stats: list[int], momentum: list[float], eps: list[float], backend: str, group_name: str | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    bn_tensors = (bn1_weight, bn1_bias, bn1_running_mean, bn1_running_var, bn2_weight, bn2_bias, bn2_running_mean,
                  bn2_running_var, bn3_weight, bn3_bias, bn3_running_mean, bn3_running_var, bnd_weight, bnd_bias,
                  bnd_running_mean, bnd_running_var)
    norms = _norms(bn_tensors, batch_stats, momentum, eps)
    name = _resolve_and_check(x, w1, w2, w3, wd, norms, stride, dilation, groups, backend, group_name)
    if x.shape[0] == 0:  # nothing to compute, but the collectives still run (ops/empty_batch.py)
        return empty_batch.empty_batch_forward(x, w1, w2, w3, wd, norms, stride, exchange=_exchange(group_name))
    forward, _ = registry.training_kernels(name)
    return forward(x, w1, w2, w3, wd, norms, stride, dilation, groups, exchange=_exchange(group_name))


@_training_op.register_fake
def _(x, w1, w2, w3, wd, *rest):
    bn_tensors, (stride, dilation, groups, batch_stats, momentum, eps, backend, *group) = rest[:16], rest[16:]
    norms = _norms(bn_tensors, batch_stats, momentum, eps)
    _resolve_and_check(x, w1, w2, w3, wd, norms, stride, dilation, groups, backend, group[0] if group else None)
    n, _, h, w = x.shape
    width, cout = w1.shape[0], w3.shape[0]
    ho, wo = conv_output_size(h, stride), conv_output_size(w, stride)
    c_total = norm_columns(width, cout, wd is not None)[-1].stop
    sd = stats_dtype(x.dtype)

    def act(c, hh, ww):
        return x.new_empty((n, c, hh, ww)).contiguous(memory_format=torch.channels_last)

    yd = act(cout, ho, wo) if wd is not None else x.new_empty(0)
    out = x.new_empty((n, cout, ho, wo)).contiguous(memory_format=output_memory_format(x))
    return (out, act(width, h, w), act(width, ho, wo), act(cout, ho, wo), yd,
            x.new_empty((SAVED_ROWS, c_total), dtype=sd), x.new_empty((2, c_total), dtype=sd))


@torch.library.custom_op(f"{_NS}::bottleneck_training_backward", mutates_args=())
def _training_backward_op(
    grad_out: Tensor, x: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, wd: OptTensor,
    out: Tensor, y1: Tensor, y2: Tensor, y3: Tensor, yd: Tensor, bn_stats: Tensor,
    bn1_weight: OptTensor, bn1_bias: OptTensor, bn2_weight: OptTensor, bn2_bias: OptTensor,
    bn3_weight: OptTensor, bn3_bias: OptTensor, bnd_weight: OptTensor, bnd_bias: OptTensor,
    stride: int, dilation: int, groups: int, batch_stats: list[int], need_x_grad: bool, backend: str,
    group_name: str | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dw1, dw2, dw3, dwd, grad_bn): dx is empty unless need_x_grad, dwd
    empty without projection; grad_bn [2, C_total] in bn_stats' dtype (row 0
    the BN weights' gradients, row 1 the biases'; this process's own). The
    BN weights and biases rebuild each norm's scale and shift from the saved
    mean and invstd. group_name: the forward's (module docstring)."""
    _check_backward(grad_out, out, bn_stats, backend, group_name)
    if x.shape[0] == 0:  # ops/empty_batch.py
        return empty_batch.empty_batch_backward(x, w1, w2, w3, wd, bn_stats, batch_stats, need_x_grad,
                                                exchange=_exchange(group_name))
    _, backward = registry.training_kernels(backend)
    affine = [(bn1_weight, bn1_bias), (bn2_weight, bn2_bias), (bn3_weight, bn3_bias), (bnd_weight, bnd_bias)]
    dx, dw1, dw2, dw3, dwd, grad_bn = backward(grad_out, x, w1, w2, w3, wd, out, y1, y2, y3, yd, bn_stats,
                                               affine[:len(batch_stats)], batch_stats, stride, dilation, groups,
                                               need_x_grad, exchange=_exchange(group_name))
    return (x.new_empty(0) if dx is None else dx, dw1.contiguous(), dw2.contiguous(), dw3.contiguous(),
            x.new_empty(0) if dwd is None else dwd.contiguous(), grad_bn)


def _check_backward(grad_out, out, bn_stats, backend, group_name):
    _check_group_name(group_name)
    if backend not in registry.TRAINING_BACKENDS:
        raise ValueError(f"backend must be a concrete training backend {registry.TRAINING_BACKENDS}, got {backend!r}")
    if tuple(grad_out.shape) != tuple(out.shape) or grad_out.dtype != out.dtype or grad_out.device != out.device:
        raise ValueError(f"grad_out must match out ({out.dtype} {tuple(out.shape)} on {out.device}), got "
                         f"{grad_out.dtype} {tuple(grad_out.shape)} on {grad_out.device}")
    if bn_stats.dim() != 2 or bn_stats.shape[0] != SAVED_ROWS:
        raise ValueError(f"bn_stats must be [{SAVED_ROWS}, C_total], got shape {tuple(bn_stats.shape)}")


@_training_backward_op.register_fake
def _(grad_out, x, w1, w2, w3, wd, out, y1, y2, y3, yd, bn_stats, *rest):
    stride, dilation, groups, batch_stats, need_x_grad, backend, *group = rest[8:]
    _check_backward(grad_out, out, bn_stats, backend, group[0] if group else None)
    dx = x.new_empty(x.shape).contiguous(memory_format=torch.channels_last) if need_x_grad else x.new_empty(0)
    dwd = wd.new_empty(wd.shape) if wd is not None else x.new_empty(0)
    return (dx, w1.new_empty(w1.shape), w2.new_empty(w2.shape), w3.new_empty(w3.shape), dwd,
            bn_stats.new_empty((2, bn_stats.shape[1])))


def _setup_context(ctx, inputs, output):
    x, w1, w2, w3, wd = inputs[:5]
    bn_tensors = inputs[5:21]
    stride, dilation, groups, batch_stats, _momentum, _eps, backend, group_name = inputs[21:]
    out, y1, y2, y3, yd, bn_stats, new_running = output
    ctx.mark_non_differentiable(y1, y2, y3, yd, bn_stats, new_running)
    affine = [t for i in range(4) for t in bn_tensors[4 * i:4 * i + 2]]  # the norms' weights and biases
    ctx.save_for_backward(x, w1, w2, w3, wd, out, y1, y2, y3, yd, bn_stats, *affine)
    ctx.conv = (stride, dilation, groups)
    ctx.batch_stats = list(batch_stats)
    ctx.eps = list(_eps)  # for the differentiable recomputation (ops/training_double_backward.py)
    ctx.backend = registry.resolve_training_backend(backend, x.device)  # what the forward ran
    ctx.group_name = group_name
    # Per norm, the dtypes of its weight and bias (None: absent), to shape the BN gradients.
    ctx.affine = [tuple(None if t is None else t.dtype for t in bn_tensors[4 * i:4 * i + 2])
                  for i in range(len(batch_stats))]


def _backward(ctx, grad_out, *_aux_grads):
    n_inputs = 29
    if grad_out is None:
        return (None,) * n_inputs
    x, w1, w2, w3, wd, out, y1, y2, y3, yd, bn_stats, *affine = ctx.saved_tensors
    stride, dilation, groups = ctx.conv
    if torch.is_grad_enabled() and x.shape[0] > 0:
        # create_graph=True: the gradients must be differentiable; the
        # backward kernels are not, the reference composite is.
        inputs = [x, w1, w2, w3, wd] + [t for i in range(4) for t in (*affine[2 * i:2 * i + 2], None, None)]
        grads = training_gradients_with_graph(grad_out, inputs, ctx.needs_input_grad, bn_stats, ctx.batch_stats,
                                              ctx.eps, ctx.conv, ctx.group_name)
        return (*grads, *[None] * (n_inputs - len(grads)))
    with torch.no_grad():  # an empty batch's zero gradients are constants, with or without a graph
        dx, dw1, dw2, dw3, dwd, grad_bn = _training_backward_op(
            grad_out, x, w1, w2, w3, wd, out, y1, y2, y3, yd, bn_stats, *affine, stride, dilation, groups,
            ctx.batch_stats, ctx.needs_input_grad[0], ctx.backend, ctx.group_name)
    cols = norm_columns(w1.shape[0], w3.shape[0], wd is not None)
    bn_grads = []
    for (w_dtype, b_dtype), col in zip(ctx.affine, cols):
        bn_grads += [None if w_dtype is None else grad_bn[0, col].to(w_dtype),
                     None if b_dtype is None else grad_bn[1, col].to(b_dtype), None, None]
    bn_grads += [None] * (16 - len(bn_grads))
    return (dx if ctx.needs_input_grad[0] else None, dw1, dw2, dw3, dwd if wd is not None else None, *bn_grads,
            None, None, None, None, None, None, None, None)


_training_op.register_autograd(_backward, setup_context=_setup_context)


def bottleneck_training(x, w1, w2, w3, wd, norms, *, stride=1, dilation=1, groups=1, backend="auto",
                        group_name=None):
    """Run the training block (module docstring) on `backend`, with the
    batch statistics synchronized over the process group named `group_name`
    (None: this process's own; module docstring).

    x [N, Cin, H, W] (channels_last, or NCHW converted once by the kernels);
    w1, w2, w3 (wd or None): conv weights in x's dtype; norms: bn1, bn2, bn3
    (and bn_d with wd) as common.batch_stats.BatchNormArgs (their tensors in
    any floating dtype). Returns (out, new_running): out [N, Cout, Ho, Wo]
    in x's memory format (common.layout.output_memory_format, as eager's
    conv), new_running [2, C_total] the running (mean, var) after this
    step, columns per norm as common.batch_stats.norm_columns gives them.
    """
    registry.check_backend_name(backend)
    _check_group_name(group_name)
    for name, t in (("x", x), ("w1", w1), ("w2", w2), ("w3", w3)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if wd is not None and not isinstance(wd, torch.Tensor):
        raise TypeError(f"wd must be a torch.Tensor or None, got {type(wd).__name__}")
    for name, v in (("stride", stride), ("dilation", dilation), ("groups", groups)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    norms = list(norms)
    for i, bn in enumerate(norms):
        if not isinstance(bn, BatchNormArgs):
            raise TypeError(f"norms[{i}] must be a BatchNormArgs, got {type(bn).__name__}")
        for tname, t in zip(_NORM_TENSORS, bn[:4]):
            if t is not None and not isinstance(t, torch.Tensor):
                raise TypeError(f"{NORM_NAMES[i]}.{tname} must be a torch.Tensor or None, got {type(t).__name__}")
    tensors = [t for bn in norms for t in bn[:4]]
    tensors += [None] * (16 - len(tensors))
    outputs = _training_op(x, w1, w2, w3, wd, *tensors, stride, dilation, groups,
                           [int(bn.batch_stats) for bn in norms], [float(bn.momentum) for bn in norms],
                           [float(bn.eps) for bn in norms], backend, group_name)
    return outputs[0], outputs[6]


__all__ = ["BatchNormArgs", "bottleneck_training", "check_training_inputs"]
