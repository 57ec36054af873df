"""The conv forward's epilogue, shared by the gather (:mod:`.conv_fwd`) and TMA-box (:mod:`.conv_fwd_box`) kernels."""
from __future__ import annotations

import triton.language as tl
import triton

from .tile_stats import tile_centred_sums


@triton.jit
def epilogue(acc, offs_m, row_ok, rows, k_glob, n_ok, pid_m, num_pid_m, K, y_ptr, bias_ptr, scale_ptr, shift_ptr,
             res_ptr, part_ptr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
             HAS_RES: tl.constexpr, RELU: tl.constexpr, STATS: tl.constexpr):
    """``y = relu?((acc + bias) * scale + shift + residual)`` (fp32 ``acc [BLOCK_M, BLOCK_N]``) stored at rows
    ``offs_m`` (int64 ``[BLOCK_M]`` GEMM rows of ``y [M, K]``, ``row_ok`` the valid ones) and channels ``k_glob``
    (``n_ok`` the valid ones); with ``STATS`` the tile's Σy and centred M2 of the stored (rounded) values over its
    ``rows`` valid rows (fp32 scalar) go to ``partials[0, pid_m, k]`` and ``partials[1, pid_m, k]`` of
    ``[2, num_pid_m, K]``."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + k_glob, mask=n_ok, other=0.0)[None, :]
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + k_glob, mask=n_ok, other=0.0)[None, :]
    if HAS_SHIFT:
        acc += tl.load(shift_ptr + k_glob, mask=n_ok, other=0.0)[None, :]
    out_mask = row_ok[:, None] & n_ok[None, :]
    y_off = offs_m[:, None] * K + k_glob[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + y_off, mask=out_mask, other=0.0).to(tl.float32)
    if RELU:
        acc = tl.maximum(acc, 0.0)
    y = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + y_off, y, mask=out_mask)
    if STATS:  # statistics of the stored (rounded) values, over valid rows only
        s, m2 = tile_centred_sums(y.to(tl.float32), out_mask, rows)  # the one per-tile formula (tile_stats)
        tl.store(part_ptr + pid_m * K + k_glob, s, mask=n_ok)
        tl.store(part_ptr + (num_pid_m + pid_m) * K + k_glob, m2, mask=n_ok)
