"""Markdown tables from benchmark JSON files.

    python -m resnext_kernels.bench_report RESULTS.json [MORE.json ...] > table.md
    python -m resnext_kernels.bench_report --stem    # <YYYY-MM-DD>_<card>_<shortcommit>

Reads pytest-benchmark JSON (``pytest benchmarks/ --benchmark-json``) and the
JSON of ``python -m resnext_kernels bench --json`` (format FORMAT). Several
pytest-benchmark files are merged into one table (e.g. a run without and a run
with the torch.compile baseline). Speedups are computed here, per shape and
dtype: "vs eager" against the faster of eager NCHW and eager channels_last,
"vs compile" against the torch.compile case.
"""

import argparse
import datetime
import json
import re
import subprocess
import sys

from .cases import IMPLS, MODEL_IMPLS

FORMAT = "resnext_kernels.bench/1"
EAGER_IMPLS = ("eager_nchw", "eager_cl")


def block_rows_from_pytest(data):
    """Rows (dicts) of the block cases of a pytest-benchmark JSON document."""
    rows = []
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if "shape" not in info or info.get("training"):
            continue
        row = dict(info)
        row["median_s"] = b["stats"]["median"]
        row["q1_s"], row["q3_s"] = b["stats"].get("q1"), b["stats"].get("q3")
        rows.append(row)
    return rows


def model_rows_from_pytest(data):
    rows = []
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if info.get("model") is None or info.get("training"):
            continue
        row = dict(info)
        row["median_s"] = b["stats"]["median"]
        rows.append(row)
    return rows


def training_rows_from_pytest(data):
    """Rows of the training-step cases (benchmarks/test_training_bench.py)."""
    rows = []
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if info.get("training"):
            rows.append({**info, "median_s": b["stats"]["median"]})
    return rows


def within_noise(a, b):
    """True when rows a and b's times are within noise of each other: their
    interquartile ranges over the timing rounds ([q1_s, q3_s]) overlap. None
    when either row has no spread."""
    if None in (a.get("q1_s"), a.get("q3_s"), b.get("q1_s"), b.get("q3_s")):
        return None
    return a["q1_s"] <= b["q3_s"] and b["q1_s"] <= a["q3_s"]


def add_speedups(rows, key=("shape", "dtype"), eager_impls=EAGER_IMPLS, compile_impl="compile"):
    """Set row["vs_eager"] and row["vs_compile"] (baseline time / row time; None without a baseline),
    and row["vs_eager_within_noise"], row["vs_compile_within_noise"] (within_noise of the row and
    its baseline; None for the baseline itself, without a baseline or without spreads)."""
    groups = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in key), []).append(r)
    for group in groups.values():
        timed = [r for r in group if r.get("median_s")]
        eager = min((r for r in timed if r["impl"] in eager_impls), key=lambda r: r["median_s"], default=None)
        comp = next((r for r in timed if r["impl"] == compile_impl), None)
        for r in group:
            t = r.get("median_s")
            for name, base in (("vs_eager", eager), ("vs_compile", comp)):
                r[name] = base["median_s"] / t if base and t else None
                r[f"{name}_within_noise"] = within_noise(r, base) if base and t and base is not r else None
    return rows


def sort_rows(rows, impl_order):
    """Rows ordered by shape and dtype (in order of first appearance), then impl_order."""
    first = {}
    for r in rows:
        first.setdefault(("shape", r.get("shape")), len(first))
        first.setdefault(("dtype", r.get("dtype")), len(first))
    rank = {impl: i for i, impl in enumerate(impl_order)}
    return sorted(rows, key=lambda r: (first[("shape", r.get("shape"))], first[("dtype", r.get("dtype"))],
                                       rank.get(r["impl"], len(rank))))


def _fmt(value, spec, suffix=""):
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return f"{value:{spec}}{suffix}"


def _table(header, lines):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out)


NOISE_MARK = " (noise)"
CACHE_MARK = " (cache)"


def _ratio(r, name):
    return _fmt(r.get(name), ".2f", "x" + (NOISE_MARK if r.get(f"{name}_within_noise") else ""))


def _iqr_pct(r):
    if r.get("q1_s") is None or r.get("q3_s") is None or not r.get("median_s"):
        return None
    return 100.0 * (r["q3_s"] - r["q1_s"]) / r["median_s"]


def block_table(rows):
    """Markdown table of block rows (after add_speedups), in the rows' order; table_notes explains its marks."""
    header = ["shape", "dtype", "impl", "ms", "IQR %", "vs eager", "vs compile", "GB/s", "TFLOP/s", "% of floor",
              "max err", "tol", "ok"]
    lines = []
    for r in rows:
        ms = r["median_s"] * 1e3 if r.get("median_s") else None
        ok = r.get("within_tolerance")
        lines.append([
            r["shape"], r["dtype"], r["impl"], _fmt(ms, ".4g"), _fmt(_iqr_pct(r), ".1f"), _ratio(r, "vs_eager"),
            _ratio(r, "vs_compile"), _fmt(r.get("achieved_GBps"), ".3g"), _fmt(r.get("achieved_TFLOPs"), ".3g"),
            _fmt(r.get("pct_of_floor"), ".3g", CACHE_MARK if r.get("working_set_in_cache") else ""),
            _fmt(r.get("max_abs_err"), ".2e"), _fmt(r.get("tolerance"), ".2e"),
            "-" if ok is None else _fmt(bool(ok), ""),
        ])
    return _table(header, lines)


def table_notes(rows):
    """The lines under block_table: what "% of floor" measures (and, where a
    row's working set fits in the cache, why its figure overstates) and what
    the noise flags mean."""
    floor = ("% of floor = time floor / time x 100; time floor = max(FLOPs / matmul rate, bytes floor / "
             "copy bandwidth), both ceilings measured in this run (the copy one from DRAM-sized buffers)")
    cached = [r for r in rows if r.get("working_set_in_cache")]
    if cached:
        size = max(r["cache_bytes"] for r in cached) / 2**20
        floor += (f";{CACHE_MARK}: the working set of its timing rounds (rotating inputs, output, weights) fits "
                  f"in the {size:.0f} MiB last-level cache, so DRAM bandwidth is not its floor and the figure "
                  "overstates how close it is (it can exceed 100)")
    noise = ("IQR % = interquartile range of the per-call time over the timing rounds / median x 100;"
             f"{NOISE_MARK}: the IQRs of this row and of its baseline overlap, so the ratio is within noise")
    return [floor, noise]


def add_model_error_ratio(rows):
    """row["err_vs_eager"] = max error of the logits / the eager model's, same batch (None without eager)."""
    eager = {r["batch"]: r.get("max_abs_err") for r in rows if r["impl"] == "eager"}
    for r in rows:
        e = eager.get(r["batch"])
        r["err_vs_eager"] = r["max_abs_err"] / e if e and r.get("max_abs_err") is not None else None
    return rows


def model_table(rows):
    header = ["model", "batch", "res", "impl", "ms", "images/s", "vs eager", "vs compile", "peak MiB",
              "max err", "err / eager err"]
    lines = []
    for r in rows:
        peak = r.get("peak_mem_bytes")
        lines.append([
            r["model"], str(r["batch"]), str(r["resolution"]), r["impl"], _fmt(r["median_s"] * 1e3, ".4g"),
            _fmt(r.get("images_per_s"), ".1f"), _fmt(r.get("vs_eager"), ".2f", "x"),
            _fmt(r.get("vs_compile"), ".2f", "x"), _fmt(peak / 2**20 if peak else None, ".0f"),
            _fmt(r.get("max_abs_err"), ".2e"), _fmt(r.get("err_vs_eager"), ".2f"),
        ])
    return _table(header, lines)


def training_table(rows):
    """Markdown table of training-step rows (after add_speedups)."""
    header = ["shape", "impl", "batch", "ms", "vs eager AMP", "vs compile", "derived GB/s", "images/s", "peak MiB",
              "first call s", "max diff vs eager"]
    lines = []
    for r in rows:
        peak = r.get("peak_mem_bytes")
        lines.append([
            r["shape"], r["impl"], str(r.get("batch")), _fmt(r["median_s"] * 1e3 if r.get("median_s") else None, ".4g"),
            _fmt(r.get("vs_eager"), ".2f", "x"), _fmt(r.get("vs_compile"), ".2f", "x"),
            _fmt(r.get("achieved_GBps"), ".3g"), _fmt(r.get("images_per_s"), ".1f"),
            _fmt(peak / 2**20 if peak else None, ".0f"), _fmt(r.get("first_call_s"), ".3g"),
            _fmt(r.get("max_abs_diff_vs_eager"), ".2e"),
        ])
    return _table(header, lines)


def _ceilings_line(c):
    rates = ", ".join(f"{k} {v:.3g}" for k, v in c.get("matmul_TFLOPs", {}).items())
    return f"ceilings on {c['device']}: copy {c['copy_GBps']:.3g} GB/s (read + write); matmul TFLOP/s: {rates}"


def render_pytest(docs):
    """Markdown for one or more pytest-benchmark documents (merged)."""
    blocks, models, trains, ceilings = [], [], [], {}
    for d in docs:
        blocks += block_rows_from_pytest(d)
        models += model_rows_from_pytest(d)
        trains += training_rows_from_pytest(d)
    for r in blocks:  # each case snapshots the ceilings measured so far; merge per device and run
        if "ceilings" in r:
            c = ceilings.setdefault((r["ceilings"]["device"], r["ceilings"]["copy_GBps"]), dict(r["ceilings"]))
            c["matmul_TFLOPs"] = {**c["matmul_TFLOPs"], **r["ceilings"]["matmul_TFLOPs"]}
    out = ["## pytest-benchmark suite", ""]
    for d in docs:
        commit = d.get("commit_info") or {}
        out.append(f"- run {d.get('datetime', '?')}, commit {str(commit.get('id', '?'))[:10]}"
                   f"{' (dirty)' if commit.get('dirty') else ''}, pytest-benchmark {d.get('version', '?')}")
    for c in ceilings.values():
        out.append(f"- {_ceilings_line(c)}")
    if blocks:
        devices = sorted({r.get("device", "?") for r in blocks})
        batches = sorted({r.get("batch") for r in blocks})
        out += ["", f"### Block (device {', '.join(devices)}; batch {', '.join(map(str, batches))}; "
                    "time = median per call)", "", block_table(add_speedups(sort_rows(blocks, IMPLS))), ""]
        out += table_notes(blocks)
    if models:
        models = sorted(models, key=lambda r: (r["batch"], MODEL_IMPLS.index(r["impl"])))
        add_model_error_ratio(add_speedups(models, key=("batch",), eager_impls=("eager",)))
        out += ["", "### Whole model (bfloat16, channels_last)", "", model_table(models)]
    if trains:
        add_speedups(trains, key=("shape",), eager_impls=("eager_amp",), compile_impl="compile_amp")
        out += ["", "### Training step: forward + backward (bf16 autocast, channels_last; GB/s from the derived "
                    "bytes of bench.shapes.training_step_bytes)", "", training_table(trains)]
    return "\n".join(out) + "\n"


def render_cli(doc):
    """Markdown for the JSON of `python -m resnext_kernels bench --json`."""
    out = ["## python -m resnext_kernels bench", "",
           f"- device {doc['device']}, batch {doc['settings']['batch']}, seed {doc['settings']['seed']}",
           f"- {_ceilings_line(doc['ceilings'])}",
           f"- validation: {sum(v['ok'] for v in doc['validation'])}/{len(doc['validation'])} passed"]
    for name, st in doc.get("backends", {}).items():
        if st["status"] != "timed":
            out.append(f"- {name}: {st['status']}" + (f" ({st['reason']})" if st["reason"] else ""))
    checked = [e for e in doc.get("emulated", []) if not e["skipped"]]
    if doc.get("emulated"):
        out.append(f"- correctness only (emulation, not timed): {sum(bool(e['ok']) for e in checked)}/{len(checked)} "
                   f"ok, {len(doc['emulated']) - len(checked)} skipped")
    out.append("")
    rows = add_speedups(doc["rows"])
    out += [block_table(rows), ""] + table_notes(rows)
    return "\n".join(out) + "\n"


def render(docs):
    pytest_docs = [d for d in docs if "benchmarks" in d]
    cli_docs = [d for d in docs if d.get("format") == FORMAT]
    if len(pytest_docs) + len(cli_docs) != len(docs):
        raise ValueError("a JSON file is neither pytest-benchmark output nor " + FORMAT)
    parts = ["# resnext_kernels benchmark results", "",
             "Generated by `python -m resnext_kernels.bench_report` from the JSON files; do not edit by hand.", ""]
    if pytest_docs:
        parts.append(render_pytest(pytest_docs))
    parts += [render_cli(d) for d in cli_docs]
    return "\n".join(parts)


def sanitize(name):
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-") or "unknown"


def result_stem(card, commit, date=None):
    """'<YYYY-MM-DD>_<card>_<commit>' with card sanitized to [A-Za-z0-9-]."""
    date = date or datetime.datetime.now(datetime.timezone.utc).date()
    return f"{date.isoformat()}_{sanitize(card)}_{sanitize(commit)}"


def _current_stem():
    import torch

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "nogit"
    return result_stem(card, commit)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m resnext_kernels.bench_report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", help="pytest-benchmark or bench --json files")
    parser.add_argument("--stem", action="store_true",
                        help="print <YYYY-MM-DD>_<card>_<shortcommit> for this machine and checkout, and exit")
    args = parser.parse_args(argv)
    if args.stem:
        print(_current_stem())
        return 0
    if not args.files:
        parser.error("give at least one JSON file (or --stem)")
    docs = []
    for path in args.files:
        with open(path) as f:
            docs.append(json.load(f))
    sys.stdout.write(render(docs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
