"""Residual tail of a ResNet block as one custom op, ``act(x * scale[c] + shift[c] + r)``, and its
residual-free form ``bn_relu``: ``act(x * scale[c] + shift[c])``.

The kernels (C++ for CPU, CUDA) live in ``csrc/`` and are registered by the extension as
``torch.ops.resnet_fast.bn_add_relu`` / ``bn_add_relu_backward`` and ``bn_relu`` / ``bn_relu_backward`` (the
same kernels, instantiated without the residual); this module adds autograd
(``torch.library.register_autograd``) and fake implementations (``torch.library.register_fake``) so the ops
work under ``torch.compile``. It imports fine without the extension; :func:`bn_add_relu` / :func:`bn_relu` then
raise a RuntimeError naming what is missing.

Layout contract: ``x`` and ``residual`` must be dense NCHW-contiguous or channels_last, both in the same
format (anything else is refused with a ValueError naming the argument, no hidden copies); the output has x's
format. In autograd, an incoming gradient in another layout (e.g. the expanded gradient of ``.sum()``) is made
dense in x's format first.
"""
from __future__ import annotations

import torch

from .. import _backend, _ext

__all__ = ["bn_add_relu", "bn_add_relu_reference", "bn_relu", "bn_relu_reference"]

_OP = "bn_add_relu"
_OP_NO_RES = "bn_relu"


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    # Same rule as check_inputs in csrc/bn_add_relu.cpp; a tensor can be both (size-1 dims, N == 0), and then
    # the strides decide.
    nchw, nhwc = x.is_contiguous(), x.is_contiguous(memory_format=torch.channels_last)
    if nhwc and (not nchw or x.stride(1) < x.stride(3)):
        return torch.channels_last
    return torch.contiguous_format


def bn_add_relu_reference(x, scale, shift, residual, res_scale=None, res_shift=None, relu=True):
    """Eager PyTorch computation of the op (the ``RESNET_FAST_BACKEND=eager`` path), in float32 (float64 for
    float64 inputs), rounded to x's dtype once at the end like the kernels. ``residual=None``: no residual
    term (:func:`bn_relu_reference`)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    shape = (1, -1, 1, 1)
    z = x.to(acc) * scale.to(acc).view(shape) + shift.to(acc).view(shape)
    if residual is not None:
        r = residual.to(acc)
        if res_scale is not None:
            r = r * res_scale.to(acc).view(shape) + res_shift.to(acc).view(shape)
        z = z + r
    if relu:
        z = torch.relu(z)
    return z.to(x.dtype).contiguous(memory_format=_memory_format(x))


def bn_relu_reference(x, scale, shift, relu=True):
    """Eager PyTorch computation of :func:`bn_relu`; see :func:`bn_add_relu_reference`."""
    return bn_add_relu_reference(x, scale, shift, None, relu=relu)


def _check_args(op, x, tensors, optional=()) -> None:
    # Device agreement is checked here too: with e.g. a meta tensor among CPU ones the dispatcher would pick
    # the fake kernel and never reach the C++ checks. `tensors`: (name, value) pairs; names in `optional` may
    # be None.
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    for name, t in tensors:
        if t is None and name in optional:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}; "
                             "all tensors must be on the same device")


def bn_add_relu(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, residual: torch.Tensor,
                res_scale: torch.Tensor | None = None, res_shift: torch.Tensor | None = None,
                relu: bool = True) -> torch.Tensor:
    """``act(x * scale[c] + shift[c] + r)``, ``r = residual * res_scale[c] + res_shift[c]`` (or ``residual``).

    Args:
        x, residual: [N, C, H, W], same dtype (float32, float16, bfloat16; float64 too) and device, both
            NCHW-contiguous or both channels_last.
        scale, shift: [C] float32 (float64 for float64 x): the main branch's BatchNorm folded to an affine.
        res_scale, res_shift: optional [C] float32, the downsample branch's folded BatchNorm; both or neither.
        relu: apply ReLU (else identity).

    Returns:
        [N, C, H, W] tensor of x's dtype and memory format. Differentiable w.r.t. all tensor arguments; the
        backward is one fused pass (see ``csrc/bn_add_relu.cpp``).
    """
    if not torch.compiler.is_compiling():
        _check_args(_OP, x, (("scale", scale), ("shift", shift), ("residual", residual), ("res_scale", res_scale),
                             ("res_shift", res_shift)), optional=("res_scale", "res_shift"))
        if _backend.backend() == "eager":
            return bn_add_relu_reference(x, scale, shift, residual, res_scale, res_shift, relu)
        _ext.require(_OP)
        _backend.record_kernel_call(_OP)
    return torch.ops.resnet_fast.bn_add_relu(x, scale, shift, residual, res_scale, res_shift, relu)


def bn_relu(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, relu: bool = True) -> torch.Tensor:
    """``act(x * scale[c] + shift[c])``: :func:`bn_add_relu` without a residual (e.g. the stem's BN + ReLU).

    The same kernels as :func:`bn_add_relu`, instantiated without the residual: no residual is read, and the
    backward writes no grad_residual. Same contract for ``x``, ``scale``, ``shift``, ``relu``; returns a tensor
    of x's dtype and memory format, differentiable w.r.t. x, scale (Σ g·x) and shift (Σ g).
    """
    if not torch.compiler.is_compiling():
        _check_args(_OP_NO_RES, x, (("scale", scale), ("shift", shift)))
        if _backend.backend() == "eager":
            return bn_relu_reference(x, scale, shift, relu)
        _ext.require(_OP_NO_RES)
        if not _has_bn_relu():
            raise RuntimeError(
                "resnet_fast.ops.bn_relu: the loaded resnet_fast C++ extension predates the bn_relu op "
                "(torch.ops.resnet_fast.bn_relu is missing); rebuild it with "
                "`pip install --no-build-isolation -e .`")
        _backend.record_kernel_call(_OP_NO_RES)
    return torch.ops.resnet_fast.bn_relu(x, scale, shift, relu)


def _fake_forward(x, scale, shift, residual, res_scale=None, res_shift=None, relu=True):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x))


def _fake_backward(grad_out, x, scale, shift, residual, res_scale, res_shift, relu):
    fmt = _memory_format(x)
    c = x.shape[1]
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt),
            torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt),
            scale.new_empty((c,)), scale.new_empty((c,)), scale.new_empty((c,)))


def _fake_forward_no_res(x, scale, shift, relu=True):
    return _fake_forward(x, scale, shift, None)


def _fake_backward_no_res(grad_out, x, scale, shift, relu):
    c = x.shape[1]
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x)),
            scale.new_empty((c,)), scale.new_empty((c,)))


def _setup_context(ctx, inputs, output):
    x, scale, shift, residual, res_scale, res_shift, relu = inputs
    # Inputs, not the output: the backward recomputes the ReLU mask, so nothing extra stays alive.
    ctx.save_for_backward(x, scale, shift, residual, res_scale, res_shift)
    ctx.relu = relu


def _backward(ctx, grad_out):
    x, scale, shift, residual, res_scale, res_shift = ctx.saved_tensors
    # No-op in the usual case; densifies expanded/other-layout gradients the kernel does not index.
    grad_out = grad_out.contiguous(memory_format=_memory_format(x))
    grad_x, grad_r, sum_g, sum_gx, sum_gr = torch.ops.resnet_fast.bn_add_relu_backward(
        grad_out, x, scale, shift, residual, res_scale, res_shift, ctx.relu)
    has_res = res_scale is not None
    # d/d scale = Σ g·x, d/d shift = Σ g, d/d res_scale = Σ g·residual, d/d res_shift = Σ g (own copy, so the
    # two .grad tensors never share storage).
    return (grad_x, sum_gx, sum_g, grad_r, sum_gr if has_res else None, sum_g.clone() if has_res else None, None)


def _setup_context_no_res(ctx, inputs, output):
    x, scale, shift, relu = inputs
    ctx.save_for_backward(x, scale, shift)
    ctx.relu = relu


def _backward_no_res(ctx, grad_out):
    x, scale, shift = ctx.saved_tensors
    grad_out = grad_out.contiguous(memory_format=_memory_format(x))
    grad_x, sum_g, sum_gx = torch.ops.resnet_fast.bn_relu_backward(grad_out, x, scale, shift, ctx.relu)
    return grad_x, sum_gx, sum_g, None


def _has_bn_relu() -> bool:
    # False with an extension built before bn_relu existed (a stale in-place build): bn_add_relu still works.
    return hasattr(torch.ops.resnet_fast, "bn_relu")


def _register() -> None:
    torch.library.register_fake("resnet_fast::bn_add_relu")(_fake_forward)
    torch.library.register_fake("resnet_fast::bn_add_relu_backward")(_fake_backward)
    torch.library.register_autograd("resnet_fast::bn_add_relu", _backward, setup_context=_setup_context)
    if _has_bn_relu():
        torch.library.register_fake("resnet_fast::bn_relu")(_fake_forward_no_res)
        torch.library.register_fake("resnet_fast::bn_relu_backward")(_fake_backward_no_res)
        torch.library.register_autograd("resnet_fast::bn_relu", _backward_no_res,
                                        setup_context=_setup_context_no_res)


if _ext.load():
    _register()
