"""Shared test set-up.

TRITON_INTERPRET must be set before triton is first imported, so it is set
here, at collection start, when no GPU is visible: that is how the Triton
kernels are exercised on CPU in CI.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs every run, yet a failing case can be replayed with
    # RESNEXT_KERNELS_TEST_SEED=<printed seed>.
    seed = int(os.environ.get("RESNEXT_KERNELS_TEST_SEED", torch.seed() % 2**31))
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield
