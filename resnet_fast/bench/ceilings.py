"""Device ceilings measured in the same run: copy bandwidth and bf16 matmul throughput.

Rows report their achieved GB/s and TFLOP/s as fractions of these, so the roofline fraction is against what
this device actually does today (clocks, ECC, driver), not a datasheet figure.
"""
from __future__ import annotations

import torch

from .timing import measure


def copy_gbps(nbytes: int = 1 << 30, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in GB/s (1e9 bytes/s): bytes read + bytes written over median time."""
    n = nbytes // 2
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t = measure(lambda i: dst.copy_(src), warmup=3, repeats=repeats)
    return 2 * nbytes / (t.median * 1e-3) / 1e9


def bf16_tflops(n: int = 8192, repeats: int = 20) -> float:
    """Dense bf16 matmul throughput in TFLOP/s on an ``n x n x n`` product (random data)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    t = measure(lambda i: torch.mm(a, b, out=c), warmup=3, repeats=repeats)
    return 2 * n ** 3 / (t.median * 1e-3) / 1e12


def measure_peaks(quick: bool = False) -> dict:
    """``{"copy_GBps", "bf16_TFLOPs"}`` on the current CUDA device."""
    reps = 10 if quick else 30
    peaks = {"copy_GBps": copy_gbps(repeats=reps), "bf16_TFLOPs": bf16_tflops(repeats=reps)}
    torch.cuda.empty_cache()
    return peaks
