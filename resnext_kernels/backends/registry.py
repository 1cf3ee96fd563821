"""Backend registry and selection.

A backend is an implementation of the inference op
``resnext_kernels::bottleneck_inference`` (BN folded into the convs), one room
of this package each:

  reference      backends/reference.py: ATen composite ops; any device, any
                 floating dtype (float64 included). The CPU path and the
                 ground truth.
  triton         backends/triton/: Triton kernels. CUDA tensors;
                 CPU tensors only when TRITON_INTERPRET=1 was set before
                 triton was first imported (that is how CI tests them).
  cuda           backends/cuda/: the C++/CUDA extension (csrc/*.cu). CUDA
                 tensors.
  cuda_emulated  backends/cuda/ too, testing only: the same CUDA source
                 compiled for the CPU against an emulation header. CPU
                 tensors; slow.

The registry imports the rooms (lazily, when a kernel is first asked for);
no room imports the registry.

``auto`` runs the fastest usable fused backend for the input's device: with
more than one (cuda and triton on a GPU) the first call of each problem times
them and keeps the faster (``ops.inference.choose_auto_backend``; with autotuning off,
the first usable one in AUTO_ORDER). On CPU it is the reference.
An explicitly requested backend that cannot run raises BackendUnavailableError
naming the backend and the reason; there is no silent fallback.

Each backend kernel has the signature of ``reference.bottleneck_inference_reference``:
(x, w1, b1, w2, b2, w3, b3, wd, bd, stride, dilation, groups) -> y, where the
inputs were already validated by ``ops.inference.check_inputs``.

Training (the op ``resnext_kernels::bottleneck_training``: BatchNorm with
batch statistics, forward and backward) has kernels in TRAINING_BACKENDS
only: ``reference`` (ATen ops) and ``triton``. ``auto`` picks triton on CUDA
and the reference on CPU; an explicit ``cuda`` or ``cuda_emulated`` raises
BackendUnavailableError naming training as the reason (no silent ATen run).
``training_kernels(name)`` gives (forward, backward) with the signatures of
``reference.bottleneck_training_reference`` and
``reference.bottleneck_training_backward_reference``.

The inference op's backward (fine-tuning with frozen BatchNorm) is fused
for the forward backends in INFERENCE_BACKWARD: triton's and cuda's forwards
(and auto's choice among them on CUDA) run the Triton backward
(backends/triton/inference_backward.py) while triton is usable on the
device; the others (reference, cuda_emulated, auto on CPU) keep the op's
ATen backward, the reference (``inference_backward_backend``).
"""

import importlib

import torch

from ..common import extension, settings

BACKENDS = ("reference", "triton", "cuda", "cuda_emulated")
TESTING_BACKENDS = ("cuda_emulated",)
# Preference of "auto", per device type. The fused kernels come first on CUDA;
# on CPU the interpreter/emulation backends are for testing only and never
# chosen automatically.
AUTO_ORDER = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("reference",),
}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run on the given input."""


def supported_dtypes(backend):
    return settings.REFERENCE_DTYPES if backend == "reference" else settings.KERNEL_DTYPES


def _triton_reason(device_type):
    try:
        importlib.import_module("triton")
    except Exception as exc:
        return f"triton cannot be imported: {type(exc).__name__}: {exc}"
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        if settings.triton_interpreter_enabled():
            return "TRITON_INTERPRET=1 is set, kernels run in the interpreter (CPU tensors only)"
        return None
    if device_type == "cpu":
        if not settings.triton_interpreter_enabled():
            return "CPU tensors need TRITON_INTERPRET=1 (set before triton is imported)"
        return None
    return f"device type {device_type!r} is not supported"


def _cuda_reason(device_type):
    if extension.extension() is None:
        return extension.extension_error()
    if not extension.built_with_cuda():
        return "resnext_kernels._C was built without CUDA kernels (no nvcc or CPU-only torch at build time)"
    if device_type != "cuda":
        return f"needs CUDA tensors, got device type {device_type!r}"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"the CUDA kernel needs compute capability 8.0 or newer (bf16 WMMA, cp.async), device has {major}.{minor}"
    return None


def _cuda_emulated_reason(device_type):
    if device_type != "cpu":
        return f"testing backend for CPU tensors, got device type {device_type!r}"
    from .cuda import emulation

    return emulation.unavailable_reason()


def _reference_reason(device_type):
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


_REASONS = {
    "reference": _reference_reason,
    "triton": _triton_reason,
    "cuda": _cuda_reason,
    "cuda_emulated": _cuda_emulated_reason,
}


def check_backend_name(backend, argname="backend"):
    if not isinstance(backend, str):
        raise TypeError(f"{argname} must be a str, got {type(backend).__name__}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"{argname}={backend!r} is not one of {('auto',) + BACKENDS}")
    return backend


def unavailable_reason(backend, device):
    """None if `backend` can run on tensors of `device`, else the reason."""
    device = torch.device(device)
    return _REASONS[backend](device.type)


def auto_candidates(device):
    """The backends 'auto' chooses among on `device`: the usable fused kernels
    in AUTO_ORDER, else ("reference",). With several, ops.choose_auto_backend
    times them on the first call of each problem (autotune_enabled()); the
    first is the choice without timing."""
    device = torch.device(device)
    usable = [n for n in AUTO_ORDER.get(device.type, ()) if n != "reference" and unavailable_reason(n, device) is None]
    return tuple(usable) or ("reference",)


def resolve_backend(backend, device):
    """Map an explicit name to itself if it can run on `device` (else raise),
    and 'auto' to its untimed choice, auto_candidates(device)[0]."""
    check_backend_name(backend)
    device = torch.device(device)
    if backend == "auto":
        return auto_candidates(device)[0]
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise BackendUnavailableError(f"backend {backend!r} cannot run on {device.type} tensors: {reason}")
    return backend


TRAINING_BACKENDS = ("reference", "triton")
TRAINING_AUTO_ORDER = {"cuda": ("triton", "reference"), "cpu": ("reference",)}


def training_unavailable_reason(backend, device):
    """None if `backend` can run the training op on tensors of `device`, else the reason."""
    if backend not in TRAINING_BACKENDS:
        return (f"it has no training kernels (BatchNorm with batch statistics); training runs on "
                f"{' or '.join(repr(b) for b in TRAINING_BACKENDS)}")
    return unavailable_reason(backend, device)


def resolve_training_backend(backend, device):
    """The training backend for an explicit name (raises if it cannot run on
    `device`) or for 'auto' (the first usable in TRAINING_AUTO_ORDER)."""
    check_backend_name(backend)
    device = torch.device(device)
    if backend == "auto":
        for name in TRAINING_AUTO_ORDER.get(device.type, ("reference",)):
            if training_unavailable_reason(name, device) is None:
                return name
        return "reference"
    reason = training_unavailable_reason(backend, device)
    if reason is not None:
        raise BackendUnavailableError(f"backend {backend!r} cannot run training on {device.type} tensors: {reason}")
    return backend


def training_kernels(backend):
    """(forward, backward) callables of a training backend (imported lazily)."""
    if backend == "reference":
        from .reference import (
            bottleneck_training_backward_reference,
            bottleneck_training_reference,
        )

        return bottleneck_training_reference, bottleneck_training_backward_reference
    if backend == "triton":
        from .triton.training import (
            bottleneck_training_backward_triton,
            bottleneck_training_triton,
        )

        return bottleneck_training_triton, bottleneck_training_backward_triton
    raise ValueError(f"backend={backend!r} has no training kernels; those are {TRAINING_BACKENDS}")


# Forward backend -> the backend of its fused backward; every other
# forward (and these where triton is unusable) gets the ATen backward.
INFERENCE_BACKWARD = {"triton": "triton", "cuda": "triton"}
INFERENCE_BACKWARD_BACKENDS = ("triton",)  # backends with inference backward kernels


def inference_backward_backend(backend, device):
    """The backend whose kernels run the inference op's backward after a
    forward on `backend` (a name, or "auto": its untimed choice) for tensors
    on `device`: "triton" (fused), or "reference" (the op's ATen backward)."""
    device = torch.device(device)
    name = auto_candidates(device)[0] if backend == "auto" else backend
    fused = INFERENCE_BACKWARD.get(name)
    if fused is not None and unavailable_reason(fused, device) is None:
        return fused
    return "reference"


def inference_backward_kernel(backend):
    """The inference op's fused backward on `backend` (imported lazily); the
    signature of triton.inference_backward.bottleneck_inference_backward_triton."""
    if backend == "triton":
        from .triton.inference_backward import bottleneck_inference_backward_triton

        return bottleneck_inference_backward_triton
    raise ValueError(f"backend={backend!r} has no inference backward kernels; those are "
                     f"{INFERENCE_BACKWARD_BACKENDS}")


def kernel(backend):
    """The Python callable implementing `backend` (imported lazily)."""
    if backend == "reference":
        from .reference import bottleneck_inference_reference

        return bottleneck_inference_reference
    if backend == "triton":
        from .triton import bottleneck_inference_triton

        return bottleneck_inference_triton
    if backend == "cuda":
        from .cuda import bottleneck_inference_cuda

        return bottleneck_inference_cuda
    if backend == "cuda_emulated":
        from .cuda import bottleneck_inference_cuda_emulated

        return bottleneck_inference_cuda_emulated
    raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")


def available_backends():
    """Dict backend -> {"usable": {device_type: bool}, "reason": {...}, "testing": bool}.

    "reason" holds None where usable, else why not. Device types are "cpu"
    and "cuda".
    """
    info = {}
    for name in BACKENDS:
        reasons = {dev: unavailable_reason(name, dev) for dev in ("cpu", "cuda")}
        info[name] = {
            "usable": {dev: r is None for dev, r in reasons.items()},
            "reason": reasons,
            "testing": name in TESTING_BACKENDS or (name == "triton" and settings.triton_interpreter_enabled()),
        }
    return info
