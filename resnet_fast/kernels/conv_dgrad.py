"""Conv input gradient (dgrad) as a Triton implicit GEMM over NHWC tensors, by stride phase.

``dx[n, h, w, c] = Σ_{k, r, s} dy[n, p, q, k] · W[k, c, r, s]`` with ``h = p*stride - pad + r*dil``.

Stride-phase decomposition: the rows of ``dx`` are split into ``stride_h*stride_w`` phases
``(h % stride_h, w % stride_w)``. Within a phase only the taps ``(r, s)`` with
``(phase + pad - r*dil) % stride == 0`` contribute, each with a constant output offset
``p = h // stride + dp``, so every phase is a dense stride-1 conv with a sub-kernel: no MMA work is spent on
masked-out taps (a stride-2 3×3 conv runs 9 taps over 4 phases instead of 9 taps over every row). The
per-phase tap lists come from a tiny host-built table (``[phases, R*S, 3]`` int32: tap, dp, dq), cached per
geometry. Stride 1 is the one-phase case.

GEMM view per (phase, group): M = N*ceil(H/sh)*ceil(W/sw) rows of dx, N = C/groups, reduction over
(valid taps) × K/groups. Accumulation in fp32; storage fp32/fp16/bf16.

Fusions (constexpr switches, default off):

* ``epilogue`` (EPI) "dgrad + dReLU + dBN sums": this conv's input was ``relu(y_prev*in_scale + in_shift)``
  (the previous conv's raw output through its BatchNorm+ReLU). The epilogue recomputes the ReLU mask from
  ``y_prev`` and writes ``dz = dx * (y_prev*in_scale + in_shift > 0)`` instead of ``dx``, plus per-tile
  partials ``Σdz`` and ``Σdz·(y_prev - mean)`` (known mean: no cancellation) into ``[2, T, C]`` fp32 for
  :func:`resnet_fast.kernels.bn_finalize.bn_backward_coeffs`.
* ``dy_bn`` (DY_BN) "BN backward applied on load": ``dy`` is not stored; the kernel reads this conv's raw
  output ``y`` and ``dz`` (the gradient w.r.t. its BN output) and forms ``dy = c1*dz + c2*(y - mean) + c3``
  per element while loading the A operand (coefficients from ``bn_backward_coeffs``).
* ``dy_relu`` (DY_RELU, with ``dy_bn``): ``dz`` is first masked by ``y > 0`` -- the ReLU backward when ``y`` is
  the ReLU's output. The inference op's backward (``ops/conv.py``) passes its output as ``y``, its per-channel
  scale as ``c1`` and ``c2 = c3 = 0``: ``dy = scale[k]*(dz where out > 0)``, never materialised.
  :func:`dy_on_load` is the one implementation of this transform, shared with ``conv_wgrad``.

Alignment (``ALIGNED``, set by the launcher from the runtime shapes, see :func:`_aligned`): unit channel
strides (dy, y, dx, y_prev and a channels_last weight), ``Kg % BLOCK_K == 0``, ``Cg % BLOCK_N == 0`` and every
pixel (and weight tap) stride a multiple of 16 elements -- every ResNet layer with channels_last tensors. The
kernel then drops the channel masks and asserts 16-element alignment of every row start (``tl.multiple_of``):
the dy, y and weight tiles load as 16-byte vectors through cp.async and the loop is software-pipelined.
Otherwise the masked general path runs, at the 64×32 config only (see :data:`DGRAD_CONFIGS`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _backend
from .configs import ConvConfig, checked_candidates, choose, conv_allows_tf32, for_dtype
from .checks import check_tensor, check_vector
from .conv_common import ConvGeometry

__all__ = ["conv2d_dgrad_nhwc", "compile_specs", "dy_on_load", "DGRAD_CONFIGS"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TL = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# Every config the launcher may pick (autotuned among those that fit the shape); compile_specs covers each of
# them (ALIGNED, every variant and dtype; the masked general path at the last, 64x32 config only).
# (BLOCK_M rows of dx, BLOCK_N input channels, BLOCK_K output channels per MMA step; GROUP_M unused).
# The first is the untuned default. 128-row tiles need 8 warps (at 4 ptxas spills on sm_90); the aligned fused
# 128x128 tile needs ~241 registers, no spills. The masked general path of the wider tiles reaches 255
# registers when fused (one load and one 64-bit address per element), so unaligned shapes take 64x32.
DGRAD_CONFIGS = (ConvConfig(128, 64, 32, 8, 8, 3), ConvConfig(128, 128, 32, 8, 8, 3),
                 ConvConfig(64, 64, 32, 8, 4, 3), ConvConfig(64, 32, 32, 8, 4, 3))
_GENERAL_CONFIG = DGRAD_CONFIGS[-1]  # the one config whose masked general path is compile-checked


def _rows_aligned(t: torch.Tensor) -> bool:
    """``t`` [A, B, C, D] has unit stride along dim 1 and strides that are multiples of 16 elements along
    dims 0, 2, 3 (size-1 dims excepted: their index is always 0), so each (a, c, d) row starts 16-aligned."""
    return t.stride(1) == 1 and all(t.stride(d) % 16 == 0 for d in (0, 2, 3) if t.shape[d] > 1)


def _aligned(g: ConvGeometry, cfg: ConvConfig, dy: torch.Tensor, weight: torch.Tensor, others=()) -> bool:
    """The kernel's ALIGNED switch: channel tiles divide the channels (Kg % BLOCK_K, Cg % BLOCK_N), and dy,
    the weight (channels_last) and ``others`` (dx, y_prev) have unit channel strides and 16-aligned rows."""
    return (g.Kg % cfg.BLOCK_K == 0 and g.Cg % cfg.BLOCK_N == 0
            and all(_rows_aligned(t) for t in (dy, weight, *others)))


def _candidates(g: ConvGeometry, dy: torch.Tensor, weight: torch.Tensor, others, ieee: bool) -> tuple:
    """(candidates for ``dy``'s dtype, the untuned default): the configs whose path for this shape (ALIGNED or
    the masked general one) is compile-checked. IEEE fp32 is FMA, where the larger tiles' fused variants spill
    on sm_90, and C/groups <= 32 gains nothing from wider channel tiles: both take the general config."""
    general = for_dtype(_GENERAL_CONFIG, dy.dtype)
    if g.Cg <= 32 or ieee:
        return (general,), general
    # GEMM: dx rows × input channels, reducing over output channels
    cands = checked_candidates(DGRAD_CONFIGS, general, dy.dtype, lambda c: _aligned(g, c, dy, weight, others),
                               g.N * g.H * g.W // (g.stride[0] * g.stride[1]), g.Cg, g.Kg)
    return tuple(cands), cands[0]


@triton.jit
def dy_on_load(dz, y, c1, c2, c3, mu, mask, DY_RELU: tl.constexpr):
    """The ``dy_bn`` transform of a loaded gradient tile ``dz``: ``c1*dz' + c2*(y - mu) + c3`` in fp32, where
    ``dz' = dz where y > 0, else 0`` under DY_RELU and ``dz`` otherwise; zero where ``mask`` is False (``c3`` must
    not leak into padding or tile tails); returned in dz's dtype (the MMA operand). ``y`` is the fp32 tile of
    the dy_bn tensor; the [K] vectors come broadcast along the tile's channel axis (dgrad's tile is pixels ×
    channels, wgrad's channels × pixels). Used by both backward kernels, so they agree bit for bit."""
    d = dz.to(tl.float32)
    if DY_RELU:
        d = tl.where(y > 0, d, 0.0)
    d = c1 * d + c2 * (y - mu) + c3
    return tl.where(mask, d, 0.0).to(dz.dtype)


@triton.jit
def _conv_dgrad_kernel(
        dy_ptr, w_ptr, dx_ptr, taps_ptr, ntaps_ptr,
        y_ptr, isc_ptr, ish_ptr, imu_ptr, part_ptr, osc_ptr,   # EPI: y_prev, BN scale/shift/mean, partials, out scale
        z_ptr, c1_ptr, c2_ptr, c3_ptr, mu_ptr,                 # DY_BN: this conv's raw output y and coefficients
        N, H, W, Cg, Kg, P, Q, HPH, WPH, TILES_M, T_PART, C_TOT,
        sdy_n, sdy_h, sdy_w, sdy_c,
        sw_k, sw_c, sw_r, sw_s,
        sdx_n, sdx_h, sdx_w, sdx_c,
        sy_n, sy_h, sy_w, sy_c,
        SH: tl.constexpr, SW: tl.constexpr, S: tl.constexpr, MAX_TAPS: tl.constexpr,
        EPI: tl.constexpr, OUT_SCALE: tl.constexpr, DY_BN: tl.constexpr, DY_RELU: tl.constexpr,
        DOT_IEEE: tl.constexpr, ALIGNED: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid0 = tl.program_id(0)
    phase = pid0 // TILES_M
    pid_m = pid0 % TILES_M
    pid_n = tl.program_id(1)
    grp = tl.program_id(2)
    ph_h = phase // SW
    ph_w = phase % SW

    # rows of this phase: (n, ih, iw) -> dx row (n, ph_h + ih*SH, ph_w + iw*SW)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    iw = offs_m % WPH
    ih = (offs_m // WPH) % HPH
    n = offs_m // (WPH * HPH)
    h = ph_h + ih * SH
    w = ph_w + iw * SW
    row_ok = (n < N) & (h < H) & (w < W)
    n64 = n.to(tl.int64)

    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_kk = tl.arange(0, BLOCK_K)
    if ALIGNED:  # Kg % BLOCK_K == Cg % BLOCK_N == 0: no channel masks, 16-aligned channel bases
        c_ok = tl.full([BLOCK_N], True, tl.int1)
        k_base = tl.multiple_of(grp * Kg, 16)
        c_glob = tl.multiple_of(grp * Cg + pid_n * BLOCK_N, 16) + tl.arange(0, BLOCK_N)
    else:
        c_ok = offs_c < Cg
        k_base = grp * Kg
        c_glob = grp * Cg + offs_c

    ntaps = tl.load(ntaps_ptr + phase)
    k_iters = tl.cdiv(Kg, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for it in range(0, ntaps * k_iters):
        t = it // k_iters
        k0 = (it % k_iters) * BLOCK_K
        tap_ptr = taps_ptr + (phase * MAX_TAPS + t) * 3
        tap = tl.load(tap_ptr)
        p = ih + tl.load(tap_ptr + 1)
        q = iw + tl.load(tap_ptr + 2)
        a_row_ok = row_ok & (p >= 0) & (p < P) & (q >= 0) & (q < Q)
        dy_row = n64 * sdy_n + p * sdy_h + q * sdy_w
        if ALIGNED:  # every pixel's channel vector starts 16-element aligned; every k of the block exists
            dy_row = tl.multiple_of(dy_row, 16)
            offs_k = tl.multiple_of(k0, 16) + offs_kk
            k_ok = tl.full([BLOCK_K], True, tl.int1)
        else:
            offs_k = k0 + offs_kk
            k_ok = offs_k < Kg
        a_mask = a_row_ok[:, None] & k_ok[None, :]
        a_off = dy_row[:, None] + ((k_base + offs_k) * sdy_c)[None, :]
        a = tl.load(dy_ptr + a_off, mask=a_mask, other=0.0)
        if DY_BN:  # dy = c1*dz' + c2*(y - mean) + c3 (dz' = dz, or dz where y > 0), zero outside the image
            yv = tl.load(z_ptr + a_off, mask=a_mask, other=0.0).to(tl.float32)
            kk = k_base + offs_k
            c1 = tl.load(c1_ptr + kk, mask=k_ok, other=0.0)
            c2 = tl.load(c2_ptr + kk, mask=k_ok, other=0.0)
            c3 = tl.load(c3_ptr + kk, mask=k_ok, other=0.0)
            mu = tl.load(mu_ptr + kk, mask=k_ok, other=0.0)
            a = dy_on_load(a, yv, c1[None, :], c2[None, :], c3[None, :], mu[None, :], a_mask, DY_RELU)
        r = tap // S
        s = tap % S
        w_row = (k_base + offs_k) * sw_k + r * sw_r + s * sw_s
        if ALIGNED:
            w_row = tl.multiple_of(w_row, 16)
        b_off = w_row[:, None] + (offs_c * sw_c)[None, :]
        b = tl.load(w_ptr + b_off, mask=k_ok[:, None] & c_ok[None, :], other=0.0)
        if DOT_IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)

    out_mask = row_ok[:, None] & c_ok[None, :]
    if EPI:  # dz = dx * relu'(y_prev*scale + shift); partial Σdz, Σdz·(y_prev - mean) per tile
        y_row = n64 * sy_n + h * sy_h + w * sy_w
        if ALIGNED:
            y_row = tl.multiple_of(y_row, 16)
        y_off = y_row[:, None] + (c_glob * sy_c)[None, :]
        yp = tl.load(y_ptr + y_off, mask=out_mask, other=0.0).to(tl.float32)
        isc = tl.load(isc_ptr + c_glob, mask=c_ok, other=0.0)
        ish = tl.load(ish_ptr + c_glob, mask=c_ok, other=0.0)
        imu = tl.load(imu_ptr + c_glob, mask=c_ok, other=0.0)
        live = (yp * isc[None, :] + ish[None, :] > 0) & out_mask
        acc = tl.where(live, acc, 0.0)
        tl.store(part_ptr + pid0 * C_TOT + c_glob, tl.sum(acc, axis=0), mask=c_ok)
        tl.store(part_ptr + (T_PART + pid0) * C_TOT + c_glob,
                 tl.sum(acc * (yp - imu[None, :]), axis=0), mask=c_ok)
        if OUT_SCALE:  # store dz*out_scale[c] (the BN's input gradient); the partials stay sums of dz
            acc = acc * tl.load(osc_ptr + c_glob, mask=c_ok, other=0.0)[None, :]
    dx_row = n64 * sdx_n + h * sdx_h + w * sdx_w
    if ALIGNED:
        dx_row = tl.multiple_of(dx_row, 16)
    dx_off = dx_row[:, None] + (c_glob * sdx_c)[None, :]
    tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty), mask=out_mask)


_TAPS: dict = {}


def _tap_tables(g: ConvGeometry, device: torch.device):
    """Per stride phase, the contributing taps: ``taps [phases, R*S, 3]`` (r*S+s, dp, dq), ``ntaps [phases]``."""
    key = (g.R, g.S, g.stride, g.padding, g.dilation, str(device))
    if key not in _TAPS:
        sh, sw = g.stride
        rows, counts = [], []
        for ph in range(sh):
            for pw in range(sw):
                lst = []
                for r in range(g.R):
                    th = ph + g.padding[0] - r * g.dilation[0]
                    if th % sh:
                        continue
                    for s in range(g.S):
                        tw = pw + g.padding[1] - s * g.dilation[1]
                        if tw % sw == 0:
                            lst.append((r * g.S + s, th // sh, tw // sw))
                counts.append(len(lst))
                rows.append(lst + [(0, 0, 0)] * (g.R * g.S - len(lst)))
        _TAPS[key] = (torch.tensor(rows, dtype=torch.int32, device=device).contiguous(),
                      torch.tensor(counts, dtype=torch.int32, device=device))
    return _TAPS[key]


def _check_dtype(dy, who):
    """dy (and so every operand) fp32/fp16/bf16; bf16 is refused in the Triton interpreter, whose bf16
    ``tl.dot`` is wrong (an error, not garbage: the ops fall back to eager for bf16 there, counted)."""
    if not isinstance(dy, torch.Tensor) or dy.dim() != 4 or dy.dtype not in _DTYPES:
        raise ValueError(f"{who}: dy must be a 4-D float32/float16/bfloat16 tensor, got "
                         f"{tuple(dy.shape) if isinstance(dy, torch.Tensor) else type(dy).__name__}")
    if dy.dtype == torch.bfloat16 and _backend.interpreting():
        raise RuntimeError(f"{who}: bf16 tl.dot returns wrong results in the Triton interpreter; use fp16/fp32 "
                           "on CPU")


def _check_dy_bn(dy_bn, dy, K, who, dy_relu=False):
    """The dy-on-load options shared by dgrad and wgrad: ``dy_bn = (y, c1, c2, c3, mean)`` with y like dy
    (shape, dtype, strides) and the rest fp32 [K] vectors, or None; ``dy_relu`` (a bool) needs dy_bn's y."""
    if not isinstance(dy_relu, bool):
        raise ValueError(f"{who}: dy_relu must be a bool, got {dy_relu!r}")
    if dy_bn is None:
        if dy_relu:
            raise ValueError(f"{who}: dy_relu masks dz by dy_bn's y > 0: it needs dy_bn")
        return
    if not isinstance(dy_bn, (tuple, list)) or len(dy_bn) != 5:
        raise ValueError(f"{who}: dy_bn must be a tuple (y, c1, c2, c3, mean)")
    check_tensor("dy_bn[0] (y)", dy_bn[0], dy.shape, dy.dtype, dy.device, who)
    if dy_bn[0].stride() != dy.stride():
        raise ValueError(f"{who}: dy_bn[0] (y) must have dy's strides {dy.stride()}, got {dy_bn[0].stride()}")
    for i, name in enumerate(("c1", "c2", "c3", "mean"), 1):
        check_vector(f"dy_bn[{i}] ({name})", dy_bn[i], K, dy.device, who)


def conv2d_dgrad_nhwc(dy: torch.Tensor, weight: torch.Tensor, x_shape, *, stride=1, padding=0, dilation=1,
                      groups: int = 1, y_prev: torch.Tensor | None = None, in_scale=None, in_shift=None,
                      in_mean=None, out_scale=None, dy_bn: tuple | None = None, dy_relu: bool = False,
                      allow_tf32: bool | None = None,
                      config: ConvConfig | None = None):
    """Gradient of a conv w.r.t. its input (``torch.nn.grad.conv2d_input``), optionally fused for training.

    Args:
        dy: [N, K, P, Q] gradient w.r.t. the conv output, fp32/fp16/bf16, any strides (channels_last is the
            fast layout). With ``dy_bn`` it is instead ``dz``, the gradient w.r.t. this conv's BN output.
        weight: [K, C/groups, R, S] of dy's dtype, any strides (channels_last weights load contiguously).
        x_shape: (N, C, H, W) of the conv input.
        stride, padding, dilation, groups: as ``torch.nn.functional.conv2d`` (zero padding).
        y_prev, in_scale, in_shift, in_mean: the epilogue fusion (all or none): the conv input was
            ``relu(y_prev*in_scale + in_shift)``; y_prev [N, C, H, W] of dy's dtype, the others [C] fp32
            (in_mean is the batch mean of y_prev). The output is then ``dz`` = the gradient w.r.t. the BN
            output before the ReLU, and per-tile partials are returned too.
        out_scale: with the epilogue, an fp32 [C] vector: the stored output is ``dz*out_scale[c]`` (pass the BN's
            ``in_scale`` to get the gradient w.r.t. ``y_prev``); the partials are still sums of ``dz``.
        dy_bn: (y, c1, c2, c3, mean): form ``dy = c1*dz + c2*(y - mean) + c3`` while loading; y [N, K, P, Q]
            with dy's dtype and strides (this conv's raw output), the rest [K] fp32.
        dy_relu: with dy_bn, mask first: ``dy = c1*(dz where y > 0) + c2*(y - mean) + c3`` (y a ReLU's output).
        allow_tf32: fp32 inputs use TF32 MMAs (default :func:`configs.conv_allows_tf32`, PyTorch's rule).
        config: tile config; default :func:`configs.choose` ("conv_dgrad": pinned, interpreter, autotuned among
            the compile-checked candidates for the shape, or the first of them with tuning off).

    Returns:
        dx [N, C, H, W] in dy's dtype, channels_last; with the epilogue ``(dz, partials)`` where
        ``partials`` is [2, T, C] fp32: ``partials[0]`` = Σdz and ``partials[1]`` = Σdz·(y_prev - in_mean)
        per tile, ready for ``bn_backward_coeffs(partials[0], partials[1], ...)``.
    """
    who = "conv2d_dgrad_nhwc"
    _check_dtype(dy, who)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError(f"{who}: weight must be a 4-D [K, C/groups, R, S] tensor")
    if len(tuple(x_shape)) != 4:
        raise ValueError(f"{who}: x_shape must be (N, C, H, W), got {x_shape!r}")
    g = ConvGeometry.make(tuple(int(v) for v in x_shape), tuple(weight.shape), stride, padding, dilation,
                          groups, who)
    g.check_index_range(who)
    dev = dy.device
    check_tensor("dy", dy, (g.N, g.K, g.P, g.Q), None, dev, who)
    check_tensor("weight", weight, weight.shape, dy.dtype, dev, who)
    epi_args = (y_prev, in_scale, in_shift, in_mean)
    epi = y_prev is not None
    if any(a is None for a in epi_args) and any(a is not None for a in epi_args):
        raise ValueError(f"{who}: y_prev, in_scale, in_shift and in_mean go together (all or none)")
    if out_scale is not None and not epi:
        raise ValueError(f"{who}: out_scale needs the epilogue (y_prev, in_scale, in_shift, in_mean)")
    if epi:
        check_tensor("y_prev", y_prev, (g.N, g.C, g.H, g.W), dy.dtype, dev, who)
        for name, v in (("in_scale", in_scale), ("in_shift", in_shift), ("in_mean", in_mean)):
            check_vector(name, v, g.C, dev, who)
        if out_scale is not None:
            check_vector("out_scale", out_scale, g.C, dev, who)
    _check_dy_bn(dy_bn, dy, g.K, who, dy_relu)
    dx = torch.empty((g.N, g.C, g.H, g.W), dtype=dy.dtype, device=dev, memory_format=torch.channels_last)
    yp = y_prev if epi else dx
    if allow_tf32 is None:
        allow_tf32 = conv_allows_tf32()
    ieee = dy.dtype == torch.float32 and not allow_tf32
    sh, sw = g.stride
    hph, wph = triton.cdiv(g.H, sh), triton.cdiv(g.W, sw)
    phases = sh * sw
    cg, kg = g.Cg, g.Kg
    taps, ntaps = _tap_tables(g, dev)
    zb = dy_bn if dy_bn is not None else (dy, taps, taps, taps, taps)  # placeholders, never read
    v = (in_scale, in_shift, in_mean) if epi else (taps, taps, taps)
    parts: dict = {}  # per tile count, so tuning launches reuse one buffer

    def launch(cfg: ConvConfig):
        tiles_m = triton.cdiv(g.N * hph * wph, cfg.BLOCK_M)
        T = phases * tiles_m
        part = dx
        if epi:
            part = parts.get(T)
            if part is None:
                part = parts[T] = torch.empty((2, T, g.C), dtype=torch.float32, device=dev)
        grid = (T, triton.cdiv(cg, cfg.BLOCK_N), g.groups)
        _conv_dgrad_kernel[grid](
            dy, weight, dx, taps, ntaps, yp, *v, part, taps if out_scale is None else out_scale, *zb,
            g.N, g.H, g.W, cg, kg, g.P, g.Q, hph, wph, tiles_m, T, g.C,
            dy.stride(0), dy.stride(2), dy.stride(3), dy.stride(1),
            weight.stride(0), weight.stride(1), weight.stride(2), weight.stride(3),
            dx.stride(0), dx.stride(2), dx.stride(3), dx.stride(1),
            yp.stride(0), yp.stride(2), yp.stride(3), yp.stride(1),
            SH=sh, SW=sw, S=g.S, MAX_TAPS=g.R * g.S, EPI=epi, OUT_SCALE=out_scale is not None,
            DY_BN=dy_bn is not None, DY_RELU=dy_relu,
            DOT_IEEE=ieee, ALIGNED=_aligned(g, cfg, dy, weight, (dx, yp)),
            BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return part

    if config is None:
        cands, default = _candidates(g, dy, weight, (dx, yp), ieee)
        flags = (epi, out_scale is not None, dy_bn is not None, bool(dy_relu), ieee)
        config = choose("conv_dgrad", g, dy.dtype, dev, cands, flags, launch, default)
    part = launch(config)
    return (dx, part) if epi else dx


def _ordered(fn, sig: dict) -> dict:
    """The signature in the kernel's argument order (what ASTSource expects)."""
    return {name: sig[name] for name in fn.arg_names}


# The constexpr variants the ops launch: plain (no op fuses anything), the training op with a BN+ReLU prologue
# (dReLU/dBN epilogue, out_scale, BN backward on load), the training op without prologue and the inference op
# without ReLU (dy_bn only), the inference op with ReLU (dy_bn + dy_relu).
VARIANTS = {
    "plain": {},
    "fused": {"EPI": True, "OUT_SCALE": True, "DY_BN": True},
    "dy_bn": {"DY_BN": True},
    "dy_bn_relu": {"DY_BN": True, "DY_RELU": True},
}


def compile_specs() -> list:
    """(jit_fn, signature, constexprs, options, is_gemm, div16) for the sm_90 compile check, at a stride-2 3×3
    geometry (the strides and the filter width are constexpr): every config × dtype × :data:`VARIANTS` on the
    ALIGNED path, with the channel counts and the NHWC / channels_last-weight strides multiples of 16 as
    Triton's launcher specialises them for ResNet layers; the masked general path at the config the launcher
    gives it (64×32), without divisibility hints (its worst case: 4-32 channels per group, NCHW)."""
    ints = ("N", "H", "W", "Cg", "Kg", "P", "Q", "HPH", "WPH", "TILES_M", "T_PART", "C_TOT",
            "sdy_n", "sdy_h", "sdy_w", "sw_k", "sw_r", "sw_s", "sdx_n", "sdx_h", "sdx_w", "sy_n", "sy_h", "sy_w")
    # ResNet layer: channel counts (Cg, Kg, C_TOT = C) and every stride are multiples of 16 (the weight's
    # sw_s = Cg, sw_r = S*Cg, sw_k = R*S*Cg too); sizes and tile counts are not in general.
    div16 = ("Cg", "Kg", "C_TOT", "sdy_n", "sdy_h", "sdy_w", "sw_k", "sw_r", "sw_s", "sdx_n", "sdx_h", "sdx_w",
             "sy_n", "sy_h", "sy_w")

    def spec(base, dt, tdt, variant, aligned, ieee=False):
        cfg = for_dtype(base, tdt)
        sig = {"dy_ptr": f"*{dt}", "w_ptr": f"*{dt}", "dx_ptr": f"*{dt}", "taps_ptr": "*i32",
               "ntaps_ptr": "*i32", "y_ptr": f"*{dt}", "isc_ptr": "*fp32", "ish_ptr": "*fp32",
               "imu_ptr": "*fp32", "part_ptr": "*fp32", "osc_ptr": "*fp32", "z_ptr": f"*{dt}", "c1_ptr": "*fp32",
               "c2_ptr": "*fp32", "c3_ptr": "*fp32", "mu_ptr": "*fp32"}
        sig.update({name: "i32" for name in ints})
        # unit channel strides, as specialised
        cx = {"sdy_c": 1, "sw_c": 1, "sdx_c": 1, "sy_c": 1, "SH": 2, "SW": 2, "S": 3, "MAX_TAPS": 9,
              "EPI": False, "OUT_SCALE": False, "DY_BN": False, "DY_RELU": False, **VARIANTS[variant],
              "DOT_IEEE": ieee, "ALIGNED": aligned,
              "BLOCK_M": cfg.BLOCK_M, "BLOCK_N": cfg.BLOCK_N, "BLOCK_K": cfg.BLOCK_K}
        sig.update({k: "constexpr" for k in cx})
        return (_conv_dgrad_kernel, _ordered(_conv_dgrad_kernel, sig), cx,
                {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}, not ieee, div16 if aligned else ())

    dtypes = (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32))
    specs = [spec(base, dt, tdt, v, True) for base in DGRAD_CONFIGS for dt, tdt in dtypes for v in VARIANTS]
    specs += [spec(_GENERAL_CONFIG, dt, tdt, v, False) for dt, tdt in dtypes for v in VARIANTS]
    # IEEE fp32 (the default unless TF32 is allowed, configs.conv_allows_tf32): FMA, not wgmma, by design
    specs += [spec(_GENERAL_CONFIG, "fp32", torch.float32, v, aligned, ieee=True)
              for aligned in (True, False) for v in VARIANTS]
    return specs
