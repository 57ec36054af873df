"""Backend selection and the record of every fallback.

``RESNET_FAST_BACKEND`` picks who computes:

* ``auto`` (default): this project's kernels on CUDA tensors, eager PyTorch elsewhere.
* ``triton``: always the kernels; on a machine without CUDA they run in the Triton interpreter
  (``TRITON_INTERPRET=1`` is set before any kernel is defined), which is how the CPU tests run them.
* ``eager``: always the eager PyTorch computation.

Every time a call does not run the kernels it would have run under ``auto``/``triton`` (no CUDA, a
shape the kernels do not cover) it goes through :func:`record_fallback`: logged once per (op, reason),
counted always, and visible in :func:`stats`. Nothing falls back silently.
"""
from __future__ import annotations

import collections
import logging
import os
import threading

import torch

log = logging.getLogger("resnet_fast")

BACKENDS = ("auto", "triton", "eager")
_lock = threading.Lock()
_fallbacks: collections.Counter = collections.Counter()
_kernel_calls: collections.Counter = collections.Counter()
_logged: set = set()


def backend() -> str:
    """The backend named by ``RESNET_FAST_BACKEND`` (read on every call, so tests can switch it)."""
    name = os.environ.get("RESNET_FAST_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"RESNET_FAST_BACKEND={name!r}: expected one of {', '.join(BACKENDS)}")
    return name


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _enable_interpreter_if_needed() -> None:
    # Must run before any @triton.jit decorator executes: Triton decides at decoration time.
    if backend() == "triton" and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def use_kernels(op: str, device: torch.device) -> bool:
    """Whether ``op`` on ``device`` runs this project's kernels; records the fallback when not."""
    name = backend()
    if name == "eager":
        return False  # asked for explicitly: not a fallback
    if name == "triton" or device.type == "cuda":
        if device.type == "cuda" or interpreting():
            return True
        record_fallback(op, "device is not CUDA and TRITON_INTERPRET is off")
        return False
    record_fallback(op, f"no kernels for device type {device.type!r}; eager PyTorch computes it")
    return False


def record_kernel_call(op: str) -> None:
    with _lock:
        _kernel_calls[op] += 1


def record_fallback(op: str, reason: str) -> None:
    """Count a fallback of ``op`` and log it the first time this (op, reason) pair is seen."""
    key = (op, reason)
    with _lock:
        _fallbacks[key] += 1
        first = key not in _logged
        _logged.add(key)
    if first:
        log.warning("resnet_fast: %s falls back to eager PyTorch: %s (logged once; see resnet_fast.stats())",
                    op, reason)


def stats() -> dict:
    """Counters since start (or the last :func:`reset_stats`).

    Returns ``{"backend": str, "kernel_calls": {op: n}, "fallbacks": {op: {reason: n}}}``.
    """
    with _lock:
        fallbacks: dict = {}
        for (op, reason), n in _fallbacks.items():
            fallbacks.setdefault(op, {})[reason] = n
        return {"backend": backend(), "kernel_calls": dict(_kernel_calls), "fallbacks": fallbacks}


def reset_stats() -> None:
    with _lock:
        _fallbacks.clear()
        _kernel_calls.clear()
        _logged.clear()


_enable_interpreter_if_needed()
