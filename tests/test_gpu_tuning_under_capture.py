"""The triton and auto backends under CUDA graph capture (marked `cuda`,
skipped without a GPU): nothing is timed or autotuned while a graph is being
captured (tuning.capturing), and the captured graph replays the block
correctly after its input changes.

Each test captures twice: first a problem whose kernels are compiled and
tuned but whose package-level choice (triton's (strategy, chunk), auto's
backend) has not been made, which must take the untimed default; then,
after an ordinary call has made that choice, the usual warm-up-then-capture.
A spy records, for every timing the package starts (tuning.seconds_per_call)
and every config Triton's autotuner benchmarks (Autotuner._bench), whether a
capture was under way; timings asked for during a capture are recorded but
not run, so a regression fails with a clear message instead of breaking the
capture. GPU time, estimated (not measured): Triton compiling and
autotuning K1, K2, K2a and K2b for one small shape, about 10-20 configs at
1-3 s each (compile times from the sm_90a compile check), and the cuda
backend timing its top plans, milliseconds: ~20-40 s per test, mostly CPU.
"""

import pytest
import torch
from helpers import Block, assert_op_matches_reference
from triton.runtime.autotuner import Autotuner

from resnext_kernels.backends import registry
from resnext_kernels.backends import triton as triton_backend
from resnext_kernels.common import settings, tuning
from resnext_kernels.ops import inference as ops

pytestmark = pytest.mark.cuda

# Stage-1-like identity block (d = 4): triton's candidates are ("fused", 4)
# and ("split", 4), so a (strategy, chunk) choice is timed.
BLOCK = Block(4, 64, 128, 64, 32, 14, 14)


@pytest.fixture
def timing_spy(monkeypatch):
    """{"package": [...], "triton_autotuner": [...]}: for each timing
    started, whether a CUDA graph was being captured."""
    record = {"package": [], "triton_autotuner": []}
    real_seconds, real_bench = tuning.seconds_per_call, Autotuner._bench

    def seconds_per_call(fn, device):
        capturing = torch.cuda.is_current_stream_capturing()
        record["package"].append(capturing)
        return 1.0 if capturing else real_seconds(fn, device)

    def bench(self, *args, **kwargs):
        capturing = torch.cuda.is_current_stream_capturing()
        record["triton_autotuner"].append(capturing)
        return [1.0, 1.0, 1.0] if capturing else real_bench(self, *args, **kwargs)

    monkeypatch.setattr(tuning, "seconds_per_call", seconds_per_call)
    monkeypatch.setattr(Autotuner, "_bench", bench)
    return record


def _capture(fn):
    """(fn()'s output, the CUDA graph that recorded fn)."""
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fn()
    return y, graph


def _assert_replays(graph, y, inputs):
    """Twice: new values into the captured x, replay, y is the block of them."""
    for _ in range(2):
        inputs[0].copy_(torch.randn_like(inputs[0]))
        graph.replay()
        torch.cuda.synchronize()
        assert_op_matches_reference(y, inputs, BLOCK.conv, mean_error=True)


def _assert_nothing_timed_while_capturing(record):
    assert record["package"], "nothing was timed outside the captures either: the spy is not wired"
    for who, capturing in record.items():
        assert not any(capturing), f"{who}: {sum(capturing)} timing run(s) started during a CUDA graph capture"


def test_triton_under_graph_capture(monkeypatch, timing_spy):
    monkeypatch.setenv(settings.AUTOTUNE_ENV, "1")
    monkeypatch.setattr(triton_backend, "CHOICES", {})
    inputs = BLOCK.make(torch.bfloat16, "cuda")

    def block():
        return triton_backend.bottleneck_inference_triton(*inputs, *BLOCK.conv)

    # Warm-up with an explicit strategy: Triton compiles and autotunes K1 and
    # K2 for this shape; the (strategy, chunk) choice is not made.
    triton_backend.bottleneck_inference_triton(*inputs, *BLOCK.conv, strategy="fused")
    y, graph = _capture(block)
    assert triton_backend.CHOICES == {}, "a choice was made during the capture"
    _assert_replays(graph, y, inputs)

    block()  # times the candidates (and autotunes the split kernels), caches the choice
    torch.cuda.synchronize()
    assert len(triton_backend.CHOICES) == 1
    y, graph = _capture(block)
    _assert_replays(graph, y, inputs)
    _assert_nothing_timed_while_capturing(timing_spy)


def test_auto_under_graph_capture(monkeypatch, timing_spy):
    candidates = registry.auto_candidates("cuda")
    assert len(candidates) == 2, f"auto should choose between cuda and triton here, has {candidates}"
    monkeypatch.setenv(settings.AUTOTUNE_ENV, "1")
    monkeypatch.setattr(ops, "AUTO_CHOICES", {})
    monkeypatch.setattr(triton_backend, "CHOICES", {})
    inputs = BLOCK.make(torch.bfloat16, "cuda")

    def block(backend="auto"):
        return ops.bottleneck_inference(*inputs, stride=BLOCK.stride, dilation=BLOCK.dilation, groups=BLOCK.groups,
                                        backend=backend)

    for backend in candidates:  # warm-up: each backend compiled and tuned, auto's choice not made
        block(backend)
    y, graph = _capture(block)
    assert ops.AUTO_CHOICES == {}, "a choice was made during the capture"
    _assert_replays(graph, y, inputs)

    block()  # times both backends, caches the faster
    torch.cuda.synchronize()
    assert len(ops.AUTO_CHOICES) == 1
    y, graph = _capture(block)
    _assert_replays(graph, y, inputs)
    _assert_nothing_timed_while_capturing(timing_spy)
