"""Rows, statuses and the time budget shared by the GPU suites and the CPU demo.

Every (case, implementation) pair becomes one row, whatever happens: a missing API gives
``status = "unavailable: <reason>"``, an exception ``"error: <type>: <message>"``, an exhausted budget
``"skipped: time budget"``. Nothing is silently dropped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import time
import traceback
from typing import Callable, Optional

import torch

IMPLS = ("resnet_fast", "resnet_fast_triton", "resnet_fast_cudnn", "eager", "eager_fp32_nchw", "compile",
         "compile_max_autotune")
# resnet_fast rows with the per-conv implementation forced: RESNET_FAST_CONV_IMPL=<value> during the row.
CONV_IMPL_ROWS = {"resnet_fast_triton": "triton", "resnet_fast_cudnn": "cudnn"}
SUITES = ("op", "conv", "block", "model")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


_logged_errors: set = set()


class TimeBoxExpired(BaseException):
    """Raised by :func:`stop_on_sigterm`'s handler: the step's ``timeout`` sent SIGTERM; finish and write now."""


def stop_on_sigterm() -> None:
    """Turn SIGTERM (what ``timeout`` sends first) into :class:`TimeBoxExpired`, so a time-boxed run still writes
    what it has before the KILL that follows (gpu_check.sh gives 5 s). Main thread only; no-op elsewhere."""
    import signal
    import threading

    def handler(signum, frame):
        raise TimeBoxExpired("SIGTERM: the step's time limit was reached")
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


class Unavailable(Exception):
    """An implementation cannot be built here (API missing, unsupported option); the reason is reported."""


@dataclasses.dataclass
class Case:
    """What is measured, independent of the implementation."""
    suite: str
    model: str
    name: str
    mode: str  # "train" | "eval" | "fwd" | "bwd"
    dtype: str
    batch: int
    flops: Optional[float] = None  # per call
    nbytes: Optional[float] = None  # compulsory bytes per call (None where no honest model exists)
    extra: dict = dataclasses.field(default_factory=dict)


def base_row(case: Case, impl: str) -> dict:
    return {"suite": case.suite, "model": case.model, "name": case.name, "mode": case.mode,
            "dtype": "fp32" if impl == "eager_fp32_nchw" else case.dtype, "batch": case.batch, "impl": impl,
            "ms": None, "tflops": None, "gbps": None, "peak_mem_MB": None, "status": "ok", **case.extra}


def fill_rates(row: dict, case: Case, peaks: Optional[dict]) -> dict:
    """Achieved TFLOP/s and GB/s from the median, and their fractions of the measured ceilings."""
    ms = row.get("ms")
    if not ms:
        return row
    if case.flops:
        row["tflops"] = case.flops / (ms * 1e-3) / 1e12
    if case.nbytes:
        row["gbps"] = case.nbytes / (ms * 1e-3) / 1e9
    if peaks:
        if row["tflops"] is not None and peaks.get("bf16_TFLOPs"):
            row["tflops_frac"] = row["tflops"] / peaks["bf16_TFLOPs"]
        if row["gbps"] is not None and peaks.get("copy_GBps"):
            row["gbps_frac"] = row["gbps"] / peaks["copy_GBps"]
    return row


def error_status(exc: BaseException) -> str:
    if isinstance(exc, Unavailable):
        return f"unavailable: {exc}"
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"error: {type(exc).__name__}: {msg[:200]}"


def free_memory() -> None:
    """Release the last row's device memory so the next row's peak is its own (no-op without CUDA)."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def reset_compiler() -> None:
    """Drop dynamo's caches between compiled rows: frees memory and keeps clear of the recompile limit."""
    try:
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001
        pass


class Budget:
    """Wall-clock budget of a run, split across suites by weight; unused time passes to later suites."""

    def __init__(self, total_s: Optional[float], weights: Optional[dict] = None):
        self.start = time.perf_counter()
        self.total_s = total_s
        self.weights = weights or {}
        self._deadline: Optional[float] = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def begin_suite(self, suites_left: list[str]) -> None:
        """Give the first of ``suites_left`` its weighted share of what is left."""
        if self.total_s is None:
            return
        left = self.total_s - self.elapsed()
        w = [self.weights.get(s, 1.0) for s in suites_left]
        self._deadline = self.elapsed() + max(0.0, left) * w[0] / sum(w)

    def allows(self, estimate_s: float = 0.0) -> bool:
        """Whether a row expected to take ``estimate_s`` still fits the current suite's share."""
        if self.total_s is None:
            return True
        deadline = self._deadline if self._deadline is not None else self.total_s
        return self.elapsed() + estimate_s <= deadline


def run_row(case: Case, impl: str, build: Callable[[], Callable[[], dict]], *, peaks: Optional[dict],
            budget: Optional[Budget] = None, estimate_s: float = 0.0, log: Optional[Callable] = None) -> dict:
    """Build ``impl`` for ``case`` and measure it; any failure becomes the row's status.

    ``build()`` sets up the implementation and returns ``measure()``, which returns timing fields
    (``Timing.as_dict()`` plus anything extra). Peak memory is reset just before ``measure``.
    """
    row = base_row(case, impl)
    if budget is not None and not budget.allows(estimate_s):
        row["status"] = "skipped: time budget"
        return row
    before = _kernel_stats() if impl.startswith("resnet_fast") else None
    env = conv_impl_env(impl)
    try:
        env.__enter__()
        measure = build()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        row.update(measure())
        if torch.cuda.is_available():
            row["peak_mem_MB"] = torch.cuda.max_memory_allocated() / 2 ** 20
        fill_rates(row, case, peaks)
    except Exception as exc:  # noqa: BLE001  (reported in the row, the run goes on)
        row["status"] = error_status(exc)
        if log is not None and not isinstance(exc, Unavailable):
            # The traceback once per distinct error; later rows with the same error get one line.
            tb = "" if row["status"] in _logged_errors else "\n" + traceback.format_exc(limit=4)
            _logged_errors.add(row["status"])
            log(f"{case.suite}/{case.name}/{case.mode}/{impl}: {row['status']}{tb}")
    finally:
        env.__exit__(None, None, None)
        if before is not None:
            row.update(kernel_path(before, _kernel_stats()))
        if impl.startswith("compile"):
            reset_compiler()
        free_memory()
    return row


@contextlib.contextmanager
def conv_impl_env(impl: str):
    """``RESNET_FAST_CONV_IMPL`` set for a ``resnet_fast_<impl>`` row (build, warm-up and timing), restored after;
    read at call time by the op layer. Other rows run with the environment as it is."""
    value = CONV_IMPL_ROWS.get(impl)
    if value is None:
        yield
        return
    prev = os.environ.get("RESNET_FAST_CONV_IMPL")
    os.environ["RESNET_FAST_CONV_IMPL"] = value
    try:
        yield
    finally:
        if prev is None:
            os.environ.pop("RESNET_FAST_CONV_IMPL", None)
        else:
            os.environ["RESNET_FAST_CONV_IMPL"] = prev


def _kernel_stats() -> dict:
    try:
        import resnet_fast
        return resnet_fast.stats()
    except Exception:  # noqa: BLE001
        return {"kernel_calls": {}, "fallbacks": {}}


def kernel_path(before: dict, after: dict) -> dict:
    """What a resnet_fast row really ran: kernel calls, per conv role the implementation chosen (``impl_calls``,
    ``{"role: impl": n}``, when the backend counts them) and fallbacks (op: reason -> count) during the row.

    A row whose ops fell back to eager PyTorch is timing eager code under resnet_fast's name; the table says so.
    """
    calls = sum(after["kernel_calls"].values()) - sum(before["kernel_calls"].values())
    fallbacks = {}
    for op, reasons in after["fallbacks"].items():
        for reason, n in reasons.items():
            d = n - before["fallbacks"].get(op, {}).get(reason, 0)
            if d:
                fallbacks[f"{op}: {reason}"] = d
    impl_calls = {}
    for role, per in (after.get("impl_calls") or {}).items():
        for impl, n in (per or {}).items():
            d = n - ((before.get("impl_calls") or {}).get(role) or {}).get(impl, 0)
            if d:
                impl_calls[f"{role}: {impl}"] = d
    return {"kernel_calls": calls, "impl_calls": impl_calls, "fallbacks": fallbacks}


def add_speedups(rows: list[dict], baseline: str = "eager") -> list[dict]:
    """``speedup`` = baseline median / row median, per (suite, model, name, mode)."""
    base = {(r["suite"], r["model"], r["name"], r["mode"]): r["ms"] for r in rows
            if r["impl"] == baseline and r.get("ms")}
    for r in rows:
        b = base.get((r["suite"], r["model"], r["name"], r["mode"]))
        if b and r.get("ms"):
            r["speedup"] = b / r["ms"]
    return rows
