"""Loader of the C++/CUDA extension that registers ``torch.ops.resnet_fast.bn_add_relu{,_backward}``.

:func:`load` (run once, when ``resnet_fast.ops`` is imported) tries, in order:

1. ``import resnet_fast._C``: the extension built by ``setup.py`` (``pip install --no-build-isolation -e .``);
2. a JIT build of ``csrc/`` with ``torch.utils.cpp_extension.load`` (ninja) into
   ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) ``/<python+torch tag>/resnet_fast_C``; it
   compiles once and later imports reuse the cached library. Logged on the ``resnet_fast`` logger.

If both fail, importing still succeeds: the reason is kept and :func:`require` (called by the op wrappers)
raises a ``RuntimeError`` that names what is missing (compiler, ninja, nvcc, or the build error).

Environment: ``RESNET_FAST_NO_JIT=1`` skips step 2; ``RESNET_FAST_FORCE_JIT=1`` skips step 1.
"""
from __future__ import annotations

import glob
import importlib
import logging
import os
import shutil
import sys
import threading
from pathlib import Path

from . import _build_config as cfg

log = logging.getLogger("resnet_fast")

_lock = threading.Lock()
_attempted = False
_module = None  # the loaded extension module (or True when the ops were already registered)
_error: str | None = None  # why the extension is unavailable


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "on", "yes")


def ops_registered() -> bool:
    """Whether ``torch.ops.resnet_fast.bn_add_relu`` exists in this process."""
    import torch

    try:
        _ = torch.ops.resnet_fast.bn_add_relu.default  # raises when the op is not registered
    except (AttributeError, RuntimeError):
        return False
    return True


def missing_build_tools(cuda: bool) -> list[str]:
    """What a JIT build needs and this machine lacks, one human-readable item each (empty: all present)."""
    from torch.utils import cpp_extension

    missing = []
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        missing.append(f"a C++ compiler ({cxx!r} is not on PATH; install g++ or set CXX)")
    if not cpp_extension.is_ninja_available():
        missing.append("ninja (pip install ninja)")
    if cuda and cfg.nvcc_path() is None:
        missing.append("nvcc (set CUDA_HOME, or RESNET_FAST_CUDA=0 for a CPU-only build)")
    return missing


def build_directory() -> Path:
    """Cache directory of the JIT build; respects TORCH_EXTENSIONS_DIR. Tagged with the Python and torch
    versions because the library is ABI-bound to both."""
    import torch
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}".replace("+", "_")
    return Path(root) / tag / cfg.JIT_NAME


def _jit_build(prebuilt_error: str):
    from torch.utils import cpp_extension

    cuda = cfg.want_cuda()
    missing = missing_build_tools(cuda)
    if missing:
        raise RuntimeError(f"cannot JIT-build it: missing {', '.join(missing)}")
    build_dir = build_directory()
    build_dir.mkdir(parents=True, exist_ok=True)
    cached = glob.glob(str(build_dir / f"{cfg.JIT_NAME}*.so"))
    if cached:
        log.info("resnet_fast: loading the JIT-built C++ extension from %s", build_dir)
    else:
        log.warning("resnet_fast: C++ extension resnet_fast._C is not built (%s); JIT-compiling csrc/ (%s) with "
                    "torch.utils.cpp_extension.load into %s. This happens once (about a minute); later imports "
                    "reuse it. `pip install --no-build-isolation -e .` builds it ahead of time.",
                    prebuilt_error, "CPU + CUDA" if cuda else "CPU only", build_dir)
    return cpp_extension.load(
        name=cfg.JIT_NAME,
        sources=cfg.sources(cuda, absolute=True),
        extra_cflags=cfg.cxx_flags(),
        extra_cuda_cflags=cfg.nvcc_flags() if cuda else None,
        extra_include_paths=[str(cfg.CSRC)],
        build_directory=str(build_dir),
        with_cuda=cuda,
        verbose=False,
    )


def load() -> bool:
    """Loads the extension once per process (see the module docstring). Returns whether the ops are usable."""
    global _attempted, _module, _error
    with _lock:
        if _attempted:
            return _module is not None
        _attempted = True
        if ops_registered():  # e.g. loaded by hand before resnet_fast was imported
            _module = True
            return True
        prebuilt_error = "RESNET_FAST_FORCE_JIT=1"
        if not _flag("RESNET_FAST_FORCE_JIT"):
            try:
                _module = importlib.import_module(cfg.EXT_NAME)
                return True
            except ImportError as e:  # not built, or built against another torch (undefined symbols)
                prebuilt_error = f"import {cfg.EXT_NAME} failed: {e}"
        if _flag("RESNET_FAST_NO_JIT"):
            _error = f"{prebuilt_error}; JIT build disabled by RESNET_FAST_NO_JIT=1"
            return False
        try:
            _module = _jit_build(prebuilt_error)
            return True
        except Exception as e:  # noqa: BLE001  (kept and re-raised, with context, by require())
            msg = str(e).strip()
            if len(msg) > 4000:  # compiler logs: the end has the error
                msg = "..." + msg[-4000:]
            _error = f"{prebuilt_error}; {msg if msg.startswith('cannot') else 'JIT build failed: ' + msg}"
            log.warning("resnet_fast: C++ extension unavailable: %s", _error)
            return False


def available() -> bool:
    return _module is not None


def error() -> str | None:
    """Why the extension is unavailable (None when it is loaded or was not tried yet)."""
    return _error


def require(op: str = "bn_add_relu") -> None:
    """Raises a RuntimeError naming what is missing when the extension is not loaded."""
    if _module is not None:
        return
    if not _attempted:
        load()
        if _module is not None:
            return
    raise RuntimeError(
        f"resnet_fast.ops.{op} needs the resnet_fast C++ extension, which is not available: {_error}. "
        "Build it with `pip install --no-build-isolation -e .` (needs a C++ compiler; nvcc for the CUDA "
        "kernels), or install what is missing and re-import resnet_fast to JIT-build it."
    )
