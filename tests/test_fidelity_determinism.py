"""Determinism (issue 10): two identical calls give bitwise-identical outputs
and gradients on every backend, under torch.use_deterministic_algorithms(True)
(which must not raise); no kernel of the package uses atomics."""

import os
import re

import pytest
import torch
from fidelity_cases import HAS_CUDA, PROJECTION_D3, block_input, cpu_backends, twin_blocks
from fidelity_cases import one_thread  # noqa: F401  (autouse fixture)

import resnext_kernels


@pytest.fixture
def deterministic():
    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])


def _step(block, x, grad):
    x = x.clone().requires_grad_(True)
    block.zero_grad()
    y = block(x)
    y.backward(grad)
    return [y.detach(), x.grad] + [p.grad for p in block.parameters()]


def _check_bitwise(backend, device):
    _, fused = twin_blocks(PROJECTION_D3, backend)
    fused = fused.to(device)
    x = block_input(PROJECTION_D3[0]).to(device)
    grad = torch.randn_like(fused(x))
    first, second = _step(fused, x, grad), _step(fused, x, grad)
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"tensor {i} (0: y, 1: x.grad, then parameter grads) differs between calls"
    with torch.no_grad():  # the cached-fold path too
        assert torch.equal(fused(x), fused(x))


@pytest.mark.parametrize("backend", cpu_backends())
def test_two_calls_are_bitwise_equal(backend, deterministic):
    _check_bitwise(backend, "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU (no CUDA device)")
@pytest.mark.parametrize("backend", ["reference", "triton", "cuda", "auto"])
def test_two_gpu_calls_are_bitwise_equal(backend, deterministic):
    """On the GPU, with autotuning as configured: the first call tunes (and
    'auto' picks a backend), later calls reuse the choice."""
    _check_bitwise(backend, "cuda")


def test_no_atomics_in_the_kernels():
    """Reductions in the package's kernels are fixed-order (no atomics), which
    is what makes the two-call tests above hold on a GPU for every schedule."""
    package = os.path.dirname(resnext_kernels.__file__)
    roots = [os.path.join(package, "backends"), os.path.join(os.path.dirname(package), "csrc")]
    found = []
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for name in files:
                if name.endswith((".py", ".cu", ".cuh", ".h", ".cpp")):
                    with open(os.path.join(dirpath, name)) as f:
                        found += [f"{name}: {m}" for m in re.findall(r".*\batomic\w*\(.*", f.read())]
    assert not found, found
