"""The benchmark shapes, dtypes and the counts derived from a shape.

SHAPES is the one list of canonical shapes (docs/benchmarks.md): the
benchmarks, the CLI, the CUDA plan listing and the Triton compile check all
take it from here. block_flops and block_bytes_floor are the two numbers the
time floor is made of (docs/benchmarks.md).
"""

import dataclasses

import torch

from ..common.sizes import conv_output_size


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
