"""Autograd of the inference op ``resnet_fast::conv2d`` (dgrad/wgrad kernels, interpreted on CPU) vs float64.

``out = act((conv(x, W) + bias)*scale[k] + shift[k] + residual)``: gradients for x, W, bias, scale, shift and
residual against ``torch.autograd.grad`` through ``F.conv2d`` + the same epilogue in float64. The reference takes
its ReLU mask from the kernel's own output (the backward's definition: ``g = grad where out > 0``), so a
pre-activation within rounding of 0 cannot flip one mask bit between fp32 and float64 and fail a tight
tolerance; the mask itself is still tested (the reference applies it independently of the kernels).
Shapes are small (the interpreter is slow); several tiles per dimension come from the test_conv_bwd tests.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import resnet_fast
import resnet_fast.kernels.conv_dgrad as conv_dgrad
import resnet_fast.kernels.conv_wgrad as conv_wgrad
from resnet_fast.nn import reference
from resnet_fast.ops import conv2d
from resnet_fast.ops.eager import eager_conv_epilogue
from helpers import rel_err

CL = torch.channels_last
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}
TERMS = ("bias", "scale", "shift", "residual")
ALL_GRADS = ("x", "weight") + TERMS

# (N, C, H, W, K, R, stride, padding, dilation, groups)
GEOMS = {
    "1x1": (2, 16, 5, 5, 24, 1, 1, 0, 1, 1),
    "1x1s2": (2, 12, 6, 5, 16, 1, 2, 0, 1, 1),       # the downsample shortcut
    "3x3p1": (2, 12, 7, 6, 10, 3, 1, 1, 1, 1),
    "3x3s2": (2, 8, 9, 7, 20, 3, 2, 1, 1, 1),
    "stem7x7s2": (2, 3, 9, 9, 8, 7, 2, 3, 1, 1),
    "groups4": (2, 16, 6, 6, 16, 3, 1, 1, 1, 4),
    "dil2": (2, 8, 9, 9, 8, 3, 1, 2, 2, 1),
}


def _conv_kw(geom):
    *_, st, pd, dl, g = GEOMS[geom]
    return dict(stride=st, padding=pd, dilation=dl, groups=g)


def _inputs(geom, dtype, device, terms, seed=0, zero_scale=True):
    """x, weight (channels_last, rounded to dtype), the terms present (fp32 [K] vectors, residual in dtype);
    scale has an exact zero channel (a BN with gamma 0, zero-init residual) unless ``zero_scale`` is False."""
    N, C, H, W, K, R, st, pd, dl, g = GEOMS[geom]
    gen = torch.Generator().manual_seed(seed)
    P = (H + 2 * pd - dl * (R - 1) - 1) // st + 1
    Q = (W + 2 * pd - dl * (R - 1) - 1) // st + 1
    act = lambda t: t.to(dtype).to(device).contiguous(memory_format=CL)  # noqa: E731
    t = {"x": act(torch.randn(N, C, H, W, generator=gen)),
         "weight": act(torch.randn(K, C // g, R, R, generator=gen) / (C // g * R * R) ** 0.5)}
    scale = torch.rand(K, generator=gen) + 0.5
    if zero_scale:
        scale[1] = 0.0
    vecs = {"bias": torch.randn(K, generator=gen) * 0.3, "scale": scale,
            "shift": torch.randn(K, generator=gen) * 0.3}
    res = torch.randn(N, K, P, Q, generator=gen)
    for name in TERMS:
        t[name] = None if name not in terms else (act(res) if name == "residual" else vecs[name].to(device))
    return t


def _run(t, geom, relu, grads, seed=1):
    """Kernel gradients of the op w.r.t. ``grads``, the float64 reference ones, and the op's output."""
    conv = _conv_kw(geom)
    t = {k: (v.detach().requires_grad_(k in grads) if v is not None else None) for k, v in t.items()}
    out = conv2d(t["x"], t["weight"], t["bias"], **conv, scale=t["scale"], shift=t["shift"],
                 residual=t["residual"], relu=relu)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype).to(out.device)
    got = torch.autograd.grad(out, [t[k] for k in grads], go)
    t64 = {k: (v.detach().double().cpu().requires_grad_(k in grads) if v is not None else None)
           for k, v in t.items()}
    pre = eager_conv_epilogue(F.conv2d(t64["x"], t64["weight"], None, conv["stride"], conv["padding"],
                                       conv["dilation"], conv["groups"]),
                              t64["bias"], t64["scale"], t64["shift"], t64["residual"], relu=False)
    g64 = go.double().cpu()
    if relu:
        g64 = g64 * (out.detach().cpu() > 0)
    ref = torch.autograd.grad(pre, [t64[k] for k in grads], g64)
    return dict(zip(grads, got)), dict(zip(grads, ref)), out, t


def _check(t, geom, dtype, relu, grads, tol=None):
    got, ref, out, t = _run(t, geom, relu, grads)
    for k in grads:
        assert got[k].shape == t[k].shape and got[k].dtype == t[k].dtype, k
        assert rel_err(got[k], ref[k]) < (tol or TOL[dtype]), (k, rel_err(got[k], ref[k]))
    return got, ref, out


def _no_fallback():
    st = resnet_fast.stats()
    assert not st["fallbacks"], st["fallbacks"]
    assert st["kernel_calls"].get("conv2d_backward", 0) >= 1


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("terms", [(), ("bias",), ("scale", "shift"), ("scale",), ("residual", "shift"), TERMS],
                         ids=lambda t: "+".join(t) or "none")
def test_epilogue_combinations(kernel_device, triton_backend, terms, relu):
    # Each term present or absent changes the kernels used (plain dgrad, scale on load, ReLU mask on load) and
    # the [K] math (bias·Σg enters grad_scale); every present tensor requires grad.
    t = _inputs("3x3p1", torch.float32, kernel_device, terms)
    _check(t, "3x3p1", torch.float32, relu, ("x", "weight") + terms)
    _no_fallback()


@pytest.mark.parametrize("geom,relu", [("1x1", True), ("1x1s2", False), ("3x3s2", True), ("stem7x7s2", True),
                                       ("groups4", True), ("groups4", False), ("dil2", True)])
def test_geometries(kernel_device, triton_backend, geom, relu):
    t = _inputs(geom, torch.float32, kernel_device, TERMS, seed=2)
    _check(t, geom, torch.float32, relu, ALL_GRADS)
    _no_fallback()


def test_fp16(kernel_device, triton_backend):
    t = _inputs("3x3s2", torch.float16, kernel_device, TERMS, seed=3)
    got, _, _ = _check(t, "3x3s2", torch.float16, True, ALL_GRADS)
    assert got["x"].is_contiguous(memory_format=CL)
    _no_fallback()


def test_zero_scale_channel_is_exact(kernel_device, triton_backend):
    # scale[1] == 0 (BN gamma 0): nothing reaches x, W or bias through channel 1, yet its scale gets the full
    # gradient Σ g·(conv + bias) -- computed as Σ_crs W·dW_g + bias·Σg, never by dividing by the scale.
    t = _inputs("3x3s2", torch.float32, kernel_device, TERMS, seed=4)
    got, ref, _ = _check(t, "3x3s2", torch.float32, True, ALL_GRADS)
    assert torch.all(got["weight"][1] == 0) and got["bias"][1] == 0
    assert ref["scale"][1].abs() > 1e-3 and abs(got["scale"][1].item() - ref["scale"][1].item()) < 1e-4


@pytest.mark.parametrize("grads", [("x",), ("weight",), ("scale",), ("bias", "shift"), ("residual",)],
                         ids=lambda g: "+".join(g))
def test_only_what_is_needed(kernel_device, triton_backend, monkeypatch, grads):
    # needs_input_grad decides the kernels: dgrad only for x; wgrad for W, scale (dW_g) and for bias/shift (Σg:
    # then only the first (tap, channel tile) column, need_dw=False); nothing for the residual alone
    calls = []
    for mod, name in ((conv_dgrad, "conv2d_dgrad_nhwc"), (conv_wgrad, "conv2d_wgrad_nhwc")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _r=real, _n=name, **k: calls.append((_n, a, k)) or _r(*a, **k))
    t = _inputs("3x3s2", torch.float32, kernel_device, TERMS, seed=5)
    _check(t, "3x3s2", torch.float32, True, grads)
    kinds = [n for n, _, _ in calls]
    assert kinds.count("conv2d_dgrad_nhwc") == (grads == ("x",))
    assert kinds.count("conv2d_wgrad_nhwc") == (grads in (("weight",), ("scale",), ("bias", "shift")))
    for n, args, kw in calls:
        if n == "conv2d_wgrad_nhwc":
            assert kw["dy_sums"] and kw["need_dw"] == (grads != ("bias", "shift"))
            assert kw["dy_relu"] and kw["dy_bn"] is not None  # the ReLU mask applied on load
        else:  # the mask on load, the scale folded into the weight (W*scale[k]): nothing else in the K-loop
            assert kw["relu_out"] is not None and kw.get("dy_bn") is None
            w = t["weight"].float() * t["scale"].float().view(-1, 1, 1, 1)
            assert torch.equal(args[1].cpu(), w.to(args[1].dtype).cpu())


def test_fallback_dtypes_are_counted_and_correct(kernel_device, triton_backend):
    # float64 has no kernel (forward and backward are counted eager fallbacks); in the interpreter bf16 takes the
    # same route (its tl.dot is wrong there), on a GPU the kernels run bf16
    dtypes = (torch.float64, torch.bfloat16)
    for dtype in dtypes:
        resnet_fast.reset_stats()
        t = _inputs("1x1s2", dtype, kernel_device, TERMS, seed=6)
        if dtype == torch.float64:
            t.update({k: t[k].double() for k in ("bias", "scale", "shift")})
        _check(t, "1x1s2", dtype, True, ALL_GRADS)
        st = resnet_fast.stats()
        if dtype == torch.float64 or kernel_device == "cpu":
            assert sum(st["fallbacks"]["conv2d_backward"].values()) == 1
            assert sum(st["fallbacks"]["conv2d"].values()) == 1 and not st["kernel_calls"]
        else:
            assert st["kernel_calls"]["conv2d_backward"] == 1


def test_opcheck(kernel_device, triton_backend):
    t = _inputs("3x3p1", torch.float32, kernel_device, TERMS, seed=7)
    for k in ("x", "weight", "scale", "shift", "bias", "residual"):
        t[k].requires_grad_(True)
    op = torch.ops.resnet_fast.conv2d.default
    torch.library.opcheck(op, (t["x"], t["weight"], t["bias"], [1, 1], [1, 1], [1, 1], 1, t["scale"], t["shift"],
                               t["residual"], True))
    g = torch.randn(2, 10, 7, 6, device=kernel_device).contiguous(memory_format=CL)
    out = conv2d(*(t[k].detach() for k in ("x", "weight", "bias")), padding=1, scale=t["scale"].detach(),
                 relu=True)
    torch.library.opcheck(torch.ops.resnet_fast.conv2d_backward.default,
                          (g, t["x"].detach(), t["weight"].detach(), t["scale"].detach(), out, [1, 1], [1, 1],
                           [1, 1], 1, True, True, True, True), test_utils=("test_schema", "test_faketensor"))


def _eval_blocks():
    down = lambda: nn.Sequential(reference.conv1x1(8, 12, 2), nn.BatchNorm2d(12))  # noqa: E731
    return [("basic_down", lambda cls: cls(8, 12, 2, down())),
            ("bottleneck", lambda cls: cls(16, 4))]


@pytest.mark.parametrize("name,build", _eval_blocks(), ids=[n for n, _ in _eval_blocks()])
def test_eval_block_with_autograd_runs_the_kernels(kernel_device, triton_backend, name, build):
    # An eval block that autograd records (frozen BN statistics, e.g. fine-tuning) runs conv2d + its backward on
    # the kernels; input and parameter gradients match the plain block's, including a BN with a zero gamma.
    torch.manual_seed(0)
    plain_cls = reference.BasicBlock if name.startswith("basic") else reference.Bottleneck
    fused_cls = resnet_fast.nn.BasicBlock if name.startswith("basic") else resnet_fast.nn.Bottleneck
    plain = build(plain_cls)
    for m in plain.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
                m.weight[0] = 0.0
    fused = build(fused_cls)
    fused.load_state_dict(plain.state_dict())
    fused.to(kernel_device).eval(), plain.eval()
    x = torch.randn(2, plain.conv1.in_channels, 6, 6)
    xf = x.to(kernel_device).contiguous(memory_format=CL).requires_grad_(True)
    xp = x.clone().requires_grad_(True)
    yf, yp = fused(xf), plain(xp)
    go = torch.randn_like(yp)
    yf.backward(go.to(kernel_device)), yp.backward(go)
    torch.testing.assert_close(yf.detach().cpu(), yp.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(xf.grad.cpu(), xp.grad, rtol=1e-4, atol=1e-5)
    for (k, a), b in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad.cpu(), b.grad, rtol=1e-4, atol=1e-4, msg=k)
    st = resnet_fast.stats()
    convs = sum(isinstance(m, nn.Conv2d) for m in fused.modules())
    assert st["kernel_calls"]["block"] == 1 and not st["fallbacks"], st
    assert st["kernel_calls"]["conv2d"] == convs and st["kernel_calls"]["conv2d_backward"] == convs
