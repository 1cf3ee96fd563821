"""examples/train.py on a tiny digits configuration: it trains (the loss goes
down), writes its metrics, checkpoint and plot, resumes, and --compare's two
curves (fused blocks vs torchvision's Bottleneck, same weights and batches)
agree within floating-point tolerance."""

import csv
import importlib.util
import os
import time

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("sklearn", reason="the digits dataset comes from scikit-learn")


def load_example():
    spec = importlib.util.spec_from_file_location("train_example", os.path.join(REPO_ROOT, "examples", "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--dataset", "digits", "--blocks-per-stage", "1", "--cardinality", "2", "--width-per-group", "4",
        "--limit", "384", "--batch-size", "64", "--lr", "0.05"]


def test_tiny_digits_run_compares_and_resumes(tmp_path):
    train = load_example()
    # CPU time of this process (all its threads): what the run costs, not
    # what other processes on a shared machine make it wait.
    t0 = time.process_time()
    # float64: the two models' gradients differ by rounding (~1e-6 relative
    # in fp32, which small-batch BatchNorm training amplifies to ~1e-3 in
    # the loss within a few dozen steps); in float64 the curves stay equal
    # to far below the tolerance.
    rows = train.main([*TINY, "--epochs", "3", "--backend", "reference", "--dtype", "float64", "--out",
                       str(tmp_path), "--compare"])
    elapsed = time.process_time() - t0
    assert elapsed < 60, f"the tiny configuration took {elapsed:.0f} s of CPU time"
    fused = [r for r in rows if r["model"] == "fused"]
    eager = [r for r in rows if r["model"] == "torchvision"]
    assert [r["epoch"] for r in fused] == [r["epoch"] for r in eager] == [1, 2, 3]
    assert fused[-1]["train_loss"] < 0.5 * fused[0]["train_loss"], fused  # it learns
    for a, b in zip(fused, eager):  # same weights, same batches: the same curves up to rounding
        for key in ("train_loss", "test_loss", "train_acc", "test_acc"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (key, a, b)
    with open(tmp_path / "metrics.csv") as f:
        assert len(list(csv.DictReader(f))) == 6
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert (tmp_path / "fused.pt").exists() and (tmp_path / "torchvision.pt").exists()

    # --resume with more epochs continues from the checkpoint (3 epochs done, 1 more)
    more = train.main([*TINY, "--epochs", "4", "--backend", "reference", "--dtype", "float64", "--out",
                       str(tmp_path), "--resume"])
    assert [r["epoch"] for r in more] == [1, 2, 3, 4]
    assert more[:3] == fused
