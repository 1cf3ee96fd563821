"""Caches of values computed from weight tensors, and the one rule for when
such a value is still valid (``TensorSnapshot``).

A cached value is valid while the tensors it was computed from are the very
same tensor objects (weak references, so a new tensor allocated at a freed
one's address never matches), with the same version counter (bumped by
every in-place update) and the same storage address (``.data`` assignment
swaps the storage of the same object). Inference tensors
(torch.inference_mode) have no version counter, so values computed from
them are never cached.

Used by the fold cache of ``FusedResNeXtBlock`` (block.py), and as
``WeightCache`` for the packed weights of the ``triton`` backend
(backends/triton/packing.py) and the ``cuda``/``cuda_emulated`` backends
(backends/cuda).
"""

import collections
import threading
import weakref

import torch

_CACHE_SIZE = 32


def cacheable(tensors):
    """False inside a torch.func transform (torch.vmap, torch.func.grad, ...:
    its tensors are wrappers without storage to take the address of, valid
    at one transform level only; asking once is cheaper than asking each
    tensor), or when any (non-None) tensor is an inference tensor (no
    version counter)."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return not any(t is not None and t.is_inference() for t in tensors)


class TensorSnapshot:
    """The identity, version and storage address of a list of tensors (None
    entries allowed), taken when a value was computed from them."""

    __slots__ = ("_refs", "_stamps")

    def __init__(self, tensors):
        self._refs = [None if t is None else weakref.ref(t) for t in tensors]
        self._stamps = [None if t is None else (t._version, t.data_ptr()) for t in tensors]

    def matches(self, tensors):
        """True when `tensors` are the same objects, unmodified since the snapshot."""
        if len(tensors) != len(self._refs):
            return False
        for ref, stamp, t in zip(self._refs, self._stamps, tensors):
            if t is None or ref is None:
                if t is not ref:
                    return False
            elif ref() is not t or stamp != (t._version, t.data_ptr()):
                return False
        return True

    def alive(self):
        """False once any of the snapshot's tensors was freed (it can never match again)."""
        return all(ref is None or ref() is not None for ref in self._refs)


def _tensor_key(t):
    # What a lookup can hash; the snapshot decides whether a hit is valid.
    return (t.data_ptr(), t._version, tuple(t.shape), tuple(t.stride()), t.dtype, t.device)


class WeightCache:
    """LRU cache: ``get(pack, tensors, extra)`` returns ``pack()`` as it was
    computed for the same tensors (None entries allowed, see TensorSnapshot)
    and the same hashable ``extra`` (whatever else the packing depends on).

    Entries whose tensors were freed are dropped at the next insertion. A
    copy (copy.deepcopy, pickling) of a cache starts empty: its entries
    refer to the identity of the original's tensors.
    """

    def __init__(self, maxsize=_CACHE_SIZE):
        self._entries = collections.OrderedDict()
        self._maxsize = maxsize
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"_maxsize": self._maxsize}

    def __setstate__(self, state):
        self.__init__(state["_maxsize"])

    def get(self, pack, tensors, extra):
        if not cacheable(tensors):
            return pack()
        # Which tensors are None is part of the key: the present ones alone
        # could match another argument layout.
        key = (extra, tuple(t is None for t in tensors)) + tuple(_tensor_key(t) for t in tensors if t is not None)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0].matches(tensors):
                self._entries.move_to_end(key)
                return entry[1]
        value = pack()
        with self._lock:
            # Entries whose weights were freed can never hit again (e.g. BN
            # folded afresh on every training-mode forward); drop them so they
            # do not hold packed copies until LRU eviction.
            for dead in [k for k, (snap, _) in self._entries.items() if not snap.alive()]:
                del self._entries[dead]
            self._entries[key] = (TensorSnapshot(tensors), value)
            self._entries.move_to_end(key)
            while len(self._entries) > self._maxsize:
                self._entries.popitem(last=False)
        return value

    def clear(self):
        with self._lock:
            self._entries.clear()

    def __len__(self):
        return len(self._entries)
