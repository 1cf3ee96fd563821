"""rk.tune(model, example_input): make every timed choice of a model's fused
blocks now, and fill the tuning store (common/tuning_store.py), so that
later processes, DDP ranks and CUDA graph captures find them.

Two passes: the first runs the model once on example_input with nothing
timed (tuning.untimed) to find each fused block's input, and keeps one block
and input per distinct problem (the block's convs, x's shape, dtype, layout
and alignment, the backend, eval or train mode); the second runs each
distinct problem once inside tuning.tune_run(), which records what its
choices did: timed, or found in the store or this process. A problem with
no timed choice at all (the reference backend, training, autotuning off)
is counted apart. In train mode the second pass also runs the block's
backward (torch.autograd.grad: no .grad is written), so that its kernels
are compiled too. The model's buffers (BatchNorm running statistics) are
restored afterwards; parameters are not changed.

Under an initialized process group every rank must call tune() with the
same model and input shapes: the choices are made once, by rank 0, and
broadcast (tuning.select_fastest).
"""

import collections

import torch

from .block import FusedResNeXtBlock
from .common import tuning

TuneReport = collections.namedtuple("TuneReport", "problems timed from_cache untimed")
TuneReport.__doc__ = """What tune() did: distinct problems; how many had a choice timed, how many
found all their choices already made (tuning store or this process), and
how many have nothing to time (reference backend, training op, autotuning
off)."""


def _problem(block, x):
    c1, c2, c3 = block.conv1, block.conv2, block.conv3
    key = tuning.tune_key(x, c1.out_channels, c3.out_channels, c2.stride[0], c2.dilation[0], c2.groups,
                          block.downsample is not None, torch.backends.cudnn.allow_tf32)
    return key, c1.in_channels, block.backend, block.uses_batch_statistics()


def _run_block(block, x):
    if not block.uses_batch_statistics():
        with torch.no_grad():
            block(x)
        return
    x = x.detach().requires_grad_(True)
    out = block(x)
    params = [p for p in block.parameters() if p.requires_grad]
    torch.autograd.grad(out, [x, *params], grad_outputs=torch.randn_like(out))


def tune(model, example_input, *, progress=False):
    """Make every timed choice of `model`'s FusedResNeXtBlock blocks for
    inputs like `example_input` (what model(example_input) runs, in the
    model's current train/eval mode), filling the tuning store; returns a
    TuneReport. progress: show a tqdm progress bar over the problems.
    Raises ValueError when the model has no fused block (rk.convert it)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a torch.Tensor, got {type(example_input).__name__}")
    blocks = [m for m in model.modules() if isinstance(m, FusedResNeXtBlock)]
    if not blocks:
        raise ValueError("model has no FusedResNeXtBlock to tune (build it with rk.models or rk.convert it)")

    problems = {}  # problem -> (block, its input)

    def record(block, inputs):
        problems.setdefault(_problem(block, inputs[0]), (block, inputs[0].detach()))

    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    hooks = [b.register_forward_pre_hook(record) for b in blocks]
    try:
        with torch.no_grad(), tuning.untimed():
            model(example_input)
    finally:
        for h in hooks:
            h.remove()

    timed = from_cache = untimed = 0
    items = list(problems.values())
    if progress:
        try:
            from tqdm import tqdm
        except ImportError:  # a dependency, but an install with --no-deps may lack it: no bar then
            tqdm = None
        if tqdm is not None:
            items = tqdm(items, desc="tuning block problems", unit="problem")
    try:
        for block, x in items:
            with tuning.tune_run() as events:
                _run_block(block, x)
            if "timed" in events:
                timed += 1
            elif events:
                from_cache += 1
            else:
                untimed += 1
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    return TuneReport(len(problems), timed, from_cache, untimed)


def report_line(report):
    """The one line `python -m resnext_kernels tune` ends with."""
    line = f"tuned {report.problems} problems: {report.timed} timed, {report.from_cache} from cache"
    if report.untimed:
        line += f", {report.untimed} with nothing to time"
    return line
