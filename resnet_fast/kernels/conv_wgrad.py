"""Conv weight gradient (wgrad) as a Triton implicit GEMM over NHWC tensors, with deterministic split-K.

``dW[k, c, r, s] = Σ_{n, p, q} dy[n, p, q, k] · x[n, p*stride - pad + r*dil, q*stride - pad + s*dil, c]``

GEMM view per group: M = K/groups output channels, N = R*S*C/groups (one tap per program, a tile of input
channels), reduction over the N*P*Q output pixels. That reduction is long and M×N is small for late ResNet
layers (K=512, 3×3 → few tiles), so it is split into SPLIT contiguous chunks of whole BLOCK_K steps, one
program per (tile, chunk): each writes its fp32 partial into ``[SPLIT, K, C/groups, R, S]`` and
:func:`_wgrad_combine_kernel` sums the SPLIT partials in index order -- bit-reproducible, no float
atomics. With SPLIT = 1 the GEMM kernel stores ``dW`` directly.

Layouts: ``grad_out [N, K, P, Q]`` and ``x [N, C, H, W]`` with any strides (channels_last is the fast layout),
one dtype, fp32/fp16/bf16 (fp32 as IEEE or TF32, :func:`configs.conv_allows_tf32`); fp32 accumulation; ``dW``
``[K, C/groups, R, S]`` contiguous in ``out_dtype`` (fp32 by default: the master-weight gradient).

Fusions (constexpr switches, default off):

* ``in_scale/in_shift`` (PROLOGUE): ``x`` is the raw output ``y_prev`` of the previous conv; the operand is
  ``relu(y_prev*in_scale[c] + in_shift[c])`` recomputed in registers, with the padding mask applied after
  the transform (a padded zero must stay zero, not become ``relu(in_shift)``).
* ``dy_bn`` (DY_BN), ``dy_relu`` (DY_RELU): as in ``conv_dgrad`` (the same :func:`conv_dgrad.dy_on_load`):
  ``grad_out`` is ``dz`` and ``dy = c1*dz' + c2*(y - mean) + c3`` is formed while loading (a
  :class:`.conv_common.DyBN`), ``dz' = dz where y > 0`` under dy_relu.
* ``dy_sums`` (SUMS): also the per-output-channel sums ``Σ_npq dy`` of the operand as the GEMM sees it (after
  the transform, rounded to the storage dtype). The programs of the first (tap, channel-tile) column -- one per
  (k tile, group, chunk) -- row-sum their chunk of dy in a loop of their own before the GEMM (summing inside the
  MMA loop cost up to 90 registers on sm_90; this costs 1/(R*S*channel tiles) more dy reads, and warms L2 for
  the GEMM); chunk partials ``[SPLIT, K]`` go through the same fixed-order combine as dW (deterministic, no
  atomics). The inference op's backward takes Σg for its bias/shift/scale gradients from here instead of a
  separate pass over g. ``need_dw=False`` launches only that column when no weight gradient is wanted (its GEMM,
  1/(R*S*channel tiles) of the full one, runs into a scratch buffer).

Alignment (``ALIGNED``, set by the launcher from the runtime shapes, see :func:`_aligned`): unit channel
strides, ``Kg % BLOCK_M == 0``, ``Cg % BLOCK_N == 0`` and every pixel stride a multiple of 16 elements -- every
ResNet layer but the stem (C=3). The kernel then drops the channel masks (masks constant along the channels)
and asserts 16-element alignment of every row start (``tl.multiple_of``), so the dy, y and x tiles load as
16-byte vectors through cp.async and the loop is software-pipelined; otherwise the masked general path
(scalar loads, not pipelined) runs, and the launcher gives it only the 64×32 config, the one whose general
path compiles without spills on sm_90 (see :data:`WGRAD_CONFIGS`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .checks import FLOAT_DTYPES, check_tensor, check_vector
from .configs import ConvConfig, checked_candidates, choose, conv_allows_tf32, for_dtype
from .conv_common import (ConvGeometry, DyBN, check_dy_bn, check_operand_dtype, input_coords, ordered_signature,
                          rows_aligned, rows_to_npq)
from .conv_dgrad import dy_on_load

__all__ = ["conv2d_wgrad_nhwc", "WGRAD_CONFIGS", "pick_split", "compile_specs", "WgradSwitches"]
# Programs wanted in flight: 2 waves of an H100's 132 SMs; and at least this many BLOCK_K steps per chunk so
# the partial round trip stays small next to the GEMM work.
_TARGET_PROGRAMS = 264
_MIN_STEPS_PER_SPLIT = 8
_MAX_SPLIT = 64


# Every config the launcher may pick; compile_specs covers each of them (16-bit and fp32 via for_dtype, every
# variant, ALIGNED; the general path at the last, 64x32 config only).
# (BLOCK_M output channels, BLOCK_N input channels of one tap, BLOCK_K pixels per MMA step; GROUP_M unused)
# Register use on sm_90 is dominated by the operand loads: aligned (16-byte vectors, cp.async, 3 stages) the
# fused 128x128 w8 tile needs ~234 registers and 64x64 w4 ~141, no spills; the masked general path of those
# two tiles issues one load (and one 64-bit address) per element and spills at 255 registers when fused, so
# unaligned shapes run the 64x32 tile, whose general path fits.
# Autotuned among those that fit the shape; the default is 128x128 when both channel counts reach 128, else
# 64x64. (64x128 w4 was tried: its fused bf16 variant spills 4 bytes.)
WGRAD_CONFIGS = (ConvConfig(64, 64, 64, 8, 4, 3), ConvConfig(128, 128, 64, 8, 8, 3),
                 ConvConfig(128, 64, 64, 8, 8, 3), ConvConfig(64, 32, 64, 8, 4, 3))
_GENERAL_CONFIG = WGRAD_CONFIGS[-1]  # the one config whose masked general path is compile-checked


def _aligned(g: ConvGeometry, cfg: ConvConfig, dy: torch.Tensor, x: torch.Tensor) -> bool:
    """The kernel's ALIGNED switch: channel tiles divide the channels (Kg % BLOCK_M, Cg % BLOCK_N), and dy
    (and y, which has its strides) and x have unit channel strides and 16-aligned pixel rows."""
    return g.Kg % cfg.BLOCK_M == 0 and g.Cg % cfg.BLOCK_N == 0 and rows_aligned(dy) and rows_aligned(x)


def _candidates(g: ConvGeometry, dy: torch.Tensor, x: torch.Tensor) -> tuple:
    """(candidates for ``dy``'s dtype, the untuned default): the configs whose path for this shape (ALIGNED or
    the masked general one) is compile-checked; C/groups <= 32 takes the general config. The default is the
    128x128 tile when both channel counts reach 128, else 64x64, where a candidate; else the first candidate."""
    general = for_dtype(_GENERAL_CONFIG, dy.dtype)
    if g.Cg <= 32:
        return (general,), general
    # GEMM: output channels × input channels (of one tap), reducing over pixels
    cands = checked_candidates(WGRAD_CONFIGS, general, dy.dtype, lambda c: _aligned(g, c, dy, x), g.Kg, g.Cg,
                               g.N * g.P * g.Q)
    want = for_dtype(WGRAD_CONFIGS[1] if min(g.Cg, g.Kg) >= 128 else WGRAD_CONFIGS[0], dy.dtype)
    return tuple(cands), want if want in cands else cands[0]


def pick_split(g: ConvGeometry, cfg: ConvConfig, first_column_only: bool = False) -> int:
    """SPLIT so the grid fills the GPU while each chunk keeps >= _MIN_STEPS_PER_SPLIT BLOCK_K steps
    (``first_column_only``: the grid of a ``need_dw=False`` launch, one (tap, channel tile) column)."""
    crs_tiles = 1 if first_column_only else triton.cdiv(g.Cg, cfg.BLOCK_N) * g.R * g.S
    tiles = triton.cdiv(g.Kg, cfg.BLOCK_M) * crs_tiles * g.groups
    steps = triton.cdiv(g.N * g.P * g.Q, cfg.BLOCK_K)
    want = triton.cdiv(_TARGET_PROGRAMS, tiles)
    return max(1, min(want, steps // _MIN_STEPS_PER_SPLIT, _MAX_SPLIT))


@triton.jit
def _dy_tile(dy_ptr, z_ptr, j0, hi, k_glob, k_ok, c1, c2, c3, mu, P, Q, sdy_n, sdy_h, sdy_w, sdy_c,
             DY_BN: tl.constexpr, DY_RELU: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_K: tl.constexpr):
    """The A operand ``dy^T [BLOCK_M, BLOCK_K]`` (output channels × the output pixels ``j0 + [0, BLOCK_K)``
    below ``hi``), formed on load under DY_BN, and those pixels ``(n, p, q)`` with their validity."""
    offs_j = j0 + tl.arange(0, BLOCK_K)             # output pixels (GEMM reduction)
    j_ok = offs_j < hi
    n64, p, q = rows_to_npq(offs_j, P, Q)
    dy_pix = n64 * sdy_n + p * sdy_h + q * sdy_w
    if ALIGNED:  # every pixel's channel vector starts 16-element aligned
        dy_pix = tl.multiple_of(dy_pix, 16)
    # contiguous along k for NHWC
    a_off = (k_glob * sdy_c)[:, None] + dy_pix[None, :]
    a_mask = k_ok[:, None] & j_ok[None, :]
    a = tl.load(dy_ptr + a_off, mask=a_mask, other=0.0)
    if DY_BN:
        yv = tl.load(z_ptr + a_off, mask=a_mask, other=0.0).to(tl.float32)
        a = dy_on_load(a, yv, c1[:, None], c2[:, None], c3[:, None], mu[:, None], a_mask, DY_RELU)
    return a, n64, p, q, j_ok


@triton.jit
def _conv_wgrad_kernel(
        dy_ptr, x_ptr, out_ptr,
        isc_ptr, ish_ptr,                                      # PROLOGUE: x = relu(x*isc + ish)
        z_ptr, c1_ptr, c2_ptr, c3_ptr, mu_ptr,                 # DY_BN
        sum_ptr,                                               # SUMS: [SPLIT, K] (or [K]) Σ of the dy operand
        H, W, Cg, Kg, P, Q, NPQ, CHUNK, so_sum,
        pad_h, pad_w, dil_h, dil_w,
        sdy_n, sdy_h, sdy_w, sdy_c,
        sx_n, sx_h, sx_w, sx_c,
        so_split, so_k, so_c, so_r, so_s,
        SH: tl.constexpr, SW: tl.constexpr, S: tl.constexpr, TILES_N: tl.constexpr, SPLIT: tl.constexpr,
        PROLOGUE: tl.constexpr, DY_BN: tl.constexpr, DY_RELU: tl.constexpr, SUMS: tl.constexpr,
        DOT_IEEE: tl.constexpr, ALIGNED: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid1 = tl.program_id(1)
    tap = pid1 // TILES_N
    pid_n = pid1 % TILES_N
    pid2 = tl.program_id(2)
    grp = pid2 // SPLIT
    split = pid2 % SPLIT
    r = tap // S
    s = tap % S

    offs_k = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)    # output channels (GEMM M)
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)    # input channels (GEMM N)
    if ALIGNED:  # Kg % BLOCK_M == Cg % BLOCK_N == 0: every channel of the tile exists, no channel masks
        k_ok = tl.full([BLOCK_M], True, tl.int1)
        c_ok = tl.full([BLOCK_N], True, tl.int1)
        k_glob = tl.multiple_of(grp * Kg + pid_m * BLOCK_M, 16) + tl.arange(0, BLOCK_M)
        c_glob = tl.multiple_of(grp * Cg + pid_n * BLOCK_N, 16) + tl.arange(0, BLOCK_N)
    else:
        k_ok = offs_k < Kg
        c_ok = offs_c < Cg
        k_glob = grp * Kg + offs_k
        c_glob = grp * Cg + offs_c
    if PROLOGUE:
        isc = tl.load(isc_ptr + c_glob, mask=c_ok, other=0.0)
        ish = tl.load(ish_ptr + c_glob, mask=c_ok, other=0.0)
    c1 = k_ok  # placeholders, unused without DY_BN
    c2 = k_ok
    c3 = k_ok
    mu = k_ok
    if DY_BN:
        c1 = tl.load(c1_ptr + k_glob, mask=k_ok, other=0.0)
        c2 = tl.load(c2_ptr + k_glob, mask=k_ok, other=0.0)
        c3 = tl.load(c3_ptr + k_glob, mask=k_ok, other=0.0)
        mu = tl.load(mu_ptr + k_glob, mask=k_ok, other=0.0)

    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, NPQ)
    if SUMS:
        # The first (tap, channel tile) column reads its chunk of dy once more, in a loop of its own before the
        # GEMM (stored at once: the MMA loop gets its registers back, and the chunk is warm in L2 for it), and
        # sums the operand as the GEMM sees it: every (k, pixel) exactly once.
        if pid1 == 0:
            dsum = tl.zeros([BLOCK_M], dtype=tl.float32)
            for j0 in range(lo, hi, BLOCK_K):
                a, _, _, _, _ = _dy_tile(dy_ptr, z_ptr, j0, hi, k_glob, k_ok, c1, c2, c3, mu, P, Q,
                                         sdy_n, sdy_h, sdy_w, sdy_c, DY_BN, DY_RELU, ALIGNED, BLOCK_K)
                dsum += tl.sum(a.to(tl.float32), axis=1)
            tl.store(sum_ptr + split * so_sum + k_glob, dsum, mask=k_ok)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for j0 in range(lo, hi, BLOCK_K):
        a, n64, p, q, j_ok = _dy_tile(dy_ptr, z_ptr, j0, hi, k_glob, k_ok, c1, c2, c3, mu, P, Q,
                                      sdy_n, sdy_h, sdy_w, sdy_c, DY_BN, DY_RELU, ALIGNED, BLOCK_K)
        # B = x [BLOCK_K, BLOCK_N] at the tap's input position, zero padding
        h, w, inside = input_coords(p, q, r, s, SH, SW, pad_h, pad_w, dil_h, dil_w, H, W)
        row_ok = j_ok & inside
        b_mask = row_ok[:, None] & c_ok[None, :]
        x_pix = n64 * sx_n + h * sx_h + w * sx_w
        if ALIGNED:
            x_pix = tl.multiple_of(x_pix, 16)
        b = tl.load(x_ptr + x_pix[:, None] + (c_glob * sx_c)[None, :], mask=b_mask, other=0.0)
        if PROLOGUE:  # the mask again after the transform: padding is zero in relu(bn(y)), not relu(shift)
            xb = tl.maximum(b.to(tl.float32) * isc[None, :] + ish[None, :], 0.0)
            b = tl.where(b_mask, xb, 0.0).to(x_ptr.dtype.element_ty)
        if DOT_IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)

    o_off = split * so_split + r * so_r + s * so_s + (k_glob * so_k)[:, None] + (offs_c * so_c)[None, :]
    tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=k_ok[:, None] & c_ok[None, :])


@triton.jit
def _wgrad_combine_kernel(part_ptr, out_ptr, NUMEL, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = Σ_{split=0..SPLIT-1} part[split, i], always in this order (deterministic)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < NUMEL
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(SPLIT):
        acc += tl.load(part_ptr + i * NUMEL + offs, mask=m, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=m)


_COMBINE_BLOCK = 1024


class WgradSwitches(NamedTuple):
    """wgrad's launch switches that enter its tuning key: each combination keeps its own tuned winner (``split``:
    the caller's fixed SPLIT, or None for :func:`pick_split`'s)."""
    prologue: bool
    dy_bn: bool
    dy_relu: bool
    dy_sums: bool
    need_dw: bool
    dot_ieee: bool
    split: int | None


def _validate_wgrad(grad_out, x, weight_shape, stride, padding, dilation, groups, in_scale, in_shift, dy_bn,
                    dy_relu, dy_sums, need_dw, split, out_dtype, who: str) -> tuple:
    """Check :func:`conv2d_wgrad_nhwc`'s arguments (ValueError naming the bad one); returns the
    :class:`ConvGeometry` and ``dy_bn`` as a :class:`DyBN` (or None)."""
    check_operand_dtype("grad_out", grad_out, who)
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{who}: x must be a 4-D [N, C, H, W] tensor, got {type(x).__name__}"
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else ''}")
    if len(tuple(weight_shape)) != 4:
        raise ValueError(f"{who}: weight_shape must be (K, C/groups, R, S), got {weight_shape!r}")
    g = ConvGeometry.make(tuple(x.shape), tuple(int(v) for v in weight_shape), stride, padding, dilation,
                          groups, who)
    g.check_index_range(who)
    dev = grad_out.device
    check_tensor("grad_out", grad_out, (g.N, g.K, g.P, g.Q), None, dev, who)
    check_tensor("x", x, x.shape, grad_out.dtype, dev, who)
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"{who}: out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    if (in_scale is None) != (in_shift is None):
        raise ValueError(f"{who}: in_scale and in_shift go together (both or neither)")
    if in_scale is not None:
        check_vector("in_scale", in_scale, g.C, dev, who)
        check_vector("in_shift", in_shift, g.C, dev, who)
    dy_bn = check_dy_bn(dy_bn, grad_out, g.K, who, dy_relu)
    if not isinstance(dy_sums, bool) or not isinstance(need_dw, bool) or not (need_dw or dy_sums):
        raise ValueError(f"{who}: dy_sums and need_dw must be bools, not both False (got {dy_sums!r}, {need_dw!r})")
    if split is not None and (not isinstance(split, int) or isinstance(split, bool) or split < 1):
        raise ValueError(f"{who}: split must be an int >= 1, got {split!r}")
    return g, dy_bn


def _launch_wgrad(cfg: ConvConfig, g: ConvGeometry, grad_out, x, dw, sums, pro_ops, bn_ops,
                  sw: WgradSwitches) -> None:
    """One launch of :func:`_conv_wgrad_kernel` (and, when split, the combines) with ``cfg``, writing ``dw``
    (unless not ``need_dw``) and ``sums`` (when ``dy_sums``). ``pro_ops`` = (in_scale, in_shift) and ``bn_ops``
    (the :class:`DyBN` fields) are placeholders where their switch is off."""
    npq = g.N * g.P * g.Q
    n_split = sw.split if sw.split is not None else pick_split(g, cfg, first_column_only=not sw.need_dw)
    chunk = triton.cdiv(triton.cdiv(npq, n_split), cfg.BLOCK_K) * cfg.BLOCK_K
    n_split = triton.cdiv(npq, chunk)  # no empty chunks
    out = dw if n_split == 1 else torch.empty((n_split, g.K, g.Cg, g.R, g.S), dtype=torch.float32,
                                              device=dw.device)
    sum_part = sums if n_split == 1 or not sw.dy_sums else torch.empty((n_split, g.K), dtype=torch.float32,
                                                                       device=dw.device)
    tiles_n = triton.cdiv(g.Cg, cfg.BLOCK_N)
    # need_dw=False: only the first (tap, channel tile) column, whose programs form the sums
    grid = (triton.cdiv(g.Kg, cfg.BLOCK_M), g.R * g.S * tiles_n if sw.need_dw else 1, n_split * g.groups)
    _conv_wgrad_kernel[grid](
        grad_out, x, out, *pro_ops, *bn_ops, dw if sum_part is None else sum_part,
        g.H, g.W, g.Cg, g.Kg, g.P, g.Q, npq, chunk, g.K if n_split > 1 else 0,
        g.padding[0], g.padding[1], g.dilation[0], g.dilation[1],
        grad_out.stride(0), grad_out.stride(2), grad_out.stride(3), grad_out.stride(1),
        x.stride(0), x.stride(2), x.stride(3), x.stride(1),
        out.stride(0) if n_split > 1 else 0, *out.stride()[-4:],
        SH=g.stride[0], SW=g.stride[1], S=g.S, TILES_N=tiles_n, SPLIT=n_split,
        PROLOGUE=sw.prologue, DY_BN=sw.dy_bn, DY_RELU=sw.dy_relu, SUMS=sw.dy_sums,
        DOT_IEEE=sw.dot_ieee, ALIGNED=_aligned(g, cfg, grad_out, x),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if n_split > 1:
        for part, res in ((out, dw if sw.need_dw else None), (sum_part, sums)):
            if res is not None:
                _combine(part, res, n_split)


def conv2d_wgrad_nhwc(grad_out: torch.Tensor, x: torch.Tensor, weight_shape, *, stride=1, padding=0, dilation=1,
                      groups: int = 1, in_scale=None, in_shift=None, dy_bn: DyBN | None = None,
                      dy_relu: bool = False, dy_sums: bool = False, need_dw: bool = True,
                      split: int | None = None, out_dtype: torch.dtype = torch.float32,
                      allow_tf32: bool | None = None, config: ConvConfig | None = None):
    """Gradient of a conv w.r.t. its weight (``torch.nn.grad.conv2d_weight``), optionally fused for training.

    Args:
        grad_out: [N, K, P, Q] fp32/fp16/bf16, any strides (channels_last is the fast layout): ``dy``, the
            gradient w.r.t. the conv output; with ``dy_bn``, ``dz``, the gradient w.r.t. this conv's BN output.
        x: [N, C, H, W] conv input of grad_out's dtype, any strides; with the prologue the raw ``y_prev``.
        weight_shape: (K, C/groups, R, S).
        in_scale, in_shift: [C] fp32, both or neither: the operand is ``relu(x*in_scale + in_shift)``.
        dy_bn: a :class:`DyBN` (or 5-tuple): ``dy = c1*dz + c2*(y - mean) + c3`` formed while loading grad_out.
        dy_relu: with dy_bn, mask first: ``dy = c1*(dz where y > 0) + c2*(y - mean) + c3``.
        dy_sums: also return ``Σ_{n,p,q} dy`` per output channel (fp32 [K]) of the dy operand (after dy_bn /
            dy_relu), from the kernel, deterministic.
        need_dw: False (with dy_sums) computes only the sums: dW is not formed and None is returned for it.
        split: SPLIT of the N*P*Q reduction (>= 1; default :func:`pick_split`). Any value gives the same
            result up to fp32 summation order; a given value is bit-reproducible.
        out_dtype: dtype of dW (float32 default: the master-weight gradient under mixed precision).
        allow_tf32: fp32 inputs use TF32 MMAs (default :func:`configs.conv_allows_tf32`, PyTorch's rule).
        config: tile config; default :func:`configs.choose` ("conv_wgrad": pinned, interpreter, autotuned among
            the compile-checked candidates for the shape, each with its :func:`pick_split` unless ``split`` is
            given, or the heuristic default with tuning off).

    Returns:
        dW [K, C/groups, R, S] contiguous, ``out_dtype``; with ``dy_sums`` the pair ``(dW or None, sums)``.
    """
    who = "conv2d_wgrad_nhwc"
    g, dy_bn = _validate_wgrad(grad_out, x, weight_shape, stride, padding, dilation, groups, in_scale, in_shift,
                               dy_bn, dy_relu, dy_sums, need_dw, split, out_dtype, who)
    dev = grad_out.device
    if allow_tf32 is None:
        allow_tf32 = conv_allows_tf32()
    sw = WgradSwitches(prologue=in_scale is not None, dy_bn=dy_bn is not None, dy_relu=dy_relu, dy_sums=dy_sums,
                       need_dw=need_dw, dot_ieee=grad_out.dtype == torch.float32 and not allow_tf32, split=split)
    dw = torch.empty((g.K, g.Cg, g.R, g.S), dtype=out_dtype, device=dev)
    sums = torch.empty((g.K,), dtype=torch.float32, device=dev) if dy_sums else None
    # placeholders (never read) where a switch is off
    pro_ops = (in_scale, in_shift) if sw.prologue else (dw, dw)
    bn_ops = dy_bn if dy_bn is not None else (grad_out, dw, dw, dw, dw)

    def launch(cfg: ConvConfig):
        _launch_wgrad(cfg, g, grad_out, x, dw, sums, pro_ops, bn_ops, sw)

    if config is None:
        cands, default = _candidates(g, grad_out, x)
        config = choose("conv_wgrad", g, grad_out.dtype, dev, cands, sw, launch, default)
    launch(config)
    return (dw if need_dw else None, sums) if dy_sums else dw


def _combine(part: torch.Tensor, res: torch.Tensor, split: int) -> None:
    """res = Σ over the leading SPLIT axis of part, in index order (deterministic)."""
    numel = res.numel()
    _wgrad_combine_kernel[(triton.cdiv(numel, _COMBINE_BLOCK),)](part, res, numel, SPLIT=split,
                                                                 BLOCK=_COMBINE_BLOCK, num_warps=4)


# The constexpr variants the ops launch: plain (no op fuses anything), the training op with a BN+ReLU prologue
# (and BN backward on load), the training op without prologue (dy_bn only), the inference op's backward without
# and with ReLU (sums; dy_bn + dy_relu + sums).
VARIANTS = {
    "plain": {},
    "fused": {"PROLOGUE": True, "DY_BN": True},
    "dy_bn": {"DY_BN": True},
    "sums": {"SUMS": True},
    "dy_bn_relu_sums": {"DY_BN": True, "DY_RELU": True, "SUMS": True},
}


def compile_specs() -> list:
    """(jit_fn, signature, constexprs, options, is_gemm, div16) for the sm_90 compile check, at a stride-2 3×3
    geometry with SPLIT=4: every config × dtype × :data:`VARIANTS` on the ALIGNED path, with the channel counts
    and pixel strides multiples of 16 as Triton's launcher specialises them for ResNet layers; the masked general
    path at the config the launcher gives it (64×32), without divisibility hints (its worst case: the stem's
    C=3, 4-32 channels per group, NCHW strides); the combine kernel."""
    ints = ("H", "W", "Cg", "Kg", "P", "Q", "NPQ", "CHUNK", "so_sum", "pad_h", "pad_w", "dil_h", "dil_w",
            "sdy_n", "sdy_h", "sdy_w", "sx_n", "sx_h", "sx_w", "so_split", "so_k", "so_c", "so_r", "so_s")
    # ResNet layer: Cg, Kg, N*P*Q and the NHWC strides are multiples of 16; CHUNK always is (whole BLOCK_K
    # steps); so_sum = K is; so_c = R*S, so_r = S, H, W, P, Q are not in general.
    div16 = ("Cg", "Kg", "NPQ", "CHUNK", "so_sum", "sdy_n", "sdy_h", "sdy_w", "sx_n", "sx_h", "sx_w", "so_split",
             "so_k")

    def spec(base, dt, tdt, variant, aligned, ieee=False):
        cfg = for_dtype(base, tdt)
        sig = {"dy_ptr": f"*{dt}", "x_ptr": f"*{dt}", "out_ptr": "*fp32", "isc_ptr": "*fp32",
               "ish_ptr": "*fp32", "z_ptr": f"*{dt}", "c1_ptr": "*fp32", "c2_ptr": "*fp32",
               "c3_ptr": "*fp32", "mu_ptr": "*fp32", "sum_ptr": "*fp32"}
        sig.update({name: "i32" for name in ints})
        cx = {"sdy_c": 1, "sx_c": 1, "SH": 2, "SW": 2, "S": 3, "TILES_N": 2, "SPLIT": 4,
              "PROLOGUE": False, "DY_BN": False, "DY_RELU": False, "SUMS": False, **VARIANTS[variant],
              "DOT_IEEE": ieee, "ALIGNED": aligned,
              "BLOCK_M": cfg.BLOCK_M, "BLOCK_N": cfg.BLOCK_N, "BLOCK_K": cfg.BLOCK_K}
        sig.update({k: "constexpr" for k in cx})
        return (_conv_wgrad_kernel, ordered_signature(_conv_wgrad_kernel, sig), cx,
                {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}, not ieee,
                div16 if aligned else ("CHUNK",))

    dtypes = (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32))
    specs = [spec(base, dt, tdt, v, True) for base in WGRAD_CONFIGS for dt, tdt in dtypes for v in VARIANTS]
    specs += [spec(_GENERAL_CONFIG, dt, tdt, v, False) for dt, tdt in dtypes for v in VARIANTS]
    # IEEE fp32 (the default unless TF32 is allowed, configs.conv_allows_tf32): FMA, not wgmma, by design
    specs += [spec(base, "fp32", torch.float32, v, aligned, ieee=True)
              for base, aligned in [(b, True) for b in WGRAD_CONFIGS] + [(_GENERAL_CONFIG, False)]
              for v in VARIANTS]
    specs.append((_wgrad_combine_kernel, {"part_ptr": "*fp32", "out_ptr": "*bf16", "NUMEL": "i32",
                                          "SPLIT": "constexpr", "BLOCK": "constexpr"},
                  {"SPLIT": 4, "BLOCK": _COMBINE_BLOCK}, {"num_warps": 4, "num_stages": 1}, False))
    return specs
