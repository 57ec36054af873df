"""Timing: warm-up timed apart, many repeats, median and spread, rotated inputs.

A timer turns "run this call" into milliseconds. On CUDA, :class:`CudaEventTimer` records a start/end event
pair around every repeat and synchronizes once at the end, so the figure is device time between the events;
the CPU demo uses :class:`WallTimer`. Tests pass a synthetic timer to check the statistics.

``fn(i)`` gets the repeat index so that it can cycle through several input buffers (``inputs[i % k]``) and
L2 does not hold the previous repeat's data. ``setup(i)``, when given, runs untimed before each repeat (for
example the forward pass whose backward is the timed part); on CUDA its work is enqueued before the start
event, so it is not inside the measured interval.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Optional, Sequence

import torch


@dataclasses.dataclass
class Timing:
    """Statistics of one measurement, all in milliseconds except ``warmup_s``."""
    median: float
    p20: float
    p80: float
    min: float
    n: int
    warmup_s: float

    def as_dict(self) -> dict:
        return {"ms": self.median, "spread": {"p20": self.p20, "p80": self.p80, "min": self.min, "n": self.n},
                "warmup_s": self.warmup_s}


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default method), ``0 <= q <= 1``."""
    if not values:
        raise ValueError("quantile of no values")
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(samples_ms: Sequence[float], warmup_s: float = 0.0) -> Timing:
    """Median, p20/p80 and min of per-repeat times."""
    return Timing(median=quantile(samples_ms, 0.5), p20=quantile(samples_ms, 0.2), p80=quantile(samples_ms, 0.8),
                  min=min(samples_ms), n=len(samples_ms), warmup_s=warmup_s)


class WallTimer:
    """Host wall clock (``time.perf_counter``): for the CPU demo only."""

    def run(self, fn: Callable[[int], Any], setup: Optional[Callable[[int], Any]], repeats: int) -> list[float]:
        out = []
        for i in range(repeats):
            state = setup(i) if setup else None
            t0 = time.perf_counter()
            fn(i) if setup is None else fn(i, state)
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    def sync(self) -> None:
        pass


class CudaEventTimer:
    """Device time between CUDA events recorded around every repeat; one synchronize at the end."""

    def run(self, fn: Callable[..., Any], setup: Optional[Callable[[int], Any]], repeats: int) -> list[float]:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for i in range(repeats):
            state = setup(i) if setup else None
            starts[i].record()
            fn(i) if setup is None else fn(i, state)
            ends[i].record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]

    def sync(self) -> None:
        torch.cuda.synchronize()


def default_timer():
    return CudaEventTimer() if torch.cuda.is_available() else WallTimer()


def measure(fn: Callable[..., Any], *, setup: Optional[Callable[[int], Any]] = None, warmup: int = 3,
            repeats: int = 20, timer=None, max_time_s: Optional[float] = None) -> Timing:
    """Warm up ``fn`` (compilation/autotuning happen here; their wall time is ``warmup_s``), then time it.

    ``max_time_s`` caps the repeat count from the steady-state time of the last warm-up call, so that a slow
    case does not eat the run's budget; at least 5 repeats are always taken.
    """
    timer = timer or default_timer()
    t0 = time.perf_counter()
    last = 0.0
    for i in range(warmup):
        t1 = time.perf_counter()
        state = setup(i) if setup else None
        fn(i) if setup is None else fn(i, state)
        timer.sync()
        last = time.perf_counter() - t1
    warmup_s = time.perf_counter() - t0
    if max_time_s is not None and last > 0:
        repeats = max(5, min(repeats, int(max_time_s / last)))
    return summarize(timer.run(fn, setup, repeats), warmup_s)
