"""examples/train_distributed.py under torchrun on a tiny digits
configuration: two CPU processes over gloo, the fused blocks' norms as
nn.SyncBatchNorm (reference backend: the Triton kernels under the
interpreter would take minutes here; tests/test_training_sync_bn.py runs
them), gradients averaged as DDP's reducer does. It trains (the loss goes
down) and every process ends with the same parameters and synchronized
running statistics. ~15 s on the 2-core machine."""

import os
import re
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("sklearn", reason="the digits dataset comes from scikit-learn")

TINY = ["--dataset", "digits", "--blocks-per-stage", "1", "--cardinality", "2", "--width-per-group", "4",
        "--limit", "384", "--batch-size", "32", "--lr", "0.05", "--epochs", "3", "--backend", "reference",
        "--device", "cpu"]


def test_torchrun_two_cpu_processes_train_with_sync_batchnorm():
    # The package from this checkout (torchrun's children do not get the test's sys.path).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO_ROOT, "examples", "train_distributed.py"), *TINY]
    run = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180,
                         check=False)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    losses = [float(v) for v in re.findall(r"epoch \d+: train loss ([0-9.]+) \(2 processes", output)]
    assert len(losses) == 3, output[-4000:]
    assert losses[-1] < 0.5 * losses[0], losses  # it learns
    assert "replicas identical: True" in output, output[-4000:]
