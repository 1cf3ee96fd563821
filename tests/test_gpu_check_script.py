"""CPU tests of scripts/gpu_check.sh's mechanics: stage parsing, the deadline, and
what it leaves in OUTDIR (the device tool returns at most 8 files, each named
with letters, digits, '.', '_' and '-' only). The GPU stages themselves only
run on a GPU machine."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("scripts/gpu_check.sh", "scripts/gpu_check_cuda.sh")
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
    stem = subprocess.run([sys.executable, "-m", "resnext_kernels.bench_report", "--stem"], cwd=REPO,
                          capture_output=True, text=True, check=True).stdout.strip()
    # Every result file a full two-call run can leave behind, so the count is the worst case.
    (work / "results").mkdir(parents=True)
    for name in (f"{stem}.json", f"{stem}_compile.json", f"{stem}_model.json", f"{stem}_cli.json",
                 f"{stem}_plans.json", f"{stem}.md", "stray_file.txt"):
        (work / "results" / name).write_text("{}\n")
    proc, out, _ = run_check(tmp_path, "info")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= MAX_FILES, files
    assert all(NAME.match(f) and f.startswith(stem) for f in files), files
    assert all(p.is_file() for p in out.iterdir())
    summary = (out / f"{stem}_summary.md").read_text()
    assert re.search(r"^\| info \| 0 \| \d+ \| 60 \|$", summary, re.M), summary
    assert f"{stem}_logs.tar.gz" in files
    assert f"{stem}_plans.json" in files


def test_stage_without_time_left_is_skipped_and_fails(tmp_path):
    proc, out, _ = run_check(tmp_path, "info", deadline=25)  # 20 s are reserved for packing
    assert proc.returncode == 1
    summary = next(out.glob("*_summary.md")).read_text()
    assert "| info | skipped: no time left |" in summary


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


def test_tests_stage_runs_the_whole_suite(tmp_path):
    """The tests stage runs every test under tests/ (no marker or keyword
    deselection, so every GPU test, issue 15's included), spreads them over
    xdist workers keeping xdist groups together, records the slowest
    durations, and gets 300 s."""
    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    log = tmp_path / "calls.log"
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "GPU_CHECK_WORK": str(work), "GPU_CHECK_DEADLINE_S": "400", "PYTHON": str(stub),
           "STUB_LOG": str(log)}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", str(out), "tests"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (call,) = [line.split() for line in log.read_text().splitlines() if line.startswith("-m pytest")]
    assert call[2] == "tests/" and not {"-m", "-k", "--deselect", "--ignore"} & set(call[3:]), call
    assert {"-n", "--dist", "--durations=40"} <= set(call) and call[call.index("--dist") + 1] == "loadgroup", call
    summary = (out / "2026-01-01_stub-card_0000000_summary.md").read_text()
    assert re.search(r"^\| tests \| 0 \| \d+ \| 300 \|$", summary, re.M), summary


GPU_TEST_FILES = ["test_gpu_large_tensors.py", "test_gpu_tuning_under_capture.py", "test_gpu_numerics.py",
                  "test_gpu_integration.py"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skipping on a machine without a GPU")
def test_gpu_tests_are_collected_and_skipped_with_a_reason_on_cpu():
    """Every test of issue 15's GPU files that needs a GPU is marked `cuda`:
    on CPU pytest collects it and skips it with a reason (and the GPU check's
    tests stage, which runs tests/ whole, runs it)."""
    files = [str(REPO / "tests" / name) for name in GPU_TEST_FILES]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "cuda",
                           *files], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    skipped = re.findall(r"^SKIPPED \[(\d+)\] tests/(test_gpu_\w+\.py)(?::\d+)?: (.+)$", proc.stdout, re.M)
    assert {name for _, name, _ in skipped} == set(GPU_TEST_FILES), proc.stdout
    assert all("GPU" in reason or "CUDA" in reason for _, _, reason in skipped), skipped
    count = sum(int(n) for n, _, _ in skipped)
    assert re.search(rf"^{count} skipped, \d+ deselected", proc.stdout, re.M) and count >= 20, proc.stdout
