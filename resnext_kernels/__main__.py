"""Command line: ``python -m resnext_kernels info`` and ``python -m resnext_kernels bench``."""

import argparse
import sys


def _info():
    import torch

    from .backends import registry
    from .common import extension

    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:
        triton_version = f"not importable ({type(exc).__name__}: {exc})"
    lines = [
        f"resnext_kernels  {__import__('resnext_kernels').__version__}",
        f"torch            {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
        f"triton           {triton_version}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"GPU {i}            {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
    else:
        lines.append("GPU              none visible (torch.cuda.is_available() is False)")
    ext = extension.extension()
    if ext is None:
        lines.append(f"extension _C     not loaded: {extension.extension_error()}")
    else:
        lines.append(f"extension _C     loaded (built against torch {ext.torch_version()}, "
                     f"CUDA kernels: {'yes' if ext.built_with_cuda() else 'no'})")
    lines.append("backends:")
    for name, info in registry.available_backends().items():
        tag = " [testing]" if info["testing"] else ""
        for dev in ("cpu", "cuda"):
            reason = info["reason"][dev]
            state = "usable" if reason is None else f"unusable: {reason}"
            lines.append(f"  {name + tag:<24} {dev:<5} {state}")
    print("\n".join(lines))
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m resnext_kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, GPU, and which backends are usable (and why not)")
    bench_parser = sub.add_parser("bench", help="validate every usable backend, then benchmark the block "
                                  "against eager and torch.compile (see docs/benchmarks.md)")
    from .bench import cli as bench_cli

    bench_cli.add_arguments(bench_parser)
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info()
    if args.command == "bench":
        return bench_cli.run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
