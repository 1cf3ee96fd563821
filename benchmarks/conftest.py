"""pytest-benchmark suite for resnext_kernels: options, parametrization, shared fixtures.

    pytest benchmarks/ --benchmark-only [--benchmark-json out.json]

Cases are (shape, dtype, impl) for the block and (batch, impl) for the whole
model. Groups are "<shape>-<dtype>" (block) and "resnext50-b<batch>" (model),
so --benchmark-group-by=group (the default) puts every implementation of one
shape side by side. See docs/benchmarks.md.
"""

import traceback

import pytest
import torch

from resnext_kernels.bench.cases import (
    IMPLS,
    MODEL_IMPLS,
    Case,
    impl_unavailable_reason,
    model_defaults,
)
from resnext_kernels.bench.measure import (
    Ceilings,
    backend_settings,
    default_device,
    defaults,
)
from resnext_kernels.bench.shapes import (
    SHAPES,
    dtype_name,
    parse_compile_dtypes,
    parse_dtype,
    parse_shapes,
)

_SETTINGS = pytest.StashKey()


def pytest_addoption(parser):
    g = parser.getgroup("resnext_kernels benchmarks")
    g.addoption("--bench-device", default=None, help="cuda or cpu (default: cuda if available, else cpu)")
    g.addoption("--bench-shapes", default=None,
                help="comma-separated shape names or NAME=H:CIN:WIDTH:GROUPS:COUT:STRIDE (default: all)")
    g.addoption("--bench-dtypes", default=None,
                help="comma-separated dtypes (default: bfloat16,float16,float32 on cuda; bfloat16,float32 on cpu)")
    g.addoption("--bench-batch", type=int, default=None, help="block batch size (default: 128 cuda, 2 cpu)")
    g.addoption("--bench-max-hw", type=int, default=None, help="cap on H=W of the block shapes (default: none "
                "on cuda, 14 on cpu)")
    g.addoption("--bench-compile", default=None,
                help="dtypes with a torch.compile baseline: none, all, or a comma list (default: bfloat16 on "
                     "cuda, none on cpu)")
    g.addoption("--bench-seconds", type=float, default=None, help="timing budget per case (default: 0.3 s cuda, "
                "0.2 s cpu)")
    g.addoption("--bench-seed", type=int, default=None, help="seed of weights and inputs (default: random)")
    g.addoption("--bench-threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


class Settings:
    def __init__(self, config):
        opt = config.getoption
        self.device = torch.device(opt("--bench-device") or default_device().type)
        d = defaults(self.device)
        self.shapes = {s.name: s.with_max_hw(opt("--bench-max-hw") or d["max_hw"])
                       for s in parse_shapes([opt("--bench-shapes") or ",".join(SHAPES)])}
        dtypes = opt("--bench-dtypes")
        self.dtypes = [parse_dtype(t) for t in dtypes.split(",")] if dtypes else d["dtypes"]
        compile_dtypes = opt("--bench-compile")
        self.compile_dtypes = (parse_compile_dtypes(compile_dtypes) if compile_dtypes is not None
                               else d["compile_dtypes"])
        self.batch = opt("--bench-batch") or d["batch"]
        self.seconds = opt("--bench-seconds") or d["seconds"]
        seed = opt("--bench-seed")
        self.seed = seed if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())

    def skip_reason(self, impl, dtype):
        return impl_unavailable_reason(impl, self.device, dtype, self.compile_dtypes)


def settings(config):
    if _SETTINGS not in config.stash:
        try:
            config.stash[_SETTINGS] = Settings(config)
        except ValueError as exc:  # a bad --bench-* value
            raise pytest.UsageError(str(exc)) from None
    return config.stash[_SETTINGS]


def pytest_configure(config):
    settings(config)  # report a bad --bench-* value as a usage error, before collection


def pytest_report_header(config):
    s = settings(config)
    return (f"resnext_kernels bench: device={s.device} batch={s.batch} seed={s.seed} "
            f"dtypes={[dtype_name(d) for d in s.dtypes]} "
            f"compile={[dtype_name(d) for d in s.compile_dtypes]} shapes={list(s.shapes)}")


def pytest_generate_tests(metafunc):
    s = settings(metafunc.config)
    if {"shape", "dtype", "impl"} <= set(metafunc.fixturenames):
        # dtype-major: if a time limit cuts the run short, what is lost is the last
        # dtype (float32 by default) of some shapes, not every dtype of the last shapes.
        cases = [(shape, dtype_name(dtype), impl)
                 for dtype in s.dtypes for shape in s.shapes for impl in IMPLS]
        metafunc.parametrize("shape,dtype,impl", cases, ids=["-".join(c) for c in cases])
    if {"model_batch", "model_impl"} <= set(metafunc.fixturenames):
        cases = [(b, impl) for b in model_defaults(s.device)["batches"] for impl in MODEL_IMPLS]
        metafunc.parametrize("model_batch,model_impl", cases, ids=[f"b{b}-{impl}" for b, impl in cases])


@pytest.fixture(scope="session")
def bench_settings(request):
    s = settings(request.config)
    if s.device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda but no CUDA device is available")
    return s


@pytest.fixture(scope="session")
def device_settings(request, bench_settings):
    """TF32 off, cuDNN autotuning on, CPU threads (recorded in each case's extra_info); restored at the end."""
    saved_threads = torch.get_num_threads()
    threads = request.config.getoption("--bench-threads")
    if threads:
        torch.set_num_threads(threads)
    with backend_settings(bench_settings.device) as flags:
        yield {**flags, "cpu_threads": torch.get_num_threads()}
    torch.set_num_threads(saved_threads)


@pytest.fixture(scope="session")
def ceilings(bench_settings, device_settings):
    """Copy bandwidth and matmul rates, measured once per run on the bench device."""
    return Ceilings(bench_settings.device)


class _CaseCache:
    """Holds the most recent Case only (cases come grouped by dtype and shape; frees GPU memory)."""

    def __init__(self, s):
        self.s = s
        self.key = self.case = None

    def get(self, shape_name, dtype):
        key = (shape_name, dtype)
        if key != self.key:
            self.key = self.case = None
            if self.s.device.type == "cuda":
                torch.cuda.empty_cache()
            self.case = Case(self.s.shapes[shape_name], self.s.batch, dtype, self.s.device, self.s.seed)
            self.key = key
        return self.case


@pytest.fixture(scope="session")
def case_cache(bench_settings, device_settings):
    return _CaseCache(bench_settings)


def _call_or_fail(fn, *args):
    """fn(*args), or pytest.fail with the traceback as text.

    A failing test's traceback keeps its frames' locals alive until the session
    ends; on a GPU those are benchmark inputs and modules (gigabytes per case).
    Failing outside the except block, with the traceback as a string, frees them.
    """
    try:
        return fn(*args)
    except Exception:
        failure = traceback.format_exc()
    pytest.fail(failure, pytrace=False)


@pytest.fixture
def call_or_fail():
    return _call_or_fail
