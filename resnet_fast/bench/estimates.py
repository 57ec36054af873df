"""The cost report's static per-layer estimates beside benchmark rows, so the model meets the measurements.

:func:`load` reads a cost report JSON (``python -m resnet_fast.kernels.cost_report --json FILE``, or the committed
baseline ``kernels/cost_baseline.json``, which keeps each record's ``est_us``): ``{full-size conv name: {"eval":
µs, "train": µs}}`` for the first layer of each shape; eval = the inference forward (``ops.conv2d`` with the folded
BN epilogue), train = forward + dgrad + wgrad of the training op (``conv_bn_stats`` and its backward, BN
backward on load; the ``triton_dy_pass`` alternatives left out). Estimates of the Triton kernels at their untuned
configs on an H100 SXM model, bf16, batch 256: **estimates, not measurements**.

:func:`attach` puts them on the rows they describe: a CPU demo row by the full-size layer its small conv stands
for (``full_size``); a GPU conv-suite row in eval mode of bf16 at batch 256 (the model's setting; its train mode
runs a plain conv without BN, not the op the estimate describes). A GPU row is only comparable where it ran the
Triton kernels (its status says ``conv via triton``).
"""
from __future__ import annotations

import json
import os

__all__ = ["load", "attach", "default_path"]


def default_path() -> str | None:
    """``$RESNET_FAST_COST_REPORT``, else the committed baseline (None when neither exists)."""
    env = os.environ.get("RESNET_FAST_COST_REPORT")
    if env:
        return env
    from ..kernels import cost_report
    return cost_report.BASELINE if os.path.exists(cost_report.BASELINE) else None


def load(path: str | None) -> dict:
    """``{conv name: {"eval"|"train": µs}}`` from the cost report at ``path`` (records with ``layer``, ``role``
    "infer"/"train", ``kernel`` "fwd"/"dgrad"/"wgrad", ``est_us``; a list or a dict holding ``records``); {} when
    there is no path or it cannot be read (the estimates are optional)."""
    if not path:
        return {}
    try:
        with open(path) as f:
            records = json.load(f)
        records = records.get("records", records) if isinstance(records, dict) else records
        from ..kernels import cost_report
        layer_shape = {name: conv.name for name, conv, _pos in cost_report._layers()}
    except Exception:  # noqa: BLE001  (optional: the benchmark goes on without estimates)
        return {}
    out: dict = {}
    first: dict = {}
    for r in records:
        if not isinstance(r, dict) or not isinstance(r.get("est_us"), (int, float)) or r.get("alt"):
            continue
        shape = layer_shape.get(r.get("layer"))
        if shape is None or first.setdefault(shape, r["layer"]) != r["layer"]:
            continue
        role, kernel = r.get("role"), r.get("kernel")
        mode = "eval" if (role, kernel) == ("infer", "fwd") else "train" if role == "train" else None
        if mode:
            out.setdefault(shape, {}).setdefault(mode, 0.0)
            out[shape][mode] += r["est_us"]
    return out


def attach(rows: list, estimates: dict) -> list:
    """Set ``estimate_us`` (``{mode: µs}``) on the rows :func:`load`'s estimates describe (see the module
    docstring); returns ``rows``."""
    for r in rows:
        if r.get("full_size") in estimates:  # the CPU demo
            r["estimate_us"] = estimates[r["full_size"]]
        elif (r.get("suite") == "conv" and r.get("mode") == "eval" and r.get("dtype") == "bf16"
              and r.get("batch") == 256 and str(r.get("impl", "")).startswith("resnet_fast")
              and "eval" in estimates.get(r.get("name"), {})):
            r["estimate_us"] = {"eval": estimates[r["name"]]["eval"]}
    return rows
