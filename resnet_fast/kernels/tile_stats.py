"""BatchNorm forward partials of a stored channels_last activation: per-tile Σy and tile-centred Σ(y - ȳ_tile)².

The cuDNN composite of the training forward (:func:`resnet_fast.ops.conv_cudnn.conv_bn_stats`) gets ``y``
from ATen's convolution and reads it back once here; the Triton conv forward computes the same partials in its
``STATS`` epilogue. Both call :func:`tile_centred_sums`, the one per-tile formula, so the two paths hand
:func:`resnet_fast.kernels.bn_finalize.bn_finalize` the same numbers for the same tiles.

``y`` ``[N, K, P, Q]`` channels_last-contiguous is the row-major matrix ``[M = N*P*Q, K]``. Program
``(t, j)`` owns rows ``t*tile_rows ..`` and channels ``j*BLOCK_K ..``: it loads the tile once, reduces it in
fp32 and writes ``partials[0, t, k] = Σy`` and ``partials[1, t, k] = Σ(y - ȳ_t)²`` (``[2, T, K]`` fp32,
``T = cdiv(M, tile_rows)``): one writer per element, no atomics, deterministic. Centring on the tile's own
mean keeps a channel with |mean| ≫ std accurate (no ``E[y²] - E[y]²``); ``bn_finalize`` merges the tiles
Chan-style in float64.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .checks import check_operand_dtype, check_pow2

__all__ = ["TileStats", "tile_centred_sums", "tile_stats", "compile_specs", "TILE_STATS_CONFIG"]

# (tile_rows, BLOCK_K channels per program, num_warps). Memory bound: one read of y. 128 rows is the conv
# forward's largest BLOCK_M, so the partial buffer is as small as the epilogue's.
TILE_STATS_CONFIG = (128, 64, 8)
_TL = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class TileStats(NamedTuple):
    """BatchNorm forward partials, the conv STATS epilogue's and :func:`tile_stats`' output: per tile ``t`` of
    ``tile_rows`` GEMM rows (the last one possibly shorter) and channel ``k``, ``sum[t, k] = Σy`` and
    ``m2[t, k] = Σ(y - sum[t, k]/rows_t)²``; fp32 ``[T, K]`` views of one ``[2, T, K]`` buffer. Feed to
    :func:`resnet_fast.kernels.bn_finalize.bn_finalize`."""
    sum: torch.Tensor
    m2: torch.Tensor
    tile_rows: int


@triton.jit
def tile_centred_sums(y, mask, rows):
    """Per-column ``(Σy, Σ(y - ȳ)²)`` of one tile, the mean ``ȳ = Σy / rows`` the tile's own.

    ``y``: ``[ROWS, COLS]`` fp32 (the stored, already rounded values); ``mask``: ``[ROWS, COLS]`` valid
    elements (masked ones count as absent); ``rows``: fp32 scalar, the number of valid rows (>= 1).
    Returns two fp32 ``[COLS]`` vectors. Shared by the conv forward's STATS epilogue and :func:`tile_stats`."""
    ys = tl.where(mask, y, 0.0)
    s = tl.sum(ys, axis=0)
    d = tl.where(mask, ys - (s / rows)[None, :], 0.0)  # centred on the tile mean: no cancellation
    return s, tl.sum(d * d, axis=0)


@triton.jit
def _tile_stats_kernel(y_ptr, part_ptr, M, K, TILE_ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_t = tl.program_id(0)
    num_t = tl.cdiv(M, TILE_ROWS)
    row0 = pid_t.to(tl.int64) * TILE_ROWS  # int64: M*K may pass 2**31
    offs_m = row0 + tl.arange(0, TILE_ROWS)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    mask = (offs_m < M)[:, None] & k_ok[None, :]
    y = tl.load(y_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    rows = tl.minimum(M - row0, TILE_ROWS).to(tl.float32)
    s, m2 = tile_centred_sums(y, mask, rows)
    tl.store(part_ptr + pid_t.to(tl.int64) * K + offs_k, s, mask=k_ok)
    tl.store(part_ptr + (num_t + pid_t).to(tl.int64) * K + offs_k, m2, mask=k_ok)


def _block_k(K: int, cap: int) -> int:
    """Channels per program: the config's, narrowed for few channels (at least 16)."""
    return max(16, min(cap, triton.next_power_of_2(K)))


def tile_stats(y: torch.Tensor, *, config: tuple | None = None):
    """Per-tile BatchNorm partials of ``y``, as the conv forward's STATS epilogue would write them.

    Args:
        y: ``[N, K, P, Q]`` channels_last-contiguous float32/float16/bfloat16 (e.g. a conv output), N*P*Q >= 1.
        config: optional ``(tile_rows, BLOCK_K, num_warps)``, powers of two; default :data:`TILE_STATS_CONFIG`.

    Returns:
        :class:`TileStats` ``(sum, m2, tile_rows)``: fp32 ``[T, K]`` views of one
        ``[2, T, K]`` buffer, ``T = cdiv(N*P*Q, tile_rows)``; feed to
        :func:`resnet_fast.kernels.bn_finalize.bn_finalize`.
    """
    who = "tile_stats"
    check_operand_dtype("y", y, who)
    if not y.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"{who}: y must be channels_last-contiguous (its [N*P*Q, K] rows are read densely)")
    tile_rows, block_k, warps = config or TILE_STATS_CONFIG
    check_pow2(who, tile_rows=tile_rows, BLOCK_K=block_k)
    N, K, P, Q = y.shape
    M = N * P * Q
    if M < 1 or K < 1:
        raise ValueError(f"{who}: y must have at least one row and one channel, got shape {tuple(y.shape)}")
    T = triton.cdiv(M, tile_rows)
    part = torch.empty((2, T, K), dtype=torch.float32, device=y.device)
    bk = _block_k(K, block_k)
    _tile_stats_kernel[(T, triton.cdiv(K, bk))](y, part, M, K, TILE_ROWS=tile_rows, BLOCK_K=bk, num_warps=warps)
    return TileStats(part[0], part[1], tile_rows)


def compile_specs() -> list:
    """(jit_fn, signature, constexprs, options, is_gemm, div16) for :mod:`.compile_check`: the default config in
    each dtype, and its narrow-channel form (K = 16, as ``_block_k`` picks for few channels)."""
    tile_rows, block_k, warps = TILE_STATS_CONFIG
    specs = []
    for dt in _TL.values():
        for bk in (block_k, 16):
            sig = {"y_ptr": f"*{dt}", "part_ptr": "*fp32", "M": "i32", "K": "i32", "TILE_ROWS": "constexpr",
                   "BLOCK_K": "constexpr"}
            specs.append((_tile_stats_kernel, sig, {"TILE_ROWS": tile_rows, "BLOCK_K": bk},
                          {"num_warps": warps, "num_stages": 1}, False, ("K",)))
    return specs
