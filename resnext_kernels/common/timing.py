"""Timing primitives shared by the tuning choices and the benchmarks."""

import statistics
import time

import torch

median = statistics.median


def synchronize(device):
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def round_seconds(fn, inputs, device, rounds):
    """Seconds per call of fn(x) for each of `rounds` passes over inputs
    (CUDA events on a CUDA device, the wall clock on CPU)."""
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


def cache_bytes(device):
    """The device's last-level cache: the GPU's L2; 32 MiB assumed on CPU."""
    if device.type == "cuda":
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        return size or 50 * 2**20
    return 32 * 2**20
