"""Resolve one GPU-check stage command without running it (the check's dry run,
GPU_CHECK_DRY_RUN=1 scripts/gpu_check.sh; scripts/gpu_check_prepare.sh runs it).

    python scripts/gpu_check_resolve.py -- COMMAND...

What "resolves" means, by the command's form (leading `env VAR=VALUE` words
are applied first; a wrapper such as compute-sanitizer or ncu is looked up on
PATH, where its absence on a CPU machine is reported, not failed, and the
Python command it wraps is resolved):
  python -m pytest ARGS   the same arguments collect at least one test
                          (--collect-only; pytest-xdist's -n/--dist dropped);
  python -m MODULE ARGS   the module imports and its argparse parser accepts
  python SCRIPT.py ARGS   ARGS (it exits right after parse_args);
  bash SCRIPT.sh ARGS     the script exists and parses (bash -n).
Any other argument naming a file under tests/, benchmarks/ or scripts/ must
exist. Exit status 0 when the command resolves, 1 otherwise, with the reason.
"""

import argparse
import os
import re
import runpy
import shutil
import subprocess
import sys

WRAPPERS = ("compute-sanitizer", "ncu", "timeout")
REPO_FILE = re.compile(r"^(tests|benchmarks|scripts)/[\w./-]+\.(py|sh)$")
XDIST_OPTIONS = {"-n": 1, "--dist": 1, "--numprocesses": 1}


class _Resolved(Exception):
    pass


def _strip_env(argv):
    if argv and argv[0] == "env":
        argv = argv[1:]
        while argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]):
            name, value = argv[0].split("=", 1)
            os.environ[name] = value
            argv = argv[1:]
    return argv


def _is_python(word):
    return word == os.environ.get("PYTHON") or os.path.basename(word).startswith("python")


def _unwrap(argv):
    """(wrapper notes, the Python/bash command inside)."""
    notes = []
    while argv and os.path.basename(argv[0]) in WRAPPERS:
        tool = argv[0]
        notes.append(f"{tool}: {shutil.which(tool) or 'not on PATH here (needed on the GPU machine)'}")
        rest = [i for i, word in enumerate(argv[1:], 1) if _is_python(word) or word == "bash"]
        if not rest:
            raise SystemExit(f"unresolved: no python or bash command inside {tool}: {argv}")
        argv = argv[rest[0]:]
    return notes, argv


def _check_files(args):
    missing = [a for a in args if REPO_FILE.match(a) and not os.path.exists(a)]
    if missing:
        raise SystemExit(f"unresolved: missing files {missing}")


def _pytest(args):
    kept, skip = [], 0
    for a in args:
        if skip:
            skip -= 1
            continue
        if a in XDIST_OPTIONS:
            skip = XDIST_OPTIONS[a]
            continue
        kept.append(a)
    proc = subprocess.run([sys.executable, "-m", "pytest", *kept, "--collect-only", "-q"], capture_output=True,
                          text=True)
    tail = proc.stdout.strip().splitlines()[-1:] or proc.stderr.strip().splitlines()[-1:]
    # "N tests collected" (or "N/M tests collected (K deselected)"); with -qq one "file: N" line per file.
    found = re.search(r"(\d+)(?:/\d+)? tests? collected", proc.stdout)
    count = int(found.group(1)) if found else sum(int(n) for n in re.findall(r"^\S+: (\d+)$", proc.stdout, re.M))
    if proc.returncode != 0 or count == 0:
        raise SystemExit(f"unresolved: pytest {' '.join(kept)}: exit {proc.returncode}: {tail}\n{proc.stderr[-2000:]}")
    return f"pytest collects {count} tests"


def _argparse_only(target, args, module):
    """Import and run `target` until its parser has parsed `args`."""
    real_parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, *a, **kw):
        real_parse(self, *a, **kw)  # exits 2 on an unknown flag or a bad value
        raise _Resolved

    argparse.ArgumentParser.parse_args = parse_then_stop
    sys.argv = [target, *args]
    if not module:
        sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
    try:
        if module:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(target, run_name="__main__")
    except _Resolved:
        return f"{target}: imports, and its flags parse"
    except SystemExit as exc:
        raise SystemExit(f"unresolved: {target} {' '.join(args)}: exit {exc.code}") from None
    finally:
        argparse.ArgumentParser.parse_args = real_parse
    raise SystemExit(f"unresolved: {target} ran to its end without parsing arguments (not a dry run)")


def resolve(argv):
    argv = _strip_env(argv)
    notes, argv = _unwrap(argv)
    if not argv:
        raise SystemExit("unresolved: empty command")
    _check_files(argv[1:])
    if argv[0] == "bash":
        proc = subprocess.run(["bash", "-n", argv[1]], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"unresolved: bash -n {argv[1]}: {proc.stderr}")
        return notes + [f"{argv[1]} parses"]
    if not _is_python(argv[0]):
        raise SystemExit(f"unresolved: not a python or bash command: {argv}")
    rest = argv[1:]
    if rest[:2] == ["-m", "pytest"]:
        return notes + [_pytest(rest[2:])]
    if rest[:1] == ["-m"]:
        return notes + [_argparse_only(rest[1], rest[2:], module=True)]
    if rest and rest[0].endswith(".py"):
        return notes + [_argparse_only(rest[0], rest[1:], module=False)]
    raise SystemExit(f"unresolved: unknown python command form: {argv}")


def main():
    argv = sys.argv[1:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    print("resolve:", " ".join(argv), flush=True)
    for line in resolve(argv):
        print("  ok:", line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
