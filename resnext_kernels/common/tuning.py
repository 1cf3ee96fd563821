"""Choosing among correct alternatives by timing them on the first call.

Three choices are made this way while ``settings.autotune_enabled()``:
the ``cuda`` backend's tile plan (backends/cuda/planner.select_plan_rank),
the ``triton`` backend's (strategy, batch chunk) (backends/triton
choose_candidate) and the backend that ``auto`` runs when more than one fused
backend is usable (ops/inference.choose_auto_backend). All follow
``select_fastest``: the first call for a tune key looks the problem up in
the tuning store (tuning_store.py: on disk, shared by every process of this
machine), else times every candidate once (a warm-up call, then the median
of REPEATS calls) and writes the fastest there; the choice is kept per key
in the process (the in-memory part), so later calls pay one dict lookup.

With an initialized torch.distributed process group of more than one
process, a miss met in a training step (grad mode on, which DDP replicas
run in lockstep) or inside tune() is resolved once for all ranks: rank 0
looks up or times, and broadcasts its choice, so every replica runs the
same kernels (every rank must then meet the same misses in the same order;
RESNEXT_KERNELS_TUNE_SYNC=0 lets each rank choose for itself). A miss under
torch.no_grad / inference_mode issues no collective, since code often runs
a model on some ranks only there (evaluation on rank 0): each rank looks
the problem up in the store or times it itself, so that path never waits
for ranks that are not coming.

While a CUDA graph is being captured nothing is timed (the timing runs
would be recorded instead of run, and waiting for their events is not
allowed there) and no collective is issued: a miss takes the stored choice
if there is one, else the untimed default, and only a stored one is kept.

``tune()`` (resnext_kernels/warmup.py) uses two more switches here:
``untimed()`` (its first pass: misses take the default, nothing is kept) and
``tune_run()`` (which choices of a problem were timed or found; inside it the
emulated CUDA kernel times its plans too, a testing mode).
"""

import contextlib

import torch

from . import settings, timing, tuning_store

REPEATS = 5  # timed calls per candidate, after one warm-up call


def select_fastest(cache, key, candidates, time_candidate, *, enabled, capturing, default, choice=None,
                   validity=None):
    """The candidate to run for `key`.

    enabled False: `default`. Else the candidate cached for key; on a miss,
    with `choice` (the choice's name in the tuning store) and validity() (its
    tuning_store.validity dict) given, the store's value for the problem if
    it is one of candidates(); else candidates() is timed with
    time_candidate(c) -> seconds, the fastest (ties: the earlier candidate)
    is written to the store, cached and returned; with fewer than two
    candidates nothing is timed (the only one, or `default` for none, is
    cached). Several ranks (an initialized process group): rank 0 resolves
    the miss and broadcasts its choice. While a CUDA graph is being
    captured (capturing) a miss that the store cannot answer returns
    `default` and caches nothing: the next call outside the capture tunes.
    """
    if not enabled:
        return default
    if key in cache:
        if _events is not None:
            _events.append("memory")
        return cache[key]
    return _resolve_miss(cache, key, candidates, time_candidate, capturing, default, choice, validity)


_MISS = object()  # under capture: neither stored nor cached
_events = None  # tune_run(): the list this process appends "timed" / "stored" / "memory" to
_untimed = False  # untimed(): misses take the default, nothing is kept


@contextlib.contextmanager
def tune_run():
    """Collect, as a list of "timed", "stored" (found in the store) and
    "memory" (already chosen in this process), what the choices made inside
    the block did; in_tune_run() is True inside it."""
    global _events
    saved, _events = _events, []
    try:
        yield _events
    finally:
        _events = saved


def in_tune_run():
    """Whether a tune_run() is active (the emulated CUDA kernel then times its plans)."""
    return _events is not None


@contextlib.contextmanager
def untimed():
    """Inside the block misses time nothing and keep nothing (tune()'s
    first pass, which only finds the model's problems)."""
    global _untimed
    saved, _untimed = _untimed, True
    try:
        yield
    finally:
        _untimed = saved


def _resolve_miss(cache, key, candidates, time_candidate, capturing, default, choice, validity):
    if _untimed:
        return default
    entry = None
    if choice is not None:
        entry = {"choice": choice, "problem": problem_fields(key), "validity": validity()}
    if not capturing and (torch.is_grad_enabled() or in_tune_run()) and _ranks() > 1:
        value, how = _agreed(lambda: _find_or_time(candidates, time_candidate, False, default, entry), candidates)
    else:
        value, how = _find_or_time(candidates, time_candidate, capturing, default, entry)
    if value is _MISS:
        return default
    if _events is not None and how is not None:
        _events.append(how)
    cache[key] = value
    return value


def _find_or_time(candidates, time_candidate, capturing, default, entry):
    """(value, how): the stored value ("stored"), else, outside a capture,
    the fastest candidate timed ("timed") or the only one (None); under
    capture with nothing stored (_MISS, None). entry: the store record's
    {"choice", "problem", "validity"}, or None (no store)."""
    if capturing and entry is None:
        return _MISS, None
    options = list(candidates())
    key = None if entry is None else tuning_store.entry_key(entry["choice"], entry["problem"], entry["validity"])
    if key is not None:
        stored = tuning_store.STORE.get(key, options)
        if stored is not None:
            return stored, "stored"
    if capturing:
        return _MISS, None
    if len(options) <= 1:
        return (options[0] if options else default), None
    seconds = [time_candidate(c) for c in options]
    best = options[min(range(len(options)), key=seconds.__getitem__)]
    if key is not None:
        # The timings go along for people reading the file (and `info`).
        tuning_store.STORE.put(key, {**entry, "value": best, "seconds": [[c, s] for c, s in zip(options, seconds)]})
    return best, "timed"


def _ranks():
    """The default process group's size; 1 without torch.distributed or with
    settings.tune_sync_enabled() off (each rank then chooses for itself)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or not settings.tune_sync_enabled():
        return 1
    return dist.get_world_size()


def _agreed(resolve, candidates):
    """(value, how) of rank 0's resolve(), on every rank of the default
    process group (broadcast_object_list; rank 0 times while the others
    wait). A value that is not among this rank's candidates() (ranks that
    disagree about the problem) raises RuntimeError rather than run
    different kernels."""
    dist = torch.distributed
    message = [None]
    if dist.get_rank() == 0:
        try:
            message[0] = ("ok", resolve())
        except Exception as exc:
            message[0] = ("error", f"{type(exc).__name__}: {exc}")
            dist.broadcast_object_list(message, src=0)
            raise
    dist.broadcast_object_list(message, src=0)
    status, result = message[0]
    if status == "error":
        raise RuntimeError(f"rank 0 failed to make a tuning choice every rank runs: {result}")
    value, how = result
    if dist.get_rank() != 0 and value not in list(candidates()):
        raise RuntimeError(f"rank 0 chose {value!r}, which is not one of this rank's candidates "
                           f"{list(candidates())}: the ranks disagree about the problem")
    return value, how


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


def problem_fields(key):
    """A tune_key as the tuning store keys it: plain values (dtypes by name),
    without the device index (the store's validity says which GPU; every
    rank of a node shares one entry)."""
    return [str(v) if isinstance(v, torch.dtype) else v for v in key[:-1]]
