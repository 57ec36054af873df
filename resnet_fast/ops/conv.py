"""``resnet_fast.ops.conv2d``: fused conv + bias + folded BN + residual + ReLU as one custom op, and ``fold_bn``.

``torch.ops.resnet_fast.conv2d`` is a ``torch.library.custom_op`` with a fake implementation, so
``torch.compile`` and CUDA graphs see one opaque op. No autograd is registered here (the training op of
issue 4 owns the backward). The kernel is :func:`resnet_fast.kernels.conv_fwd.conv2d_nhwc`; the explicit
eager fallback is :func:`resnet_fast.ops.eager.eager_conv2d`, taken (and counted) when
:func:`resnet_fast._backend.use_kernels` says no or for a dtype the kernel lacks (float64).

Layout: NHWC (``channels_last``) is native; other inputs are converted once per call. The output is always a
``[N, K, P, Q]`` channels_last tensor in x's dtype, on both paths.
"""
from __future__ import annotations

import torch

from .. import _backend
from ..kernels.conv_common import ConvGeometry, pair
from .eager import eager_conv2d

__all__ = ["conv2d", "fold_bn"]

_OP = "conv2d"
_SCHEMA = ("(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, int[] dilation, int groups, "
           "Tensor? scale, Tensor? shift, Tensor? residual, bool relu) -> Tensor")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _validate(x, weight, bias, stride, padding, dilation, groups, scale, shift, residual) -> ConvGeometry:
    """The conv's geometry; ValueError naming the argument for any inconsistent input."""
    who = "conv2d"
    _check(isinstance(x, torch.Tensor), f"{who}: x must be a torch.Tensor, got {type(x).__name__}")
    _check(isinstance(weight, torch.Tensor), f"{who}: weight must be a torch.Tensor, got {type(weight).__name__}")
    _check(x.dim() == 4, f"{who}: x must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    _check(x.is_floating_point(), f"{who}: x must be floating point, got {x.dtype}")
    _check(weight.dtype == x.dtype, f"{who}: weight dtype {weight.dtype} must match x dtype {x.dtype}")
    _check(weight.device == x.device, f"{who}: weight is on {weight.device} but x is on {x.device}")
    g = ConvGeometry.make(x.shape, weight.shape, stride, padding, dilation, groups, who)
    for name, v in (("bias", bias), ("scale", scale), ("shift", shift)):
        if v is None:
            continue
        _check(isinstance(v, torch.Tensor) and v.dim() == 1 and v.shape[0] == g.K,
               f"{who}: {name} must be a 1-D tensor of length K={g.K}, got "
               f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
        _check(v.is_floating_point(), f"{who}: {name} must be floating point, got {v.dtype}")
        _check(v.device == x.device, f"{who}: {name} is on {v.device} but x is on {x.device}")
    if residual is not None:
        out_shape = (g.N, g.K, g.P, g.Q)
        _check(isinstance(residual, torch.Tensor) and tuple(residual.shape) == out_shape,
               f"{who}: residual must have the output shape {out_shape}, got "
               f"{tuple(residual.shape) if isinstance(residual, torch.Tensor) else type(residual).__name__}")
        _check(residual.dtype == x.dtype, f"{who}: residual dtype {residual.dtype} must match x dtype {x.dtype}")
        _check(residual.device == x.device, f"{who}: residual is on {residual.device} but x is on {x.device}")
    return g


@torch.library.custom_op("resnet_fast::conv2d", mutates_args=(), schema=_SCHEMA)
def _conv2d_op(x, weight, bias, stride, padding, dilation, groups, scale, shift, residual, relu):
    g = _validate(x, weight, bias, stride, padding, dilation, groups, scale, shift, residual)
    args = (x, weight, bias, stride, padding, dilation, groups)
    kw = dict(scale=scale, shift=shift, residual=residual, relu=relu)
    if not _backend.use_kernels(_OP, x.device):
        return eager_conv2d(*args, **kw)
    from ..kernels import conv_fwd  # defines the Triton kernel: only after the backend set up the interpreter
    if x.dtype not in conv_fwd.SUPPORTED_DTYPES:
        _backend.record_fallback(_OP, f"dtype {x.dtype} has no kernel (fp32/fp16/bf16 only)")
        return eager_conv2d(*args, **kw)
    if x.dtype == torch.bfloat16 and _backend.interpreting():
        _backend.record_fallback(_OP, "bf16 tl.dot is wrong in the Triton interpreter")
        return eager_conv2d(*args, **kw)
    _backend.record_kernel_call(_OP)
    cl = torch.channels_last
    w_packed = conv_fwd.pack_weight(weight, groups, x.dtype)
    res = None if residual is None else residual.contiguous(memory_format=cl)
    y, _ = conv_fwd.conv2d_nhwc(x.contiguous(memory_format=cl), w_packed, g, bias=bias, scale=scale,
                                shift=shift, residual=res, relu=relu)
    return y


@_conv2d_op.register_fake
def _conv2d_fake(x, weight, bias, stride, padding, dilation, groups, scale, shift, residual, relu):
    g = _validate(x, weight, bias, stride, padding, dilation, groups, scale, shift, residual)
    return torch.empty((g.N, g.K, g.P, g.Q), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0,
           dilation=1, groups: int = 1, *, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
           residual: torch.Tensor | None = None, relu: bool = False) -> torch.Tensor:
    """``act((conv(x, weight) + bias) * scale[k] + shift[k] + residual)``, each term optional.

    Args:
        x: ``[N, C, H, W]`` float32/float16/bfloat16 (float64 runs the eager fallback), any layout;
            channels_last avoids a copy.
        weight: ``[K, C/groups, R, S]`` in x's dtype (packed once per weight version and cached).
        bias, scale, shift: optional ``[K]`` float vectors, applied in fp32 (``scale``/``shift`` typically from
            :func:`fold_bn`).
        stride, padding, dilation: int or pair; zero padding. groups: divides C and K.
        residual: optional ``[N, K, P, Q]`` in x's dtype, added after scale/shift, before the ReLU.
        relu: apply ReLU last.

    Returns:
        ``[N, K, P, Q]`` in x's dtype, channels_last memory format. fp32 uses TF32 exactly when PyTorch would
        for a cuDNN conv (:func:`resnet_fast.kernels.configs.conv_allows_tf32`).
    """
    _check(relu in (True, False), f"conv2d: relu must be a bool, got {relu!r}")
    _validate(x, weight, bias, stride, padding, dilation, groups, scale, shift, residual)
    lists = [list(pair(v, n, "conv2d", lo)) for v, n, lo in ((stride, "stride", 1), (padding, "padding", 0),
                                                              (dilation, "dilation", 1))]
    return _conv2d_op(x, weight, bias, *lists, groups, scale, shift, residual, bool(relu))


def fold_bn(running_mean: torch.Tensor, running_var: torch.Tensor, weight: torch.Tensor | None,
            bias: torch.Tensor | None, eps: float) -> tuple:
    """Eval-mode BatchNorm as a per-channel affine: ``scale = weight / sqrt(var + eps)``,
    ``shift = bias - mean * scale`` (weight/bias None for ``affine=False``: 1 and 0).

    Args: ``[C]`` float vectors on one device; eps > 0. Returns ``(scale, shift)``, ``[C]`` float32 contiguous,
    computed in float64 and rounded once (differentiable; inputs are not modified).
    """
    who = "fold_bn"
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        _check(isinstance(t, torch.Tensor) and t.dim() == 1 and t.is_floating_point(),
               f"{who}: {name} must be a 1-D floating tensor, got "
               f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    C = running_mean.shape[0]
    for name, t in (("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is None and name != "running_var":
            continue
        _check(isinstance(t, torch.Tensor) and t.dim() == 1 and t.shape[0] == C and t.is_floating_point(),
               f"{who}: {name} must be a 1-D floating tensor of length {C} like running_mean")
        _check(t.device == running_mean.device,
               f"{who}: {name} is on {t.device} but running_mean is on {running_mean.device}")
    _check(isinstance(eps, (int, float)) and eps > 0, f"{who}: eps must be a positive number, got {eps!r}")
    f64 = torch.float64 if running_mean.device.type != "mps" else torch.float32
    scale = torch.rsqrt(running_var.to(f64) + eps)
    if weight is not None:
        scale = scale * weight.to(f64)
    shift = -running_mean.to(f64) * scale
    if bias is not None:
        shift = shift + bias.to(f64)
    return scale.to(torch.float32).contiguous(), shift.to(torch.float32).contiguous()
