"""Benchmark helpers shared by the pytest-benchmark suite (benchmarks/) and
``python -m resnext_kernels bench``.

One place for: the benchmark shapes, FLOP and byte-floor counting, the
device ceilings (copy bandwidth, matmul rate), the implementations being
compared (fused backends and the eager / torch.compile baselines), timing with
rotating inputs, and the error check against a float64 reference. See
docs/benchmarks.md for what each number means.

Conventions:
  * A "case" is (shape, dtype, impl). impl is a fused backend ("reference",
    "triton", "cuda") or a baseline: "eager_nchw", "eager_cl" (torchvision
    Bottleneck, eval, NCHW / channels_last) or "compile" (torch.compile
    max-autotune of the eval block under no_grad with Inductor's freezing,
    channels_last input; mode BLOCK_COMPILE_MODE).
  * fp32 means real fp32: the bench turns TF32 off for cuDNN and cuBLAS
    (``backend_settings``), so eager fp32 is not silently TF32.
"""

import contextlib
import dataclasses
import math
import time
import zlib

import torch
from torch import nn

# --------------------------------------------------------------------------
# shapes


@dataclasses.dataclass(frozen=True)
class BlockShape:
    """One bottleneck block: input H=W, channels, grouped-conv width and groups, stride.

    The shortcut is a projection when stride != 1 or cin != cout, as in torchvision.
    """

    name: str
    hw: int
    cin: int
    width: int
    groups: int
    cout: int
    stride: int

    def __post_init__(self):
        for field in ("hw", "cin", "width", "groups", "cout", "stride"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"shape {self.name}: {field} must be a positive int, got {value!r}")
        if self.width % self.groups:
            raise ValueError(f"shape {self.name}: groups={self.groups} does not divide width={self.width}")
        if self.cout % 4:
            raise ValueError(f"shape {self.name}: cout={self.cout} is not planes*4")
        if (self.group_width * 64) % self.planes:
            raise ValueError(f"shape {self.name}: width {self.width} = {self.groups}x{self.group_width} is not "
                             f"int(planes*base_width/64)*groups for an integer base_width (planes={self.planes})")

    @property
    def planes(self):
        return self.cout // 4

    @property
    def group_width(self):
        return self.width // self.groups

    @property
    def base_width(self):
        return self.group_width * 64 // self.planes

    @property
    def projection(self):
        return self.stride != 1 or self.cin != self.cout

    @property
    def out_hw(self):
        return (self.hw - 1) // self.stride + 1

    def with_max_hw(self, max_hw):
        """The same block at spatial size min(hw, max_hw) (None: unchanged)."""
        if max_hw is None or self.hw <= max_hw:
            return self
        return dataclasses.replace(self, hw=max_hw)

    def spec(self):
        return f"{self.hw}:{self.cin}:{self.width}:{self.groups}:{self.cout}:{self.stride}"

    def describe(self):
        short = "proj" if self.projection else "id"
        return (f"{self.hw}x{self.hw} Cin {self.cin} width {self.width} ({self.groups}x{self.group_width}) "
                f"Cout {self.cout} s{self.stride} {short}")


# DESIGN.md sec 5: ResNeXt-50 32x4d stages at 224 (canonical batch 128), the
# ResNeXt-29 8x64d CIFAR stage 1, ResNeXt-101 32x8d stage 2 (d=16) and
# ResNeXt-101 64x4d stage 1 (64 groups of 4).
SHAPES = {
    s.name: s
    for s in (
        BlockShape("s1_first", 56, 64, 128, 32, 256, 1),
        BlockShape("s1", 56, 256, 128, 32, 256, 1),
        BlockShape("s2_first", 56, 256, 256, 32, 512, 2),
        BlockShape("s2", 28, 512, 256, 32, 512, 1),
        BlockShape("s3", 14, 1024, 512, 32, 1024, 1),
        BlockShape("s4", 7, 2048, 1024, 32, 2048, 1),
        BlockShape("cifar29_s1", 32, 256, 512, 8, 256, 1),
        BlockShape("x101_32x8d_s2", 28, 512, 512, 32, 512, 1),
        BlockShape("x101_64x4d_s1", 56, 256, 256, 64, 256, 1),
    )
}


def parse_shapes(items):
    """Shapes from names in SHAPES or custom specs NAME=H:CIN:WIDTH:GROUPS:COUT:STRIDE.

    `items` is a list of strings, each possibly comma-separated.
    """
    shapes = []
    for item in items:
        for token in filter(None, (t.strip() for t in item.split(","))):
            if "=" in token:
                name, spec = token.split("=", 1)
                parts = spec.split(":")
                if len(parts) != 6 or not all(p.isdigit() for p in parts):
                    raise ValueError(f"shape spec {token!r} is not NAME=H:CIN:WIDTH:GROUPS:COUT:STRIDE")
                shapes.append(BlockShape(name, *map(int, parts)))
            elif token in SHAPES:
                shapes.append(SHAPES[token])
            else:
                raise ValueError(f"unknown shape {token!r}; known: {', '.join(SHAPES)} "
                                 "(or NAME=H:CIN:WIDTH:GROUPS:COUT:STRIDE)")
    return shapes


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_dtype(name):
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    name = aliases.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)} (or bf16, fp16, fp32)")
    return DTYPES[name]


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------
# counting


def block_flops(shape, batch):
    """2 * multiply-accumulates of conv1, the grouped conv2, conv3 and the projection."""
    hw_in = shape.hw * shape.hw
    hw_out = shape.out_hw * shape.out_hw
    macs = hw_in * shape.cin * shape.width  # conv1 1x1
    macs += hw_out * shape.width * shape.group_width * 9  # conv2 3x3 grouped
    macs += hw_out * shape.width * shape.cout  # conv3 1x1
    if shape.projection:
        macs += hw_out * shape.cin * shape.cout  # downsample 1x1, strided
    return 2 * batch * macs


def block_parameter_count(shape):
    """Elements of the folded weights and biases (what a fused kernel must read once)."""
    n = shape.width * shape.cin + shape.width  # w1, b1
    n += shape.width * shape.group_width * 9 + shape.width  # w2, b2
    n += shape.cout * shape.width + shape.cout  # w3, b3
    if shape.projection:
        n += shape.cout * shape.cin + shape.cout  # wd, bd
    return n


def block_bytes_floor(shape, batch, dtype):
    """Bytes a perfect fused kernel moves: x read once, y written once, folded weights once."""
    elems = batch * shape.cin * shape.hw * shape.hw
    elems += batch * shape.cout * shape.out_hw * shape.out_hw
    elems += block_parameter_count(shape)
    return elems * torch.empty((), dtype=dtype).element_size()


# --------------------------------------------------------------------------
# device set-up and timing


def default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def backend_settings(device):
    """Settings every bench run uses: real fp32 (no TF32), cuDNN autotuning for eager on CUDA.

    Yields the settings as a dict (recorded with the results); restores the
    previous global flags on exit.
    """
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        yield {
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
        }
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = saved


def defaults(device, quick=False):
    """Default run settings for a device type (shared by the pytest suite and the CLI).

    CUDA: the canonical batch 128 at full resolution, all three dtypes, the
    torch.compile baseline in bfloat16 only (max-autotune compiles are slow).
    CPU: batch 2, H=W capped at 14, bfloat16 and float32 (fp16 convolutions
    on CPU have no fast kernel), no torch.compile baseline.
    quick: a smaller timing budget per case (and bfloat16 only on CUDA).
    """
    if device.type == "cuda":
        return {
            "batch": 128,
            "max_hw": None,
            "dtypes": [torch.bfloat16] if quick else [torch.bfloat16, torch.float16, torch.float32],
            "compile_dtypes": [] if quick else [torch.bfloat16],
            "seconds": 0.1 if quick else 0.3,
        }
    return {
        "batch": 2,
        "max_hw": 14,
        "dtypes": [torch.bfloat16, torch.float32],
        "compile_dtypes": [],
        "seconds": 0.05 if quick else 0.2,
    }


def parse_compile_dtypes(text):
    """'none' -> [], 'all' -> every dtype, else a comma list of dtype names."""
    if text == "none":
        return []
    if text == "all":
        return list(DTYPES.values())
    return [parse_dtype(t.strip()) for t in text.split(",") if t.strip()]


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def cache_bytes(device):
    """The last-level cache that rotating inputs must defeat: the GPU's L2; 32 MiB assumed on CPU."""
    if device.type == "cuda":
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        return size or 50 * 2**20
    return 32 * 2**20


def rotation_count(bytes_per_input, device, max_total_bytes=None):
    """How many distinct inputs to cycle so that together they exceed twice the cache.

    At least 1; at most what fits in max_total_bytes (default 2 GiB) and at
    most 256 on CUDA. On CPU at most 4: the CPU suite runs small shapes on a
    time budget, so there the rotation does not defeat the caches.
    """
    if max_total_bytes is None:
        max_total_bytes = 2 * 2**30
    wanted = max(2, math.ceil(2 * cache_bytes(device) / bytes_per_input))
    fits = max(1, max_total_bytes // bytes_per_input)
    return int(min(wanted, fits, 256 if device.type == "cuda" else 4))


class RotatingTarget:
    """Callable running fn on the next input of a cycle; synchronizes after each full cycle.

    Used with pytest-benchmark's pedantic(iterations=len(inputs)): a round is
    one pass over the inputs and ends synchronized, so the timer around the
    round sees finished GPU work, and the per-iteration time is per call.
    """

    def __init__(self, fn, inputs, device):
        self.fn, self.inputs, self.device = fn, inputs, device
        self.index = 0

    def __call__(self):
        out = self.fn(self.inputs[self.index])
        self.index = (self.index + 1) % len(self.inputs)
        if self.index == 0:
            synchronize(self.device)
        return out


def round_seconds(fn, inputs, device, rounds):
    """Seconds per call for each of `rounds` passes over inputs (CUDA events on cuda)."""
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(rounds)]
        for start, end in events:
            start.record()
            for x in inputs:
                fn(x)
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 / len(inputs) for start, end in events]
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for x in inputs:
            fn(x)
        times.append((time.perf_counter() - t0) / len(inputs))
    return times


def plan_rounds(seconds_per_round, budget_seconds, min_rounds=5, max_rounds=1000):
    """Rounds that fill about budget_seconds, within [min_rounds, max_rounds]."""
    if seconds_per_round <= 0:
        return max_rounds
    return int(min(max_rounds, max(min_rounds, int(budget_seconds / seconds_per_round))))


def time_per_call(fn, inputs, device, budget_seconds, warmup_rounds=2, min_rounds=5):
    """Per-call seconds of fn over rotating inputs: one sample per round, after warm-up.

    A calibration round sets the number of rounds to fill budget_seconds.
    """
    round_seconds(fn, inputs, device, warmup_rounds)
    calib = round_seconds(fn, inputs, device, 1)[0] * len(inputs)
    return round_seconds(fn, inputs, device, plan_rounds(calib, budget_seconds, min_rounds))


def median(values):
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else 0.5 * (s[mid - 1] + s[mid])


# --------------------------------------------------------------------------
# ceilings


def measure_copy_bandwidth(device, nbytes=None, budget_seconds=0.5):
    """Bytes/s of a large device-to-device copy, counting bytes read + written."""
    if nbytes is None:
        nbytes = 2**30 if device.type == "cuda" else 128 * 2**20
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = median(time_per_call(dst.copy_, [src], device, budget_seconds))
    return 2 * nbytes / t


def measure_matmul_rate(device, dtype, n=None, budget_seconds=0.5):
    """FLOP/s of an n x n x n matmul in dtype (TF32 off for fp32, see backend_settings)."""
    if n is None:
        if device.type == "cuda":
            n = 8192
        else:
            n = 512 if dtype == torch.float16 else 1024  # fp16 matmul on CPU is ~100x slower
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = median(time_per_call(lambda x: torch.mm(x, b), [a], device, budget_seconds, warmup_rounds=2, min_rounds=3))
    return 2 * n**3 / t


class Ceilings:
    """The device's copy bandwidth and matmul rate per dtype, each measured once.

    The copy is measured at construction, a dtype's matmul rate on first use.
    """

    def __init__(self, device):
        self.device = device
        self.copy_bytes_per_s = measure_copy_bandwidth(device)
        self._matmul = {}

    def matmul_flops_per_s(self, dtype):
        if dtype not in self._matmul:
            self._matmul[dtype] = measure_matmul_rate(self.device, dtype)
        return self._matmul[dtype]

    def floor_seconds(self, flops, nbytes, dtype):
        return max(flops / self.matmul_flops_per_s(dtype), nbytes / self.copy_bytes_per_s)

    def as_dict(self):
        return {
            "device": device_name(self.device),
            "copy_GBps": self.copy_bytes_per_s / 1e9,
            "matmul_TFLOPs": {dtype_name(d): r / 1e12 for d, r in self._matmul.items()},
        }


def performance(shape, batch, dtype, seconds, ceilings):
    """Derived numbers for one timed case (seconds per call)."""
    flops = block_flops(shape, batch)
    nbytes = block_bytes_floor(shape, batch, dtype)
    floor = ceilings.floor_seconds(flops, nbytes, dtype)
    return {
        "flops": flops,
        "bytes_floor": nbytes,
        "achieved_GBps": nbytes / seconds / 1e9,
        "achieved_TFLOPs": flops / seconds / 1e12,
        "floor_ms": floor * 1e3,
        "pct_of_floor": 100.0 * floor / seconds,
    }


# --------------------------------------------------------------------------
# blocks, implementations, error


FUSED_IMPLS = ("reference", "triton", "cuda")
BASELINE_IMPLS = ("eager_nchw", "eager_cl", "compile")
IMPLS = FUSED_IMPLS + BASELINE_IMPLS


def shape_seed(shape, run_seed):
    return (zlib.crc32(f"{shape.name}:{shape.spec()}".encode()) ^ run_seed) & 0x7FFFFFFF


def make_block(shape, seed):
    """A torchvision Bottleneck for `shape` (CPU, fp32, eval) with random weights and BN statistics.

    Random BN statistics and affine parameters make the BN folding non-trivial.
    """
    from torchvision.models.resnet import Bottleneck

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
    from . import backends

    if impl not in IMPLS:
        raise ValueError(f"impl {impl!r} is not one of {IMPLS}")
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    if impl in FUSED_IMPLS:
        if impl != "reference" and device.type != "cuda":
            return f"{impl} is only benchmarked on CUDA (on CPU it runs in an interpreter/emulation)"
        reason = backends.unavailable_reason(impl, device)
        if reason is not None:
            return f"backend {impl!r} unusable: {reason}"
        if dtype not in backends.supported_dtypes(impl):
            return f"backend {impl!r} does not support {dtype_name(dtype)}"
    if impl == "compile" and compile_dtypes is not None and dtype not in compile_dtypes:
        chosen = ", ".join(dtype_name(d) for d in compile_dtypes) or "none"
        return f"torch.compile baseline runs only for: {chosen} (compile time budget; see docs/benchmarks.md)"
    return None


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
    import copy

    from .module import FusedResNeXtBlock

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


def tolerance(eager_error, y_ref, dtype):
    """2x eager PyTorch's own error at dtype, plus one ulp of dtype at the output's largest magnitude."""
    return 2.0 * eager_error + torch.finfo(dtype).eps * y_ref.abs().max().item()


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
        self.tolerance = tolerance(self.eager_error, self.y_ref, dtype)

    def block_at(self, dtype, device=None):
        """A copy of the eager block (NCHW) in dtype on device (default: the case's)."""
        import copy

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
    import copy

    from .convert import convert

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
