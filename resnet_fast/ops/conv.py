"""``resnet_fast.ops.conv2d``: fused conv + bias + folded BN + residual + ReLU as one custom op, and ``fold_bn``.

``torch.ops.resnet_fast.conv2d`` is a ``torch.library.custom_op`` with a fake implementation, so
``torch.compile`` and CUDA graphs see one opaque op. The kernel is
:func:`resnet_fast.kernels.conv_fwd.conv2d_nhwc`; the explicit eager fallback is
:func:`resnet_fast.ops.eager.eager_conv2d`, taken (and counted) when :func:`resnet_fast._backend.use_kernels`
says no, for a dtype the kernel lacks (float64), and for bf16 in the Triton interpreter.

Autograd (``register_autograd``): the backward is the custom op ``resnet_fast::conv2d_backward`` (fake
registered, so AOTAutograd traces it as one node), on the dgrad/wgrad kernels. With ``g`` the upstream gradient
masked by ``out > 0`` under ReLU (per output channel k)::

    grad_residual = g                       grad_shift = Σ_npq g        grad_bias = scale·Σg
    dW_g = wgrad(g, x)                      grad_weight = scale[k]·dW_g[k]
    grad_scale[k] = Σ_crs W[k]·dW_g[k] + bias[k]·Σg[k]      (= Σ_npq g·(conv + bias): no conv recomputed)
    grad_x = dgrad(g, W·scale[k])           (= dgrad(scale[k]·g): the scale folded into a weight-sized copy)

``g`` is never materialised for the kernels: dgrad and wgrad read the upstream gradient and the saved output
and mask ``grad where out > 0`` while loading (dgrad's ``relu_out``; wgrad's ``dy_bn``/``dy_relu`` with c1 = 1,
c2 = c3 = 0), and wgrad also emits Σg (its ``dy_sums``). Only ``grad_residual`` is an activation-sized torch
result, when the residual needs a gradient. Only what ``needs_input_grad`` asks for is computed; a channel with
scale exactly 0 is exact (nothing is divided by the scale). Saved: x, weight, bias, scale and, under ReLU, the output.

Implementation per conv: when the kernels run, the forward body and the backward body each ask
:func:`resnet_fast.kernels.autotune.choose_impl` (roles ``conv2d`` and ``conv2d_backward``; switches: which of
bias/scale/shift/residual are given, relu, the need flags, the TF32 rule) whether the Triton kernels, the cuDNN
composite (:mod:`resnet_fast.ops.conv_cudnn`) or, for the forward, one of the composite's folded/fused forms
runs it (``RESNET_FAST_CONV_IMPL``; measured once per key on the GPU, Triton in the interpreter). Forward and
backward are chosen separately: both implementations save and read the same tensors, so any pairing is valid
and choosing each on its own can only be faster. Each call is counted in ``resnet_fast.stats()["impl_calls"]``.

Layout: NHWC (``channels_last``) is native; other inputs are converted once per call. The output is always a
``[N, K, P, Q]`` channels_last tensor in x's dtype, on both paths.
"""
from __future__ import annotations

import torch

from .. import _backend, _ext
from ..kernels.checks import check, kernel_dtype_blocker
from ..kernels.conv_common import ConvGeometry
from . import conv_cudnn
from ._common import conv_arg_lists, run_chosen, tf32_switch, with_strides_of
from .eager import eager_conv2d

__all__ = ["conv2d", "fold_bn"]

_OP = "conv2d"
_BWD_OP = "conv2d_backward"
_SCHEMA = ("(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, int[] dilation, int groups, "
           "Tensor? scale, Tensor? shift, Tensor? residual, bool relu) -> Tensor")
_BWD_SCHEMA = ("(Tensor grad, Tensor x, Tensor weight, Tensor? scale, Tensor? out, int[] stride, int[] padding, "
               "int[] dilation, int groups, bool relu, bool need_x, bool need_dw, bool need_sums) "
               "-> (Tensor, Tensor, Tensor)")

def _validate(x, weight, bias, stride, padding, dilation, groups, scale, shift, residual) -> ConvGeometry:
    """The conv's geometry; ValueError naming the argument for any inconsistent input."""
    who = "conv2d"
    check(isinstance(x, torch.Tensor), f"{who}: x must be a torch.Tensor, got {type(x).__name__}")
    check(isinstance(weight, torch.Tensor), f"{who}: weight must be a torch.Tensor, got {type(weight).__name__}")
    check(x.dim() == 4, f"{who}: x must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    check(x.is_floating_point(), f"{who}: x must be floating point, got {x.dtype}")
    check(weight.dtype == x.dtype, f"{who}: weight dtype {weight.dtype} must match x dtype {x.dtype}")
    check(weight.device == x.device, f"{who}: weight is on {weight.device} but x is on {x.device}")
    geom = ConvGeometry.make(x.shape, weight.shape, stride, padding, dilation, groups, who)
    for name, v in (("bias", bias), ("scale", scale), ("shift", shift)):
        if v is None:
            continue
        check(isinstance(v, torch.Tensor) and v.dim() == 1 and v.shape[0] == geom.K,
              f"{who}: {name} must be a 1-D tensor of length K={geom.K}, got "
               f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
        check(v.is_floating_point(), f"{who}: {name} must be floating point, got {v.dtype}")
        check(v.device == x.device, f"{who}: {name} is on {v.device} but x is on {x.device}")
    if residual is not None:
        out_shape = (geom.N, geom.K, geom.P, geom.Q)
        check(isinstance(residual, torch.Tensor) and tuple(residual.shape) == out_shape,
               f"{who}: residual must have the output shape {out_shape}, got "
               f"{tuple(residual.shape) if isinstance(residual, torch.Tensor) else type(residual).__name__}")
        check(residual.dtype == x.dtype, f"{who}: residual dtype {residual.dtype} must match x dtype {x.dtype}")
        check(residual.device == x.device, f"{who}: residual is on {residual.device} but x is on {x.device}")
    return geom


def _use_kernels(op: str, x: torch.Tensor) -> bool:
    """Whether ``op`` (the forward or the backward) runs the kernels for ``x``; every "no" but the eager
    backend's is a recorded fallback, and a "yes" is a counted kernel call."""
    if not _backend.use_kernels(op, x.device):
        return False
    reason = kernel_dtype_blocker(x.dtype)
    if reason is not None:
        _backend.record_fallback(op, reason)
        return False
    _backend.record_kernel_call(op)
    return True


@torch.library.custom_op("resnet_fast::conv2d", mutates_args=(), schema=_SCHEMA)
def _conv2d_op(x, weight, bias, stride, padding, dilation, groups, scale, shift, residual, relu):
    geom = _validate(x, weight, bias, stride, padding, dilation, groups, scale, shift, residual)
    args = (x, weight, bias, stride, padding, dilation, groups)
    kw = dict(scale=scale, shift=shift, residual=residual, relu=relu)
    if not _use_kernels(_OP, x):
        _backend.record_impl_call(_OP, "eager")
        return eager_conv2d(*args, **kw)
    from ..kernels import conv_fwd
    xc = x.contiguous(memory_format=torch.channels_last)
    res = None if residual is None else residual.contiguous(memory_format=torch.channels_last)

    def triton():
        y, _ = conv_fwd.conv2d_nhwc(xc, conv_fwd.pack_weight(weight, groups, x.dtype), geom, bias=bias,
                                    scale=scale, shift=shift, residual=res, relu=relu)
        return y

    cudnn_args = (xc, weight, bias, stride, padding, dilation, groups, scale, shift, res, relu)
    runners = {"triton": triton}
    if _ext.load():  # the composite's epilogue pass is the C++ bn_relu/bn_add_relu
        runners["cudnn"] = lambda: conv_cudnn.conv2d(*cudnn_args)
    runners.update(conv_cudnn.conv2d_fused_candidates(*cudnn_args))
    switches = (bias is not None, scale is not None, shift is not None, residual is not None, relu,
                tf32_switch(x.dtype))
    return run_chosen(_OP, geom, x, switches, runners)


@_conv2d_op.register_fake
def _conv2d_fake(x, weight, bias, stride, padding, dilation, groups, scale, shift, residual, relu):
    geom = _validate(x, weight, bias, stride, padding, dilation, groups, scale, shift, residual)
    return torch.empty((geom.N, geom.K, geom.P, geom.Q), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """dtype of the backward's dW_g and Σg: float32, float64 for float64 x (the eager fallback)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.custom_op("resnet_fast::conv2d_backward", mutates_args=(), schema=_BWD_SCHEMA)
def _conv2d_backward_op(grad, x, weight, scale, out, stride, padding, dilation, groups, relu, need_x, need_dw,
                        need_sums):
    """``(grad_x, dW_g, Σg)`` with ``g = grad where out > 0`` (relu) or ``grad``: ``grad_x = dgrad(scale·g)``
    ([N, C, H, W] channels_last, x's dtype), ``dW_g = wgrad(g, x)`` and ``Σg`` (per output channel, fp32); each
    an empty tensor unless asked for (need_x, need_dw, need_sums)."""
    conv = dict(stride=list(stride), padding=list(padding), dilation=list(dilation), groups=groups)
    if not _use_kernels(_BWD_OP, x):
        _backend.record_impl_call(_BWD_OP, "eager")
        return _eager_backward(grad, x, weight, scale, out, conv, relu, need_x, need_dw, need_sums)
    geom = ConvGeometry.make(tuple(x.shape), tuple(weight.shape), stride, padding, dilation, groups, _BWD_OP)
    args = (grad, x, weight, scale, out, stride, padding, dilation, groups, relu, need_x, need_dw, need_sums)
    runners = {"triton": lambda: _triton_backward(grad, x, weight, scale, out, conv, relu, need_x, need_dw,
                                                  need_sums),
               "cudnn": lambda: conv_cudnn.conv2d_backward(*args)}
    switches = (scale is not None, relu, need_x, need_dw, need_sums, tf32_switch(x.dtype))
    return run_chosen(_BWD_OP, geom, x, switches, runners)


def _triton_backward(grad, x, weight, scale, out, conv, relu, need_x, need_dw, need_sums):
    """The backward op on the dgrad/wgrad kernels (results as :func:`_conv2d_backward_op`'s)."""
    from ..kernels.conv_common import DyBN
    from ..kernels.conv_dgrad import conv2d_dgrad_nhwc
    from ..kernels.conv_wgrad import conv2d_wgrad_nhwc
    K = weight.shape[0]
    # The kernels read g straight from grad: under ReLU the mask comes from the saved output (dgrad's relu_out,
    # wgrad's dy_bn y: it must share grad's strides).
    grad = with_strides_of(grad, out) if relu else grad.contiguous(memory_format=torch.channels_last)
    grad_x, dw_g, sums = (x.new_empty((0,), dtype=torch.float32) for _ in range(3))  # distinct: no aliasing
    if need_x:  # dgrad(scale[k]*g) = dgrad(g, W*scale[k]): the K-loop only masks (under ReLU) or reads grad
        w = weight
        if scale is not None:  # products in fp32, rounded once to the weight's dtype, in its memory format
            w = torch.mul(weight, scale.to(torch.float32).view(-1, 1, 1, 1), out=torch.empty_like(weight))
        grad_x = conv2d_dgrad_nhwc(grad, w, x.shape, **conv, relu_out=out if relu else None)
    if need_dw or need_sums:  # Σg always comes along: one row sum per A tile in one column of programs
        x = x.contiguous(memory_format=torch.channels_last)  # as the forward read it (a no-op for channels_last x)
        dy_bn = None
        if relu:  # dy = 1*(grad where out > 0) + 0
            zeros = torch.zeros(K, dtype=torch.float32, device=x.device)
            dy_bn = DyBN(out, torch.ones_like(zeros), zeros, zeros, zeros)
        dw, sums = conv2d_wgrad_nhwc(grad, x, weight.shape, **conv, dy_bn=dy_bn, dy_relu=relu, dy_sums=True,
                                     need_dw=need_dw)
        if dw is not None:
            dw_g = dw
        if not need_sums:
            sums = x.new_empty((0,), dtype=torch.float32)
    return grad_x, dw_g, sums


def _eager_backward(grad, x, weight, scale, out, conv, relu, need_x, need_dw, need_sums):
    """The backward op's explicit eager fallback (float32 math, float64 for float64 x)."""
    acc = _acc_dtype(x)
    g = grad.to(acc)
    if relu:
        g = torch.where(out > 0, g, 0)
    grad_x, dw_g, sums = (x.new_empty((0,), dtype=acc) for _ in range(3))
    if need_x:
        dy = g if scale is None else g * scale.to(acc).view(1, -1, 1, 1)
        grad_x = torch.nn.grad.conv2d_input(x.shape, weight.to(acc), dy, **conv).to(x.dtype)
        grad_x = grad_x.contiguous(memory_format=torch.channels_last)
    if need_dw:
        dw_g = torch.nn.grad.conv2d_weight(x.to(acc), weight.shape, g, **conv)
    if need_sums:
        sums = g.sum((0, 2, 3))
    return grad_x, dw_g, sums


@_conv2d_backward_op.register_fake
def _conv2d_backward_fake(grad, x, weight, scale, out, stride, padding, dilation, groups, relu, need_x, need_dw,
                          need_sums):
    acc = _acc_dtype(x)
    grad_x = (torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last) if need_x
              else x.new_empty((0,), dtype=acc))
    dw_g = x.new_empty(weight.shape if need_dw else (0,), dtype=acc)
    sums = x.new_empty((weight.shape[0] if need_sums else 0,), dtype=acc)
    return grad_x, dw_g, sums


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups, scale, shift, residual, relu = inputs
    ctx.save_for_backward(x, weight, bias, scale, output if relu else None)
    ctx.conv = (stride, padding, dilation, groups, relu)
    ctx.shift_dtype = None if shift is None else shift.dtype
    ctx.owner = _backend.current_conv_owner()  # the backward's choice is recorded for the forward's layer


def _backward(ctx, grad):
    x, weight, bias, scale, out = ctx.saved_tensors
    stride, padding, dilation, groups, relu = ctx.conv
    n_x, n_w, n_bias, _, _, _, _, n_scale, n_shift, n_res, _ = ctx.needs_input_grad
    need_dw = n_w or n_scale
    need_sums = n_bias or n_shift or (n_scale and bias is not None)
    grad_x = grad_w = grad_bias = grad_scale = grad_shift = grad_res = None
    if n_x or need_dw or need_sums:
        with _backend.conv_owner(ctx.owner):
            gx, dw_g, sum_g = _conv2d_backward_op(grad, x, weight, scale, out, stride, padding, dilation, groups,
                                                  relu, n_x, need_dw, need_sums)
        # [K]- and weight-sized epilogue in torch, in dW_g's fp32 (float64 on the float64 fallback)
        sc = None if scale is None else scale.to(dw_g.dtype)
        if n_x:
            grad_x = gx
        if n_w:
            grad_w = (dw_g if sc is None else dw_g * sc.view(-1, 1, 1, 1)).to(weight.dtype)
        if n_scale:
            gs = (weight.to(dw_g.dtype) * dw_g).sum((1, 2, 3))
            if bias is not None:
                gs = gs + bias.to(dw_g.dtype) * sum_g
            grad_scale = gs.to(scale.dtype)
        if n_shift:
            grad_shift = sum_g.to(ctx.shift_dtype)
        if n_bias:
            grad_bias = (sum_g if sc is None else sum_g * sc).to(bias.dtype)
    if n_res:  # the one activation-sized torch result: g itself
        grad_res = torch.where(out > 0, grad, 0) if relu else grad
    return grad_x, grad_w, grad_bias, None, None, None, None, grad_scale, grad_shift, grad_res, None


_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


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
    check(relu in (True, False), f"conv2d: relu must be a bool, got {relu!r}")
    _validate(x, weight, bias, stride, padding, dilation, groups, scale, shift, residual)
    lists = conv_arg_lists(stride, padding, dilation, "conv2d")
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
        check(isinstance(t, torch.Tensor) and t.dim() == 1 and t.is_floating_point(),
               f"{who}: {name} must be a 1-D floating tensor, got "
               f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    C = running_mean.shape[0]
    for name, t in (("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is None and name != "running_var":
            continue
        check(isinstance(t, torch.Tensor) and t.dim() == 1 and t.shape[0] == C and t.is_floating_point(),
               f"{who}: {name} must be a 1-D floating tensor of length {C} like running_mean")
        check(t.device == running_mean.device,
               f"{who}: {name} is on {t.device} but running_mean is on {running_mean.device}")
    check(isinstance(eps, (int, float)) and eps > 0, f"{who}: eps must be a positive number, got {eps!r}")
    f64 = torch.float64 if running_mean.device.type != "mps" else torch.float32
    scale = torch.rsqrt(running_var.to(f64) + eps)
    if weight is not None:
        scale = scale * weight.to(f64)
    shift = -running_mean.to(f64) * scale
    if bias is not None:
        shift = shift + bias.to(f64)
    return scale.to(torch.float32).contiguous(), shift.to(torch.float32).contiguous()
