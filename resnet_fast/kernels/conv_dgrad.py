"""Conv input gradient (dgrad) as a Triton implicit GEMM over NHWC tensors, by stride phase.

``dx[n, h, w, c] = Σ_{k, r, s} dy[n, p, q, k] · W[k, c, r, s]`` with ``h = p*stride - pad + r*dil``.

Stride-phase decomposition: the rows of ``dx`` are split into ``stride_h*stride_w`` phases
``(h % stride_h, w % stride_w)``. Within a phase only the taps ``(r, s)`` with
``(phase + pad - r*dil) % stride == 0`` contribute, each with a constant output offset
``p = h // stride + dp``, so every phase is a dense stride-1 conv with a sub-kernel: no MMA work is spent on
masked-out taps (a stride-2 3×3 conv runs 9 taps over 4 phases instead of 9 taps over every row). A phase's
taps are in closed form (:func:`_phase_taps`: ``r = r0 + i*stride/gcd(dil, stride)``), found once per program;
the K-loop runs over (tap, K block) with the K block fastest and advances the tap, its output offset and its
weight offset incrementally (scalars only: no table, no division per step). Stride 1 is the one-phase case.

Tile order: grid axis 0 enumerates (phase, row tile, channel tile), grouped (:func:`.conv_common.swizzle_pid`,
``GROUP_M``) so a group of row tiles sweeps the channel tiles together and their ``dy`` rows, re-read once per
channel tile, are still in L2.

GEMM view per (phase, group): M = N*ceil(H/sh)*ceil(W/sw) rows of dx, N = C/groups, reduction over
(valid taps) × K/groups. Layouts: ``grad_out [N, K, P, Q]`` and ``weight [K, C/groups, R, S]`` with any strides
(channels_last is the fast layout), ``dx [N, C, H, W]`` channels_last; all one dtype, fp32/fp16/bf16;
accumulation in fp32 (fp32 operands as IEEE or TF32, :func:`configs.conv_allows_tf32`).

Fusions (constexpr switches, default off):

* ``y_prev, in_scale, in_shift, in_centre`` (EPI) "dgrad + dReLU + dBN sums": this conv's input was
  ``relu(y_prev*in_scale + in_shift)`` (the previous conv's raw output through its BatchNorm+ReLU). The epilogue
  recomputes the ReLU mask from ``y_prev`` and writes ``dz = dx * (y_prev*in_scale + in_shift > 0)`` instead of
  ``dx``, plus per-tile partials ``Σdz`` and ``Σdz·(y_prev - in_centre)`` (a known centre, the batch mean for
  BN: no cancellation) into ``[2, T, C]`` fp32 for :func:`resnet_fast.kernels.bn_finalize.bn_backward_coeffs`.
  ``out_scale`` (OUT_SCALE) stores ``dz*out_scale[c]`` instead; the partials stay sums of ``dz``.
* ``dy_bn`` (DY_BN) "BN backward applied on load": ``dy`` is not stored; ``grad_out`` is ``dz`` (the gradient
  w.r.t. this conv's BN output) and the kernel reads this conv's raw output ``y`` too, forming
  ``dy = c1*dz + c2*(y - mean) + c3`` per element while loading the A operand (a :class:`.conv_common.DyBN`,
  coefficients from ``bn_backward_coeffs``).
  :func:`.conv_common.dy_on_load` is the one implementation of this transform, shared with ``conv_wgrad``.
* ``relu_out`` (DY_RELU, not with ``dy_bn``): ``dy = grad_out where relu_out > 0`` -- the ReLU backward, with
  ``relu_out`` the ReLU's output, masked on load (one packed bf16/fp16 compare and a select per pair: no fp32
  round trip). The inference op's backward (``ops/conv.py``) passes its output and folds its per-channel scale
  into the weight, so its dgrad K-loop transforms nothing else.

Alignment (``ALIGNED``, set by the launcher from the runtime shapes, see :func:`_aligned`): unit channel
strides (grad_out, y, dx, y_prev and a channels_last weight), ``Kg % BLOCK_K == 0``, ``Cg % BLOCK_N == 0`` and every
pixel (and weight tap) stride a multiple of 16 elements -- every ResNet layer with channels_last tensors. The
kernel then drops the channel masks and asserts 16-element alignment of every row start (``tl.multiple_of``):
the dy, y and weight tiles load as 16-byte vectors through cp.async and the loop is software-pipelined
(2 tiles in flight at ``num_stages=3``), with the operand pointers built once and moved by one scalar per step.
``EPI_ALIGNED`` is the same for the epilogue (dx, y_prev, the [C] vectors): equal to ALIGNED except on the
narrow-channel path (C/groups < 16, the stem; :data:`NARROW_CONFIG`), where the weight is repacked into 16
zero-padded channels so the K-loop is ALIGNED while the epilogue masks the channels. Otherwise the masked
general path runs, at the 64×32 config only (see :data:`DGRAD_CONFIGS`).

Known costs (sm_90 SASS, :mod:`.cost_report`): with ``dy_bn`` every step transforms its A tile element by element
(about 6 instructions per element, then a shared-memory round trip into the register-A wgmma layout), so the
issue-to-MMA ratio falls with BLOCK_N only (1.07 at 128×256, 2.1 at 128×128, 4.2 at 128×64); the four [BLOCK_K]
coefficient vectors load as 4-byte cp.async each step (fewer elements than threads).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .autotune import choose
from . import conv_dgrad_box as _box
from .conv_dgrad_box import wide_ok
from .configs import ConvConfig, checked_candidates, conv_allows_tf32, for_dtype, for_ieee, tma_allowed
from .dgrad_epilogue import epilogue
from .checks import check, check_like, check_operand_dtype, check_tensor, check_vector
from .conv_common import (ConvGeometry, DyBN, as_rows, check_dy_bn, dy_on_load, flat_rows, ordered_signature,
                          pixel_block, rows_aligned, swizzle_pid, tap_steps)

__all__ = ["conv2d_dgrad_nhwc", "compile_specs", "dy_on_load", "DGRAD_CONFIGS", "DgradSwitches"]

_TL = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# Every config the launcher may pick (autotuned among those that fit the shape); compile_specs covers each of
# them (ALIGNED, every variant and dtype; the masked general path at the last, 64x32 config only).
# (BLOCK_M rows of dx, BLOCK_N input channels, BLOCK_K output channels per MMA step; GROUP_M unused).
# The first allowed one that fits the shape is the untuned default. With dy_bn every step transforms its A tile
# element by element, so the sm_90 issue-to-MMA ratio falls with BLOCK_N (the transform is amortised over it)
# and with the MMA per step (the rest of the loop): dy_bn 1.07 at 128x256x32 w8, 1.79 at 64x128x64 w4, 3.56 at
# 64x64x64 w4 (2.10 at 128x128x32, 4.17 at 128x64x32); with the dReLU/dBN epilogue 1.20 at 64x256x64 w8 (128x256
# spills there). 128-row tiles need 8 warps (at 4 ptxas spills on sm_90). The 256-wide tiles need 223-250
# registers with 16-bit operands and spill with tf32 (:func:`.conv_dgrad_box.wide_ok`). The masked general path
# of the wider tiles reaches 255 registers when fused (one load and one 64-bit address per element), so unaligned shapes
# take 64x32.
DGRAD_CONFIGS = (ConvConfig(128, 256, 32, 8, 8, 3), ConvConfig(64, 256, 64, 8, 8, 3),
                 ConvConfig(64, 128, 64, 8, 4, 3), ConvConfig(128, 128, 32, 8, 8, 3),
                 ConvConfig(64, 64, 64, 8, 4, 3), ConvConfig(128, 64, 32, 8, 8, 3), ConvConfig(64, 32, 32, 8, 4, 3))
_GENERAL_CONFIG = DGRAD_CONFIGS[-1]  # the one config whose masked general path is compile-checked
# The narrow-channel path (C/groups < 16, the stem's C = 3) when dy is aligned: the weight is repacked once per
# call into [K, R, S, 16] zero-padded channels (:func:`_pack_narrow_weight`, as the forward packs its weights),
# so the K-loop is the ALIGNED one (16-byte cp.async for dy, y and the weight, pipelined) and only the epilogue
# masks the channels (EPI_ALIGNED off). BLOCK_K 64: the stem's K = 64 output channels are one step per tap.
NARROW_CONFIG = ConvConfig(128, 16, 64, 8, 4, 3)


def _narrow(g: ConvGeometry, cfg: ConvConfig, dy: torch.Tensor) -> bool:
    """``cfg`` is :data:`NARROW_CONFIG` and the shape takes its path: C/groups < 16, K/groups a multiple of
    BLOCK_K and dy (so the dy_bn y, of dy's strides) with unit channel stride and 16-aligned rows."""
    return (cfg == for_dtype(NARROW_CONFIG, dy.dtype) and g.Cg < NARROW_CONFIG.BLOCK_N
            and g.Kg % cfg.BLOCK_K == 0 and rows_aligned(dy))


def _aligned(g: ConvGeometry, cfg: ConvConfig, dy: torch.Tensor, weight: torch.Tensor, others=()) -> bool:
    """The kernel's ALIGNED switch (the K-loop's): channel tiles divide the channels (Kg % BLOCK_K,
    Cg % BLOCK_N), and dy, the weight (channels_last) and ``others`` (dx, y_prev) have unit channel strides and
    16-aligned rows; or the narrow path (:func:`_narrow`, whose repacked weight is aligned)."""
    return _narrow(g, cfg, dy) or (g.Kg % cfg.BLOCK_K == 0 and g.Cg % cfg.BLOCK_N == 0
                                   and all(rows_aligned(t) for t in (dy, weight, *others)))


def _epi_aligned(g: ConvGeometry, cfg: ConvConfig, dy: torch.Tensor, weight: torch.Tensor, others=()) -> bool:
    """The kernel's EPI_ALIGNED switch (unmasked, 16-aligned channels in the epilogue): ALIGNED, and not the
    narrow path; so the two differ only there."""
    return _aligned(g, cfg, dy, weight, others) and not _narrow(g, cfg, dy)


def _pack_narrow_weight(weight: torch.Tensor, g: ConvGeometry) -> torch.Tensor:
    """[K, Cg, R, S] -> a [K, 16, R, S] view of a zero-padded [K, R, S, 16] tensor (the narrow path's B operand:
    every tap's row of channels 16 elements, 16-aligned)."""
    wp = weight.new_zeros((g.K, g.R, g.S, NARROW_CONFIG.BLOCK_N))
    wp[..., :g.Cg] = weight.permute(0, 2, 3, 1)
    return wp.permute(0, 3, 1, 2)


def _candidates(g: ConvGeometry, dy: torch.Tensor, weight: torch.Tensor, others, ieee: bool,
                epilogue: bool = False, tma: bool | None = None) -> tuple:
    """(candidates for ``dy``'s dtype, the untuned default): the configs whose path for this shape (ALIGNED or
    the masked general one) is compile-checked (:func:`.conv_dgrad_box.wide_ok` with ``epilogue``, the dReLU/dBN
    fusion). IEEE fp32 is FMA, where the larger tiles' fused variants spill on sm_90, and C/groups <= 32 gains
    nothing from wider channel tiles: both take the general config (IEEE with 8 warps,
    :func:`.configs.for_ieee`). ``tma`` (default :func:`.configs.tma_allowed` on dy's device) adds the
    :data:`.conv_dgrad_box.BOX_CONFIGS` that :func:`.conv_dgrad_box.eligible` (``others``: the boxed y / relu_out
    first, then dx and y_prev) and whose BLOCK_N the channels fill; the widest is the default where its pixel
    blocks tile dx exactly (or run over the flat rows of a pointwise conv)."""
    general = for_dtype(_GENERAL_CONFIG, dy.dtype)
    narrow = for_dtype(NARROW_CONFIG, dy.dtype)
    if not ieee and _narrow(g, narrow, dy):
        return (narrow, general), narrow
    if ieee:
        return (for_ieee(general),), for_ieee(general)
    if g.Cg <= 32:
        return (general,), general
    bases = [c for c in DGRAD_CONFIGS if wide_ok(c, dy.dtype, epilogue)]
    # GEMM: dx rows × input channels, reducing over output channels
    cands = checked_candidates(bases, general, dy.dtype, lambda c: _aligned(g, c, dy, weight, others),
                               g.N * g.H * g.W // (g.stride[0] * g.stride[1]), g.Cg, g.Kg)
    if tma if tma is not None else tma_allowed(dy.device):
        box = [c for c in _box.BOX_CONFIGS if c.BLOCK_N <= max(64, triton.next_power_of_2(g.Cg))
               and wide_ok(c, dy.dtype, epilogue) and _box.eligible(g, c, dy, weight, others, ieee)]
        exact = [c for c in box if flat_rows(g, dy, *others) or pixel_block(g.H, g.W, c.BLOCK_M, True)]
        return tuple(cands) + tuple(box), exact[0] if exact else cands[0]
    return tuple(cands), cands[0]


@triton.jit
def _phase_taps(ph, PAD, DIL, RSTEP, R, SH: tl.constexpr):
    """The taps of stride phase ``ph`` along one dimension, in closed form: ``r = r0 + i*RSTEP`` for
    ``0 <= i < nr`` are the ``r < R`` with ``(ph + PAD - r*DIL) % SH == 0``; tap ``i`` reads output row offset
    ``dp0 - i*(RSTEP*DIL // SH)``. The solutions repeat with period ``RSTEP = SH / gcd(DIL, SH)``, so the
    first is among ``r < SH``: scalar work once per program."""
    r0 = R  # none found -> nr = 0
    for jj in tl.static_range(SH):  # the last match written is the smallest
        r0 = tl.where((ph + PAD - (SH - 1 - jj) * DIL) % SH == 0, SH - 1 - jj, r0)
    nr = tl.where(r0 < R, (R - r0 + RSTEP - 1) // RSTEP, 0)
    dp0 = (ph + PAD - r0 * DIL) // SH  # exact: the numerator is a multiple of SH when nr > 0
    return r0, nr, dp0


@triton.jit
def _conv_dgrad_kernel(
        dy_ptr, w_ptr, dx_ptr,
        y_ptr, isc_ptr, ish_ptr, imu_ptr, part_ptr, osc_ptr,   # EPI: y_prev, BN scale/shift/centre, partials, out scale
        z_ptr, c1_ptr, c2_ptr, c3_ptr, mu_ptr,                 # DY_BN: this conv's raw output y and coefficients;
                                                               # DY_RELU: z_ptr is the ReLU's output
        N, H, W, Cg, Kg, P, Q, HPH, WPH, TILES_M, TILES_N, T_PART, C_TOT,
        R, S, PAD_H, PAD_W, DIL_H, DIL_W, RSTEP_H, RSTEP_W,
        sdy_n, sdy_h, sdy_w, sdy_c,
        sw_k, sw_c, sw_r, sw_s,
        sdx_n, sdx_h, sdx_w, sdx_c,
        sy_n, sy_h, sy_w, sy_c,
        SH: tl.constexpr, SW: tl.constexpr,
        EPI: tl.constexpr, OUT_SCALE: tl.constexpr, DY_BN: tl.constexpr, DY_RELU: tl.constexpr,
        DOT_IEEE: tl.constexpr, ALIGNED: tl.constexpr, EPI_ALIGNED: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # grid axis 0: (phase, row tile, channel tile), grouped so GROUP_M row tiles sweep the channel tiles
    # together: their dy rows (the A tiles, re-read once per channel tile) stay in L2
    pid = tl.program_id(0)
    per_phase = TILES_M * TILES_N
    phase = pid // per_phase
    pid_m, pid_n = swizzle_pid(pid % per_phase, TILES_M, TILES_N, GROUP_M)
    pid0 = phase * TILES_M + pid_m  # the row tile's index over all phases (the partials' row)
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
    if ALIGNED:  # Kg % BLOCK_K == 0 and the weight's channel rows fill BLOCK_N: 16-aligned k base, no k mask
        k_base = tl.multiple_of(grp * Kg, 16)
    else:
        k_base = grp * Kg
    if EPI_ALIGNED:  # Cg % BLOCK_N == 0: no channel masks, 16-aligned channel bases in the epilogue
        c_ok = tl.full([BLOCK_N], True, tl.int1)
        c_glob = tl.multiple_of(grp * Cg + pid_n * BLOCK_N, 16) + tl.arange(0, BLOCK_N)
    else:
        c_ok = offs_c < Cg
        c_glob = grp * Cg + offs_c

    # this phase's taps in closed form; per step only scalars advance (no table, no division)
    r0, nr, dp0 = _phase_taps(ph_h, PAD_H, DIL_H, RSTEP_H, R, SH)
    s0, ns, dq0 = _phase_taps(ph_w, PAD_W, DIL_W, RSTEP_W, S, SW)
    dp_step = RSTEP_H * DIL_H // SH
    dq_step = RSTEP_W * DIL_W // SW
    # ALIGNED: operand pointers once per program (int64 row bases), moved per step by one int32 scalar offset
    # (ConvGeometry.check_index_range: one image's offsets fit int32). The masked general path holds one
    # pointer per element rather than per 16-byte vector, too many registers to keep: it recomputes them.
    dy_base = n64 * sdy_n + ih * sdy_h + iw * sdy_w
    if ALIGNED:
        dy_base = tl.multiple_of(dy_base, 16)
    a_off0 = dy_base[:, None] + ((k_base + offs_kk) * sdy_c)[None, :]
    dz_ptrs = dy_ptr + a_off0
    y_ptrs = z_ptr + a_off0
    w_ptrs = w_ptr + (((k_base + offs_kk) * sw_k)[:, None] + (offs_c * sw_c)[None, :])
    c1_ptrs = c1_ptr + k_base + offs_kk
    c2_ptrs = c2_ptr + k_base + offs_kk
    c3_ptrs = c3_ptr + k_base + offs_kk
    mu_ptrs = mu_ptr + k_base + offs_kk
    # per step a row reads output pixel (ih + dp, iw + dq): valid when both are in [0, P) x [0, Q), one unsigned
    # compare each; rows past the tile's end get ih = P + 2**20 so that compare fails too (|dp| < 2**20)
    # (P and Q stay plain scalars: the launcher may specialise a size of 1 to a constexpr, which has no .to; a
    # uint32 tensor compared with an int32 scalar compares unsigned)
    ih_u = tl.where(row_ok, ih, P + (1 << 20)).to(tl.uint32)
    iw_u = iw.to(tl.uint32)
    k_iters = tl.cdiv(Kg, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    dp = dp0
    dq = dq0
    w_tap = r0 * sw_r + s0 * sw_s
    j = 0
    k0 = 0
    for _ in range(0, nr * ns * k_iters):
        a_row_ok = (ih_u + dp.to(tl.uint32) < P) & (iw_u + dq.to(tl.uint32) < Q)
        a_step = dp * sdy_h + dq * sdy_w + k0 * sdy_c
        w_step = k0 * sw_k + w_tap
        if ALIGNED:  # every pixel's channel vector starts 16-element aligned; every k of the block exists
            a_step = tl.multiple_of(a_step, 16)
            w_step = tl.multiple_of(w_step, 16)
            offs_k = tl.multiple_of(k_base + k0, 16) + offs_kk
            k_ok = tl.full([BLOCK_K], True, tl.int1)
        else:
            offs_k = k_base + k0 + offs_kk
            k_ok = offs_kk < Kg - k0
        a_mask = a_row_ok[:, None] & k_ok[None, :]
        if ALIGNED:
            a_p = dz_ptrs + a_step
            y_p = y_ptrs + a_step
            w_p = w_ptrs + w_step
        else:
            a_off = (dy_base + (dp * sdy_h + dq * sdy_w))[:, None] + (offs_k * sdy_c)[None, :]
            a_p = dy_ptr + a_off
            y_p = z_ptr + a_off
            w_p = w_ptr + ((offs_k * sw_k + w_tap)[:, None] + (offs_c * sw_c)[None, :])
        a = tl.load(a_p, mask=a_mask, other=0.0)
        if DY_RELU:  # dy = dz where y > 0 (y, a ReLU's output, loads as 0 outside the image: dy is 0 there)
            a = tl.where(tl.load(y_p, mask=a_mask, other=0.0) > 0, a, 0.0)
        if DY_BN:  # dy = c1*dz + c2*(y - mean) + c3, zero outside the image
            yv = tl.load(y_p, mask=a_mask, other=0.0).to(tl.float32)
            c1 = tl.load(c1_ptrs + k0, mask=k_ok, other=0.0)
            c2 = tl.load(c2_ptrs + k0, mask=k_ok, other=0.0)
            c3 = tl.load(c3_ptrs + k0, mask=k_ok, other=0.0)
            mu = tl.load(mu_ptrs + k0, mask=k_ok, other=0.0)
            a = dy_on_load(a, yv, c1[None, :], c2[None, :], c3[None, :], mu[None, :], a_mask, False)
        if ALIGNED:  # every weight row holds BLOCK_N channels (zero-padded where Cg is narrower)
            b = tl.load(w_p)
        else:
            b = tl.load(w_p, mask=k_ok[:, None] & c_ok[None, :], other=0.0)
        if DOT_IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        # next step: the channel block, then the tap (s fastest, then r)
        k0 += BLOCK_K
        k_wrap = k0 >= Kg
        k0 = tl.where(k_wrap, 0, k0)
        j = tl.where(k_wrap, j + 1, j)
        s_wrap = j >= ns
        j = tl.where(s_wrap, 0, j)
        dq = tl.where(k_wrap, tl.where(s_wrap, dq0, dq - dq_step), dq)
        dp = tl.where(s_wrap, dp - dp_step, dp)
        w_tap = tl.where(k_wrap, tl.where(s_wrap, w_tap + RSTEP_H * sw_r - (ns - 1) * RSTEP_W * sw_s,
                                          w_tap + RSTEP_W * sw_s), w_tap)

    epilogue(acc, n64, h, w, row_ok, c_glob, c_ok, pid0, T_PART, C_TOT, dx_ptr, y_ptr, isc_ptr, ish_ptr, imu_ptr,
             part_ptr, osc_ptr, sdx_n, sdx_h, sdx_w, sdx_c, sy_n, sy_h, sy_w, sy_c, EPI, OUT_SCALE, EPI_ALIGNED)


_PLACEHOLDER: dict = {}


def _placeholder(device: torch.device) -> torch.Tensor:
    """A one-element fp32 tensor passed for the pointer arguments whose switch is off (never read)."""
    key = str(device)
    if key not in _PLACEHOLDER:
        _PLACEHOLDER[key] = torch.zeros(1, dtype=torch.float32, device=device)
    return _PLACEHOLDER[key]


class DgradSwitches(NamedTuple):
    """dgrad's kernel switches that enter its tuning key: each combination keeps its own tuned winner."""
    epilogue: bool
    out_scale: bool
    dy_bn: bool
    dy_relu: bool
    dot_ieee: bool


def _validate_dgrad(grad_out, weight, x_shape, stride, padding, dilation, groups, y_prev, in_scale, in_shift,
                    in_centre, out_scale, dy_bn, relu_out, who: str) -> tuple:
    """Check :func:`conv2d_dgrad_nhwc`'s arguments (ValueError naming the bad one); returns the
    :class:`ConvGeometry` and ``dy_bn`` as a :class:`DyBN` (or None)."""
    check_operand_dtype("grad_out", grad_out, who)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError(f"{who}: weight must be a 4-D [K, C/groups, R, S] tensor")
    if len(tuple(x_shape)) != 4:
        raise ValueError(f"{who}: x_shape must be (N, C, H, W), got {x_shape!r}")
    g = ConvGeometry.make(tuple(int(v) for v in x_shape), tuple(weight.shape), stride, padding, dilation,
                          groups, who)
    g.check_index_range(who)
    dev = grad_out.device
    check_tensor("grad_out", grad_out, (g.N, g.K, g.P, g.Q), None, dev, who)
    check_tensor("weight", weight, weight.shape, grad_out.dtype, dev, who)
    epi_args = (y_prev, in_scale, in_shift, in_centre)
    if any(a is None for a in epi_args) and any(a is not None for a in epi_args):
        raise ValueError(f"{who}: y_prev, in_scale, in_shift and in_centre go together (all or none)")
    if out_scale is not None and y_prev is None:
        raise ValueError(f"{who}: out_scale needs the epilogue (y_prev, in_scale, in_shift, in_centre)")
    if y_prev is not None:
        check_tensor("y_prev", y_prev, (g.N, g.C, g.H, g.W), grad_out.dtype, dev, who)
        for name, v in (("in_scale", in_scale), ("in_shift", in_shift), ("in_centre", in_centre)):
            check_vector(name, v, g.C, dev, who)
        if out_scale is not None:
            check_vector("out_scale", out_scale, g.C, dev, who)
    if relu_out is not None:
        if dy_bn is not None:
            raise ValueError(f"{who}: relu_out and dy_bn do not go together (the mask is relu_out's, dy_bn's is "
                             "the BN backward)")
        check_like("relu_out", relu_out, grad_out, "grad_out", who)
    return g, check_dy_bn(dy_bn, grad_out, g.K, who)


def _tiles(g: ConvGeometry, cfg: ConvConfig) -> tuple:
    """(row tiles per stride phase, programs along grid axis 0 = phases × row tiles) of a launch with ``cfg``."""
    tiles_m = triton.cdiv(g.N * triton.cdiv(g.H, g.stride[0]) * triton.cdiv(g.W, g.stride[1]), cfg.BLOCK_M)
    return tiles_m, g.stride[0] * g.stride[1] * tiles_m


def _launch_dgrad(cfg: ConvConfig, g: ConvGeometry, grad_out, weight, dx, epi_ops, part, osc, bn_ops,
                  sw: DgradSwitches, packed=None) -> None:
    """One launch of :func:`_conv_dgrad_kernel`. ``epi_ops`` = (y_prev, in_scale, in_shift, in_centre), ``osc``
    (out_scale), ``bn_ops`` (the :class:`DyBN` fields) and ``part`` are placeholders where their switch is off.
    ``packed``: the narrow path's repacked weight (:func:`_pack_narrow_weight`), used when ``cfg`` takes it.
    A ``tma`` config runs the box kernel (:mod:`.conv_dgrad_box`)."""
    if cfg.tma:
        _box.launch(cfg, g, grad_out, weight, dx, epi_ops, part, osc, bn_ops, sw)
        return
    tiles_m, T = _tiles(g, cfg)
    tiles_n = triton.cdiv(g.Cg, cfg.BLOCK_N)
    yp = epi_ops[0]
    aligned = _aligned(g, cfg, grad_out, weight, (dx, yp))
    epi_aligned = _epi_aligned(g, cfg, grad_out, weight, (dx, yp))
    if _narrow(g, cfg, grad_out):
        weight = packed if packed is not None else _pack_narrow_weight(weight, g)
    grid = (T * tiles_n, 1, g.groups)
    _conv_dgrad_kernel[grid](
        grad_out, weight, dx, *epi_ops, part, osc, *bn_ops,
        g.N, g.H, g.W, g.Cg, g.Kg, g.P, g.Q, triton.cdiv(g.H, g.stride[0]), triton.cdiv(g.W, g.stride[1]),
        tiles_m, tiles_n, T, g.C, g.R, g.S, *g.padding, *g.dilation, *tap_steps(g),
        grad_out.stride(0), grad_out.stride(2), grad_out.stride(3), grad_out.stride(1),
        weight.stride(0), weight.stride(1), weight.stride(2), weight.stride(3),
        dx.stride(0), dx.stride(2), dx.stride(3), dx.stride(1),
        yp.stride(0), yp.stride(2), yp.stride(3), yp.stride(1),
        SH=g.stride[0], SW=g.stride[1], EPI=sw.epilogue, OUT_SCALE=sw.out_scale, DY_BN=sw.dy_bn,
        DY_RELU=sw.dy_relu, DOT_IEEE=sw.dot_ieee, ALIGNED=aligned, EPI_ALIGNED=epi_aligned,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def conv2d_dgrad_nhwc(grad_out: torch.Tensor, weight: torch.Tensor, x_shape, *, stride=1, padding=0, dilation=1,
                      groups: int = 1, y_prev: torch.Tensor | None = None, in_scale=None, in_shift=None,
                      in_centre=None, out_scale=None, dy_bn: DyBN | None = None,
                      relu_out: torch.Tensor | None = None,
                      allow_tf32: bool | None = None, config: ConvConfig | None = None):
    """Gradient of a conv w.r.t. its input (``torch.nn.grad.conv2d_input``), optionally fused for training.

    Args:
        grad_out: [N, K, P, Q] fp32/fp16/bf16, any strides (channels_last is the fast layout): ``dy``, the
            gradient w.r.t. the conv output; with ``dy_bn``, ``dz``, the gradient w.r.t. this conv's BN output.
        weight: [K, C/groups, R, S] of grad_out's dtype, any strides (channels_last weights load contiguously).
        x_shape: (N, C, H, W) of the conv input.
        stride, padding, dilation, groups: as ``torch.nn.functional.conv2d`` (zero padding).
        y_prev, in_scale, in_shift, in_centre: the epilogue fusion (all or none): the conv input was
            ``relu(y_prev*in_scale + in_shift)``; y_prev [N, C, H, W] of grad_out's dtype, the others [C] fp32;
            in_centre (the batch mean of y_prev for BN) centres the second partial sum. The output is then
            ``dz`` = the gradient w.r.t. the BN output before the ReLU, and per-tile partials are returned too.
        out_scale: with the epilogue, an fp32 [C] vector: the stored output is ``dz*out_scale[c]`` (pass the BN's
            ``in_scale`` to get the gradient w.r.t. ``y_prev``); the partials are still sums of ``dz``.
        dy_bn: a :class:`DyBN` (or 5-tuple): form ``dy = c1*dz + c2*(y - mean) + c3`` while loading grad_out.
        relu_out: [N, K, P, Q] a ReLU's output, grad_out's dtype and strides: ``dy = grad_out where relu_out > 0``,
            masked on load (not with dy_bn).
        allow_tf32: fp32 inputs use TF32 MMAs (default :func:`configs.conv_allows_tf32`, PyTorch's rule).
        config: tile config; default :func:`autotune.choose` ("conv_dgrad": pinned, interpreter, autotuned among
            the compile-checked candidates for the shape, or the first of them with tuning off).

    Returns:
        dx [N, C, H, W] in grad_out's dtype, channels_last; with the epilogue ``(dz, partials)`` where
        ``partials`` is [2, T, C] fp32: ``partials[0]`` = Σdz and ``partials[1]`` = Σdz·(y_prev - in_centre)
        per tile, ready for ``bn_backward_coeffs(partials[0], partials[1], ...)``.
    """
    who = "conv2d_dgrad_nhwc"
    g, dy_bn = _validate_dgrad(grad_out, weight, x_shape, stride, padding, dilation, groups, y_prev, in_scale,
                               in_shift, in_centre, out_scale, dy_bn, relu_out, who)
    dev = grad_out.device
    epi = y_prev is not None
    dx = torch.empty((g.N, g.C, g.H, g.W), dtype=grad_out.dtype, device=dev, memory_format=torch.channels_last)
    if allow_tf32 is None:
        allow_tf32 = conv_allows_tf32()
    sw = DgradSwitches(epilogue=epi, out_scale=out_scale is not None, dy_bn=dy_bn is not None,
                       dy_relu=relu_out is not None,
                       dot_ieee=grad_out.dtype == torch.float32 and not allow_tf32)
    # placeholders (never read) where a switch is off
    ph = _placeholder(dev)
    epi_ops = (y_prev, in_scale, in_shift, in_centre) if epi else (dx, ph, ph, ph)
    bn_ops = dy_bn if dy_bn is not None else (grad_out if relu_out is None else relu_out, ph, ph, ph, ph)
    osc = ph if out_scale is None else out_scale
    parts: dict = {}  # per tile count, so tuning launches reuse one buffer
    packed: list = []  # the narrow path's repacked weight, built once per call

    boxed = (bn_ops[0],) if dy_bn is not None or relu_out is not None else ()  # read by boxes like dy

    def launch(cfg: ConvConfig):
        if cfg.tma:
            T = _box.num_tiles(as_rows(g, grad_out, dx, epi_ops[0], bn_ops[0])[0], cfg)  # as _box.launch
        else:
            T = _tiles(g, cfg)[1]
        part = dx
        if epi:
            part = parts.get(T)
            if part is None:
                part = parts[T] = torch.empty((2, T, g.C), dtype=torch.float32, device=dev)
        if _narrow(g, cfg, grad_out) and not packed:
            packed.append(_pack_narrow_weight(weight, g))
        _launch_dgrad(cfg, g, grad_out, weight, dx, epi_ops, part, osc, bn_ops, sw, packed[0] if packed else None)
        return part

    if config is None:
        cands, default = _candidates(g, grad_out, weight, (*boxed, dx, epi_ops[0]), sw.dot_ieee, epi)
        config = choose("conv_dgrad", g, grad_out.dtype, dev, cands, sw, launch, default)
    boxes_ok = tma_allowed(dev) and _box.eligible(g, config, grad_out, weight, (*boxed, dx, epi_ops[0]), sw.dot_ieee)
    check(not config.tma or boxes_ok,
          f"{who}: config {config.name()} loads TMA boxes, which needs groups 1, stride 1, 16-bit tensor-core "
          "operands, channel tiles dividing K and C, 16-byte aligned channels_last dy, dx, y and y_prev, a "
          "channels_last weight and TMA on this device (conv_dgrad_box.eligible)")
    part = launch(config)
    return (dx, part) if epi else dx


VARIANTS = _box.VARIANTS  # the constexpr variants the ops launch (one table for both kernels, see there)
# triton_dy_pass's with a prologue, never in IEEE fp32 (bn_dy.dy_pass_may_pay): not on the FMA (DOT_IEEE) path
_DY_PASS_ONLY = ("epi",)


def compile_specs() -> list:
    """(jit_fn, signature, constexprs, options, is_gemm, div16) for the sm_90 compile check, at stride 2 (the
    strides are constexpr; the filter, padding and dilation are runtime): every config × dtype × :data:`VARIANTS`
    (those :func:`.conv_dgrad_box.wide_ok` allows) on the ALIGNED path, with the channel counts
    and the NHWC / channels_last-weight strides multiples of 16 as Triton's launcher specialises them for ResNet
    layers; the masked general path at the config the launcher
    gives it (64×32), without divisibility hints (its worst case: 4-32 channels per group, NCHW)."""
    ints = ("N", "H", "W", "Cg", "Kg", "P", "Q", "HPH", "WPH", "TILES_M", "TILES_N", "T_PART", "C_TOT",
            "R", "S", "PAD_H", "PAD_W", "DIL_H", "DIL_W", "RSTEP_H", "RSTEP_W",
            "sdy_n", "sdy_h", "sdy_w", "sw_k", "sw_r", "sw_s", "sdx_n", "sdx_h", "sdx_w", "sy_n", "sy_h", "sy_w")
    # ResNet layer: channel counts (Cg, Kg, C_TOT = C) and every stride are multiples of 16 (the weight's
    # sw_s = Cg, sw_r = S*Cg, sw_k = R*S*Cg too); sizes and tile counts are not in general.
    div16 = ("Cg", "Kg", "C_TOT", "sdy_n", "sdy_h", "sdy_w", "sw_k", "sw_r", "sw_s", "sdx_n", "sdx_h", "sdx_w",
             "sy_n", "sy_h", "sy_w")

    # the narrow path (the stem): dx and y_prev have C < 16 channels; the weight is the repacked one
    narrow_div16 = ("Kg", "sdy_n", "sdy_h", "sdy_w", "sw_k", "sw_r", "sw_s")

    def spec(base, dt, tdt, variant, aligned, ieee=False, narrow=False):
        cfg = for_ieee(for_dtype(base, tdt)) if ieee else for_dtype(base, tdt)
        sig = {"dy_ptr": f"*{dt}", "w_ptr": f"*{dt}", "dx_ptr": f"*{dt}", "y_ptr": f"*{dt}", "isc_ptr": "*fp32",
               "ish_ptr": "*fp32", "imu_ptr": "*fp32", "part_ptr": "*fp32", "osc_ptr": "*fp32", "z_ptr": f"*{dt}",
               "c1_ptr": "*fp32", "c2_ptr": "*fp32", "c3_ptr": "*fp32", "mu_ptr": "*fp32"}
        sig.update({name: "i32" for name in ints})
        # unit channel strides, as specialised
        cx = {"sdy_c": 1, "sw_c": 1, "sdx_c": 1, "sy_c": 1, "SH": 2, "SW": 2,
              "EPI": False, "OUT_SCALE": False, "DY_BN": False, "DY_RELU": False, **VARIANTS[variant],
              "DOT_IEEE": ieee, "ALIGNED": aligned, "EPI_ALIGNED": aligned and not narrow,
              "BLOCK_M": cfg.BLOCK_M, "BLOCK_N": cfg.BLOCK_N, "BLOCK_K": cfg.BLOCK_K, "GROUP_M": cfg.GROUP_M}
        sig.update({k: "constexpr" for k in cx})
        return (_conv_dgrad_kernel, ordered_signature(_conv_dgrad_kernel, sig), cx,
                {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}, not ieee,
                narrow_div16 if narrow else div16 if aligned else ())

    dtypes = (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32))
    specs = [spec(base, dt, tdt, v, True) for base in DGRAD_CONFIGS for dt, tdt in dtypes for v in VARIANTS
             if wide_ok(base, tdt, VARIANTS[v].get("EPI", False))]
    specs += [spec(_GENERAL_CONFIG, dt, tdt, v, False) for dt, tdt in dtypes for v in VARIANTS]
    specs += [spec(NARROW_CONFIG, dt, tdt, v, True, narrow=True) for dt, tdt in dtypes for v in VARIANTS]
    # IEEE fp32 (the default unless TF32 is allowed, configs.conv_allows_tf32): FMA, not wgmma, by design
    specs += [spec(_GENERAL_CONFIG, "fp32", torch.float32, v, aligned, ieee=True)
              for aligned in (True, False) for v in VARIANTS if v not in _DY_PASS_ONLY]
    return specs
