"""The CUDA kernel's tile plans, seen from Python: padded sizes, the
candidate plans of a problem (the C++ planner of csrc/fused_block_plan.h,
no GPU needed) and the choice among them by timing.

The planner ranks every plan that fits in shared memory by an estimated
cost whose constants were never checked on a GPU, so while
``settings.autotune_enabled()`` the first call of a problem (``tune_key``)
times the first AUTOTUNE_TOP_K ranks with CUDA events and TUNED_PLAN_RANKS
keeps the fastest for that and every later call (``select_plan_rank``), and
the tuning store for later processes (choice "cuda_plan"; the timed plans'
tiles are part of its validity, so a planner that ranks differently
misses). Nothing is timed while a CUDA graph is being captured. With
autotuning off rank 0 runs; on ``cuda_emulated`` too, except inside a
tune() run (tuning.in_tune_run), where the emulated kernel's plans are timed
on the CPU (a testing mode: choice "cuda_plan_emulated", keyed to the
emulation's build, so no GPU run uses it).
"""

import collections
import contextlib

import torch

from ...common import extension, settings, tuning, tuning_store
from ...common.sizes import cdiv, next_pow2, round_up
from . import emulation

PaddedDims = collections.namedtuple("PaddedDims", "cin_p wp cout_p d_p kk ks2")


def padded_dims(cin, width, cout, groups, elem_bytes):
    """The kernel's padded sizes and MMA shape (K step kk: 16 for 2-byte
    elements, 8 for fp32; ks2: the grouped conv's K steps per output tile);
    mirrors set_padded_dims in csrc/fused_block_plan.h (opcheck compares the
    fake packing with it)."""
    d = width // groups
    d_p = round_up(d, 8) if d > 8 else next_pow2(d)
    kk = 16 if elem_bytes == 2 else 8
    return PaddedDims(round_up(cin, 16), round_up(groups * d_p, 16), round_up(cout, 8), d_p, kk,
                      cdiv(9 * max(8, d_p), kk))


# Columns of the planner's table (rk::plan_table in csrc/fused_block_plan.h)
# after the rank: band width, run length (output pixels per block), width
# chunk, Cout slice, input-channel chunk, x chunk buffers, dynamic
# shared-memory bytes, estimated cost, grid, the largest halo (input pixels
# of one block) and the multiply-accumulates the launch's MMAs execute.
TilePlan = collections.namedtuple("TilePlan", "rank TW Mo WC CS KC nbuf smem cost grid_x grid_y halo mma_macs")


def candidate_plans(n, h, w, cin, width, cout, groups, stride, dilation, dtype, smem_limit, *, projection=None,
                    allow_tf32=True, emulated=False):
    """The tile plans that fit in smem_limit bytes (> 0), in plan_rank order
    (the planner's cost estimate, cheapest first), as TilePlan tuples; []
    when none fits. projection: whether wd is given (default: when the
    block needs one, stride != 1 or cin != cout); allow_tf32: fp32 on TF32
    tensor cores (else FMA: the cost model's rate). No GPU needed: the
    planner of ``resnext_kernels._C``, or with emulated=True the one
    compiled into the emulation library."""
    if dtype not in settings.KERNEL_DTYPES:
        raise ValueError(f"dtype must be one of {settings.KERNEL_DTYPES}, got {dtype}")
    if projection is None:
        projection = stride != 1 or cin != cout
    if emulated:
        emulation.load()
        op = getattr(torch.ops, emulation.NAMESPACE).fused_block_plans
    else:
        if extension.extension() is None:
            raise RuntimeError(f"resnext_kernels._C is needed to list tile plans: {extension.extension_error()}")
        op = torch.ops.resnext_kernels.fused_block_plans
    elem_bytes = torch.empty((), dtype=dtype).element_size()
    table = op(n, h, w, cin, width, cout, groups, stride, dilation, projection, elem_bytes, allow_tf32, smem_limit)
    return [TilePlan(rank, *map(int, row[:7]), row[7], int(row[8]), int(row[9]), int(row[10]), int(row[11]))
            for rank, row in enumerate(table.tolist())]


AUTOTUNE_TOP_K = 4  # plan ranks timed on a tune key's first call
TUNED_PLAN_RANKS = {}  # tune key -> fastest plan rank (cuda)
EMULATED_PLAN_RANKS = {}  # tune key -> fastest plan rank (cuda_emulated, timed inside tune() only)


def select_plan_rank(cache, key, time_rank, count_plans, *, enabled, capturing, top_k=AUTOTUNE_TOP_K, choice=None,
                     validity=None):
    """The plan rank a call runs with (tuning.select_fastest over ranks).

    enabled False: 0, the cost model's choice. Else the rank cached for key;
    on a miss, the tuning store's rank (choice, validity(): see
    select_fastest) or ranks 0 .. min(top_k, count_plans()) - 1 are timed
    with time_rank(rank) -> seconds and the fastest (ties: the lower rank) is
    cached and returned (0, untimed, when fewer than two plans fit; with no
    plan at all the op reports it). While a CUDA graph is being captured
    (capturing) a miss the store cannot answer returns 0 and caches nothing.
    """
    return tuning.select_fastest(cache, key, lambda: range(min(top_k, count_plans())), time_rank,
                                 enabled=enabled, capturing=capturing, default=0, choice=choice, validity=validity)


def _listed_plans(args, emulated):
    """candidate_plans of a forward call's args (see autotuned_rank)."""
    x, wdp, width, cout, stride, dilation, groups, allow_tf32 = args[0], *args[7:14]
    n, cin, h, w = x.shape
    if emulated:
        limit = settings.H100_SMEM_OPTIN
    else:
        limit = torch.cuda.get_device_properties(x.device).shared_memory_per_block_optin
    return candidate_plans(n, h, w, cin, width, cout, groups, stride, dilation, x.dtype, limit,
                           projection=wdp is not None, allow_tf32=allow_tf32, emulated=emulated)


def _plan_validity(args, emulated):
    """The tuning store's validity of a plan choice: the device's, and what
    the timed ranks mean in this build (their tiles, TW .. smem), so a
    planner that ranks differently misses; the emulation's build for
    emulated timings."""
    timed = [list(p[1:8]) for p in _listed_plans(args, emulated)[:AUTOTUNE_TOP_K]]
    if emulated:
        return tuning_store.validity(args[0].device, emulation=emulation.build_digest(),
                                     smem_limit=settings.H100_SMEM_OPTIN, plans=timed)
    return tuning_store.validity(args[0].device, plans=timed)


def autotuned_rank(forward_op, args, *, emulated=False):
    """select_plan_rank for a call of forward_op(*args, plan_rank) on CUDA
    (emulated: on the CPU emulation, timed by the wall clock); args = (x,
    w1p, b1p, w2p, b2p, w3p, b3p, wdp, width, cout, stride, dilation, groups,
    allow_tf32, smem_limit)."""
    x, wdp, width, cout, stride, dilation, groups, allow_tf32 = args[0], *args[7:14]
    # Capture state, events and timing runs all belong to x's device.
    with contextlib.nullcontext() if emulated else torch.cuda.device(x.device):
        return select_plan_rank(
            EMULATED_PLAN_RANKS if emulated else TUNED_PLAN_RANKS,
            tuning.tune_key(x, width, cout, stride, dilation, groups, wdp is not None, allow_tf32),
            lambda rank: tuning.seconds_per_call(lambda: forward_op(*args, rank), x.device),
            lambda: len(_listed_plans(args, emulated)),
            enabled=settings.autotune_enabled(),
            capturing=not emulated and torch.cuda.is_current_stream_capturing(),
            choice="cuda_plan_emulated" if emulated else "cuda_plan",
            validity=lambda: _plan_validity(args, emulated),
        )
