"""What is benchmarked: the implementations compared, their blocks and
inputs, the float64 reference and the error check, and the whole model.

A "case" is (shape, dtype, impl). impl is a fused backend ("reference",
"triton", "cuda") or a baseline: "eager_nchw", "eager_cl" (torchvision
Bottleneck, eval, NCHW / channels_last) or "compile" (torch.compile
max-autotune of the eval block under no_grad with Inductor's freezing,
channels_last input; mode BLOCK_COMPILE_MODE). See docs/benchmarks.md for
what each number means.
"""

import copy
import time
import zlib

import torch
from torch import nn

from ..backends import registry
from ..block import FusedResNeXtBlock
from ..common.timing import synchronize
from ..common.tolerance import error_bound
from ..convert import convert
from .measure import rotation_count
from .shapes import dtype_name

FUSED_IMPLS = ("reference", "triton", "cuda")
BASELINE_IMPLS = ("eager_nchw", "eager_cl", "compile")
IMPLS = FUSED_IMPLS + BASELINE_IMPLS
# The fused kernels as they run on CPU: the CUDA source compiled for the host
# (cuda_emulated) and the Triton kernels in Triton's interpreter. Checked
# against the float64 reference on small shapes (shapes.emulation_shape), never
# timed: an emulation's speed says nothing about the kernel's.
EMULATED_BACKENDS = ("cuda_emulated", "triton")


def shape_seed(shape, run_seed):
    return (zlib.crc32(f"{shape.name}:{shape.spec()}".encode()) ^ run_seed) & 0x7FFFFFFF


def make_block(shape, seed):
    """A torchvision Bottleneck for `shape` (CPU, fp32, eval) with random weights and BN statistics.

    Random BN statistics and affine parameters make the BN folding non-trivial.
    """
    from torchvision.models.resnet import Bottleneck

    if shape.torchvision_mismatch():
        raise ValueError(shape.torchvision_mismatch())
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # conv init uses the global generator
    downsample = None
    if shape.projection:
        downsample = nn.Sequential(nn.Conv2d(shape.cin, shape.cout, 1, stride=shape.stride, bias=False),
                                   nn.BatchNorm2d(shape.cout))
    block = Bottleneck(shape.cin, shape.planes, shape.stride, downsample, shape.groups, shape.base_width)
    randomize_batchnorm(block, gen)
    return block.eval()


def randomize_batchnorm(module, gen):
    """Random affine parameters and running statistics for every BatchNorm2d (default init folds to ~identity)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)


def impl_unavailable_reason(impl, device, dtype, compile_dtypes=None):
    """None if impl can be benchmarked on device in dtype, else why not.

    compile_dtypes: dtypes for which the compile baseline runs (None: all).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl {impl!r} is not one of {IMPLS}")
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    if impl in FUSED_IMPLS:
        if impl != "reference" and device.type != "cuda":
            return f"{impl} is only benchmarked on CUDA (on CPU it runs in an interpreter/emulation)"
        reason = registry.unavailable_reason(impl, device)
        if reason is not None:
            return f"backend {impl!r} unusable: {reason}"
        if dtype not in registry.supported_dtypes(impl):
            return f"backend {impl!r} does not support {dtype_name(dtype)}"
    if impl == "compile" and compile_dtypes is not None and dtype not in compile_dtypes:
        chosen = ", ".join(dtype_name(d) for d in compile_dtypes) or "none"
        return f"torch.compile baseline runs only for: {chosen} (compile time budget; see docs/benchmarks.md)"
    return None


def emulated_unavailable_reason(backend, dtype):
    """None if `backend` (one of EMULATED_BACKENDS) can be checked on CPU in dtype, else why not."""
    if backend not in EMULATED_BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {EMULATED_BACKENDS}")
    reason = registry.unavailable_reason(backend, "cpu")
    if reason is not None:
        return reason
    if dtype not in registry.supported_dtypes(backend):
        return f"it does not support {dtype_name(dtype)}"
    if backend == "triton" and dtype == torch.bfloat16:
        # seen with triton 3.8 (tests/triton_cases.py keeps bf16 a GPU-only test for the same reason)
        return "tl.dot on bfloat16 gives wrong results in Triton's interpreter; bfloat16 is checked on a GPU only"
    return None


def prepare_emulated(backend):
    """Load what an emulated backend needs before its first call: the CUDA
    emulation library (built on first use, a minute or more), so that this
    one-time cost is not part of a check's time budget."""
    if backend == "cuda_emulated":
        from ..backends.cuda import emulation

        emulation.load()


def input_layout(impl):
    return torch.contiguous_format if impl == "eager_nchw" else torch.channels_last


def _no_grad(fn):
    def run(x):
        with torch.no_grad():
            return fn(x)

    return run


# torch.compile modes of the baselines. The block uses max-autotune without CUDA
# graphs: CUDA-graph trees copy every new input tensor into the graph's static
# input buffer, one extra read + write of x per call (as large as the whole
# bytes floor of the block), while the launch overhead the graph saves is a few
# microseconds. For the whole model the copied input is the small image batch,
# so the model uses plain max-autotune (with CUDA graphs).
BLOCK_COMPILE_MODE = "max-autotune-no-cudagraphs"
MODEL_COMPILE_MODE = "max-autotune"


def compile_frozen(module, device, example_input, mode):
    """torch.compile(module, mode) of an eval module, frozen: Inductor freezing, under no_grad.

    Compiles by running example_input once; returns (fn, seconds the compile took).
    Every call runs with freezing on, so a recompile would also be frozen.
    Dynamo is reset first: every benchmarked block shares Bottleneck.forward, and
    past the recompile limit (8) Dynamo would silently run the 9th shape eagerly.
    """
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    compiled = torch.compile(module, mode=mode, dynamic=False)

    def fn(x):
        with torch.no_grad(), inductor_config.patch(freezing=True):
            return compiled(x)

    t0 = time.perf_counter()
    fn(example_input)
    synchronize(device)
    return fn, time.perf_counter() - t0


def _runnable(module, impl, device, example_input, compile_mode):
    """(fn, info) for a prepared eval module: compile_frozen in compile_mode
    for impl "compile" (info records the compile time), else the module under
    no_grad; either way run once on example_input (compiling there)."""
    if impl == "compile":
        fn, seconds = compile_frozen(module, device, example_input, compile_mode)
        return fn, {"compile_s": seconds, "compile_mode": compile_mode}
    fn = _no_grad(module)
    fn(example_input)
    return fn, {}


def build_impl(impl, block, device, dtype, example_input):
    """A callable x -> y running `impl` for the (CPU, fp32, eval) torchvision `block`.

    example_input (on device, dtype, in input_layout(impl)) is run once, so
    torch.compile compiles here and not inside the timed warm-up.
    Returns (fn, info) where info records the compile time of "compile".
    """
    if impl in FUSED_IMPLS:
        module = FusedResNeXtBlock.from_bottleneck(block, backend=impl)
    else:
        module = copy.deepcopy(block)
    module = module.eval().to(device=device, dtype=dtype)
    if impl in ("eager_cl", "compile"):  # fused blocks take channels_last x whatever their weights' layout
        module = module.to(memory_format=torch.channels_last)
    return _runnable(module, impl, device, example_input, BLOCK_COMPILE_MODE)


def make_inputs(shape, batch, dtype, device, seed, count):
    """`count` distinct random NCHW inputs (standard normal; never zeros)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(batch, shape.cin, shape.hw, shape.hw, generator=gen, device=device, dtype=dtype)
            for _ in range(count)]


def max_abs_error(y, y_ref):
    return (y.detach().to("cpu", torch.float64) - y_ref).abs().max().item()


ERROR_BATCH = 2  # images of the batch compared against the float64 reference


class Case:
    """One (shape, dtype) on a device: block, rotating inputs, float64 reference, eager error.

    The reference is the block in float64 on CPU applied to the first
    ERROR_BATCH images of the first input; every implementation is run on the
    whole first input and its output's first ERROR_BATCH images compared.
    """

    def __init__(self, shape, batch, dtype, device, run_seed=0, n_inputs=None):
        self.shape, self.batch, self.dtype, self.device = shape, batch, dtype, device
        seed = shape_seed(shape, run_seed)
        self.block = make_block(shape, seed)
        x_bytes = batch * shape.cin * shape.hw * shape.hw * torch.empty((), dtype=dtype).element_size()
        self.n_inputs = n_inputs or rotation_count(x_bytes, device)
        self.inputs = make_inputs(shape, batch, dtype, device, seed, self.n_inputs)
        self._inputs_cl = None
        k = min(ERROR_BATCH, batch)
        x64 = self.inputs[0][:k].to("cpu", torch.float64)
        with torch.no_grad():
            self.y_ref = self.block_at(torch.float64, "cpu")(x64)
            eager = self.block_at(dtype)
            self.eager_error = max_abs_error(eager(self.inputs[0])[:k], self.y_ref)
        self.tolerance = error_bound(self.eager_error, self.y_ref.abs().max().item())

    def block_at(self, dtype, device=None):
        """A copy of the eager block (NCHW) in dtype on device (default: the case's)."""
        return copy.deepcopy(self.block).to(device=device or self.device, dtype=dtype)

    def inputs_for(self, impl):
        if input_layout(impl) == torch.contiguous_format:
            return self.inputs
        if self._inputs_cl is None:
            self._inputs_cl = [x.contiguous(memory_format=torch.channels_last) for x in self.inputs]
        return self._inputs_cl

    def build(self, impl):
        """(fn, info, error) for impl; error is the max abs error vs the float64 reference."""
        x0 = self.inputs_for(impl)[0]
        fn, info = build_impl(impl, self.block, self.device, self.dtype, x0)
        error = max_abs_error(fn(x0)[: self.y_ref.shape[0]], self.y_ref)
        return fn, info, error

    def emulated_error(self, backend):
        """Max abs error vs the float64 reference of one call of an emulated
        backend (EMULATED_BACKENDS) on the first input: one call only, as nothing is timed."""
        module = FusedResNeXtBlock.from_bottleneck(self.block, backend=backend)
        module = module.eval().to(device=self.device, dtype=self.dtype)
        with torch.no_grad():
            y = module(self.inputs_for(backend)[0])
        return max_abs_error(y[: self.y_ref.shape[0]], self.y_ref)

    def error_info(self, error):
        return {
            "max_abs_err": error,
            "eager_err": self.eager_error,
            "tolerance": self.tolerance,
            "ref_max_abs": self.y_ref.abs().max().item(),
            "within_tolerance": error <= self.tolerance,
        }


# --------------------------------------------------------------------------
# whole model

MODEL_IMPLS = ("eager", "compile") + tuple(f"fused_{b}" for b in FUSED_IMPLS)


def model_defaults(device):
    """Batches and input resolution of the whole-model benchmark (bfloat16, channels_last).

    CUDA: batch 64 and 128 at 224x224. CPU: batch 1 at 64x64 (a smoke run on
    the CPU suite's time budget, not a representative number).
    """
    if device.type == "cuda":
        return {"batches": [64, 128], "resolution": 224}
    return {"batches": [1], "resolution": 64}


def model_impl_unavailable_reason(impl, device, dtype, compile_dtypes=None):
    if impl not in MODEL_IMPLS:
        raise ValueError(f"model impl {impl!r} is not one of {MODEL_IMPLS}")
    if impl.startswith("fused_"):
        return impl_unavailable_reason(impl[len("fused_"):], device, dtype, compile_dtypes)
    return impl_unavailable_reason("eager_cl" if impl == "eager" else impl, device, dtype, compile_dtypes)


def make_model(seed):
    """torchvision resnext50_32x4d with random weights and BN statistics (seeded), CPU fp32, eval."""
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnext50_32x4d()
    randomize_batchnorm(model, torch.Generator().manual_seed(seed))
    return model.eval()


def build_model_impl(impl, model, device, dtype, example_input):
    """(fn, info) for the whole model: eager, compile, or fused_<backend> (resnext_kernels.convert).

    All run channels_last in dtype on device under no_grad; the model is copied.
    """
    module = copy.deepcopy(model)
    if impl.startswith("fused_"):
        convert(module, backend=impl[len("fused_"):])
    module = module.eval().to(device=device, dtype=dtype, memory_format=torch.channels_last)
    return _runnable(module, impl, device, example_input, MODEL_COMPILE_MODE)


def peak_memory(fn, x, device):
    """(bytes allocated before one call of fn(x), peak bytes allocated during it); CUDA only."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn(x)
    synchronize(device)
    return before, torch.cuda.max_memory_allocated(device)
