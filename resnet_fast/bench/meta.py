"""Run metadata for the results document: device, date, commit, library versions."""
from __future__ import annotations

import datetime
import re
import subprocess
from pathlib import Path

import torch


def commit() -> str:
    """Short hash of HEAD (``+dirty`` when tracked files are modified), or ``unknown`` outside git."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("+dirty" if dirty else "")) if head else "unknown"


def triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except Exception:  # noqa: BLE001
        return "unavailable"


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def base_doc() -> dict:
    """The document's top-level fields (peaks and results are filled in by the caller)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return {"device": device_name(), "date": now.strftime("%Y-%m-%d"), "time_utc": now.strftime("%H:%M:%S"),
            "commit": commit(), "torch": torch.__version__, "triton": triton_version(),
            "cuda": torch.version.cuda, "peaks": {"copy_GBps": None, "bf16_TFLOPs": None}, "results": []}


def file_stem(doc: dict) -> str:
    """``<date>-<gpu>`` as in benchmarks/results/."""
    return f"{doc['date']}-{slug(doc['device'])}"
