"""How FusedResNeXtBlock meets the tools that capture a model as a graph
instead of running it: FX (torch.fx.symbolic_trace, torchvision's
create_feature_extractor), TorchScript (torch.jit.script) and ONNX export.

torch.jit.trace, torch.compile, torch.export and torch.vmap need nothing
here: they run (or record) the block's ops as eager does (ops/vmap.py has
the ops' vmap rules).

FX. The block is a leaf of the FX graph: tracing a model that contains it
records one ``call_module`` node per block (as for nn.Conv2d), and running
the GraphModule calls the block itself, so the fused op and the fold (with
its cache) run, in whatever mode the block is in then, and the block's
hooks fire. Tracing nothing else: no mode is flipped, no buffer touched. A
block that is itself the traced root cannot be a node of its own graph:
it is traced as its unfused submodules (torchvision's graph), with an
UnfusedForwardWarning.

TorchScript and ONNX. The fused path is Python (the fold cache, backend
choice, validation), which TorchScript cannot compile, and ONNX Runtime or
TensorRT run their own kernels, not this package's. So torch.jit.script
compiles the block as its unfused submodules (unfused.bottleneck_forward:
torchvision's Bottleneck.forward, its numbers are eager's), and
torch.onnx.export (either exporter) records the same, which exports as
torchvision's Bottleneck does: standard operators (with torch 2.14.1 both
exporters give Conv with BN folded into its weights, Relu and Add; a
train-mode model exports in that eval form, as torchvision's does). Both
say so with an UnfusedForwardWarning.
"""

import warnings

import torch

from . import unfused


def warn_unfused(tool, why):
    warnings.warn(f"{tool}: FusedResNeXtBlock runs as its unfused submodules (torchvision's "
                  f"Bottleneck.forward, same numbers); the fused kernels do not run there: {why}",
                  unfused.UnfusedForwardWarning, stacklevel=3)


def fx_forward(block, x):
    """The block's forward while an FX tracer traces it (`x` a torch.fx.Proxy):
    a call_module node for the block, or, when the block is the traced root,
    its unfused submodules traced through."""
    tracer = x.tracer
    try:
        path = tracer.path_of_module(block)
    except NameError:  # not a submodule of the traced root
        path = None
    if not path:
        warn_unfused("torch.fx", "the traced root is the block itself, which cannot be a node of its own graph "
                                 "(trace a model containing it to keep it fused)")
        return unfused.bottleneck_forward(block, x)
    return tracer.create_proxy("call_module", path, (x,), {})


def onnx_exporting():
    """True while torch.onnx.export records the model. Both exporters record
    under torch.export (the default) or torch.jit.trace (dynamo=False), so
    those cheap flags are asked first (~0.4 us in eager mode, where the ONNX
    flag alone costs ~5 us)."""
    return (torch.compiler.is_exporting() or torch.jit.is_tracing()) and torch.onnx.is_in_onnx_export()


def onnx_forward(block, x):
    """The block's forward while torch.onnx.export records it."""
    warn_unfused("torch.onnx.export", "ONNX has no fused block; it exports as torchvision's Bottleneck "
                                      "(standard Conv, Relu, Add)")
    return unfused.bottleneck_forward(block, x)


def warn_scripted():
    """Called when torch.jit.script prepares a block (its __prepare_scriptable__)."""
    warn_unfused("torch.jit.script", "TorchScript cannot compile the fused path (Python: fold cache, backend "
                                     "choice); torch.jit.trace records the fused op")
