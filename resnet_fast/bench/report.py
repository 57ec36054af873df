"""Results document: schema check, terminal table, JSON, Markdown and the per-block speedup chart (PNG).

Document schema (``benchmarks/results/<date>-<gpu>.json``)::

    {"device", "date", "commit", "torch", "triton", "cuda",
     "peaks": {"copy_GBps", "bf16_TFLOPs"},
     "results": [{"suite", "model", "name", "mode", "dtype", "batch", "impl",
                  "ms", "tflops", "gbps", "peak_mem_MB", ...extra: status, spread, warmup_s, speedup, ...}]}

``ms`` is the median; it (and the rates) are null when the row's ``status`` is not ``"ok"``. A GPU run adds
``"autotune"``: what the kernels' autotuner measured in the run (``configs.tuning_report()``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from .runner import IMPLS, SUITES

TOP_KEYS = ("device", "date", "commit", "torch", "triton", "cuda", "peaks", "results")
PEAK_KEYS = ("copy_GBps", "bf16_TFLOPs")
ROW_KEYS = ("suite", "model", "name", "mode", "dtype", "batch", "impl", "ms", "tflops", "gbps", "peak_mem_MB")
MODES = ("train", "eval", "fwd", "bwd")
_NUM = (int, float)


def _is_num_or_none(v) -> bool:
    return v is None or (isinstance(v, _NUM) and not isinstance(v, bool) and math.isfinite(v))


def validate(doc: dict) -> dict:
    """Return ``doc`` if it follows the schema above, else raise ValueError listing every problem."""
    errs = []
    if not isinstance(doc, dict):
        raise ValueError("results document must be a JSON object")
    errs += [f"missing top-level key {k!r}" for k in TOP_KEYS if k not in doc]
    for k in ("device", "date", "commit", "torch", "triton"):
        if k in doc and not isinstance(doc[k], str):
            errs.append(f"{k!r} must be a string")
    if "cuda" in doc and not (doc["cuda"] is None or isinstance(doc["cuda"], str)):
        errs.append("'cuda' must be a string or null")
    peaks = doc.get("peaks")
    if "peaks" in doc:
        if not isinstance(peaks, dict):
            errs.append("'peaks' must be an object")
        else:
            for k in PEAK_KEYS:
                if k not in peaks:
                    errs.append(f"peaks: missing {k!r}")
                elif not _is_num_or_none(peaks[k]):
                    errs.append(f"peaks.{k} must be a finite number or null")
    results = doc.get("results")
    if "results" in doc and not isinstance(results, list):
        errs.append("'results' must be a list")
    for i, r in enumerate(results if isinstance(results, list) else []):
        if not isinstance(r, dict):
            errs.append(f"results[{i}] must be an object")
            continue
        errs += [f"results[{i}]: missing {k!r}" for k in ROW_KEYS if k not in r]
        if r.get("suite") not in SUITES:
            errs.append(f"results[{i}].suite {r.get('suite')!r} not one of {SUITES}")
        if r.get("impl") not in IMPLS:
            errs.append(f"results[{i}].impl {r.get('impl')!r} not one of {IMPLS}")
        if r.get("mode") not in MODES:
            errs.append(f"results[{i}].mode {r.get('mode')!r} not one of {MODES}")
        for k in ("model", "name", "dtype"):
            if k in r and not isinstance(r[k], str):
                errs.append(f"results[{i}].{k} must be a string")
        if "batch" in r and not (isinstance(r["batch"], int) and r["batch"] > 0):
            errs.append(f"results[{i}].batch must be a positive integer")
        for k in ("ms", "tflops", "gbps", "peak_mem_MB"):
            if k in r and not _is_num_or_none(r[k]):
                errs.append(f"results[{i}].{k} must be a finite number or null")
        status = r.get("status", "ok")
        if status == "ok" and r.get("ms") is None:
            errs.append(f"results[{i}]: status ok but ms is null")
        if isinstance(r.get("ms"), _NUM) and r["ms"] <= 0:
            errs.append(f"results[{i}].ms must be positive")
    if errs:
        raise ValueError("invalid results document:\n  " + "\n  ".join(errs))
    return doc


# ---- formatting -----------------------------------------------------------------------------------------

def _f(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def _pct(v) -> str:
    return "" if v is None else f"{100 * v:.0f}%"


COLUMNS = ("suite", "name", "mode", "impl", "ms", "p20-p80", "TFLOP/s", "%peak", "GB/s", "%copy", "MB",
           "speedup", "status")


def _cells(r: dict) -> list[str]:
    sp = r.get("spread") or {}
    spread = f"{sp['p20']:.3g}-{sp['p80']:.3g}" if "p20" in sp else ""
    status = r.get("status", "ok")
    if status == "ok" and r.get("numerics"):
        status = f"numerics {r['numerics']} (err {r.get('max_abs_err', 0):.1e})"
    if r.get("fallbacks"):
        status += "; FELL BACK to eager: " + ", ".join(sorted({k.split(':')[0] for k in r["fallbacks"]}))
    elif r.get("kernel_calls") == 0 and r.get("impl") == "resnet_fast" and r.get("status") == "ok":
        status += "; no kernel calls counted"
    return [r["suite"], r["name"], r["mode"], r["impl"], _f(r.get("ms"), ".3f"), spread, _f(r.get("tflops"), ".1f"),
            _pct(r.get("tflops_frac")), _f(r.get("gbps"), ".0f"), _pct(r.get("gbps_frac")),
            _f(r.get("peak_mem_MB"), ".0f"), _f(r.get("speedup"), ".2f"), status]


def format_table(rows: list[dict]) -> str:
    """Fixed-width text table of all rows (statuses included)."""
    cells = [list(COLUMNS)] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(COLUMNS))).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def header_lines(doc: dict) -> list[str]:
    p = doc.get("peaks") or {}
    lines = [f"device: {doc['device']}   date: {doc['date']}   commit: {doc['commit']}",
             f"torch {doc['torch']}   triton {doc['triton']}   cuda {doc['cuda']}",
             f"measured ceilings: copy {_f(p.get('copy_GBps'), '.0f') or 'n/a'} GB/s, "
             f"bf16 matmul {_f(p.get('bf16_TFLOPs'), '.0f') or 'n/a'} TFLOP/s"]
    if doc.get("timing_note"):
        lines.append(doc["timing_note"])
    return lines


def to_markdown(doc: dict) -> str:
    """Markdown report: run header, then one table per suite."""
    out = ["# resnet_fast benchmark", ""] + [f"- {line}" for line in header_lines(doc)]
    cfg = doc.get("config")
    if cfg:
        out.append("- config: " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
    out.append("")
    out.append("`ms` is the median; p20-p80 the spread; %peak / %copy are fractions of the ceilings measured in "
               "the same run; speedup is vs `eager` on the same case.")
    for suite in SUITES:
        rows = [r for r in doc["results"] if r["suite"] == suite]
        if not rows:
            continue
        out += ["", f"## {suite}", "", "| " + " | ".join(COLUMNS[1:]) + " |",
                "|" + "---|" * (len(COLUMNS) - 1)]
        for r in rows:
            out.append("| " + " | ".join(c.replace("|", "/") for c in _cells(r)[1:]) + " |")
    return "\n".join(out + autotune_lines(doc.get("autotune") or {})) + "\n"


def autotune_lines(measured: dict) -> list[str]:
    """Markdown table of the autotuner's record (``configs.tuning_report()``): per tuned key the winner, the best
    pointer-path and best TMA-twin times (what TMA buys where it was offered) and the candidates that failed."""
    if not measured:
        return []
    out = ["", "## autotune (tuned in this run; do_bench medians of each candidate)", "",
           "| kernel key | winner | best pointer ms | best TMA ms | failed |", "|---|---|---|---|---|"]
    for key, rec in sorted(measured.items()):
        ptr = [t for name, t in rec["ms"].items() if not name.endswith("-tma")]
        tma = [t for name, t in rec["ms"].items() if name.endswith("-tma")]
        short = "/".join(key.split("|")[:11])  # op and geometry up to the dtype; the device is in the header
        out.append(f"| {short} | {rec['winner']} | {_f(min(ptr) if ptr else None, '.4f')} | "
                   f"{_f(min(tma) if tma else None, '.4f')} | {', '.join(rec['failed']) or ''} |")
    return out


def plot_speedups(doc: dict, path: Path) -> Optional[Path]:
    """Bar chart of per-block speedup vs eager (one panel per mode); None when there is nothing to plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["results"] if r["suite"] == "block" and r.get("speedup") and r["impl"] != "eager"]
    if not rows:  # the CPU demo has no block speedups of its own; plot what it has
        rows = [r for r in doc["results"] if r.get("speedup") and r["impl"] != "eager"]
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(max(1, len(modes)), 1, figsize=(11, 3.2 * max(1, len(modes))), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes or [None]):
        sub = [r for r in rows if r["mode"] == mode]
        names = list(dict.fromkeys(r["name"] for r in sub))
        impl_names = [i for i in IMPLS if any(r["impl"] == i for r in sub)]
        width = 0.8 / max(1, len(impl_names))
        for j, impl in enumerate(impl_names):
            vals = {r["name"]: r["speedup"] for r in sub if r["impl"] == impl}
            xs = [i + j * width for i, n in enumerate(names) if n in vals]
            ax.bar(xs, [vals[n] for n in names if n in vals], width, label=impl)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))])
        ax.set_xticklabels(names, rotation=20, ha="right", fontsize=7)
        ax.set_ylabel("speedup vs eager")
        ax.set_title(f"{mode or 'no data'}")
        if impl_names:
            ax.legend(fontsize=7)
    title = f"{doc['device']} {doc['date']}"
    if not doc.get("gpu_timings", True):
        title += " - CPU demo, NOT GPU timings"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(doc: dict, out_dir: Path, stem: str) -> dict:
    """Validate, then write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` under ``out_dir``."""
    validate(doc)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    paths["json"].write_text(json.dumps(doc, indent=1, default=str) + "\n")
    paths["md"].write_text(to_markdown(doc))
    plot_speedups(doc, paths["png"])
    return paths
