"""CPU tests of scripts/gpu_check.sh's mechanics: its plan (the stage table fits
one device lease), stage parsing, the deadline, and what it leaves in OUTDIR
(the device tool returns at most 8 files, each named with letters, digits,
'.', '_' and '-' only). The GPU stages themselves only run on a GPU machine;
scripts/gpu_check_prepare.sh rehearses them on CPU (a dry run that resolves
every stage's command, too slow for the suite)."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("scripts/gpu_check.sh", "scripts/gpu_check_cuda.sh", "scripts/gpu_check_build.sh",
           "scripts/gpu_check_prepare.sh")
CHECK = (REPO / "scripts" / "gpu_check.sh").read_text()
# The device tool's limits (its README): one command runs at most 600 s.
TOOL_CALL_LIMIT_S = 600
MAX_FILES = 8
NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def run_check(tmp_path, *stages, deadline=120):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "GPU_CHECK_WORK": str(work), "GPU_CHECK_DEADLINE_S": str(deadline), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", str(out), *stages], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    return proc, out, work


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", script], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_unknown_stage_is_refused(tmp_path):
    proc, _, _ = run_check(tmp_path, "info", "bogus")
    assert proc.returncode == 2
    assert "unknown stage or set: bogus" in proc.stderr


def test_outdir_holds_at_most_eight_plainly_named_files(tmp_path):
    work = tmp_path / "work"
    stem = STUB_STEM
    # Every result file a full two-call run can leave behind, so the count is the worst case.
    (work / "results").mkdir(parents=True)
    for name in (f"{stem}.json", f"{stem}_compile.json", f"{stem}_model.json", f"{stem}_cli.json",
                 f"{stem}_plans.json", f"{stem}.md", "stray_file.txt"):
        (work / "results" / name).write_text("{}\n")
    proc, _, summary = run_with_stub(tmp_path, "info", deadline=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "out"
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= MAX_FILES, files
    assert all(NAME.match(f) and f.startswith(stem) for f in files), files
    assert all(p.is_file() for p in out.iterdir())
    assert re.search(r"^\| info \| 0 \| \d+ \| 30 \| 0 \|$", summary, re.M), summary
    assert f"{stem}_logs.tar.gz" in files
    assert f"{stem}_plans.json" in files


def test_stage_without_time_left_is_skipped_and_fails(tmp_path):
    """With the real python: the skip, and the one line on this machine's
    versions against the rehearsed ones (this CPU machine's torch is not the
    device's)."""
    proc, out, _ = run_check(tmp_path, "info", deadline=25)  # 15 s are reserved for packing, info needs 30
    assert proc.returncode == 1
    summary = next(out.glob("*_summary.md")).read_text()
    assert "| info | skipped: no time left |" in summary
    rehearsed = dict(line.split("=") for line in (REPO / "scripts" / "gpu_check_versions.env").read_text().split()
                     if "=" in line)
    if torch.__version__.split("+")[0] != rehearsed["DEVICE_TORCH"]:
        line = next(x for x in summary.splitlines() if x.startswith("VERSIONS DIFFER FROM THE REHEARSAL"))
        assert f"torch {torch.__version__.split('+')[0]} (rehearsed {rehearsed['DEVICE_TORCH']})" in line, line


STUB_PYTHON = r'''#!/usr/bin/env bash
# Stands in for python: records every call, answers the ones the script parses.
printf '%s\n' "$*" >> "$STUB_LOG"
case "$*" in
  "-m resnext_kernels.bench_report --stem") echo "2026-01-01_stub-card_0000000" ;;
  "-c import xdist"|"-c import pytest_timeout") exit 0 ;;
  "-c import "*) exit 1 ;;
esac
exit 0
'''
STUB_STEM = "2026-01-01_stub-card_0000000"


def run_with_stub(tmp_path, *stages, deadline=None):
    """The check with a python that does nothing (and every other tool
    missing): (process, python calls, summary text)."""
    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    log = tmp_path / "calls.log"
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "GPU_CHECK_WORK": str(work), "PYTHON": str(stub), "STUB_LOG": str(log),
           "GPU_CHECK_CARRY": str(tmp_path / "no_carry")}
    env.pop("GPU_CHECK_DEADLINE_S", None)
    if deadline is not None:
        env["GPU_CHECK_DEADLINE_S"] = str(deadline)
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", str(out), *stages], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    return proc, log.read_text().splitlines(), (out / f"{STUB_STEM}_summary.md").read_text()


def _table(name):
    body = re.search(rf"^read -r -d '' {name} <<'TABLE'\n(.*?)\nTABLE$", CHECK, re.S | re.M).group(1)
    return [line.split() for line in body.splitlines() if line.strip() and not line.startswith("#")]


def _constant(name):
    return int(re.search(rf"^{name}=(\d+)", CHECK, re.M).group(1))


STAGES = _table("STAGE_TABLE")   # [stage, call, limit_s, stop]
CALLS = {int(call): (name, int(timeout)) for call, name, timeout in _table("CALL_TABLE")}


def test_the_plan_fits_one_lease():
    """Issue 23: at most 13 minutes of device time counting 120 s for one
    machine start; one call of at most 570 s and one of at most 180 s; each
    call's stage limits (plus the packing reserve) within its deadline,
    timeout_s minus the margin; every stage a row of the table."""
    assert _constant("PLAN_S") == 13 * 60 and _constant("START_S") == 120
    timeouts = sorted(timeout for _, timeout in CALLS.values())
    assert len(timeouts) == 2 and timeouts[0] <= 180 and timeouts[1] <= 570, timeouts
    assert all(t <= TOOL_CALL_LIMIT_S for t in timeouts)
    assert sum(timeouts) + _constant("START_S") <= _constant("PLAN_S"), timeouts
    for call, (name, timeout) in CALLS.items():
        rows = [row for row in STAGES if row[1] == str(call)]
        assert rows and rows[0][0] == "build", (name, rows)  # every call can start on a bare machine
        fixed = sum(int(limit) for _, _, limit, _ in rows if limit != "rest")
        assert fixed + _constant("RESERVE") <= timeout - _constant("CALL_MARGIN_S"), (name, fixed, timeout)
        rest = [i for i, row in enumerate(rows) if row[2] == "rest"]
        assert rest in ([], [len(rows) - 1]), f"{name}: only the last stage may take the rest"
    for stage, call, limit, stop in STAGES:
        assert call in {str(c) for c in CALLS} | {"-"} and stop in ("INT", "TERM"), (stage, call, stop)
        assert limit == "rest" or 0 < int(limit) <= TOOL_CALL_LIMIT_S, (stage, limit)
    # The table and the script's stages are the same set.
    branches = set(re.findall(r"^    (\w+)\)$", CHECK, re.M))
    assert branches == {row[0] for row in STAGES}, branches ^ {row[0] for row in STAGES}


def test_each_call_runs_its_rows_in_order_under_its_deadline(tmp_path):
    """`first` runs call 1's rows in table order, each under its table limit
    (the stages of a stub python end at once), under the deadline of call
    1's timeout_s; the fine-tuning stage runs its benchmark file."""
    proc, _, summary = run_with_stub(tmp_path, "first")
    name, timeout = CALLS[1]
    assert name == "first"
    assert f"deadline {timeout - _constant('CALL_MARGIN_S')}s" in summary, summary
    rows = re.findall(r"^\| (\w+) \| ([^|]+) \| \d+ \| ([^|]+) \|", summary, re.M)
    assert [r[0] for r in rows] == [s for s, call, _, _ in STAGES if call == "1"], rows
    for (stage, _, limit), (_, _, table_limit, _) in zip(rows, [s for s in STAGES if s[1] == "1"]):
        if table_limit != "rest":
            assert limit.strip() == table_limit, (stage, limit, table_limit)
    assert "| finetune | 0 |" in summary


def test_gpu_tests_and_sweep_stages_run_every_gpu_test(tmp_path):
    """gpu_tests runs every GPU-marked test under tests/ except the sweep's
    file, which the sweep stage runs on its own; both spread their tests
    over xdist workers keeping xdist groups together and record the
    slowest durations."""
    proc, calls, summary = run_with_stub(tmp_path, "gpu_tests", "sweep", deadline=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    gpu, sweep = [line.split() for line in calls if line.startswith("-m pytest")]
    assert gpu[gpu.index("-m", 2) + 1] == "cuda" and "tests/" in gpu, gpu
    assert gpu[gpu.index("--deselect") + 1] == "tests/test_gpu_sweep.py" and gpu.count("--deselect") == 1, gpu
    assert not {"-k", "--ignore"} & set(gpu), gpu
    assert "tests/test_gpu_sweep.py" in sweep and "--deselect" not in sweep, sweep
    for call in (gpu, sweep):
        assert {"-n", "--dist"} <= set(call) and call[call.index("--dist") + 1] == "loadgroup", call
        assert any(a.startswith("--durations=") for a in call), call
    assert re.search(r"^\| gpu_tests \| 0 \| \d+ \| 140 \| 0 \|$", summary, re.M), summary


@pytest.fixture
def resolver(monkeypatch):
    """scripts/gpu_check_resolve.py, imported here (in-process: no new interpreter to start)."""
    spec = importlib.util.spec_from_file_location("gpu_check_resolve", REPO / "scripts" / "gpu_check_resolve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    return module


@pytest.mark.parametrize("flags,resolves", [(["--quick", "--device", "cuda", "--shapes", "s1"], True),
                                            (["--quick", "--no-such-flag"], False)])
def test_dry_run_resolver_checks_cli_flags(resolver, flags, resolves, capsys):
    """The dry run's resolver imports a module and parses its flags without
    running it: a flag the CLI does not know fails the rehearsal."""
    command = ["python", "-m", "resnext_kernels", "bench", *flags]
    if resolves:
        assert resolver.resolve(command) == ["resnext_kernels: imports, and its flags parse"]
    else:
        with pytest.raises(SystemExit, match="unresolved: resnext_kernels .*: exit 2"):
            resolver.resolve(command)
        assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_dry_run_resolver_refuses_missing_files(resolver):
    with pytest.raises(SystemExit, match=r"missing files \['tests/test_no_such_file.py'\]"):
        resolver.resolve(["python", "-m", "pytest", "tests/test_no_such_file.py"])


GPU_TEST_FILES = ["test_gpu_large_tensors.py", "test_gpu_tuning_under_capture.py", "test_gpu_numerics.py",
                  "test_gpu_integration.py"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skipping on a machine without a GPU")
def test_gpu_tests_are_collected_and_skipped_with_a_reason_on_cpu():
    """Every test of issue 15's GPU files that needs a GPU is marked `cuda`:
    on CPU pytest collects it and skips it with a reason (and the GPU check's
    gpu_tests stage, which runs every GPU-marked test, runs it)."""
    files = [str(REPO / "tests" / name) for name in GPU_TEST_FILES]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "cuda",
                           *files], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    skipped = re.findall(r"^SKIPPED \[(\d+)\] tests/(test_gpu_\w+\.py)(?::\d+)?: (.+)$", proc.stdout, re.M)
    assert {name for _, name, _ in skipped} == set(GPU_TEST_FILES), proc.stdout
    assert all("GPU" in reason or "CUDA" in reason for _, _, reason in skipped), skipped
    count = sum(int(n) for n, _, _ in skipped)
    assert re.search(rf"^{count} skipped, \d+ deselected", proc.stdout, re.M) and count >= 20, proc.stdout



def test_relocated_triton_cache_index_names_the_files_where_they_are(tmp_path):
    """Triton's cache index (__grp__*.json) lists its files by absolute path,
    so the carried cache is relocated on the GPU machine
    (triton_compile --relocate-cache): each entry then names the file in its
    own directory, and files the carry dropped (IR, PTX) are no longer
    listed. (That a relocated cache is hit, nothing compiled again, is
    checked by scripts/gpu_check_prepare.sh, which compiles.)"""
    from resnext_kernels.bench import triton_compile

    kernel = tmp_path / "moved" / "HASH"
    kernel.mkdir(parents=True)
    for name in ("k.cubin", "k.json"):
        (kernel / name).write_text("x")
    old = "/elsewhere/cache/HASH"
    (kernel / "__grp__k.json").write_text(json.dumps({"child_paths": {
        "k.cubin": f"{old}/k.cubin", "k.json": f"{old}/k.json", "k.ptx": f"{old}/k.ptx"}}))
    assert triton_compile.relocate_cache(tmp_path / "moved") == 1
    index = json.loads((kernel / "__grp__k.json").read_text())["child_paths"]
    assert index == {"k.cubin": str(kernel / "k.cubin"), "k.json": str(kernel / "k.json")}
