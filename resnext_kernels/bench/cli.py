"""``python -m resnext_kernels bench``: validate every usable backend, then time them.

1. Validation: for each shape and dtype, every usable fused backend runs the
   block on the benchmark input; its max error on the first images vs the
   float64 CPU reference must be <= 2x eager PyTorch's own error at that dtype
   plus 1e-6 of the output's largest magnitude (the package's one tolerance
   rule, common.tolerance). Any failure (or exception) makes the exit status 1.
2. Timing (progress bar on stderr): fused backends that passed, eager NCHW,
   eager channels_last and, for the chosen dtypes, torch.compile; then a
   table with speedups vs the faster eager layout and vs compile, achieved
   GB/s and TFLOP/s and % of the time floor.

On CPU the fused kernels are not timed (they run in an emulation there):
a header says for each fused backend whether it ran and why not (with the
command that would run it), and cuda_emulated (and triton, when
TRITON_INTERPRET=1 is set) are checked against the float64 reference on
small shapes, "correctness only: emulation, not timed". Every time comes
with its spread over the rounds; a ratio whose two interquartile ranges
overlap is marked within noise; the lines under the table say what
"% of floor" measures and when it overstates.

Defaults: quick on CPU (small shapes, short timing), thorough on CUDA; see
measure.defaults. The harness lives in resnext_kernels.bench (shapes, measure, cases).
"""

import json
import random
import sys
import time

import torch

from ..backends import registry
from ..common.timing import median
from . import report
from .cases import (
    EMULATED_BACKENDS,
    FUSED_IMPLS,
    IMPLS,
    Case,
    emulated_unavailable_reason,
    impl_unavailable_reason,
    prepare_emulated,
)
from .measure import (
    Ceilings,
    backend_settings,
    default_device,
    defaults,
    device_name,
    performance,
    spread,
    time_per_call,
)
from .shapes import (
    EMULATION_BATCH,
    EMULATION_MAX_HW,
    SHAPES,
    dtype_name,
    emulation_shape,
    parse_compile_dtypes,
    parse_dtype,
    parse_shapes,
)

COMMAND = "python -m resnext_kernels bench"
ON_A_GPU = f"{COMMAND}  (on a machine with an NVIDIA GPU)"
# Seconds of correctness-only checks per emulated backend; shapes past it are
# skipped with the reason, so that a loaded machine still finishes in time.
EMULATION_BUDGET_S = 40.0
EMULATION_LABEL = "correctness only: emulation, not timed"
EMULATION_KIND = {"cuda_emulated": "the CUDA kernels' source compiled for this CPU",
                  "triton": "the Triton kernels in Triton's interpreter"}


def add_arguments(parser):
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="short run (the default on CPU)")
    mode.add_argument("--thorough", action="store_true", help="full run (the default on CUDA)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="default: cuda if available, else cpu")
    parser.add_argument("--shapes", nargs="+", default=None, metavar="SHAPE",
                        help=f"shape names ({', '.join(SHAPES)}) or NAME=H:CIN:WIDTH:GROUPS:COUT:STRIDE; "
                             "default: all named shapes")
    parser.add_argument("--dtypes", nargs="+", default=None, metavar="DTYPE",
                        help="bfloat16 float16 float32 (default: all on CUDA thorough, bfloat16 on CUDA quick, "
                             "bfloat16 float32 on CPU)")
    parser.add_argument("--batch", type=int, default=None, help="default: 128 on CUDA, 2 on CPU")
    parser.add_argument("--max-hw", type=int, default=None, help="cap on H=W (default: none on CUDA, 14 on CPU)")
    parser.add_argument("--compile", default=None, metavar="DTYPES",
                        help="dtypes with a torch.compile baseline: none, all or a comma list (default: bfloat16 "
                             "on CUDA thorough, none otherwise)")
    parser.add_argument("--seconds", type=float, default=None, help="timing budget per case")
    parser.add_argument("--seed", type=int, default=None, help="seed of weights and inputs (default: random)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for this run (default: torch's own choice)")
    parser.add_argument("--json", metavar="FILE", default=None, help="write results as JSON")
    parser.add_argument("--plot", metavar="FILE.png", default=None, help="write a chart of speedup vs eager")


class _LineProgress:
    """Stand-in for tqdm where it is not installed (the GPU machine has no network): one line per case."""

    def __init__(self, total):
        self.total, self.done, self.desc = total, 0, ""

    def set_description(self, desc):
        self.desc = desc

    def update(self, n):
        self.done += n
        print(f"[{self.done}/{self.total}] {self.desc}", file=sys.stderr, flush=True)

    def close(self):
        pass


def _progress(total):
    """A progress bar on stderr: tqdm if installed, else one line per case."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _LineProgress(total)
    return tqdm(total=total, file=sys.stderr, unit="case", dynamic_ncols=True)


def _settings(args):
    device = torch.device(args.device or default_device().type)
    quick = args.quick or (device.type == "cpu" and not args.thorough)
    d = defaults(device, quick)
    shapes = parse_shapes(args.shapes or [",".join(SHAPES)])
    max_hw = args.max_hw or d["max_hw"]
    return {
        "device": device,
        "quick": quick,
        "shapes": [s.with_max_hw(max_hw) for s in shapes],
        "dtypes": [parse_dtype(t) for t in args.dtypes] if args.dtypes else d["dtypes"],
        "compile_dtypes": parse_compile_dtypes(args.compile) if args.compile else d["compile_dtypes"],
        "batch": args.batch or d["batch"],
        "seconds": args.seconds or d["seconds"],
        "seed": args.seed if args.seed is not None else random.randrange(2**31 - 1),
    }


def validate(s):
    """[{shape, dtype, backend, max_abs_err, eager_err, tolerance, ok, error}] for every usable fused backend."""
    results = []
    for shape in s["shapes"]:
        for dtype in s["dtypes"]:
            usable = [b for b in FUSED_IMPLS if impl_unavailable_reason(b, s["device"], dtype) is None]
            if not usable:
                continue
            case = Case(shape, s["batch"], dtype, s["device"], s["seed"], n_inputs=1)
            for backend in usable:
                r = {"shape": shape.name, "dtype": dtype_name(dtype), "backend": backend,
                     "eager_err": case.eager_error, "tolerance": case.tolerance}
                try:
                    err = case.build(backend)[2]
                    r.update(max_abs_err=err, ok=err <= case.tolerance, error=None)
                except Exception as exc:  # a crashing backend is a failed validation, reported, not a traceback
                    r.update(max_abs_err=None, ok=False, error=f"{type(exc).__name__}: {exc}")
                results.append(r)
                status = "pass" if r["ok"] else "FAIL"
                detail = (f"max err {r['max_abs_err']:.3e}  tol {r['tolerance']:.3e}  (eager {r['eager_err']:.3e})"
                          if r["error"] is None else r["error"])
                print(f"  {status}  {shape.name:<14} {r['dtype']:<9} {backend:<10} {detail}", flush=True)
            del case
            if s["device"].type == "cuda":
                torch.cuda.empty_cache()
    return results


def backend_status(device):
    """{backend: {"status", "reason", "command"}} for every backend of the
    registry in a run on `device`: status "timed" (validated, then timed),
    "correctness only" (EMULATED_BACKENDS on CPU) or "not run"; reason: why it
    is not timed (the reasons of registry.available_backends(), None if it is);
    command: what would run it (None if nothing would)."""
    info = registry.available_backends()
    status = {}
    for name, b in info.items():
        why = b["reason"]
        if device.type == "cuda" or name == "reference":
            here = why[device.type]
            if name in FUSED_IMPLS and here is None:
                entry = ("timed", None, None)
            elif name == "cuda_emulated":
                entry = ("not run", here, f"{COMMAND} --device cpu  (correctness only)")
            else:
                entry = ("not run", here, None)
        elif name in EMULATED_BACKENDS and why["cpu"] is None:
            timed_on = None if name == "cuda_emulated" else ON_A_GPU
            entry = ("correctness only", why["cuda"] if name == "triton" else "an emulation is never timed",
                     timed_on)
        else:
            reasons = "; ".join(dict.fromkeys(r for r in (why["cpu"], why["cuda"]) if r))
            if name == "triton":
                command = f"TRITON_INTERPRET=1 {COMMAND}  (correctness only, in the interpreter); timed: {ON_A_GPU}"
            elif name == "cuda":
                command = ON_A_GPU
            else:
                command = None
            entry = ("not run", reasons, command)
        status[name] = dict(zip(("status", "reason", "command"), entry))
    return status


def print_backend_status(status, device):
    """The header: each fused backend's status (on CUDA only those not timed)."""
    lines = []
    for name, st in status.items():
        if name == "reference" or (device.type == "cuda" and (st["status"] == "timed" or name == "cuda_emulated")):
            continue
        text = f"{EMULATION_LABEL} ({EMULATION_KIND[name]})" if st["status"] == "correctness only" else st["status"]
        if st["reason"] and st["status"] != "correctness only":
            text += f": {st['reason']}"
        lines.append(f"  {name:<14} {text}")
        if st["command"]:
            label = "time it" if st["status"] == "correctness only" else "run it"
            lines.append(f"  {'':<14} {label}: {st['command']}")
    if lines:
        print(f"fused backends on {device.type} (python -m resnext_kernels info lists every backend):")
        print("\n".join(lines), flush=True)


def _print_emulated(r):
    head = f"{r['shape']:<14} {r['hw']}x{r['hw']} {r['dtype']:<9} {r['backend']:<14}"
    if r["skipped"]:
        print(f"  skip  {head} {r['skipped']}", flush=True)
    elif r["error"]:
        print(f"  FAIL  {head} {r['error']}", flush=True)
    else:
        print(f"  {'ok  ' if r['ok'] else 'FAIL'}  {head} max err {r['max_abs_err']:.3e}  "
              f"tol {r['tolerance']:.3e}  (eager {r['eager_err']:.3e})", flush=True)


def check_emulated(s):
    """Correctness-only rows: EMULATED_BACKENDS usable on this CPU vs the
    float64 reference on the small shapes of shapes.emulation_shape, one call
    each, the tolerance rule of validate(). A row that cannot run says why in
    "skipped" (dtype unsupported there, EMULATION_BUDGET_S spent); one that
    crashes (or whose backend failed to load) has ok False and the error."""
    backends = [b for b in EMULATED_BACKENDS if registry.unavailable_reason(b, "cpu") is None]
    if not backends:
        return []
    print(f"{EMULATION_LABEL} (fused kernels on this CPU vs float64 reference, batch {EMULATION_BATCH}, "
          f"H=W <= {EMULATION_MAX_HW}, tolerance as above):", flush=True)
    load_error = {}
    for backend in backends:  # one-time loading, outside the time budget
        try:
            prepare_emulated(backend)
        except Exception as exc:  # e.g. the emulation library fails to build: each of its rows fails with this
            load_error[backend] = f"{type(exc).__name__}: {exc}"
    spent = dict.fromkeys(backends, 0.0)
    results = []
    for full in s["shapes"]:
        shape = emulation_shape(full)
        for dtype in s["dtypes"]:
            case = None  # built for the first backend that runs (the float64 reference and eager error)
            for backend in backends:
                r = {"shape": shape.name, "spec": shape.spec(), "hw": shape.hw, "batch": EMULATION_BATCH,
                     "dtype": dtype_name(dtype), "backend": backend, "max_abs_err": None, "eager_err": None,
                     "tolerance": None, "ok": None, "error": None,
                     "skipped": emulated_unavailable_reason(backend, dtype)}
                if r["skipped"] is None and spent[backend] > EMULATION_BUDGET_S:
                    r["skipped"] = (f"the {EMULATION_BUDGET_S:.0f} s budget of {backend}'s checks is spent; "
                                    f"check it alone with --shapes {full.name}")
                if r["skipped"] is None and backend in load_error:
                    r["error"] = load_error[backend]
                elif r["skipped"] is None:
                    t0 = time.perf_counter()
                    try:
                        case = case or Case(shape, EMULATION_BATCH, dtype, torch.device("cpu"), s["seed"], n_inputs=1)
                        r.update(eager_err=case.eager_error, tolerance=case.tolerance)
                        err = case.emulated_error(backend)
                        r.update(max_abs_err=err, ok=err <= case.tolerance)
                    except Exception as exc:  # reported as a failed check, not a traceback
                        r["error"] = f"{type(exc).__name__}: {exc}"
                    spent[backend] += time.perf_counter() - t0
                if r["error"] is not None:
                    r["ok"] = False
                results.append(r)
                _print_emulated(r)
    return results


def time_all(s, ceilings, failed):
    """Timed rows for every (shape, dtype, impl) that is available and did not fail validation."""
    plan = []
    for shape in s["shapes"]:
        for dtype in s["dtypes"]:
            impls = [i for i in IMPLS
                     if impl_unavailable_reason(i, s["device"], dtype, s["compile_dtypes"]) is None
                     and (shape.name, dtype_name(dtype), i) not in failed]
            plan.append((shape, dtype, impls))
    bar = _progress(sum(len(p[2]) for p in plan))
    rows = []
    for shape, dtype, impls in plan:
        case = Case(shape, s["batch"], dtype, s["device"], s["seed"])
        for impl in impls:
            bar.set_description(f"{shape.name} {dtype_name(dtype)} {impl}")
            row = {"shape": shape.name, "spec": shape.spec(), "dtype": dtype_name(dtype), "impl": impl,
                   "batch": s["batch"], "n_inputs": case.n_inputs}
            try:
                fn, info, err = case.build(impl)
                inputs = case.inputs_for(impl)
                times = time_per_call(fn, inputs, s["device"], s["seconds"])
                med = median(times)
                row.update(info, median_s=med, rounds=len(times), **spread(times), error=None,
                           **case.error_info(err),
                           **performance(shape, s["batch"], dtype, med, ceilings, len(inputs)))
            except Exception as exc:
                row.update(median_s=None, error=f"{type(exc).__name__}: {exc}")
            rows.append(row)
            bar.update(1)
        del case
        if s["device"].type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    return rows


def plot(rows, path):
    """Bar chart of speedup vs the faster eager layout, per shape (x) and impl (bars), one panel per dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    fig, axes = plt.subplots(len(dtypes), 1, figsize=(11, 3.5 * len(dtypes)), squeeze=False)
    for ax, dtype in zip(axes[:, 0], dtypes):
        sel = [r for r in rows if r["dtype"] == dtype and r.get("vs_eager")]
        shapes = list(dict.fromkeys(r["shape"] for r in sel))
        impls = [i for i in IMPLS if any(r["impl"] == i for r in sel)]
        width = 0.8 / max(1, len(impls))
        for k, impl in enumerate(impls):
            xs, ys = [], []
            for j, shape in enumerate(shapes):
                match = [r["vs_eager"] for r in sel if r["shape"] == shape and r["impl"] == impl]
                if match:
                    xs.append(j + (k - (len(impls) - 1) / 2) * width)
                    ys.append(match[0])
            ax.bar(xs, ys, width, label=impl)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(shapes)), shapes, rotation=20)
        ax.set_ylabel("speedup vs best eager")
        ax.set_title(dtype)
        ax.legend(fontsize="small", ncol=len(impls))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args):
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args):
    try:
        s = _settings(args)
    except ValueError as exc:  # a bad --shapes / --dtypes / --compile value
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.plot:
        try:
            import matplotlib  # noqa: F401  (checked before a long run, used at its end)
        except ImportError:
            print("error: --plot needs matplotlib, which is not installed", file=sys.stderr)
            return 2
    device = s["device"]
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    with backend_settings(device) as flags:
        return _validate_and_time(args, s, flags)


def _validate_and_time(args, s, backend_settings):
    device = s["device"]
    t0 = time.perf_counter()
    print(f"resnext_kernels bench on {device_name(device)} ({'quick' if s['quick'] else 'thorough'}): "
          f"batch {s['batch']}, dtypes {[dtype_name(d) for d in s['dtypes']]}, "
          f"compile {[dtype_name(d) for d in s['compile_dtypes']] or 'none'}, seed {s['seed']}")
    for shape in s["shapes"]:
        print(f"  {shape.name:<14} {shape.describe()}")
    backends = backend_status(device)
    print_backend_status(backends, device)
    validated = "fused backend" if device.type == "cuda" else "the reference backend, ATen ops with BN folded,"
    print(f"validation ({validated} vs float64 reference; tol = 2x eager error at dtype + 1e-6 x max |ref|):",
          flush=True)
    validation = validate(s)
    failed = {(v["shape"], v["dtype"], v["backend"]) for v in validation if not v["ok"]}
    if not validation:
        print("  no usable fused backend on this device")
    emulated = check_emulated(s) if device.type == "cpu" else []

    ceilings = Ceilings(device)
    for dtype in s["dtypes"]:
        ceilings.matmul_flops_per_s(dtype)
    print(report._ceilings_line(ceilings.as_dict()), flush=True)
    rows = time_all(s, ceilings, failed)
    timed = [r for r in rows if r["median_s"] is not None]
    report.add_speedups(timed)
    print(report.block_table(timed))
    notes = report.table_notes(timed)
    print("\n".join(notes))
    crashed = [r for r in rows if r["median_s"] is None]
    for r in crashed:
        print(f"timing failed: {r['shape']} {r['dtype']} {r['impl']}: {r['error']}")
    for v in validation:
        if not v["ok"]:
            why = v["error"] or f"max err {v['max_abs_err']:.3e} > tol {v['tolerance']:.3e}"
            print(f"VALIDATION FAILED: {v['shape']} {v['dtype']} {v['backend']}: {why}")
    emulated_failed = [v for v in emulated if v["ok"] is False]
    for v in emulated_failed:
        why = v["error"] or f"max err {v['max_abs_err']:.3e} > tol {v['tolerance']:.3e}"
        print(f"VALIDATION FAILED ({EMULATION_LABEL}): {v['shape']} {v['spec']} {v['dtype']} {v['backend']}: {why}")
    elapsed = time.perf_counter() - t0
    print(f"done in {elapsed:.0f} s")

    if args.json:
        doc = {
            "format": report.FORMAT,
            "device": device_name(device),
            "torch": torch.__version__,
            "settings": {"quick": s["quick"], "batch": s["batch"], "seed": s["seed"], "seconds": s["seconds"],
                         "dtypes": [dtype_name(d) for d in s["dtypes"]],
                         "compile_dtypes": [dtype_name(d) for d in s["compile_dtypes"]],
                         "shapes": {sh.name: sh.spec() for sh in s["shapes"]}, **backend_settings},
            "ceilings": ceilings.as_dict(),
            "backends": backends,
            "validation": validation,
            "emulated": emulated,
            "rows": rows,
            "notes": notes,
            "elapsed_s": elapsed,
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    if args.plot:
        plot(timed, args.plot)
    fused_crash = any(r["impl"] in FUSED_IMPLS for r in crashed)
    return 1 if failed or fused_crash or emulated_failed else 0
