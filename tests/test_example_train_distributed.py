"""examples/train_distributed.py under torchrun on a tiny digits
configuration: two CPU processes over gloo, the fused blocks' norms as
nn.SyncBatchNorm (reference backend: the Triton kernels under the
interpreter would take minutes here; tests/test_training_sync_bn.py runs
them), gradients averaged as DDP's reducer does. It trains (the loss goes
down) and every process ends with the same parameters and synchronized
running statistics, and those parameters and statistics are the ones a
one-process run of the global batch reaches (float64, the tolerance of
tests/test_example_train.py). ~15 s on the 2-core machine.

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

import copy
import importlib.util
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("sklearn", reason="the digits dataset comes from scikit-learn")

TINY = ["--dataset", "digits", "--blocks-per-stage", "1", "--cardinality", "2", "--width-per-group", "4",
        "--limit", "384", "--batch-size", "32", "--lr", "0.05", "--epochs", "3", "--backend", "reference",
        "--device", "cpu", "--dtype", "float64"]
# tests/test_example_train.py's float64 tolerance (its two curves' agreement).
RTOL, ATOL = 1e-6, 1e-9
WORLD = 2
EXIT_ABORT = "terminate called without an active exception"


def _run_example(out):
    """(return code, output) of the example under torchrun, --out `out`."""
    # The package from this checkout (torchrun's children do not get the test's sys.path).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           os.path.join(REPO_ROOT, "examples", "train_distributed.py"), *TINY, "--out", str(out)]
    run = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180, check=False)
    return run.returncode, run.stdout + run.stderr


def _finished(output):
    return all(f"rank {r}: done" in output for r in range(WORLD))


def test_torchrun_two_cpu_processes_train_with_sync_batchnorm(tmp_path):
    for attempt in range(2):
        returncode, output = _run_example(tmp_path)
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
    _matches_one_process_run(torch.load(tmp_path / "distributed.pt"))


class _PerProcessBatchNorm(nn.Module):
    """The example's stem BatchNorm on CPU: each process normalizes its own
    slice of the global batch (sizes) with its own running statistics;
    weight and bias shared. Keeps process 0's statistics as its buffers'
    names (bn.running_mean, ...) for the comparison."""

    def __init__(self, bn, sizes):
        super().__init__()
        self.sizes = sizes
        self.bn = bn
        self.others = nn.ModuleList(copy.deepcopy(bn) for _ in sizes[1:])
        for other in self.others:
            other.weight, other.bias = bn.weight, bn.bias

    def forward(self, x):
        return torch.cat([m(part) for m, part in zip([self.bn, *self.others], x.split(self.sizes))])


def _matches_one_process_run(distributed):
    """Train in this process what the example trains on WORLD processes:
    the same initial weights, each step the concatenation of the ranks'
    DistributedSampler batches (the global batch: the fused blocks'
    nn.SyncBatchNorm over all ranks is BatchNorm over it), the mean loss
    over it (what averaging the ranks' gradients gives for equal batches),
    the stem's BatchNorm per rank (_PerProcessBatchNorm). The distributed
    run's final parameters and running statistics must be this run's."""
    spec = importlib.util.spec_from_file_location("train_example", os.path.join(REPO_ROOT, "examples", "train.py"))
    single = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(single)
    args = single.parse_args(TINY)
    torch.manual_seed(args.seed)
    train_set, _, in_channels = single.datasets(args)
    train_set = torch.utils.data.Subset(train_set, range(min(args.limit, len(train_set))))
    model = single.build(args, in_channels, fused=True)
    model.bn1 = _PerProcessBatchNorm(model.bn1, [args.batch_size] * WORLD)
    model = model.to(torch.float64, memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    samplers = [torch.utils.data.distributed.DistributedSampler(train_set, WORLD, rank, seed=args.seed)
                for rank in range(WORLD)]
    loaders = [torch.utils.data.DataLoader(train_set, args.batch_size, sampler=s) for s in samplers]
    for epoch in range(args.epochs):
        for s in samplers:
            s.set_epoch(epoch)
        for batches in zip(*loaders):
            assert len({len(y) for _, y in batches}) == 1  # equal batches: the mean loss is the ranks' average
            x = torch.cat([x for x, _ in batches]).double().contiguous(memory_format=torch.channels_last)
            y = torch.cat([y for _, y in batches])
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    mine = {k.replace("bn1.bn.", "bn1."): v for k, v in model.state_dict().items() if ".others." not in k}
    assert mine.keys() == distributed.keys()
    for name, value in distributed.items():
        torch.testing.assert_close(value, mine[name], rtol=RTOL, atol=ATOL, msg=lambda m, name=name: f"{name}: {m}")

