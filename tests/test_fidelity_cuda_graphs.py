"""CUDA graphs (issue 10; GPU only, marked cuda): a warmed-up fused block is
captured with torch.cuda.graph and compiled with
torch.compile(mode="reduce-overhead"), and both replay correctly after the
input changes. The warm-up makes every first-call choice (Triton autotuning,
the CUDA tile plan, auto's backend, the fold) before the capture, so nothing
is timed or allocated outside the graph's pool while capturing."""

import pytest
import torch
from fidelity_cases import HAS_CUDA, twin_blocks

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU (no CUDA device)")]

# A ResNeXt-50 stage-2-like block at batch 4, small enough for a quick check.
CFG = (256, 64, 1, 32, 4)  # inplanes, planes (width 128, d = 4), stride, groups, base_width
BACKENDS = ["reference", "triton", "cuda", "auto"]


def _block_and_inputs(backend, n_inputs):
    _, fused = twin_blocks(CFG, backend)
    fused = fused.cuda().to(torch.bfloat16)
    xs = [torch.randn(4, CFG[0], 28, 28, device="cuda", dtype=torch.bfloat16)
          .contiguous(memory_format=torch.channels_last) for _ in range(n_inputs)]
    return fused, xs


@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_capture_replays_new_inputs(backend):
    fused, xs = _block_and_inputs(backend, 3)
    static_x = xs[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(3):  # warm-up: tuning, compilation, the fold cache
            fused(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_y = fused(static_x)
    for x in xs[1:]:
        static_x.copy_(x)
        graph.replay()
        with torch.no_grad():
            expected = fused(x)
        torch.cuda.synchronize()
        if backend == "reference":  # cuDNN may pick another algorithm outside the capture
            torch.testing.assert_close(static_y, expected, rtol=2e-2, atol=2e-2)
        else:  # the same kernels and configs: bitwise
            assert torch.equal(static_y, expected), backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_reduce_overhead_compile_replays_new_inputs(backend):
    torch._dynamo.reset()
    fused, xs = _block_and_inputs(backend, 4)
    compiled = torch.compile(fused, mode="reduce-overhead")
    with torch.no_grad():
        for x in xs:
            y = compiled(x).clone()  # the next replay reuses the graph's output memory
            expected = fused(x)
            torch.testing.assert_close(y, expected, rtol=2e-2, atol=2e-2)
