"""The cuDNN composite of every conv role: the GEMM by ATen's convolution, everything around it by this project.

Each conv op has two implementations with the same inputs and outputs: the Triton kernels (conv GEMM with its
fusions in prologue/epilogue) and this composite, where ``torch.ops.aten.convolution`` /
``torch.ops.aten.convolution_backward`` run the GEMM (cuDNN on CUDA, as eager PyTorch would, but TF32 for fp32
only where the Triton path would use it: :func:`resnet_fast.kernels.configs.conv_allows_tf32`) and this
project's one-pass kernels do the rest. A chooser times both per conv
(:func:`resnet_fast.kernels.autotune.choose_impl`, ``RESNET_FAST_CONV_IMPL``); the op bodies call these pure
functions (tensors in, tensors out, no autograd) when it picks the composite, and count the call as
``stats()["impl_calls"][role]["cudnn"]`` (or the fused form's name): this is the only place a cuDNN conv runs
inside the fast path. The GEMM runs with autocast off: the op bodies already hold their
operands in the activation dtype, and the Triton path ignores autocast too.

Roles, and the passes over activation memory besides the GEMM's own:

* :func:`conv2d` (inference): conv, then ``act(y*scale + shift' + residual)`` in ONE pass with the C++
  ``bn_add_relu``/``bn_relu`` (fp32 math; the bias folds into the shift, ``shift' = bias*scale + shift``,
  exact in fp32). The scale is NOT folded into the weight: the pass is needed anyway for the shift, residual
  or ReLU, and folding would round ``W*scale`` to the operand dtype every call (or need a cache). With nothing
  but a bias, the conv with its bias alone. :func:`conv2d_fused_candidates` offers the folded forms (ATen conv
  with the folded weight/bias, cuDNN's fused conv+ReLU and conv+add+ReLU on CUDA) for the chooser to time.
* :func:`conv_bn_stats` (training forward): ``a = relu(x*in_scale + in_shift)`` materialised by ``bn_relu``
  (one pass, only with a prologue), the conv, then one read of ``y`` by :func:`..kernels.tile_stats.tile_stats`
  for the tile-centred BatchNorm partials (the same :class:`TileStats` the conv epilogue writes; the op then
  runs ``bn_finalize`` as on the Triton path).
* :func:`conv_bn_stats_backward` (training backward): one pass forming ``dy = g_y + c2*(y - mean) + c3``
  (:func:`..kernels.bn_dy.form_dy`, the Triton backward's own transform), the prologue output ``a`` recomputed
  by ``bn_relu`` for the wgrad, ATen's dgrad and wgrad in one ``convolution_backward``, then the prologue's
  dReLU and per-channel sums by the C++ ``bn_relu_backward`` (one pass). Recompute versus save: the forward
  saves only x and y (as the Triton path), so the backward's peak memory stays at or below eager's (which
  keeps ``a`` alive); saving ``a`` instead would spare the backward one read of x and one write of ``a`` per
  conv at the cost of one activation per prologue conv for the whole step. A GPU measurement should compare
  the recompute's time with the backward step's; keep recomputing unless it costs more than a few percent.
* :func:`conv2d_backward` (inference op's backward): one pass forming ``g = grad*[out > 0]`` with the per-tile
  Σg partials (or only the partials, when there is no ReLU to apply), then ``convolution_backward(g, x,
  W*scale[k])``: grad_x = dgrad(scale*g) and dW_g = wgrad(g, x), nothing divided by the scale (a zero-scale
  channel is exact). dW_g comes from ATen in the weight's dtype and is returned as fp32 (for 16-bit weights
  one rounding more than the Triton wgrad's fp32 result).
"""
from __future__ import annotations

import contextlib

import torch

from .. import _ext
from ..kernels.checks import check, describe
from ..kernels.conv_common import ConvGeometry
from ._common import conv_geometry, with_strides_of

__all__ = ["conv2d", "conv2d_fused_candidates", "conv_bn_stats", "conv_bn_stats_backward", "conv2d_backward"]

def _vector(who, name, v, n, device, acc=torch.float32):
    """A per-channel vector as the fp32 contiguous one the C++ ops read, or None."""
    if v is None:
        return None
    check(isinstance(v, torch.Tensor) and v.dim() == 1 and v.shape[0] == n and v.is_floating_point()
          and v.device == device, f"{who}: {name} must be a 1-D float tensor of length {n} on {device}, got "
          f"{describe(v)}")
    return v.to(acc).contiguous()


@contextlib.contextmanager
def _aten_env(x: torch.Tensor):
    """ATen's convs as the Triton path computes: on the operands as given (autocast off: the op bodies hold
    them in the activation dtype already) and, for fp32 on CUDA, with TF32 only where
    :func:`resnet_fast.kernels.configs.conv_allows_tf32` allows it (cuDNN alone would take TF32 by default).
    The cuDNN precision switch is process state: set for the call and restored after it."""
    with contextlib.ExitStack() as stack:
        if torch.is_autocast_enabled(x.device.type):
            stack.enter_context(torch.autocast(x.device.type, enabled=False))
        if x.dtype == torch.float32 and x.is_cuda:
            from ..kernels.configs import conv_allows_tf32
            if not conv_allows_tf32():
                stack.enter_context(_cudnn_ieee())
        yield


@contextlib.contextmanager
def _cudnn_ieee():
    cudnn = torch.backends.cudnn
    conv = getattr(cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9: the per-op precision API
        before = conv.fp32_precision
        conv.fp32_precision = "ieee"
        try:
            yield
        finally:
            conv.fp32_precision = before
    else:
        before = cudnn.allow_tf32
        cudnn.allow_tf32 = False
        try:
            yield
        finally:
            cudnn.allow_tf32 = before


def _aten_conv(x, weight, bias, g: ConvGeometry) -> torch.Tensor:
    with _aten_env(x):
        y = torch.ops.aten.convolution(x, weight, bias, list(g.stride), list(g.padding), list(g.dilation), False,
                                       [0, 0], g.groups)
    # a no-op for a channels_last x (cuDNN and oneDNN keep its format)
    return y.contiguous(memory_format=torch.channels_last)


def _aten_conv_backward(dy, a, weight, g: ConvGeometry, need_input: bool, need_weight: bool):
    with _aten_env(dy):
        return torch.ops.aten.convolution_backward(dy, a, weight, None, list(g.stride), list(g.padding),
                                                   list(g.dilation), False, [0, 0], g.groups,
                                                   [need_input, need_weight, False])


# ------------------------------------------------------------------------------------------------ inference
def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation,
           groups: int, scale: torch.Tensor | None, shift: torch.Tensor | None, residual: torch.Tensor | None,
           relu: bool) -> torch.Tensor:
    """``act((conv(x, W) + bias)*scale[k] + shift[k] + residual)``, each term optional: the composite of
    ``resnet_fast::conv2d`` (same arguments as its op body).

    Args:
        x: ``[N, C, H, W]`` float32/float16/bfloat16, any layout (channels_last avoids a copy).
        weight: ``[K, C/groups, R, S]`` in x's dtype.
        bias, scale, shift: optional ``[K]`` float vectors, applied in fp32.
        stride, padding, dilation: int pairs (lists); groups: int.
        residual: optional ``[N, K, P, Q]`` in x's dtype, added after scale/shift, before the ReLU.
        relu: ReLU last.

    Returns:
        ``[N, K, P, Q]`` channels_last in x's dtype. The conv output is rounded to x's dtype once before the
        fp32 affine (as eager conv + BatchNorm), the Triton path applies the affine before its one rounding.
    """
    who = "conv2d_cudnn"
    g = conv_geometry(who, x, weight, stride, padding, dilation, groups)
    bias32 = _vector(who, "bias", bias, g.K, x.device)
    scale = _vector(who, "scale", scale, g.K, x.device)
    shift = _vector(who, "shift", shift, g.K, x.device)
    if residual is not None:
        check(isinstance(residual, torch.Tensor) and tuple(residual.shape) == (g.N, g.K, g.P, g.Q)
              and residual.dtype == x.dtype and residual.device == x.device,
              f"{who}: residual must be a {(g.N, g.K, g.P, g.Q)} {x.dtype} tensor on {x.device}, got "
              f"{describe(residual)}")
    x = x.contiguous(memory_format=torch.channels_last)
    if scale is None and shift is None and residual is None and not relu and (bias is None
                                                                                 or bias.dtype == x.dtype):
        return _aten_conv(x, weight, bias, g)  # nothing around the GEMM (a bias of another dtype takes a pass)
    y = _aten_conv(x, weight, None, g)
    sc = scale if scale is not None else torch.ones(g.K, dtype=torch.float32, device=x.device)
    sh = shift if shift is not None else torch.zeros(g.K, dtype=torch.float32, device=x.device)
    if bias32 is not None:  # (conv + bias)*scale + shift = conv*scale + (bias*scale + shift), in fp32
        sh = torch.addcmul(sh, bias32, sc)
    _ext.require(who)
    if residual is None:
        return torch.ops.resnet_fast.bn_relu(y, sc, sh, bool(relu))
    residual = residual.contiguous(memory_format=torch.channels_last)
    return torch.ops.resnet_fast.bn_add_relu(y, sc, sh, residual, None, None, bool(relu))


def conv2d_fused_candidates(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding,
                            dilation, groups: int, scale: torch.Tensor | None, shift: torch.Tensor | None,
                            residual: torch.Tensor | None, relu: bool) -> dict:
    """Alternatives to :func:`conv2d` with the scale folded into the weight and every additive term into the
    bias, so the GEMM's own epilogue does it all: ``{name: fn}``, ``fn()`` returning the same output as
    :func:`conv2d` for these arguments; empty when none applies. For the chooser to time (not exact: the
    folded weight ``W*scale[k]`` and bias ``bias*scale + shift`` are rounded to x's dtype once per call).

    * ``"conv_folded"`` (no residual, no ReLU: e.g. a downsample conv + BN): ATen conv with folded weight/bias.
    * ``"cudnn_conv_relu"`` (ReLU, no residual; CUDA): ``torch.cudnn_convolution_relu``.
    * ``"cudnn_conv_add_relu"`` (ReLU and residual; CUDA): ``torch.cudnn_convolution_add_relu`` (alpha 1).
    """
    who = "conv2d_fused"
    g = conv_geometry(who, x, weight, stride, padding, dilation, groups)
    scale = _vector(who, "scale", scale, g.K, x.device)
    shift = _vector(who, "shift", shift, g.K, x.device)
    bias32 = _vector(who, "bias", bias, g.K, x.device)
    if residual is not None and not relu:
        return {}
    on_cudnn = x.is_cuda and torch.backends.cudnn.is_available() and torch.backends.cudnn.enabled
    if relu and not on_cudnn:
        return {}
    lists = (list(g.stride), list(g.padding), list(g.dilation), g.groups)

    def folded():
        w = weight if scale is None else (weight.to(torch.float32) * scale.view(-1, 1, 1, 1)).to(x.dtype)
        b = bias32 if scale is None or bias32 is None else bias32 * scale
        if shift is not None:
            b = shift if b is None else b + shift
        return x.contiguous(memory_format=torch.channels_last), w, None if b is None else b.to(x.dtype)

    def conv_folded():
        xc, w, b = folded()
        return _aten_conv(xc, w, b, g)

    def conv_relu():
        xc, w, b = folded()
        with _aten_env(x):
            return torch.cudnn_convolution_relu(xc, w, b, *lists).contiguous(memory_format=torch.channels_last)

    def conv_add_relu():
        xc, w, b = folded()
        with _aten_env(x):
            z = residual.contiguous(memory_format=torch.channels_last)
            return torch.cudnn_convolution_add_relu(xc, w, z, 1.0, b, *lists).contiguous(
                memory_format=torch.channels_last)

    if not relu:
        return {"conv_folded": conv_folded}
    if residual is None:
        return {"cudnn_conv_relu": conv_relu}
    return {"cudnn_conv_add_relu": conv_add_relu}


def conv2d_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
                    out: torch.Tensor | None, stride, padding, dilation, groups: int, relu: bool, need_x: bool,
                    need_dw: bool, need_sums: bool):
    """``(grad_x, dW_g, Σg)`` of the inference op, ``g = grad where out > 0`` (relu) or ``grad``: the composite
    of ``resnet_fast::conv2d_backward`` (same arguments and results as its op body).

    Args:
        grad: ``[N, K, P, Q]`` upstream gradient in x's dtype, any layout. out: the forward output (the ReLU
            mask), needed with ``relu``. x: ``[N, C, H, W]``; weight ``[K, C/groups, R, S]``; scale: optional
            ``[K]`` float. need_x, need_dw, need_sums: which results to compute.

    Returns:
        grad_x = dgrad(scale*g) ``[N, C, H, W]`` channels_last in x's dtype; dW_g = wgrad(g, x) fp32 contiguous
        ``weight.shape``; Σg fp32 ``[K]`` (per-tile partials reduced in a fixed order in float64); each an
        empty fp32 tensor unless asked for.
    """
    who = "conv2d_backward_cudnn"
    g = conv_geometry(who, x, weight, stride, padding, dilation, groups)
    y_shape = (g.N, g.K, g.P, g.Q)
    check(isinstance(grad, torch.Tensor) and tuple(grad.shape) == y_shape and grad.dtype == x.dtype,
          f"{who}: grad must be a {y_shape} {x.dtype} tensor, got {describe(grad)}")
    check(not relu or (isinstance(out, torch.Tensor) and tuple(out.shape) == y_shape and out.dtype == x.dtype),
          f"{who}: out must be the forward's {y_shape} {x.dtype} output when relu is set, got {describe(out)}")
    scale = _vector(who, "scale", scale, g.K, x.device)
    grad_x, dw_g, sums = (x.new_empty((0,), dtype=torch.float32) for _ in range(3))  # distinct: no aliasing
    grad = grad.contiguous(memory_format=torch.channels_last)
    gy = grad
    if relu or need_sums:
        from ..kernels.bn_dy import form_dy
        write = relu and (need_x or need_dw)
        if write or need_sums:
            mask = out.contiguous(memory_format=torch.channels_last) if relu else None
            formed = form_dy(grad, mask, relu=relu, write=write, sums=need_sums)
            gy = formed.dy if write else grad
            if need_sums:
                sums = formed.sums.sum(0, dtype=torch.float64).to(torch.float32)
    if need_x or need_dw:
        w = weight if scale is None or not need_x else \
            (weight.to(torch.float32) * scale.view(-1, 1, 1, 1)).to(weight.dtype)
        gx, gw, _ = _aten_conv_backward(gy, x.contiguous(memory_format=torch.channels_last), w, g, need_x, need_dw)
        if need_x:
            grad_x = gx.contiguous(memory_format=torch.channels_last)
        if need_dw:
            dw_g = gw.to(torch.float32).contiguous()
    return grad_x, dw_g, sums


# ------------------------------------------------------------------------------------------------- training
def _prologue(who, x, in_scale, in_shift, C):
    """``(in_scale, in_shift)`` as fp32 contiguous vectors, both or neither."""
    check((in_scale is None) == (in_shift is None), f"{who}: in_scale and in_shift go together")
    return _vector(who, "in_scale", in_scale, C, x.device), _vector(who, "in_shift", in_shift, C, x.device)


def conv_bn_stats(x: torch.Tensor, weight: torch.Tensor, in_scale: torch.Tensor | None,
                  in_shift: torch.Tensor | None, stride, padding, dilation, groups: int):
    """``y = conv(relu(x*in_scale + in_shift))`` (or ``conv(x)``) and its per-tile BatchNorm partials: the
    composite of the forward of ``resnet_fast::conv_bn_stats`` up to ``bn_finalize``.

    Args:
        x: ``[N, C, H, W]`` float32/float16/bfloat16, any layout. weight: ``[K, C/groups, R, S]``, x's dtype.
        in_scale, in_shift: optional fp32 ``[C]``, both or neither (the prologue BN + ReLU).
        stride, padding, dilation: int pairs; groups: int.

    Returns:
        ``(y, TileStats)``: y ``[N, K, P, Q]`` channels_last in x's dtype; the fp32 per-tile Σy and
        Σ(y - ȳ_tile)² (:class:`resnet_fast.kernels.tile_stats.TileStats`) for ``bn_finalize``.
    """
    from ..kernels.tile_stats import tile_stats
    who = "conv_bn_stats_cudnn"
    g = conv_geometry(who, x, weight, stride, padding, dilation, groups)
    in_scale, in_shift = _prologue(who, x, in_scale, in_shift, g.C)
    a = x.contiguous(memory_format=torch.channels_last)
    if in_scale is not None:
        _ext.require(who)
        a = torch.ops.resnet_fast.bn_relu(a, in_scale, in_shift, True)
    y = _aten_conv(a, weight, None, g)
    return y, tile_stats(y)


def conv_bn_stats_backward(g_y: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, x: torch.Tensor,
                           weight: torch.Tensor, in_scale: torch.Tensor | None, in_shift: torch.Tensor | None,
                           in_centre: torch.Tensor | None, y: torch.Tensor, mean: torch.Tensor, stride, padding,
                           dilation, groups: int, need_x: bool = True, need_w: bool = True,
                           need_affine: bool = True):
    """``(grad_x, grad_w, grad_scale, grad_shift)`` of ``resnet_fast::conv_bn_stats``: the composite of its
    backward op body, ``dy = g_y + c2*(y - mean) + c3`` the gradient w.r.t. the raw conv output.

    Args:
        g_y: ``[N, K, P, Q]`` upstream gradient w.r.t. y, any layout; y: the forward's raw output
            (channels_last, x's dtype); c2, c3, mean: fp32 ``[K]``.
        x, weight, stride, padding, dilation, groups: the forward's. in_scale, in_shift: the forward's
            prologue (fp32 ``[C]``) or None; in_centre: optional fp32 ``[C]``, the centre of Σdz·(x - centre)
            (accuracy only).
        need_x, need_w: compute grad_x / grad_w (e.g. False for the network's input image). need_affine: with a
            prologue, compute grad_scale / grad_shift (they need the dgrad, so it runs when need_x or this).

    Returns:
        grad_x ``[N, C, H, W]`` channels_last in x's dtype (``dz*in_scale`` with a prologue); grad_w in the
        weight's dtype and strides; grad_scale = Σdz·x, grad_shift = Σdz (fp32 ``[C]``, empty without a
        prologue), ``dz = d a * [x*in_scale + in_shift > 0]``. A result not asked for is an empty tensor.
    """
    from ..kernels.bn_dy import form_train_dy
    who = "conv_bn_stats_backward_cudnn"
    g = conv_geometry(who, x, weight, stride, padding, dilation, groups)
    y_shape = (g.N, g.K, g.P, g.Q)
    for name, t in (("g_y", g_y), ("y", y)):
        check(isinstance(t, torch.Tensor) and tuple(t.shape) == y_shape and t.dtype == x.dtype,
              f"{who}: {name} must be a {y_shape} {x.dtype} tensor, got {describe(t)}")
    in_scale, in_shift = _prologue(who, x, in_scale, in_shift, g.C)
    centre = _vector(who, "in_centre", in_centre, g.C, x.device)
    check(centre is None or in_scale is not None, f"{who}: in_centre needs in_scale/in_shift")
    prologue = in_scale is not None
    x = x.contiguous(memory_format=torch.channels_last)
    grad_x = x.new_empty((0,))
    grad_w = weight.new_empty((0,))
    grad_scale, grad_shift = (x.new_empty((0,), dtype=torch.float32) for _ in range(2))
    need_affine = prologue and need_affine
    need_a = need_x or need_affine
    if not (need_a or need_w):
        return grad_x, grad_w, grad_scale, grad_shift
    dy = form_train_dy(g_y, y, c2, c3, mean)
    if prologue:
        _ext.require(who)
    # the conv's input, recomputed (not saved) and only for the wgrad: dgrad reads nothing but its shape
    a = torch.ops.resnet_fast.bn_relu(x, in_scale, in_shift, True) if prologue and need_w else x
    gx, gw, _ = _aten_conv_backward(dy, a, weight, g, need_a, need_w)
    del dy, a
    if need_w:
        grad_w = with_strides_of(gw.to(weight.dtype), weight)
    if prologue and need_a:  # dReLU and the scale for grad_x, with the sums of the prologue's gradients
        gx, s, s_xc = torch.ops.resnet_fast.bn_relu_backward(gx.contiguous(memory_format=torch.channels_last), x,
                                                             in_scale, in_shift, True,
                                                             *(() if centre is None else (centre,)))
        if need_affine:
            grad_shift = s  # Σdz
            grad_scale = s_xc if centre is None else s_xc + centre * s  # Σdz·x = Σdz·(x - centre) + centre·Σdz
    if need_x:
        grad_x = gx.contiguous(memory_format=torch.channels_last)
    return grad_x, grad_w, grad_scale, grad_shift
