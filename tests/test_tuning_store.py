"""The tuning store (common/tuning_store.py) behind every timed choice
(tuning.select_fastest), rk.tune / `python -m resnext_kernels tune`, and one
choice across DDP ranks.

Real timing on CPU: the emulated CUDA kernel's tile plans, timed inside a
tune run (`tune --device cpu --backend cuda_emulated`). Where a choice has
to be forced (which candidate wins, ranks that disagree), the timer is
monkeypatched. Every test points RESNEXT_KERNELS_CACHE_DIR at its own tmp
directory (the suite's conftest turns the disk part off for the others).
"""

import datetime
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import fake_timer

import resnext_kernels as rk
from resnext_kernels import warmup
from resnext_kernels.__main__ import main
from resnext_kernels.backends import registry
from resnext_kernels.backends.cuda import planner
from resnext_kernels.common import settings, tuning, tuning_store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The smallest ResNeXt-29 (3 distinct block problems), on 8x8 images.
TUNE_ARGS = ["tune", "--model", "resnext29", "--blocks-per-stage", "1", "--batch", "1", "--dtype", "float32",
             "--device", "cpu", "--backend", "cuda_emulated", "--image-size", "8"]


@pytest.fixture
def store_dir(tmp_path, monkeypatch):
    """A fresh store in tmp_path (and a fresh TuningStore: its warnings are once per store)."""
    monkeypatch.setenv(settings.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(tuning_store, "STORE", tuning_store.TuningStore())
    monkeypatch.setenv(settings.AUTOTUNE_ENV, "1")
    return tmp_path


def _entries(directory):
    with open(os.path.join(directory, tuning_store.FILE_NAME), encoding="utf-8") as f:
        content = json.load(f)
    assert content["format"] == tuning_store.FORMAT
    return content["entries"]


def _pick(cache, key, seconds, valid_for, *, capturing=False, choice="test"):
    time_candidate, timed = fake_timer(seconds)
    value = tuning.select_fastest(cache, key, lambda: list(seconds), time_candidate, enabled=True,
                                  capturing=capturing, default="a", choice=choice, validity=lambda: valid_for)
    return value, timed


KEY = ((2, 16, 5, 7), "torch.float32", "channels_last", True, True, 1, 1, 4, 32, 16, False, "cuda", 0)
VALID = {"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3", "sm_count": 132, "torch": "2.14.1", "triton": "3.8.0"}


def test_a_new_process_finds_the_choice_instead_of_timing(store_dir):
    value, timed = _pick({}, KEY, {"a": 3.0, "b": 1.0}, VALID)
    assert value == "b" and timed == ["a", "b"]
    (record,) = _entries(store_dir).values()
    assert record["value"] == "b" and record["choice"] == "test" and record["validity"] == VALID
    # A new process: empty memory, a new store object reading the file.
    tuning_store.STORE = tuning_store.TuningStore()
    cache = {}
    with tuning.tune_run() as events:
        value, timed = _pick(cache, KEY, {"a": 3.0, "b": 1.0}, VALID)
    assert value == "b" and timed == [] and events == ["stored"] and cache == {KEY: "b"}
    # The device index is not part of the stored problem: another GPU of the node finds it too.
    value, timed = _pick({}, KEY[:-1] + (1,), {"a": 3.0, "b": 1.0}, VALID)
    assert value == "b" and timed == []


@pytest.mark.parametrize("field, value", [("gpu", "NVIDIA H200"), ("sm_count", 114), ("torch", "2.11.0"),
                                          ("triton", "3.6.0")])
def test_a_gpu_or_version_change_misses(store_dir, field, value):
    _pick({}, KEY, {"a": 3.0, "b": 1.0}, VALID)
    changed, timed = _pick({}, KEY, {"a": 1.0, "b": 3.0}, {**VALID, field: value})
    assert changed == "a" and timed == ["a", "b"]
    assert len(_entries(store_dir)) == 2


def test_validity_names_the_gpu_its_software_and_the_versions(monkeypatch):
    props = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", multi_processor_count=132, major=9, minor=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    tuning_store._cuda_validity.cache_clear()
    try:
        h100 = tuning_store.validity(torch.device("cuda", 0))
        props.name = "NVIDIA H200"
        tuning_store._cuda_validity.cache_clear()
        h200 = tuning_store.validity(torch.device("cuda", 0))
    finally:
        tuning_store._cuda_validity.cache_clear()
    assert h100["gpu"] == "NVIDIA H100 80GB HBM3" and h100["sm_count"] == 132 and h100["capability"] == "9.0"
    assert {"cuda", "driver", "torch", "triton", "resnext_kernels"} <= set(h100)
    assert tuning_store.entry_key("auto", [1], h100) != tuning_store.entry_key("auto", [1], h200)
    emulated = tuning_store.validity(torch.device("cpu"), emulation="abc")
    assert emulated["device"] == "cpu" and emulated["emulation"] == "abc"


@pytest.mark.parametrize("content", [b"{not json", b'{"format": 1, "entries": {"k": ', b"", b"\xff\xfe\x00",
                                     b'{"format": 999, "entries": {}}', b"[1, 2]"])
def test_a_corrupt_or_foreign_file_is_ignored_with_one_warning(store_dir, content):
    path = os.path.join(store_dir, tuning_store.FILE_NAME)
    with open(path, "wb") as f:
        f.write(content)
    with pytest.warns(tuning_store.TuningStoreWarning, match="ignoring the tuning store") as warned:
        value, timed = _pick({}, KEY, {"a": 3.0, "b": 1.0}, VALID)
        _pick({}, KEY[:-2] + (False, 0), {"a": 3.0, "b": 1.0}, VALID)
    assert value == "b" and timed == ["a", "b"]
    assert len([w for w in warned if issubclass(w.category, tuning_store.TuningStoreWarning)]) == 1
    assert len(_entries(store_dir)) == 2  # replaced by a valid file


def test_a_stored_value_the_build_does_not_offer_is_a_miss(store_dir):
    _pick({}, KEY, {"a": 3.0, "b": 1.0}, VALID)
    tuning_store.STORE = tuning_store.TuningStore()
    value, timed = _pick({}, KEY, {"a": 3.0, "c": 1.0}, VALID)  # "b" is no longer a candidate
    assert value == "c" and timed == ["a", "c"]


def test_capture_takes_the_stored_choice_else_the_default_untimed(store_dir):
    cache = {}
    value, timed = _pick(cache, KEY, {"a": 3.0, "b": 1.0}, VALID, capturing=True)
    assert value == "a" and timed == [] and cache == {}  # nothing stored: the default, nothing kept
    _pick({}, KEY, {"a": 3.0, "b": 1.0}, VALID)  # tuned outside a capture (another process, say)
    value, timed = _pick(cache, KEY, {"a": 3.0, "b": 1.0}, VALID, capturing=True)
    assert value == "b" and timed == [] and cache == {KEY: "b"}


def test_the_disk_part_off_keeps_choices_in_memory_only(tmp_path, monkeypatch):
    monkeypatch.setenv(settings.CACHE_DIR_ENV, settings.CACHE_DIR_OFF)
    monkeypatch.chdir(tmp_path)
    cache = {}
    assert _pick(cache, KEY, {"a": 3.0, "b": 1.0}, VALID) == ("b", ["a", "b"])
    assert cache == {KEY: "b"} and tuning_store.store_path() is None and os.listdir(tmp_path) == []


def test_the_default_location_is_the_xdg_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv(settings.CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert settings.tuning_cache_dir() == os.path.join(str(tmp_path), "resnext_kernels", "tuning")


def _write_entries(directory, writer, count):
    os.environ[settings.CACHE_DIR_ENV] = directory
    store = tuning_store.TuningStore()
    for i in range(count):
        store.put(f"w{writer}-{i}", {"choice": "test", "problem": [writer, i], "validity": {}, "value": i})


def test_concurrent_writers_leave_a_valid_store_with_every_entry(store_dir):
    writers, count = 4, 25
    context = multiprocessing.get_context("fork")  # the children only write JSON files
    procs = [context.Process(target=_write_entries, args=(str(store_dir), w, count)) for w in range(writers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    entries = _entries(store_dir)
    assert sorted(entries) == sorted(f"w{w}-{i}" for w in range(writers) for i in range(count))
    assert [f for f in os.listdir(store_dir) if f.endswith(".tmp")] == []


# -- tune: real timing of the emulated kernel's plans, in two processes -------------


def _emulation_or_skip():
    reason = registry.unavailable_reason("cuda_emulated", "cpu")
    if reason is not None:
        pytest.skip(f"cuda_emulated unusable: {reason}")


def test_tune_fills_the_store_and_a_second_process_times_nothing(store_dir, capsys, monkeypatch):
    _emulation_or_skip()
    monkeypatch.setattr(planner, "EMULATED_PLAN_RANKS", {})
    monkeypatch.setattr(tuning, "REPEATS", 1)  # real timing, one warm-up and one timed call per plan
    assert main(TUNE_ARGS) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "tuned 3 problems: 3 timed, 0 from cache"
    entries = _entries(store_dir)
    assert len(entries) == 3
    assert {r["choice"] for r in entries.values()} == {"cuda_plan_emulated"}
    assert all(len(r["seconds"]) == planner.AUTOTUNE_TOP_K for r in entries.values())  # really timed
    before = os.stat(os.path.join(store_dir, tuning_store.FILE_NAME)).st_mtime_ns
    done = subprocess.run([sys.executable, "-m", "resnext_kernels", *TUNE_ARGS], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "tuned 3 problems: 0 timed, 3 from cache"
    assert os.stat(os.path.join(store_dir, tuning_store.FILE_NAME)).st_mtime_ns == before


def _tiny_blocks(backend):
    """Three fused blocks, two distinct problems: two identity blocks of one
    shape, then a stride-2 projection block (16 -> 32 channels, 2 groups)."""
    def block(planes, stride=1):
        downsample = None
        if stride != 1:
            downsample = torch.nn.Sequential(torch.nn.Conv2d(16, planes * 4, 1, stride=stride, bias=False),
                                             torch.nn.BatchNorm2d(planes * 4))
        return rk.FusedResNeXtBlock(16, planes, stride, downsample, groups=2, base_width=16, backend=backend)

    return torch.nn.Sequential(block(4), block(4), block(8, stride=2)).eval()


def test_rk_tune_counts_problems_and_leaves_the_model_as_it_was(store_dir, monkeypatch):
    _emulation_or_skip()
    monkeypatch.setattr(planner, "EMULATED_PLAN_RANKS", {})
    runs = iter(range(1000, 0, -1))  # every later timing faster: the last rank timed wins
    monkeypatch.setattr(tuning, "seconds_per_call", lambda fn, device: float(next(runs)))
    model = _tiny_blocks("cuda_emulated")
    x = torch.randn(1, 16, 5, 5)
    assert rk.tune(model, x) == warmup.TuneReport(2, 2, 0, 0)
    assert set(planner.EMULATED_PLAN_RANKS.values()) == {planner.AUTOTUNE_TOP_K - 1}
    monkeypatch.setattr(planner, "EMULATED_PLAN_RANKS", {})
    assert rk.tune(model, x) == warmup.TuneReport(2, 0, 2, 0)  # from the store
    assert rk.tune(model, x) == warmup.TuneReport(2, 0, 2, 0)  # from this process's memory
    # Another torch version: the stored timings do not hold.
    versions = {**tuning_store.software_versions(), "torch": "0.0"}
    monkeypatch.setattr(tuning_store, "software_versions", lambda: versions)
    monkeypatch.setattr(planner, "EMULATED_PLAN_RANKS", {})
    assert rk.tune(model, x) == warmup.TuneReport(2, 2, 0, 0)
    assert len(_entries(store_dir)) == 4
    # Outside tune the emulation never times.
    monkeypatch.setattr(tuning, "seconds_per_call", lambda fn, device: pytest.fail("timed outside tune"))
    with torch.no_grad():
        model(torch.randn(2, 16, 5, 5))


def test_rk_tune_in_train_mode_restores_the_running_statistics(store_dir):
    model = rk.models.resnext29(2, 4, blocks_per_stage=1, backend="reference").train()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    assert rk.tune(model, torch.randn(2, 3, 8, 8)) == warmup.TuneReport(3, 0, 0, 3)  # nothing to time there
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert warmup.report_line(warmup.TuneReport(3, 0, 0, 3)) == "tuned 3 problems: 0 timed, 0 from cache, " \
                                                               "3 with nothing to time"


def test_rk_tune_rejects_a_model_without_fused_blocks():
    with pytest.raises(ValueError, match="no FusedResNeXtBlock"):
        rk.tune(torch.nn.Conv2d(3, 3, 1), torch.randn(1, 3, 4, 4))
    with pytest.raises(TypeError, match="example_input"):
        rk.tune(rk.models.resnext29(2, 4, blocks_per_stage=1), [1])


def test_info_shows_the_store_and_the_entries_valid_here(store_dir, capsys):
    valid_here = tuning_store.validity(torch.device("cpu"), emulation="abc")
    _pick({}, KEY, {"a": 3.0, "b": 1.0}, valid_here, choice="cuda_plan_emulated")
    _pick({}, KEY, {"a": 3.0, "b": 1.0}, VALID, choice="auto")  # an H100's: not this machine's
    assert main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("tuning store"))
    assert str(store_dir) in lines[at] and "(2 entries, 1 valid on this machine)" in lines[at]
    assert "cuda_plan_emulated" in lines[at + 1] and lines[at + 1].endswith("-> b") and len(lines) == at + 2


# -- one choice across DDP ranks: 2 gloo processes ---------------------------------

WORLD = 2


def _rank_worker(rank, port, directory, emulated):
    os.environ[settings.CACHE_DIR_ENV] = directory
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        # Timing forced to disagree: rank 0 measures "b" as the faster, rank 1 "a" (the default).
        cache, timed = {}, []

        def time_candidate(c):
            timed.append(c)
            return 0.0 if c == "ba"[rank] else 1.0

        value = tuning.select_fastest(cache, KEY, lambda: "ab", time_candidate, enabled=True, capturing=False,
                                      default="a", choice="test", validity=lambda: VALID)
        assert value == "b" and cache == {KEY: "b"}, (rank, value)
        assert timed == (["a", "b"] if rank == 0 else []), (rank, timed)
        # RESNEXT_KERNELS_TUNE_SYNC=0: each rank times and keeps its own choice (no collective).
        os.environ[settings.TUNE_SYNC_ENV] = "0"
        own, timed = {}, []
        value = tuning.select_fastest(own, KEY, lambda: "ab", time_candidate, enabled=True, capturing=False,
                                      default="a", choice=None)
        assert value == "ba"[rank] and timed == ["a", "b"], (rank, value, timed)
        os.environ[settings.TUNE_SYNC_ENV] = "1"
        if emulated:
            # The emulated kernel's plan ranks, through rk.tune: rank r measures plan rank r + 1 as the fastest.
            tuning.seconds_per_call = lambda fn, device: 0.0 if _plan_rank(fn) == rank + 1 else 1.0
            report = rk.tune(_tiny_blocks("cuda_emulated"), torch.randn(1, 16, 5, 5))
            chosen = [None] * WORLD
            dist.all_gather_object(chosen, sorted(planner.EMULATED_PLAN_RANKS.values()))
            assert chosen[0] == chosen[1] == [1, 1], chosen
            assert report == warmup.TuneReport(2, 2, 0, 0), report  # both ranks report rank 0's timing
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # tests/test_training_sync_bn.py: gloo may abort at interpreter exit


def _plan_rank(fn):
    """The plan rank a planner timing closure (lambda: forward_op(*args, rank)) runs."""
    names = fn.__code__.co_freevars
    return fn.__closure__[names.index("rank")].cell_contents


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_ranks_whose_timings_disagree_run_rank_0s_choice(store_dir):
    emulated = registry.unavailable_reason("cuda_emulated", "cpu") is None
    context = mp.start_processes(_rank_worker, args=(_free_port(), str(store_dir), emulated), nprocs=WORLD,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + 300
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("the ranks did not finish within 300 s (a broadcast waiting for a lost peer?)")
    assert len(_entries(store_dir)) == 1 + 2 * emulated  # written once, by rank 0


def test_a_miss_under_no_grad_issues_no_collective(store_dir, monkeypatch):
    """Several ranks (faked): a miss in a training step (grad mode on) goes
    through the broadcast; under torch.no_grad (evaluation, often on rank 0
    alone) it must not, or that rank would wait for ranks that never come."""
    monkeypatch.setattr(tuning, "_ranks", lambda: 2)
    agreed = []
    monkeypatch.setattr(tuning, "_agreed", lambda resolve, candidates: agreed.append(1) or resolve())
    time_candidate, _ = fake_timer({"a": 1.0, "b": 0.0})
    with torch.no_grad():
        value = tuning.select_fastest({}, KEY, lambda: "ab", time_candidate, enabled=True, capturing=False,
                                      default="a", choice=None)
    assert value == "b" and agreed == []
    value = tuning.select_fastest({}, KEY, lambda: "ab", time_candidate, enabled=True, capturing=False,
                                  default="a", choice=None)
    assert value == "b" and agreed == [1]
