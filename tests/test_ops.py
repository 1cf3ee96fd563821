"""The op layer: opcheck, gradients, input validation, backend selection."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import resnext_kernels as rk
from resnext_kernels.backends import registry
from resnext_kernels.common import settings
from resnext_kernels.ops import inference

F64 = torch.float64
OP = torch.ops.resnext_kernels.bottleneck_inference.default


def make_args(n=2, cin=8, width=6, cout=8, h=5, w=7, groups=3, projection=False, dtype=F64, requires_grad=False):
    """Random folded-block arguments (never zeros)."""
    def t(*shape):
        return torch.randn(*shape, dtype=dtype, requires_grad=requires_grad)

    x = t(n, cin, h, w)
    w1, b1 = t(width, cin, 1, 1), t(width)
    w2, b2 = t(width, width // groups, 3, 3), t(width)
    w3, b3 = t(cout, width, 1, 1), t(cout)
    wd, bd = (t(cout, cin, 1, 1), t(cout)) if projection else (None, None)
    return [x, w1, b1, w2, b2, w3, b3, wd, bd]


CONFIGS = [
    dict(stride=1, dilation=1, groups=3, projection=False),
    dict(stride=2, dilation=1, groups=2, projection=True, cout=10),
    dict(stride=1, dilation=2, groups=6, projection=True, cin=5, cout=12),
    dict(stride=2, dilation=2, groups=1, projection=True, h=9, w=9),
]


def _split(cfg):
    cfg = dict(cfg)
    conv = {k: cfg.pop(k) for k in ("stride", "dilation")}
    conv["groups"] = cfg["groups"]
    return cfg, conv


@pytest.mark.parametrize("cfg", CONFIGS)
def test_opcheck_reference(cfg):
    shape_kw, conv = _split(cfg)
    for requires_grad in (False, True):
        args = make_args(requires_grad=requires_grad, **shape_kw)
        torch.library.opcheck(OP, (*args, conv["stride"], conv["dilation"], conv["groups"], "reference"))


@pytest.mark.parametrize("cfg", CONFIGS)
def test_gradcheck_reference(cfg):
    shape_kw, conv = _split(cfg)
    args = make_args(requires_grad=True, **{"n": 1, "h": 5, "w": 5, **shape_kw})
    present = [a for a in args if a is not None]

    def fn(*tensors):
        it = iter(tensors)
        full = [next(it) if a is not None else None for a in args]
        return inference.bottleneck_inference(*full, **conv, backend="reference")

    assert torch.autograd.gradcheck(fn, present)


def test_reference_matches_independent_loop():
    """The reference against a per-group, per-tap computation written out by hand."""
    args = make_args(n=1, cin=4, width=4, cout=6, h=5, w=6, groups=2, projection=True)
    x, w1, b1, w2, b2, w3, b3, wd, bd = args
    y = inference.bottleneck_inference(*args, stride=2, dilation=2, groups=2, backend="reference")

    t1 = torch.relu(torch.einsum("nchw,oc->nohw", x, w1[:, :, 0, 0]) + b1[None, :, None, None])
    pad = torch.nn.functional.pad(t1, (2, 2, 2, 2))
    ho, wo = (5 - 1) // 2 + 1, (6 - 1) // 2 + 1
    t2 = torch.zeros(1, 4, ho, wo, dtype=F64)
    for oc in range(4):
        g = oc // 2
        for ic in range(2):
            for ky in range(3):
                for kx in range(3):
                    patch = pad[:, g * 2 + ic, ky * 2: ky * 2 + 2 * ho - 1: 2, kx * 2: kx * 2 + 2 * wo - 1: 2]
                    t2[:, oc] += w2[oc, ic, ky, kx] * patch
    t2 = torch.relu(t2 + b2[None, :, None, None])
    short = torch.einsum("nchw,oc->nohw", x[:, :, ::2, ::2], wd[:, :, 0, 0]) + bd[None, :, None, None]
    expect = torch.relu(torch.einsum("nchw,oc->nohw", t2, w3[:, :, 0, 0]) + b3[None, :, None, None] + short)
    torch.testing.assert_close(y, expect)
    assert y.is_contiguous()  # NCHW x: NCHW y, like ATen's conv


# -- bad input ------------------------------------------------------------------


def _call(args, **conv):
    conv = {"stride": 1, "dilation": 1, "groups": 3, **conv}
    return inference.bottleneck_inference(*args, **conv, backend="reference")


def test_wrong_rank():
    args = make_args()
    args[0] = args[0][0]
    with pytest.raises(ValueError, match="x must be 4-D"):
        _call(args)
    args = make_args()
    args[2] = args[2][:, None]
    with pytest.raises(ValueError, match="b1 must be 1-D"):
        _call(args)


def test_channel_mismatch():
    args = make_args()
    args[0] = torch.randn(2, 7, 5, 5, dtype=F64)
    with pytest.raises(ValueError, match="w1 must have shape"):
        _call(args)
    args = make_args()
    args[5] = torch.randn(8, 5, 1, 1, dtype=F64)
    with pytest.raises(ValueError, match="w3 must have shape"):
        _call(args)
    args = make_args(cout=10)  # identity shortcut but Cin != Cout
    with pytest.raises(ValueError, match="identity shortcut needs Cin == Cout"):
        _call(args)


def test_groups_must_divide_width():
    args = make_args()
    with pytest.raises(ValueError, match="groups=4 does not divide width=6"):
        _call(args, groups=4)
    with pytest.raises(ValueError, match="groups must be >= 1"):
        _call(args, groups=0)
    with pytest.raises(TypeError, match="stride must be an int"):
        _call(args, stride=1.0)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64])
def test_unsupported_dtype(dtype):
    args = make_args()
    args = [a.to(dtype) if a is not None else None for a in args]
    with pytest.raises(TypeError, match="x has dtype"):
        _call(args)


def test_mixed_dtype():
    args = make_args()
    args[3] = args[3].float()
    with pytest.raises(TypeError, match="w2 has dtype torch.float32 but x has torch.float64"):
        _call(args)


def test_float64_rejected_by_kernel_backends():
    args = make_args()
    with pytest.raises(TypeError, match="backend 'triton' supports"):
        inference.check_inputs(*args, 1, 1, 3, backend="triton")


def test_tensors_on_different_devices():
    args = make_args()
    args[4] = args[4].to("meta")
    with pytest.raises(ValueError, match="b2 is on meta but x is on cpu"):
        _call(args)


def test_projection_needs_both_tensors():
    args = make_args(projection=True)
    args[8] = None
    with pytest.raises(ValueError, match="wd and bd"):
        _call(args)


def test_not_a_tensor():
    args = make_args()
    args[1] = args[1].tolist()
    with pytest.raises(TypeError, match="w1 must be a torch.Tensor"):
        _call(args)


# -- backends -------------------------------------------------------------------


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend='foo'"):
        inference.bottleneck_inference(*make_args(), groups=3, backend="foo")


def test_explicit_cuda_backend_on_cpu_raises_with_reason():
    with pytest.raises(registry.BackendUnavailableError, match="backend 'cuda' cannot run on cpu tensors: .+"):
        inference.bottleneck_inference(*make_args(dtype=torch.float32), groups=3, backend="cuda")


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(registry.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        inference.bottleneck_inference(*make_args(dtype=torch.float32), groups=3, backend="triton")


def test_auto_on_cpu_is_reference():
    assert registry.resolve_backend("auto", "cpu") == "reference"


def test_available_backends_structure():
    info = rk.available_backends()
    assert set(info) == set(registry.BACKENDS)
    for name, entry in info.items():
        for dev in ("cpu", "cuda"):
            assert entry["usable"][dev] == (entry["reason"][dev] is None)
            if not entry["usable"][dev]:
                assert isinstance(entry["reason"][dev], str) and entry["reason"][dev]
    assert info["reference"]["usable"]["cpu"]
    assert info["cuda_emulated"]["testing"]


def test_info_command_runs():
    res = subprocess.run([sys.executable, "-m", "resnext_kernels", "info"], capture_output=True, text=True,
                         check=True)
    for word in ("torch", "triton", "GPU", "reference", "triton", "cuda"):
        assert word in res.stdout
    # No torch warnings (e.g. torch.utils.cpp_extension's "No CUDA runtime is
    # found, using CUDA_HOME=..." on import): asking must not import the builder.
    assert res.stderr == "", res.stderr
    assert not res.stdout.startswith("W"), res.stdout


def test_import_without_compiled_extension():
    """With _C unimportable (as if deleted) the package still imports, works and says why."""
    # None in sys.modules makes `import resnext_kernels._C` raise ImportError,
    # whichever way the package was installed (editable finders included).
    code = ("import sys; sys.modules['resnext_kernels._C'] = None; import resnext_kernels as rk, torch; "
            "print(rk.extension_error()); print(rk.available_backends()['cuda']['reason']['cuda']); "
            "print(rk.FusedResNeXtBlock(16, 4, backend='reference').eval()(torch.randn(1, 16, 3, 3)).shape)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert lines[0].startswith("resnext_kernels._C failed to load: ")
    assert lines[1] == lines[0]  # the cuda backend reports the same reason
    assert lines[2] == "torch.Size([1, 16, 3, 3])"


def test_stale_extension_is_reported(tmp_path):
    """A _C that fails to load (e.g. built against another torch) is a recorded reason."""
    src = os.path.dirname(rk.__file__)
    dst = tmp_path / "resnext_kernels"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    (dst / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"not an ELF file")
    (dst / "_C.so").write_bytes(b"not an ELF file")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", "import resnext_kernels as rk; print(rk.extension_error())"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, check=True).stdout
    assert "failed to load: ImportError" in out


def test_autotune_switch_reads_the_environment(monkeypatch):
    monkeypatch.delenv(settings.AUTOTUNE_ENV, raising=False)
    assert settings.autotune_enabled()
    monkeypatch.setenv(settings.AUTOTUNE_ENV, "0")
    assert not settings.autotune_enabled()
    monkeypatch.setenv(settings.AUTOTUNE_ENV, "yes")
    with pytest.raises(ValueError, match="RESNEXT_KERNELS_AUTOTUNE must be '0' or '1', got 'yes'"):
        settings.autotune_enabled()
