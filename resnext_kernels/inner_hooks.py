"""Which of a block's inner modules carries a hook the fused op would skip.

A fused kernel computes the whole block at once: the block's submodules
(conv1 bn1 conv2 bn2 conv3 bn3 relu downsample and its children) are never
called, so hooks registered on them would silently not run (or, for
pre-hooks and torch.nn.utils.prune's mask, silently change nothing).
FusedResNeXtBlock asks ``hooked_submodule`` on every forward; when it names
a module, the block runs as torchvision's Bottleneck (unfused.py) and
``warn_unfused`` says so once per block.

What counts: forward hooks and pre-hooks (register_forward_hook,
register_forward_pre_hook, prune's pre-hook among them), backward hooks
(register_full_backward_hook, register_full_backward_pre_hook, the legacy
register_backward_hook) on any inner module, and the global module hooks
(torch.nn.modules.module.register_module_forward_hook, _forward_pre_hook,
_full_backward_hook, _full_backward_pre_hook), which eager calls for every
inner module. Hooks on the block itself run with the fused op as with any
module and do not count. Parametrizations (torch.nn.utils.parametrize) are
no hooks: the fused path reads the parametrized weight.

Cost on the hook-free path. Scanning the ~40 hook dicts of a block's
inner modules costs ~3.5 us of host time per call on the CI machine, so a
clean scan is remembered per block (a weak reference: nothing is copied or
pickled with the block) together with torch.utils.hooks.RemovableHandle's
class counter ``next_id``, which every hook registration anywhere in torch
increments (module hooks of every kind, prune's, tensor hooks), and the
identity of the inner modules. While neither changed no hook can have been
added, and the check is a dict lookup and two comparisons (~0.6 us); any
registration in the process, or a swapped submodule, makes the next call
scan again. Hooks are only ever found by a full scan (results that name a
hook are not remembered), so a removed hook ends the unfused path at the
next call. The global hook dicts are read on every call. Under
torch.compile the scan is plain (dynamo guards on the hook dicts). README, "Drop-in
fidelity", gives the measured times.
"""

import warnings
import weakref

import torch
from torch.nn.modules import module as _module
from torch.utils.hooks import RemovableHandle

from .unfused import UnfusedForwardWarning


_HOOK_DICTS = (("_forward_pre_hooks", "forward pre-hook"), ("_forward_hooks", "forward hook"),
               ("_backward_pre_hooks", "backward pre-hook"), ("_backward_hooks", "backward hook"))
_GLOBAL_HOOK_DICTS = (("_global_forward_pre_hooks", "forward pre-hook"), ("_global_forward_hooks", "forward hook"),
                      ("_global_backward_pre_hooks", "backward pre-hook"), ("_global_backward_hooks", "backward hook"))


def _hook_kinds(module):
    return [what for attr, what in _HOOK_DICTS if getattr(module, attr)]


def _find(modules, prefix):
    for name, m in modules.items():
        if m is None:
            continue
        # Plain attribute truth tests: the hook-free path must cost next to nothing.
        if m._forward_pre_hooks or m._forward_hooks or m._backward_pre_hooks or m._backward_hooks:
            return f"{prefix}{name}", m
        if m._modules:
            found = _find(m._modules, f"{prefix}{name}.")
            if found is not None:
                return found
    return None


def _identity(block):
    """The inner modules whose replacement must trigger a new scan: the
    block's own and downsample's (a submodule of a conv or norm, e.g. a
    parametrization, runs with its weight in both paths)."""
    ds = block._modules.get("downsample")
    return (*block._modules.values(), *(() if ds is None else ds._modules.values()))


_CLEAN_SCANS = weakref.WeakKeyDictionary()  # block -> (RemovableHandle.next_id, _identity) of its last clean scan


def hooked_submodule(block):
    """None when no hook would be skipped by the fused op, else a description
    of the first hook found: "downsample.0 (forward pre-hook)", or "every
    module (global forward hook)" for a global module hook (module docstring)."""
    g = _module
    if g._global_forward_pre_hooks or g._global_forward_hooks or g._global_backward_pre_hooks \
            or g._global_backward_hooks:
        kinds = [what for attr, what in _GLOBAL_HOOK_DICTS if getattr(g, attr)]
        return f"every module (global {', global '.join(kinds)})"
    if torch.compiler.is_compiling():  # traced once, guarded by dynamo on the hook dicts: scan plainly
        found = _find(block._modules, "")
        return None if found is None else f"{found[0]} ({', '.join(_hook_kinds(found[1]))})"
    clean = _CLEAN_SCANS.get(block)
    if clean is not None and clean[0] == RemovableHandle.next_id and clean[1] == _identity(block):
        return None
    found = _find(block._modules, "")
    if found is None:
        _CLEAN_SCANS[block] = (RemovableHandle.next_id, _identity(block))
        return None
    name, m = found
    return f"{name} ({', '.join(_hook_kinds(m))})"


_WARNED = weakref.WeakSet()  # the blocks that have said it once


def warn_unfused(block, hooked):
    """The block's one warning that it runs unfused because of `hooked`
    (hooked_submodule's description); later calls of that block stay quiet."""
    if block in _WARNED:
        return
    _WARNED.add(block)
    warnings.warn(f"{type(block).__name__}: {hooked} is hooked, so this block runs unfused, its submodules "
                  "called one by one as torchvision's Bottleneck does, for as long as the hooks stay; the fused "
                  "kernels resume once they are removed", UnfusedForwardWarning, stacklevel=2)


__all__ = ["UnfusedForwardWarning", "hooked_submodule", "warn_unfused"]
