"""examples/train_distributed.py under torchrun on a tiny digits
configuration: two CPU processes over gloo, the fused blocks' norms as
nn.SyncBatchNorm (reference backend: the Triton kernels under the
interpreter would take minutes here; tests/test_training_sync_bn.py runs
them), gradients averaged as DDP's reducer does. It trains (the loss goes
down) and every process ends with the same parameters and synchronized
running statistics. ~15 s on the 2-core machine.

Known upstream flake (torch 2.14.1, gloo, torchrun): now and then a process
aborts while the interpreter exits, after main() returned and the process
group was destroyed ("terminate called without an active exception",
SIGABRT). Measured here: 7 of 83 runs of the example and variants of it (a
barrier before destroy_process_group, no evaluation, no SyncBatchNorm at
all: 3 of 30), and 1 of 70 runs of a 20-line plain-torch script (gloo, four
backward passes with all_reduce of the gradients, destroy_process_group):
not this package's code. A run counts when every rank printed "done" and
the only failure is that abort; otherwise the test runs the example once
more before failing.
"""

import os
import re
import subprocess
import sys
import warnings

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("sklearn", reason="the digits dataset comes from scikit-learn")

TINY = ["--dataset", "digits", "--blocks-per-stage", "1", "--cardinality", "2", "--width-per-group", "4",
        "--limit", "384", "--batch-size", "32", "--lr", "0.05", "--epochs", "3", "--backend", "reference",
        "--device", "cpu"]
WORLD = 2
EXIT_ABORT = "terminate called without an active exception"


def _run_example():
    """(return code, output) of the example under torchrun."""
    # The package from this checkout (torchrun's children do not get the test's sys.path).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           os.path.join(REPO_ROOT, "examples", "train_distributed.py"), *TINY]
    run = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180, check=False)
    return run.returncode, run.stdout + run.stderr


def _finished(output):
    return all(f"rank {r}: done" in output for r in range(WORLD))


def test_torchrun_two_cpu_processes_train_with_sync_batchnorm():
    for attempt in range(2):
        returncode, output = _run_example()
        if returncode == 0:
            break
        if _finished(output) and EXIT_ABORT in output:
            warnings.warn(f"a process aborted at interpreter exit after finishing ({EXIT_ABORT!r}; module "
                          "docstring)", stacklevel=1)
            break
        if attempt == 1:
            pytest.fail(f"torchrun exited with {returncode}:\n{output[-4000:]}")
    assert _finished(output), output[-4000:]
    losses = [float(v) for v in re.findall(rf"epoch \d+: train loss ([0-9.]+) \({WORLD} processes", output)]
    assert len(losses) == 3, output[-4000:]
    assert losses[-1] < 0.5 * losses[0], losses  # it learns
    assert "replicas identical: True" in output, output[-4000:]
