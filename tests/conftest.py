"""Shared test set-up.

TRITON_INTERPRET must be set before triton is first imported, so it is set
here, at collection start, when no GPU is visible: that is how the Triton
kernels are exercised on CPU in CI.

Randomness: every test runs with a fresh seed (torch, Python's random and
numpy's global generator), drawn per test. A failing test prints it in its
failure report, as the command that replays it
(RESNEXT_KERNELS_TEST_SEED=<seed> python -m pytest <test id>); the seed also
goes to the junit XML as a property. tests/test_seed_replay.py checks both.
"""

import os
import random

import numpy
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The suite never reads or writes the user's tuning store: its disk part is
# off (set before the package is imported: Triton's autotune cache follows
# it); the store's own tests point it at a tmp directory.
os.environ["RESNEXT_KERNELS_CACHE_DIR"] = "off"

import pytest  # noqa: E402

SEED_ENV = "RESNEXT_KERNELS_TEST_SEED"
_SEED = pytest.StashKey[int]()


def pytest_report_header(config):
    if SEED_ENV in os.environ:
        return f"{SEED_ENV}={os.environ[SEED_ENV]}: every test replays this seed"
    return None


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Seed every generator a test may draw from, fresh per test unless
    RESNEXT_KERNELS_TEST_SEED replays one."""
    replay = os.environ.get(SEED_ENV)
    seed = int(replay) if replay is not None else random.SystemRandom().randrange(2**31)
    torch.manual_seed(seed)  # CPU and every CUDA device
    random.seed(seed)
    numpy.random.seed(seed)
    request.node.stash[_SEED] = seed
    request.node.user_properties.append(("seed", seed))
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Add the seed to a failed test's report, as the command that replays it.

    A section of the failure's longrepr is printed with the traceback
    whatever --show-capture says (and travels through pytest-xdist); a
    failure without a traceback (e.g. pytest.fail(pytrace=False)) gets a
    report section instead."""
    outcome = yield
    report = outcome.get_result()
    seed = item.stash.get(_SEED, None)
    if not report.failed or seed is None:
        return
    line = f"{SEED_ENV}={seed} python -m pytest '{item.nodeid}'"
    if hasattr(report.longrepr, "addsection"):
        report.longrepr.addsection("replay with the same random inputs", line)
    else:
        report.sections.append(("replay with the same random inputs", line))


# -- fixtures shared by several test files ---------------------------------------


@pytest.fixture(scope="module")
def emu():
    """The CPU emulation library of the CUDA kernel (built on first use): torch.ops.resnext_kernels_emu."""
    from resnext_kernels.backends.cuda import emulation

    emulation.load()
    return torch.ops.resnext_kernels_emu


@pytest.fixture
def allow_tf32():
    """A setter for PyTorch's two TF32 flags; both are restored after the test."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    yield lambda flag: (setattr(torch.backends.cudnn, "allow_tf32", flag),
                        setattr(torch.backends.cuda.matmul, "allow_tf32", flag))
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Make torch.empty return NaN-filled floating tensors during the test.

    The launchers allocate their outputs and intermediates with torch.empty,
    so any element a kernel fails to write stays NaN and fails the
    finiteness check. Returns the list of poisoned allocations so a test can
    assert the poisoning happened.
    """
    real_empty = torch.empty
    made = []

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
            made.append(t)
        return t

    monkeypatch.setattr(torch, "empty", empty)
    return made


class _LaunchSpy:
    """Stands in for a kernel object (`kernel[grid](...)`): records each
    launch's keyword arguments, then forwards the launch to `kernel` if given."""

    def __init__(self, kernel, record):
        self.kernel, self.record = kernel, record
        self.arg_names = getattr(kernel, "arg_names", None)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.record.append(kwargs)
            if self.kernel is not None:
                self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture
def launches(monkeypatch):
    """Records, per Triton kernel ("K1", "K2", "K2a"; K2b is K1's kernel, so
    under "K1"), the launchers' GPU-branch launches: "tuned" (the
    triton.autotune wrapper, replaced: nothing runs, as the CPU cannot
    autotune and a GPU test must not), "raw" (the @triton.jit kernel,
    forwarded) and "picked" (the configs heuristic_config returned)."""
    from resnext_kernels.backends.triton import conv1x1_bias_relu as k1
    from resnext_kernels.backends.triton import grouped_conv_bias_relu as k2a
    from resnext_kernels.backends.triton import grouped_conv_conv3 as k2

    records = {}
    for name, mod, raw, tuned in (("K1", k1, "_conv1x1_bias_relu_kernel", "_conv1x1_bias_relu_tuned"),
                                  ("K2", k2, "_grouped_conv_conv3_kernel", "_grouped_conv_conv3_tuned"),
                                  ("K2a", k2a, "_grouped_conv_bias_relu_kernel", "_grouped_conv_bias_relu_tuned")):
        rec = records[name] = {"tuned": [], "raw": [], "picked": []}
        monkeypatch.setattr(mod, tuned, _LaunchSpy(None, rec["tuned"]))
        monkeypatch.setattr(mod, raw, _LaunchSpy(getattr(mod, raw), rec["raw"]))

        def pick(args, real=mod.heuristic_config, picked=rec["picked"]):
            picked.append(real(args))
            return picked[-1]

        monkeypatch.setattr(mod, "heuristic_config", pick)
    return records
