"""torch.onnx.export of a converted model (issue 21), with the default
(torch.export-based) exporter and the TorchScript-based one (dynamo=False),
run in ONNX Runtime against the unconverted torchvision model.

ONNX has no fused block: a FusedResNeXtBlock exports as torchvision's
Bottleneck (resnext_kernels/tracing.py), so the exported graph has exactly
the standard operators of the unconverted model's export (Conv,
BatchNormalization, Relu, Add, ...) and no resnext_kernels node. The
export's batch dimension is dynamic: the file runs on another batch size
than the one it was exported with. NCHW and channels_last example inputs.

onnx, onnxscript and onnxruntime come with the test extra (pyproject's
`test`, the README's test command) and with `pip install .[onnx]`.
"""

import collections
import copy
import functools
import os
import tempfile

import pytest
import torch
from fidelity_cases import one_thread  # noqa: F401  (autouse fixture)
from fidelity_cases import tiny_resnext
from helpers import assert_close_to_reference

import resnext_kernels as rk
from resnext_kernels import UnfusedForwardWarning

# In the test extra (so CI has them); a machine without them (the GPU
# machine, offline) skips with the reason, shown by -rs.
onnx = pytest.importorskip("onnx", reason="onnx not installed: pip install '.[onnx]' (also in the test extra)")
onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime not installed: pip install '.[onnx]'")
pytest.importorskip("onnxscript", reason="onnxscript (torch.onnx's default exporter) not installed: "
                                  "pip install '.[onnx]'")

EXPORTERS = {"dynamo": True, "torchscript": False}
FORMATS = {"nchw": False, "channels_last": True}


def export(model, x, path, exporter):
    """`model` exported to `path` with its batch dimension dynamic."""
    if EXPORTERS[exporter]:
        torch.onnx.export(model, (x,), path, dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},),
                          verbose=False)
    else:
        torch.onnx.export(model, (x,), path, dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return onnx.load(path)


def op_types(model):
    """(domain, op_type) -> count over the graph's nodes."""
    return collections.Counter((node.domain or "ai.onnx", node.op_type) for node in model.graph.node)


@functools.cache
def torchvision_op_types(exporter):
    """op_types of the unconverted model's export from an NCHW example (they
    depend neither on its weights nor on the example's memory format: one
    export per exporter, as an export takes seconds)."""
    x = torch.randn(2, 3, 32, 32)
    with tempfile.TemporaryDirectory() as tmp:
        return op_types(export(tiny_resnext().eval(), x, os.path.join(tmp, "torchvision.onnx"), exporter))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_onnx_export_runs_in_onnxruntime(tmp_path, exporter, fmt):
    tv = tiny_resnext().eval()
    fused = rk.convert(copy.deepcopy(tv), backend="reference").eval()
    x = torch.randn(2, 3, 32, 32)
    if FORMATS[fmt]:
        x = x.contiguous(memory_format=torch.channels_last)

    with pytest.warns(UnfusedForwardWarning, match="torch.onnx.export"):
        exported = export(fused, x, str(tmp_path / "fused.onnx"), exporter)
    assert all(not m.training for m in fused.modules()), "export left the model in train mode"
    expected_ops = torchvision_op_types(exporter)
    assert op_types(exported) == expected_ops
    assert {domain for domain, _ in expected_ops} == {"ai.onnx"}
    assert ("ai.onnx", "Conv") in expected_ops

    session = onnxruntime.InferenceSession(str(tmp_path / "fused.onnx"), providers=["CPUExecutionProvider"])
    x3 = torch.randn(3, 3, 32, 32)  # another batch size than the export's
    if FORMATS[fmt]:
        x3 = x3.contiguous(memory_format=torch.channels_last)
    (name,) = [i.name for i in session.get_inputs()]
    y = torch.from_numpy(session.run(None, {name: x3.contiguous().numpy()})[0])
    with torch.no_grad():
        eager, reference = tv(x3), copy.deepcopy(tv).double()(x3.double())
    assert y.shape == eager.shape
    assert_close_to_reference(y, reference, eager)
