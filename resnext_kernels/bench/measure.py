"""Device set-up, timing with rotating inputs, and the device's ceilings.

Conventions: fp32 means real fp32 (``backend_settings`` turns TF32 off for
cuDNN and cuBLAS, so eager fp32 is not silently TF32); a timed round is one
pass over inputs that together exceed twice the last-level cache.
"""

import contextlib
import math
import statistics

import torch

from ..common.timing import cache_bytes, median, round_seconds, synchronize
from .shapes import block_bytes_floor, block_flops, block_working_set_bytes, dtype_name


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






def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"




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


def spread(times):
    """The spread of per-call seconds over the timing rounds: the quartiles
    (q1_s, q3_s: the interval the noise flags compare, report.within_noise) and
    the extremes (min_s, max_s)."""
    if len(times) > 1:
        q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    else:
        q1 = q3 = times[0]
    return {"q1_s": q1, "q3_s": q3, "min_s": min(times), "max_s": max(times)}




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


def performance(shape, batch, dtype, seconds, ceilings, n_inputs):
    """Derived numbers for one timed case (seconds per call, n_inputs rotating inputs).

    working_set_in_cache: the round's working set (block_working_set_bytes)
    fits in the device's last-level cache (common.timing.cache_bytes; an
    assumed size on CPU). Then the data comes from that cache, DRAM copy
    bandwidth is not the case's floor, and pct_of_floor overstates (it can
    exceed 100): report.block_table marks it. On CUDA the rotation makes the
    working set at least twice the L2 whenever the inputs fit in memory.
    """
    flops = block_flops(shape, batch)
    nbytes = block_bytes_floor(shape, batch, dtype)
    floor = ceilings.floor_seconds(flops, nbytes, dtype)
    working_set = block_working_set_bytes(shape, batch, dtype, n_inputs)
    cache = cache_bytes(ceilings.device)
    return {
        "flops": flops,
        "bytes_floor": nbytes,
        "achieved_GBps": nbytes / seconds / 1e9,
        "achieved_TFLOPs": flops / seconds / 1e12,
        "floor_ms": floor * 1e3,
        "pct_of_floor": 100.0 * floor / seconds,
        "working_set_bytes": working_set,
        "cache_bytes": cache,
        "working_set_in_cache": working_set <= cache,
    }


def saved_activation_bytes(model, *inputs, shapes=None, include=None):
    """(bytes, output): the bytes of the unique storages autograd saves for
    backward during model(*inputs), counted with
    torch.autograd.graph.saved_tensors_hooks, leaving out the model's own
    parameters and buffers and the inputs (they exist anyway, whatever the
    model saves) and empty tensors.

    The output is returned so that the caller decides when the graph (and
    the saved tensors, whose storage addresses identify them) may go.
    shapes: a list that receives the shape of the first tensor saved from
    each counted storage.
    include: None, or a predicate on a saved tensor: only storages first
    saved through a tensor it accepts are counted.
    """
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers(), *inputs)}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if (storage.nbytes() and storage.data_ptr() not in own and storage.data_ptr() not in saved
                and (include is None or include(t))):
            saved[storage.data_ptr()] = storage.nbytes()
            if shapes is not None:
                shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*inputs)
    return sum(saved.values()), out
