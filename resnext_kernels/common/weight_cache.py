"""A cache of packed weights, keyed on the identity and version of the
weight tensors they were packed from.

Used by the `triton` backend (backends/triton/packing.py) and the `cuda` and
`cuda_emulated` backends (cuda_backend.py).
"""

import collections
import threading
import weakref

_CACHE_SIZE = 32


def _tensor_key(t):
    # _version changes on every in-place update, so a modified weight misses.
    return (t.data_ptr(), t._version, tuple(t.shape), tuple(t.stride()), t.dtype, t.device)


class WeightCache:
    """LRU cache: ``get(pack, tensors, extra)`` returns ``pack()`` as it was
    computed for the same tensors (None entries allowed) and the same hashable
    ``extra`` (whatever else the packing depends on).

    The key holds (data_ptr, _version, shape, stride, dtype, device) of every
    tensor. A freed tensor's address can be reused by a new tensor of the same
    shape with _version 0, so a key alone could return stale weights; each
    entry also keeps weak references to the tensors it was packed from and is
    used only while those are the very tensors passed in; entries whose
    tensors were freed are dropped at the next insertion. Inference tensors
    (torch.inference_mode) have no version counter, so they are packed on
    every call.
    """

    def __init__(self, maxsize=_CACHE_SIZE):
        self._entries = collections.OrderedDict()
        self._maxsize = maxsize
        self._lock = threading.Lock()

    def get(self, pack, tensors, extra):
        present = [t for t in tensors if t is not None]
        if any(t.is_inference() for t in present):
            return pack()
        # Which tensors are None is part of the key: the present ones alone
        # could match another argument layout.
        key = (extra, tuple(t is None for t in tensors)) + tuple(_tensor_key(t) for t in present)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and all(ref() is t for ref, t in zip(entry[0], present)):
                self._entries.move_to_end(key)
                return entry[1]
        value = pack()
        refs = [weakref.ref(t) for t in present]
        with self._lock:
            # Entries whose weights were freed can never hit again (e.g. BN
            # folded afresh on every training-mode forward); drop them so they
            # do not hold packed copies until LRU eviction.
            for dead in [k for k, (rs, _) in self._entries.items() if any(r() is None for r in rs)]:
                del self._entries[dead]
            self._entries[key] = (refs, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self._maxsize:
                self._entries.popitem(last=False)
        return value

    def clear(self):
        with self._lock:
            self._entries.clear()

    def __len__(self):
        return len(self._entries)
