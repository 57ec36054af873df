"""Merge benchmark reports of one GPU session into one, and print the session summary (used by gpu_check.sh).

``python -m resnet_fast.bench.merge DEST_DIR SRC_DIR``: the newest report in SRC_DIR (``<date>-<gpu>.json``)
is merged into the newest one in DEST_DIR (rows appended; autotune records, compile and tuning counts
combined) and DEST_DIR's JSON/Markdown/PNG are rewritten, so a session returns one report whatever number
of benchmark calls made it. Without a report in DEST_DIR, SRC_DIR's is written there.

``python -m resnet_fast.bench.merge --summary DIR``: row statuses per suite and implementation, the model
rows (images/s, peak memory), Triton compile counts and the smoke's result.
"""
from __future__ import annotations

import collections
import glob
import json
import os
import sys
from pathlib import Path
from typing import Optional

from . import report

_NOT_REPORTS = ("smoke", "tuning_table", "digits", "precompile")


def newest_report(folder: Path) -> Optional[Path]:
    files = [Path(f) for f in glob.glob(str(folder / "*.json")) if not any(k in Path(f).name for k in _NOT_REPORTS)]
    return max(files, key=os.path.getmtime) if files else None


def _add_counts(a: Optional[dict], b: Optional[dict]) -> Optional[dict]:
    if not a or not b:
        return a or b
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and isinstance(a.get(k), (int, float)):
            out[k] = a[k] + v
        elif isinstance(v, dict) and isinstance(a.get(k), dict):
            out[k] = _add_counts(a[k], v)
        else:
            out.setdefault(k, v)
    return out


def merge_docs(dest: dict, src: dict) -> dict:
    """``dest`` with ``src``'s rows, autotune records and compile/tuning counts added (``dest`` wins on
    metadata; configs are kept per part)."""
    out = dict(dest)
    out["results"] = list(dest.get("results", [])) + list(src.get("results", []))
    out["autotune"] = {**(dest.get("autotune") or {}), **(src.get("autotune") or {})}
    for k in ("compile", "tuning"):
        if dest.get(k) or src.get(k):
            out[k] = _add_counts(dest.get(k), src.get(k))
    out["wall_s"] = (dest.get("wall_s") or 0) + (src.get("wall_s") or 0)
    out["parts"] = list(dest.get("parts") or [dest.get("config")]) + list(src.get("parts") or [src.get("config")])
    return out


def merge_dirs(dest_dir: Path, src_dir: Path) -> Optional[dict]:
    src = newest_report(src_dir)
    if src is None:
        print(f"merge: no report in {src_dir}")
        return None
    doc_src = json.loads(src.read_text())
    dest = newest_report(dest_dir)
    doc = merge_docs(json.loads(dest.read_text()), doc_src) if dest else doc_src
    stem = dest.stem if dest else src.stem
    paths = report.write_all(doc, dest_dir, stem)
    print(f"merge: {src} -> {paths['json']} ({len(doc['results'])} rows)")
    return doc


def summary_lines(folder: Path) -> list[str]:
    lines = []
    rep = newest_report(folder)
    if rep is not None:
        doc = json.loads(rep.read_text())
        lines.append(f"results: {rep}  device: {doc.get('device')}  peaks: {doc.get('peaks')}")
        status = collections.Counter((r["suite"], r["impl"], str(r.get("status", "ok")).split(":")[0])
                                     for r in doc.get("results", []))
        for (suite, impl, st), n in sorted(status.items()):
            lines.append(f"  {suite:6} {impl:22} {st:12} {n}")
        for r in doc.get("results", []):
            if r["suite"] == "model" and r.get("ms"):
                sp = r.get("speedup")
                lines.append(f"  model {r['mode']:5} {r['impl']:22} {r['ms']:8.2f} ms  "
                             f"{r.get('images_per_s') or 0:8.0f} img/s  {r.get('peak_mem_MB') or 0:7.0f} MB"
                             + (f"  speedup {sp:.2f}" if sp and doc.get("gpu_timings", True) else ""))
        comp, tun = doc.get("compile") or {}, doc.get("tuning") or {}
        if comp:
            lines.append(f"  triton compiles: {comp.get('count')} ({comp.get('seconds')} s), disk-cache hits "
                         f"{comp.get('cache_hits')}; autotuning {tun.get('seconds')} s over {tun.get('picks')} "
                         "tuned launches")
    smoke = folder / "smoke.json"
    if smoke.exists():
        s = json.loads(smoke.read_text())
        sm = s.get("summary", {})
        lines.append(f"smoke: {sm.get('checks')} checks, {sm.get('failed')} failed, {sm.get('skipped')} skipped "
                     f"({s.get('device')}, batch {s.get('batch')}, {s.get('wall_s')} s); compiles "
                     f"{(s.get('compile') or {}).get('count')}, disk-cache hits "
                     f"{(s.get('compile') or {}).get('cache_hits')}")
        for case in sm.get("failed_cases", [])[:20]:
            lines.append(f"  smoke FAILED: {case}")
    return lines or ["no reports"]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 2 and argv[0] == "--summary":
        print("\n".join(summary_lines(Path(argv[1]))))
        return 0
    if len(argv) != 2 or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    merge_dirs(Path(argv[0]), Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
