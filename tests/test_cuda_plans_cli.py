"""`python -m resnext_kernels.cuda_plans` (bench/plans.py): --list, argument
errors and the refusal to time without a GPU."""

import json

import pytest
import torch
from cuda_cases import H100_SMEM_OPTIN, _canonical_plans, needs_c

from resnext_kernels.backends import registry
from resnext_kernels.backends.cuda import planner
from resnext_kernels.bench import plans as cuda_plans
from resnext_kernels.bench.shapes import SHAPES


@needs_c
def test_cuda_plans_cli_list(tmp_path, capsys):
    out = tmp_path / "plans.json"
    assert cuda_plans.main(["--list", "--shapes", "s1", "s4", "--ranks", "3", "--smem-limit", str(H100_SMEM_OPTIN),
                            "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| shape | rank | TW | Mo | WC | CS | nbuf | smem (B) | halo px | est. cost | MMA work | grid |" in text
    first = _canonical_plans("s1", torch.bfloat16, H100_SMEM_OPTIN)[0]
    assert (f"| s1 | 0 | {first.TW} | {first.Mo} | {first.WC} | {first.CS} | {first.nbuf} | {first.smem} | "
            f"{first.halo} |") in text and "s4: " in text
    doc = json.loads(out.read_text())
    assert doc["smem_limit"] == H100_SMEM_OPTIN and [s["shape"] for s in doc["shapes"]] == ["s1", "s4"]
    for entry in doc["shapes"]:
        plans = _canonical_plans(entry["shape"], torch.bfloat16, H100_SMEM_OPTIN)
        assert all(p["mma_work"] <= 1.25 for p in entry["plans"][:1])
        assert entry["plans_fitting"] == len(plans)
        shape = SHAPES[entry["shape"]]
        assert entry["plans"] == [{**p._asdict(), "mma_work": cuda_plans.mma_work(shape, 128, p)} for p in plans[:3]]


@pytest.mark.skipif(registry.unavailable_reason("cuda", "cuda") is None, reason="the cuda backend is usable here")
def test_cuda_plans_cli_timing_needs_a_gpu(capsys):
    assert cuda_plans.main(["--shapes", "s4"]) == 2
    err = capsys.readouterr().err
    assert "needs the cuda backend on a GPU" in err and "--list" in err


def test_cuda_plans_cli_list_without_the_planner(monkeypatch, capsys):
    def missing(*args, **kwargs):
        raise RuntimeError("resnext_kernels._C with the fused_block_plans op is needed to list tile plans: ...")

    monkeypatch.setattr(planner, "candidate_plans", missing)
    assert cuda_plans.main(["--list", "--shapes", "s1"]) == 2
    assert "cuda_plans: resnext_kernels._C with the fused_block_plans op is needed" in capsys.readouterr().err


def test_cuda_plans_cli_rejects_bad_arguments(capsys):
    for argv, message in ((["--ranks", "0"], "--ranks: must be >= 1"), (["--dtype", "int8"], "unknown dtype"),
                          (["--shapes", "nope"], "unknown shape"),
                          (["--smem-limit", "1000"], "--smem-limit applies to --list only"),
                          (["--list", "--tf32"], "--tf32 applies to --list with --dtype float32 only"),
                          (["--dtype", "float32", "--tf32"], "--tf32 applies to --list with --dtype float32 only")):
        with pytest.raises(SystemExit):
            cuda_plans.main(argv)
        assert message in capsys.readouterr().err
