"""The conv backward's incoming gradient as one elementwise pass, for ATen's dgrad/wgrad (the cuDNN composite).

The Triton dgrad and wgrad kernels form their ``dy`` operand while loading it (``dy_bn``/``dy_relu``); ATen's
``convolution_backward`` cannot, so the composites in :mod:`resnet_fast.ops.conv_cudnn` write it once here:

* training (``c2``, ``c3``, ``mean`` given): ``dy = g_y + c2[k]*(y - mean[k]) + c3[k]``, the BatchNorm
  statistics' share of the gradient, by :func:`resnet_fast.kernels.conv_common.dy_on_load` with ``c1 = 1``
  (the one implementation of that transform, so both paths round ``dy`` identically);
* inference (``relu``): ``g = grad where out > 0, else 0``, the ReLU backward;
* ``sums``: per-tile ``Σg`` partials ``[T, K]`` fp32 of the formed (or, with nothing to form, the incoming)
  gradient, one writer per element, no atomics; ``write=False`` then skips writing ``g`` (nothing to form, so
  ATen reads ``grad`` itself, or no GEMM needs it).

Tensors ``[N, K, P, Q]`` channels_last-contiguous are the row-major matrix ``[M = N*P*Q, K]``; program
``(t, j)`` owns rows ``t*BLOCK_M ..`` and channels ``j*BLOCK_K ..``. ``dy`` is written in the gradient's dtype
(the GEMM operand dtype), the transform runs in fp32.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .checks import check_operand_dtype, check_pow2, check_vector
from .conv_common import ConvGeometry, dy_on_load

__all__ = ["form_dy", "form_train_dy", "FormedDy", "compile_specs", "BN_DY_CONFIG", "dy_pass_may_pay"]

# (BLOCK_M rows = rows per Σ partial, BLOCK_K channels, num_warps). Memory bound.
BN_DY_CONFIG = (128, 64, 8)
_TL = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class FormedDy(NamedTuple):
    """:func:`form_dy`'s result: ``dy`` (``[N, K, P, Q]`` channels_last, the gradient's dtype; None unless
    written), ``sums`` (fp32 ``[T, K]`` per-tile Σdy; None unless asked) and ``tile_rows`` (rows per tile)."""
    dy: torch.Tensor | None
    sums: torch.Tensor | None
    tile_rows: int


@triton.jit
def _bn_dy_kernel(dz_ptr, y_ptr, c2_ptr, c3_ptr, mu_ptr, dy_ptr, part_ptr, M, K,
                  HAS_BN: tl.constexpr, RELU: tl.constexpr, WRITE: tl.constexpr, SUMS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_t = tl.program_id(0)
    offs_m = pid_t.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: M*K may pass 2**31
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    mask = (offs_m < M)[:, None] & k_ok[None, :]
    off = offs_m[:, None] * K + offs_k[None, :]
    dz = tl.load(dz_ptr + off, mask=mask, other=0.0)
    if HAS_BN:  # dy = 1*dz + c2*(y - mu) + c3, the Triton backward's on-load transform
        y = tl.load(y_ptr + off, mask=mask, other=0.0).to(tl.float32)
        c2 = tl.load(c2_ptr + offs_k, mask=k_ok, other=0.0)[None, :]
        c3 = tl.load(c3_ptr + offs_k, mask=k_ok, other=0.0)[None, :]
        mu = tl.load(mu_ptr + offs_k, mask=k_ok, other=0.0)[None, :]
        d = dy_on_load(dz, y, 1.0, c2, c3, mu, mask, RELU)
    elif RELU:  # g = dz where out > 0: masking only, exact
        y = tl.load(y_ptr + off, mask=mask, other=0.0)
        d = tl.where(mask & (y > 0), dz, 0.0).to(dz.dtype)
    else:
        d = dz
    if WRITE:
        tl.store(dy_ptr + off, d, mask=mask)
    if SUMS:
        s = tl.sum(tl.where(mask, d.to(tl.float32), 0.0), axis=0)
        tl.store(part_ptr + pid_t.to(tl.int64) * K + offs_k, s, mask=k_ok)


def _block_k(K: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(K)))


def form_dy(dz: torch.Tensor, y: torch.Tensor | None = None, *, c2: torch.Tensor | None = None,
            c3: torch.Tensor | None = None, mean: torch.Tensor | None = None, relu: bool = False,
            write: bool = True, sums: bool = False, config: tuple | None = None) -> FormedDy:
    """The gradient a conv backward feeds to dgrad/wgrad, formed in one pass (see the module docstring).

    Args:
        dz: ``[N, K, P, Q]`` channels_last-contiguous float32/float16/bfloat16: the upstream gradient
            (w.r.t. the conv's raw output ``y``, or w.r.t. the inference op's output).
        y: same shape and dtype, channels_last-contiguous: the conv's raw output (training) or the op's output
            (its ReLU mask); needed with ``c2``/``c3``/``mean`` or ``relu``.
        c2, c3, mean: fp32 ``[K]`` contiguous, all three or none: ``dy = dz + c2*(y - mean) + c3``.
        relu: mask ``dz`` by ``y > 0`` first.
        write: write ``dy`` (False: only the sums, e.g. when no GEMM needs ``dy`` or there is nothing to form).
        sums: also return per-tile ``Σdy`` partials.
        config: optional ``(BLOCK_M, BLOCK_K, num_warps)``, powers of two; default :data:`BN_DY_CONFIG`.

    Returns:
        :class:`FormedDy` ``(dy, sums, tile_rows)``; ``Σdy`` over the batch is ``sums.sum(0)`` (the caller
        reduces the ``[T, K]`` partials in a fixed order).
    """
    who = "form_dy"
    check_operand_dtype("dz", dz, who)
    if not dz.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"{who}: dz must be channels_last-contiguous")
    bn = [v is not None for v in (c2, c3, mean)]
    if any(bn) and not all(bn):
        raise ValueError(f"{who}: c2, c3 and mean go together (got "
                         f"{', '.join(n for n, b in zip(('c2', 'c3', 'mean'), bn) if b)} only)")
    has_bn = all(bn)
    if (has_bn or relu) and y is None:
        raise ValueError(f"{who}: y is needed for the BatchNorm coefficients or the ReLU mask")
    if y is not None:
        if not isinstance(y, torch.Tensor) or y.shape != dz.shape or y.dtype != dz.dtype \
                or y.device != dz.device or not y.is_contiguous(memory_format=torch.channels_last):
            raise ValueError(f"{who}: y must be a channels_last-contiguous {tuple(dz.shape)} {dz.dtype} tensor on "
                             f"{dz.device} like dz, got "
                             f"{(tuple(y.shape), y.dtype, y.device) if isinstance(y, torch.Tensor) else y}")
    N, K, P, Q = dz.shape
    for name, v in (("c2", c2), ("c3", c3), ("mean", mean)):
        if v is not None:
            check_vector(name, v, K, dz.device, who)
    if not write and not sums:
        raise ValueError(f"{who}: nothing to do (write=False and sums=False)")
    block_m, block_k, warps = config or BN_DY_CONFIG
    check_pow2(who, BLOCK_M=block_m, BLOCK_K=block_k)
    M = N * P * Q
    T = triton.cdiv(M, block_m)
    dy = torch.empty_like(dz, memory_format=torch.channels_last) if write else None
    part = torch.empty((T, K), dtype=torch.float32, device=dz.device) if sums else None
    if M > 0 and K > 0:
        dummy = dz  # never read: its branch is compiled out
        bk = _block_k(K, block_k)
        _bn_dy_kernel[(T, triton.cdiv(K, bk))](
            dz, dummy if y is None else y, dummy if c2 is None else c2, dummy if c3 is None else c3,
            dummy if mean is None else mean, dummy if dy is None else dy, dummy if part is None else part, M, K,
            HAS_BN=has_bn, RELU=bool(relu), WRITE=bool(write), SUMS=bool(sums), BLOCK_M=block_m, BLOCK_K=bk,
            num_warps=warps)
    return FormedDy(dy, part, block_m)


def compile_specs() -> list:
    """(jit_fn, signature, constexprs, options, is_gemm, div16) for :mod:`.compile_check`, each dtype: the
    training transform (HAS_BN), the inference ReLU mask with and without Σ, and Σ alone (no write) of the
    masked or the incoming gradient."""
    block_m, block_k, warps = BN_DY_CONFIG
    variants = ((True, False, True, False), (False, True, True, True), (False, True, True, False),
                (False, True, False, True), (False, False, False, True))  # (HAS_BN, RELU, WRITE, SUMS)
    specs = []
    for dt in _TL.values():
        for has_bn, relu, write, sums in variants:
            sig = {"dz_ptr": f"*{dt}", "y_ptr": f"*{dt}", "c2_ptr": "*fp32", "c3_ptr": "*fp32", "mu_ptr": "*fp32",
                   "dy_ptr": f"*{dt}", "part_ptr": "*fp32", "M": "i32", "K": "i32"}
            cx = {"HAS_BN": has_bn, "RELU": relu, "WRITE": write, "SUMS": sums, "BLOCK_M": block_m,
                  "BLOCK_K": block_k}
            sig.update({k: "constexpr" for k in cx})
            specs.append((_bn_dy_kernel, sig, cx, {"num_warps": warps, "num_stages": 1}, False, ("K",)))
    return specs


def form_train_dy(g_y: torch.Tensor, y: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor,
                  mean: torch.Tensor) -> torch.Tensor:
    """The training backward's ``dy = g_y + c2*(y - mean) + c3`` written once (``[N, K, P, Q]`` channels_last, g_y's
    dtype; inputs of any strides): what the cuDNN composite and ``triton_dy_pass`` feed their GEMMs."""
    cl = torch.channels_last
    return form_dy(g_y.contiguous(memory_format=cl), y.contiguous(memory_format=cl), c2=c2.contiguous(),
                   c3=c3.contiguous(), mean=mean.contiguous()).dy


def dy_pass_may_pay(geom: ConvGeometry, need_x: bool, ieee_prologue: bool = False) -> bool:
    """Whether the training backward op (``ops.conv_bn_train``) offers ``triton_dy_pass``: dgrad and wgrad each read
    every element of dy ``R*S`` times (once per tap), so forming dy on load repeats the BN backward transform up to
    ``2*R*S`` times per element; forming it once costs three activation passes (read g_y and y, write dy). Offered
    where ``R*S >= 4`` (every 3×3) unless only wgrad runs on its dense-taps path, which reads dy once for all taps
    (the stem), or ``ieee_prologue``: IEEE fp32 with a BN+ReLU prologue, whose FMA wgrad with the prologue and
    without the dy transform spills on sm_90 (the compile check) and which is FMA-bound, so the pass buys little."""
    return geom.R * geom.S >= 4 and (need_x or not geom.pack_c) and not ieee_prologue
