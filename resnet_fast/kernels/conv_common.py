"""Conv geometry and index math shared by the forward, dgrad and wgrad kernels.

Conventions (every conv kernel of this package):

* Activations are NHWC in memory (a ``[N, C, H, W]`` tensor in ``torch.channels_last``), channel stride 1.
* The implicit GEMM of the forward conv has ``M = N*P*Q`` rows (output pixels, row ``m = (n*P + p)*Q + q``),
  ``Kg = K/groups`` columns per group, and reduces over ``R*S*Cg`` (filter taps × input channels per group).
* An output pixel ``(p, q)`` and a tap ``(r, s)`` read input pixel
  ``h = p*stride_h - pad_h + r*dil_h``, ``w = q*stride_w - pad_w + s*dil_w`` (zero outside the image).
* Packed forward weights are ``[K_pad, R, S, Cg_pad]`` (KRSC, rows zero-padded to a multiple of 256) with ``Cg_pad =
  round_up(Cg, CHANNEL_PAD)``: ResNeXt's 4 channels per group become one 16-wide MMA step of zeros instead of a
  special case, and the activation is not padded (loads mask ``c >= Cg``). A conv with few channels and ``groups ==
  1`` (the stem's ``C = 3``) instead takes the dense-taps path (:attr:`ConvGeometry.pack_c`): weights ``[K_pad, R,
  taps_k]``, one K-step per filter row, the activation zero-padded to 4 channels.
* Offsets that can pass 2**31 elements (anything scaled by the batch index or the GEMM row) are int64;
  offsets inside one image stay int32, which :meth:`ConvGeometry.check_index_range` guarantees.

Also here, for the launchers: :class:`DyBN` (the backward kernels' "BN backward on load" operands) and its
check, the operand-dtype check every conv launcher makes, and the row-alignment test of the backward kernels'
``ALIGNED`` switch.
"""
from __future__ import annotations

import math

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .checks import check_like, check_vector

__all__ = ["ConvGeometry", "conv_output_size", "pair", "CHANNEL_PAD", "W_ROW_PAD", "DENSE_MAX_C", "DENSE_MAX_K",
           "round_up",
           "DyBN", "check_dy_bn", "dy_on_load", "dense_input",
           "rows_aligned", "tma_ready", "nhwc_descriptor", "pixel_block", "MAX_BQ", "flat_rows", "as_row",
           "row_geometry", "as_rows", "ordered_signature", "rows_to_npq", "swizzle_pid", "block_origin",
           "next_tap_step"]

CHANNEL_PAD = 16  # smallest MMA reduction step for 16-bit operands (and 8 for tf32): pad Cg to this
W_ROW_PAD = 256   # packed forward weights have round_up(K, this) rows (zeros): weight tiles load unmasked
DENSE_MAX_C = 8   # the forward's dense-taps path (ConvGeometry.pack_c): at most this many input channels ...
DENSE_MAX_K = 64  # ... and a filter row of S taps × pack_c channels of at most this many
_INT32_MAX = 2**31 - 1


def round_up(v: int, m: int) -> int:
    return (v + m - 1) // m * m


def pair(v, name: str, who: str, lo: int) -> tuple:
    """``v`` (an int or a pair of ints, each ``>= lo``) as a tuple of two ints; ValueError naming ``name``."""
    try:
        t = (int(v), int(v)) if isinstance(v, int) else tuple(int(e) for e in v)
    except (TypeError, ValueError):
        raise ValueError(f"{who}: {name} must be an int or a pair of ints, got {v!r}") from None
    if isinstance(v, bool) or len(t) != 2 or min(t) < lo:
        raise ValueError(f"{who}: {name} must be an int or a pair of ints >= {lo}, got {v!r}")
    return t


def conv_output_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    """PyTorch's conv output length along one dimension (may be <= 0 for an invalid conv)."""
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


@dataclass(frozen=True)
class ConvGeometry:
    """A validated conv ``x [N, C, H, W] * w [K, C/groups, R, S] -> y [N, K, P, Q]`` with zero padding.

    Build it with :meth:`make`, which raises ValueError naming the bad argument; after that every field is
    consistent (``C % groups == K % groups == 0``, ``P, Q >= 1``) and kernels need not re-check.
    """
    N: int
    C: int
    H: int
    W: int
    K: int
    R: int
    S: int
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int

    @property
    def P(self) -> int:
        return conv_output_size(self.H, self.R, self.stride[0], self.padding[0], self.dilation[0])

    @property
    def Q(self) -> int:
        return conv_output_size(self.W, self.S, self.stride[1], self.padding[1], self.dilation[1])

    @property
    def Cg(self) -> int:
        """Input channels per group."""
        return self.C // self.groups

    @property
    def Kg(self) -> int:
        """Output channels per group."""
        return self.K // self.groups

    @property
    def Cg_pad(self) -> int:
        """Input channels per group in the packed weight (multiple of :data:`CHANNEL_PAD`)."""
        return round_up(self.Cg, CHANNEL_PAD)

    @property
    def pack_c(self) -> int:
        """Channels per pixel of the forward's dense-taps path, 0 where it does not apply. It applies to
        ``groups == 1`` convs with at most :data:`DENSE_MAX_C` channels and ``S > 1`` whose filter row fits one
        MMA step of at most :data:`DENSE_MAX_K`: one K-step per filter row ``r`` reduces over its ``S`` taps ×
        ``pack_c`` channels, which NHWC keeps contiguous. ``pack_c`` is ``C`` rounded up to a power of two >= 4 (the
        launcher zero-pads ``x`` to it), so each pixel is an 8- or 16-byte vector: pipelined cp.async instead of
        2-byte loads. The stem: 7 taps × 4 = 28 of a 32-wide step, 7 steps instead of 49 of 16."""
        pc = max(4, 1 << max(0, (self.C - 1).bit_length()))
        if self.groups != 1 or self.C > DENSE_MAX_C or self.S == 1 or self.S * pc > DENSE_MAX_K:
            return 0
        return pc

    @property
    def taps_k(self) -> int:
        """The dense-taps path's reduction per step (its BLOCK_K): ``S * pack_c`` rounded up to a power of two
        >= :data:`CHANNEL_PAD`."""
        return max(CHANNEL_PAD, 1 << (self.S * self.pack_c - 1).bit_length())

    @property
    def K_pad(self) -> int:
        """Rows of the forward's packed weight: ``K`` rounded up to :data:`W_ROW_PAD` (the widest BLOCK_N), so no
        weight tile reads past the end and none needs a row mask (rows past ``Kg`` in a tile are another group's
        or zeros; their columns are never stored)."""
        return round_up(self.K, W_ROW_PAD)

    @property
    def packed_weight_shape(self) -> tuple:
        """The forward's packed weight: ``[K_pad, R, S, Cg_pad]``, or ``[K_pad, R, taps_k]`` on the dense-taps path
        (column ``s*pack_c + c``, zeros past ``c >= C`` and ``s >= S``)."""
        return (self.K_pad, self.R, self.taps_k) if self.pack_c else (self.K_pad, self.R, self.S, self.Cg_pad)

    @property
    def M(self) -> int:
        """GEMM rows: output pixels ``N*P*Q``."""
        return self.N * self.P * self.Q

    @property
    def is_pointwise(self) -> bool:
        """1×1, stride 1, no padding: the conv is a plain GEMM ``[N*H*W, C] @ [C, K]`` per group."""
        return (self.R, self.S) == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)

    @staticmethod
    def make(x_shape, w_shape, stride=1, padding=0, dilation=1, groups=1, who: str = "conv2d") -> "ConvGeometry":
        """Validated geometry from the shapes of ``x`` and the (unpacked, OIHW) weight."""
        x_shape, w_shape = tuple(x_shape), tuple(w_shape)
        if len(x_shape) != 4:
            raise ValueError(f"{who}: input must be 4-D [N, C, H, W], got shape {x_shape}")
        if len(w_shape) != 4:
            raise ValueError(f"{who}: weight must be 4-D [K, C/groups, R, S], got shape {w_shape}")
        stride = pair(stride, "stride", who, 1)
        padding = pair(padding, "padding", who, 0)
        dilation = pair(dilation, "dilation", who, 1)
        N, C, H, W = x_shape
        K, Cg, R, S = w_shape
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"{who}: groups must be a positive int, got {groups!r}")
        if C % groups or K % groups:
            raise ValueError(f"{who}: groups={groups} must divide the input channels C={C} and the output "
                             f"channels K={K}")
        if Cg != C // groups:
            raise ValueError(f"{who}: weight shape {w_shape} expects C/groups={Cg} input channels per group, "
                             f"but the input has C={C} channels and groups={groups}")
        if min(K, R, S, C) < 1:
            raise ValueError(f"{who}: weight shape {w_shape} and input channels C={C} must be non-empty")
        g = ConvGeometry(N, C, H, W, K, R, S, stride, padding, dilation, groups)
        if g.P < 1 or g.Q < 1:
            raise ValueError(f"{who}: input of spatial size {(H, W)} is too small for kernel {(R, S)} with "
                             f"padding={padding}, dilation={dilation} (output would be {(g.P, g.Q)})")
        return g

    def check_index_range(self, who: str = "conv2d") -> None:
        """ValueError when one image (input or output) has more than 2**31-1 elements: per-image offsets are
        int32 in the kernels (batch and GEMM-row offsets are int64, so N*H*W*C itself may be larger)."""
        if self.H * self.W * self.C > _INT32_MAX or self.P * self.Q * self.K > _INT32_MAX:
            raise ValueError(f"{who}: one image of {self.H}x{self.W}x{self.C} (or its output) exceeds 2**31 "
                             f"elements, which the kernels do not index")


# --------------------------------------------------------------------------------------- launcher helpers
def tap_steps(g: ConvGeometry) -> tuple:
    """(along h, along w) the period of the filter taps that read one stride phase of the input, ``stride /
    gcd(dil, stride)``: dgrad's phases of dx and the wgrad box kernel's phase views of x."""
    return tuple(s // math.gcd(d, s) for s, d in zip(g.stride, g.dilation))


def dense_input(x: torch.Tensor, g: ConvGeometry) -> torch.Tensor:
    """``x [N, C, H, W]`` as the dense-taps paths read it (:attr:`ConvGeometry.pack_c`): a channels_last-contiguous
    ``[N, pack_c, H, W]`` copy whose channels ``>= C`` are zero (they meet zero weights in the forward; wgrad never
    stores their columns). One pass over the image (the stem's 3 channels -> 4); ``x`` itself where it already is
    that tensor."""
    if g.C == g.pack_c and x.is_contiguous(memory_format=torch.channels_last):
        return x
    xp = torch.empty((g.N, g.pack_c, g.H, g.W), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    xp[:, g.C:].zero_()
    xp[:, :g.C].copy_(x)
    return xp


class DyBN(NamedTuple):
    """The backward kernels' "BN backward on load": ``dy = c1·dz + c2·(y − mean) + c3`` per element, formed while
    loading the gradient operand (then ``dz``, the gradient w.r.t. the BN output) and never stored.

    ``y``: ``[N, K, P, Q]`` the conv's raw output, with the gradient's shape, dtype and strides; ``c1``, ``c2``,
    ``c3``, ``mean``: fp32 ``[K]`` contiguous (from :func:`resnet_fast.kernels.bn_finalize.bn_backward_coeffs`).
    A plain 5-tuple in this order is accepted wherever a DyBN is.
    """
    y: torch.Tensor
    c1: torch.Tensor
    c2: torch.Tensor
    c3: torch.Tensor
    mean: torch.Tensor


@triton.jit
def dy_on_load(dz, y, c1, c2, c3, mu, mask, DY_RELU: tl.constexpr):
    """The ``dy_bn`` transform of a loaded gradient tile ``dz``: ``c1*dz' + (c2*(y - mu) + c3)`` in fp32, where
    ``dz' = dz where y > 0, else 0`` under DY_RELU and ``dz`` otherwise; zero where ``mask`` is False (``c3`` must
    not leak into padding or tile tails: ``dz`` must be 0 there, as a masked load with ``other=0`` gives it);
    returned in dz's dtype (the MMA operand). ``y`` is the fp32 tile of the dy_bn tensor; the [K] vectors come
    broadcast along the tile's channel axis (dgrad's tile is pixels × channels, wgrad's channels × pixels). Used by
    both backward kernels, so they agree bit for bit.

    Instruction count per element (the K-loop of both GEMMs runs this): the mask selects the fp32 bias term, so
    the last op is an FFMA whose result is packed straight to 16 bits (masking the packed result instead costs
    byte permutes per pair), and ``c2*(y - mu) + c3`` is one FADD and one FFMA."""
    d = dz.to(tl.float32)
    if DY_RELU:
        d = tl.where(y > 0, d, 0.0)
    t = tl.where(mask, c2 * (y - mu) + c3, 0.0)
    return (c1 * d + t).to(dz.dtype)


def check_dy_bn(dy_bn, grad_out: torch.Tensor, K: int, who: str, dy_relu=False) -> DyBN | None:
    """``dy_bn`` (a :class:`DyBN` or 5-tuple, or None) checked against ``grad_out`` and returned as a DyBN;
    ``dy_relu`` (a bool, masking dz by ``y > 0``) needs it. ValueError naming the bad argument."""
    if not isinstance(dy_relu, bool):
        raise ValueError(f"{who}: dy_relu must be a bool, got {dy_relu!r}")
    if dy_bn is None:
        if dy_relu:
            raise ValueError(f"{who}: dy_relu masks dz by dy_bn's y > 0: it needs dy_bn")
        return None
    if not isinstance(dy_bn, (tuple, list)) or len(dy_bn) != 5:
        raise ValueError(f"{who}: dy_bn must be a DyBN or a tuple (y, c1, c2, c3, mean)")
    d = DyBN(*dy_bn)
    check_like("dy_bn.y", d.y, grad_out, "grad_out", who)
    for name in ("c1", "c2", "c3", "mean"):
        check_vector(f"dy_bn.{name}", getattr(d, name), K, grad_out.device, who)
    return d


def rows_aligned(t: torch.Tensor) -> bool:
    """``t`` [A, B, C, D] has unit stride along dim 1 and strides that are multiples of 16 elements along
    dims 0, 2, 3 (size-1 dims excepted: their index is always 0), so each (a, c, d) row starts 16-aligned."""
    return t.stride(1) == 1 and all(t.stride(d) % 16 == 0 for d in (0, 2, 3) if t.shape[d] > 1)


def tma_ready(t: torch.Tensor) -> bool:
    """channels_last-dense enough for a 4-D NHWC TMA descriptor (:func:`nhwc_descriptor`): unit channel stride,
    16-byte aligned base and pixel strides (:func:`rows_aligned`)."""
    return t.stride(1) == 1 and rows_aligned(t) and t.data_ptr() % 16 == 0


def nhwc_descriptor(t: torch.Tensor, bp: int, bq: int, bc: int):
    """A 4-D TMA descriptor of channels_last ``t [N, C, H, W]`` (or a strided view of it) as ``[N, H, W, C]`` with
    boxes ``[1, bp, bq, bc]``: the box kernels' pixel blocks, zero-filled outside the tensor (the padding)."""
    from triton.tools.tensor_descriptor import TensorDescriptor  # triton >= 3.4 (configs.tma_allowed)
    v = t.permute(0, 2, 3, 1)
    return TensorDescriptor(v, list(v.shape), list(v.stride()), [1, bp, bq, bc])


MAX_BQ = 16  # a padded pixel block's columns: a power of 2 up to the map's width (28 -> 16: 2 blocks of 16)


def pixel_block(rows: int, cols: int, block: int, exact_only: bool = False) -> tuple | None:
    """(BP, BQ), powers of 2 with ``BP*BQ == block``: the pixel block of a TMA-box kernel's tile over a
    ``rows × cols`` map. The widest BQ whose blocks tile the map exactly (no MMA on padding pixels; every tile
    ``block`` pixels, as stats partials need); else, unless ``exact_only`` (then None), BQ the smallest power of 2
    >= cols up to :data:`MAX_BQ` (wider where the map has fewer rows than the block), its blocks past the map's
    edges zero-filled. A TMA box side is at most 256."""
    bq = block
    while bq >= 1:
        if cols % bq == 0 and rows % (block // bq) == 0 and bq <= 256 and block // bq <= 256:
            return block // bq, bq
        bq //= 2
    if exact_only:
        return None
    bq = max(min(triton.next_power_of_2(cols), MAX_BQ, block), block // triton.next_power_of_2(rows))
    return block // bq, bq


def flat_rows(g: ConvGeometry, *tensors) -> bool:
    """Whether a pointwise conv (:attr:`ConvGeometry.is_pointwise`) can run over its pixels as one row: every
    tensor channels_last-contiguous, so each ``[N, C, H, W]`` is one image of one row of ``N*H*W`` pixels
    (:func:`as_row`) and the conv that of :func:`row_geometry`. A box kernel then tiles the rows without padding
    blocks to the map's width."""
    return g.is_pointwise and all(t.is_contiguous(memory_format=torch.channels_last) for t in tensors)


def as_row(t: torch.Tensor) -> torch.Tensor:
    """A channels_last-contiguous ``[N, C, H, W]`` as ``[1, C, 1, N*H*W]`` (a view)."""
    n, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).reshape(1, 1, n * h * w, c).permute(0, 3, 1, 2)


def row_geometry(g: ConvGeometry) -> ConvGeometry:
    """The pointwise conv ``g`` over its pixels as one row of one image (:func:`flat_rows`)."""
    return ConvGeometry.make((1, g.C, 1, g.N * g.H * g.W), (g.K, g.Cg, 1, 1), groups=g.groups)


def as_rows(g: ConvGeometry, *tensors) -> tuple:
    """``(geometry, tensors)`` as a box kernel runs the conv: :func:`row_geometry` and each tensor :func:`as_row`
    where :func:`flat_rows`, else ``g`` and the tensors unchanged. The one place that decides it, for the launchers
    and for what they size from the geometry (tiles, chunks, the cost report)."""
    if flat_rows(g, *tensors):
        return row_geometry(g), tuple(as_row(t) for t in tensors)
    return g, tensors


def ordered_signature(fn, sig: dict) -> dict:
    """A compile-check signature in the kernel's argument order (what ASTSource expects)."""
    return {name: sig[name] for name in fn.arg_names}


# ----------------------------------------------------------------------------------------- Triton helpers
@triton.jit
def swizzle_pid(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped ordering of a 1-D program id into (pid_m, pid_n): GROUP_M row tiles share each column sweep,
    so the weight tiles they read stay in L2."""
    num_in_group = GROUP_M * num_pid_n
    group_id = pid // num_in_group
    first_m = group_id * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % num_in_group) % size_m
    pid_n = (pid % num_in_group) // size_m
    return pid_m, pid_n


@triton.jit
def block_origin(pid_m, PB, QB, BP: tl.constexpr, BQ: tl.constexpr):
    """A box kernel's pixel-block tile ``pid_m`` over maps of ``PB × QB`` blocks of ``BP × BQ`` pixels
    (:func:`pixel_block`): ``(n, row0, col0, bi, bj)``, the image, the block's first pixel, and each of its
    ``BP*BQ`` tile rows' offset in it (row ``i*BQ + j`` is pixel ``(i, j)``)."""
    per_image = PB * QB
    n = pid_m // per_image
    row0 = (pid_m % per_image) // QB * BP
    col0 = (pid_m % per_image) % QB * BQ
    bi = tl.arange(0, BP * BQ) // BQ
    bj = tl.arange(0, BP * BQ) % BQ
    return n, row0, col0, bi, bj


@triton.jit
def next_tap_step(r, s, c0, C, S, BLOCK_K: tl.constexpr):
    """The next K-step of a loop over (tap ``(r, s)``, channel block ``c0`` of ``C``), channel blocks fastest:
    carried scalars, no division in the loop. Returns ``(r, s, c0)``."""
    c0 += BLOCK_K
    c_wrap = c0 >= C
    c0 = tl.where(c_wrap, 0, c0)
    s += c_wrap.to(tl.int32)
    s_wrap = s >= S
    s = tl.where(s_wrap, 0, s)
    r += s_wrap.to(tl.int32)
    return r, s, c0


@triton.jit
def rows_to_npq(offs_m, P, Q):
    """GEMM rows ``m`` -> output pixel ``(n, p, q)`` with ``m = (n*P + p)*Q + q``; ``n`` is int64 so batch
    offsets never overflow. ``offs_m`` may be int32 or int64."""
    q = (offs_m % Q).to(tl.int32)
    pq = offs_m // Q
    p = (pq % P).to(tl.int32)
    n = (pq // P).to(tl.int64)
    return n, p, q
