"""Triton compile accounting and cache warming for GPU sessions (Triton 3.6 and 3.9 alike).

* :class:`CompileCounter` — counts every ``triton.compile`` of this process through
  ``triton.knobs.compilation.listener`` (present with the same keyword arguments in 3.6 and 3.9): real compiles
  (``count``, ``seconds`` from Triton's own stage timer) and on-disk cache hits (``cache_hits``). In-memory JIT
  hits never reach ``triton.compile`` and are not counted. The Triton interpreter compiles nothing (all zero).
* :class:`TuningTimer` — wall seconds spent in the autotuner's ``pick`` (compiles of the candidates included)
  and the number of keys it tuned, by wrapping the one tuner instance (no change to ``autotune``).
* :func:`recording` / :func:`preload` — warm ``TRITON_CACHE_DIR`` in parallel: a recording run executes a
  workload with ``knobs.runtime.jit_cache_hook`` returning True (Triton then neither compiles nor launches; the
  hook receives Triton's own ``specialization_data``), and worker processes feed each record to
  ``JITFunction.preload``, which compiles exactly what the launch path would (same signature, constexprs,
  attrs, options) into the shared cache. A later launch then loads from disk: the counter shows it as a cache
  hit. The recording run's kernel outputs are garbage (nothing ran), and its autotuner times nothing (see
  :func:`recording`).
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import threading
import time
from typing import Optional


class CompileCounter:
    """Listener on ``triton.compile``: compiles, their seconds, and on-disk cache hits, per kernel name."""

    def __init__(self):
        self.count = 0
        self.seconds = 0.0
        self.cache_hits = 0
        self.by_kernel: dict = {}
        self._lock = threading.Lock()
        self._prev = None
        self.installed = False

    def __call__(self, *, src=None, metadata=None, metadata_group=None, times=None, cache_hit=False, **_):
        name = (metadata or {}).get("name") or getattr(getattr(src, "fn", None), "__name__", "?")
        us = getattr(times, "total", 0) if times is not None else 0
        with self._lock:
            if cache_hit:
                self.cache_hits += 1
            else:
                self.count += 1
                self.seconds += us / 1e6
                self.by_kernel[name] = self.by_kernel.get(name, 0) + 1
        if self._prev is not None:
            self._prev(src=src, metadata=metadata, metadata_group=metadata_group, times=times, cache_hit=cache_hit)

    def install(self) -> "CompileCounter":
        """Chain onto any listener already set; a Triton without the knob leaves ``installed`` False."""
        try:
            from triton import knobs
            self._prev = knobs.compilation.listener
            knobs.compilation.listener = self
            self.installed = True
        except (ImportError, AttributeError):
            self.installed = False
        return self

    def summary(self) -> dict:
        with self._lock:
            return {"count": self.count, "seconds": round(self.seconds, 3), "cache_hits": self.cache_hits,
                    "by_kernel": dict(self.by_kernel), "counted": self.installed}


class TuningTimer:
    """Wall time inside ``autotune._TUNER.pick`` (a tuned key's candidates: compile + do_bench) and keys tuned."""

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0
        self.installed = False

    def install(self) -> "TuningTimer":
        try:
            from ..kernels import autotune
        except Exception:  # noqa: BLE001
            return self
        tuner = autotune._TUNER
        inner = tuner.pick

        def pick(key, candidates, bench):
            t0 = time.perf_counter()
            try:
                return inner(key, candidates, bench)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1
        tuner.pick = pick
        self.installed = True
        return self

    def summary(self) -> dict:
        return {"seconds": round(self.seconds, 3), "picks": self.calls, "counted": self.installed}


_COUNTER: Optional[CompileCounter] = None
_TUNING: Optional[TuningTimer] = None


def install() -> None:
    """Start counting compiles and tuning time in this process (idempotent)."""
    global _COUNTER, _TUNING
    if _COUNTER is None:
        _COUNTER = CompileCounter().install()
    if _TUNING is None:
        _TUNING = TuningTimer().install()


def report() -> dict:
    """``{"compile": {count, seconds, cache_hits, by_kernel, counted}, "tuning": {seconds, picks, counted}}``."""
    return {"compile": _COUNTER.summary() if _COUNTER else {"counted": False},
            "tuning": _TUNING.summary() if _TUNING else {"counted": False}}


# ---- cache warming ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def recording(records: dict):
    """Record instead of compiling: every JIT cache miss stores ``{key: (module, qualname, specialization_data)}``
    in ``records`` and is skipped (no compile, no launch: outputs stay unwritten). The autotuner's benchmark
    returns a constant, so every candidate is recorded once and nothing is timed. Point
    ``RESNET_FAST_CACHE_DIR`` at a scratch folder around a recording run: its "winners" are meaningless."""
    from triton import knobs
    import triton.testing

    def hook(*, fn=None, compile=None, **_):  # noqa: A002  (Triton's keyword)
        spec = (compile or {}).get("specialization_data")
        if spec is not None and fn is not None:
            records.setdefault(spec, (getattr(fn.module, "__name__", fn.module), fn.name))
        return True  # tells the JIT to skip this compile and launch

    prev_hook, prev_bench = knobs.runtime.jit_cache_hook, triton.testing.do_bench

    def fake_bench(fn, *a, **k):
        fn()
        return 1.0
    knobs.runtime.jit_cache_hook = hook
    triton.testing.do_bench = fake_bench
    try:
        yield records
    finally:
        knobs.runtime.jit_cache_hook = prev_hook
        triton.testing.do_bench = prev_bench


def _jit_fn(module: str, qualname: str):
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return getattr(obj, "fn", obj) if not hasattr(obj, "preload") else obj


def preload_one(item: tuple) -> dict:
    """Compile one record into ``TRITON_CACHE_DIR`` (runs in a worker process)."""
    module, qualname, spec = item
    t0 = time.perf_counter()
    try:
        _jit_fn(module, qualname).preload(spec)
        return {"kernel": qualname, "ok": True, "seconds": time.perf_counter() - t0}
    except Exception as exc:  # noqa: BLE001  (one failed preload only costs a compile later)
        return {"kernel": qualname, "ok": False, "seconds": time.perf_counter() - t0,
                "error": f"{type(exc).__name__}: {str(exc)[:200]}"}


def preload(records: list, workers: int, budget_s: Optional[float] = None) -> list:
    """Compile ``records`` ([(module, qualname, specialization_data)]) in ``workers`` spawned processes; records
    not started within ``budget_s`` are dropped (they compile when first launched instead)."""
    import concurrent.futures as cf
    import multiprocessing as mp
    deadline = None if budget_s is None else time.perf_counter() + budget_s
    if workers <= 1:
        return [preload_one(r) for r in records if deadline is None or time.perf_counter() < deadline]
    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
    futures = [pool.submit(preload_one, r) for r in records]
    done, _ = cf.wait(futures, timeout=None if deadline is None else max(0.0, deadline - time.perf_counter()))
    pool.shutdown(wait=False, cancel_futures=True)  # workers finish the compile they are in, then exit
    return [f.result() for f in futures if f in done]


def save_records(records: dict, path: str) -> int:
    rows = [[mod, name, spec] for spec, (mod, name) in records.items()]
    with open(path, "w") as f:
        json.dump(rows, f)
    return len(rows)


def load_records(path: str) -> list:
    with open(path) as f:
        return [tuple(r) for r in json.load(f)]


def cache_dir() -> str:
    return os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
