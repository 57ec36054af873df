"""Results document: schema check, terminal table, JSON, Markdown and the per-block speedup chart (PNG).

Document schema (``benchmarks/results/<date>-<gpu>.json``)::

    {"device", "date", "commit", "torch", "triton", "cuda",
     "peaks": {"copy_GBps", "bf16_TFLOPs"},
     "results": [{"suite", "model", "name", "mode", "dtype", "batch", "impl",
                  "ms", "tflops", "gbps", "peak_mem_MB", ...extra: status, spread, warmup_s, speedup, ...}]}

``ms`` is the median; it (and the rates) are null when the row's ``status`` is not ``"ok"``. GB/s uses compulsory
traffic only (op fwd 3N, bwd 5N elements; conv x+w+y, x3 in training; block eval x+y+weights; none for block
training and models). A GPU run adds ``"autotune"``: what the kernels' autotuner measured in the run
(``tuning_report()``: per key every candidate's time, the winner, failures; per conv the Triton and cuDNN times).
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


COLUMNS = ("suite", "name", "mode", "impl", "ms", "p20-p80", "est us", "TFLOP/s", "%peak", "GB/s", "%copy", "MB",
           "speedup", "status")


def _cells(r: dict) -> list[str]:
    sp = r.get("spread") or {}
    spread = f"{sp['p20']:.3g}-{sp['p80']:.3g}" if "p20" in sp else ""
    status = r.get("status", "ok")
    if status == "ok" and r.get("numerics"):
        status = f"numerics {r['numerics']} (err {r.get('max_abs_err', 0):.1e})"
    if r.get("fallbacks"):
        status += "; FELL BACK to eager: " + ", ".join(sorted({k.split(':')[0] for k in r["fallbacks"]}))
    elif r.get("kernel_calls") == 0 and str(r.get("impl")).startswith("resnet_fast") and r.get("status") == "ok":
        status += "; no kernel calls counted"
    impls = sorted({k.split(": ", 1)[-1] for k in (r.get("impl_calls") or {})})
    if impls:  # which per-conv implementation the op layer chose during the row
        status += f"; conv via {'/'.join(impls)}"
    return [r["suite"], r["name"], r["mode"], r["impl"], _f(r.get("ms"), ".3f"), spread, _estimate(r),
            _f(r.get("tflops"), ".1f"),
            _pct(r.get("tflops_frac")), _f(r.get("gbps"), ".0f"), _pct(r.get("gbps_frac")),
            _f(r.get("peak_mem_MB"), ".0f"), _f(r.get("speedup"), ".2f"), status]


DEMO_COLUMNS = ("suite", "name", "mode", "impl", "dtype", "rel err", "tol", "numerics", "ran", "estimate us")


def _ran(r: dict) -> str:
    """Which implementation a resnet_fast row really ran: kernel calls, or the ops that fell back to eager."""
    if r.get("fallbacks"):
        return "FELL BACK to eager: " + ", ".join(sorted({k.split(':')[0] for k in r["fallbacks"]}))
    calls = r.get("kernel_calls")
    impls = sorted({k.split(": ", 1)[-1] for k in (r.get("impl_calls") or {})})
    via = f", conv: {'/'.join(impls)}" if impls else ""
    return "" if calls is None else (f"kernels ({calls} calls{via})" if calls else "no kernel calls counted")


def _estimate(r: dict) -> str:
    """The row's static estimate (µs) for its mode, if :mod:`.estimates` attached one."""
    est = r.get("estimate_us")
    return _f(est.get(r["mode"]) if isinstance(est, dict) else None, ".0f")


def _demo_cells(r: dict) -> list[str]:
    """A CPU-demo row: agreement with the float64 reference and what ran; never a time."""
    status = r.get("status", "ok")
    numerics = r.get("numerics") or ("" if status == "ok" else status)
    return [r["suite"], r["name"], r["mode"], r["impl"], r.get("dtype", ""), _f(r.get("rel_err"), ".1e"),
            _f(r.get("tol"), ".0e"), numerics, _ran(r), _estimate(r)]


def demo_rows(rows: list[dict]) -> list[dict]:
    """The rows a CPU demo reports: resnet_fast's (each carries its comparison with the reference)."""
    return [r for r in rows if str(r.get("impl", "")).startswith("resnet_fast")]


def format_table(rows: list[dict], cpu_demo: bool = False) -> str:
    """Fixed-width text table of all rows (statuses included); a CPU demo's numerics table instead of timings."""
    cols, fn = (DEMO_COLUMNS, _demo_cells) if cpu_demo else (COLUMNS, _cells)
    if cpu_demo:
        rows = demo_rows(rows)
    cells = [list(cols)] + [fn(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(cols))).rstrip() for c in cells]
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
    demo = not doc.get("gpu_timings", True)
    if demo:
        out.append("CPU demo: `rel err` is ||out - ref|| / ||ref|| against the eager computation in float64 (the "
                   "worst tensor of the case), `tol` the tolerance for the dtype; `ran` says whether the project's "
                   "kernels ran or the op fell back to eager. `estimate us` (when a cost report was given) is a "
                   "static estimate for the full-size ResNet-50 layer, not a measurement. No timings are shown: "
                   "interpreter wall-clock says nothing about a GPU.")
    else:
        out.append("`ms` is the median; p20-p80 the spread; %peak / %copy are fractions of the ceilings measured "
                   "in the same run; speedup is vs `eager` on the same case. `est us` (conv rows, eval, bf16, batch "
                   "256) is the cost report's static estimate of the Triton kernels at their untuned configs, not a "
                   "measurement: it checks the model where the row ran Triton (`conv via triton`).")
    cols, fn = (DEMO_COLUMNS, _demo_cells) if demo else (COLUMNS, _cells)
    for suite in SUITES:
        rows = [r for r in (demo_rows(doc["results"]) if demo else doc["results"]) if r["suite"] == suite]
        if not rows:
            continue
        out += ["", f"## {suite}", "", "| " + " | ".join(cols[1:]) + " |", "|" + "---|" * (len(cols) - 1)]
        for r in rows:
            out.append("| " + " | ".join(c.replace("|", "/") for c in fn(r)[1:]) + " |")
    return "\n".join(out + autotune_lines(doc.get("autotune") or {}) + compile_lines(doc)) + "\n"


def autotune_lines(measured: dict) -> list[str]:
    """Markdown tables of the autotuner's record (``autotune.tuning_report()``), rendered defensively (fields may
    be missing). Implementation keys (``impl:<role>|...``, ``ms`` per implementation): per conv role and layer the
    Triton and cuDNN times and the winner. Config keys: the winner, the best pointer-path and best TMA-twin
    times (what TMA buys where it was offered) and the candidates that failed."""
    if not measured:
        return []
    impl_keys = sorted(k for k in measured if str(k).startswith("impl:"))
    cfg_keys = sorted(k for k in measured if not str(k).startswith("impl:"))
    out = []
    if impl_keys:
        out += ["", "## per-conv implementation (measured in this run: Triton kernels vs the cuDNN composite)", "",
                "| role / layer | triton ms | cudnn ms | winner | failed |", "|---|---|---|---|---|"]
        for key in impl_keys:
            rec = measured[key] if isinstance(measured[key], dict) else {}
            ms = rec.get("ms") if isinstance(rec.get("ms"), dict) else {}
            short = "/".join(str(key)[len("impl:"):].split("|")[:11])
            out.append(f"| {short} | {_f(_num(ms.get('triton')), '.4f')} | {_f(_num(ms.get('cudnn')), '.4f')} | "
                       f"{rec.get('winner', '')} | {', '.join(rec.get('failed') or {})} |")
    if cfg_keys:
        out += ["", "## autotune (tuned in this run; do_bench medians of each candidate)", "",
                "| kernel key | winner | best pointer ms | best TMA ms | failed |", "|---|---|---|---|---|"]
        for key in cfg_keys:
            rec = measured[key] if isinstance(measured[key], dict) else {}
            ms = rec.get("ms") if isinstance(rec.get("ms"), dict) else {}
            ptr = [t for name, t in ms.items() if not str(name).endswith("-tma") and _num(t) is not None]
            tma = [t for name, t in ms.items() if str(name).endswith("-tma") and _num(t) is not None]
            short = "/".join(str(key).split("|")[:11])  # op and geometry up to the dtype; the device is in the header
            out.append(f"| {short} | {rec.get('winner', '')} | {_f(min(ptr) if ptr else None, '.4f')} | "
                       f"{_f(min(tma) if tma else None, '.4f')} | {', '.join(rec.get('failed') or {}) or ''} |")
    return out


def _num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def compile_lines(doc: dict) -> list[str]:
    """The run's Triton compile count and seconds, disk-cache hits and autotuning seconds, when recorded."""
    comp, tun = doc.get("compile") or {}, doc.get("tuning") or {}
    if not comp.get("counted") and not tun.get("counted"):
        return []
    return ["", "## compilation", "",
            f"- Triton compiles: {comp.get('count')} taking {comp.get('seconds')} s (Triton's own stage timer); "
            f"loaded from the on-disk cache: {comp.get('cache_hits')}",
            f"- autotuning: {tun.get('seconds')} s of wall time in {tun.get('picks')} tuned launches "
            "(candidates' compiles included)"]


def plot_numerics(doc: dict, path: Path) -> Path:
    """CPU demo chart: per case, relative error against the float64 reference divided by its tolerance (log
    scale; below 1 passes), green within tolerance, red outside, hatched when the op fell back to eager; a case
    that raised an error is a grey bar at the right edge marked "error" (skipped ones are only counted)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in demo_rows(doc["results"])
            if r.get("numerics") or str(r.get("status", "")).startswith("error")]
    n_skip = sum(1 for r in demo_rows(doc["results"]) if str(r.get("status", "")).startswith(("skipped",
                                                                                               "unavailable")))
    fig, ax = plt.subplots(figsize=(11, max(3.0, 0.28 * len(rows) + 1.6)))
    names = [f"{r['suite']} {r['name']} [{r['mode']}]" for r in rows]
    cap = 1e3
    vals, colors = [], []
    for r in rows:
        if not r.get("numerics"):
            vals.append(cap)
            colors.append("tab:gray")
            continue
        err = r.get("rel_err")
        vals.append(min(cap, max(1e-6, (err if err is not None else float("inf")) / r["tol"])))
        colors.append("tab:green" if r["numerics"] == "ok" else "tab:red")
    bars = ax.barh(range(len(rows)), vals, color=colors)
    for i, (bar, r) in enumerate(zip(bars, rows)):
        if r.get("fallbacks"):
            bar.set_hatch("//")
        if not r.get("numerics"):
            ax.text(cap, i, " error", va="center", fontsize=7)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("relative error vs float64 reference / tolerance  (left of the line = within tolerance)")
    n_ok = sum(r.get("numerics") == "ok" for r in rows)
    n_bad = sum(r.get("numerics") == "MISMATCH" for r in rows)
    n_err = sum(not r.get("numerics") for r in rows)
    ax.set_title(f"CPU demo ({doc.get('backend')} backend, Triton interpreter, fp32): {n_ok} cases within tolerance, "
                 f"{n_bad} outside, {n_err} errors, {n_skip} skipped.\nNOT a performance measurement: no timings "
                 "are drawn.", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_speedups(doc: dict, path: Path) -> Optional[Path]:
    """Bar chart of per-block speedup vs eager (one panel per mode); a CPU demo (``gpu_timings`` false) gets
    :func:`plot_numerics` instead: its times are interpreter wall-clock, no speedup is ever drawn from them."""
    if not doc.get("gpu_timings", True):
        return plot_numerics(doc, path)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["results"] if r["suite"] == "block" and r.get("speedup") and r["impl"] != "eager"]
    if not rows:  # no block rows (e.g. a model-only run): plot what has a speedup
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
    fig.suptitle(f"{doc['device']} {doc['date']}", fontsize=9)
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
