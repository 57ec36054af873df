"""Conv weight gradient (wgrad) as a Triton implicit GEMM over NHWC tensors, with deterministic split-K.

``dW[k, c, r, s] = Σ_{n, p, q} dy[n, p, q, k] · x[n, p*stride - pad + r*dil, q*stride - pad + s*dil, c]``

GEMM view per group: M = K/groups output channels, N = R*S*C/groups (one tap per program, a tile of input channels;
with ``ROW_TAPS`` a filter row's S <= 3 taps per program, S accumulators sharing each step's dy tile, so its
transform and loads serve S MMAs: :data:`ROW_CONFIGS`), reduction over the N*P*Q output pixels. That reduction is
long and M×N is small for late ResNet layers (K=512, 3×3 → few tiles), so it is split into SPLIT contiguous chunks
of whole BLOCK_K steps, one program per (tile, chunk): each writes its fp32 partial into ``[SPLIT, K, R, S,
C/groups]`` (its tile contiguous along the channels) and :func:`_wgrad_combine_kernel` sums the SPLIT partials in
index order into dW's ``[K, C/groups, R, S]`` -- bit-reproducible, no float atomics. With SPLIT = 1 the GEMM kernel
stores ``dW`` directly. :func:`pick_split` sizes SPLIT from occupancy (CTAs per SM of the tile, waves of 132 SMs,
the partials' round trip), so the last wave is nearly full.

K-loop index math: where dy's pixels are dense (channels_last: ``DY_FLAT``) pixel ``j`` of dy is at ``j*K``, and
for a 1×1 stride-1 conv over dense x (``X_FLAT``) pixel ``j`` of x too, with no padding to check: no coordinates
at all. Otherwise each program decomposes its first BLOCK_K pixels into ``(n, p, q)`` once and advances them
by carries each step (``BLOCK_K = dn*P*Q + dp*Q + dq``, no division), where the registers allow (the CARRY
constexpr: not IEEE fp32, not the PACKED prologue or int64 variants; those recompute with divisions). Pixel
offsets are int32 unless an offset could pass 2**31 - 1 (``IDX64``, :func:`_needs_int64`: never for
ResNet-50 at batch 256). dy is loaded pixels × channels, like x, so both tiles share the pixel vectors; the
MMA takes its transpose (the same M-major shared-memory operand as before).

Layouts: ``grad_out [N, K, P, Q]`` and ``x [N, C, H, W]`` with any strides (channels_last is the fast layout),
one dtype, fp32/fp16/bf16 (fp32 as IEEE or TF32, :func:`configs.conv_allows_tf32`); fp32 accumulation; ``dW``
``[K, C/groups, R, S]`` contiguous in ``out_dtype`` (fp32 by default: the master-weight gradient).

Fusions (constexpr switches, default off):

* ``in_scale/in_shift`` (PROLOGUE): ``x`` is the raw output ``y_prev`` of the previous conv; the operand is
  ``relu(y_prev*in_scale[c] + in_shift[c])`` recomputed in registers, with the padding mask applied after
  the transform (a padded zero must stay zero, not become ``relu(in_shift)``).
* ``dy_bn`` (DY_BN), ``dy_relu`` (DY_RELU): as in ``conv_dgrad`` (the same :func:`conv_common.dy_on_load`):
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

Few channels (``PACKED``, :func:`_packed`: C/groups < 16 with an aligned dy -- the stem's C = 3 in
channels_last): the GEMM's N is every ``(r, s, c)`` of the filter (147 columns for 7×7×3, two 128-wide tiles),
not one tap's channels padded to a tile, so the stem runs 2 programs per chunk instead of 49, each reading its
dy tile (16-byte cp.async, formed under DY_BN) once for all taps. Where the forward's dense-taps path applies
(``PACK_C``, :attr:`ConvGeometry.pack_c`: groups 1, at most 8 channels -- the stem), the launcher pads x to
``PACK_C`` channels as the forward does (one pass over the image), columns are ``(r*S + s)*PACK_C + c`` (196 for
the stem) and each pixel arrives as one 8-byte vector: cp.async, pipelined, :data:`_DENSE_CONFIG`; the padded
channels' columns are computed and never stored. Otherwise x is gathered per element with any strides (an NHWC
pixel of 3 channels is 6 bytes: no vector loads), :data:`_PACKED_CONFIG`.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import conv_wgrad_box as _box
from . import prologue_pass as _pass
from .checks import FLOAT_DTYPES, check, check_operand_dtype, check_tensor, check_vector
from .autotune import choose
from .configs import ConvConfig, checked_candidates, conv_allows_tf32, for_dtype, for_ieee, tma_allowed
from .conv_common import (CHANNEL_PAD, ConvGeometry, DyBN, as_rows, check_dy_bn, dense_input, dy_on_load, flat_rows,
                          ordered_signature, rows_aligned, rows_to_npq)

__all__ = ["conv2d_wgrad_nhwc", "WGRAD_CONFIGS", "pick_split", "compile_specs", "WgradSwitches"]
# Split-K (pick_split): at least this many BLOCK_K steps per chunk, at most _MAX_SPLIT chunks; the time model
# is an H100 SXM (132 SMs, 1.83 GHz, 2048 16-bit FMA per clock per SM, 3.35 TB/s) with the K-loop issuing about
# _ISSUE_RATIO instructions per MMA cycle (the cost report's ratio on the aligned path).
_MIN_STEPS_PER_SPLIT = 8
_MAX_SPLIT = 256
_NUM_SMS, _CLOCK_HZ, _FMA_PER_CLK, _HBM_BYTES_PER_S, _ISSUE_RATIO = 132, 1.83e9, 2048, 3.35e12, 3.0
# CTAs per SM of each tile (BLOCK_M, BLOCK_N, num_warps, row_taps, tma) by the operand transforms it runs (none,
# DY_BN only, DY_BN and PROLOGUE, PROLOGUE only), from the sm_90 compile's registers and shared memory (the cost
# report's ``ctas_per_sm``; tests/test_cost_report.py checks every ResNet-50 wgrad record against it). E.g. the
# cp.async 128x128 w8 tile: sums 119 registers and 96 KB, 2; fused 254, 1; the box kernel's 128x128 w8 tile:
# prologue alone 128 registers and 88 KB, 2; dy_bn 160-180 and 128 KB, 1. Row-taps tiles never run the prologue
# (their entries repeat dy_bn's). A tile not listed counts 1.
_CTAS_PER_SM = {(128, 128, 8, False, False): (2, 1, 1, 1), (128, 64, 8, False, False): (2, 1, 1, 1),
                (64, 64, 4, False, False): (4, 3, 2, 2), (64, 32, 4, False, False): (4, 2, 2, 2),
                (64, 128, 4, False, False): (3, 2, 2, 2), (64, 64, 4, True, False): (3, 2, 2, 2),
                (64, 64, 4, False, True): (4, 3, 3, 5), (128, 64, 4, False, True): (3, 2, 2, 3),
                (128, 128, 8, False, True): (2, 1, 1, 2), (64, 64, 4, True, True): (3, 2, 2, 2)}


def _tile(cfg: ConvConfig) -> tuple:
    """The tile a config runs whatever its dtype's BLOCK_K: (BLOCK_M, BLOCK_N, num_warps, row_taps, tma)."""
    return cfg.BLOCK_M, cfg.BLOCK_N, cfg.num_warps, cfg.row_taps, cfg.tma


def ctas_per_sm(cfg: ConvConfig, dy_bn: bool, prologue: bool) -> int:
    """CTAs of ``cfg`` per SM when its loop forms dy (``dy_bn``) and/or x (``prologue``), :data:`_CTAS_PER_SM`
    (1 if not listed)."""
    return _CTAS_PER_SM.get(_tile(cfg), (1, 1, 1, 1))[(0, 3, 1, 2)[2 * dy_bn + prologue]]


# Every config the launcher may pick; compile_specs covers each of them (16-bit and fp32 via for_dtype, every
# variant, ALIGNED; the general path at the last, 64x32 config only).
# (BLOCK_M output channels, BLOCK_N input channels of one tap, BLOCK_K pixels per MMA step; GROUP_M unused)
# Register use on sm_90 is dominated by the operand loads: aligned (16-byte vectors, cp.async, 3 stages) the
# fused 128x128 w8 tile needs ~235 registers, 64x64 w4 ~175 and 64x128 w4 255 (no spills); the masked general
# path of the large tiles issues one load (and one 64-bit address) per element and spills at 255 registers when
# fused, so unaligned shapes run the 64x32 tile, whose general path fits.
# Autotuned among those that fit the shape (with WIDE_CONFIG or DY_CONFIG, below); the default is 128x128 when
# both channel counts reach 128, 128x64 when only K/groups does, 64x128 when only C/groups does (the wider side
# halves the other operand's transform work per MMA cycle), else 64x64.
WGRAD_CONFIGS = (ConvConfig(64, 64, 64, 8, 4, 3), ConvConfig(128, 128, 64, 8, 8, 3),
                 ConvConfig(128, 64, 64, 8, 8, 3), ConvConfig(64, 128, 64, 8, 4, 3), ConvConfig(64, 32, 64, 8, 4, 3))
_GENERAL_CONFIG = WGRAD_CONFIGS[-1]  # the one config whose masked general path is compile-checked
# Tiles that spill with both operand transforms (PROLOGUE and DY_BN) in the loop on sm_90 (Triton 3.9's ptxas,
# the flags it compiles with: 64x128 w4 255 registers and 32 B): neither offered nor compile-checked for them.
_NOT_FUSED = (ConvConfig(64, 128, 64, 8, 4, 3),)


def _fused_ok(cfg: ConvConfig, fused: bool) -> bool:
    """Whether ``cfg`` (any dtype's BLOCK_K) runs a loop with both transforms (``fused``): not one of
    :data:`_NOT_FUSED`."""
    return not fused or _tile(cfg) not in {_tile(b) for b in _NOT_FUSED}
# The wide tile, a candidate (and the default where K/groups >= 256 and C/groups >= 128) only where dy needs no
# transform (no DY_BN: the plain op, the inference op's sums, triton_dy_pass's GEMMs) and the dot is a tensor-core
# one: 256 output channels per tile halve the x-side coordinate and load work per MMA cycle. sm_90 bf16 stride-2
# 3×3 with the prologue: issue ratio 1.86 -> 0.93 (128x128: 476 instructions per step, this tile: 478 for twice
# the MMA), 254 registers, 1 CTA per SM; with DY_BN it spills.
WIDE_CONFIG = ConvConfig(256, 128, 64, 8, 8, 3)
# The dy-transform tile, a candidate (and the default where K/groups >= 128 and C/groups >= 256) only WITH the dy
# transform on tensor cores: the transform's cost per MMA cycle is inverse to BLOCK_N (each dy element formed
# serves BLOCK_N MMA columns), so 256 input channels per tile halve it; BLOCK_K 32 keeps the 128×256 fp32
# accumulator and the transform within 255 registers. sm_90 bf16 1×1 dy_bn: issue ratio 1.67 -> 0.98 (128x128x64:
# 428 instructions per step, this tile: 252 for the same MMA), 3×3 dy_bn_relu_sums 2.60 -> 1.51, 1×1 fused
# 2.34 -> 1.77. With the prologue in the loop of a conv with more than one tap it spills (4 bytes): not offered
# there (its prologue-pass twin is).
DY_CONFIG = ConvConfig(128, 256, 32, 8, 8, 3)
# Row-taps tiles (ConvConfig.row_taps, kernel ROW_TAPS): one program per filter row computes its S taps, S
# accumulators sharing each step's dy tile, so the dy transform and loads serve S MMAs instead of one. Offered on
# the ALIGNED path of filters with more than one tap per row, on tensor cores, without the prologue in the loop
# (its x-side transform is per tap: stride-2 fused 3.01 -> 3.11, no gain); the default where neither the wide nor
# the dy-transform tile fits (C/groups < 256: layer1 and layer2). The S accumulators take the registers a wider
# tile would: 64x64 w4 and 64x128 w8. sm_90 bf16 issue ratios, 3×3: layer1 frozen-BN dy_bn_relu_sums 4.77 ->
# 2.05, training dy_bn (prologue pass) 4.24 -> 1.78, plain (triton_dy_pass) 1.85 -> 0.91; layer2 2.40 -> 1.49,
# 2.19 -> 1.42; at 256 channels no better than DY_CONFIG.
ROW_CONFIGS = (ConvConfig(64, 128, 64, 8, 8, 3, row_taps=True), ConvConfig(64, 64, 64, 8, 4, 3, row_taps=True))
_MAX_ROW_TAPS = 3  # the kernel's accumulators per program
BOX_CONFIGS = _box.BOX_CONFIGS  # the TMA-box tiles (see there)
# The PACKED path's config (the stem: 7·7·3 = 147 (r, s, c) columns in one 256-wide N tile, K = 64 in one M tile):
# one program per chunk reads each dy tile once for every tap.
_PACKED_CONFIG = ConvConfig(64, 128, 32, 8, 8, 2)  # BLOCK_K 64 spills with the prologue and dy_bn (255 regs, 12 B)
# The PACKED path over x padded to PACK_C channels (ConvGeometry.pack_c, the stem: 7·7·4 = 196 columns): x arrives
# as 8-byte vectors, so registers allow one 256-wide N tile (the dy transform once for all 196 columns) and a
# 3-stage pipeline. sm_90 bf16 dy_bn: 417 instructions per warp per step (the per-element path: 1,285), 2 tiles
# in flight, 186 registers.
_DENSE_CONFIG = ConvConfig(64, 256, 32, 8, 8, 3)


def _aligned(g: ConvGeometry, cfg: ConvConfig, dy: torch.Tensor, x: torch.Tensor) -> bool:
    """The kernel's ALIGNED switch: channel tiles divide the channels (Kg % BLOCK_M, Cg % BLOCK_N), and dy
    (and y, which has its strides) and x have unit channel strides and 16-aligned pixel rows."""
    return g.Kg % cfg.BLOCK_M == 0 and g.Cg % cfg.BLOCK_N == 0 and rows_aligned(dy) and rows_aligned(x)


def _candidates(g: ConvGeometry, dy: torch.Tensor, x: torch.Tensor, dy_bn: bool = True,
                ieee: bool = False, prologue: bool = False, tma: bool | None = None,
                y: torch.Tensor | None = None) -> tuple:
    """(candidates for ``dy``'s dtype, the untuned default) of a launch with (``dy_bn``) or without the dy transform,
    with (``prologue``) or without the BN+ReLU prologue in its loop, and with an IEEE fp32 (``ieee``) or
    tensor-core dot: the PACKED config alone where :func:`_packed`; else the configs whose path for this shape
    (ALIGNED or the masked general one) is compile-checked; C/groups <= 32 takes the general config. Tensor-core
    launches also get :data:`WIDE_CONFIG` without ``dy_bn``, :data:`DY_CONFIG` with it (not with ``prologue`` on
    a conv of more than one tap), and without ``prologue`` on filters of more than one tap per row
    :data:`ROW_CONFIGS`. The default is the wide or dy-transform tile where its tiles fit (256 output channels and
    128 input ones, or 128 and 256), else the widest row-taps tile offered, else the 128x128 tile when both
    channel counts reach 128, 128x64 or 64x128 when one does, else 64x64, where a candidate; else the first
    candidate. ``tma`` (default :func:`.configs.tma_allowed` on dy's device) adds :data:`BOX_CONFIGS` where
    :func:`.conv_wgrad_box.eligible` (``y``: the dy_bn tensor, when there is one; on 1×1 convs over flat rows,
    :func:`.conv_common.flat_rows`, also its FLAT_CONFIGS), the default on filters of more than one tap and on
    1×1 convs over flat rows or with ``dy_bn`` where it is as wide as the channels (up to 256), unless the
    prologue is the only transform and the wide tile fits. IEEE launches run their tiles with 8 warps and 2
    stages (:func:`.configs.for_ieee`); with both transforms the tiles of :data:`_NOT_FUSED` are not offered."""
    cands, default = _offered(g, dy, x, dy_bn, ieee, prologue, tma, y)
    if not ieee:
        return cands, default
    return tuple(for_ieee(c, 2) for c in cands), for_ieee(default, 2)


def _offered(g: ConvGeometry, dy: torch.Tensor, x: torch.Tensor, dy_bn: bool, ieee: bool, prologue: bool,
             tma: bool | None, y: torch.Tensor | None) -> tuple:
    """:func:`_candidates` before the IEEE warps."""
    general = for_dtype(_GENERAL_CONFIG, dy.dtype)
    packed = for_dtype(_DENSE_CONFIG if g.pack_c else _PACKED_CONFIG, dy.dtype)
    if _packed(g, packed, dy, x):
        return (packed,), packed
    if g.Cg <= 32:
        return (general,), general
    # GEMM: output channels × input channels (of one tap), reducing over pixels
    wide = None if ieee else WIDE_CONFIG if not dy_bn else \
        DY_CONFIG if not prologue or _flat_switches(g, dy, x, False)[1] else None
    wide_fits = wide is not None and g.Kg >= wide.BLOCK_M and g.Cg >= wide.BLOCK_N
    rows_cfgs = ROW_CONFIGS if 1 < g.S <= _MAX_ROW_TAPS and not ieee and not prologue else ()
    cands = checked_candidates(WGRAD_CONFIGS + ((wide,) if wide else ()) + rows_cfgs, general, dy.dtype,
                               lambda c: _aligned(g, c, dy, x), g.Kg, g.Cg, g.N * g.P * g.Q)
    cands = [c for c in cands if _fused_ok(c, dy_bn and prologue)]
    if tma if tma is not None else tma_allowed(dy.device):
        rows = flat_rows(g, dy, x, *(() if y is None else (y,)))  # a 1×1 conv's pixels as one row: no padding
        box = [c for c in BOX_CONFIGS + (_box.FLAT_CONFIGS if rows else ())
               if _box.eligible(g, c, dy, x, prologue, ieee, y) and (not c.row_taps or g.S > 1)]
        cands = list(cands) + box
        # the default on filters of more than one tap, and on 1×1 convs where its tile is as wide as the channels
        # (a narrower tile forms each dy element for fewer MMA columns) and it runs over flat rows or forms dy
        # (the stride-2 downsample: its 64-deep steps halve the cp.async tile's per-MMA transform work; without
        # dy_bn a padded box costs more than the little a 1×1 loop gathers), but not for the prologue alone where
        # the wide tile runs: it spreads x's transform over 256 output channels
        fits = g.R * g.S > 1 or ((rows or dy_bn) and box and box[0].BLOCK_N >= min(g.Cg, 256))
        # a one-tap box tile narrower than 256 loses to the cp.async row-taps tiles where they run (each formed
        # dy block serves a filter row's taps there): it is the default only without them (the prologue)
        narrow = box and not box[0].row_taps and box[0].BLOCK_N < 256 and g.R * g.S > 1 and bool(rows_cfgs)
        if box and fits and not narrow and (dy_bn or not prologue or not wide_fits):
            return tuple(cands), box[0]
    if wide_fits and for_dtype(wide, dy.dtype) in cands:
        return tuple(cands), for_dtype(wide, dy.dtype)
    row = next((c for c in cands if c.row_taps), None)  # ROW_CONFIGS widest first
    if row is not None:
        return tuple(cands), row
    want = for_dtype(WGRAD_CONFIGS[1] if min(g.Cg, g.Kg) >= 128 else WGRAD_CONFIGS[2] if g.Kg >= 128
                     else WGRAD_CONFIGS[3] if g.Cg >= 128 else WGRAD_CONFIGS[0], dy.dtype)
    return tuple(cands), want if want in cands else cands[0]


def pick_split(g: ConvGeometry, cfg: ConvConfig, first_column_only: bool = False, packed: bool = False,
               dy_bn: bool = True, prologue: bool = True) -> int:
    """SPLIT minimising an estimated time from occupancy: ``waves × steps per chunk × step time`` (waves of
    132 SMs × the tile's CTAs per SM, :data:`_CTAS_PER_SM`; the step time of a CTA sharing its SM with the
    others) plus the fp32 partials' round trip through HBM, each chunk keeping >= _MIN_STEPS_PER_SPLIT
    BLOCK_K steps. A split that ends in a near-full last wave wins over one that leaves a tail.
    ``first_column_only``: the grid of a ``need_dw=False`` launch, one (tap, channel tile) column; ``packed``:
    the PACKED path's grid; ``dy_bn``/``prologue``: the operand transforms the launch runs (more registers,
    fewer CTAs per SM)."""
    tiles = math.prod(_grid(g, cfg, packed, 1, not first_column_only)[0])
    steps = triton.cdiv(g.N * g.P * g.Q, cfg.BLOCK_K)
    ctas = ctas_per_sm(cfg, dy_bn, prologue)
    slots = _NUM_SMS * ctas
    mma = cfg.BLOCK_M * cfg.BLOCK_N * cfg.BLOCK_K * (g.S if cfg.row_taps and not packed else 1)  # per step
    step_s = ctas * mma / _FMA_PER_CLK * _ISSUE_RATIO / _CLOCK_HZ
    part_bytes = 2 * 4 * (g.K if first_column_only else g.K * g.Cg * g.R * g.S)  # written, read back: fp32

    def cost(split):
        chunk_steps = triton.cdiv(steps, split)
        split = triton.cdiv(steps, chunk_steps)  # the launcher's: no empty chunk
        return triton.cdiv(tiles * split, slots) * chunk_steps * step_s + (split > 1) * split * part_bytes \
            / _HBM_BYTES_PER_S

    hi = max(1, min(steps // _MIN_STEPS_PER_SPLIT, _MAX_SPLIT))
    return min(range(1, hi + 1), key=lambda s: (cost(s), s))


@triton.jit
def _dy_tile(dy_ptr, z_ptr, dy_pix, j_ok, k_glob, k_ok, c1, c2, c3, mu, sdy_c,
             DY_BN: tl.constexpr, DY_RELU: tl.constexpr, A_ALIGNED: tl.constexpr):
    """``dy [BLOCK_K, BLOCK_M]`` (output pixels at offsets ``dy_pix`` × output channels ``k_glob``, zero where
    not ``j_ok``/``k_ok``), formed on load under DY_BN. Pixels as rows, like the x tile, so both tiles share the
    pixel vectors' layout; the MMA takes its transpose."""
    if A_ALIGNED:  # every pixel's channel vector starts 16-element aligned
        dy_pix = tl.multiple_of(dy_pix, 16)
    a_off = dy_pix[:, None] + (k_glob * sdy_c)[None, :]  # contiguous along k for NHWC
    a_mask = j_ok[:, None] & k_ok[None, :]
    a = tl.load(dy_ptr + a_off, mask=a_mask, other=0.0)
    if DY_BN:
        yv = tl.load(z_ptr + a_off, mask=a_mask, other=0.0).to(tl.float32)
        a = dy_on_load(a, yv, c1[None, :], c2[None, :], c3[None, :], mu[None, :], a_mask, DY_RELU)
    return a


@triton.jit
def _flat_pixels(j0, stride, IDX64: tl.constexpr, BLOCK_K: tl.constexpr):
    """``j*stride`` for the step's pixels ``j = j0 + [0, BLOCK_K)`` of a tensor whose pixels are dense (int64
    under IDX64)."""
    j = j0 + tl.arange(0, BLOCK_K)
    if IDX64:
        j = j.to(tl.int64)
    return j * stride


@triton.jit
def _dy_pixels(j0, n, p, q, sdy_n, sdy_h, sdy_w, DY_FLAT: tl.constexpr, IDX64: tl.constexpr, BLOCK_K: tl.constexpr):
    """Offsets of the step's dy pixels: where dy's pixels are dense (DY_FLAT: ``sdy_h = Q*sdy_w``,
    ``sdy_n = P*Q*sdy_w``, as channels_last makes them) ``j*sdy_w``, no coordinates needed; else from the carried
    ``(n, p, q)``."""
    if DY_FLAT:
        return _flat_pixels(j0, sdy_w, IDX64, BLOCK_K)
    return n * sdy_n + p * sdy_h + q * sdy_w


@triton.jit
def _pixels_start(lo, P, Q, IDX64: tl.constexpr, BLOCK_K: tl.constexpr):
    """Output pixels ``lo + [0, BLOCK_K)`` as ``(n, p, q)`` (``n`` int64 under IDX64, else int32) and the
    per-step advance ``BLOCK_K = dn*P*Q + dp*Q + dq``: the only divisions of the K-loop, once per program."""
    n, p, q = rows_to_npq(lo + tl.arange(0, BLOCK_K), P, Q)
    if not IDX64:
        n = n.to(tl.int32)
    dq = BLOCK_K % Q
    dp = (BLOCK_K // Q) % P
    dn = BLOCK_K // Q // P
    return n, p, q, dn, dp, dq


@triton.jit
def _pixels_advance(n, p, q, dn, dp, dq, j0, P, Q, CARRY: tl.constexpr, IDX64: tl.constexpr, BLOCK_K: tl.constexpr):
    """``(n, p, q)`` of the pixels ``BLOCK_K`` further on (``j0``: the step's first pixel). CARRY: by carries
    (``dq < Q``, ``dp < P``: at most one carry per digit), no division, three vectors live across steps (the
    ALIGNED path, whose loads need few registers); else recomputed from ``j0`` (where the masked element loads
    need the registers)."""
    if not CARRY:
        n, p, q, _, _, _ = _pixels_start(j0 + BLOCK_K, P, Q, IDX64, BLOCK_K)
        return n, p, q
    q = q + dq
    cq = q >= Q
    q = tl.where(cq, q - Q, q)
    p = p + dp + cq.to(tl.int32)
    cp = p >= P
    p = tl.where(cp, p - P, p)
    n = n + dn + cp.to(n.dtype)
    return n, p, q


@triton.jit
def _mma(a, b, acc, DOT_IEEE: tl.constexpr):
    """``acc + aᵀ·b`` (a: the dy tile, pixels as rows), IEEE fp32 FMA or tensor cores."""
    if DOT_IEEE:
        return tl.dot(tl.trans(a), b, acc, input_precision="ieee")
    return tl.dot(tl.trans(a), b, acc)


@triton.jit
def _x_tile(x_ptr, j0, j_ok, n, p, q, h0, w0, h_col, w_col, x_col, c_ok, isc, ish, H, W, sx_n, sx_h, sx_w,
            SH: tl.constexpr, SW: tl.constexpr, PROLOGUE: tl.constexpr, ALIGNED: tl.constexpr, PACKED: tl.constexpr,
            PACK_C: tl.constexpr, X_FLAT: tl.constexpr, IDX64: tl.constexpr, BLOCK_K: tl.constexpr):
    """B = x [BLOCK_K, BLOCK_N] for the step's pixels at the tap's input offset ``(h0, w0)``, zero padding; the
    prologue applied (and masked again: padding is zero in relu(bn(y)), not relu(shift))."""
    h = p * SH + h0
    w = q * SW + w0
    if X_FLAT:  # 1×1, stride 1, no padding, dense pixels: pixel j of dy is pixel j of x, always inside
        x_pix = _flat_pixels(j0, sx_w, IDX64, BLOCK_K)
    elif PACK_C:  # x is the padded [N, PACK_C, H, W] channels_last copy: every pixel a PACK_C vector
        x_pix = ((n * H + h) * W + w) * PACK_C
    else:
        x_pix = n * sx_n + h * sx_h + w * sx_w
    if X_FLAT:
        b_mask = j_ok[:, None] & c_ok[None, :]
        if ALIGNED:
            x_pix = tl.multiple_of(x_pix, 16)
    elif PACKED:  # each column has its own tap: the bounds per element, unsigned (one compare per side)
        hc = (h[:, None] + h_col[None, :]).to(tl.uint32, bitcast=True)
        wc = (w[:, None] + w_col[None, :]).to(tl.uint32, bitcast=True)
        b_mask = (j_ok[:, None] & c_ok[None, :]) & (hc < H) & (wc < W)  # unsigned compares (uint32 wins)
    else:
        row_ok = j_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        b_mask = row_ok[:, None] & c_ok[None, :]
        if ALIGNED:
            x_pix = tl.multiple_of(x_pix, 16)
    b = tl.load(x_ptr + x_pix[:, None] + x_col[None, :], mask=b_mask, other=0.0)
    if PROLOGUE:
        xb = tl.maximum(b.to(tl.float32) * isc[None, :] + ish[None, :], 0.0)
        b = tl.where(b_mask, xb, 0.0).to(x_ptr.dtype.element_ty)
    return b


@triton.jit
def _conv_wgrad_kernel(
        dy_ptr, x_ptr, out_ptr,
        isc_ptr, ish_ptr,                                      # PROLOGUE: x = relu(x*isc + ish)
        z_ptr, c1_ptr, c2_ptr, c3_ptr, mu_ptr,                 # DY_BN
        sum_ptr,                                               # SUMS: [SPLIT, K] (or [K]) Σ of the dy operand
        H, W, R, Cg, Kg, P, Q, NPQ, CHUNK, so_sum,
        pad_h, pad_w, dil_h, dil_w,
        sdy_n, sdy_h, sdy_w, sdy_c,
        sx_n, sx_h, sx_w, sx_c,
        so_split, so_k, so_c, so_r, so_s,
        SH: tl.constexpr, SW: tl.constexpr, S: tl.constexpr, TILES_N: tl.constexpr, SPLIT: tl.constexpr,
        PROLOGUE: tl.constexpr, DY_BN: tl.constexpr, DY_RELU: tl.constexpr, SUMS: tl.constexpr,
        DOT_IEEE: tl.constexpr, ALIGNED: tl.constexpr, PACKED: tl.constexpr, IDX64: tl.constexpr,
        PACK_C: tl.constexpr, DY_FLAT: tl.constexpr, X_FLAT: tl.constexpr, ROW_TAPS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid1 = tl.program_id(1)
    tap = pid1 // TILES_N  # PACKED: always 0 (every tap is in the GEMM's N)
    pid_n = pid1 % TILES_N
    pid2 = tl.program_id(2)
    grp = pid2 // SPLIT
    split = pid2 % SPLIT
    if PACKED:
        r = 0
        s = 0
    elif ROW_TAPS:  # one program per filter row: its S taps (s = 0 here, the others from it)
        tl.static_assert(S <= 3, "ROW_TAPS: at most 3 taps per filter row (the accumulators)")
        r = tap
        s = 0
    else:
        r = tap // S
        s = tap % S
    A_ALIGNED: tl.constexpr = ALIGNED or PACKED  # the launcher gives PACKED an aligned dy
    # pixel coordinates carried across steps where the registers allow (sm_90 compile check: IEEE fp32 and the
    # PACKED prologue and int64 variants spill with them), else recomputed with divisions each step
    CARRY: tl.constexpr = not DOT_IEEE and (ALIGNED or (PACKED and not PROLOGUE and not IDX64))

    offs_k = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)    # output channels (GEMM M)
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)    # input channels (GEMM N), PACKED: (r, s, c) triples
    if A_ALIGNED:  # Kg % BLOCK_M == 0: every output channel of the tile exists
        k_ok = tl.full([BLOCK_M], True, tl.int1)
        k_glob = tl.multiple_of(grp * Kg + pid_m * BLOCK_M, 16) + tl.arange(0, BLOCK_M)
    else:
        k_ok = offs_k < Kg
        k_glob = grp * Kg + offs_k
    if PACK_C:  # PACKED over x padded to PACK_C channels: column = (r*S + s)*PACK_C + c, vectors of PACK_C
        r_col = offs_c // (S * PACK_C)
        s_col = offs_c // PACK_C % S
        c_col = offs_c % PACK_C
        c_ok = r_col < R
        st_ok = c_ok & (c_col < Cg)  # dW has no column for a padded channel
        c_glob = tl.minimum(c_col, Cg - 1)  # the prologue's vectors; a padded channel's column is never stored
        h_col = r_col * dil_h
        w_col = s_col * dil_w
        x_col = (h_col * W + w_col) * PACK_C + c_col
    elif PACKED:  # column = (r*S + s)*Cg + c: in NHWC a filter row's S taps × Cg channels are contiguous
        c_ok = offs_c < R * S * Cg
        st_ok = c_ok
        r_col = offs_c // (S * Cg)
        s_col = offs_c // Cg % S
        c_col = offs_c % Cg
        c_glob = grp * Cg + c_col
        h_col = r_col * dil_h                           # input offsets of each column's tap
        w_col = s_col * dil_w
        x_col = h_col * sx_h + w_col * sx_w + c_glob * sx_c
    elif ALIGNED:  # Cg % BLOCK_N == 0
        c_ok = tl.full([BLOCK_N], True, tl.int1)
        st_ok = c_ok
        c_col = offs_c
        c_glob = tl.multiple_of(grp * Cg + pid_n * BLOCK_N, 16) + tl.arange(0, BLOCK_N)
        x_col = c_glob * sx_c
    else:
        c_ok = offs_c < Cg
        st_ok = c_ok
        c_col = offs_c
        c_glob = grp * Cg + offs_c
        x_col = c_glob * sx_c
    if not PACKED:  # placeholders, unused off the PACKED path
        h_col = c_ok
        w_col = c_ok
    isc = c_ok  # placeholders, unused without the prologue
    ish = c_ok
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
            n, p, q, dn, dp, dq = _pixels_start(lo, P, Q, IDX64, BLOCK_K)
            dsum = tl.zeros([BLOCK_M], dtype=tl.float32)
            for j0 in range(lo, hi, BLOCK_K):
                j_ok = j0 + tl.arange(0, BLOCK_K) < hi
                a = _dy_tile(dy_ptr, z_ptr, _dy_pixels(j0, n, p, q, sdy_n, sdy_h, sdy_w, DY_FLAT, IDX64, BLOCK_K), j_ok,
                             k_glob, k_ok, c1, c2, c3, mu, sdy_c, DY_BN, DY_RELU, A_ALIGNED)
                dsum += tl.sum(a.to(tl.float32), axis=0)
                if not DY_FLAT:
                    n, p, q = _pixels_advance(n, p, q, dn, dp, dq, j0, P, Q, CARRY, IDX64, BLOCK_K)
            tl.store(sum_ptr + split * so_sum + k_glob, dsum, mask=k_ok)

    # pixel coordinates once per program, advanced by carries each step; the tap's input offset folded in
    n, p, q, dn, dp, dq = _pixels_start(lo, P, Q, IDX64, BLOCK_K)
    h0 = r * dil_h - pad_h
    w0 = s * dil_w - pad_w
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # ROW_TAPS: taps (r, 1) and (r, 2)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for j0 in range(lo, hi, BLOCK_K):
        j_ok = j0 + tl.arange(0, BLOCK_K) < hi
        a = _dy_tile(dy_ptr, z_ptr, _dy_pixels(j0, n, p, q, sdy_n, sdy_h, sdy_w, DY_FLAT, IDX64, BLOCK_K), j_ok, k_glob,
                     k_ok, c1, c2, c3, mu, sdy_c, DY_BN, DY_RELU, A_ALIGNED)
        b = _x_tile(x_ptr, j0, j_ok, n, p, q, h0, w0, h_col, w_col, x_col, c_ok, isc, ish, H, W, sx_n, sx_h, sx_w,
                    SH, SW, PROLOGUE, ALIGNED, PACKED, PACK_C, X_FLAT, IDX64, BLOCK_K)
        acc = _mma(a, b, acc, DOT_IEEE)
        if ROW_TAPS and S > 1:  # the row's other taps share the formed dy tile: its transform once per S MMAs
            b = _x_tile(x_ptr, j0, j_ok, n, p, q, h0, w0 + dil_w, h_col, w_col, x_col, c_ok, isc, ish, H, W,
                        sx_n, sx_h, sx_w, SH, SW, PROLOGUE, ALIGNED, PACKED, PACK_C, X_FLAT, IDX64, BLOCK_K)
            acc1 = _mma(a, b, acc1, DOT_IEEE)
            if S > 2:
                b = _x_tile(x_ptr, j0, j_ok, n, p, q, h0, w0 + 2 * dil_w, h_col, w_col, x_col, c_ok, isc, ish, H,
                            W, sx_n, sx_h, sx_w, SH, SW, PROLOGUE, ALIGNED, PACKED, PACK_C, X_FLAT, IDX64, BLOCK_K)
                acc2 = _mma(a, b, acc2, DOT_IEEE)
        if not (DY_FLAT and X_FLAT):  # nothing reads the coordinates otherwise
            n, p, q = _pixels_advance(n, p, q, dn, dp, dq, j0, P, Q, CARRY, IDX64, BLOCK_K)

    if PACKED:
        col_off = c_col * so_c + r_col * so_r + s_col * so_s
    else:
        col_off = c_col * so_c + r * so_r + s * so_s
    o_off = split * so_split + (k_glob * so_k)[:, None] + col_off[None, :]
    o_mask = k_ok[:, None] & st_ok[None, :]
    tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=o_mask)
    if ROW_TAPS and S > 1:
        tl.store(out_ptr + o_off + so_s, acc1.to(out_ptr.dtype.element_ty), mask=o_mask)
        if S > 2:
            tl.store(out_ptr + o_off + 2 * so_s, acc2.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _wgrad_combine_kernel(part_ptr, out_ptr, NUMEL, RS, CG, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    """``out[k, c, rs] = Σ_{split=0..SPLIT-1} part[split, k, rs, c]``, always in this order (deterministic):
    partials in the order the GEMM programs write them (taps outer, channels contiguous), read contiguously;
    ``out`` in dW's ``[K, Cg, R*S]`` order (RS = CG = 1: a plain sum, the dy sums)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < NUMEL
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(SPLIT):
        acc += tl.load(part_ptr + i * NUMEL + offs, mask=m, other=0.0)
    k = offs // (RS * CG)
    rem = offs % (RS * CG)
    dst = (k * CG + rem % CG) * RS + rem // CG
    tl.store(out_ptr + dst, acc.to(out_ptr.dtype.element_ty), mask=m)


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


def _packed(g: ConvGeometry, cfg: ConvConfig, dy: torch.Tensor, x: torch.Tensor) -> bool:
    """The kernel's PACKED switch: fewer than 16 channels per group (the stem's 3), so the GEMM's N packs every
    (r, s, c) of the filter (in NHWC each filter row's S taps × Cg channels are contiguous: 21 values for 7×7 ×
    3) instead of one tap's channels padded to a tile per program; dy must be aligned as on the ALIGNED path
    (Kg % BLOCK_M == 0, unit channel stride, 16-aligned rows); x may have any strides (masked element loads)."""
    return (g.Cg < CHANNEL_PAD and not _aligned(g, cfg, dy, x) and g.Kg % cfg.BLOCK_M == 0
            and rows_aligned(dy))


def _dense_pixels(t: torch.Tensor) -> bool:
    """Whether pixel ``j`` of ``t [N, C, H, W]`` (row-major over n, h, w) sits at ``j*t.stride(3)``: channels_last
    and any layout whose pixels are equally spaced (size-1 dimensions' strides do not matter)."""
    n, _, h, w = t.shape
    sn, _, sh, sw = t.stride()
    return (h == 1 or sh == w * sw) and (n == 1 or sn == h * w * sw)


def _flat_switches(g: ConvGeometry, dy: torch.Tensor, x: torch.Tensor, packed: bool) -> tuple:
    """The kernel's (DY_FLAT, X_FLAT): dy's pixel offsets without coordinates where its pixels are dense; x's
    too where the conv is pointwise (pixel j of dy reads pixel j of x, never padding) and not PACKED."""
    return _dense_pixels(dy), g.is_pointwise and not packed and _dense_pixels(x)


def _stages(cfg: ConvConfig, idx64: bool, fused: bool) -> int:
    """The cp.async kernel's pipeline depth: ``cfg``'s, but at most 2 with int64 offsets and both transforms
    (the 128x128 w8 tile: 255 registers and 28 B of spills at 3 stages, 224 and none at 2)."""
    return min(cfg.num_stages, 2) if idx64 and fused else cfg.num_stages


def _needs_int64(g: ConvGeometry, dy: torch.Tensor, x: torch.Tensor) -> bool:
    """The kernel's IDX64 switch: an offset the K-loop forms (one batch index past the end included: the last
    chunk's masked tail) may pass 2**31 - 1, so the pixel offsets are int64; else int32, fewer instructions."""
    sy, sx = [abs(v) for v in dy.stride()], [abs(v) for v in x.stride()]
    dy_max = (g.N + 1) * sy[0] + g.K * sy[1] + g.P * sy[2] + g.Q * sy[3]
    x_max = ((g.N + 1) * sx[0] + g.C * sx[1] + (g.P * g.stride[0] + g.R * g.dilation[0] + g.padding[0]) * sx[2]
             + (g.Q * g.stride[1] + g.S * g.dilation[1] + g.padding[1]) * sx[3])
    return max(dy_max, x_max) > 2**31 - 1


def _grid(g: ConvGeometry, cfg: ConvConfig, packed: bool, n_split: int, need_dw: bool) -> tuple:
    """The GEMM grid (output-channel tiles, taps × N tiles, chunks × groups) and TILES_N. PACKED: the R*S*Cg
    (tap, channel) columns in N tiles, no tap axis; ``cfg.row_taps``: filter rows, not taps. need_dw=False: only
    the first column, whose programs form the sums."""
    tiles_n = triton.cdiv(g.R * g.S * (g.pack_c or g.Cg) if packed else g.Cg, cfg.BLOCK_N)
    taps = 1 if packed else g.R if cfg.row_taps else g.R * g.S
    return (triton.cdiv(g.Kg, cfg.BLOCK_M), taps * tiles_n if need_dw else 1, n_split * g.groups), tiles_n


def chunks(g: ConvGeometry, cfg: ConvConfig, n_split: int) -> tuple:
    """(chunk, SPLIT, K-steps per chunk) of a launch asking for ``n_split`` chunks: the box kernel's (``cfg.tma``)
    in whole pixel blocks (:func:`.conv_wgrad_box.num_blocks`), the cp.async kernel's in pixels, whole BLOCK_K
    steps; SPLIT recomputed so no chunk is empty."""
    if cfg.tma:
        blocks = _box.num_blocks(g, cfg.BLOCK_K)
        chunk = triton.cdiv(blocks, n_split)
        return chunk, triton.cdiv(blocks, chunk), chunk
    npq = g.N * g.P * g.Q
    chunk = triton.cdiv(triton.cdiv(npq, n_split), cfg.BLOCK_K) * cfg.BLOCK_K
    return chunk, triton.cdiv(npq, chunk), chunk // cfg.BLOCK_K


def _launch_wgrad(cfg: ConvConfig, g: ConvGeometry, grad_out, x, dw, sums, pro_ops, bn_ops,
                  sw: WgradSwitches) -> None:
    """One wgrad launch with ``cfg`` (the box kernel where ``cfg.tma``, else :func:`_launch_gather`; when split,
    then the combines), writing ``dw``
    (unless not ``need_dw``) and ``sums`` (when ``dy_sums``). ``pro_ops`` = (in_scale, in_shift) and ``bn_ops``
    (the :class:`DyBN` fields) are placeholders where their switch is off."""
    if cfg.tma:  # a 1×1 conv's pixels as one row of one image where flat_rows
        g, (grad_out, x, y) = as_rows(g, grad_out, x, bn_ops[0])
        bn_ops = (y, *bn_ops[1:])
    packed = not cfg.tma and _packed(g, cfg, grad_out, x)
    n_split = sw.split if sw.split is not None else pick_split(g, cfg, first_column_only=not sw.need_dw,
                                                               packed=packed, dy_bn=sw.dy_bn,
                                                               prologue=sw.prologue)
    chunk, n_split, _ = chunks(g, cfg, n_split)
    # fp32 partials [SPLIT, K, R, S, Cg]: each program's tile is contiguous along its channels (and, PACKED,
    # along its (s, c) columns); the combine writes dW's [K, Cg, R, S] order
    out = dw if n_split == 1 else torch.empty((n_split, g.K, g.R, g.S, g.Cg), dtype=torch.float32,
                                              device=dw.device)
    so = dw.stride() if n_split == 1 else (out.stride(1), out.stride(4), out.stride(2), out.stride(3))
    sum_part = sums if n_split == 1 or not sw.dy_sums else torch.empty((n_split, g.K), dtype=torch.float32,
                                                                       device=dw.device)
    if cfg.tma:
        _box.launch(cfg, g, grad_out, x, out, so, out.stride(0) if n_split > 1 else 0, sum_part,
                    g.K if n_split > 1 else 0, bn_ops, pro_ops, sw, n_split, chunk)
    else:
        _launch_gather(cfg, g, grad_out, x, out, so, sum_part, pro_ops, bn_ops, sw, packed, n_split, chunk)
    if n_split > 1:
        if sw.need_dw:
            _combine(out, dw, n_split, g.R * g.S, g.Cg)
        if sw.dy_sums:
            _combine(sum_part, sums, n_split, 1, 1)


def _launch_gather(cfg, g, grad_out, x, out, so, sum_part, pro_ops, bn_ops, sw, packed, n_split, chunk) -> None:
    """The :func:`_conv_wgrad_kernel` launch of :func:`_launch_wgrad` (the cp.async paths)."""
    npq = g.N * g.P * g.Q
    pack_c = g.pack_c if packed else 0
    if pack_c:  # x as the forward's dense-taps path reads it: PACK_C-wide pixel vectors
        x = dense_input(x, g)
    dy_flat, x_flat = _flat_switches(g, grad_out, x, packed)
    grid, tiles_n = _grid(g, cfg, packed, n_split, sw.need_dw)
    idx64 = _needs_int64(g, grad_out, x)
    _conv_wgrad_kernel[grid](
        grad_out, x, out, *pro_ops, *bn_ops, out if sum_part is None else sum_part,
        g.H, g.W, g.R, g.Cg, g.Kg, g.P, g.Q, npq, chunk, g.K if n_split > 1 else 0,
        g.padding[0], g.padding[1], g.dilation[0], g.dilation[1],
        grad_out.stride(0), grad_out.stride(2), grad_out.stride(3), grad_out.stride(1),
        x.stride(0), x.stride(2), x.stride(3), x.stride(1),
        out.stride(0) if n_split > 1 else 0, *so,
        SH=g.stride[0], SW=g.stride[1], S=g.S, TILES_N=tiles_n, SPLIT=n_split,
        PROLOGUE=sw.prologue, DY_BN=sw.dy_bn, DY_RELU=sw.dy_relu, SUMS=sw.dy_sums,
        DOT_IEEE=sw.dot_ieee, ALIGNED=_aligned(g, cfg, grad_out, x), PACKED=packed,
        IDX64=idx64, PACK_C=pack_c, DY_FLAT=dy_flat, X_FLAT=x_flat,
        ROW_TAPS=cfg.row_taps and not packed, BLOCK_M=cfg.BLOCK_M,
        BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, num_warps=cfg.num_warps,
        num_stages=_stages(cfg, idx64, sw.prologue and sw.dy_bn))


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
        config: tile config; default :func:`autotune.choose` ("conv_wgrad": pinned, interpreter, autotuned among
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

    pass_ok = _pass.worth_offering(g, sw.prologue)

    def launch(cfg: ConvConfig):
        if cfg.prologue_pass:  # the prologue once per element, then the GEMM without it (timed with the pass)
            a = _pass.apply(x, in_scale, in_shift, True)
            _launch_wgrad(cfg, g, grad_out, a, dw, sums, (dw, dw), bn_ops, sw._replace(prologue=False))
        else:
            _launch_wgrad(cfg, g, grad_out, x, dw, sums, pro_ops, bn_ops, sw)

    y = None if dy_bn is None else dy_bn[0]
    if config is None:
        cands, default = _candidates(g, grad_out, x, sw.dy_bn, sw.dot_ieee, sw.prologue, y=y)
        if pass_ok:  # twins of the candidates without the prologue in the loop, and the untuned default (see
            twins, default = _candidates(g, grad_out, x, sw.dy_bn, sw.dot_ieee, y=y)  # prologue_pass)
            cands = tuple(cands) + tuple(replace(c, prologue_pass=True) for c in twins)
            default = replace(default, prologue_pass=True)
        config = choose("conv_wgrad", g, grad_out.dtype, dev, cands, sw, launch, default)
    check(not config.row_taps or g.S <= _MAX_ROW_TAPS or _packed(g, config, grad_out, x),
          f"{who}: config {config.name()} runs a filter row per program, at most {_MAX_ROW_TAPS} taps (S={g.S})")
    check(not config.tma or (tma_allowed(dev) and _box.eligible(
              g, config, grad_out, x, sw.prologue and not config.prologue_pass, sw.dot_ieee, y)),
          f"{who}: config {config.name()} loads TMA boxes, which needs groups 1, 16-bit tensor-core operands, "
          "channel tiles dividing K and C, 16-byte aligned channels_last dy, x and y, a pixel in each stride phase "
          "of x, for a row-taps tile stride 1 without the prologue, and TMA on this device "
          "(conv_wgrad_box.eligible)")
    check(not config.prologue_pass or pass_ok, f"{who}: config {config.name()} runs the prologue as a pass, "
          "which needs a prologue, a filter of more than one tap and the C++ extension (prologue_pass.worth_offering)")
    launch(config)
    return (dw if need_dw else None, sums) if dy_sums else dw


def _combine(part: torch.Tensor, res: torch.Tensor, split: int, rs: int, cg: int) -> None:
    """res = Σ over the leading SPLIT axis of part, in index order (deterministic); part [SPLIT, K, RS, CG]
    goes to res [K, CG, RS]."""
    numel = res.numel()
    _wgrad_combine_kernel[(triton.cdiv(numel, _COMBINE_BLOCK),)](part, res, numel, rs, cg, SPLIT=split,
                                                                 BLOCK=_COMBINE_BLOCK, num_warps=4)


# The constexpr variants the ops launch: plain (no op fuses anything), the training op with a BN+ReLU prologue
# (and BN backward on load), the training op without prologue (dy_bn only), the inference op's backward without
# and with ReLU (sums; dy_bn + dy_relu + sums), and the training op's triton_dy_pass runner with a prologue
# (dy formed beforehand; where the prologue pass is not taken, e.g. stride 2). One table for both wgrad kernels.
VARIANTS = _box.VARIANTS
# triton_dy_pass runs only where R·S >= 4 and, with a prologue, not in IEEE fp32 (bn_dy.dy_pass_may_pay): never on
# the 1×1 X_FLAT path or the FMA (DOT_IEEE) one
_DY_PASS_ONLY = ("prologue",)


def compile_specs() -> list:
    """(jit_fn, signature, constexprs, options, is_gemm, div16) for the sm_90 compile check, at a stride-2 3×3
    geometry with SPLIT=4: every config × dtype × :data:`VARIANTS` on the ALIGNED path (:data:`WIDE_CONFIG` in
    the variants without DY_BN, :data:`DY_CONFIG` in those with it, PROLOGUE on the 1×1 path, :data:`ROW_CONFIGS`
    in those without PROLOGUE), with the channel counts
    and pixel strides multiples of 16 as Triton's launcher specialises them for ResNet layers; the masked general
    path at the config the launcher gives it (64×32), without divisibility hints (its worst case: the stem's
    C=3, 4-32 channels per group, NCHW strides); the PACKED path at its config, with the stem's 7×7/2 and dy's
    hints, over x padded to 4 channels (PACK_C, the stem) and over x as given (PACK_C=0: x's NHWC pixel stride
    may be 3); the ALIGNED path of a 1×1 stride-1 conv (X_FLAT: dy and x by pixel index) for bf16; int32
    offsets (IDX64 off, every ResNet-50 layer at batch 256) and one IDX64 spec per path; the combine kernel."""
    ints = ("H", "W", "R", "Cg", "Kg", "P", "Q", "NPQ", "CHUNK", "so_sum", "pad_h", "pad_w", "dil_h", "dil_w",
            "sdy_n", "sdy_h", "sdy_w", "sx_n", "sx_h", "sx_w", "so_split", "so_k", "so_c", "so_r", "so_s")
    # ResNet layer: Cg, Kg, N*P*Q and the NHWC strides are multiples of 16; CHUNK always is (whole BLOCK_K
    # steps); so_sum = K is; the split partials [SPLIT, K, R, S, Cg] have so_k, so_r, so_s multiples of Cg and
    # so_c = 1; H, W, P, Q are not in general.
    div16 = ("Cg", "Kg", "NPQ", "CHUNK", "so_sum", "sdy_n", "sdy_h", "sdy_w", "sx_n", "sx_h", "sx_w", "so_split",
             "so_k", "so_r", "so_s")
    div16_packed = ("Kg", "NPQ", "CHUNK", "so_sum", "sdy_n", "sdy_h", "sdy_w", "so_split")

    def is_fused(variant):  # both operand transforms in the loop
        return bool(VARIANTS[variant].get("DY_BN") and VARIANTS[variant].get("PROLOGUE"))

    def spec(base, dt, tdt, variant, aligned, ieee=False, packed=False, idx64=False, pack_c=0, pointwise=False):
        cfg = for_ieee(for_dtype(base, tdt), 2) if ieee else for_dtype(base, tdt)
        fused = is_fused(variant)
        sig = {"dy_ptr": f"*{dt}", "x_ptr": f"*{dt}", "out_ptr": "*fp32", "isc_ptr": "*fp32",
               "ish_ptr": "*fp32", "z_ptr": f"*{dt}", "c1_ptr": "*fp32", "c2_ptr": "*fp32",
               "c3_ptr": "*fp32", "mu_ptr": "*fp32", "sum_ptr": "*fp32"}
        sig.update({name: "i32" for name in ints})
        cx = {"sdy_c": 1, "sx_c": 1, "SH": 1 if pointwise else 2, "SW": 1 if pointwise else 2,
              "S": 7 if packed else 1 if pointwise else 3, "TILES_N": 1 if packed else 2,
              "SPLIT": 4, "PROLOGUE": False, "DY_BN": False, "DY_RELU": False, "SUMS": False, **VARIANTS[variant],
              "DOT_IEEE": ieee, "ALIGNED": aligned, "PACKED": packed, "IDX64": idx64, "PACK_C": pack_c,
              "DY_FLAT": aligned or packed, "X_FLAT": pointwise, "ROW_TAPS": cfg.row_taps,
              "BLOCK_M": cfg.BLOCK_M, "BLOCK_N": cfg.BLOCK_N, "BLOCK_K": cfg.BLOCK_K}
        sig.update({k: "constexpr" for k in cx})
        return (_conv_wgrad_kernel, ordered_signature(_conv_wgrad_kernel, sig), cx,
                {"num_warps": cfg.num_warps, "num_stages": _stages(cfg, idx64, fused)}, not ieee,
                div16 if aligned else div16_packed if packed else ("CHUNK",))

    dtypes = (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32))
    fused_ok = lambda base, v: _fused_ok(base, is_fused(v))  # noqa: E731
    specs = [spec(base, dt, tdt, v, True) for base in WGRAD_CONFIGS for dt, tdt in dtypes for v in VARIANTS
             if fused_ok(base, v)]
    specs += [spec(base, "bf16", torch.bfloat16, v, True, pointwise=True) for base in WGRAD_CONFIGS
              for v in VARIANTS if v not in _DY_PASS_ONLY and fused_ok(base, v)]  # 1×1 stride 1: X_FLAT
    no_dy_bn = [v for v in VARIANTS if not VARIANTS[v].get("DY_BN")]  # the wide tile's (see WIDE_CONFIG)
    specs += [spec(WIDE_CONFIG, dt, tdt, v, True) for dt, tdt in dtypes for v in no_dy_bn]
    specs += [spec(WIDE_CONFIG, "bf16", torch.bfloat16, v, True, pointwise=True) for v in no_dy_bn
              if v not in _DY_PASS_ONLY]
    dy_bn = [v for v in VARIANTS if VARIANTS[v].get("DY_BN")]  # the dy-transform tile's (see DY_CONFIG)
    specs += [spec(DY_CONFIG, dt, tdt, v, True) for dt, tdt in dtypes for v in dy_bn if not VARIANTS[v].get("PROLOGUE")]
    specs += [spec(DY_CONFIG, dt, tdt, v, True, pointwise=True) for dt, tdt in dtypes for v in dy_bn
              if dt == "bf16" or VARIANTS[v].get("PROLOGUE")]  # with the prologue it runs on the 1×1 path only
    specs += [spec(base, dt, tdt, v, True) for base in ROW_CONFIGS for dt, tdt in dtypes for v in VARIANTS
              if not VARIANTS[v].get("PROLOGUE")]  # the row-taps tiles (see ROW_CONFIGS)
    specs += [spec(_GENERAL_CONFIG, dt, tdt, v, False) for dt, tdt in dtypes for v in VARIANTS]
    specs += [spec(_DENSE_CONFIG if pc else _PACKED_CONFIG, dt, tdt, v, False, packed=True, pack_c=pc)
              for dt, tdt in dtypes for v in VARIANTS for pc in (0, 4)]
    specs += [spec(WGRAD_CONFIGS[1], "bf16", torch.bfloat16, "fused", True, idx64=True),
              spec(WGRAD_CONFIGS[1], "bf16", torch.bfloat16, "dy_bn", True, idx64=True, pointwise=True),
              spec(_GENERAL_CONFIG, "bf16", torch.bfloat16, "fused", False, idx64=True)]
    specs += [spec(_DENSE_CONFIG if pc else _PACKED_CONFIG, "bf16", torch.bfloat16, "dy_bn", False, packed=True,
                   idx64=True, pack_c=pc) for pc in (0, 4)]
    # IEEE fp32 (the default unless TF32 is allowed, configs.conv_allows_tf32): FMA, not wgmma, by design
    specs += [spec(base, "fp32", torch.float32, v, aligned, ieee=True)
              for base, aligned in [(b, True) for b in WGRAD_CONFIGS] + [(_GENERAL_CONFIG, False)]
              for v in VARIANTS if v not in _DY_PASS_ONLY and fused_ok(base, v)]
    specs += [spec(_DENSE_CONFIG if pc else _PACKED_CONFIG, "fp32", torch.float32, v, False, ieee=True,
                   packed=True, pack_c=pc) for v in VARIANTS if v not in _DY_PASS_ONLY for pc in (0, 4)]
    specs.append((_wgrad_combine_kernel, {"part_ptr": "*fp32", "out_ptr": "*bf16", "NUMEL": "i32", "RS": "i32",
                                          "CG": "i32", "SPLIT": "constexpr", "BLOCK": "constexpr"},
                  {"SPLIT": 4, "BLOCK": _COMBINE_BLOCK}, {"num_warps": 4, "num_stages": 1}, False))
    return specs
