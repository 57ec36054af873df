"""Training op: conv with an optional BN+ReLU prologue, plus its batch statistics, with autograd.

``torch.ops.resnet_fast.conv_bn_stats(x, weight, in_scale, in_shift, in_centre, stride, padding, dilation,
groups, eps) -> (y, mean, invstd)``::

    a      = relu(x*in_scale[c] + in_shift[c])   (prologue; a = x when in_scale is None)
    y      = conv(a, weight)                      activation dtype, channels_last (never normalised here)
    mean   = E[y], invstd = 1/sqrt(Var[y] + eps)  fp32 [K], biased variance over N*P*Q, as BatchNorm2d

Kernels: ``conv_fwd.conv2d_nhwc(stats=True)`` writes y and per-tile Σy and centred Σ(y - ȳ_tile)²;
``bn_finalize`` merges them (running statistics are NOT touched here: :func:`update_running_stats` does that, so
the op is pure). The BN affine ``scale = gamma*invstd, shift = beta - mean*scale`` is [C] torch math
(:func:`bn_affine`), so autograd carries gradients to gamma/beta and back into ``mean``/``invstd``.

Backward (``conv_bn_stats_backward``, a custom op too so torch.compile traces it as one node): the gradient
w.r.t. y is ``g_y + g_mean/M - g_invstd*invstd³*(y - mean)/M``, i.e. ``dy = c1*g_y + c2*(y - mean) + c3``
with c1 = 1 -- formed while loading dy in dgrad and wgrad (their ``dy_bn`` option), never written. With a
prologue, dgrad's dReLU epilogue returns ``dz = dA*[x*in_scale + in_shift > 0]`` and per-tile Σdz,
Σdz·(x - in_centre), and stores ``grad_x = dz*in_scale[c]`` (its ``out_scale``), so the in_scale/in_shift
gradients are those sums and grad_x is exact, a channel with in_scale exactly 0 (BN gamma 0) included.
wgrad recomputes ``a`` from x in its prologue (for a 3×3 stride-1 conv by default in a pass before the GEMM:
:mod:`resnet_fast.kernels.prologue_pass`, a tuning choice of the launchers, as in the forward). Saved: x, weight,
in_scale, in_shift, in_centre, y, mean, invstd -- no normalised activations. Only the gradients ``needs_input_grad``
asks for are computed: no dgrad when x needs none and there is no prologue whose in_scale/in_shift need one (the
network's input image), no wgrad when the weight needs none.

Implementation per conv: the forward body and the backward body each ask
:func:`resnet_fast.kernels.autotune.choose_impl` (roles ``conv_bn_stats`` and ``conv_bn_stats_backward``;
switches: the prologue, the need flags, the TF32 rule) whether the Triton kernels above or the cuDNN composite
(:mod:`resnet_fast.ops.conv_cudnn`: ATen's conv GEMM and this project's one-pass kernels) runs it
(``RESNET_FAST_CONV_IMPL``; measured once per key on the GPU, Triton in the interpreter). They are chosen
separately: both save the same tensors (x, y, the statistics; neither saves the prologue's output), so any
pairing of forward and backward is valid and choosing each on its own can only be faster. Each call is counted in
``resnet_fast.stats()["impl_calls"]``.

Tensors and numbers only: the module-level training unit (a Conv2d and a BatchNorm2d, running statistics,
synced BN) is :mod:`resnet_fast.nn.train_path`, built on this op, :func:`bn_affine` and
:func:`update_running_stats`.
"""
from __future__ import annotations

import torch

from .. import _backend, _ext
from ..kernels.bn_dy import dy_pass_may_pay
from ..kernels.checks import check, describe, kernel_dtype_blocker
from ..kernels.conv_common import ConvGeometry
from . import conv_cudnn
from ._common import conv_arg_lists, conv_geometry, run_chosen, tf32_switch, with_strides_of

__all__ = ["conv_bn_stats", "bn_affine", "update_running_stats"]

_OP = "conv_bn_stats"
_BWD_OP = "conv_bn_stats_backward"
_FWD_SCHEMA = ("(Tensor x, Tensor weight, Tensor? in_scale, Tensor? in_shift, Tensor? in_centre, int[] stride, "
               "int[] padding, int[] dilation, int groups, float eps) -> (Tensor, Tensor, Tensor)")
_BWD_SCHEMA = ("(Tensor g_y, Tensor c2, Tensor c3, Tensor x, Tensor weight, Tensor? in_scale, Tensor? in_shift, "
               "Tensor? in_centre, Tensor y, Tensor mean, int[] stride, int[] padding, int[] dilation, "
               "int groups, bool need_x, bool need_w, bool need_affine) -> (Tensor, Tensor, Tensor, Tensor)")


def _validate(x, weight, in_scale, in_shift, in_centre, stride, padding, dilation, groups) -> ConvGeometry:
    who = _OP
    geom = conv_geometry(who, x, weight, stride, padding, dilation, groups)
    check((in_scale is None) == (in_shift is None), f"{who}: in_scale and in_shift go together")
    check(in_centre is None or in_scale is not None, f"{who}: in_centre needs in_scale/in_shift")
    for name, v in (("in_scale", in_scale), ("in_shift", in_shift), ("in_centre", in_centre)):
        if v is not None:
            check(isinstance(v, torch.Tensor) and v.shape == (geom.C,) and v.dtype == torch.float32
                  and v.device == x.device, f"{who}: {name} must be a float32 [{geom.C}] tensor on {x.device}, "
                  f"got {tuple(v.shape) if isinstance(v, torch.Tensor) else describe(v)}")
    check(geom.N * geom.P * geom.Q > 1, f"{who}: BatchNorm needs more than 1 value per channel in training, got "
          f"N*P*Q = {geom.N * geom.P * geom.Q}")
    return geom


def _contiguous_or_none(v):
    return None if v is None else v.contiguous()


@torch.library.custom_op("resnet_fast::conv_bn_stats", mutates_args=(), schema=_FWD_SCHEMA)
def _conv_bn_stats_op(x, weight, in_scale, in_shift, in_centre, stride, padding, dilation, groups, eps):
    geom = _validate(x, weight, in_scale, in_shift, in_centre, stride, padding, dilation, groups)
    from ..kernels import bn_finalize, conv_fwd  # Triton kernels: only after the backend set up the interpreter
    xc = x.contiguous(memory_format=torch.channels_last)
    sc, sh = _contiguous_or_none(in_scale), _contiguous_or_none(in_shift)

    def triton():
        return conv_fwd.conv2d_nhwc(xc, conv_fwd.pack_weight(weight, groups, x.dtype), geom, in_scale=sc,
                                    in_shift=sh, in_relu=sc is not None, stats=True)

    runners = {"triton": triton}
    if sc is None or _ext.load():  # the composite's prologue is the C++ bn_relu
        runners["cudnn"] = lambda: conv_cudnn.conv_bn_stats(xc, weight, sc, sh, stride, padding, dilation, groups)
    y, st = run_chosen(_OP, geom, x, (sc is not None, tf32_switch(x.dtype)), runners)
    mean, invstd, _, _ = bn_finalize.bn_finalize(st.sum, st.m2, geom.N * geom.P * geom.Q, tile_rows=st.tile_rows,
                                                momentum=0.0, eps=eps)
    return y, mean, invstd


@_conv_bn_stats_op.register_fake
def _conv_bn_stats_fake(x, weight, in_scale, in_shift, in_centre, stride, padding, dilation, groups, eps):
    geom = _validate(x, weight, in_scale, in_shift, in_centre, stride, padding, dilation, groups)
    y = torch.empty((geom.N, geom.K, geom.P, geom.Q), dtype=x.dtype, device=x.device,
                    memory_format=torch.channels_last)
    return y, x.new_empty((geom.K,), dtype=torch.float32), x.new_empty((geom.K,), dtype=torch.float32)


@torch.library.custom_op("resnet_fast::conv_bn_stats_backward", mutates_args=(), schema=_BWD_SCHEMA)
def _conv_bn_stats_backward_op(g_y, c2, c3, x, weight, in_scale, in_shift, in_centre, y, mean, stride, padding,
                               dilation, groups, need_x, need_w, need_affine):
    """``(grad_x, grad_w, grad_scale, grad_shift)``; grad_x only with ``need_x``, grad_w only with ``need_w`` and
    the prologue's grad_scale/grad_shift only with ``need_affine`` (and a prologue), each else an empty tensor."""
    geom = ConvGeometry.make(tuple(x.shape), tuple(weight.shape), stride, padding, dilation, groups, _BWD_OP)
    args = (g_y, c2, c3, x, weight, in_scale, in_shift, in_centre, y, mean, stride, padding, dilation, groups)
    need_affine = need_affine and in_scale is not None
    runners = {"triton": lambda: _triton_backward(*args, need_x, need_w, need_affine)}
    tf32 = tf32_switch(x.dtype)
    if dy_pass_may_pay(geom, need_x or need_affine, in_scale is not None and x.dtype == torch.float32 and not tf32):
        runners["triton_dy_pass"] = lambda: _triton_backward(*args, need_x, need_w, need_affine, dy_pass=True)
    if in_scale is None or _ext.load():  # the composite's prologue backward is the C++ bn_relu_backward
        runners["cudnn"] = lambda: conv_cudnn.conv_bn_stats_backward(*args, need_x=need_x, need_w=need_w,
                                                                     need_affine=need_affine)
    switches = (in_scale is not None, need_x, need_w, need_affine, tf32)
    return run_chosen(_BWD_OP, geom, x, switches, runners)


def _triton_backward(g_y, c2, c3, x, weight, in_scale, in_shift, in_centre, y, mean, stride, padding, dilation,
                     groups, need_x, need_w, need_affine, dy_pass: bool = False):
    """The backward op on the dgrad/wgrad kernels (results as :func:`_conv_bn_stats_backward_op`'s). ``dy_pass``:
    dy formed once by :func:`..kernels.bn_dy.form_train_dy` and fed to both GEMMs as is (see :func:`dy_pass_may_pay`),
    instead of on every load."""
    from ..kernels.bn_dy import form_train_dy
    from ..kernels.bn_finalize import bn_backward_coeffs
    from ..kernels.conv_common import DyBN
    from ..kernels.conv_dgrad import conv2d_dgrad_nhwc
    from ..kernels.conv_wgrad import conv2d_wgrad_nhwc
    conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    x = x.contiguous(memory_format=torch.channels_last)  # as the forward read it (a no-op: the forward made it so)
    g_y = with_strides_of(g_y, y)
    if dy_pass:  # dy = g_y + c2*(y - mean) + c3, once
        g_y = form_train_dy(g_y, y, c2, c3, mean)
        dy_bn = None
    else:
        dy_bn = DyBN(y, torch.ones_like(mean), c2, c3, mean)  # dy = 1*g_y + c2*(y - mean) + c3, formed on load
    C = x.shape[1]
    grad_x, grad_w = x.new_empty((0,)), weight.new_empty((0,))
    grad_scale, grad_shift = (x.new_empty((0,), dtype=torch.float32) for _ in range(2))  # distinct: no aliasing
    if in_scale is None:
        if need_x:
            grad_x = conv2d_dgrad_nhwc(g_y, weight, x.shape, **conv, dy_bn=dy_bn)
    elif need_x or need_affine:  # one dgrad gives grad_x and the prologue's sums
        centre = in_centre if in_centre is not None else torch.zeros_like(in_scale)
        gx, part = conv2d_dgrad_nhwc(g_y, weight, x.shape, **conv, y_prev=x, in_scale=in_scale,
                                     in_shift=in_shift, in_centre=centre, out_scale=in_scale, dy_bn=dy_bn)
        if need_x:
            grad_x = gx
        if need_affine:
            # Fixed-order float64 reduction of the per-tile partials (invstd=1: dgamma = Σ·(x - centre),
            # dbeta = Σ); count only scales the unused coefficients.
            n = max(x.shape[0] * x.shape[2] * x.shape[3], 2)
            _, _, _, s_xc, s = bn_backward_coeffs(part[0], part[1], torch.ones(C, device=x.device), n)
            grad_shift = s  # Σdz
            grad_scale = s_xc + centre * grad_shift  # Σdz·x = Σdz·(x - centre) + centre·Σdz
    if need_w:
        prologue = {} if in_scale is None else dict(in_scale=in_scale, in_shift=in_shift)
        grad_w = conv2d_wgrad_nhwc(g_y, x, weight.shape, **conv, **prologue, dy_bn=dy_bn).to(weight.dtype)
    return grad_x, grad_w, grad_scale, grad_shift


@_conv_bn_stats_backward_op.register_fake
def _conv_bn_stats_backward_fake(g_y, c2, c3, x, weight, in_scale, in_shift, in_centre, y, mean, stride,
                                 padding, dilation, groups, need_x, need_w, need_affine):
    n = x.shape[1] if in_scale is not None and need_affine else 0
    grad_x = (torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last) if need_x
              else x.new_empty((0,)))
    grad_w = torch.empty_like(weight) if need_w else weight.new_empty((0,))
    return grad_x, grad_w, x.new_empty((n,), dtype=torch.float32), x.new_empty((n,), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, in_scale, in_shift, in_centre, stride, padding, dilation, groups, eps = inputs
    y, mean, invstd = output
    ctx.save_for_backward(x, weight, in_scale, in_shift, in_centre, y, mean, invstd)
    ctx.conv = (stride, padding, dilation, groups)
    ctx.owner = _backend.current_conv_owner()  # the backward's choice is recorded for the forward's layer


def _backward(ctx, g_y, g_mean, g_invstd):
    x, weight, in_scale, in_shift, in_centre, y, mean, invstd = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv
    n_x, n_w, n_scale, n_shift = ctx.needs_input_grad[:4]
    need_affine = in_scale is not None and (n_scale or n_shift)
    if not (n_x or n_w or need_affine):
        return (None,) * 10
    m = y.shape[0] * y.shape[2] * y.shape[3]
    # d mean/dy = 1/M, d invstd/dy = -invstd³ (y - mean)/M: [K] coefficients applied while loading dy
    c2 = (-g_invstd.float() * invstd.pow(3) / m).contiguous()
    c3 = (g_mean.float() / m).contiguous()
    with _backend.conv_owner(ctx.owner):
        grad_x, grad_w, grad_scale, grad_shift = _conv_bn_stats_backward_op(
            g_y, c2, c3, x, weight, in_scale, in_shift, in_centre, y, mean, stride, padding, dilation, groups,
            n_x, n_w, need_affine)
    return (grad_x if n_x else None, grad_w if n_w else None, grad_scale if n_scale else None,
            grad_shift if n_shift else None, None, None, None, None, None, None)


_conv_bn_stats_op.register_autograd(_backward, setup_context=_setup_context)


def conv_bn_stats(x: torch.Tensor, weight: torch.Tensor, in_scale: torch.Tensor | None = None,
                  in_shift: torch.Tensor | None = None, in_centre: torch.Tensor | None = None, *, stride=1,
                  padding=0, dilation=1, groups: int = 1, eps: float = 1e-5):
    """Conv of ``relu(x*in_scale + in_shift)`` (or of x) and the batch statistics of its output.

    Args:
        x: ``[N, C, H, W]`` float32/float16/bfloat16 (channels_last avoids a copy): the block input or the
            previous conv's raw output.
        weight: ``[K, C/groups, R, S]`` of x's dtype.
        in_scale, in_shift: optional fp32 ``[C]``, both or neither: the previous BN folded to an affine; the
            prologue is then BN + ReLU. in_centre: optional fp32 ``[C]`` (the previous batch mean, no gradient):
            the centre of the backward's Σdz·(x - centre) sums, for accuracy only.
        stride, padding, dilation, groups: as ``F.conv2d`` (zero padding). eps: BN epsilon.

    Returns:
        ``(y, mean, invstd)``: y ``[N, K, P, Q]`` channels_last in x's dtype; mean, invstd fp32 ``[K]`` (biased
        variance, BatchNorm2d's training normalisation). Differentiable w.r.t. x, weight, in_scale, in_shift.
    """
    lists = conv_arg_lists(stride, padding, dilation, _OP)
    check(isinstance(eps, (int, float)) and eps > 0, f"{_OP}: eps must be a positive number, got {eps!r}")
    if not torch.compiler.is_compiling():
        _validate(x, weight, in_scale, in_shift, in_centre, *lists, groups)
        reason = kernel_dtype_blocker(x.dtype)  # what _validate leaves: bf16 in the Triton interpreter
        if reason is not None:
            raise RuntimeError(f"{_OP}: {reason}; use float32 on CPU")
        _backend.record_kernel_call(_OP)
    return _conv_bn_stats_op(x, weight, in_scale, in_shift, in_centre, *lists, groups, float(eps))


def update_running_stats(running_mean: torch.Tensor, running_var: torch.Tensor,
                         num_batches_tracked: torch.Tensor | None, mean: torch.Tensor, invstd: torch.Tensor, count,
                         momentum: float | None, eps: float) -> None:
    """BatchNorm2d's train-mode running-statistics update, in place, from this batch's ``mean``/``invstd``
    (fp32 [C]) over ``count`` values per channel (an int, or a 0-d device tensor for the global count of a
    synced BN), exactly as ``nn.BatchNorm2d``: ``num_batches_tracked += 1`` (when given); factor = ``momentum``,
    or ``1/num_batches_tracked`` for ``momentum=None`` (a device tensor: no host sync); ``running_var`` takes the
    unbiased variance. ``running_mean``/``running_var``: [C] float buffers; ``eps``: the BN's epsilon. [C] math
    in float64, recovering ``var = invstd^-2 - eps``; not recorded by autograd."""
    with torch.no_grad():
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        if momentum is None:
            factor = 1.0 / num_batches_tracked.double()
        else:
            factor = momentum
        var = invstd.detach().double().pow(-2) - eps
        if isinstance(count, torch.Tensor):  # a synced BN's global count, on the device
            unbiased = var * count / (count - 1).clamp_min(1)
        else:  # host math: a host->device copy here would break CUDA-graph capture
            unbiased = var * (count / max(count - 1, 1))
        running_mean.copy_((1 - factor) * running_mean.double() + factor * mean.detach().double())
        running_var.copy_((1 - factor) * running_var.double() + factor * unbiased)


def bn_affine(mean: torch.Tensor, invstd: torch.Tensor, weight: torch.Tensor | None = None,
              bias: torch.Tensor | None = None):
    """Train-mode BN as a per-channel affine from batch statistics: ``scale = weight*invstd``,
    ``shift = bias - mean*scale`` (weight=1, bias=0 when None, as for affine=False). fp32 [C], differentiable
    w.r.t. weight, bias, mean, invstd (so the batch-statistics part of the BN backward reaches
    :func:`conv_bn_stats`, or the all-gather of :func:`resnet_fast.ops.sync_stats.sync_batch_stats`)."""
    scale = invstd if weight is None else weight.float() * invstd
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.float()
    return scale.contiguous(), shift.contiguous()
