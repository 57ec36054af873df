"""BatchNorm finalize kernels of the training path: per-tile partial sums -> per-channel vectors.

Forward (:func:`bn_finalize`): the conv forward's stats epilogue writes, per output tile ``t`` of ``n_t``
rows (``tile_rows``, the last tile the remainder) and channel ``c``, ``sum[t, c] = Σ y`` and the tile's
centred ``m2[t, c] = Σ (y - ȳ_t)²`` (fp32, shape ``[T, C]``). The tiles are merged Chan-style in a fixed
order in float64, ``M2 = Σ m2_t + Σ sum_t²/n_t - (Σ sum_t)²/n``, in two launches so that the merge is
parallel (the stem's output has ~25k tiles per channel): ``_chunk_sums_kernel`` reduces chunks of
:data:`CHUNK_T` tiles per (channel block, chunk) program to float64 partials of ``Σ sum_t`` and
``Σ m2_t + sum_t²/n_t``, and the finalize kernel adds those in chunk order. The float64 cancellation is harmless
and the merge's first-order sensitivity to the fp32 rounding of ``sum_t`` cancels (it is weighted by
``ȳ_t - ȳ``), so a channel with |mean| ≫ std keeps its variance (``Σy²`` partials would lose
``eps·(mean/std)²`` of it: 2 % at mean/std = 300). It then writes ``mean``, ``invstd`` (biased variance,
as BatchNorm normalises), the folded affine ``scale = gamma*invstd``, ``shift = beta - mean*scale``, and
updates ``running_mean``/``running_var`` (unbiased variance) and ``num_batches_tracked`` in place exactly
like ``torch.nn.BatchNorm2d`` in train mode -- on the device, without a host sync.

Backward (:func:`bn_backward_coeffs`): the dgrad epilogue writes ``Σ dz`` and ``Σ dz·(y - mean)`` per tile;
the same two stages reduce them and returns the per-channel coefficients of the BatchNorm input gradient::

    dy = c1[c]*dz + c2[c]*(y - mean[c]) + c3[c]
    c1 = gamma*invstd,  c2 = -gamma*invstd³·Σdz(y-μ)/n,  c3 = -gamma*invstd·Σdz/n

plus ``dgamma = invstd·Σdz(y-μ)`` and ``dbeta = Σdz``. The dgrad/wgrad kernels apply ``dy`` while loading
their ``dy`` operand (the ``dy_bn=`` option of ``conv_dgrad``/``conv_wgrad``, a
:class:`resnet_fast.kernels.conv_common.DyBN` of ``(y, c1, c2, c3, mean)``), so ``dy`` is never written.

``num_batches_tracked`` is incremented by the last program to finish (an integer ticket counter, reset by
that program), so every program reads the pre-increment value first; the counter is per device, so two
finalize launches must not run concurrently on different streams of one device.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import FLOAT_DTYPES, check_vector

__all__ = ["bn_finalize", "bn_backward_coeffs", "compile_specs", "FINALIZE_CONFIG", "CHUNK_T"]

# (BLOCK_T, BLOCK_C, num_warps): tiles reduced per step x channels per program. Memory bound and tiny.
FINALIZE_CONFIG = (32, 64, 4)
# Tiles per first-stage program: the stem (~25k tiles x 64 channels) gets ~200 programs, a late layer one chunk.
# A constant, not a function of the GPU, so the float64 summation order (and the result) is the same everywhere.
CHUNK_T = 128
_TICKETS: dict = {}  # device -> int32[1] counter, always back at 0 after a launch


@triton.jit
def _reduce_tiles(a_ptr, b_ptr, stride_a, stride_b, T, C, offs_c, BLOCK_T: tl.constexpr):
    """Column sums over rows 0..T-1 of two [T, C] buffers (fp32 or float64), in float64, in a fixed order."""
    mask_c = offs_c < C
    acc_a = tl.zeros([offs_c.shape[0]], dtype=tl.float64)
    acc_b = tl.zeros([offs_c.shape[0]], dtype=tl.float64)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        m = (offs_t[:, None] < T) & mask_c[None, :]
        a = tl.load(a_ptr + offs_t[:, None] * stride_a + offs_c[None, :], mask=m, other=0.0)
        b = tl.load(b_ptr + offs_t[:, None] * stride_b + offs_c[None, :], mask=m, other=0.0)
        acc_a += tl.sum(a.to(tl.float64), axis=0)
        acc_b += tl.sum(b.to(tl.float64), axis=0)
    return acc_a, acc_b


@triton.jit
def _chunk_sums_kernel(a_ptr, b_ptr, stride_a, stride_b, T, C, count, tile_rows, out_ptr,
                       CHAN: tl.constexpr, CHUNK_T: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """First stage: program (channel block, chunk k) reduces tiles ``k*CHUNK_T ..`` of two [T, C] fp32 buffers
    to float64 ``out[0, k, c] = Σ a_t`` and ``out[1, k, c] = Σ b_t`` -- with ``CHAN``, ``Σ (b_t + a_t²/n_t)``,
    the additive term of the Chan merge (a = Σy, b = m2 per tile of ``n_t`` rows). One writer per element."""
    pid_k = tl.program_id(1)
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    acc_a = tl.zeros([BLOCK_C], dtype=tl.float64)
    acc_b = tl.zeros([BLOCK_C], dtype=tl.float64)
    for t0 in range(0, CHUNK_T, BLOCK_T):
        offs_t = pid_k * CHUNK_T + t0 + tl.arange(0, BLOCK_T)
        m = (offs_t[:, None] < T) & mask_c[None, :]
        a = tl.load(a_ptr + offs_t[:, None] * stride_a + offs_c[None, :], mask=m, other=0.0).to(tl.float64)
        b = tl.load(b_ptr + offs_t[:, None] * stride_b + offs_c[None, :], mask=m, other=0.0).to(tl.float64)
        if CHAN:
            n_t = tl.maximum(tl.minimum(count - offs_t.to(tl.int64) * tile_rows, tile_rows), 1).to(tl.float64)
            b += a * a / n_t[:, None]
        acc_a += tl.sum(a, axis=0)
        acc_b += tl.sum(b, axis=0)
    tl.store(out_ptr + pid_k * C + offs_c, acc_a, mask=mask_c)
    tl.store(out_ptr + (tl.num_programs(1) + pid_k) * C + offs_c, acc_b, mask=mask_c)


@triton.jit
def _bn_finalize_kernel(part_ptr, n_chunks, C, count, eps, momentum,
                        w_ptr, b_ptr, rm_ptr, rv_ptr, nbt_ptr, ticket_ptr,
                        mean_ptr, invstd_ptr, scale_ptr, shift_ptr,
                        AFFINE: tl.constexpr, TRACK: tl.constexpr, CUMULATIVE: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    if TRACK:
        nbt_old = tl.load(nbt_ptr)  # read before the ticket below: the increment comes after every read
    # s = Σ sum_t, q = Σ m2_t + sum_t²/n_t over the chunks, in chunk order (float64 partials)
    s, q = _reduce_tiles(part_ptr, part_ptr + n_chunks * C, C, C, n_chunks, C, offs_c, BLOCK_T)
    n = count.to(tl.float64)
    mean64 = s / n
    var64 = tl.maximum((q - s * mean64) / n, 0.0)  # biased: what BatchNorm normalises with
    mean = mean64.to(tl.float32)
    var = var64.to(tl.float32)
    invstd = 1.0 / tl.sqrt(var + eps)
    if AFFINE:
        scale = tl.load(w_ptr + offs_c, mask=mask_c, other=1.0).to(tl.float32) * invstd
        shift = tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32) - mean * scale
    else:
        scale = invstd
        shift = -mean * invstd
    tl.store(mean_ptr + offs_c, mean, mask=mask_c)
    tl.store(invstd_ptr + offs_c, invstd, mask=mask_c)
    tl.store(scale_ptr + offs_c, scale, mask=mask_c)
    tl.store(shift_ptr + offs_c, shift, mask=mask_c)
    if TRACK:
        if CUMULATIVE:  # momentum=None: cumulative moving average, factor 1/num_batches_tracked (new value)
            factor = 1.0 / (nbt_old + 1).to(tl.float32)
        else:
            factor = momentum
        rm = tl.load(rm_ptr + offs_c, mask=mask_c, other=0.0)
        rv = tl.load(rv_ptr + offs_c, mask=mask_c, other=0.0)
        new_rm = (1.0 - factor) * rm.to(tl.float32) + factor * mean
        new_rv = (1.0 - factor) * rv.to(tl.float32) + factor * (var64 * n / (n - 1.0)).to(tl.float32)
        tl.store(rm_ptr + offs_c, new_rm.to(rm.dtype), mask=mask_c)
        tl.store(rv_ptr + offs_c, new_rv.to(rv.dtype), mask=mask_c)
        ticket = tl.atomic_add(ticket_ptr, 1)  # integer, acq_rel: ordered after this program's nbt read
        if ticket == tl.num_programs(0) - 1:
            tl.store(nbt_ptr, nbt_old + 1)
            tl.store(ticket_ptr, 0)


@triton.jit
def _bn_backward_coeffs_kernel(part_ptr, n_chunks, C, inv_count,
                               invstd_ptr, w_ptr, c1_ptr, c2_ptr, c3_ptr, dw_ptr, db_ptr,
                               AFFINE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    sdz, sdzy = _reduce_tiles(part_ptr, part_ptr + n_chunks * C, C, C, n_chunks, C, offs_c, BLOCK_T)
    invstd = tl.load(invstd_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    if AFFINE:
        gamma = tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    else:
        gamma = tl.full([BLOCK_C], 1.0, tl.float32)
    dbeta = sdz.to(tl.float32)
    dgamma = sdzy.to(tl.float32) * invstd
    c1 = gamma * invstd
    tl.store(c1_ptr + offs_c, c1, mask=mask_c)
    tl.store(c2_ptr + offs_c, -c1 * invstd * dgamma * inv_count, mask=mask_c)
    tl.store(c3_ptr + offs_c, -c1 * dbeta * inv_count, mask=mask_c)
    tl.store(dw_ptr + offs_c, dgamma, mask=mask_c)
    tl.store(db_ptr + offs_c, dbeta, mask=mask_c)


# --------------------------------------------------------------------------------------------- launchers
def _check_partials(name_a, a, name_b, b, who):
    for name, t in ((name_a, a), (name_b, b)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype != torch.float32:
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{who}: {name} must be a 2-D [T, C] float32 tensor, got {got}")
        if t.stride(1) != 1:
            raise ValueError(f"{who}: {name} must be contiguous along channels (stride(1) == 1)")
    if a.shape != b.shape or a.device != b.device:
        raise ValueError(f"{who}: {name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must have the same "
                         "shape and device")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"{who}: {name_a} must have at least one tile and one channel, got {tuple(a.shape)}")


def _chunk_sums(a: torch.Tensor, b: torch.Tensor, chan: bool, count: int, tile_rows: int, block_t: int,
                block_c: int, warps: int) -> tuple:
    """First stage of both reductions: ``([2, chunks, C] float64 partials, chunks)``."""
    T, C = a.shape
    if CHUNK_T % block_t:  # a chunk is whole BLOCK_T steps, else neighbouring chunks would overlap
        raise ValueError(f"bn_finalize: config BLOCK_T={block_t} must divide CHUNK_T={CHUNK_T}")
    chunks = triton.cdiv(T, CHUNK_T)
    part = torch.empty((2, chunks, C), dtype=torch.float64, device=a.device)
    _chunk_sums_kernel[(triton.cdiv(C, block_c), chunks)](
        a, b, a.stride(0), b.stride(0), T, C, count, tile_rows, part,
        CHAN=chan, CHUNK_T=CHUNK_T, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=warps)
    return part, chunks


def _ticket(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _TICKETS:
        _TICKETS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return _TICKETS[key]


def _validate_finalize(sum_y, m2_y, count, tile_rows, running_mean, running_var, num_batches_tracked, momentum,
                       eps, weight, bias, who: str) -> tuple:
    """Check :func:`bn_finalize`'s arguments (ValueError naming the bad one); returns the partials' (T, C)."""
    _check_partials("sum_y", sum_y, "m2_y", m2_y, who)
    T, C = sum_y.shape
    device = sum_y.device
    if not isinstance(count, int) or isinstance(count, bool) or count < 2:
        raise ValueError(f"{who}: count must be an int > 1 (BatchNorm needs more than one value per channel "
                         f"in training), got {count!r}")
    if not isinstance(tile_rows, int) or isinstance(tile_rows, bool) or tile_rows < 1 \
            or T != triton.cdiv(count, tile_rows):
        raise ValueError(f"{who}: tile_rows must be an int >= 1 with cdiv(count, tile_rows) == T = {T} tiles "
                         f"(count {count}), got {tile_rows!r}")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{who}: running_mean and running_var must be given together")
    if running_mean is not None:
        check_vector("running_mean", running_mean, C, device, who, FLOAT_DTYPES)
        check_vector("running_var", running_var, C, device, who, FLOAT_DTYPES)
        if not isinstance(num_batches_tracked, torch.Tensor) or num_batches_tracked.dtype != torch.int64 \
                or num_batches_tracked.numel() != 1 or num_batches_tracked.device != device:
            raise ValueError(f"{who}: num_batches_tracked must be a one-element int64 tensor on {device} "
                             "when running stats are tracked")
    if momentum is not None and not (isinstance(momentum, (int, float)) and 0.0 <= momentum <= 1.0):
        raise ValueError(f"{who}: momentum must be a float in [0, 1] or None, got {momentum!r}")
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{who}: eps must be a positive float, got {eps!r}")
    if (weight is None) != (bias is None):
        raise ValueError(f"{who}: weight and bias must be given together (affine) or both be None")
    if weight is not None:
        check_vector("weight", weight, C, device, who, FLOAT_DTYPES)
        check_vector("bias", bias, C, device, who, FLOAT_DTYPES)
    return T, C


def bn_finalize(sum_y: torch.Tensor, m2_y: torch.Tensor, count: int, *, tile_rows: int,
                running_mean: torch.Tensor | None = None, running_var: torch.Tensor | None = None,
                num_batches_tracked: torch.Tensor | None = None, momentum: float | None = 0.1,
                eps: float = 1e-5, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                config: tuple | None = None):
    """Batch statistics, folded affine and running-stat update of a train-mode BatchNorm2d (two launches).

    Args:
        sum_y, m2_y: [T, C] float32 per-tile Σy and Σ(y - ȳ_tile)² (row stride free, channels dense), e.g.
            the ``sum``/``m2`` of :class:`resnet_fast.kernels.tile_stats.TileStats`.
        count: number of values per channel that the partials cover (N*H*W of the BN input), > 1.
        tile_rows: rows per tile; tile ``t`` covers ``min(tile_rows, count - t*tile_rows)`` of them, so
            ``T == cdiv(count, tile_rows)``.
        running_mean, running_var: [C] float32/float16/bfloat16, updated in place; pass both or neither
            (neither = ``track_running_stats=False``). ``num_batches_tracked``: int64 scalar tensor,
            incremented in place (required with running stats).
        momentum: float in [0, 1], or None for the cumulative moving average (factor 1/num_batches_tracked).
        weight, bias: [C] gamma/beta, both or neither (neither = ``affine=False``).
        config: optional (BLOCK_T, BLOCK_C, num_warps), default :data:`FINALIZE_CONFIG`.

    Returns:
        (mean, invstd, scale, shift), each [C] float32 on the partials' device: ``invstd = 1/sqrt(var + eps)``
        with the biased batch variance; ``scale = gamma*invstd``, ``shift = beta - mean*scale`` (gamma=1,
        beta=0 without affine) so that ``bn(y) = y*scale + shift``.
    """
    who = "bn_finalize"
    T, C = _validate_finalize(sum_y, m2_y, count, tile_rows, running_mean, running_var, num_batches_tracked,
                              momentum, eps, weight, bias, who)
    device = sum_y.device
    track, affine = running_mean is not None, weight is not None
    block_t, block_c, warps = config or FINALIZE_CONFIG
    mean, invstd, scale, shift = (torch.empty(C, dtype=torch.float32, device=device) for _ in range(4))
    dummy = mean  # never dereferenced when its constexpr switch is off
    part, chunks = _chunk_sums(sum_y, m2_y, True, count, tile_rows, block_t, block_c, warps)
    _bn_finalize_kernel[(triton.cdiv(C, block_c),)](
        part, chunks, C, count, float(eps),
        float(momentum if momentum is not None else 0.0),
        weight if affine else dummy, bias if affine else dummy,
        running_mean if track else dummy, running_var if track else dummy,
        num_batches_tracked if track else dummy, _ticket(device),
        mean, invstd, scale, shift,
        AFFINE=affine, TRACK=track, CUMULATIVE=momentum is None, BLOCK_T=block_t, BLOCK_C=block_c,
        num_warps=warps)
    return mean, invstd, scale, shift


def bn_backward_coeffs(sum_dz: torch.Tensor, sum_dz_yc: torch.Tensor, invstd: torch.Tensor, count: int, *,
                       weight: torch.Tensor | None = None, config: tuple | None = None):
    """Per-channel coefficients of the BatchNorm backward from the dgrad epilogue's per-tile partials.

    Args:
        sum_dz, sum_dz_yc: [T, C] float32 per-tile Σdz and Σdz·(y - mean), ``dz`` the gradient w.r.t. the BN
            output (after the ReLU mask), ``y`` the raw BN input, ``mean`` the forward batch mean.
        invstd: [C] float32 forward ``1/sqrt(var + eps)``. count: values per channel (N*H*W), > 1.
        weight: [C] gamma, or None for ``affine=False``.

    Returns:
        (c1, c2, c3, dgamma, dbeta), each [C] float32, with ``dL/dy = c1*dz + c2*(y - mean) + c3``.
    """
    who = "bn_backward_coeffs"
    _check_partials("sum_dz", sum_dz, "sum_dz_yc", sum_dz_yc, who)
    T, C = sum_dz.shape
    device = sum_dz.device
    if not isinstance(count, int) or isinstance(count, bool) or count < 2:
        raise ValueError(f"{who}: count must be an int > 1, got {count!r}")
    check_vector("invstd", invstd, C, device, who)
    if weight is not None:
        check_vector("weight", weight, C, device, who, FLOAT_DTYPES)
    block_t, block_c, warps = config or FINALIZE_CONFIG
    outs = [torch.empty(C, dtype=torch.float32, device=device) for _ in range(5)]
    part, chunks = _chunk_sums(sum_dz, sum_dz_yc, False, count, 1, block_t, block_c, warps)
    _bn_backward_coeffs_kernel[(triton.cdiv(C, block_c),)](
        part, chunks, C, 1.0 / count,
        invstd, weight if weight is not None else invstd, *outs,
        AFFINE=weight is not None, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=warps)
    return tuple(outs)


def compile_specs() -> list:
    """(jit_fn, signature, constexprs, options, is_gemm) for the sm_90 compile check, every variant."""
    block_t, block_c, warps = FINALIZE_CONFIG
    specs = []
    opts = {"num_warps": warps, "num_stages": 1}
    for affine in (False, True):
        for track in (False, True):
            for cumulative in (False, True):
                sig = {"part_ptr": "*fp64", "n_chunks": "i32", "C": "i32", "count": "i64", "eps": "fp32",
                       "momentum": "fp32", "w_ptr": "*fp32", "b_ptr": "*fp32", "rm_ptr": "*fp32",
                       "rv_ptr": "*fp32", "nbt_ptr": "*i64", "ticket_ptr": "*i32", "mean_ptr": "*fp32",
                       "invstd_ptr": "*fp32", "scale_ptr": "*fp32", "shift_ptr": "*fp32"}
                cx = {"AFFINE": affine, "TRACK": track, "CUMULATIVE": cumulative, "BLOCK_T": block_t,
                      "BLOCK_C": block_c}
                specs.append((_bn_finalize_kernel, sig, cx, opts, False))
        sig = {"part_ptr": "*fp64", "n_chunks": "i32", "C": "i32", "inv_count": "fp32", "invstd_ptr": "*fp32",
               "w_ptr": "*fp32", "c1_ptr": "*fp32", "c2_ptr": "*fp32", "c3_ptr": "*fp32", "dw_ptr": "*fp32",
               "db_ptr": "*fp32"}
        specs.append((_bn_backward_coeffs_kernel, sig,
                      {"AFFINE": affine, "BLOCK_T": block_t, "BLOCK_C": block_c}, opts, False))
    for chan in (False, True):
        sig = {"a_ptr": "*fp32", "b_ptr": "*fp32", "stride_a": "i32", "stride_b": "i32", "T": "i32", "C": "i32",
               "count": "i64", "tile_rows": "i64", "out_ptr": "*fp64"}
        specs.append((_chunk_sums_kernel, sig, {"CHAN": chan, "CHUNK_T": CHUNK_T, "BLOCK_T": block_t,
                                                "BLOCK_C": block_c}, opts, False))
    return specs
