"""FusedResNeXtBlock: a drop-in for torchvision's (and timm's) Bottleneck."""

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import folding, inner_hooks, tracing, unfused
from .backends import registry
from .common.batch_stats import BatchNormArgs, norm_columns
from .common.settings import REFERENCE_DTYPES
from .common.validation import check_positive_int
from .common.weight_cache import TensorSnapshot, cacheable
from .ops import inference, training


def _conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def _conv3x3(in_planes, out_planes, stride=1, groups=1, dilation=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups,
                     bias=False, dilation=dilation)


class FusedResNeXtBlock(nn.Module):
    """ResNeXt/ResNet bottleneck block running as fused kernels.

    The constructor is torchvision's ``Bottleneck(inplanes, planes, stride=1,
    downsample=None, groups=1, base_width=64, dilation=1, norm_layer=None)``
    plus the keyword ``backend``; submodules and state_dict keys are the same
    (conv1 bn1 conv2 bn2 conv3 bn3 downsample), so torchvision weights load
    unchanged and ``torchvision.models.resnet.ResNet(FusedResNeXtBlock, ...)``
    builds a fused network.

    Forward:
      * Inference-mode normalization (BatchNorm2d in eval mode with running
        stats, or FrozenBatchNorm2d in any mode): BN is folded into the convs
        and the block runs as the op ``resnext_kernels::bottleneck_inference``
        on ``backend``. Gradients reach x, conv weights and BN affine params.
      * BatchNorm2d using batch statistics (train mode, or no running stats):
        the block runs the training op ``resnext_kernels::bottleneck_training``
        (ops/training.py) on ``backend`` ("triton" kernels, or the
        "reference" ATen composite; "auto": triton on CUDA, reference on CPU;
        "cuda"/"cuda_emulated" have no training kernels and raise
        BackendUnavailableError), with nn.BatchNorm2d's running-stat and
        num_batches_tracked updates.
      * nn.SyncBatchNorm norms (``nn.SyncBatchNorm.convert_sync_batchnorm``,
        before or after ``rk.convert``) behave as nn.SyncBatchNorm: in train
        mode with an initialized process group of more than one process the
        training op synchronizes their statistics over the norms'
        ``process_group`` (None: the whole world), CPU processes (gloo)
        included; otherwise they are BatchNorm2d. The norms of one block
        must share one process group.
      * Hooks on inner modules (forward hooks and pre-hooks, backward
        hooks, torch.nn.utils.prune's pre-hook; global module hooks): the
        block runs its submodules one by one as torchvision's Bottleneck
        does (unfused.py), so the hooks see and replace what eager gives
        them; one UnfusedForwardWarning per block; the fused op resumes
        once the hooks are removed (inner_hooks.py).

    Tools (tracing.py; README, "Works with"): under torch.fx tracing the
    block is a leaf node that runs fused; torch.jit.trace, torch.compile,
    torch.export and torch.vmap run the fused ops; torch.jit.script and
    torch.onnx.export get the unfused submodules (``bottleneck_forward``,
    torchvision's Bottleneck.forward) with an UnfusedForwardWarning.

    backend: "auto" (fastest usable for the input's device), "reference",
    "triton", "cuda", or the testing backend "cuda_emulated". An explicitly
    requested backend that cannot run raises BackendUnavailableError.

    downsample must be None or ``nn.Sequential(Conv2d 1x1 no bias, norm)``
    as torchvision builds it; other shortcut modules raise ValueError.

    Folded weights are cached per module when no gradient is being recorded,
    and recomputed when any parameter or buffer changes (``tensor._version``,
    storage, dtype or device) or the input dtype changes.
    """

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64, dilation=1,
                 norm_layer=None, *, backend="auto"):
        super().__init__()
        for name, value in (("inplanes", inplanes), ("planes", planes), ("stride", stride), ("groups", groups),
                            ("base_width", base_width), ("dilation", dilation)):
            check_positive_int(name, value)
        registry.check_backend_name(backend)
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        if width < 1:
            raise ValueError(f"planes={planes} and base_width={base_width} give width {width} < 1")
        self.conv1 = _conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = _conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.backend = backend
        self._fold_cache = None
        self._check_structure()

    # -- structure ---------------------------------------------------------

    def _check_structure(self):
        """Raise ValueError if the submodules are not a block this package can fold."""
        c1, c2, c3 = self.conv1, self.conv2, self.conv3
        for name, conv, k in (("conv1", c1, 1), ("conv2", c2, 3), ("conv3", c3, 1)):
            if type(conv) is not nn.Conv2d or conv.kernel_size != (k, k) or conv.bias is not None:
                raise ValueError(f"{name} must be an nn.Conv2d {k}x{k} with bias=False, got {conv}")
        if c1.stride != (1, 1) or c3.stride != (1, 1) or c1.groups != 1 or c3.groups != 1:
            raise ValueError("conv1 and conv3 must have stride 1 and groups 1")
        s, d = c2.stride, c2.dilation
        if s[0] != s[1] or d[0] != d[1] or c2.padding != d or c2.padding_mode != "zeros":
            raise ValueError(f"conv2 must have square stride/dilation and padding == dilation, got {c2}")
        if c2.in_channels != c1.out_channels or c2.out_channels != c1.out_channels:
            raise ValueError("conv2 must map conv1's width to the same width")
        for name in ("bn1", "bn2", "bn3"):
            if not folding.is_supported_norm(getattr(self, name)):
                raise ValueError(f"{name} must be nn.BatchNorm2d, nn.SyncBatchNorm or FrozenBatchNorm2d, "
                                 f"got {type(getattr(self, name))}")
        ds = self.downsample
        if ds is not None:
            ok = (isinstance(ds, nn.Sequential) and len(ds) == 2 and type(ds[0]) is nn.Conv2d
                  and ds[0].kernel_size == (1, 1) and ds[0].bias is None and ds[0].padding == (0, 0)
                  and ds[0].stride == s and ds[0].groups == 1 and ds[0].dilation == (1, 1)
                  and folding.is_supported_norm(ds[1]))
            if not ok:
                raise ValueError(
                    "downsample must be None or nn.Sequential(nn.Conv2d(1x1, stride=conv2's stride, bias=False), "
                    f"BatchNorm2d/SyncBatchNorm/FrozenBatchNorm2d), got {ds}")
        elif s != (1, 1) or c1.in_channels != c3.out_channels:
            raise ValueError(
                f"without downsample the block needs stride 1 and inplanes == planes*4, got stride {s[0]}, "
                f"inplanes {c1.in_channels}, planes*4 {c3.out_channels}")

    def _norms(self):
        norms = [self.bn1, self.bn2, self.bn3]
        if self.downsample is not None:
            norms.append(self.downsample[1])
        return norms

    def uses_batch_statistics(self):
        """True when forward normalizes with batch statistics (the training op)."""
        return any(folding.uses_batch_statistics(bn) for bn in self._norms())

    # -- forward -----------------------------------------------------------

    def forward(self, x):
        # torch.jit.script compiles this method and what it calls, and no
        # further: the unfused submodules (tracing.py says why). Eager mode
        # and every other tool go to _fused_forward, which hands FX tracers
        # and ONNX export to tracing.py.
        if torch.jit.is_scripting():
            return self.bottleneck_forward(x)
        return self._fused_forward(x)

    # unfused.bottleneck_forward as a method, so that TorchScript compiles it
    # (with `block` as self); TorchScript names a method after its function,
    # hence the attribute's name.
    bottleneck_forward = unfused.bottleneck_forward

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule. It returns the
        # block itself: a replacement module would also be written into the
        # scripted model's Python parents, leaving them unfused afterwards.
        tracing.warn_scripted()
        return self

    @torch.jit.unused
    def _fused_forward(self, x):
        if isinstance(x, torch.fx.Proxy):
            return tracing.fx_forward(self, x)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if tracing.onnx_exporting():
            return tracing.onnx_forward(self, x)
        hooked = inner_hooks.hooked_submodule(self)
        if hooked is not None:  # hooks the fused op would skip: run as torchvision does (inner_hooks.py)
            inner_hooks.warn_unfused(self, hooked)
            return unfused.bottleneck_forward(self, x)
        if self.uses_batch_statistics():
            return self._forward_batch_statistics(x)
        if torch.compiler.is_compiling():
            # Traced once: bad input fails here in the block's terms, not in
            # the op's fake kernel in terms of its own arguments (w1, ...).
            self._check_input(x)
        # Under autocast the op computes in the autocast dtype (like conv2d):
        # fold in it, so the fold is cached in that dtype, not cast per call.
        folded = self.folded_parameters(inference.compute_dtype(x))
        c2 = self.conv2
        try:
            return inference.bottleneck_inference(x, *folded, stride=c2.stride[0], dilation=c2.dilation[0],
                                                  groups=c2.groups, backend=self.backend)
        except (TypeError, ValueError):
            # The op names its own arguments (w1, ...); say it in terms of
            # what the user passed: x and the block's convs. Checked only
            # on failure, so a good call pays nothing for it.
            problem = self._input_problem(x)
            if problem is None:
                raise
            raise problem from None

    def _forward_batch_statistics(self, x):
        # The training op (ops/training.py) with nn.BatchNorm2d's bookkeeping
        # around it: num_batches_tracked and the exponential average factor
        # before, the running statistics after (the op returns them). Under
        # autocast the convs run in the autocast dtype, as eager's would.
        self._check_input(x)
        norms = self._norms()
        group_name = _sync_group_name(norms)
        args = [_batch_norm_args(bn) for bn in norms]
        dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        convs = [self.conv1, self.conv2, self.conv3] + ([self.downsample[0]] if self.downsample is not None else [])
        w1, w2, w3, wd = [c.weight.to(dtype) for c in convs] + [None] * (4 - len(convs))
        c2 = self.conv2
        out, new_running = training.bottleneck_training(x.to(dtype), w1, w2, w3, wd, args, stride=c2.stride[0],
                                                        dilation=c2.dilation[0], groups=c2.groups,
                                                        backend=self.backend, group_name=group_name)
        with torch.no_grad():
            for bn, arg, col in zip(norms, args, norm_columns(w1.shape[0], w3.shape[0], wd is not None)):
                if arg.batch_stats and arg.running_mean is not None:
                    bn.running_mean.copy_(new_running[0, col])
                    bn.running_var.copy_(new_running[1, col])
        return out

    def _check_input(self, x):
        problem = self._input_problem(x)
        if problem is not None:
            raise problem

    def _input_problem(self, x):
        """None if the block can take x, else the TypeError/ValueError saying
        why in terms of x and the block's convs (one wording for both modes)."""
        w = self.conv1.weight
        if x.dtype not in REFERENCE_DTYPES:
            return TypeError(f"x has dtype {x.dtype}; expected a floating dtype {[str(d) for d in REFERENCE_DTYPES]}")
        if x.device != w.device:
            return ValueError(f"x is on {x.device} but the block's parameters (conv1.weight, ...) are on {w.device}")
        if x.dim() != 4:
            return ValueError(f"x must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] != w.shape[1]:
            return ValueError(f"x has {x.shape[1]} channels but conv1 expects {w.shape[1]}")
        return None

    # -- folding -----------------------------------------------------------

    def _folded_modules(self):
        """The submodules whose parameters and buffers the fold reads."""
        mods = [self.conv1, self.bn1, self.conv2, self.bn2, self.conv3, self.bn3]
        if self.downsample is not None:
            mods += [self.downsample[0], self.downsample[1]]
        return mods

    def folded_parameters(self, dtype):
        """(w1, b1, w2, b2, w3, b3, wd, bd) with BN folded, in `dtype`.

        Cached (one entry) while the parameters and buffers the fold reads
        are the very same tensor objects, unmodified (common.weight_cache.
        TensorSnapshot: identity, version counter, storage address), and
        `dtype` is the same. Not cached: while an autograd graph is being
        recorded (a cached tensor that is part of a graph could not be
        backpropagated twice), while tracing under torch.compile (the
        compiled graph folds by itself), for parametrized submodules
        (torch.nn.utils.parametrize, e.g. weight_norm: their weight is
        recomputed on every access), and for inference-mode parameters (no
        version counter).
        """
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"x has dtype {dtype}; expected a floating dtype")
        mods = self._folded_modules()
        if any(parametrize.is_parametrized(m) for m in mods):
            self._fold_cache = None
            return self._fold(dtype)
        tensors = [t for m in mods for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]
        records_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        if records_grad or torch.compiler.is_compiling() or not cacheable(tensors):
            self._fold_cache = None
            return self._fold(dtype)
        cached = self._fold_cache
        if cached is not None and cached[0] == dtype and cached[1].matches(tensors):
            return cached[2]
        # Fold outside inference mode: inference tensors have no version
        # counter, so the backends' packed-weight caches (keyed on it) would
        # repack them on every call.
        with torch.inference_mode(False), torch.no_grad():
            folded = self._fold(dtype)
        self._fold_cache = (dtype, TensorSnapshot(tensors), folded)
        return folded

    def _fold(self, dtype):
        w1, b1 = folding.fold_conv_bn(self.conv1.weight, self.bn1, dtype)
        w2, b2 = folding.fold_conv_bn(self.conv2.weight, self.bn2, dtype)
        w3, b3 = folding.fold_conv_bn(self.conv3.weight, self.bn3, dtype)
        wd = bd = None
        if self.downsample is not None:
            wd, bd = folding.fold_conv_bn(self.downsample[0].weight, self.downsample[1], dtype)
        return (w1, b1, w2, b2, w3, b3, wd, bd)

    def __getstate__(self):
        # The fold cache refers to tensor identities (weak references): not
        # picklable, and meaningless in a copy (copy.deepcopy, torch.save).
        state = self.__dict__.copy()
        state["_fold_cache"] = None
        return state

    def _apply(self, fn, *args, **kwargs):
        # .to()/.cuda()/.half() replace parameters; drop the cache eagerly so it
        # does not keep old-device tensors alive.
        self._fold_cache = None
        return super()._apply(fn, *args, **kwargs)

    # -- construction from other blocks ------------------------------------

    @classmethod
    def from_bottleneck(cls, block, backend="auto"):
        """A FusedResNeXtBlock with a deep copy of `block`'s parameters and buffers.

        `block` is a torchvision ``Bottleneck`` or a timm ``Bottleneck``
        without attention, anti-aliasing, drop-block or drop-path, with ReLU
        activations and reduce_first=1. Raises ValueError otherwise.
        """
        reason = unsupported_reason(block)
        if reason is not None:
            raise ValueError(f"cannot convert {type(block).__module__}.{type(block).__name__}: {reason}")
        return cls.from_modules(*(_deepcopy(getattr(block, name)) for name in _SUBMODULES),
                                backend=backend, training=block.training)

    @classmethod
    def from_modules(cls, conv1, bn1, conv2, bn2, conv3, bn3, downsample, *, backend="auto", training=True):
        """A block made of the given submodules (used as they are, not copied); checks the structure."""
        registry.check_backend_name(backend)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.conv1, new.bn1, new.conv2, new.bn2, new.conv3, new.bn3 = conv1, bn1, conv2, bn2, conv3, bn3
        new.relu = nn.ReLU(inplace=True)
        new.downsample = downsample
        new.stride = conv2.stride[0]
        new.backend = backend
        new._fold_cache = None
        new._check_structure()
        return new.train(training)

    def to_bottleneck(self):
        """A torchvision ``Bottleneck`` with a deep copy of this block's
        submodules (same parameters, buffers, state_dict keys and mode)."""
        from torchvision.models.resnet import Bottleneck

        block = Bottleneck.__new__(Bottleneck)
        nn.Module.__init__(block)
        for name in _SUBMODULES:
            setattr(block, name, _deepcopy(getattr(self, name)))
        block.relu = nn.ReLU(inplace=True)
        block.stride = self.stride
        return block.train(self.training)


_SUBMODULES = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample")


def _deepcopy(module):
    """copy.deepcopy of a submodule (or None), sharing the process groups of
    its nn.SyncBatchNorm norms: a ProcessGroup cannot be copied, and the
    copy synchronizes over the same group."""
    if module is None:
        return None
    groups = (m.process_group for m in module.modules() if isinstance(m, nn.SyncBatchNorm))
    return copy.deepcopy(module, memo={id(g): g for g in groups if g is not None})


def _sync_group_name(norms):
    """The group_name of the process group this forward's batch-statistics
    norms synchronize over, or None (no synchronization).

    nn.SyncBatchNorm.forward's rule (torch/nn/modules/batchnorm.py, 2.14): a
    SyncBatchNorm synchronizes in train mode when torch.distributed is
    available and initialized and its process_group (None: WORLD) has more
    than one process; otherwise it is BatchNorm2d (torch 2.14 does not raise
    there). Its CPU-only restriction is not copied: the fused path does its
    own exchange (docs/training.md). One block synchronizes all its
    batch-statistics norms over one group or none of them: ValueError
    otherwise."""
    synced, local = {}, []
    for name, bn in zip(("bn1", "bn2", "bn3", "downsample.1"), norms):
        if not folding.uses_batch_statistics(bn):
            continue
        group = None
        if (isinstance(bn, nn.SyncBatchNorm) and bn.training and torch.distributed.is_available()
                and torch.distributed.is_initialized()):
            group = bn.process_group or torch.distributed.group.WORLD
            if torch.distributed.get_world_size(group) < 2:
                group = None
        if group is None:
            local.append(name)
        else:
            synced[name] = group.group_name
    if not synced:
        return None
    if len(set(synced.values())) > 1:
        raise ValueError("the SyncBatchNorm norms of one block must share one process group, got "
                         + ", ".join(f"{n}: group {g!r}" for n, g in synced.items()))
    if local:
        raise ValueError(f"the batch-statistics norms of one block must be all synchronized or all local: "
                         f"synchronized {list(synced)}, local {local} (make them all nn.SyncBatchNorm over one "
                         "process group, e.g. with nn.SyncBatchNorm.convert_sync_batchnorm)")
    return next(iter(synced.values()))


def _batch_norm_args(bn):
    """The training op's view of a norm for this forward, with the
    bookkeeping of nn.BatchNorm2d.forward (torch/nn/modules/batchnorm.py):
    num_batches_tracked += 1 in training mode with running stats, and the
    exponential average factor `momentum` or 1/num_batches_tracked for
    momentum=None; batch statistics in training mode or without running
    stats. FrozenBatchNorm2d normalizes with its fixed statistics."""
    if folding.is_frozen_batchnorm(bn):
        return BatchNormArgs(bn.weight, bn.bias, bn.running_mean, bn.running_var, False, 0.0, bn.eps)
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep = not bn.training or bn.track_running_stats  # running stats passed on (used or updated)
    return BatchNormArgs(bn.weight, bn.bias, bn.running_mean if keep else None, bn.running_var if keep else None,
                         batch_stats, factor, bn.eps)


def _is_torchvision_bottleneck(m):
    return type(m).__name__ == "Bottleneck" and type(m).__module__ == "torchvision.models.resnet"


def _is_timm_bottleneck(m):
    return type(m).__name__ == "Bottleneck" and type(m).__module__.startswith("timm.models")


def _is_identity_or_none(m):
    return m is None or type(m) is nn.Identity


def unsupported_reason(block):
    """None if `block` can become a FusedResNeXtBlock, else why not."""
    if _is_torchvision_bottleneck(block):
        pass
    elif _is_timm_bottleneck(block):
        for attr, what in (("se", "attention (attn_layer)"), ("aa", "anti-aliasing (aa_layer)"),
                           ("drop_block", "drop-block"), ("drop_path", "drop-path")):
            if not _is_identity_or_none(getattr(block, attr, None)):
                return f"it carries {what}"
        for attr in ("act1", "act2", "act3"):
            if type(getattr(block, attr, None)) is not nn.ReLU:
                return f"{attr} is {type(getattr(block, attr, None)).__name__}, not nn.ReLU"
    else:
        return "not a torchvision or timm Bottleneck"
    try:
        # training= keeps the probe from flipping the block's submodules' mode.
        FusedResNeXtBlock.from_modules(*(getattr(block, name) for name in _SUBMODULES), training=block.training)
    except ValueError as exc:
        return str(exc)
    return None
