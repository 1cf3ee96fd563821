"""Tests of the benchmark helpers, the report generator and `python -m resnext_kernels bench` (CPU, fast)."""

import datetime
import json
import time

import pytest
import torch

from resnext_kernels import __main__ as cli
from resnext_kernels.backends import reference
from resnext_kernels.bench import cli as cli_bench
from resnext_kernels.bench import measure
from resnext_kernels.bench import report as bench_report
from resnext_kernels.bench.cases import compile_frozen, make_block
from resnext_kernels.bench.measure import (
    RotatingTarget,
    plan_rounds,
    rotation_count,
    time_per_call,
)
from resnext_kernels.bench.shapes import (
    EMULATION_BATCH,
    EMULATION_MAX_FLOPS,
    EMULATION_MAX_HW,
    SHAPES,
    BlockShape,
    block_bytes_floor,
    block_flops,
    block_working_set_bytes,
    emulation_shape,
    parse_shapes,
)
from resnext_kernels.common.timing import median
from resnext_kernels.common.tolerance import error_bound

# -- counting ------------------------------------------------------------------


def test_flops_and_bytes_by_hand_s2_first():
    # s2_first: 56x56, Cin 256, width 256 = 32 groups x 8, Cout 512, stride 2 -> 28x28, projection.
    shape = SHAPES["s2_first"]
    n = 3
    conv1 = n * 56 * 56 * 256 * 256
    conv2 = n * 28 * 28 * 256 * 8 * 9
    conv3 = n * 28 * 28 * 256 * 512
    proj = n * 28 * 28 * 256 * 512
    assert block_flops(shape, n) == 2 * (conv1 + conv2 + conv3 + proj)

    x = n * 256 * 56 * 56
    y = n * 512 * 28 * 28
    weights = 256 * 256 + 256 * 8 * 9 + 512 * 256 + 512 * 256
    biases = 256 + 256 + 512 + 512
    assert block_bytes_floor(shape, n, torch.float16) == 2 * (x + y + weights + biases)
    assert block_bytes_floor(shape, n, torch.float32) == 4 * (x + y + weights + biases)


def test_design_worked_example_s1_batch128_bf16():
    # The design's worked example: 56 GFLOP (26.3 + 3.7 + 26.3) and 0.41 GB moved by a fused block.
    shape = SHAPES["s1"]
    assert block_flops(shape, 128) / 1e9 == pytest.approx(26.3 + 3.7 + 26.3, abs=0.1)
    assert block_bytes_floor(shape, 128, torch.bfloat16) / 1e9 == pytest.approx(0.41, abs=0.01)


@pytest.mark.parametrize("name", ["s1_first", "s2_first", "cifar29_s1", "x101_64x4d_s1"])
def test_flops_match_torch_flop_counter(name):
    # torch's FlopCounterMode counts 2*MACs of every conv of the real torchvision block.
    from torch.utils.flop_counter import FlopCounterMode

    shape = SHAPES[name].with_max_hw(9)
    block = make_block(shape, seed=0)
    x = torch.randn(2, shape.cin, shape.hw, shape.hw)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        block(x)
    assert block_flops(shape, 2) == counter.get_total_flops()


def test_block_shape_matches_torchvision_block():
    for shape in SHAPES.values():
        block = make_block(shape.with_max_hw(4), seed=1)
        assert block.conv1.in_channels == shape.cin
        assert block.conv2.in_channels == shape.width and block.conv2.groups == shape.groups
        assert block.conv3.out_channels == shape.cout
        assert block.conv2.stride == (shape.stride, shape.stride)
        assert (block.downsample is not None) == shape.projection


def test_parse_shapes():
    s = parse_shapes(["s1,s4", "tiny=8:32:16:4:32:2"])
    assert [x.name for x in s] == ["s1", "s4", "tiny"]
    assert (s[2].hw, s[2].cin, s[2].width, s[2].groups, s[2].cout, s[2].stride) == (8, 32, 16, 4, 32, 2)
    assert s[2].projection and s[2].out_hw == 4
    with pytest.raises(ValueError, match="unknown shape"):
        parse_shapes(["s9"])
    with pytest.raises(ValueError, match="does not divide"):
        parse_shapes(["bad=8:32:18:4:32:1"])
    with pytest.raises(ValueError, match="is not planes\\*4"):  # the benchmarks build torchvision blocks
        parse_shapes(["bad=8:32:16:4:30:1"])


# -- timing helpers -----------------------------------------------------------------


def test_rotating_target_cycles_inputs():
    seen = []
    target = RotatingTarget(seen.append, ["a", "b", "c"], torch.device("cpu"))
    for _ in range(7):
        target()
    assert seen == ["a", "b", "c", "a", "b", "c", "a"]


def test_rotating_target_synchronizes_once_per_cycle(monkeypatch):
    synced = []
    monkeypatch.setattr(measure, "synchronize", synced.append)
    cuda = torch.device("cuda")  # only passed along; no GPU needed
    target = RotatingTarget(lambda x: x, [1, 2, 3], cuda)
    for _ in range(7):
        target()
    assert synced == [cuda, cuda]


def test_time_per_call_is_per_call():
    def fn(_):
        time.sleep(0.002)

    times = time_per_call(fn, [0, 1, 2], torch.device("cpu"), budget_seconds=0.05, warmup_rounds=1)
    assert len(times) >= 5
    assert 0.002 <= median(times) < 0.02


def test_rotation_count_and_plan_rounds():
    cpu = torch.device("cpu")
    assert rotation_count(2**30, cpu) == 2  # at least two distinct inputs
    assert rotation_count(1024, cpu) == 4  # CPU cap
    assert rotation_count(2**30, cpu, max_total_bytes=2**30) == 1  # only one fits
    assert plan_rounds(0.01, 1.0) == 100
    assert plan_rounds(1.0, 0.1) == 5
    assert plan_rounds(1e-6, 1.0, max_rounds=50) == 50


def test_tolerance_is_twice_eager_error_plus_a_relative_floor():
    # scale = max |reference|: the floor is 1e-6 of it, for an exact eager result.
    assert error_bound(0.01, 4.0) == pytest.approx(0.02 + 4e-6)
    assert error_bound(0.0, 4.0) == pytest.approx(4e-6)
    assert error_bound(0.01, 4.0, factor=3.0, floor=0.0) == pytest.approx(0.03)


def test_compile_frozen_compiles_every_block_past_the_recompile_limit():
    from torch._dynamo.utils import counters

    counters.clear()
    cpu = torch.device("cpu")
    with torch._dynamo.config.patch(recompile_limit=1):
        for width in (8, 12):  # two shapes of the same Bottleneck.forward; the limit allows one
            shape = BlockShape(f"w{width}", 4, 16, width, 4, 16, 1)
            x = torch.randn(1, 16, 4, 4)
            fn, seconds = compile_frozen(make_block(shape, 0), cpu, x, mode="default")
            assert fn(x).shape == (1, 16, 4, 4) and seconds > 0
    assert counters["stats"]["unique_graphs"] == 2


# -- report generator ---------------------------------------------------------------


def _pytest_doc():
    def case(impl, ms, q1, q3, **extra):
        info = {"shape": "s1", "dtype": "bfloat16", "impl": impl, "batch": 128, "device": "Fake GPU",
                "achieved_GBps": 1234.5, "pct_of_floor": 41.0, "max_abs_err": 0.01, "tolerance": 0.05,
                "within_tolerance": True, **extra}
        return {"group": "s1-bfloat16", "name": f"test_block[s1-bfloat16-{impl}]", "extra_info": info,
                "stats": {"median": ms / 1e3, "q1": q1 / 1e3, "q3": q3 / 1e3}}

    def model(impl, ms, err):
        return {"group": "resnext50-b64", "name": f"test_model[b64-{impl}]", "stats": {"median": ms / 1e3},
                "extra_info": {"model": "resnext50_32x4d", "batch": 64, "resolution": 224, "impl": impl,
                               "images_per_s": 64 / (ms / 1e3), "peak_mem_bytes": 3 * 2**30, "max_abs_err": err}}

    # triton's IQR [0.45, 0.55] ms overlaps compile's [0.5, 0.9], not eager_cl's [0.9, 1.1]
    return {"benchmarks": [case("eager_nchw", 2.0, 1.9, 2.1), case("eager_cl", 1.0, 0.9, 1.1),
                           case("compile", 0.8, 0.5, 0.9),
                           case("triton", 0.5, 0.45, 0.55, within_tolerance=False), model("fused_triton", 50.0, 0.03),
                           model("eager", 100.0, 0.01)],
            "datetime": "2026-01-01T00:00:00", "version": "5.2.3", "commit_info": {"id": "abcdef1234567"}}


def test_add_speedups_uses_faster_eager_and_compile():
    rows = bench_report.add_speedups(bench_report.block_rows_from_pytest(_pytest_doc()))
    by_impl = {r["impl"]: r for r in rows}
    assert by_impl["triton"]["vs_eager"] == pytest.approx(2.0)  # 1.0 ms (eager_cl) / 0.5 ms
    assert by_impl["triton"]["vs_compile"] == pytest.approx(1.6)
    assert by_impl["eager_nchw"]["vs_eager"] == pytest.approx(0.5)
    assert by_impl["triton"]["vs_eager_within_noise"] is False
    assert by_impl["triton"]["vs_compile_within_noise"] is True
    assert by_impl["eager_cl"]["vs_eager_within_noise"] is None  # the baseline itself


def test_within_noise_is_overlap_of_interquartile_ranges():
    def row(q1, q3):
        return {"q1_s": q1, "q3_s": q3}

    assert bench_report.within_noise(row(1.0, 2.0), row(1.5, 3.0)) is True
    assert bench_report.within_noise(row(1.0, 2.0), row(2.0, 3.0)) is True  # touching intervals overlap
    assert bench_report.within_noise(row(1.0, 2.0), row(2.1, 3.0)) is False
    assert bench_report.within_noise(row(2.1, 3.0), row(1.0, 2.0)) is False
    assert bench_report.within_noise(row(1.0, 2.0), {"q1_s": None, "q3_s": None}) is None


def test_spread_is_quartiles_and_extremes():
    times = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert measure.spread(times) == {"q1_s": 2.0, "q3_s": 4.0, "min_s": 1.0, "max_s": 5.0}
    assert measure.spread([7.0]) == {"q1_s": 7.0, "q3_s": 7.0, "min_s": 7.0, "max_s": 7.0}


def test_emulation_shapes_are_small():
    for shape in SHAPES.values():
        small = emulation_shape(shape)
        assert (small.cin, small.width, small.groups, small.cout, small.stride) == (
            shape.cin, shape.width, shape.groups, shape.cout, shape.stride)
        assert 1 <= small.hw <= min(shape.hw, EMULATION_MAX_HW)
        assert block_flops(small, EMULATION_BATCH) <= EMULATION_MAX_FLOPS
        # the largest such size: one pixel more would break the FLOPs budget or the H=W cap
        if small.hw < min(shape.hw, EMULATION_MAX_HW):
            assert block_flops(shape.with_max_hw(small.hw + 1), EMULATION_BATCH) > EMULATION_MAX_FLOPS
    assert emulation_shape(SHAPES["s3"]).hw == 8 and emulation_shape(SHAPES["s4"]).hw == 4


def test_working_set_counts_every_rotating_input():
    shape = SHAPES["s1"].with_max_hw(8)
    x = 2 * 256 * 8 * 8 * 4
    assert block_working_set_bytes(shape, 2, torch.float32, 3) == block_bytes_floor(shape, 2, torch.float32) + 2 * x


def test_markdown_report():
    md = bench_report.render([_pytest_doc()])
    lines = md.splitlines()
    triton = next(line for line in lines if "| triton |" in line)
    assert triton.split(" | ")[3:7] == ["0.5", "20.0", "2.00x", "1.60x (noise)"]
    assert bench_report.table_notes([])[1] in lines  # the noise legend under the table
    assert triton.rstrip(" |").endswith("NO")  # out of tolerance is visible
    models = [line for line in lines if line.startswith("| resnext50_32x4d")]
    assert "| eager |" in models[0]  # eager first, whatever the input order
    fused = models[1].split(" | ")
    assert fused[3:8] == ["fused_triton", "50", "1280.0", "2.00x", "-"]
    assert fused[8:] == ["3072", "3.00e-02", "3.00 |"]
    with pytest.raises(ValueError, match="neither"):
        bench_report.render([{"something": "else"}])


def test_result_stem_sanitizes_card_name():
    stem = bench_report.result_stem("NVIDIA H100 80GB HBM3", "1a2b3c4", datetime.date(2026, 1, 2))
    assert stem == "2026-01-02_NVIDIA-H100-80GB-HBM3_1a2b3c4"


# -- the CLI -------------------------------------------------------------------------

TINY = ["tiny_id=6:32:16:4:32:1", "tiny_proj=7:16:16:4:32:2"]
# One thread: on a loaded 2-core machine two OpenMP threads made these tiny blocks ~100x slower.
FAST = ["--quick", "--device", "cpu", "--seconds", "0.02", "--threads", "1"]


def test_bench_cli_quick_cpu(tmp_path, capsys):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.get_num_threads())
    rc = cli.main(["bench", *FAST, "--shapes", *TINY, "--json", str(out_json), "--plot", str(out_png)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    # global settings are restored for whatever runs next in this process
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
            torch.get_num_threads()) == flags
    assert "| shape | dtype | impl | ms | IQR % | vs eager | vs compile |" in printed
    doc = json.loads(out_json.read_text())
    assert {(v["shape"], v["dtype"], v["backend"]) for v in doc["validation"]} == {
        (s, d, "reference") for s in ("tiny_id", "tiny_proj") for d in ("bfloat16", "float32")}
    assert all(v["ok"] for v in doc["validation"])
    assert doc["settings"]["cudnn_allow_tf32"] is False  # the run itself used real fp32
    impls = {(r["shape"], r["dtype"], r["impl"]) for r in doc["rows"] if r["median_s"] > 0}
    assert len(impls) == 2 * 2 * 3  # shapes x dtypes x (reference, eager_nchw, eager_cl)
    assert out_png.stat().st_size > 0
    assert "tiny_proj | float32 | reference" in bench_report.render([doc])
    _check_cpu_header_emulation_and_marks(printed, doc)


def _cell(printed, row, column):
    """The table cell of `column` in the printed line of row (shape, dtype, impl)."""
    header = next(line for line in printed.splitlines() if line.startswith("| shape |"))
    names = [c.strip() for c in header.strip("|").split("|")]
    line = next(line for line in printed.splitlines()
                if line.startswith(f"| {row['shape']} | {row['dtype']} | {row['impl']} |"))
    return [c.strip() for c in line.strip("|").split("|")][names.index(column)]


def _check_cpu_header_emulation_and_marks(printed, doc):
    lines = printed.splitlines()
    # the header: every fused backend with its status, the reason it is not timed, the command that would run it
    cuda = doc["backends"]["cuda"]
    assert cuda["status"] == "not run" and cuda["reason"] and "GPU" in cuda["command"]
    assert f"  cuda           not run: {cuda['reason']}" in lines
    assert any(line.strip() == f"run it: {cuda['command']}" for line in lines)
    for name in ("triton", "cuda_emulated"):  # the test session sets TRITON_INTERPRET=1 (conftest)
        assert doc["backends"][name]["status"] == "correctness only"
        assert f"  {name:<14} {cli_bench.EMULATION_LABEL} ({cli_bench.EMULATION_KIND[name]})" in lines
    assert doc["backends"]["reference"]["status"] == "timed"
    assert "no fused backend" not in printed and "validation (the reference backend" in printed
    # correctness only: every tiny shape and dtype, cuda_emulated and triton (not bf16 in the interpreter)
    rows = {(e["shape"], e["dtype"], e["backend"]): e for e in doc["emulated"]}
    assert set(rows) == {(s, d, b) for s in ("tiny_id", "tiny_proj") for d in ("bfloat16", "float32")
                         for b in ("cuda_emulated", "triton")}
    assert f"{cli_bench.EMULATION_LABEL} (" in printed
    for (shape, dtype, backend), e in rows.items():
        if backend == "triton" and dtype == "bfloat16":
            assert e["skipped"] and e["ok"] is None and f"skip  {shape}" in printed and e["skipped"] in printed
            continue
        assert e["skipped"] is None and e["ok"] is True and e["batch"] == 1, e
        assert 0 <= e["max_abs_err"] <= e["tolerance"]
        assert any(line.startswith(f"  ok    {shape} ") and f" {dtype} " in line and f" {backend} " in line
                   and f"max err {e['max_abs_err']:.3e}" in line for line in lines)
    # the notes under the table, and each row's marks against its JSON
    assert doc["notes"] == bench_report.table_notes(doc["rows"]) and all(n in lines for n in doc["notes"])
    assert "% of floor = time floor / time x 100" in doc["notes"][0]
    for r in doc["rows"]:
        assert r["min_s"] <= r["q1_s"] <= r["median_s"] <= r["q3_s"] <= r["max_s"]
        assert r["working_set_in_cache"] == (r["working_set_bytes"] <= r["cache_bytes"])
        assert _cell(printed, r, "% of floor").endswith(bench_report.CACHE_MARK) == r["working_set_in_cache"]
        assert _cell(printed, r, "IQR %") == f"{100 * (r['q3_s'] - r['q1_s']) / r['median_s']:.1f}"
        group = [g for g in doc["rows"] if (g["shape"], g["dtype"]) == (r["shape"], r["dtype"])]
        best = min((g for g in group if g["impl"] in bench_report.EAGER_IMPLS), key=lambda g: g["median_s"])
        overlap = r["q1_s"] <= best["q3_s"] and best["q1_s"] <= r["q3_s"]
        assert r["vs_eager_within_noise"] == (None if r is best else overlap)
        assert _cell(printed, r, "vs eager").endswith(bench_report.NOISE_MARK) == bool(r["vs_eager_within_noise"])
    assert any(r["working_set_in_cache"] for r in doc["rows"])  # tiny blocks: the note explains the mark
    assert bench_report.CACHE_MARK.strip() in doc["notes"][0]


def test_backend_header_on_a_working_gpu_is_empty(monkeypatch, capsys):
    # On CUDA the header lists only fused backends that are not timed: none where triton and cuda are usable.
    def available():
        return {name: {"reason": {"cpu": "whatever", "cuda": None if name != "cuda_emulated" else "CPU only"}}
                for name in ("reference", "triton", "cuda", "cuda_emulated")}

    monkeypatch.setattr(cli_bench.registry, "available_backends", available)
    cuda = torch.device("cuda")  # only passed along; no GPU needed
    status = cli_bench.backend_status(cuda)
    assert [status[n]["status"] for n in ("reference", "triton", "cuda")] == ["timed"] * 3
    cli_bench.print_backend_status(status, cuda)
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(cli_bench.registry, "available_backends",
                        lambda: {**available(), "cuda": {"reason": {"cpu": "x", "cuda": "no _C"}}})
    cli_bench.print_backend_status(cli_bench.backend_status(cuda), cuda)
    assert "  cuda           not run: no _C" in capsys.readouterr().out.splitlines()


def test_backend_status_without_the_interpreter(monkeypatch):
    from resnext_kernels.common import settings

    monkeypatch.setattr(settings, "triton_interpreter_enabled", lambda: False)
    triton = cli_bench.backend_status(torch.device("cpu"))["triton"]
    assert triton["status"] == "not run" and "TRITON_INTERPRET=1" in triton["reason"]
    assert triton["command"].startswith("TRITON_INTERPRET=1 python -m resnext_kernels bench")


def test_bench_cli_failed_validation_exits_nonzero(monkeypatch, capsys):
    good = reference.bottleneck_inference_reference

    def wrong(*args):
        return good(*args) * 1.01 + 0.01

    monkeypatch.setattr(reference, "bottleneck_inference_reference", wrong)
    real_kernel = cli_bench.registry.kernel

    def kernel(name):  # a planted bug in the emulated CUDA kernel: its correctness-only check must fail
        k = real_kernel(name)
        return (lambda *args: k(*args) * 1.01 + 0.01) if name == "cuda_emulated" else k

    monkeypatch.setattr(cli_bench.registry, "kernel", kernel)
    rc = cli.main(["bench", *FAST, "--shapes", TINY[0], "--dtypes", "float32"])
    printed = capsys.readouterr().out
    assert rc == 1
    assert "FAIL  tiny_id" in printed and "VALIDATION FAILED: tiny_id float32 reference" in printed
    assert (f"VALIDATION FAILED ({cli_bench.EMULATION_LABEL}): tiny_id 6:32:16:4:32:1 float32 cuda_emulated"
            in printed)
    assert any(line.startswith("  ok    tiny_id ") and " triton " in line for line in printed.splitlines())
    # the failed backend is not timed; the baselines are
    assert "| tiny_id | float32 | reference |" not in printed
    assert "| tiny_id | float32 | eager_cl |" in printed


def test_bench_cli_rejects_unknown_shape(capsys):
    assert cli.main(["bench", *FAST, "--shapes", "s9"]) == 2
    assert "unknown shape 's9'" in capsys.readouterr().err


def test_bench_cli_progress_without_tqdm(monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):
        if name == "tqdm":
            raise ImportError("no tqdm here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    monkeypatch.setattr(cli_bench, "EMULATED_BACKENDS", ())  # only the timing's progress matters here
    assert cli.main(["bench", *FAST, "--shapes", TINY[0], "--dtypes", "float32"]) == 0
    err = capsys.readouterr().err
    assert "[1/3] tiny_id float32 reference" in err and "[3/3] tiny_id float32 eager_cl" in err
