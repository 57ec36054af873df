"""Backend selection and the record of every fallback.

``RESNET_FAST_BACKEND`` picks who computes:

* ``auto`` (default): this project's kernels on CUDA tensors, eager PyTorch elsewhere.
* ``triton``: always the kernels; on a machine without CUDA they run in the Triton interpreter
  (``TRITON_INTERPRET=1`` is set before any kernel is defined), which is how the CPU tests run them.
* ``eager``: always the eager PyTorch computation.

Every time a call does not run the kernels it would have run under ``auto``/``triton`` (no CUDA, a
shape the kernels do not cover) it goes through :func:`record_fallback`: logged once per (op, reason),
counted always, and visible in :func:`stats`. Nothing falls back silently.

Which implementation computed each conv (the Triton kernels, the cuDNN composite or one of its fused forms, see
:func:`resnet_fast.kernels.autotune.choose_impl`) is counted per role in ``stats()["impl_calls"]`` and, for a
conv called inside :func:`conv_owner` (the fused modules name their ``nn.Conv2d``), recorded per module for
:func:`resnet_fast.conv_implementations`. Timing runs are not counted (:func:`counting_paused`).
"""
from __future__ import annotations

import collections
import logging
import os
import contextlib
import threading
import weakref

import torch

log = logging.getLogger("resnet_fast")

BACKENDS = ("auto", "triton", "eager")
_lock = threading.Lock()
_fallbacks: collections.Counter = collections.Counter()
_kernel_calls: collections.Counter = collections.Counter()
_impl_calls: collections.Counter = collections.Counter()  # (role, impl) -> n
_logged: set = set()
_local = threading.local()  # .paused (depth of counting_paused), .owner (the conv_owner of this thread)
_layer_impls: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # owner -> {role: impl}


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


def _paused() -> bool:
    return getattr(_local, "paused", 0) > 0


@contextlib.contextmanager
def counting_paused():
    """Nothing is counted in this thread meanwhile (kernel calls, implementation calls, fallbacks, layer
    records): the conv chooser's timing runs are not calls of the model."""
    _local.paused = getattr(_local, "paused", 0) + 1
    try:
        yield
    finally:
        _local.paused -= 1


def record_kernel_call(op: str) -> None:
    if _paused():
        return
    with _lock:
        _kernel_calls[op] += 1


def record_impl_call(role: str, impl: str) -> None:
    """Count one call of conv role ``role`` (``conv2d``, ``conv2d_backward``, ``conv_bn_stats``,
    ``conv_bn_stats_backward``) computed by ``impl`` (``triton``, ``cudnn``, a composite's fused form such as
    ``cudnn_conv_relu``, or ``eager`` for the op's explicit fallback), and record it for this thread's
    :func:`conv_owner`."""
    if _paused():
        return
    with _lock:
        _impl_calls[(role, impl)] += 1
        owner = getattr(_local, "owner", None)
        if owner is not None:
            _layer_impls.setdefault(owner, {})[role] = impl


@contextlib.contextmanager
def conv_owner(owner):
    """Convs called in this thread meanwhile are recorded as ``owner``'s (any weak-referenceable object, e.g.
    the ``nn.Conv2d`` whose weight they use; None records nothing). Eager-only: the op layer never looks inside
    ``owner``, and under torch.compile the callers do not enter it."""
    prev = getattr(_local, "owner", None)
    _local.owner = owner
    try:
        yield
    finally:
        _local.owner = prev


def current_conv_owner():
    """The :func:`conv_owner` of this thread, or None (the autograd backward re-enters the forward's)."""
    return getattr(_local, "owner", None)


def implementations_of(owner) -> dict:
    """``{role: impl}`` last recorded for ``owner`` (empty when none)."""
    with _lock:
        return dict(_layer_impls.get(owner, {}))


def record_fallback(op: str, reason: str) -> None:
    """Count a fallback of ``op`` and log it the first time this (op, reason) pair is seen."""
    if _paused():
        return
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

    Returns ``{"backend": str, "kernel_calls": {op: n}, "impl_calls": {role: {impl: n}},
    "fallbacks": {op: {reason: n}}}``:

    * ``kernel_calls``: calls of each op or fused path that ran this project's code rather than the eager
      fallback (``conv2d``, ``conv2d_backward``, ``conv_bn_stats``, ``bn_add_relu``, ``block``, ``block_train``
      ...), whichever implementation computed the conv.
    * ``impl_calls``: per conv role (``conv2d``, ``conv2d_backward``, ``conv_bn_stats``,
      ``conv_bn_stats_backward``), how many calls each implementation computed: ``triton`` (the Triton kernels),
      ``cudnn`` (the cuDNN composite, :mod:`resnet_fast.ops.conv_cudnn`), a composite's fused form
      (``conv_folded``, ``cudnn_conv_relu``, ``cudnn_conv_add_relu``) or ``eager`` (the op's fallback, also
      under ``fallbacks`` when it is one). The chooser's timing runs are not counted.
    * ``fallbacks``: every call that did not run the kernels it would have, by reason.
    """
    with _lock:
        fallbacks: dict = {}
        for (op, reason), n in _fallbacks.items():
            fallbacks.setdefault(op, {})[reason] = n
        impls: dict = {}
        for (role, impl), n in sorted(_impl_calls.items()):
            impls.setdefault(role, {})[impl] = n
        return {"backend": backend(), "kernel_calls": dict(_kernel_calls), "impl_calls": impls,
                "fallbacks": fallbacks}


def reset_stats() -> None:
    with _lock:
        _fallbacks.clear()
        _kernel_calls.clear()
        _impl_calls.clear()
        _layer_impls.clear()
        _logged.clear()


_enable_interpreter_if_needed()
