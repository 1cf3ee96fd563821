"""The test suite's randomness can be replayed from the terminal
(tests/conftest.py): a failing test prints its seed as a replay command, each
test draws a fresh seed, and RESNEXT_KERNELS_TEST_SEED=<seed> gives the test
the same random inputs again. Checked on a throwaway test file run by pytest
in a subprocess with a copy of tests/conftest.py."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEED_ENV = "RESNEXT_KERNELS_TEST_SEED"

# Two tests that draw from every seeded generator and fail, printing what they drew.
FAILING_TESTS = '''
import random

import numpy
import torch


def _drawn():
    return f"drawn={torch.rand(3).tolist()}|{random.random()}|{numpy.random.rand()}|"


def test_first():
    assert False, _drawn()


def test_second():
    assert False, _drawn()
'''


def _run_failing_tests(tmp_path, *args, seed=None):
    """{test name: (seed printed in its failure report, values it drew)}."""
    shutil.copy(REPO / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_failing.py").write_text(FAILING_TESTS)
    env = {k: v for k, v in os.environ.items() if k != SEED_ENV}
    if seed is not None:
        env[SEED_ENV] = str(seed)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "test_failing.py", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    found = {}
    # A failure report: the header line with the test's name, its traceback
    # (with the drawn values), then the replay line.
    for name, body in re.findall(r"_{3,} (test_\w+) _{3,}\n(.*?)(?=\n_{3,} test_|\n=+ short test summary)",
                                 proc.stdout, re.S):
        drawn = re.search(r"drawn=(.*?)\|(.*?)\|(.*?)\|", body)
        replay = re.search(rf"{SEED_ENV}=(\d+) python -m pytest 'test_failing.py::{name}'", body)
        assert drawn and replay, f"{name}: no drawn values or replay command in its failure report:\n{body}"
        found[name] = (int(replay.group(1)), drawn.groups())
    assert set(found) == {"test_first", "test_second"}, proc.stdout
    return found


def test_failure_prints_seed_and_the_seed_replays_the_inputs(tmp_path):
    fresh = _run_failing_tests(tmp_path)
    (seed_first, drawn_first), (seed_second, drawn_second) = fresh["test_first"], fresh["test_second"]
    assert seed_first != seed_second and drawn_first != drawn_second  # a fresh seed per test
    # --show-capture=no hides captured output, not the replay line.
    replayed = _run_failing_tests(tmp_path, "--show-capture=no", seed=seed_second)
    assert replayed["test_first"] == replayed["test_second"] == (seed_second, drawn_second)
