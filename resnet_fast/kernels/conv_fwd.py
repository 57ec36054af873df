"""Fused conv forward as a Triton implicit GEMM over NHWC activations and KRSC-packed weights.

``y = act((conv(x, W) + bias) * scale[k] + shift[k] + residual)`` with every term optional, optionally with
an input prologue ``x -> relu(x*in_scale[c] + in_shift[c])`` and a batch-statistics epilogue.
``x`` (``[N, C, H, W]`` channels_last), the packed weight, ``residual`` and ``y`` (``[N, K, P, Q]``
channels_last) share one dtype, fp32/fp16/bf16 (fp32 as IEEE or TF32, :func:`configs.conv_allows_tf32`); the
per-channel vectors are read as fp32 and the accumulation is fp32.

GEMM view (see :mod:`.conv_common`): per group, ``M = N*P*Q`` output pixels × ``Kg`` output channels,
reduced over ``R*S`` taps × ``Cg`` input channels. One program owns a ``BLOCK_M × BLOCK_N`` output tile
(grouped pid order for L2 reuse of weight tiles; groups on grid axis 1) and walks one flattened loop over
(tap, channel block), so Triton software-pipelines the loads across taps; ``tl.dot`` accumulates in fp32
(wgmma on sm_90, mma on sm_80). The tap and channel block are carried from step to step (no division in the
loop); each row's input pixel for tap (0, 0) and its offset are computed once, and a step adds the tap's
uniform offset and checks the bounds with one unsigned compare per side. The A tile is gathered from ``x`` with
the padding/out-of-range rows and channels ``c >= Cg`` masked to zero; the B tile comes from the packed weight
``[K_pad, R, S, Cg_pad]``, whose zero-padded channels let 4 channels per group run as a 16-wide MMA step and
whose rows, padded to a multiple of 256, let every weight tile load without a row mask. A 1×1 stride-1
unpadded conv (``POINTWISE``) skips the pixel math: row ``m`` reads ``x`` at ``m*C``.

Dense taps (``PACK_C``, :attr:`ConvGeometry.pack_c`: ``groups == 1``, at most 8 channels, ``S > 1`` -- the
stem): padding 3 channels to a 16-wide step per tap would spend 49 steps of 16 on 147 real terms. Instead the
launcher zero-pads ``x`` to ``PACK_C`` channels (4 for the stem: each pixel an 8-byte vector, so cp.async and
pipelining), and one K-step covers a whole filter row ``r``: its ``S`` taps × ``PACK_C`` channels are contiguous
in NHWC, columns ``s*PACK_C + c`` of a ``taps_k``-wide step (28 of 32 for the stem; 7 steps). The weight is
packed to match (``[K_pad, R, taps_k]``). Column positions and bounds are computed once per program; a step adds
only the row's ``h``. The prologue's per-channel vectors are loaded once, before the loop.

``TMA`` (a tuning candidate, ``ConvConfig.tma``; pointwise convs with ``groups=1`` on sm_90+): the A and B tiles
come from host-built TMA descriptors of ``x`` as a ``[M, C]`` matrix and the packed weight as ``[K_pad, Cg_pad]``
instead of pointer gathers; the hardware zero-fills rows ``>= M`` and channels ``>= C``, so no load masks and
no address math per element. It needs 16-byte-aligned bases and rows (``C`` a multiple of 8 for 16-bit
operands, 4 for fp32) and ``M < 2**31`` (TMA coordinates are int32); :func:`tma_eligible` decides, and the
autotuner only keeps it where it measures faster.

On a conv of more than one tap a ``tma`` config runs :mod:`.conv_fwd_box` instead: stride 1, output tiles that
are a pixel block of one image, each tap's input a 4-D NHWC box (the zero fill is the padding), where the blocks
tile the output exactly (:func:`.conv_fwd_box.eligible`); offered and the untuned default there.

``PERSISTENT`` (a tuning candidate, ``ConvConfig.persistent``: :func:`_persistent_twins`, on pointwise convs with
groups 1, 16-bit 128×128 tiles, gather or TMA): one program per SM (:func:`.configs.persistent_programs`) walks
the output tiles, stride the program count, N fastest (the programs in flight share their x rows in L2; the
weights fit in it whole). The tile loop is ``tl.range(..., flatten=True)``: Triton fuses it with the K-loop into
one software-pipelined loop with the epilogue under a condition, so the next tile's first loads are in flight
while this tile's epilogue (stores, stats) runs. A non-persistent 128×128 w8 tile needs ~170-250 registers per
thread, so one CTA fills an SM and nothing hides its epilogue; a 1×1 conv has 1-32 K-steps per tile, so the
epilogue is a large share (:mod:`.cost_report` scores it). On a filter of more taps the per-step cost of the
flattened loop (the rows' coordinates redone every step) outweighs it: not offered there.

Fusions (constexpr switches, all off by default, used by the training path):

* ``PROLOGUE``: ``a = relu?(x*in_scale[c] + in_shift[c])`` applied to the loaded A tile in fp32, then the load
  mask is re-applied (a masked 0 would otherwise become ``relu(in_shift)``: padding must stay zero), then
  rounded back to the operand dtype.
* ``STATS``: after the output is rounded to its dtype, per-channel fp32 ``Σy`` and ``M2 = Σ(y - ȳ_tile)²``
  (centred on the tile's own mean, so a channel with |mean| ≫ std loses nothing to ``E[y²] - E[y]²``
  cancellation) over the tile's valid rows go to ``partials[0, pid_m, k]`` and ``partials[1, pid_m, k]``
  (shape ``[2, T, K]``, ``T = cdiv(M, BLOCK_M)``): every element is written by exactly one program, no
  atomics, deterministic. :func:`resnet_fast.kernels.bn_finalize.bn_finalize` merges the tiles Chan-style
  (:class:`TileStats` carries the partials and ``BLOCK_M``).

Offsets scaled by the batch index or the GEMM row are int64; offsets within one image are int32
(:meth:`ConvGeometry.check_index_range`).
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import replace
from typing import NamedTuple

import torch
import triton
import triton.language as tl

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # triton < 3.4: no host-side descriptors (configs.tma_allowed is then False)
    TensorDescriptor = None

from . import autotune as _tune
from . import conv_fwd_box as _box
from . import configs as _cfg
from . import prologue_pass as _pass
from .checks import FLOAT_DTYPES, check, check_operand_dtype, check_vector, describe
from .configs import ConvConfig
from .conv_common import (ConvGeometry, dense_input, next_tap_step, ordered_signature, rows_to_npq,
                          swizzle_pid)
from .fwd_epilogue import epilogue
from .tile_stats import TileStats

__all__ = ["conv2d_nhwc", "pack_weight", "pinned_config", "tma_eligible", "persistent_configs", "compile_specs",
           "SUPPORTED_DTYPES", "TileStats", "FwdSwitches"]

SUPPORTED_DTYPES = FLOAT_DTYPES  # the operand dtypes the kernel takes (fp32 as IEEE or TF32)


@triton.jit
def _conv_fwd_kernel(
        x_ptr, w_ptr, y_ptr,
        bias_ptr, scale_ptr, shift_ptr, res_ptr,
        in_scale_ptr, in_shift_ptr, part_ptr, x_desc, w_desc,
        H, W, C, P, Q, K, Cg, Kg, Cg_pad, M,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        R: tl.constexpr, S: tl.constexpr, POINTWISE: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RES: tl.constexpr,
        RELU: tl.constexpr, PROLOGUE: tl.constexpr, IN_RELU: tl.constexpr, STATS: tl.constexpr,
        DOT_IEEE: tl.constexpr, C_ALIGN: tl.constexpr, EVEN_C: tl.constexpr, TMA: tl.constexpr,
        PACK_C: tl.constexpr, PERSISTENT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(Kg, BLOCK_N)
    if PERSISTENT:  # groups 1: a program per SM walks the tiles, N fastest (see the module docstring)
        for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, tl.num_programs(0), flatten=True):
            # one unsigned division per tile: in the flattened loop it is paid every step (swizzle_pid's four were)
            pid_m = (tl.cast(tile, tl.uint32) // tl.cast(num_pid_n, tl.uint32)).to(tl.int32)
            pid_n = tile - pid_m * num_pid_n
            _fwd_tile(pid_m, pid_n, 0, num_pid_m, x_ptr, w_ptr, y_ptr, bias_ptr, scale_ptr, shift_ptr, res_ptr,
                      in_scale_ptr, in_shift_ptr, part_ptr, x_desc, w_desc, H, W, C, P, Q, K, Cg, Kg, Cg_pad, M,
                      stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, R, S, POINTWISE, HAS_BIAS, HAS_SCALE,
                      HAS_SHIFT, HAS_RES, RELU, PROLOGUE, IN_RELU, STATS, DOT_IEEE, C_ALIGN, EVEN_C, TMA, PACK_C,
                      BLOCK_M, BLOCK_N, BLOCK_K)
    else:  # its own call: a one-trip tl.range here is not folded away (sm_90: up to 7 % more instructions a step)
        pid_m, pid_n = swizzle_pid(tl.program_id(0), num_pid_m, num_pid_n, GROUP_M)
        _fwd_tile(pid_m, pid_n, tl.program_id(1), num_pid_m, x_ptr, w_ptr, y_ptr, bias_ptr, scale_ptr, shift_ptr,
                  res_ptr, in_scale_ptr, in_shift_ptr, part_ptr, x_desc, w_desc, H, W, C, P, Q, K, Cg, Kg, Cg_pad, M,
                  stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, R, S, POINTWISE, HAS_BIAS, HAS_SCALE, HAS_SHIFT,
                  HAS_RES, RELU, PROLOGUE, IN_RELU, STATS, DOT_IEEE, C_ALIGN, EVEN_C, TMA, PACK_C, BLOCK_M, BLOCK_N,
                  BLOCK_K)


@triton.jit
def _fwd_tile(
        pid_m, pid_n, grp, num_pid_m, x_ptr, w_ptr, y_ptr,
        bias_ptr, scale_ptr, shift_ptr, res_ptr,
        in_scale_ptr, in_shift_ptr, part_ptr, x_desc, w_desc,
        H, W, C, P, Q, K, Cg, Kg, Cg_pad, M,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        R: tl.constexpr, S: tl.constexpr, POINTWISE: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RES: tl.constexpr,
        RELU: tl.constexpr, PROLOGUE: tl.constexpr, IN_RELU: tl.constexpr, STATS: tl.constexpr,
        DOT_IEEE: tl.constexpr, C_ALIGN: tl.constexpr, EVEN_C: tl.constexpr, TMA: tl.constexpr,
        PACK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Output tile ``(pid_m, pid_n)`` (``BLOCK_M`` GEMM rows × ``BLOCK_N`` channels) of group ``grp``."""
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: M may pass 2**31 / K
    row_ok = offs_m < M
    n, p, q = rows_to_npq(offs_m, P, Q)
    x_img = n * H * W * C + grp * Cg  # int64 base of each row's image (and group)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < Kg
    k_glob = grp * Kg + offs_n
    w_col = k_glob * (R * S * Cg_pad)
    offs_c = tl.arange(0, BLOCK_K)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if PACK_C:  # few channels: one step per filter row, its S taps × PACK_C channels dense (see the docstring)
        s_j = offs_c // PACK_C
        c_j = offs_c % PACK_C
        w_j = q[:, None] * stride_w - pad_w + (s_j * dil_w)[None, :]  # [BLOCK_M, BLOCK_K], the same every row r
        col_ok = (s_j < S)[None, :] & (w_j >= 0) & (w_j < W)
        x_pix = (n * H * W * PACK_C)[:, None] + (w_j * PACK_C + c_j[None, :])  # groups 1: no group offset
        w_row = tl.multiple_of(k_glob * (R * BLOCK_K), 16)
        if PROLOGUE:  # per column, once: the loop reads no per-channel vector
            p_scale = tl.load(in_scale_ptr + tl.minimum(c_j, C - 1))[None, :]
            p_shift = tl.load(in_shift_ptr + tl.minimum(c_j, C - 1))[None, :]
        for r in range(0, R):
            h = p * stride_h - pad_h + r * dil_h
            a_mask = (row_ok & (h >= 0) & (h < H))[:, None] & col_ok
            a = tl.load(x_ptr + x_pix + (h * (W * PACK_C))[:, None], mask=a_mask, other=0.0)
            b = tl.load(w_ptr + (w_row + r * BLOCK_K)[None, :] + offs_c[:, None])  # K_pad rows: no mask
            if PROLOGUE:
                af = a.to(tl.float32) * p_scale + p_shift
                if IN_RELU:
                    af = tl.maximum(af, 0.0)
                a = tl.where(a_mask, af, 0.0).to(x_ptr.dtype.element_ty)
            if DOT_IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
    c_blocks = tl.cdiv(Cg, BLOCK_K)
    steps = R * S * c_blocks
    if PACK_C:
        steps = 0
    # per row once: the input pixel of tap (0, 0) and its offset; a step adds the tap's uniform offset to it
    h_base = p * stride_h - pad_h
    w_base = q * stride_w - pad_w
    row_base = x_img + (h_base * W + w_base) * C
    w_ptrs = w_ptr + w_col[None, :] + offs_c[:, None]  # tap (0, 0), channels [0, BLOCK_K); K_pad rows: no row mask
    r = 0  # the step's tap (r, s) and channel block c0, carried (no division in the loop)
    s = 0
    c0 = 0
    for _ in range(0, steps):
        rs = r * S + s
        cc = c0 + offs_c
        if TMA:  # pointwise, groups 1: boxes of x as [M, C] and w as [K_pad, Cg_pad]; TMA zero-fills past the edges
            a = x_desc.load([pid_m * BLOCK_M, c0])
            b = w_desc.load([pid_n * BLOCK_N, c0]).T
        else:
            if POINTWISE:  # h = p, w = q: the row's pixel is the input pixel
                a_row = offs_m * C + grp * Cg
                a_rows_ok = row_ok
            else:  # inside the image: one unsigned compare per side (a negative coordinate wraps past H, W)
                dh = r * dil_h
                dw = s * dil_w
                inside = ((h_base + dh).to(tl.uint32, bitcast=True) < H) & \
                    ((w_base + dw).to(tl.uint32, bitcast=True) < W)
                a_row = row_base + (dh * W + dw) * C
                a_rows_ok = row_ok & inside
            a_row = tl.multiple_of(a_row, C_ALIGN)  # every row starts at a multiple of gcd(Cg, 16) elements
            w_step = tl.multiple_of(rs * Cg_pad + c0, 16)  # Cg_pad and BLOCK_K are multiples of 16
            if EVEN_C:  # no channel mask: masks constant along c keep loads vectorised (and cp.async-pipelined)
                a_mask = a_rows_ok[:, None]
            else:
                c_ok = cc < Cg
                a_mask = a_rows_ok[:, None] & c_ok[None, :]
            a = tl.load(x_ptr + a_row[:, None] + cc[None, :], mask=a_mask, other=0.0)
            if EVEN_C:
                b = tl.load(w_ptrs + w_step)
            else:  # a channel block past Cg_pad would read the next tap's (or past the last) row
                b = tl.load(w_ptrs + w_step, mask=c_ok[:, None], other=0.0)
        if PROLOGUE:  # in_scale/in_shift are read at c < Cg only (channels past Cg: see the mask below)
            c_in = grp * Cg + tl.minimum(cc, Cg - 1)
            af = a.to(tl.float32) * tl.load(in_scale_ptr + c_in)[None, :] + tl.load(in_shift_ptr + c_in)[None, :]
            if IN_RELU:
                af = tl.maximum(af, 0.0)
            if not POINTWISE:  # padding stays zero, not relu(shift); a pointwise conv reads none (rows past M
                af = tl.where(a_mask, af, 0.0)  # are never stored nor counted, channels past Cg meet zero weights)
            a = af.to(x_ptr.dtype.element_ty)
        if DOT_IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        r, s, c0 = next_tap_step(r, s, c0, Cg, S, BLOCK_K)  # the next channel block, else the next tap

    rows = tl.minimum(M - pid_m.to(tl.int64) * BLOCK_M, BLOCK_M).to(tl.float32)
    epilogue(acc, offs_m, row_ok, rows, k_glob, n_ok, pid_m, num_pid_m, K, y_ptr, bias_ptr, scale_ptr, shift_ptr,
             res_ptr, part_ptr, HAS_BIAS, HAS_SCALE, HAS_SHIFT, HAS_RES, RELU, STATS)


def _pow2_divisor(v: int, cap: int) -> int:
    """Largest power of two <= cap dividing v (the alignment, in elements, of every row start)."""
    a = 1
    while a < cap and v % (2 * a) == 0:
        a *= 2
    return a


# ------------------------------------------------------------------------------------------ weight packing
_PACK_LOCK = threading.Lock()
_PACKED: dict = {}
_PACK_CACHE_MAX = 256


def _pack_eager(weight: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    K, Cg, R, S = weight.shape
    g = ConvGeometry.make((1, Cg * groups, R, S), weight.shape, groups=groups, who="pack_weight")
    krsc = weight.detach().permute(0, 2, 3, 1)
    if g.pack_c:  # dense taps: row r's column s*pack_c + c
        out = torch.zeros((g.K_pad, R, S, g.pack_c), dtype=dtype, device=weight.device)
        out[:K, ..., :Cg] = krsc
        return torch.nn.functional.pad(out.reshape(g.K_pad, R, S * g.pack_c), (0, g.taps_k - S * g.pack_c))
    out = torch.zeros(g.packed_weight_shape, dtype=dtype, device=weight.device)
    out[:K, ..., :Cg] = krsc
    return out


def pack_weight(weight: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """OIHW ``weight [K, C/groups, R, S]`` -> ``[K_pad, R, S, Cg_pad]`` in ``dtype`` (rows zero-padded to a multiple
    of 256, channels to a multiple of 16), or ``[K_pad, R, taps_k]`` where the dense-taps path applies
    (:attr:`ConvGeometry.pack_c`; :attr:`ConvGeometry.packed_weight_shape` says which), cached.

    The cache key is (data_ptr, shape, strides, dtype, target dtype, device, groups); an entry is used only
    while the very tensor it was packed from is alive and its ``_version`` is unchanged, so an in-place
    update (optimizer step, ``copy_``) or a new tensor at a recycled address repacks instead of going stale.
    """
    key = (weight.data_ptr(), tuple(weight.shape), weight.stride(), weight.dtype, dtype, str(weight.device),
           groups)
    with _PACK_LOCK:
        hit = _PACKED.get(key)
    if hit is not None:
        ref, version, packed = hit
        src = ref()
        if src is not None and version == weight._version and src.data_ptr() == weight.data_ptr():
            return packed
    packed = _pack_eager(weight, groups, dtype)
    with _PACK_LOCK:
        if len(_PACKED) >= _PACK_CACHE_MAX:
            _PACKED.pop(next(iter(_PACKED)))  # oldest first
        _PACKED[key] = (weakref.ref(weight, lambda r, k=key: _forget(k, r)), weight._version, packed)
    return packed


def _forget(key, ref) -> None:
    """Drop the entry of a freed weight (only if it is still that weight's entry)."""
    with _PACK_LOCK:
        if key in _PACKED and _PACKED[key][0] is ref:
            del _PACKED[key]


# -------------------------------------------------------------------------------------------------- configs
def pinned_config(cfg: ConvConfig):
    """Run every conv forward in this thread with ``cfg`` (tests; reproducing a tuning result)."""
    return _tune.pinned_config("conv_fwd", cfg)


def tma_eligible(x: torch.Tensor, w_packed: torch.Tensor, g: ConvGeometry, dot_ieee: bool) -> bool:
    """Whether the ``TMA`` variant can run this launch: a pointwise conv with ``groups=1`` on a device that
    allows TMA (:func:`configs.tma_allowed`), 16-byte-aligned ``x``/``w_packed`` bases and ``x`` rows
    (``C * itemsize % 16 == 0``), ``M < 2**31`` rows, and a tensor-core dot (IEEE fp32 is FMA work, whose
    operand layout gains nothing from TMA)."""
    return (g.is_pointwise and g.groups == 1 and not g.pack_c and not dot_ieee and 0 < g.M < 2**31
            and (g.C * x.element_size()) % 16 == 0 and x.data_ptr() % 16 == 0 and w_packed.data_ptr() % 16 == 0
            and _cfg.tma_allowed(x.device))


def _persistent_twins(candidates, dtype: torch.dtype) -> list:
    """Persistent twins (``ConvConfig.persistent``) of the 16-bit 128×128 w8 candidates (TMA twins too): a program
    per SM walks the tiles in one flattened, software-pipelined loop, so the next tile's loads run during this
    tile's epilogue (stores, stats), which a second CTA per SM cannot hide here (at ~250 registers × 256 threads
    one CTA fills the register file). sm_90 compile: every wider tile, and fp32's fused gather, spills."""
    if dtype not in (torch.float16, torch.bfloat16):
        return []
    return [replace(c, persistent=True) for c in candidates
            if (c.BLOCK_M, c.BLOCK_N, c.num_warps) == (128, 128, 8) and not c.persistent]


def persistent_configs(dtype: torch.dtype, tma: bool) -> list:
    """The persistent twins a pointwise conv with ``dtype`` operands may be offered before pruning for its shape
    (:func:`_candidates` keeps those whose non-persistent config it kept; GPU checks pin them one by one): of the
    TMA twins when ``tma`` (:func:`tma_eligible`; sm_90: 90 instructions per step against the gather's 197), else
    of the gather tiles; none where Triton does not flatten loop nests."""
    cands = list(_cfg.fwd_configs(dtype))
    return _persistent_twins(_tma_variants(cands) if tma else cands, dtype) if _cfg.persistent_allowed() else []


def _tma_variants(candidates) -> list:
    """TMA twins of the candidates of at least 128×128 (where per-element address math and load masks cost the
    most registers). Few on purpose: each twin is one more compile and timing in every first-call tuning,
    which the benchmark's 10-minute run pays for."""
    return [replace(c, tma=True) for c in candidates if c.BLOCK_M * c.BLOCK_N >= 128 * 128]


# ------------------------------------------------------------------------------------------------- launcher
class FwdSwitches(NamedTuple):
    """The forward's kernel switches that enter its tuning key: each combination keeps its own tuned winner."""
    prologue: bool
    stats: bool
    residual: bool
    dot_ieee: bool
    tma: bool


class _FwdOperands(NamedTuple):
    """What :func:`_validate_fwd` hands the launch: fp32 contiguous per-channel vectors (or None) and the output."""
    bias: torch.Tensor | None
    scale: torch.Tensor | None
    shift: torch.Tensor | None
    in_scale: torch.Tensor | None
    in_shift: torch.Tensor | None
    out: torch.Tensor


def _vector(name: str, t, length: int, device, who: str):
    """A per-channel vector (any float dtype and stride) as the fp32 contiguous one the kernel reads, or None."""
    if t is None:
        return None
    check_vector(name, t, length, device, who, dtypes=FLOAT_DTYPES + (torch.float64,), contiguous=False)
    return t.to(torch.float32).contiguous()


def _check_cl(name: str, t, shape: tuple, dtype: torch.dtype, device, who: str) -> None:
    """``t`` is a channels_last-contiguous ``shape`` tensor of ``dtype`` on ``device``."""
    check(isinstance(t, torch.Tensor) and tuple(t.shape) == shape and t.dtype == dtype and t.device == device
          and t.is_contiguous(memory_format=torch.channels_last),
          f"{who}: {name} must be a channels_last-contiguous {shape} {dtype} tensor on {device}, got {describe(t)}")


def _validate_fwd(x, w_packed, g: ConvGeometry, bias, scale, shift, residual, in_scale, in_shift, in_relu, out,
                  who: str) -> _FwdOperands:
    """Check :func:`conv2d_nhwc`'s arguments (ValueError naming the bad one) and return what the kernel reads."""
    check_operand_dtype("x", x, who)
    dtype, device = x.dtype, x.device
    check(tuple(x.shape) == (g.N, g.C, g.H, g.W), f"{who}: x shape {tuple(x.shape)} does not match {g}")
    check(x.is_contiguous(memory_format=torch.channels_last), f"{who}: x must be channels_last-contiguous")
    check(tuple(w_packed.shape) == g.packed_weight_shape and w_packed.is_contiguous(),
          f"{who}: w_packed must be a contiguous {g.packed_weight_shape} tensor from pack_weight, got "
          f"{tuple(w_packed.shape)}")
    check(w_packed.dtype == dtype and w_packed.device == device,
          f"{who}: w_packed is {w_packed.dtype} on {w_packed.device}, expected {dtype} on {device}")
    g.check_index_range(who)
    ops = {name: _vector(name, t, n, device, who) for name, t, n in (
        ("bias", bias, g.K), ("scale", scale, g.K), ("shift", shift, g.K), ("in_scale", in_scale, g.C),
        ("in_shift", in_shift, g.C))}
    check((in_scale is None) == (in_shift is None), f"{who}: in_scale and in_shift go together")
    check(not in_relu or in_scale is not None, f"{who}: in_relu needs in_scale/in_shift")
    y_shape = (g.N, g.K, g.P, g.Q)
    if residual is not None:
        _check_cl("residual", residual, y_shape, dtype, device, who)
    if out is None:
        out = torch.empty(y_shape, dtype=dtype, device=device, memory_format=torch.channels_last)
    else:
        _check_cl("out", out, y_shape, dtype, device, who)
    return _FwdOperands(out=out, **ops)


def _launch_fwd(x, w_packed, g: ConvGeometry, v: _FwdOperands, residual, part, cfg: ConvConfig, *, relu: bool,
                in_relu: bool, dot_ieee: bool) -> None:
    """One launch of :func:`_conv_fwd_kernel` with ``cfg`` (``part``: the stats buffer, or None), or of the box
    kernel for a ``tma`` config on a conv of more than one tap."""
    if cfg.tma and not g.is_pointwise:
        _box.launch(cfg, g, x, w_packed, v.out, (v.bias, v.scale, v.shift, v.in_scale, v.in_shift), residual, part,
                    relu=relu, in_relu=in_relu)
        return
    dummy = v.out  # never read: its branch is compiled out
    x_desc, w_desc = x, w_packed  # placeholders when not TMA (never read)
    if cfg.tma:
        x_desc = TensorDescriptor(x, [g.M, g.C], [g.C, 1], [cfg.BLOCK_M, cfg.BLOCK_K])
        w_desc = TensorDescriptor(w_packed, [g.K_pad, g.Cg_pad], [g.Cg_pad, 1], [cfg.BLOCK_N, cfg.BLOCK_K])
    tiles = triton.cdiv(g.M, cfg.BLOCK_M) * triton.cdiv(g.Kg, cfg.BLOCK_N)
    grid = (_cfg.persistent_programs(x.device, tiles), 1) if cfg.persistent else (tiles, g.groups)
    opt = [dummy if t is None else t for t in (v.bias, v.scale, v.shift, residual, v.in_scale, v.in_shift, part)]
    _conv_fwd_kernel[grid](
        x, w_packed, v.out, *opt, x_desc, w_desc,
        g.H, g.W, g.C, g.P, g.Q, g.K, g.Cg, g.Kg, g.Cg_pad, g.M,
        g.stride[0], g.stride[1], g.padding[0], g.padding[1], g.dilation[0], g.dilation[1],
        R=g.R, S=g.S, POINTWISE=g.is_pointwise,
        HAS_BIAS=v.bias is not None, HAS_SCALE=v.scale is not None, HAS_SHIFT=v.shift is not None,
        HAS_RES=residual is not None, RELU=bool(relu), PROLOGUE=v.in_scale is not None, IN_RELU=bool(in_relu),
        STATS=part is not None, DOT_IEEE=dot_ieee, C_ALIGN=_pow2_divisor(g.Cg, 16), EVEN_C=g.Cg % cfg.BLOCK_K == 0,
        TMA=cfg.tma, PACK_C=g.pack_c, PERSISTENT=cfg.persistent, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
        BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _box_configs(g: ConvGeometry, x: torch.Tensor, w_packed: torch.Tensor, dot_ieee: bool) -> list:
    """The :data:`.conv_fwd_box.BOX_CONFIGS` this launch can run (:func:`.conv_fwd_box.eligible`) whose BLOCK_N
    the output channels fill, widest first. TMA permission is the caller's."""
    return [c for c in _box.BOX_CONFIGS if c.BLOCK_N <= max(64, triton.next_power_of_2(g.Kg))
            and _box.eligible(g, c, x, w_packed, dot_ieee)]


def _candidates(g: ConvGeometry, dtype: torch.dtype, tma_ok: bool, boxes: list, prologue: bool = False) -> tuple:
    """(tuning candidates, untuned default) of a launch before the prologue-pass twins: the dense-taps tiles
    where :attr:`ConvGeometry.pack_c`, else :data:`configs.FWD_CONFIGS` pruned for the shape with the heuristic's
    pick, or with the BN ``prologue`` in the loop its 128×256 tile where offered (each formed x element feeds
    BLOCK_N output channels, so the transform's share of the loop halves against 128×128: sm_90 bf16 1×1
    prologue_stats 1.05 -> 0.53, stride-2 3×3 1.58 -> 0.81); plus, where ``tma_ok`` (:func:`tma_eligible`), the
    pointwise TMA twins (never the default: they have to win a measurement), on a pointwise conv the persistent
    twin (:func:`_persistent_twins`, of the TMA twin where offered; never the default either), and the box tiles
    ``boxes`` (:func:`_box_configs`; the first is the default: no index math in its loop)."""
    if g.pack_c:  # dense taps: BLOCK_K is the filter row's width
        candidates = [replace(c, BLOCK_K=g.taps_k) for c in _cfg.DENSE_CONFIGS]
        default = candidates[0]
    else:
        candidates = _cfg.prune(_cfg.fwd_configs(dtype), g.M, g.Kg, g.Cg_pad, dtype)
        default = _cfg.heuristic(candidates, g.M, g.Kg, g.Cg_pad)
        if prologue:
            default = next((c for c in candidates if (c.BLOCK_M, c.BLOCK_N) == (128, 256)), default)
    if tma_ok:
        candidates += _tma_variants(candidates)
    if g.is_pointwise and g.groups == 1:  # the persistent twins of the candidates the shape kept
        candidates += [c for c in persistent_configs(dtype, tma_ok) if replace(c, persistent=False) in candidates]
    return candidates + boxes, boxes[0] if boxes else default


def conv2d_nhwc(x: torch.Tensor, w_packed: torch.Tensor, geometry: ConvGeometry, *, bias=None, scale=None,
                shift=None, residual=None, relu: bool = False, in_scale=None, in_shift=None,
                in_relu: bool = False, stats: bool = False, allow_tf32: bool | None = None,
                config: ConvConfig | None = None, out: torch.Tensor | None = None):
    """Launch the fused forward conv; the one entry point of the inference and training ops.

    Args:
        x: ``[N, C, H, W]`` channels_last-contiguous, fp32/fp16/bf16 (the operand and output dtype).
        w_packed: :attr:`ConvGeometry.packed_weight_shape` from :func:`pack_weight` in ``x.dtype``.
        geometry: the validated :class:`ConvGeometry` of ``x`` and the unpacked weight.
        bias, scale, shift: optional ``[K]`` float vectors (read as fp32).
        residual: optional ``[N, K, P, Q]`` channels_last-contiguous tensor in ``x.dtype``.
        relu: ReLU after everything.
        in_scale, in_shift, in_relu: the prologue ``x -> relu?(x*in_scale[c] + in_shift[c])``, ``[C]`` vectors
            (both or neither).
        stats: also return the per-tile statistics of the stored output (:class:`TileStats`).
        allow_tf32: fp32 only; None follows :func:`configs.conv_allows_tf32`.
        config: a fixed tile config (else pinned / interpreter / autotuned).
        out: optional preallocated ``[N, K, P, Q]`` channels_last output (fully overwritten).

    Returns ``(y, TileStats or None)``; ``y`` is ``[N, K, P, Q]`` channels_last in ``x.dtype``.
    """
    who = "conv2d_nhwc"
    g = geometry
    v = _validate_fwd(x, w_packed, g, bias, scale, shift, residual, in_scale, in_shift, in_relu, out, who)
    if allow_tf32 is None:
        allow_tf32 = _cfg.conv_allows_tf32()
    dot_ieee = x.dtype == torch.float32 and not allow_tf32
    tma_ok = tma_eligible(x, w_packed, g, dot_ieee)
    boxes = _box_configs(g, x, w_packed, dot_ieee) if _cfg.tma_allowed(x.device) else []
    pass_ok = _pass.worth_offering(g, v.in_scale is not None)
    switches = FwdSwitches(prologue=v.in_scale is not None, stats=bool(stats), residual=residual is not None,
                           dot_ieee=bool(dot_ieee), tma=tma_ok or bool(boxes))
    partials_for: dict = {}  # per tile count, so tuning launches reuse one buffer
    xk = dense_input(x, g) if g.pack_c else x

    def launch(cfg: ConvConfig):
        tiles_m = triton.cdiv(g.M, cfg.BLOCK_M)
        part = None
        if stats:
            part = partials_for.get(tiles_m)
            if part is None:
                part = partials_for[tiles_m] = torch.empty((2, tiles_m, g.K), dtype=torch.float32,
                                                           device=x.device)
        if g.M == 0:
            if part is not None:
                part.zero_()
            return part
        if cfg.prologue_pass:  # the prologue once per element, then the GEMM without it
            a = _pass.apply(x, v.in_scale, v.in_shift, in_relu)
            a = dense_input(a, g) if g.pack_c else a
            _launch_fwd(a, w_packed, g, v._replace(in_scale=None, in_shift=None), residual, part, cfg, relu=relu,
                        in_relu=False, dot_ieee=dot_ieee)
        else:
            _launch_fwd(xk, w_packed, g, v, residual, part, cfg, relu=relu, in_relu=in_relu, dot_ieee=dot_ieee)
        return part

    if config is None:
        candidates, default = _candidates(g, x.dtype, tma_ok, boxes, switches.prologue and not pass_ok)
        if pass_ok:  # the prologue as its own pass: twins of the large tiles, and the untuned default
            candidates += [replace(c, prologue_pass=True) for c in candidates
                           if c.BLOCK_M * c.BLOCK_N >= 128 * 64 and not c.persistent]
            default = replace(default, prologue_pass=True)
            if default not in candidates:
                candidates.append(default)
        config = _tune.choose("conv_fwd", g, x.dtype, x.device, candidates, switches, launch, default)
    if g.pack_c:  # a pinned, interpreter or tuned config runs its tile with the row's width
        config = replace(config, BLOCK_K=g.taps_k)
    tma_fits = tma_ok if g.is_pointwise else _cfg.tma_allowed(x.device) and _box.eligible(g, config, x, w_packed,
                                                                                          dot_ieee)
    check(not config.tma or tma_fits,
          f"{who}: config {config.name()} uses TMA, which this launch cannot (see conv_fwd.tma_eligible on a "
          "pointwise conv, else conv_fwd_box.eligible)")
    check(not config.persistent or (g.is_pointwise and g.groups == 1 and _cfg.persistent_allowed()),
          f"{who}: config {config.name()} is persistent, which needs a pointwise conv (1×1, stride 1, no padding) "
          "with groups 1 and a Triton that flattens loop nests (configs.persistent_allowed)")
    check(not config.prologue_pass or pass_ok, f"{who}: config {config.name()} runs the prologue as a pass, "
          "which needs a prologue, a filter of more than one tap and the C++ extension (prologue_pass.worth_offering)")
    part = launch(config)
    return v.out, None if part is None else TileStats(part[0], part[1], config.BLOCK_M)


# --------------------------------------------------------------------------------------- sm_90 compile check
_TL = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def compile_specs() -> list:
    """(jit_fn, signature, constexprs, options, is_gemm, div16) for :mod:`.compile_check`: every forward
    candidate of bf16 and fp32 (tf32) at a 3×3 stride-1 geometry with the inference epilogue, one fp16, the
    fully fused training variant (prologue + residual + stats), the pointwise path, the unaligned C=3 path
    (grouped convs with few channels per group take it), the dense-taps path (the stem) in every
    :data:`configs.DENSE_CONFIGS` tile, plain and fused, bf16 and fp32, IEEE fp32 (FMA, not a wgmma GEMM), and
    on the pointwise path every TMA twin the launcher may offer
    (bf16 and fp32/tf32) and the fused training variant's (descriptor arguments: the check also
    requires TMA loads in their PTX)."""
    fn = _conv_fwd_kernel
    ptrs = ("x_ptr", "w_ptr", "y_ptr", "bias_ptr", "scale_ptr", "shift_ptr", "res_ptr", "in_scale_ptr",
            "in_shift_ptr", "part_ptr", "x_desc", "w_desc")
    fp32_ptrs = ("bias_ptr", "scale_ptr", "shift_ptr", "in_scale_ptr", "in_shift_ptr", "part_ptr")
    ints = ("H", "W", "C", "P", "Q", "K", "Cg", "Kg", "Cg_pad", "M", "stride_h", "stride_w", "pad_h", "pad_w",
            "dil_h", "dil_w")

    def spec(dtype, cfg, *, pointwise=False, fused=False, ieee=False, stem=False, dense=False):
        dt = _TL[dtype]
        sig = {p: ("*fp32" if p in fp32_ptrs else f"*{dt}") for p in ptrs}
        if cfg.tma:
            sig["x_desc"] = f"tensordesc<{dt}[{cfg.BLOCK_M}, {cfg.BLOCK_K}]>"
            sig["w_desc"] = f"tensordesc<{dt}[{cfg.BLOCK_N}, {cfg.BLOCK_K}]>"
        sig.update({i: "i32" for i in ints})
        rs = 7 if stem or dense else 1 if pointwise else 3
        cx = dict(R=rs, S=rs, POINTWISE=pointwise, HAS_BIAS=False, HAS_SCALE=True, HAS_SHIFT=True,
                  HAS_RES=fused, RELU=True, PROLOGUE=fused, IN_RELU=fused, STATS=fused, DOT_IEEE=ieee,
                  C_ALIGN=1 if stem or dense else 16, EVEN_C=not (stem or dense), TMA=cfg.tma,
                  PACK_C=4 if dense else 0, PERSISTENT=cfg.persistent, BLOCK_M=cfg.BLOCK_M,
                  BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M)
        sig.update({k: "constexpr" for k in cx})
        sig = ordered_signature(fn, sig)
        # channel counts as Triton specialises them for ResNet layers (multiples of 16; the stem's C=3 not)
        div16 = ("K", "Kg", "Cg_pad") + (() if stem or dense else ("C", "Cg"))
        return (fn, sig, cx, {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}, not ieee, div16)

    bf16, fp32 = _cfg.fwd_configs(torch.bfloat16), _cfg.fwd_configs(torch.float32)
    specs = [spec(torch.bfloat16, cfg) for cfg in bf16] + [spec(torch.float32, cfg) for cfg in fp32]
    specs += [spec(torch.float16, bf16[0]), spec(torch.bfloat16, bf16[0], fused=True),
              spec(torch.bfloat16, bf16[0], pointwise=True), spec(torch.bfloat16, bf16[-2], stem=True),
              spec(torch.float32, next(c for c in fp32 if c.BLOCK_M == c.BLOCK_N == 64), ieee=True)]
    specs += [spec(dt, cfg, dense=True, fused=fused) for dt in (torch.bfloat16, torch.float32)
              for cfg in _cfg.DENSE_CONFIGS for fused in (False, True)]
    specs += [spec(dt, cfg, pointwise=True) for dt, cands in ((torch.bfloat16, bf16), (torch.float32, fp32))
              for cfg in _tma_variants(cands)]
    specs += [spec(torch.bfloat16, _tma_variants(bf16)[0], pointwise=True, fused=True)]
    # every persistent twin the launcher may offer (_persistent_twins: pointwise, gather and TMA), plain and fused
    specs += [spec(torch.bfloat16, cfg, pointwise=True, fused=fused)
              for cfg in _persistent_twins(list(bf16) + _tma_variants(bf16), torch.bfloat16) for fused in (False, True)]
    return specs
