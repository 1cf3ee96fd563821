"""Choosing among correct alternatives by timing them on the first call.

Three choices are made this way while ``settings.autotune_enabled()``:
the ``cuda`` backend's tile plan (backends/cuda/planner.select_plan_rank),
the ``triton`` backend's (strategy, batch chunk) (backends/triton
choose_candidate) and the backend that ``auto`` runs when more than one fused
backend is usable (ops/inference.choose_auto_backend). All follow
``select_fastest``: the first call for
a tune key times every candidate once (a warm-up call, then the median of
REPEATS calls), the fastest is cached per key, and nothing is timed while a
CUDA graph is being captured (the timing runs would be recorded instead of
run, and waiting for their events is not allowed there).
"""

import torch

from . import timing

REPEATS = 5  # timed calls per candidate, after one warm-up call


def select_fastest(cache, key, candidates, time_candidate, *, enabled, capturing, default):
    """The candidate to run for `key`.

    enabled False: `default`. Else the candidate cached for key; on a miss,
    candidates() (called only then) is timed with time_candidate(c) ->
    seconds, and the fastest (ties: the earlier candidate) is cached and
    returned; with fewer than two candidates nothing is timed (the only one,
    or `default` for none, is cached). While a CUDA graph is being captured
    (capturing) a miss returns `default` and caches nothing: the next call
    outside the capture tunes.
    """
    if not enabled:
        return default
    if key in cache:
        return cache[key]
    if capturing:
        return default
    options = list(candidates())
    if len(options) <= 1:
        cache[key] = options[0] if options else default
        return cache[key]
    seconds = [time_candidate(c) for c in options]
    best = options[min(range(len(options)), key=seconds.__getitem__)]
    cache[key] = best
    return best


def seconds_per_call(fn, device):
    """One warm-up call of fn() (it absorbs first-call work such as a
    backend's own tuning), then the median of REPEATS calls, timed with CUDA
    events on a CUDA device (timing.round_seconds); outputs are discarded."""
    def run(_):
        fn()

    timing.round_seconds(run, [None], device, 1)
    return timing.median(timing.round_seconds(run, [None], device, REPEATS))


def capturing(device):
    """Whether a CUDA graph is being captured on device's current stream."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def tune_key(x, width, cout, stride, dilation, groups, projection, allow_tf32):
    """What the fastest choice may depend on: the problem, and x's layout and
    16-byte alignment (NCHW x is converted first; unaligned x or odd Cin
    disables vector loads)."""
    if x.is_contiguous(memory_format=torch.channels_last):
        layout = "channels_last"
    elif x.is_contiguous():
        layout = "contiguous"
    else:
        layout = "strided"
    return (tuple(x.shape), x.dtype, layout, x.data_ptr() % 16 == 0, allow_tf32, stride, dilation, groups, width,
            cout, projection, x.device.type, x.device.index)
