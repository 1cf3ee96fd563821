"""The benchmark shapes, dtypes and the counts derived from a shape.

SHAPES is the one list of canonical shapes (docs/benchmarks.md): the
benchmarks, the CLI, the CUDA plan listing and the Triton compile check all
take it from here. block_flops and block_bytes_floor are the two numbers the
time floor is made of (docs/benchmarks.md).
"""

import dataclasses

import torch

from ..backends.triton.conv1x1_wgrad import gpu_splits, gpu_tiles
from ..backends.triton.packing import GroupTiling
from ..common.sizes import cdiv, conv_output_size


@dataclasses.dataclass(frozen=True)
class BlockShape:
    """One bottleneck block: input H=W, channels, grouped-conv width and groups, stride.

    The shortcut is a projection when stride != 1 or cin != cout, as in
    torchvision. Any such block is a valid kernel problem; the benchmarks
    also build it as a torchvision Bottleneck, which needs
    torchvision_mismatch() to be None.
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

    def torchvision_mismatch(self):
        """None if torchvision's Bottleneck(cin, planes, stride, ..., groups,
        base_width) builds exactly this block, else why not."""
        if self.cout % 4:
            return f"shape {self.name}: cout={self.cout} is not planes*4"
        if (self.group_width * 64) % self.planes:
            return (f"shape {self.name}: width {self.width} = {self.groups}x{self.group_width} is not "
                    f"int(planes*base_width/64)*groups for an integer base_width (planes={self.planes})")
        return None

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
        return conv_output_size(self.hw, self.stride)

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


# ResNeXt-50 32x4d stages at 224 (canonical batch 128), the
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
                shape = BlockShape(name, *map(int, parts))
                if shape.torchvision_mismatch():
                    raise ValueError(shape.torchvision_mismatch())
                shapes.append(shape)
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


def parse_compile_dtypes(text):
    """'none' -> [], 'all' -> every dtype, else a comma list of dtype names."""
    if text == "none":
        return []
    if text == "all":
        return list(DTYPES.values())
    return [parse_dtype(t.strip()) for t in text.split(",") if t.strip()]

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


def block_working_set_bytes(shape, batch, dtype, n_inputs):
    """Bytes one timed round touches at least: its n_inputs distinct inputs, the
    output and the folded weights (block_bytes_floor counts one input)."""
    x = batch * shape.cin * shape.hw * shape.hw * torch.empty((), dtype=dtype).element_size()
    return block_bytes_floor(shape, batch, dtype) + (n_inputs - 1) * x


# --------------------------------------------------------------------------
# correctness-only shapes: where a fused kernel runs in an emulation on CPU
# (the CUDA source compiled for the host, Triton's interpreter), one call of a
# canonical shape costs seconds to minutes, so it is checked small.

EMULATION_BATCH = 1
EMULATION_MAX_HW = 8
# Per shape, at EMULATION_BATCH: s3 at 8x8 is 0.144 GFLOP (~1 s in the CUDA
# emulation on this 2-core machine); s4 at 7x7 would be 0.44 GFLOP (~20 s), at 4x4 0.144.
EMULATION_MAX_FLOPS = 0.15e9


def emulation_shape(shape):
    """The block checked in an emulation: H=W the largest size <= EMULATION_MAX_HW
    (and <= the shape's own) whose FLOPs at EMULATION_BATCH stay within
    EMULATION_MAX_FLOPS (at least 1)."""
    hw = min(shape.hw, EMULATION_MAX_HW)
    while hw > 1 and block_flops(shape.with_max_hw(hw), EMULATION_BATCH) > EMULATION_MAX_FLOPS:
        hw -= 1
    return shape.with_max_hw(hw)


# --------------------------------------------------------------------------
# training: HBM bytes per step (forward + backward), derived, not measured


# One statistics row (fp64 mean and M2) per this many output pixels and
# channel, and one row of backward partial sums (fp64): the training kernels'
# pixel tile for 16-bit operands (backends/triton/_common.training_gemm_tiles,
# grouped_conv_bn_stats.block_p).
STATS_ROW_PIXELS = 128


def _training_maps(shape, batch):
    """Elements of the activation maps of one block at `batch`."""
    p_in, p_out = batch * shape.hw * shape.hw, batch * shape.out_hw * shape.out_hw
    return {
        "x": p_in * shape.cin, "y1": p_in * shape.width, "y2": p_out * shape.width, "y3": p_out * shape.cout,
        "xs": p_out * shape.cin,  # x at the strided pixels the projection reads
        "p_in": p_in, "p_out": p_out,
    }


def training_step_traffic(shape, batch):
    """The kernels of one training step (forward + backward) of a block and
    the activation-map elements each reads and writes, assuming each kernel
    reads its inputs once from DRAM (tiles that neighbouring programs
    re-read, like a 3x3 halo or a GEMM's A rows, hit L2).

    Returns {"fused": [(kernel, read, written)], "eager": [...]}: "fused" is
    this package's triton training path; "eager" is eager PyTorch's kernels
    (conv, a batch norm reading its input twice (statistics, then
    normalize), in-place ReLU, the residual add; in backward
    threshold_backward, a batch-norm backward reading its gradient and input
    twice (reduce, then elementwise), conv dgrad/wgrad, the accumulation of
    x's two gradients). Weights and per-channel vectors are counted by
    training_step_bytes.
    """
    m = _training_maps(shape, batch)
    x, y1, y2, y3, xs = m["x"], m["y1"], m["y2"], m["y3"], m["xs"]
    proj = shape.projection
    short = y3 if proj else x  # the tail's shortcut input: yd, or x
    fused = [
        ("conv1 + stats", x, y1), ("gconv + bn1-relu prologue + stats", y1, y2),
        ("conv3 + bn2-relu prologue + stats", y2, y3),
        *([("projection + stats", xs, y3)] if proj else []),
        ("bn3 + shortcut + relu", y3 + short, y3),
        ("tail backward: dz3, bn3 (bn_d) sums", 3 * y3 + (y3 if proj else 0), y3),
        ("conv3 dgrad + relu2 mask + bn2 sums", 2 * y3 + y2, y2), ("conv3 wgrad", 2 * y3 + y2, 0),
        *([("projection wgrad", 2 * y3 + xs, 0)] if proj else []),
        ("gconv dgrad + relu1 mask + bn1 sums", 2 * y2 + y1, y1), ("gconv wgrad", y1 + 2 * y2, 0),
        ("conv1 dgrad + shortcut", 2 * y1 + (2 * y3 if proj else x), x), ("conv1 wgrad", x + 2 * y1, 0),
    ]
    eager = [
        ("conv1", x, y1), ("bn1", 2 * y1, y1), ("relu1", y1, y1), ("conv2", y1, y2), ("bn2", 2 * y2, y2),
        ("relu2", y2, y2), ("conv3", y2, y3), ("bn3", 2 * y3, y3),
        *([("downsample conv", xs, y3), ("downsample bn", 2 * y3, y3)] if proj else []),
        ("add", y3 + short, y3), ("relu3", y3, y3),
        ("relu3 backward", 2 * y3, y3),
        ("bn3 backward", 4 * y3, y3), ("conv3 dgrad", y3, y2), ("conv3 wgrad", y3 + y2, 0),
        *([("downsample bn backward", 4 * y3, y3), ("downsample dgrad", y3, x), ("downsample wgrad", y3 + xs, 0)]
          if proj else []),
        ("relu2 backward", 2 * y2, y2), ("bn2 backward", 4 * y2, y2), ("conv2 dgrad", y2, y1),
        ("conv2 wgrad", y2 + y1, 0), ("relu1 backward", 2 * y1, y1), ("bn1 backward", 4 * y1, y1),
        ("conv1 dgrad", y1, x), ("conv1 wgrad", y1 + x, 0), ("x grad accumulation", 2 * x, x),
    ]
    return {"fused": fused, "eager": eager}


def _wgrad_output_bytes(n_splits, real, packed, e):
    """Bytes a fused wgrad writes and reads for its result: `real` weight
    elements, `packed` of them in the kernel's layout (the grouped conv's
    block-diagonal tiles). One pixel range: the result in the weights' dtype
    (packed, then the real entries copied out); several: fp32 partials
    written and read, their fp32 sum written and read, the result written."""
    if n_splits == 1:
        return packed * e + (2 * real * e if packed != real else 0)
    return 2 * n_splits * packed * 4 + 2 * packed * 4 + real * e


def _conv1x1_wgrad_bytes(pixels, n_ch, k, e, prec="tf32"):
    """_wgrad_output_bytes of a 1x1 conv's wgrad [n_ch, k] over `pixels`,
    split as conv1x1_wgrad splits it on a GPU."""
    _, bn, bk, _, _ = gpu_tiles(n_ch, k, e, prec)
    n_splits = gpu_splits(pixels, cdiv(n_ch, bn) * cdiv(k, bk), n_ch * k * 4, pixels * (k + 2 * n_ch) * e)
    return _wgrad_output_bytes(n_splits, n_ch * k, n_ch * k, e)


def training_step_bytes(shape, batch, dtype):
    """HBM bytes of one training step of a block, {"fused", "eager", "ratio"}.

    Activation maps in `dtype` (training_step_traffic); weights in `dtype`:
    both read each conv weight in forward and in dgrad; eager writes each
    gradient once, the fused wgrads write what _wgrad_output_bytes says (fp32
    partial sums where the pixel reduction is split); the fused path's fp64
    per-channel traffic: forward statistics rows (mean, M2) and backward
    partial sums (2 per norm, 3 for the tail with a projection), one row per
    STATS_ROW_PIXELS pixels, each written and read once. Eager's per-channel
    vectors (tens of KB) are left out.
    """
    e = torch.empty((), dtype=dtype).element_size()
    traffic = training_step_traffic(shape, batch)
    maps = {k: sum(r + w for _, r, w in v) * e for k, v in traffic.items()}
    m = _training_maps(shape, batch)
    p_in, p_out = m["p_in"], m["p_out"]
    w_conv1, w_conv3 = shape.width * shape.cin, shape.cout * shape.width
    w_conv2 = shape.width * shape.group_width * 9
    w_proj = shape.cout * shape.cin if shape.projection else 0
    weights = w_conv1 + w_conv2 + w_conv3 + w_proj
    t = GroupTiling(shape.width, shape.groups)
    packed = 9 * t.width_p * t.gt  # the grouped wgrad's [9, n_tiles, KCH, GT, GT]
    gconv_splits = gpu_splits(p_out, 9 * t.n_tiles * t.kch, packed * 4, 3 * p_out * shape.width * e)
    fused_wgrads = (_conv1x1_wgrad_bytes(p_in, shape.width, shape.cin, e)
                    + _conv1x1_wgrad_bytes(p_out, shape.cout, shape.width, e)
                    + _wgrad_output_bytes(gconv_splits, w_conv2, packed, e)
                    + (_conv1x1_wgrad_bytes(p_out, shape.cout, shape.cin, e) if shape.projection else 0))
    rows_in, rows_out = p_in / STATS_ROW_PIXELS, p_out / STATS_ROW_PIXELS
    # forward rows: bn1 (conv1 at p_in), bn2, bn3 (, bn_d) at p_out; backward
    # sums: bn3 (+ bn_d) from the tail, bn2 from conv3's dgrad, bn1 from the
    # grouped dgrad at p_in.
    stats = 2 * (rows_in * shape.width + rows_out * (shape.width + shape.cout * (2 if shape.projection else 1)))
    stats += (3 if shape.projection else 2) * rows_out * shape.cout + 2 * rows_out * shape.width
    stats += 2 * rows_in * shape.width
    fused = maps["fused"] + 2 * weights * e + fused_wgrads + 2 * stats * 8
    eager = maps["eager"] + 3 * weights * e
    return {"fused": fused, "eager": eager, "ratio": fused / eager}


def training_bytes_table(batch=128, dtype=torch.bfloat16):
    """Markdown table of training_step_bytes for every canonical shape (docs/training.md)."""
    return step_bytes_table(training_step_bytes, training_step_traffic, batch, dtype)


def step_bytes_table(step_bytes, step_traffic, batch, dtype):
    """Markdown table of a step's derived bytes for every canonical shape:
    step_bytes(shape, batch, dtype) -> {"fused", "eager", "ratio"} and
    step_traffic(shape, batch) -> {"fused"/"eager": [(name, read, write)]}."""
    lines = ["| shape | eager GB | fused GB | fused / eager | maps only (units of y2) |", "|---|---|---|---|---|"]
    for s in SHAPES.values():
        b = step_bytes(s, batch, dtype)
        traffic = step_traffic(s, batch)
        unit = _training_maps(s, batch)["y2"]
        units = {k: sum(r + w for _, r, w in v) / unit for k, v in traffic.items()}
        lines.append(f"| {s.name} | {b['eager'] / 1e9:.2f} | {b['fused'] / 1e9:.2f} | {b['ratio']:.3f} | "
                     f"{units['fused']:.0f} / {units['eager']:.0f} |")
    return "\n".join(lines)
