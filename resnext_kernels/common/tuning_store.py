"""The tuning store: the results of every timed choice, kept on disk so that
a new process (a training job's start, a server replica, a DDP rank) does
not time them again.

Every timed choice of the package goes through tuning.select_fastest, which
keeps its choices in process memory per tune key (the in-memory part) and,
on a miss, asks this store (the on-disk part) before timing anything; what
it times it writes here. One JSON file, FILE_NAME, in
settings.tuning_cache_dir() (RESNEXT_KERNELS_CACHE_DIR; "off" disables the
disk part).

An entry's key (entry_key) is the choice's name ("auto", "triton",
"cuda_plan", ...), the problem (tuning.problem_fields: the tune key without
the device index) and what makes a timing valid there (validity): the GPU's
name, SM count and compute capability, the CUDA runtime and driver, the
torch, triton and package versions; the emulated CUDA kernel's entries are
keyed to the emulation instead of a GPU (its own choice name and
validity), so no GPU run ever uses them. Anything else changes the key,
and a changed key is a miss.

Safety:
  * writes take a file lock (filelock, beside the file) and replace the file
    atomically (write a temporary file, then os.replace), merging with what
    other processes wrote meanwhile: many processes starting at once (the
    ranks of one node) leave a valid file holding all their entries;
    readers need no lock (os.replace is atomic);
  * a file that cannot be read as this format (corrupt, truncated, another
    format version) is ignored with one warning (TuningStoreWarning) and
    replaced by the next write; a directory that cannot be written is
    warned about once and the choices stay in memory;
  * a stored value is used only if it is one of the candidates this build
    offers for the problem (get's `options`); else it is a miss.
"""

import contextlib
import ctypes
import functools
import importlib.metadata
import json
import os
import platform
import tempfile
import threading
import warnings

import filelock
import torch

from . import settings

FORMAT = 1  # of the file's content; another value is a foreign file
FILE_NAME = "tuning.json"
LOCK_TIMEOUT_S = 120  # a writer holds the lock for milliseconds; this only bounds a stuck one


class TuningStoreWarning(UserWarning):
    """The on-disk tuning store could not be read or written; the choices stay in memory."""


def store_path():
    """The store's file, or None when the disk part is off."""
    directory = settings.tuning_cache_dir()
    return None if directory is None else os.path.join(directory, FILE_NAME)


# -- what makes a timing valid ----------------------------------------------------


def _distribution_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@functools.cache
def software_versions():
    """torch, triton and this package's versions (a timing is valid for one set)."""
    return {"torch": torch.__version__, "triton": _distribution_version("triton"),
            "resnext_kernels": _distribution_version("resnext_kernels")}


@functools.cache
def cuda_driver_version():
    """cuDriverGetVersion of libcuda (e.g. 13000), or None without a driver."""
    try:
        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0:
            return version.value
    except (OSError, AttributeError):
        pass
    return None


@functools.cache
def _cuda_validity(index):
    p = torch.cuda.get_device_properties(index)
    return {"device": "cuda", "gpu": p.name, "sm_count": p.multi_processor_count,
            "capability": f"{p.major}.{p.minor}", "cuda": torch.version.cuda, "driver": cuda_driver_version(),
            **software_versions()}


def validity(device, **extra):
    """What a timing on `device` (a torch.device) is valid for, as a dict of
    plain values: the GPU and its software for CUDA; the host for any other
    device. `extra` (e.g. the emulation's build) joins it."""
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        found = dict(_cuda_validity(index))
    else:
        found = {"device": device.type, "host": platform.machine(), **software_versions()}
    found.update(extra)
    return found


def entry_key(choice, problem, valid_for):
    """The store's key of one choice: a canonical JSON string of the choice's
    name, the problem (a sequence of plain values) and its validity dict."""
    return json.dumps([choice, list(problem), valid_for], sort_keys=True, separators=(",", ":"))


# -- the file ---------------------------------------------------------------------


def _from_json(value):
    """JSON gives lists where the choices are tuples (triton's (strategy, chunk))."""
    if isinstance(value, list):
        return tuple(_from_json(v) for v in value)
    return value


class TuningStore:
    """The on-disk part: entry_key -> record {"choice", "problem", "validity", "value"}."""

    def __init__(self):
        self._lock = threading.Lock()
        self._path = None
        self._signature = None  # (mtime_ns, size) of the file last read
        self._entries = {}
        self._warned = set()

    def _warn_once(self, what, message):
        if what not in self._warned:
            self._warned.add(what)
            warnings.warn(message, TuningStoreWarning, stacklevel=4)

    def _load(self, path):
        """The file's entries, {} when it does not exist or is not a file of
        this format (warned about once per path)."""
        try:
            with open(path, encoding="utf-8") as f:
                content = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            self._warn_once(("unreadable", path), f"ignoring the tuning store {path}: it cannot be read as JSON "
                            f"({type(exc).__name__}: {exc}); choices will be timed again and the file replaced")
            return {}
        entries = content.get("entries") if isinstance(content, dict) else None
        if not isinstance(content, dict) or content.get("format") != FORMAT or not isinstance(entries, dict):
            found = content.get("format") if isinstance(content, dict) else type(content).__name__
            self._warn_once(("foreign", path), f"ignoring the tuning store {path}: it is not a format-{FORMAT} "
                            f"store (format {found!r}); choices will be timed again and the file replaced")
            return {}
        return {k: r for k, r in entries.items() if isinstance(r, dict) and "value" in r}

    def entries(self):
        """Every record of the file (re-read when it changed), {} when the disk part is off."""
        path = store_path()
        if path is None:
            return {}
        try:
            stat = os.stat(path)
            signature = (stat.st_mtime_ns, stat.st_size)
        except OSError:
            signature = None
        with self._lock:
            if path != self._path or signature != self._signature:
                self._path, self._signature = path, signature
                self._entries = self._load(path) if signature is not None else {}
            return self._entries

    def get(self, key, options):
        """The stored value for entry_key `key` if it is one of `options`, else None."""
        record = self.entries().get(key)
        if record is None:
            return None
        value = _from_json(record["value"])
        return value if value in options else None

    def put(self, key, record):
        """Add `record` (its "value" JSON-serializable) under entry_key `key`:
        under the file lock, merged with the file's current entries, written
        atomically. Nothing happens with the disk part off."""
        path = store_path()
        if path is None:
            return
        directory = os.path.dirname(path)
        try:
            os.makedirs(directory, exist_ok=True)
            with filelock.FileLock(path + ".lock", timeout=LOCK_TIMEOUT_S):
                entries = dict(self._load(path))
                if entries.get(key) == record:
                    return
                entries[key] = record
                fd, tmp = tempfile.mkstemp(dir=directory, prefix=FILE_NAME + ".", suffix=".tmp")
                try:
                    with os.fdopen(fd, "w", encoding="utf-8") as f:
                        json.dump({"format": FORMAT, "entries": entries}, f, indent=0, sort_keys=True)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
        except (OSError, filelock.Timeout) as exc:
            self._warn_once(("unwritable", path), f"cannot write the tuning store {path} ({type(exc).__name__}: "
                            f"{exc}); tuning results stay in this process")


STORE = TuningStore()


def matching(valid_fors):
    """The store's records valid on one of `valid_fors` (validity dicts of
    this machine's devices): every field of that dict has the record's value
    (a record may carry more, e.g. the timed plans or the emulation's build)."""
    def valid(record, machine):
        v = record.get("validity")
        return isinstance(v, dict) and all(v.get(k) == value for k, value in machine.items())

    return [r for r in STORE.entries().values() if any(valid(r, m) for m in valid_fors)]
