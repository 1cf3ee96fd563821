"""Python glue of the `cuda` and `cuda_emulated` backends.

``cuda``: the fused block kernel of csrc/fused_block_kernel.cuh compiled into
``resnext_kernels._C``, as two ops: ``fused_block_pack_cuda`` packs the
folded weights into the kernel's padded layouts and
``fused_block_packed_cuda`` runs the block on them (one launch).

``cuda_emulated`` (testing only): the same kernel source compiled with the
host C++ compiler against csrc/emulation/cuda_emu.h, which runs thread blocks
one after another and a block's threads as fibers. It is a separate library,
built on first use with ``torch.utils.cpp_extension.load`` (a message is
printed; ~20 s on an idle 2-core machine) into a directory keyed by a hash
of the sources and the torch version, under ``RESNEXT_KERNELS_EMU_BUILD_DIR``, else
``TORCH_EXTENSIONS_DIR``, else ``~/.cache/resnext_kernels``. Its ops are
``fused_block_pack_cuda_emulated`` and ``fused_block_packed_cuda_emulated``
in ``torch.ops.resnext_kernels`` (CPU tensors); test helpers live in
``torch.ops.resnext_kernels_emu``.

Both backends pack the weights once and keep the result in PACK_CACHE
(weight_cache.WeightCache: a weight modified in place or freed is repacked;
weights made under torch.inference_mode are packed on every call). The block ops take x, the packed tensors,
the real width and Cout, stride, dilation, groups, ``allow_tf32`` (fp32 inputs
on TF32 tensor cores when True, fp32 FMA when False; the backends pass
``torch.backends.cudnn.allow_tf32`` like cuDNN convolutions do),
``smem_limit`` (bytes the tile plan may use; 0 = the device's opt-in
maximum, H100's 232448 for the emulation) and ``plan_rank`` (which of the
tile plans that fit to run, in the order of the planner's cost estimate;
``candidate_plans`` lists them).

Plan autotuning (``cuda`` backend only): the planner's cost model is a
guess, so while ``backends.autotune_enabled()`` the first call for a tune
key (``tuning.tune_key``) times the first AUTOTUNE_TOP_K ranks with CUDA events
and TUNED_PLAN_RANKS keeps the fastest for that and every later call
(``select_plan_rank``). Nothing is timed while a CUDA graph is being
captured. With autotuning off, and always on ``cuda_emulated``, rank 0 runs.
"""

import collections
import hashlib
import os
import shutil
import sys
import threading

import torch

from . import _extension, backends, tuning
from .weight_cache import WeightCache

_NS = "resnext_kernels"
_EMU_NAME = "resnext_kernels_emu"
_EMU_SOURCES = ("emulation/fused_block_emu.cpp", "emulation/emu_selftest.cpp")

_emu_lock = threading.Lock()
_emu_loaded = False
_emu_error = None


PACK_CACHE = WeightCache()


def _round_up(a, b):
    return -(-a // b) * b


PaddedDims = collections.namedtuple("PaddedDims", "cin_p wp cout_p d_p kt")


def padded_dims(cin, width, cout, groups):
    """The kernel's padded sizes; mirrors set_padded_dims in
    csrc/fused_block_host.h (opcheck compares the fake packing with it)."""
    d = width // groups
    d_p = _round_up(d, 16) if d > 16 else 1 << (d - 1).bit_length()
    return PaddedDims(_round_up(cin, 16), _round_up(groups * d_p, 16), _round_up(cout, 16), d_p, max(1, d_p // 16))


def _fake_pack(w1, b1, w2, b2, w3, b3, wd, bd, groups):
    cin_p, wp, cout_p, _, kt = padded_dims(w1.shape[1], w1.shape[0], w3.shape[0], groups)
    f32 = torch.float32
    packed = [
        w1.new_empty(cin_p, wp),
        w1.new_empty(wp, dtype=f32),
        w1.new_empty(wp // 16, 9, kt, 16, 16),
        w1.new_empty(wp, dtype=f32),
        w1.new_empty(wp, cout_p),
        w1.new_empty(cout_p, dtype=f32),
    ]
    if wd is not None:
        packed.append(w1.new_empty(cin_p, cout_p))
    return packed


def _fake_packed(x, w1p, b1p, w2p, b2p, w3p, b3p, wdp, width, cout, stride, dilation, groups, allow_tf32,
                 smem_limit=0, plan_rank=0):
    n, _, h, w = x.shape
    shape = (n, cout, (h - 1) // stride + 1, (w - 1) // stride + 1)
    return x.new_empty(shape).contiguous(memory_format=torch.channels_last)


def _op_exists(name):
    return hasattr(getattr(torch.ops, _NS), name)


def _register_fakes(suffix):
    torch.library.register_fake(f"{_NS}::fused_block_pack_{suffix}")(_fake_pack)
    torch.library.register_fake(f"{_NS}::fused_block_packed_{suffix}")(_fake_packed)


if _extension.extension() is not None and _op_exists("fused_block_packed_cuda"):
    _register_fakes("cuda")


# cudaDevAttrMaxSharedMemoryPerBlockOptin of H100 and H200, the emulated op's
# default shared-memory limit (kDefaultSmemLimit in fused_block_emu.cpp).
H100_SMEM_OPTIN = 232448

# Columns of the planner's table (rk::plan_table in csrc/fused_block_plan.h)
# after the rank: tile height, width chunk, Cout slice, input-channel chunk,
# x chunk buffers, dynamic shared-memory bytes, estimated cost, grid.
TilePlan = collections.namedtuple("TilePlan", "rank TH WC CS KC nbuf smem cost grid_x grid_y")


def candidate_plans(n, h, w, cin, width, cout, groups, stride, dilation, dtype, smem_limit, emulated=False):
    """The tile plans that fit in smem_limit bytes, in plan_rank order (the
    planner's cost estimate, cheapest first), as TilePlan tuples; [] when none
    fits. No GPU needed: the planner of ``resnext_kernels._C``, or with
    emulated=True the one compiled into the emulation library (where
    smem_limit 0 means the emulated op's default, H100_SMEM_OPTIN)."""
    if dtype not in backends.KERNEL_DTYPES:
        raise ValueError(f"dtype must be one of {backends.KERNEL_DTYPES}, got {dtype}")
    if emulated:
        load_emulation()
        op = torch.ops.resnext_kernels_emu.fused_block_plans
    else:
        if not (_extension.extension() is not None and _op_exists("fused_block_plans")):
            raise RuntimeError("resnext_kernels._C with the fused_block_plans op is needed to list tile plans: "
                               f"{_extension.extension_error() or 'this _C predates it; rebuild it'}")
        op = torch.ops.resnext_kernels.fused_block_plans
    elem_bytes = torch.empty((), dtype=dtype).element_size()
    table = op(n, h, w, cin, width, cout, groups, stride, dilation, elem_bytes, smem_limit)
    return [TilePlan(rank, *map(int, row[:6]), row[6], int(row[7]), int(row[8]))
            for rank, row in enumerate(table.tolist())]


AUTOTUNE_TOP_K = 4  # plan ranks timed on a tune key's first call
TUNED_PLAN_RANKS = {}  # tune key -> fastest plan rank


def select_plan_rank(cache, key, time_rank, count_plans, *, enabled, capturing, top_k=AUTOTUNE_TOP_K):
    """The plan rank a call runs with (tuning.select_fastest over ranks).

    enabled False: 0, the cost model's choice. Else the rank cached for key;
    on a miss, ranks 0 .. min(top_k, count_plans()) - 1 are timed with
    time_rank(rank) -> seconds and the fastest (ties: the lower rank) is
    cached and returned (0, untimed, when fewer than two plans fit; with no
    plan at all the op reports it). While a CUDA graph is being captured
    (capturing) a miss returns 0 and caches nothing.
    """
    return tuning.select_fastest(cache, key, lambda: range(min(top_k, count_plans())), time_rank,
                                 enabled=enabled, capturing=capturing, default=0)


def _autotuned_rank(block_op, args):
    """select_plan_rank for a call of block_op(*args, plan_rank) on CUDA."""
    x, wdp, width, cout, stride, dilation, groups, allow_tf32 = args[0], *args[7:14]
    n, cin, h, w = x.shape

    def count_plans():
        limit = torch.cuda.get_device_properties(x.device).shared_memory_per_block_optin
        return len(candidate_plans(n, h, w, cin, width, cout, groups, stride, dilation, x.dtype, limit))

    # Capture state, events and timing runs all belong to x's device.
    with torch.cuda.device(x.device):
        return select_plan_rank(
            TUNED_PLAN_RANKS,
            tuning.tune_key(x, width, cout, stride, dilation, groups, wdp is not None, allow_tf32),
            lambda rank: tuning.seconds_per_call(lambda: block_op(*args, rank), x.device),
            count_plans,
            enabled=backends.autotune_enabled(),
            capturing=torch.cuda.is_current_stream_capturing(),
        )


def _run(pack_op, block_op, x, w1, b1, w2, b2, w3, b3, wd, bd, stride, dilation, groups, autotune):
    packed = PACK_CACHE.get(
        lambda: pack_op(w1, b1, w2, b2, w3, b3, wd, bd, groups),
        (w1, b1, w2, b2, w3, b3, wd, bd),
        # Nothing else goes into the packing: not x, not the tile plan (the
        # tensors' device tells the CUDA and emulated packings apart).
        groups,
    )
    wdp = packed[6] if wd is not None else None
    args = (x, *packed[:6], wdp, w1.shape[0], w3.shape[0], stride, dilation, groups, torch.backends.cudnn.allow_tf32,
            0)
    rank = _autotuned_rank(block_op, args) if autotune else 0
    return block_op(*args, rank)


def bottleneck_inference_cuda(x, w1, b1, w2, b2, w3, b3, wd, bd, stride, dilation, groups):
    """The `cuda` backend: one fused kernel launch on x's current stream
    (plus the packing when the weights are not in PACK_CACHE, and the timing
    of the top plans on a tune key's first call)."""
    lib = torch.ops.resnext_kernels
    return _run(lib.fused_block_pack_cuda, lib.fused_block_packed_cuda, x, w1, b1, w2, b2, w3, b3, wd, bd, stride,
                dilation, groups, autotune=True)


def csrc_dir():
    """The kernel sources: the source tree's csrc/, else the installed copy."""
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.path.join(os.path.dirname(here), "csrc"), os.path.join(here, "_csrc")):
        if all(os.path.exists(os.path.join(cand, s)) for s in _EMU_SOURCES):
            return cand
    return None


def _sources_digest(csrc):
    h = hashlib.sha256(torch.__version__.encode())
    for root, _dirs, files in sorted(os.walk(csrc)):
        for name in sorted(files):
            if name.endswith((".h", ".cuh", ".cpp")):
                path = os.path.join(root, name)
                h.update(os.path.relpath(path, csrc).encode())
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()[:16]


def _emu_build_dir(csrc):
    base = os.environ.get("RESNEXT_KERNELS_EMU_BUILD_DIR") or os.environ.get("TORCH_EXTENSIONS_DIR")
    if not base:
        base = os.path.join(os.path.expanduser("~"), ".cache", "resnext_kernels")
    return os.path.join(base, f"emu-{_sources_digest(csrc)}")


def emulated_unavailable_reason():
    """None when the emulation build can be used (or built), else why not."""
    if _emu_error is not None:
        return _emu_error
    if _emu_loaded:
        return None
    if not sys.platform.startswith("linux"):
        return f"the CUDA emulator needs Linux (ucontext fibers), got {sys.platform}"
    if csrc_dir() is None:
        return "the kernel sources (csrc/ or resnext_kernels/_csrc) were not found"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler {cxx!r} on PATH to build the emulation"
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (torch.utils.cpp_extension.load needs it)"
    return None


def load_emulation():
    """Build (first use) and load the emulation library; raise on failure."""
    global _emu_loaded, _emu_error
    with _emu_lock:
        if _emu_loaded:
            return
        if _emu_error is not None:
            raise RuntimeError(_emu_error)
        reason = emulated_unavailable_reason()
        if reason is not None:
            raise RuntimeError(reason)
        from torch.utils import cpp_extension

        csrc = csrc_dir()
        build_dir = _emu_build_dir(csrc)
        os.makedirs(build_dir, exist_ok=True)
        if not os.path.exists(os.path.join(build_dir, f"{_EMU_NAME}.so")):
            print(
                f"[resnext_kernels] building the CPU emulation of the CUDA kernels in {build_dir} "
                "(first use only, under a minute)",
                file=sys.stderr,
                flush=True,
            )
        try:
            cpp_extension.load(
                name=_EMU_NAME,
                sources=[os.path.join(csrc, s) for s in _EMU_SOURCES],
                extra_include_paths=[csrc],
                extra_cflags=["-O2"],
                build_directory=build_dir,
                is_python_module=False,
                verbose=False,
            )
        except Exception as exc:
            _emu_error = f"building the CUDA emulation failed: {type(exc).__name__}: {exc}"
            raise RuntimeError(_emu_error) from exc
        _register_fakes("cuda_emulated")
        _emu_loaded = True


def bottleneck_inference_cuda_emulated(x, w1, b1, w2, b2, w3, b3, wd, bd, stride, dilation, groups):
    """The `cuda_emulated` backend: the CUDA kernel run by the CPU emulator."""
    load_emulation()
    lib = torch.ops.resnext_kernels
    # Never tuned: emulated timings say nothing about a GPU.
    return _run(lib.fused_block_pack_cuda_emulated, lib.fused_block_packed_cuda_emulated, x, w1, b1, w2, b2, w3,
                b3, wd, bd, stride, dilation, groups, autotune=False)
