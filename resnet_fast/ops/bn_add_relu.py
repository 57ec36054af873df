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

Centres (``x_centre``, ``res_centre``): optional [C] vectors that change no value, only the rounding of the
scale/res_scale gradients. The backward op then sums Σg·(x - x_centre[c]) instead of Σg·x, and the autograd
rebuilds ``d scale = Σg·(x - x_centre) + x_centre·Σg`` with one rounding. In training x is a raw conv output
and ``scale = gamma*invstd, shift = beta - mean*scale``; the BN backward needs Σg·x - mean·Σg, which for a
channel with |mean| >> std cancels catastrophically when Σg·x is accumulated in fp32 (its error grows with the
number of terms). Passing the (detached) batch mean as the centre leaves only the one rounding of the rebuild,
as ``conv_bn_stats`` does with its ``in_centre``.
"""
from __future__ import annotations

import torch

from .. import _backend, _ext

__all__ = ["bn_add_relu", "bn_add_relu_reference", "bn_relu", "bn_relu_reference"]

_OP = "bn_add_relu"
_OP_NO_RES = "bn_relu"
_REBUILD = "rebuild it with `pip install --no-build-isolation -e .`"


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


def _require_centres(op: str, centres) -> None:
    # An extension built before the centre arguments existed runs every call without them; only a call that
    # passes a centre needs the rebuild.
    if any(c is not None for c in centres) and not _has_centres(op):
        raise RuntimeError(
            f"resnet_fast.ops.{op}: the loaded resnet_fast C++ extension predates the x_centre/res_centre "
            f"arguments (torch.ops.resnet_fast.{op} lacks them); {_REBUILD}")


def _centre_args(x_centre, res_centre=None, has_res=True) -> tuple:
    # The trailing centre arguments of the ops, left out when all are None so that the call also matches an
    # extension built before they existed.
    if x_centre is None and res_centre is None:
        return ()
    return (x_centre, res_centre) if has_res else (x_centre,)


def bn_add_relu(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, residual: torch.Tensor,
                res_scale: torch.Tensor | None = None, res_shift: torch.Tensor | None = None,
                relu: bool = True, *, x_centre: torch.Tensor | None = None,
                res_centre: torch.Tensor | None = None) -> torch.Tensor:
    """``act(x * scale[c] + shift[c] + r)``, ``r = residual * res_scale[c] + res_shift[c]`` (or ``residual``).

    Args:
        x, residual: [N, C, H, W], same dtype (float32, float16, bfloat16; float64 too) and device, both
            NCHW-contiguous or both channels_last.
        scale, shift: [C] float32 (float64 for float64 x): the main branch's BatchNorm folded to an affine.
        res_scale, res_shift: optional [C] float32, the downsample branch's folded BatchNorm; both or neither.
        relu: apply ReLU (else identity).
        x_centre, res_centre: optional [C] float32 (float64 for float64 x), not differentiated: centres of the
            backward's Σg·(x - x_centre) and Σg·(residual - res_centre) sums (pass the detached batch means of
            x and residual). They change no value, only the rounding of the scale / res_scale gradients (see
            the module docstring). The eager backend ignores them.

    Returns:
        [N, C, H, W] tensor of x's dtype and memory format. Differentiable w.r.t. x, scale, shift, residual,
        res_scale, res_shift; the backward is one fused pass (see ``csrc/bn_add_relu.cpp``).
    """
    if not torch.compiler.is_compiling():
        _check_args(_OP, x, (("scale", scale), ("shift", shift), ("residual", residual), ("res_scale", res_scale),
                             ("res_shift", res_shift), ("x_centre", x_centre), ("res_centre", res_centre)),
                    optional=("res_scale", "res_shift", "x_centre", "res_centre"))
        if _backend.backend() == "eager":
            return bn_add_relu_reference(x, scale, shift, residual, res_scale, res_shift, relu)
        _ext.require(_OP)
        _require_centres(_OP, (x_centre, res_centre))
        _backend.record_kernel_call(_OP)
    return torch.ops.resnet_fast.bn_add_relu(x, scale, shift, residual, res_scale, res_shift, relu,
                                             *_centre_args(x_centre, res_centre))


def bn_relu(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, relu: bool = True, *,
            x_centre: torch.Tensor | None = None) -> torch.Tensor:
    """``act(x * scale[c] + shift[c])``: :func:`bn_add_relu` without a residual (e.g. the stem's BN + ReLU).

    The same kernels as :func:`bn_add_relu`, instantiated without the residual: no residual is read, and the
    backward writes no grad_residual. Same contract for ``x``, ``scale``, ``shift``, ``relu`` and ``x_centre``;
    returns a tensor of x's dtype and memory format, differentiable w.r.t. x, scale (Σ g·x) and shift (Σ g).
    """
    if not torch.compiler.is_compiling():
        _check_args(_OP_NO_RES, x, (("scale", scale), ("shift", shift), ("x_centre", x_centre)),
                    optional=("x_centre",))
        if _backend.backend() == "eager":
            return bn_relu_reference(x, scale, shift, relu)
        _ext.require(_OP_NO_RES)
        if not _has_bn_relu():
            raise RuntimeError(
                "resnet_fast.ops.bn_relu: the loaded resnet_fast C++ extension predates the bn_relu op "
                f"(torch.ops.resnet_fast.bn_relu is missing); {_REBUILD}")
        _require_centres(_OP_NO_RES, (x_centre,))
        _backend.record_kernel_call(_OP_NO_RES)
    return torch.ops.resnet_fast.bn_relu(x, scale, shift, relu, *_centre_args(x_centre, has_res=False))


def _fake_forward(x, scale, shift, residual, res_scale=None, res_shift=None, relu=True, x_centre=None,
                  res_centre=None):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x))


def _fake_backward(grad_out, x, scale, shift, residual, res_scale, res_shift, relu, x_centre=None,
                   res_centre=None):
    fmt = _memory_format(x)
    c = x.shape[1]
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt),
            torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt),
            scale.new_empty((c,)), scale.new_empty((c,)), scale.new_empty((c,)))


def _fake_forward_no_res(x, scale, shift, relu=True, x_centre=None):
    return _fake_forward(x, scale, shift, None)


def _fake_backward_no_res(grad_out, x, scale, shift, relu, x_centre=None):
    c = x.shape[1]
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x)),
            scale.new_empty((c,)), scale.new_empty((c,)))


def _uncentre(sum_gv, centre, sum_g):
    # Σg·v from the centred Σg·(v - centre): one rounding (the centred sum carries the accuracy).
    return sum_gv if centre is None else sum_gv + centre * sum_g


def _setup_context(ctx, inputs, output):
    # inputs has every schema argument: 9, or 7 with an extension built before the centres existed.
    x, scale, shift, residual, res_scale, res_shift, relu, *centres = inputs
    x_centre, res_centre = (centres + [None, None])[:2]
    # Inputs, not the output: the backward recomputes the ReLU mask, so nothing extra stays alive.
    ctx.save_for_backward(x, scale, shift, residual, res_scale, res_shift, x_centre, res_centre)
    ctx.relu = relu
    ctx.n_inputs = len(inputs)


def _backward(ctx, grad_out):
    x, scale, shift, residual, res_scale, res_shift, x_centre, res_centre = ctx.saved_tensors
    # No-op in the usual case; densifies expanded/other-layout gradients the kernel does not index.
    grad_out = grad_out.contiguous(memory_format=_memory_format(x))
    grad_x, grad_r, sum_g, sum_gx, sum_gr = torch.ops.resnet_fast.bn_add_relu_backward(
        grad_out, x, scale, shift, residual, res_scale, res_shift, ctx.relu, *_centre_args(x_centre, res_centre))
    has_res = res_scale is not None
    # d/d scale = Σ g·x, d/d shift = Σ g, d/d res_scale = Σ g·residual, d/d res_shift = Σ g (own copy, so the
    # two .grad tensors never share storage); the centres have no gradient (the output does not depend on them).
    grads = (grad_x, _uncentre(sum_gx, x_centre, sum_g), sum_g, grad_r,
             _uncentre(sum_gr, res_centre, sum_g) if has_res else None, sum_g.clone() if has_res else None, None)
    return grads + (None,) * (ctx.n_inputs - len(grads))


def _setup_context_no_res(ctx, inputs, output):
    x, scale, shift, relu, *centre = inputs  # 5 inputs, or 4 with an extension that predates x_centre
    x_centre = centre[0] if centre else None
    ctx.save_for_backward(x, scale, shift, x_centre)
    ctx.relu = relu
    ctx.n_inputs = len(inputs)


def _backward_no_res(ctx, grad_out):
    x, scale, shift, x_centre = ctx.saved_tensors
    grad_out = grad_out.contiguous(memory_format=_memory_format(x))
    grad_x, sum_g, sum_gx = torch.ops.resnet_fast.bn_relu_backward(grad_out, x, scale, shift, ctx.relu,
                                                                   *_centre_args(x_centre, has_res=False))
    grads = (grad_x, _uncentre(sum_gx, x_centre, sum_g), sum_g, None)
    return grads + (None,) * (ctx.n_inputs - len(grads))


def _has_bn_relu() -> bool:
    # False with an extension built before bn_relu existed (a stale in-place build): bn_add_relu still works.
    return hasattr(torch.ops.resnet_fast, "bn_relu")


def _has_centres(op: str = _OP) -> bool:
    # False with an extension built before the x_centre/res_centre arguments existed: read from the op's
    # registered schema (forward and backward come from the same build).
    try:
        schema = getattr(torch.ops.resnet_fast, op).default._schema
    except (AttributeError, RuntimeError):
        return False
    return any(a.name == "x_centre" for a in schema.arguments)


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
