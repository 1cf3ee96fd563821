"""Command line: ``python -m resnext_kernels info``, ``... bench`` and ``... tune``."""

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
    lines += _store_lines()
    print("\n".join(lines))
    return 0


def _store_lines():
    """info's lines about the tuning store: where, how many entries, and the
    entries valid on this machine (its GPUs; the CPU and the emulation)."""
    import torch

    from .common import tuning_store

    path = tuning_store.store_path()
    if path is None:
        return ["tuning store     off (RESNEXT_KERNELS_CACHE_DIR=off): choices are kept in the process only"]
    entries = tuning_store.STORE.entries()
    machine = [tuning_store.validity(torch.device("cuda", i)) for i in range(torch.cuda.device_count())]
    machine.append(tuning_store.validity(torch.device("cpu")))
    here = tuning_store.matching(machine)
    lines = [f"tuning store     {path} ({len(entries)} entries, {len(here)} valid on this machine)"]
    for r in sorted(here, key=lambda r: (r.get("choice", ""), str(r.get("problem")))):
        device = r["validity"].get("gpu") or ("emulation" if "emulation" in r["validity"] else r["validity"]["device"])
        lines.append(f"  {r.get('choice', '?'):<20} {device:<24} {r.get('problem')} -> {r['value']}")
    return lines


_TUNE_MODELS = ("resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "resnext29_8x64d", "resnext29_16x64d",
                "resnext29")


def _add_tune_arguments(p):
    import torch

    p.add_argument("--model", choices=_TUNE_MODELS, default="resnext50_32x4d",
                   help="the builder of rk.models (no weights are loaded)")
    p.add_argument("--batch", type=int, default=128, help="images per batch (default 128)")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="bfloat16")
    p.add_argument("--train", action="store_true", help="train mode (batch-statistics BN: the training op)")
    p.add_argument("--channels-last", action="store_true", help="feed a channels_last input")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto", help="the blocks' backend (default auto); cuda_emulated on "
                   "--device cpu times the emulated kernel's plans (testing only: says nothing about a GPU)")
    p.add_argument("--image-size", type=int, default=None, help="input height and width (default 224, 32 for "
                   "the resnext29 models)")
    p.add_argument("--cardinality", type=int, default=2, help="--model resnext29: groups (default 2)")
    p.add_argument("--width-per-group", type=int, default=4, help="--model resnext29: d (default 4)")
    p.add_argument("--blocks-per-stage", type=int, default=3, help="--model resnext29: blocks per stage")


def _tune(args):
    import torch

    from . import models, warmup
    from .common import tuning_store

    for name in ("batch", "image_size", "cardinality", "width_per_group", "blocks_per_stage"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.model == "resnext29":
        model = models.resnext29(args.cardinality, args.width_per_group, blocks_per_stage=args.blocks_per_stage,
                                 backend=args.backend)
    else:
        model = getattr(models, args.model)(backend=args.backend)
    size = args.image_size or (32 if args.model.startswith("resnext29") else 224)
    dtype = getattr(torch, args.dtype)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(device=args.device, dtype=dtype, memory_format=memory_format).train(args.train)
    x = torch.randn(args.batch, 3, size, size, device=args.device, dtype=dtype).contiguous(memory_format=memory_format)
    report = warmup.tune(model, x, progress=True)
    print(f"tuning store: {tuning_store.store_path() or 'off (RESNEXT_KERNELS_CACHE_DIR=off)'}")
    print(warmup.report_line(report))
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m resnext_kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, GPU, and which backends are usable (and why not)")
    bench_parser = sub.add_parser("bench", help="validate every usable backend, then benchmark the block "
                                  "against eager and torch.compile (see docs/benchmarks.md)")
    from .bench import cli as bench_cli

    bench_cli.add_arguments(bench_parser)
    _add_tune_arguments(sub.add_parser("tune", help="make every timed choice of a model's blocks now and keep it "
                                       "in the tuning store (a warm-up for later processes)"))
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info()
    if args.command == "bench":
        return bench_cli.run(args)
    if args.command == "tune":
        return _tune(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
