"""tuning.py (choosing the fastest correct alternative by timing it) and the
run-time choice of backend="auto" among several usable fused backends. On
CPU, auto's candidates are stood in for by the reference and the emulated
CUDA kernel (on a GPU they are cuda and triton)."""

import pytest
import torch
from helpers import Block, assert_close_to_reference, fake_timer

from resnext_kernels.backends import registry
from resnext_kernels.backends.reference import bottleneck_inference_reference
from resnext_kernels.common import settings, tuning
from resnext_kernels.ops import inference


def test_select_fastest_times_once_per_key_and_caches_the_fastest():
    cache = {}
    time_candidate, timed = fake_timer({"a": 3.0, "b": 1.0, "c": 2.0})
    pick = lambda key: tuning.select_fastest(cache, key, lambda: "abc", time_candidate, enabled=True,  # noqa: E731
                                             capturing=False, default="a")
    assert pick("k1") == "b" and timed == ["a", "b", "c"]
    assert pick("k1") == "b" and timed == ["a", "b", "c"]  # cached: no timing
    assert pick("k2") == "b" and timed == ["a", "b", "c"] * 2
    assert cache == {"k1": "b", "k2": "b"}


def test_select_fastest_ties_go_to_the_earlier_candidate():
    time_candidate, _ = fake_timer({"a": 1.0, "b": 1.0})
    assert tuning.select_fastest({}, "k", lambda: "ab", time_candidate, enabled=True, capturing=False,
                                 default="b") == "a"


def test_select_fastest_off_capturing_or_single_candidate_does_not_time():
    time_candidate, timed = fake_timer({"a": 2.0, "b": 1.0})
    cache = {}
    assert tuning.select_fastest(cache, "k", lambda: "ab", time_candidate, enabled=False, capturing=False,
                                 default="a") == "a"
    assert tuning.select_fastest(cache, "k", lambda: "ab", time_candidate, enabled=True, capturing=True,
                                 default="a") == "a"
    assert cache == {} and timed == []
    assert tuning.select_fastest(cache, "one", lambda: "b", time_candidate, enabled=True, capturing=False,
                                 default="a") == "b"
    assert tuning.select_fastest(cache, "none", lambda: "", time_candidate, enabled=True, capturing=False,
                                 default="a") == "a"
    assert timed == [] and cache == {"one": "b", "none": "a"}
    cache["k"] = "b"
    assert tuning.select_fastest(cache, "k", lambda: "ab", time_candidate, enabled=True, capturing=True,
                                 default="a") == "b"  # a cached choice holds under capture


def test_seconds_per_call_warms_up_then_times_the_repeats():
    calls = []
    seconds = tuning.seconds_per_call(lambda: calls.append(1), torch.device("cpu"))
    assert len(calls) == 1 + tuning.REPEATS
    assert 0.0 <= seconds < 1.0


def test_tune_key_separates_layout_alignment_and_problem():
    x = torch.randn(2, 16, 5, 7).contiguous(memory_format=torch.channels_last)

    def key(t, **kw):
        args = {"width": 32, "cout": 16, "stride": 1, "dilation": 1, "groups": 4, "allow_tf32": True,
                "projection": False, **kw}
        return tuning.tune_key(t, **args)

    assert key(x) == key(x.clone(memory_format=torch.channels_last))
    unaligned = torch.empty(x.numel() + 1)[1:].as_strided(x.shape, x.stride())
    others = [key(x.contiguous()), key(x[:, :, :, :6]), key(unaligned), key(x.half()), key(x[:1]),
              key(x, allow_tf32=False), key(x, stride=2), key(x, dilation=2), key(x, groups=8), key(x, width=64),
              key(x, cout=32), key(x, projection=True)]
    assert len({key(x), *others}) == len(others) + 1



def _emulation_or_skip():
    reason = registry.unavailable_reason("cuda_emulated", "cpu")
    if reason is not None:
        pytest.skip(f"cuda_emulated unusable: {reason}")


@pytest.fixture
def two_candidates(monkeypatch):
    """auto on CPU chooses between the reference and the emulated CUDA kernel."""
    _emulation_or_skip()
    monkeypatch.setattr(registry, "auto_candidates", lambda device: ("cuda_emulated", "reference"))
    monkeypatch.setattr(inference, "AUTO_CHOICES", {})
    monkeypatch.setenv(settings.AUTOTUNE_ENV, "1")
    # Full fp32 in the emulated kernel, so the fp32 tolerance (2x eager's error) applies.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def _check(block, args):
    y = inference.bottleneck_inference(*args, stride=block.stride, dilation=block.dilation, groups=block.groups)
    ref = bottleneck_inference_reference(*[None if t is None else t.double() for t in args], *block.conv)
    eager = bottleneck_inference_reference(*args, *block.conv)
    assert_close_to_reference(y, ref, eager)


def test_auto_keeps_the_faster_backend_measured(two_candidates, monkeypatch):
    # Real timing of the two candidates; which one is faster depends on the
    # machine's load (the emulated kernel is single-threaded, ATen's grouped
    # conv on CPU is not fast either), so the test checks that auto keeps
    # whichever measured faster.
    measured = []
    real_seconds = tuning.seconds_per_call
    monkeypatch.setattr(tuning, "seconds_per_call",
                        lambda fn, device: measured.append(real_seconds(fn, device)) or measured[-1])
    block = Block(1, 16, 32, 24, 4, 5, 6, stride=2, projection=True)
    args = block.make(torch.float32)
    _check(block, args)
    assert len(measured) == 2
    fastest = ("cuda_emulated", "reference")[min(range(2), key=measured.__getitem__)]
    assert list(inference.AUTO_CHOICES.values()) == [fastest]


def test_auto_runs_the_cached_choice_and_retunes_per_problem(two_candidates, monkeypatch):
    runs = []
    real_kernel = registry.kernel

    def spy_kernel(name):
        def run(*args):
            runs.append(name)
            return real_kernel(name)(*args)

        return run

    monkeypatch.setattr(registry, "kernel", spy_kernel)
    time_candidate, timed = fake_timer({"cuda_emulated": 1.0, "reference": 2.0})
    # Time by the name the timed call runs: the spy records it.
    monkeypatch.setattr(tuning, "seconds_per_call", lambda fn, device: (fn(), time_candidate(runs[-1]))[1])
    block = Block(1, 8, 16, 8, 2, 4, 5)
    args = block.make(torch.float32)
    _check(block, args)
    assert timed == ["cuda_emulated", "reference"]
    assert runs == ["cuda_emulated", "reference", "cuda_emulated"]  # one timed run each, then the choice
    runs.clear()
    _check(block, args)
    assert runs == ["cuda_emulated"] and len(timed) == 2  # cached
    _check(block, block.make(torch.float32, channels_last=False))  # another layout: another problem
    assert len(timed) == 4 and len(inference.AUTO_CHOICES) == 2


def test_auto_without_autotuning_takes_the_first_candidate_untimed(two_candidates, monkeypatch):
    monkeypatch.setenv(settings.AUTOTUNE_ENV, "0")
    monkeypatch.setattr(tuning, "seconds_per_call", lambda fn, device: pytest.fail("timed with autotuning off"))
    block = Block(1, 8, 16, 8, 2, 4, 5)
    _check(block, block.make(torch.float32))
    assert inference.AUTO_CHOICES == {}


def test_auto_on_cpu_is_the_reference_untimed(monkeypatch):
    monkeypatch.setattr(inference, "AUTO_CHOICES", {})
    monkeypatch.setattr(tuning, "seconds_per_call", lambda fn, device: pytest.fail("nothing to choose from"))
    assert registry.auto_candidates("cpu") == ("reference",)
    block = Block(1, 8, 16, 8, 2, 4, 5)
    _check(block, block.make(torch.float64))
    assert inference.AUTO_CHOICES == {}


@pytest.mark.cuda
def test_auto_on_gpu_chooses_among_the_usable_fused_backends(monkeypatch):
    monkeypatch.setattr(inference, "AUTO_CHOICES", {})
    monkeypatch.setenv(settings.AUTOTUNE_ENV, "1")
    candidates = registry.auto_candidates("cuda")
    block = Block(2, 64, 64, 64, 8, 9, 11)
    for dtype in (torch.bfloat16, torch.float16):
        args = block.make(dtype, device="cuda")
        y = inference.bottleneck_inference(*args, stride=block.stride, dilation=block.dilation, groups=block.groups)
        cpu = [None if t is None else t.cpu() for t in args]
        ref = bottleneck_inference_reference(*[None if t is None else t.double() for t in cpu], *block.conv)
        eager = bottleneck_inference_reference(*args, *block.conv).cpu()
        assert_close_to_reference(y.cpu(), ref, eager)
    choices = set(inference.AUTO_CHOICES.values())
    if len(candidates) > 1:
        assert len(inference.AUTO_CHOICES) == 2 and choices <= set(candidates)
    else:
        assert inference.AUTO_CHOICES == {}
