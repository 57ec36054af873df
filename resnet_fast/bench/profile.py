"""``--profile``: a torch.profiler Chrome trace and a per-kernel time table of a few steps of a row."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile


def _slug(tag: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", tag).strip("_")


def kernel_table(prof, limit: int = 30) -> list[dict]:
    """Per-kernel (device kernels on CUDA, operators on CPU) total time, calls and share, largest first."""
    on_cuda = torch.cuda.is_available()
    rows = []
    for ev in prof.key_averages():
        if on_cuda:
            # Device-side events (the kernels themselves) carry their own time as self device time.
            t = getattr(ev, "self_device_time_total", None)
            if t is None:
                t = getattr(ev, "self_cuda_time_total", 0)
            if getattr(ev, "device_type", None) is not None and "CUDA" not in str(ev.device_type):
                continue
        else:
            t = ev.self_cpu_time_total
        if t and t > 0:
            rows.append({"kernel": ev.key, "total_ms": t / 1e3, "calls": ev.count})
    rows.sort(key=lambda r: -r["total_ms"])
    total = sum(r["total_ms"] for r in rows) or 1.0
    for r in rows:
        r["share"] = r["total_ms"] / total
    return rows[:limit]


def format_kernel_table(rows: list[dict], title: str) -> str:
    width = max([len(r["kernel"][:90]) for r in rows] + [6])
    lines = [title, f"{'kernel':<{width}}  {'total ms':>9}  {'calls':>6}  {'share':>6}"]
    for r in rows:
        lines.append(f"{r['kernel'][:90]:<{width}}  {r['total_ms']:9.3f}  {r['calls']:6d}  {r['share']:6.1%}")
    return "\n".join(lines) + "\n"


def profile_steps(step: Callable[[int], Any], tag: str, out_dir: Path, steps: int = 5) -> dict:
    """Profile ``steps`` calls of ``step(i)`` (already warmed up) and write ``<tag>.trace.json`` and
    ``<tag>.kernels.txt`` under ``out_dir``. Returns the paths and the table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        for i in range(steps):
            step(i)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    base = out_dir / _slug(tag)
    trace = Path(f"{base}.trace.json")
    prof.export_chrome_trace(str(trace))
    table = kernel_table(prof)
    text = Path(f"{base}.kernels.txt")
    text.write_text(format_kernel_table(table, f"{tag}: {steps} steps"))
    return {"trace": str(trace), "kernels": str(text), "table": table}
