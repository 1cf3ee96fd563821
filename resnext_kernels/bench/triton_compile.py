"""Ahead-of-time compile check of the kernels for sm_90a, no GPU needed.

For a block shape, dtype and TF32 setting this builds the kernel arguments
exactly as the launchers do (on meta tensors), asks the autotune prune
callbacks which configs a GPU would benchmark, compiles each of them with
Triton for an sm_90 target and runs the bundled ptxas on the PTX to read
registers and spill stores. Used by the Triton tests and by hand:

    TRITON_INTERPRET=0 python -m resnext_kernels.bench.triton_compile
    TRITON_INTERPRET=0 python -m resnext_kernels.bench.triton_compile --training s1 s2_first

It must run with the Triton interpreter off (the kernels are then real
JITFunctions). It relies on triton.compile / ASTSource / GPUTarget as found
in triton 3.6..3.8.

--warm-cache fills Triton's on-disk kernel cache (TRITON_CACHE_DIR) with
what a GPU run of these shapes looks up: every config the autotuner would
compile for the inference kernels (the heuristic one included) and, with
--training-shapes, the training kernels of one step, compiled through
Triton's own runtime (JITFunction.warmup, with a stand-in driver that names
an sm_90 target), so the cache keys are the ones the runtime computes
there. A key is sha256 of: the triton version and the hash of its compiler,
backend and language sources and libtriton; the kernel's source and
specialization (signature, constexprs, 16-divisibility of ints and pointer
alignment); `ptxas --version` of the ptxas Triton uses (its bundled one
unless TRITON_PTXAS_PATH says otherwise) and the target arch; the compile
options; the cache-invalidating environment variables that are set. No
driver version and no path enters it, but the cache's index files
(__grp__*.json) hold absolute paths: --relocate-cache DIR rewrites them to
where DIR is now (after a copy to another machine), listing only the files
still there (the carry keeps only .cubin and .json). Triton's launcher stubs
(C, built with gcc on first launch and linked against libcuda) cannot be
built without a driver and stay device time. scripts/gpu_check_prepare.sh
uses both; the GPU check counts the kernels each stage still compiled.
"""

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.compiler import ASTSource
from triton.runtime.driver import driver

from ..backends.triton import conv1x1_bias_relu as k1
from ..backends.triton import grouped_conv_bias_relu as k2a
from ..backends.triton import grouped_conv_conv3 as k2
from ..backends.triton import packing, training
from ..backends.triton._common import (
    MAX_SHARED,
    interpreting,
    nhwc_view,
    pixel_rows,
    recording_launches,
)
from ..common.batch_stats import BatchNormArgs
from ..common.sizes import conv_output_size
from . import shapes as canonical
from .shapes import BlockShape

SM90_MAX_SHARED = MAX_SHARED  # 227 KB, H100/H200

# The canonical shapes (batch 128), a d=128 block (a group spans two
# 64-channel tiles) and channel counts that are not multiples of 16
# (unaligned rows) with d = 14.
SHAPES = {
    **canonical.SHAPES,
    "d128": BlockShape("d128", 14, 1024, 2048, 16, 1024, 1),
    "odd_d14": BlockShape("odd_d14", 15, 200, 280, 20, 328, 2),
}

_PTR_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.float64: "*fp64"}


def _ptxas():
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return knobs.nvidia.ptxas.path
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _nvdisasm():
    """Triton's bundled nvdisasm (next to its ptxas), or None."""
    path = os.path.join(os.path.dirname(_ptxas()), "nvdisasm")
    return path if os.path.exists(path) else None


# One PTX instruction per line: an opcode after optional whitespace and
# predicate, ending in ';' (directives start with '.', labels end with ':').
_PTX_INSTRUCTION = re.compile(r"^\s*(@!?%\w+\s+)?[a-z][\w.]*(\s[^;]*)?;", re.MULTILINE)
# SASS from nvdisasm: "/*0010*/   @!P0 IMAD.MOV.U32 R1, RZ, RZ, c[0x0][0x28] ;" (an
# optional predicate, then an upper-case opcode: not the ".byte" lines of the
# .debug_* sections, which follow the source line info, not the code).
_SASS_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?[A-Z]", re.MULTILINE)


def _static_instructions(compiled, cubin):
    """Static instruction counts of one compiled kernel: TTGIR operations,
    PTX instructions and SASS instructions (None without nvdisasm). Static,
    not executed: they show what a code change adds, not its run time."""
    ttgir = sum(1 for line in compiled.asm["ttgir"].splitlines() if re.match(r"\s*(%\S+ = )?\"?[a-z_]+\.", line))
    sass = None
    if _nvdisasm() is not None:
        text = subprocess.run([_nvdisasm(), cubin], capture_output=True, text=True, check=True).stdout
        sass = len(_SASS_INSTRUCTION.findall(text))
    return {"ttgir_ops": ttgir, "ptx_instructions": len(_PTX_INSTRUCTION.findall(compiled.asm["ptx"])),
            "sass_instructions": sass}


def _source(fn, args, consts):
    """ASTSource with the runtime's specialisation: 16-byte aligned pointers,
    ints equal to 1 folded as constants, multiples of 16 marked divisible."""
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, a) in enumerate(zip(fn.arg_names, args)):
        if isinstance(a, torch.Tensor):
            signature[name] = _PTR_TYPES[a.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(a, float):
            signature[name] = "fp32"
        elif a == 1:
            signature[name] = "constexpr"
            constexprs[(i,)] = 1
        else:
            signature[name] = "i32" if abs(a) < 2**31 else "i64"
            if a % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    for name, value in consts.items():
        signature[name] = "constexpr"
        constexprs[(fn.arg_names.index(name),)] = value
    return ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)


def _compile(fn, args, consts, config):
    src = _source(fn, args, {**consts, **config.kwargs})
    start = time.time()
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    seconds = time.time() - start
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        cubin = os.path.join(tmp, "k.cubin")
        log = subprocess.run([_ptxas(), "-v", "--gpu-name=sm_90a", ptx, "-o", cubin],
                             capture_output=True, text=True, check=True).stderr
        counts = _static_instructions(compiled, cubin)
    return {
        "config": {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages},
        "registers": int(re.search(r"Used (\d+) registers", log).group(1)),
        "spill_stores": int(re.search(r"(\d+) bytes spill stores", log).group(1)),
        "shared": compiled.metadata.shared,
        "tensor_cores": "wgmma" in compiled.asm["ptx"] or "mma.sync" in compiled.asm["ptx"],
        "compile_s": round(seconds, 2),
        **counts,
    }


def kernel_launches(shape, dtype=torch.bfloat16, allow_tf32=True, batch=128, nchw=False):
    """(tiling, {kernel name: (kernel, module, args, constexpr kwargs)}) as
    the launchers build them for `shape` (a SHAPES value), on meta tensors:
    K1 and K2 (fused) and, for identity blocks, K2a and K2b (split; K2b is
    K1's kernel with RESIDUAL, so its module is K1's). nchw: y NCHW-contiguous,
    as for an NCHW x (then only K1 and K2: the split path needs a channels_last
    y); else channels_last."""
    cin, width, cout, groups, h = shape.cin, shape.width, shape.cout, shape.groups, shape.hw
    stride, proj = shape.stride, shape.projection
    ho = conv_output_size(h, stride)

    def meta(*shape):
        return torch.empty(*shape, device="meta", dtype=dtype)

    tiling, packed = packing.pack_weights(
        meta(width, cin, 1, 1), meta(width), meta(width, width // groups, 3, 3), meta(width),
        meta(cout, width, 1, 1), meta(cout), meta(cout, cin, 1, 1) if proj else None, meta(cout) if proj else None,
        groups)
    x = meta(batch, cin, h, h).contiguous(memory_format=torch.channels_last)
    t1 = meta(batch * h * h, tiling.width_p)
    y = meta(batch, cout, ho, ho).contiguous(memory_format=torch.contiguous_format if nchw else torch.channels_last)
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32
    try:
        launches = {
            "K1": (k1._conv1x1_bias_relu_kernel, k1,
                   *k1._kernel_args(x, packed["w1p"], packed["b1p"], t1, tiling=tiling)),
            "K2": (k2._grouped_conv_conv3_kernel, k2, *k2._kernel_args(t1, x, tiling, packed, y, stride, 1)),
        }
        if not proj and not nchw:  # the split path needs a channels_last y
            t2 = nhwc_view(meta(batch * ho * ho, tiling.width_p), batch, ho, ho)
            launches["K2a"] = (k2a._grouped_conv_bias_relu_kernel, k2a,
                               *k2a._kernel_args(nhwc_view(t1, batch, h, h), tiling, packed, t2, stride, 1))
            launches["K2b"] = (k1._conv1x1_bias_relu_kernel, k1,
                               *k1._kernel_args(t2, packed["w3p"], packed["b3p"], pixel_rows(y), pixel_rows(x)))
    finally:
        torch.backends.cudnn.allow_tf32 = saved
    return tiling, launches


def training_launches(shape, dtype=torch.bfloat16, allow_tf32=True, batch=128):
    """The kernel launches of one training step (forward and backward) of
    `shape` as the triton training path issues them on a GPU, built on meta
    tensors: {name: (kernel, args, consts, num_warps, num_stages)}, one entry
    per distinct kernel and constexpr set (the per-channel kernels run once
    per norm)."""
    cin, width, cout, groups, h = shape.cin, shape.width, shape.cout, shape.groups, shape.hw
    proj, stride = shape.projection, shape.stride

    def meta(*size, dt=dtype):
        return torch.empty(*size, device="meta", dtype=dt)

    x = meta(batch, cin, h, h).contiguous(memory_format=torch.channels_last)
    w1, w2, w3 = meta(width, cin, 1, 1), meta(width, width // groups, 3, 3), meta(cout, width, 1, 1)
    wd = meta(cout, cin, 1, 1) if proj else None
    norms = [BatchNormArgs(*(meta(c, dt=torch.float32) for _ in range(4)), True, 0.1, 1e-5)
             for c in (width, width, cout) + ((cout,) if proj else ())]
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32
    try:
        with recording_launches() as launches:
            out, y1, y2, y3, yd, bn_stats, _ = training.bottleneck_training_triton(x, w1, w2, w3, wd, norms, stride,
                                                                                   1, groups)
            training.bottleneck_training_backward_triton(
                torch.empty_like(out), x, w1, w2, w3, wd, out, y1, y2, y3, yd, bn_stats, [n[:2] for n in norms],
                [True] * len(norms), stride, 1, groups, True)
    finally:
        torch.backends.cudnn.allow_tf32 = saved
    found, names = {}, {}
    for kernel, args, consts, warps, stages in launches:
        name = kernel.fn.__name__.strip("_").removesuffix("_kernel")
        key = (name, tuple(sorted(consts.items())), warps, stages)
        if key not in found:
            names[name] = names.get(name, 0) + 1
            found[key] = (f"{name}#{names[name]}" if names[name] > 1 else name, (kernel, args, consts, warps, stages))
    return dict(found.values())


def check_training_shape(name, dtype=torch.bfloat16, allow_tf32=True, batch=128):
    """Compile every distinct training kernel launch of one step of this
    shape with its (fixed) config; list of result dicts."""
    if interpreting():
        raise RuntimeError("triton_compile needs TRITON_INTERPRET unset or 0 (it compiles real kernels)")
    results = []
    for kname, (fn, args, consts, warps, stages) in training_launches(SHAPES[name], dtype, allow_tf32,
                                                                       batch).items():
        res = _compile(fn, args, consts, triton.Config({}, num_warps=warps, num_stages=stages))
        res.update(kernel=kname, shape=name, dtype=str(dtype).replace("torch.", ""), prec=consts.get("PREC", "-"))
        results.append(res)
    return results


def check_shape(name, dtype=torch.bfloat16, allow_tf32=True, batch=128, nchw=False):
    """Compile every config the prune callbacks keep for this shape, for
    every kernel launched on it (with nchw only K2, the one that writes y);
    list of result dicts."""
    if interpreting():
        raise RuntimeError("triton_compile needs TRITON_INTERPRET unset or 0 (it compiles real kernels)")
    _, launches = kernel_launches(SHAPES[name], dtype, allow_tf32, batch, nchw)
    results = []
    for kname, (fn, mod, args, consts) in launches.items():
        if nchw and kname != "K2":
            continue
        for config in mod._prune(mod._gpu_configs(), dict(zip(fn.arg_names, args)), **consts):
            res = _compile(fn, args, consts, config)
            res.update(kernel=kname, shape=name, dtype=str(dtype).replace("torch.", ""), prec=consts["PREC"],
                       y_format="nchw" if nchw else "channels_last")
            results.append(res)
    return results


class _SM90Driver(DriverBase):
    """Stands in for Triton's CUDA driver where there is no GPU: it names an
    sm_90 target (H100/H200) and device 0, enough for JITFunction.warmup to
    compile; it launches nothing."""

    @classmethod
    def is_active(cls):
        return True

    def map_python_to_cpp_type(self, ty):
        raise NotImplementedError("compile only")

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cuda", 0)

    def get_benchmarker(self):
        raise NotImplementedError("compile only")

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


@contextlib.contextmanager
def _sm90_runtime():
    if interpreting():
        raise RuntimeError("--warm-cache needs TRITON_INTERPRET unset or 0 (it compiles real kernels)")
    saved = driver._active  # None unless set: reset_active() would create the default driver, which needs a GPU
    driver.set_active(_SM90Driver())
    try:
        yield
    finally:
        driver.set_active(saved)


def _warm(fn, args, kwargs):
    start = time.time()
    fn.warmup(*args, grid=(1,), **kwargs)
    return round(time.time() - start, 2)


def warm_cache(shapes, training_shapes=(), dtype=torch.bfloat16, allow_tf32=True):
    """Compile, into Triton's on-disk cache, what a GPU run of `shapes`
    (inference: every config the autotuner keeps, so both the heuristic
    launch and autotuning hit) and `training_shapes` (one training step)
    would compile; list of {kernel, shape, seconds} (seconds ~0: already cached)."""
    results = []
    with _sm90_runtime():
        for name in shapes:
            _, launches = kernel_launches(SHAPES[name], dtype, allow_tf32)
            for kname, (fn, mod, args, consts) in launches.items():
                for config in mod._prune(mod._gpu_configs(), dict(zip(fn.arg_names, args)), **consts):
                    seconds = _warm(fn, args, {**consts, **config.all_kwargs()})
                    results.append({"kernel": kname, "shape": name, "config": str(config), "seconds": seconds})
        for name in training_shapes:
            for kname, (fn, args, consts, warps, stages) in training_launches(SHAPES[name], dtype, allow_tf32).items():
                seconds = _warm(fn, args, {**consts, "num_warps": warps, "num_stages": stages})
                results.append({"kernel": kname, "shape": name, "config": f"{warps} warps {stages} stages",
                                "seconds": seconds})
    return results


def relocate_cache(root):
    """Point every index file (__grp__*.json) of the Triton cache at `root`
    to the files that are in its own directory now; returns the number of
    kernels indexed."""
    count = 0
    for grp in Path(root).glob("*/__grp__*"):
        data = json.loads(grp.read_text())
        paths = {name: str(grp.parent / Path(path).name) for name, path in data.get("child_paths", {}).items()}
        grp.write_text(json.dumps({"child_paths": {n: p for n, p in paths.items() if os.path.exists(p)}}))
        count += 1
    return count


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shapes", nargs="*", help=f"some of {list(SHAPES)} (default: all)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--no-tf32", action="store_true", help="fp32 with allow_tf32=False (ieee dots)")
    parser.add_argument("--nchw", action="store_true", help="y NCHW-contiguous (an NCHW x): K2 only")
    parser.add_argument("--json", action="store_true", help="one JSON list on stdout")
    parser.add_argument("--training", action="store_true",
                        help="the training kernels (one forward + backward step) instead of the inference ones")
    parser.add_argument("--warm-cache", action="store_true",
                        help="compile the shapes' inference kernels (every kept config) into TRITON_CACHE_DIR "
                             "through Triton's runtime, as a GPU run would look them up")
    parser.add_argument("--training-shapes", nargs="*", default=[], metavar="SHAPE",
                        help="with --warm-cache: also one training step of these shapes")
    parser.add_argument("--relocate-cache", metavar="DIR", default=None,
                        help="rewrite the index files of the Triton cache DIR to its current place, then exit")
    opts = parser.parse_args(argv)
    if opts.relocate_cache is not None:
        print(f"{relocate_cache(opts.relocate_cache)} kernels indexed in {opts.relocate_cache}")
        return 0
    unknown = (set(opts.shapes) | set(opts.training_shapes)) - set(SHAPES)
    if unknown:
        parser.error(f"unknown shapes {sorted(unknown)}; choose from {list(SHAPES)}")
    if opts.warm_cache:
        start = time.time()
        results = warm_cache(opts.shapes, opts.training_shapes, getattr(torch, opts.dtype), not opts.no_tf32)
        if opts.json:
            json.dump(results, sys.stdout)
        else:
            for r in results:
                print(f"{r['shape']:11s} {r['kernel']:24s} {r['config']:60s} {r['seconds']:.2f}s", flush=True)
            print(f"{len(results)} launches warmed in {time.time() - start:.0f} s")
        return 0
    results = []
    for name in opts.shapes or list(SHAPES):
        if opts.training:
            found = check_training_shape(name, getattr(torch, opts.dtype), not opts.no_tf32)
        else:
            found = check_shape(name, getattr(torch, opts.dtype), not opts.no_tf32, nchw=opts.nchw)
        results += found
        if not opts.json:
            for r in found:
                print(f"{r['shape']:11s} {r['kernel']:3s} {r['dtype']:8s} {r['prec']:4s} {r['config']} "
                      f"regs {r['registers']:3d} spills {r['spill_stores']:4d} smem {r['shared']:6d} "
                      f"tc {r['tensor_cores']} sass {r['sass_instructions']} {r['compile_s']:.1f}s", flush=True)
    if opts.json:
        json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
