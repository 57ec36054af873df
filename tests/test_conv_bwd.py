"""conv dgrad / wgrad Triton kernels (interpreted on CPU) vs float64 torch.nn.grad references.

Every shape family of ResNet's forward, with and without the training fusions and the inference op's options
(ReLU mask on load, per-channel dy sums), fp32 and fp16 on the CPU (bf16 ``tl.dot`` is wrong in the
interpreter, where the launchers refuse it: bf16 runs in the GPU-marked tests only). Configs are pinned and
small so the interpreter covers several tiles per dimension, partial tiles and several stride phases.
"""
import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch.nn.grad import conv2d_input, conv2d_weight

from resnet_fast.kernels.configs import ConvConfig
from resnet_fast.kernels.conv_common import ConvGeometry, DyBN
from resnet_fast.kernels.conv_dgrad import conv2d_dgrad_nhwc
from resnet_fast.kernels.conv_wgrad import conv2d_wgrad_nhwc

DCFG = ConvConfig(32, 16, 16, 1, 4, 1)
WCFG = ConvConfig(16, 16, 32, 1, 4, 1)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
CL = torch.channels_last

# (N, C, H, W, K, R, stride, padding, dilation, groups)
FAMILIES = {
    "stem7x7s2": (1, 3, 9, 9, 8, 7, 2, 3, 1, 1),
    "3x3s1": (2, 12, 7, 6, 10, 3, 1, 1, 1, 1),
    "3x3s2": (2, 8, 9, 7, 20, 3, 2, 1, 1, 1),
    "1x1s1": (2, 20, 5, 5, 24, 1, 1, 0, 1, 1),
    "1x1s2": (1, 20, 5, 7, 24, 1, 2, 0, 1, 1),
    "dil2": (1, 8, 9, 9, 8, 3, 1, 2, 2, 1),
    "dil4": (1, 8, 9, 9, 12, 3, 1, 4, 4, 1),
    "groups4cpg": (1, 16, 6, 6, 16, 3, 1, 1, 1, 4),
    "groups4cpg_s2": (1, 16, 7, 7, 16, 3, 2, 1, 1, 4),
    # channels that divide the pinned tiles, channels_last: the ALIGNED (unmasked, 16-aligned) kernel path
    "aligned3x3s2": (1, 32, 6, 5, 32, 3, 2, 1, 1, 1),
    "aligned1x1s1": (2, 32, 3, 4, 48, 1, 1, 0, 1, 1),
}
ALIGNED_FAMILIES = ("aligned3x3s2", "aligned1x1s1")
FP16_FAMILIES = ("3x3s2", "1x1s2") + ALIGNED_FAMILIES  # fp16 groups: in the fusion tests
CASES = [(f, torch.float32) for f in FAMILIES] + [(f, torch.float16) for f in FP16_FAMILIES]


def _rel(out, ref):
    """Relative error norm; an all-zero reference (e.g. dx of pixels no output reads) must be matched exactly."""
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _case(name, dtype, device, seed=0):
    """Inputs rounded to ``dtype`` (on ``device``, channels_last) and their float64 values."""
    N, C, H, W, K, R, st, pd, dl, g = FAMILIES[name]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=gen).to(dtype)
    w = (torch.randn(K, C // g, R, R, generator=gen) / (C // g * R * R) ** 0.5).to(dtype)
    P = (H + 2 * pd - dl * (R - 1) - 1) // st + 1
    Q = (W + 2 * pd - dl * (R - 1) - 1) // st + 1
    dy = torch.randn(N, K, P, Q, generator=gen).to(dtype)
    conv = dict(stride=st, padding=pd, dilation=dl, groups=g)
    dev = lambda t: t.to(device).contiguous(memory_format=CL)  # noqa: E731
    return x.double(), w.double(), dy.double(), dev(x), dev(w), dev(dy), conv


def _bn_relu_input(C, device, seed):
    """Raw y_prev plus BN scale/shift/mean whose pre-activation stays away from the ReLU kink (so fp32 vs
    float64 rounding never flips the mask)."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(C, generator=gen) + 0.5
    shift = torch.randn(C, generator=gen) * 0.5
    mean = torch.randn(C, generator=gen) * 0.1
    return scale.to(device), shift.to(device), mean.to(device), scale.double(), shift.double(), mean.double()


def _away_from_kink(y, scale, shift):
    pre = y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    return torch.where(pre.abs() < 0.05, y + 0.2 / scale.view(1, -1, 1, 1), y)


@pytest.mark.parametrize("family,dtype", CASES)
def test_dgrad_matches_conv2d_input(kernel_device, triton_backend, family, dtype):
    x64, w64, dy64, _, w, dy, conv = _case(family, dtype, kernel_device)
    ref = conv2d_input(x64.shape, w64, dy64, **conv)
    out = conv2d_dgrad_nhwc(dy, w, x64.shape, **conv, allow_tf32=False, config=DCFG)
    assert out.shape == x64.shape and out.dtype == dtype
    assert _rel(out.cpu(), ref) < TOL[dtype]


@pytest.mark.parametrize("family,dtype", CASES)
def test_wgrad_matches_conv2d_weight(kernel_device, triton_backend, family, dtype):
    x64, w64, dy64, x, _, dy, conv = _case(family, dtype, kernel_device)
    ref = conv2d_weight(x64, w64.shape, dy64, **conv)
    out = conv2d_wgrad_nhwc(dy, x, w64.shape, **conv, split=1, allow_tf32=False, config=WCFG)
    assert out.shape == w64.shape and out.dtype == torch.float32
    assert _rel(out.cpu(), ref) < TOL[dtype]


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(N=st.integers(1, 2), cg=st.integers(1, 5), kg=st.integers(1, 5), groups=st.sampled_from([1, 2]),
       H=st.integers(1, 9), W=st.integers(1, 9), R=st.sampled_from([1, 2, 3]), S=st.sampled_from([1, 3]),
       sh=st.integers(1, 3), sw=st.integers(1, 3), ph=st.integers(0, 2), pw=st.integers(0, 2),
       dilation=st.integers(1, 2), split=st.integers(1, 3), seed=st.integers(0, 99))
def test_random_shapes_dgrad_and_wgrad(N, cg, kg, groups, H, W, R, S, sh, sw, ph, pw, dilation, split, seed,
                                       kernel_device, triton_backend):
    # Odd geometry the families miss: non-square filters and strides, strides above the image size (empty
    # stride phases), padding beyond the filter's reach, several split-K chunks.
    C, K = cg * groups, kg * groups
    assume(H + 2 * ph - dilation * (R - 1) - 1 >= 0 and W + 2 * pw - dilation * (S - 1) - 1 >= 0)
    conv = dict(stride=(sh, sw), padding=(ph, pw), dilation=dilation, groups=groups)
    gen = torch.Generator().manual_seed(seed)
    x64 = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64)
    w64 = torch.randn(K, cg, R, S, generator=gen, dtype=torch.float64)
    P, Q = (H + 2 * ph - dilation * (R - 1) - 1) // sh + 1, (W + 2 * pw - dilation * (S - 1) - 1) // sw + 1
    dy64 = torch.randn(N, K, P, Q, generator=gen, dtype=torch.float64)
    dev = lambda t: t.float().to(kernel_device).contiguous(memory_format=CL)  # noqa: E731
    dx = conv2d_dgrad_nhwc(dev(dy64), dev(w64), x64.shape, **conv, allow_tf32=False, config=DCFG)
    assert _rel(dx.cpu(), conv2d_input(x64.shape, w64, dy64, **conv)) < TOL[torch.float32]
    dw = conv2d_wgrad_nhwc(dev(dy64), dev(x64), w64.shape, **conv, split=split, allow_tf32=False, config=WCFG)
    assert _rel(dw.cpu(), conv2d_weight(x64, w64.shape, dy64, **conv)) < TOL[torch.float32]


@pytest.mark.parametrize("family", ALIGNED_FAMILIES + ("3x3s1",))
def test_aligned_path_is_taken_exactly_when_channels_divide_the_tiles(kernel_device, triton_backend,
                                                                      monkeypatch, family):
    import resnet_fast.kernels.conv_dgrad as dg
    import resnet_fast.kernels.conv_wgrad as wg
    seen = {}
    for mod, name in ((dg, "dgrad"), (wg, "wgrad")):
        real = mod._aligned
        monkeypatch.setattr(mod, "_aligned", lambda *a, _r=real, _n=name, **k: seen.setdefault(_n, _r(*a, **k)))
    _, w64, _, x, w, dy, conv = _case(family, torch.float32, kernel_device)
    conv2d_dgrad_nhwc(dy, w, x.shape, **conv, allow_tf32=False, config=DCFG)
    conv2d_wgrad_nhwc(dy, x, w64.shape, **conv, split=1, allow_tf32=False, config=WCFG)
    assert seen == {"dgrad": family != "3x3s1", "wgrad": family != "3x3s1"}


def test_nchw_strides_and_half_output(kernel_device, triton_backend):
    # Any strides are honoured (NCHW-contiguous dy, x and weight here); dW may be stored in fp16.
    x64, w64, dy64, x, w, dy, conv = _case("3x3s2", torch.float16, kernel_device, seed=3)
    x, w, dy = x.contiguous(), w.contiguous(), dy.contiguous()
    dx = conv2d_dgrad_nhwc(dy, w, x.shape, **conv, config=DCFG)
    assert _rel(dx.cpu(), conv2d_input(x64.shape, w64, dy64, **conv)) < TOL[torch.float16]
    dw = conv2d_wgrad_nhwc(dy, x, w.shape, **conv, out_dtype=torch.float16, split=1, config=WCFG)
    assert dw.dtype == torch.float16
    assert _rel(dw.cpu(), conv2d_weight(x64, w64.shape, dy64, **conv)) < TOL[torch.float16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("family", ["3x3s2", "groups4cpg", "aligned3x3s2"])
def test_dgrad_drelu_dbn_epilogue(kernel_device, triton_backend, family, dtype):
    x64, w64, dy64, _, w, dy, conv = _case(family, dtype, kernel_device, seed=1)
    C = x64.shape[1]
    sc, sh, mu, sc64, sh64, mu64 = _bn_relu_input(C, kernel_device, seed=5)
    y64 = _away_from_kink(x64 * 2 + 0.3, sc64, sh64).to(dtype).double()  # the raw previous-conv output
    y = y64.to(dtype).to(kernel_device).contiguous(memory_format=CL)
    dz, part = conv2d_dgrad_nhwc(dy, w, x64.shape, **conv, y_prev=y, in_scale=sc, in_shift=sh, in_centre=mu,
                                 allow_tf32=False, config=DCFG)
    v = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
    dz_ref = conv2d_input(x64.shape, w64, dy64, **conv) * (y64 * v(sc64) + v(sh64) > 0)
    assert _rel(dz.cpu(), dz_ref) < TOL[dtype]
    assert part.shape[0] == 2 and part.shape[2] == C and part.dtype == torch.float32
    assert _rel(part[0].sum(0).cpu(), dz_ref.sum((0, 2, 3))) < TOL[dtype]
    assert _rel(part[1].sum(0).cpu(), (dz_ref * (y64 - v(mu64))).sum((0, 2, 3))) < TOL[dtype]
    dxs, part_s = conv2d_dgrad_nhwc(dy, w, x64.shape, **conv, y_prev=y, in_scale=sc, in_shift=sh, in_centre=mu,
                                    out_scale=sc, allow_tf32=False, config=DCFG)  # stores dz*scale, sums of dz
    assert _rel(dxs.cpu(), dz_ref * v(sc64)) < TOL[dtype]
    assert torch.equal(part_s, part)


def _dy_bn(K, dy64, device, dtype, seed):
    """(y, c1, c2, c3, mean) for the BN-backward-on-load option and the float64 dy it stands for."""
    gen = torch.Generator().manual_seed(seed)
    y64 = torch.randn(dy64.shape, generator=gen).to(dtype).double()
    c = [torch.randn(K, generator=gen) for _ in range(4)]
    v = lambda t: t.double().view(1, -1, 1, 1)  # noqa: E731
    dy_eff = v(c[0]) * dy64 + v(c[1]) * (y64 - v(c[3])) + v(c[2])
    y = y64.to(dtype).to(device).contiguous(memory_format=CL)
    return (y, *(t.to(device) for t in c)), dy_eff


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dgrad_bn_backward_on_load(kernel_device, triton_backend, dtype):
    x64, w64, dy64, _, w, dz, conv = _case("3x3s2", dtype, kernel_device, seed=2)
    dy_bn, dy_eff = _dy_bn(w64.shape[0], dy64, kernel_device, dtype, seed=6)
    out = conv2d_dgrad_nhwc(dz, w, x64.shape, **conv, dy_bn=dy_bn, allow_tf32=False, config=DCFG)
    # fp16 rounds the formed dy once more than the float64 reference: twice the storage tolerance
    assert _rel(out.cpu(), conv2d_input(x64.shape, w64, dy_eff, **conv)) < 2 * TOL[dtype]


# (H, W, R, S, stride, padding, dilation): the stride phases' taps in closed form, where the stride and the
# dilation share a factor (phases with every tap or none), taps step by stride/gcd, the padding reaches past the
# filter, or a phase has no tap at all (its dx rows are zero)
PHASE_GEOMETRIES = [
    (9, 8, 3, 2, (2, 3), (1, 0), (2, 1)),
    (9, 9, 3, 3, 2, 2, 2),
    (10, 7, 2, 3, 3, (1, 2), 3),
    (11, 9, 4, 4, 4, 3, 2),
    (8, 9, 3, 3, 2, 0, 3),
    (7, 8, 1, 1, 3, 0, 1),
    (6, 7, 1, 2, 2, 2, (1, 2)),
]


@pytest.mark.parametrize("H,W,R,S,stride,padding,dilation", PHASE_GEOMETRIES)
@pytest.mark.parametrize("cg,kg", [(5, 6), (16, 32)])  # the masked path; the ALIGNED one at DCFG's tiles
def test_dgrad_stride_phase_taps(kernel_device, triton_backend, H, W, R, S, stride, padding, dilation, cg, kg):
    conv = dict(stride=stride, padding=padding, dilation=dilation)
    gen = torch.Generator().manual_seed(H * 100 + W)
    x64 = torch.randn(2, cg, H, W, generator=gen, dtype=torch.float64)
    w64 = torch.randn(kg, cg, R, S, generator=gen, dtype=torch.float64)
    g = ConvGeometry.make(x64.shape, w64.shape, stride, padding, dilation)
    P, Q = g.P, g.Q
    dy64 = torch.randn(2, kg, P, Q, generator=gen, dtype=torch.float64)
    dev = lambda t: t.float().to(kernel_device).contiguous(memory_format=CL)  # noqa: E731
    dx = conv2d_dgrad_nhwc(dev(dy64), dev(w64), x64.shape, **conv, allow_tf32=False, config=DCFG)
    assert _rel(dx.cpu(), conv2d_input(x64.shape, w64, dy64, **conv)) < TOL[torch.float32]


@pytest.mark.parametrize("family,dtype", [("aligned3x3s2", torch.float16), ("aligned1x1s1", torch.float32),
                                          ("3x3s1", torch.float32)])
def test_dgrad_bn_on_load_with_epilogue_grouped_tiles(kernel_device, triton_backend, family, dtype):
    # The training op's fused variant (dy_bn on load + dReLU/dBN epilogue + out_scale) with c3 and the mean
    # non-zero (they must not leak into padded taps), several K blocks and taps, and a tile order grouping 3 row
    # tiles (not a divisor of the row tiles) across 2 channel tiles: every tile's dz and partials land in place.
    x64, w64, dy64, _, w, dz, conv = _case(family, dtype, kernel_device, seed=3)
    C = x64.shape[1]
    dy_bn, dy_eff = _dy_bn(w64.shape[0], dy64, kernel_device, dtype, seed=9)
    cfg = ConvConfig(16, 16, 16, 3, 4, 1)
    ref = conv2d_input(x64.shape, w64, dy_eff, **conv)
    out = conv2d_dgrad_nhwc(dz, w, x64.shape, **conv, dy_bn=dy_bn, allow_tf32=False, config=cfg)
    assert _rel(out.cpu(), ref) < 2 * TOL[dtype]
    sc, sh, mu, sc64, sh64, mu64 = _bn_relu_input(C, kernel_device, seed=10)
    y64 = _away_from_kink(x64 * 2 + 0.3, sc64, sh64).to(dtype).double()
    y = y64.to(dtype).to(kernel_device).contiguous(memory_format=CL)
    dxs, part = conv2d_dgrad_nhwc(dz, w, x64.shape, **conv, y_prev=y, in_scale=sc, in_shift=sh, in_centre=mu,
                                  out_scale=sc, dy_bn=dy_bn, allow_tf32=False, config=cfg)
    v = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
    dz_ref = ref * (y64 * v(sc64) + v(sh64) > 0)
    assert _rel(dxs.cpu(), dz_ref * v(sc64)) < 2 * TOL[dtype]
    assert _rel(part[0].sum(0).cpu(), dz_ref.sum((0, 2, 3))) < 2 * TOL[dtype]
    assert _rel(part[1].sum(0).cpu(), (dz_ref * (y64 - v(mu64))).sum((0, 2, 3))) < 2 * TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dgrad_narrow_channel_path(kernel_device, triton_backend, dtype):
    # The stem's shape (C = 3 < 16, K a multiple of BLOCK_K): the K-loop runs ALIGNED on the zero-padded
    # repacked weight, the epilogue masks the 3 channels; plain, dy_bn, and dy_bn with the dReLU/dBN epilogue.
    import resnet_fast.kernels.conv_dgrad as dg
    from resnet_fast.kernels.configs import for_dtype
    cfg = for_dtype(dg.NARROW_CONFIG, dtype)
    K = 2 * cfg.BLOCK_K
    conv = dict(stride=2, padding=3)
    gen = torch.Generator().manual_seed(21)
    x64 = torch.randn(2, 3, 11, 10, generator=gen).to(dtype).double()
    w64 = (torch.randn(K, 3, 7, 7, generator=gen) / 12).to(dtype).double()
    g = ConvGeometry.make(x64.shape, w64.shape, 2, 3)
    dy64 = torch.randn(2, K, g.P, g.Q, generator=gen).to(dtype).double()
    dev = lambda t: t.to(dtype).to(kernel_device).contiguous(memory_format=CL)  # noqa: E731
    dy, w = dev(dy64), dev(w64)
    assert dg._aligned(g, cfg, dy, w, ()) and not dg._epi_aligned(g, cfg, dy, w, ())
    out = conv2d_dgrad_nhwc(dy, w, x64.shape, **conv, allow_tf32=False, config=cfg)
    assert _rel(out.cpu(), conv2d_input(x64.shape, w64, dy64, **conv)) < TOL[dtype]
    dy_bn, dy_eff = _dy_bn(K, dy64, kernel_device, dtype, seed=22)
    ref = conv2d_input(x64.shape, w64, dy_eff, **conv)
    out = conv2d_dgrad_nhwc(dy, w, x64.shape, **conv, dy_bn=dy_bn, allow_tf32=False, config=cfg)
    assert _rel(out.cpu(), ref) < 2 * TOL[dtype]
    sc, sh, mu, sc64, sh64, mu64 = _bn_relu_input(3, kernel_device, seed=23)
    y64 = _away_from_kink(x64 * 2 + 0.3, sc64, sh64).to(dtype).double()
    dz, part = conv2d_dgrad_nhwc(dy, w, x64.shape, **conv, y_prev=dev(y64), in_scale=sc, in_shift=sh,
                                 in_centre=mu, dy_bn=dy_bn, allow_tf32=False, config=cfg)
    dz_ref = ref * (y64 * sc64.view(1, -1, 1, 1) + sh64.view(1, -1, 1, 1) > 0)
    assert _rel(dz.cpu(), dz_ref) < 2 * TOL[dtype]
    assert _rel(part[1].sum(0).cpu(), (dz_ref * (y64 - mu64.view(1, -1, 1, 1))).sum((0, 2, 3))) < 2 * TOL[dtype]


@pytest.mark.parametrize("family,dtype,pp", [("3x3s2", torch.float32, False), ("3x3s2", torch.float16, False),
                                             ("groups4cpg", torch.float32, False),
                                             ("aligned3x3s2", torch.float16, False), ("3x3s1", torch.float32, True),
                                             ("dil2", torch.float16, True)])
def test_wgrad_prologue_and_bn_backward_on_load(kernel_device, triton_backend, monkeypatch, family, dtype, pp):
    # pp: the prologue as its own pass (the C++ bn_relu, once per call) and the GEMM without it
    import resnet_fast.kernels.conv_wgrad as wg
    passes = []
    real_apply = wg._pass.apply
    monkeypatch.setattr(wg._pass, "apply", lambda *a: passes.append(1) or real_apply(*a))
    cfg = dataclasses.replace(WCFG, prologue_pass=pp)
    x64, w64, dy64, _, _, dz, conv = _case(family, dtype, kernel_device, seed=4)
    C = x64.shape[1]
    sc, sh, _, sc64, sh64, _ = _bn_relu_input(C, kernel_device, seed=7)
    y_prev64 = _away_from_kink(x64, sc64, sh64).to(dtype).double()
    y_prev = y_prev64.to(dtype).to(kernel_device).contiguous(memory_format=CL)
    a64 = torch.relu(y_prev64 * sc64.view(1, -1, 1, 1) + sh64.view(1, -1, 1, 1))
    out = conv2d_wgrad_nhwc(dz, y_prev, w64.shape, **conv, in_scale=sc, in_shift=sh, split=1,
                            allow_tf32=False, config=cfg)
    assert _rel(out.cpu(), conv2d_weight(a64, w64.shape, dy64, **conv)) < 2 * TOL[dtype]
    dy_bn, dy_eff = _dy_bn(w64.shape[0], dy64, kernel_device, dtype, seed=8)
    out = conv2d_wgrad_nhwc(dz, y_prev, w64.shape, **conv, in_scale=sc, in_shift=sh, dy_bn=dy_bn, split=2,
                            allow_tf32=False, config=cfg)
    assert _rel(out.cpu(), conv2d_weight(a64, w64.shape, dy_eff, **conv)) < 2 * TOL[dtype]
    assert len(passes) == 2 * pp


def _aligned_case(shape, dtype, device, seed):
    """Inputs whose channels divide the large tiles (channels_last, rounded to ``dtype``): ``shape = (N, C, H, W,
    K, R, S, stride, padding)``; returns x64, dy64, x, dy, the weight shape, the conv kwargs and the geometry."""
    N, C, H, W, K, R, S, st, pd = shape
    gen = torch.Generator().manual_seed(seed)
    x64 = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64).to(dtype).double()
    w_shape = (K, C, R, S)
    g = ConvGeometry.make(x64.shape, w_shape, st, pd)
    dy64 = torch.randn(N, K, g.P, g.Q, generator=gen, dtype=torch.float64).to(dtype).double()
    dev = lambda t: t.to(dtype).to(device).contiguous(memory_format=CL)  # noqa: E731
    return x64, dy64, dev(x64), dev(dy64), w_shape, dict(stride=st, padding=pd, dilation=1, groups=1), g


def _dy_bn_relu(dy_bn, dz64, dtype, device, seed):
    """``dy_bn`` with a post-ReLU y (some exactly 0) for dy_relu, and the float64 dy it stands for."""
    gen = torch.Generator().manual_seed(seed)
    y64 = torch.relu(torch.randn(dz64.shape, generator=gen, dtype=torch.float64) + 0.3).to(dtype).double()
    c1, c2, c3, mu = (t.cpu().double().view(1, -1, 1, 1) for t in dy_bn[1:])
    y = y64.to(dtype).to(device).contiguous(memory_format=CL)
    return (y, *dy_bn[1:]), c1 * dz64 * (y64 > 0) + c2 * (y64 - mu) + c3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("pointwise", [False, True], ids=["3x3s2", "1x1"])
def test_wgrad_wide_tile_without_dy_transform(kernel_device, triton_backend, dtype, pointwise):
    """WIDE_CONFIG (256 output × 128 input channels) on the ALIGNED path, in each variant it may run: plain, with
    the dy sums, and with the BN+ReLU prologue (triton_dy_pass's, 3×3 only); split over pixels."""
    import resnet_fast.kernels.conv_wgrad as wg
    from resnet_fast.kernels.configs import for_dtype
    R, stride = (1, 1) if pointwise else (3, 2)
    C = 128
    x64, dy64, x, dy, w_shape, conv, g = _aligned_case((2, C, 6, 6, 256, R, R, stride, R // 2), dtype,
                                                       kernel_device, seed=21)
    cfg = for_dtype(wg.WIDE_CONFIG, dtype)
    assert wg._aligned(g, cfg, dy, x)
    dw, sums = conv2d_wgrad_nhwc(dy, x, w_shape, **conv, dy_sums=True, split=2, allow_tf32=False, config=cfg)
    assert _rel(dw.cpu(), conv2d_weight(x64, w_shape, dy64, **conv)) < 2 * TOL[dtype]
    assert _rel(sums.cpu(), dy64.sum((0, 2, 3))) < 2 * TOL[dtype]
    if not pointwise:
        sc, sh, _, sc64, sh64, _ = _bn_relu_input(C, kernel_device, seed=22)
        y64 = _away_from_kink(x64, sc64, sh64).to(dtype).double()
        a64 = torch.relu(y64 * sc64.view(1, -1, 1, 1) + sh64.view(1, -1, 1, 1))
        y = y64.to(dtype).to(kernel_device).contiguous(memory_format=CL)
        dw = conv2d_wgrad_nhwc(dy, y, w_shape, **conv, in_scale=sc, in_shift=sh, split=1, allow_tf32=False,
                               config=cfg)
        assert _rel(dw.cpu(), conv2d_weight(a64, w_shape, dy64, **conv)) < 2 * TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("pointwise", [False, True], ids=["3x3s2", "1x1"])
def test_wgrad_dy_transform_tile(kernel_device, triton_backend, dtype, pointwise):
    """DY_CONFIG (128 output × 256 input channels × 32 pixels) on the ALIGNED path, in each variant it may run:
    dy_bn, dy_bn with dy_relu and the sums, and (1×1 only) with the BN+ReLU prologue too; split over pixels."""
    import resnet_fast.kernels.conv_wgrad as wg
    from resnet_fast.kernels.configs import for_dtype
    R, stride = (1, 1) if pointwise else (3, 2)
    C, K = 256, 128
    x64, dz64, x, dz, w_shape, conv, g = _aligned_case((2, C, 5, 5, K, R, R, stride, R // 2), dtype,
                                                       kernel_device, seed=23)
    cfg = for_dtype(wg.DY_CONFIG, dtype)
    assert wg._aligned(g, cfg, dz, x)
    dy_bn, dy_eff = _dy_bn(K, dz64, kernel_device, dtype, seed=24)
    dw = conv2d_wgrad_nhwc(dz, x, w_shape, **conv, dy_bn=dy_bn, split=2, allow_tf32=False, config=cfg)
    assert _rel(dw.cpu(), conv2d_weight(x64, w_shape, dy_eff, **conv)) < 2 * TOL[dtype]
    relu_bn, relu_eff = _dy_bn_relu(dy_bn, dz64, dtype, kernel_device, seed=26)
    dw, sums = conv2d_wgrad_nhwc(dz, x, w_shape, **conv, dy_bn=relu_bn, dy_relu=True,
                                 dy_sums=True, split=3, allow_tf32=False, config=cfg)
    assert _rel(dw.cpu(), conv2d_weight(x64, w_shape, relu_eff, **conv)) < 2 * TOL[dtype]
    assert _rel(sums.cpu(), relu_eff.sum((0, 2, 3))) < 2 * TOL[dtype]
    if pointwise:
        sc, sh, _, sc64, sh64, _ = _bn_relu_input(C, kernel_device, seed=25)
        y_prev64 = _away_from_kink(x64, sc64, sh64).to(dtype).double()
        a64 = torch.relu(y_prev64 * sc64.view(1, -1, 1, 1) + sh64.view(1, -1, 1, 1))
        y_prev = y_prev64.to(dtype).to(kernel_device).contiguous(memory_format=CL)
        dw = conv2d_wgrad_nhwc(dz, y_prev, w_shape, **conv, in_scale=sc, in_shift=sh, dy_bn=dy_bn,
                               split=1, allow_tf32=False, config=cfg)
        assert _rel(dw.cpu(), conv2d_weight(a64, w_shape, dy_eff, **conv)) < 2 * TOL[dtype]


@pytest.mark.parametrize("family,dtype", [("3x3s2", torch.float32), ("dil2", torch.float32),
                                          ("groups4cpg_s2", torch.float32), ("row3x3s1", torch.float16),
                                          ("row3x2s2", torch.float32)])
def test_wgrad_row_taps(kernel_device, triton_backend, family, dtype):
    """A program per filter row (ROW_TAPS), its taps sharing each formed dy tile: plain, dy_bn, dy_relu with the
    sums, split over pixels; the ALIGNED path at ROW_CONFIGS' 64-channel tile, the masked one at a pinned small
    tile (strides, dilation, groups, a 2-wide filter row); exact against float64."""
    import resnet_fast.kernels.conv_wgrad as wg
    from resnet_fast.kernels.configs import for_dtype
    geoms = {"row3x3s1": (2, 64, 5, 6, 64, 3, 3, 1, 1), "row3x2s2": (2, 64, 7, 6, 64, 3, 2, 2, 1)}
    if family in geoms:  # the ALIGNED path at ROW_CONFIGS' 64-channel tile
        x64, dy64, x, dz, w_shape, conv, g = _aligned_case(geoms[family], dtype, kernel_device, seed=31)
        cfg = for_dtype(wg.ROW_CONFIGS[-1], dtype)
        assert wg._aligned(g, cfg, dz, x)
    else:
        x64, w64, dy64, x, _, dz, conv = _case(family, dtype, kernel_device, seed=32)
        w_shape = tuple(w64.shape)
        cfg = ConvConfig(16, 16, 16, 1, 4, 1, row_taps=True)
    dy_bn, dy_eff = _dy_bn(w_shape[0], dy64, kernel_device, dtype, seed=33)
    relu_bn, relu_eff = _dy_bn_relu(dy_bn, dy64, dtype, kernel_device, seed=34)
    for kw, ref, split in (({}, dy64, 1), ({"dy_bn": dy_bn}, dy_eff, 2),
                           ({"dy_bn": relu_bn, "dy_relu": True, "dy_sums": True}, relu_eff, 3)):
        out = conv2d_wgrad_nhwc(dz, x, w_shape, **conv, **kw, split=split, allow_tf32=False, config=cfg)
        dw, sums = out if kw.get("dy_sums") else (out, None)
        assert _rel(dw.cpu(), conv2d_weight(x64, w_shape, ref, **conv)) < 2 * TOL[dtype], kw
        if sums is not None:
            assert _rel(sums.cpu(), ref.sum((0, 2, 3))) < 2 * TOL[dtype]
    with pytest.raises(ValueError, match="at most 3 taps"):  # the kernel's accumulators: 3 taps per row
        xs = torch.zeros(1, 16, 9, 9, dtype=dtype, device=kernel_device).contiguous(memory_format=CL)
        conv2d_wgrad_nhwc(torch.zeros(1, 16, 5, 5, dtype=dtype, device=kernel_device).contiguous(memory_format=CL),
                          xs, (16, 16, 5, 5), config=ConvConfig(16, 16, 16, 1, 4, 1, row_taps=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(8, 128, 14, 14, 256, 3, 2), (8, 256, 14, 14, 512, 1, 2),
                                   (8, 512, 14, 14, 128, 1, 1), (8, 256, 14, 14, 256, 3, 2),
                                   (8, 256, 14, 14, 256, 3, 1), (8, 128, 14, 14, 128, 3, 1)])
def test_wgrad_candidates_are_compile_checked_per_variant(shape, dtype):
    # Each wgrad candidate, for the launches it serves (with or without the dy transform and the prologue in the
    # loop, IEEE or tensor-core dot), is a compile-checked spec of a variant with those transforms on that path;
    # the wide tile only without the dy transform, the dy-transform tile only with it (and with the prologue
    # only on the 1×1 path), both only on tensor cores, each the default once its tiles fit.
    import resnet_fast.kernels.conv_wgrad as wg
    N, C, H, W, K, R, s = shape
    g = ConvGeometry.make((N, C, H, W), (K, C, R, R), s, R // 2)
    x = torch.empty(N, C, H, W, dtype=dtype).contiguous(memory_format=CL)
    dy = torch.empty(N, K, g.P, g.Q, dtype=dtype).contiguous(memory_format=CL)
    ptr = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}[dtype]
    x_flat = wg._flat_switches(g, dy, x, False)[1]
    checked = {(cx["BLOCK_M"], cx["BLOCK_N"], cx["BLOCK_K"], opts["num_warps"], cx["ROW_TAPS"], sig["dy_ptr"],
                cx["ALIGNED"], cx["DOT_IEEE"], cx["DY_BN"], cx["PROLOGUE"], cx["X_FLAT"])
               for _fn, sig, cx, opts, *_ in wg.compile_specs() if "BLOCK_M" in cx}
    kk = 32 if dtype == torch.float32 else 64
    wide = dataclasses.replace(wg.WIDE_CONFIG, BLOCK_K=kk)
    dyt = dataclasses.replace(wg.DY_CONFIG, BLOCK_K=kk // 2)
    for dy_bn in (False, True):
        for prologue in (False, True):
            for ieee in ((False, True) if dtype == torch.float32 else (False,)):
                if prologue and not dy_bn and ieee:  # only triton_dy_pass's, never IEEE (bn_dy.dy_pass_may_pay)
                    continue
                cands, default = wg._candidates(g, dy, x, dy_bn, ieee, prologue, tma=False)  # box: its own test
                assert default in cands
                for c in cands:
                    al = wg._aligned(g, c, dy, x)
                    key = (c.BLOCK_M, c.BLOCK_N, c.BLOCK_K, c.num_warps, c.row_taps, ptr, al, ieee, dy_bn, prologue)
                    # the 1×1 path (X_FLAT) is compile-checked in bf16 (and wherever the 3×3 spec is missing):
                    # in other dtypes its operand code is the 3×3 path's
                    assert key + (x_flat and al,) in checked or key + (False,) in checked, \
                        f"wgrad candidate {c} (dy_bn={dy_bn}, prologue={prologue}, ieee={ieee}) not compile-checked"
                assert (wide in cands) == (not dy_bn and not ieee and K % 256 == 0 and C % 128 == 0)
                assert (dyt in cands) == (dy_bn and not ieee and K % 128 == 0 and C % 256 == 0
                                          and (not prologue or x_flat))
                assert (default in (wide, dyt)) == (wide in cands or dyt in cands)
                rows = [c for c in cands if c.row_taps]  # 3×3 filters on tensor cores, no prologue in the loop
                assert bool(rows) == (R == 3 and not ieee and not prologue)
                assert default.row_taps == bool(rows and default not in (wide, dyt))


def _relu_mask_case(family, dtype, device, seed):
    """dz, a post-ReLU output y (a quarter exactly 0, the rest positive) and per-channel c1 with one exact 0,
    plus the float64 dy = c1*(dz where y > 0) they stand for."""
    x64, w64, dy64, x, w, dz, conv = _case(family, dtype, device, seed=seed)
    K = w64.shape[0]
    gen = torch.Generator().manual_seed(seed + 100)
    y64 = torch.relu(torch.randn(dy64.shape, generator=gen) + 0.6).to(dtype).double()
    c1 = torch.rand(K, generator=gen) + 0.5
    c1[1] = 0.0
    z = torch.zeros(K)
    y = y64.to(dtype).to(device).contiguous(memory_format=CL)
    dy_bn = DyBN(y, *(t.to(device) for t in (c1, z, z, z)))
    dy_eff = c1.double().view(1, -1, 1, 1) * dy64 * (y64 > 0)
    return x64, w64, dy64, x, w, dz, conv, dy_bn, dy_eff


@pytest.mark.parametrize("family,dtype", [("3x3s2", torch.float32), ("groups4cpg", torch.float32),
                                          ("aligned3x3s2", torch.float16)])
def test_dy_relu_mask_on_load(kernel_device, triton_backend, family, dtype):
    # dgrad's relu_out: dz masked by a ReLU output > 0 (zero in the padding: it loads as 0 there); wgrad's
    # dy_relu: dz masked by dy_bn's y > 0 before the transform
    x64, w64, dy64, x, w, dz, conv, dy_bn, dy_eff = _relu_mask_case(family, dtype, kernel_device, seed=11)
    y, y64 = dy_bn.y, dy_bn.y.cpu().double()
    dx = conv2d_dgrad_nhwc(dz, w, x64.shape, **conv, relu_out=y, allow_tf32=False, config=DCFG)
    assert _rel(dx.cpu(), conv2d_input(x64.shape, w64, dy64 * (y64 > 0), **conv)) < TOL[dtype]
    dw = conv2d_wgrad_nhwc(dz, x, w64.shape, **conv, dy_bn=dy_bn, dy_relu=True, split=2, allow_tf32=False,
                           config=WCFG)
    assert _rel(dw.cpu(), conv2d_weight(x64, w64.shape, dy_eff, **conv)) < 2 * TOL[dtype]


@pytest.mark.parametrize("family", ["3x3s1", "groups4cpg_s2"])
def test_wgrad_dy_sums(kernel_device, triton_backend, family):
    # Σ_npq of the dy operand per output channel, from the first (tap, channel tile) column of programs: with and
    # without the transform, any split (fixed-order combine: bit-reproducible), and alone (need_dw=False)
    x64, w64, dy64, x, w, dz, conv, dy_bn, dy_eff = _relu_mask_case(family, torch.float32, kernel_device, seed=12)
    cfg = ConvConfig(16, 16, 16, 1, 4, 1)  # several k tiles and chunks
    for kw, ref in (({}, dy64), ({"dy_bn": dy_bn, "dy_relu": True}, dy_eff)):
        runs = {}
        for split in (1, 3):
            dw, sums = conv2d_wgrad_nhwc(dz, x, w64.shape, **conv, **kw, dy_sums=True, split=split,
                                         allow_tf32=False, config=cfg)
            assert sums.shape == (w64.shape[0],) and sums.dtype == torch.float32
            assert _rel(sums.cpu(), ref.sum((0, 2, 3))) < 1e-6
            assert _rel(dw.cpu(), conv2d_weight(x64, w64.shape, ref, **conv)) < TOL[torch.float32]
            runs[split] = sums
        none, alone = conv2d_wgrad_nhwc(dz, x, w64.shape, **conv, **kw, dy_sums=True, need_dw=False, split=3,
                                        allow_tf32=False, config=cfg)
        assert none is None and torch.equal(alone, runs[3])  # same chunks, same fixed order: bit-identical


def test_wgrad_split_k_is_deterministic(kernel_device, triton_backend):
    x64, w64, dy64, x, _, dy, conv = _case("3x3s1", torch.float32, kernel_device, seed=9)
    ref = conv2d_weight(x64, w64.shape, dy64, **conv)
    cfg = ConvConfig(16, 16, 16, 1, 4, 1)  # N*P*Q = 84 pixels: up to 6 chunks of 16
    runs = {s: conv2d_wgrad_nhwc(dy, x, w64.shape, **conv, split=s, allow_tf32=False, config=cfg)
            for s in (1, 2, 5)}
    again = conv2d_wgrad_nhwc(dy, x, w64.shape, **conv, split=5, allow_tf32=False, config=cfg)
    assert torch.equal(runs[5], again)
    for s, out in runs.items():
        assert _rel(out.cpu(), ref) < TOL[torch.float32], s
    assert _rel(runs[5].cpu(), runs[1].cpu().double()) < 1e-6


def _stem_case(dtype, device, x_layout, seed, c=3):
    """A stem-like conv (C = 3, 7×7/2, pad 3) with K = 16 output channels: dy channels_last and 16-aligned, so
    wgrad takes its PACKED path (every (r, s, c) of the filter along the GEMM's N); x in ``x_layout``. C = 3 takes
    it over x padded to 4 channels (PACK_C); C = 12, too many for that, over x as given."""
    gen = torch.Generator().manual_seed(seed)
    x64 = torch.randn(2, c, 11, 10, generator=gen).to(dtype).double()
    dy64 = torch.randn(2, 16, 6, 5, generator=gen).to(dtype).double()
    x = x64.to(dtype).to(device).contiguous(memory_format=x_layout)
    dy = dy64.to(dtype).to(device).contiguous(memory_format=CL)
    return x64, dy64, x, dy, (16, c, 7, 7), dict(stride=2, padding=3, dilation=1, groups=1)


@pytest.mark.parametrize("dtype,x_layout,idx64,c", [(torch.float32, CL, False, 3), (torch.float16, CL, False, 3),
                                                    (torch.float32, torch.contiguous_format, False, 3),
                                                    (torch.float32, CL, True, 3), (torch.float32, CL, False, 12),
                                                    (torch.float16, torch.contiguous_format, True, 12)])
def test_wgrad_packed_stem(kernel_device, triton_backend, monkeypatch, dtype, x_layout, idx64, c):
    # C < 16: one program's N packs all R*S*C (r, s, c) columns (C = 3: padded to 4, 196 columns in 13 N tiles of
    # 16 here); plain, the training fusions and the sums, split 1 and 3, any x strides; the int64 offsets (IDX64)
    # forced on give the same
    import resnet_fast.kernels.conv_wgrad as wg
    taken = []
    real = wg._packed
    monkeypatch.setattr(wg, "_packed", lambda *a: taken.append(real(*a)) or taken[-1])
    if idx64:
        monkeypatch.setattr(wg, "_needs_int64", lambda *a: True)
    x64, dy64, x, dz, wshape, conv = _stem_case(dtype, kernel_device, x_layout, seed=21, c=c)
    assert bool(ConvGeometry.make(x.shape, wshape, 2, 3).pack_c) == (c == 3)
    sc, sh, _, sc64, sh64, _ = _bn_relu_input(c, kernel_device, seed=22)
    y_prev64 = _away_from_kink(x64, sc64, sh64).to(dtype).double()
    y_prev = y_prev64.to(dtype).to(kernel_device).contiguous(memory_format=x_layout)
    a64 = torch.relu(y_prev64 * sc64.view(1, -1, 1, 1) + sh64.view(1, -1, 1, 1))
    dy_bn, dy_eff = _dy_bn(16, dy64, kernel_device, dtype, seed=23)
    tol = TOL[dtype]
    for split in (1, 3):
        out = conv2d_wgrad_nhwc(dz, x, wshape, **conv, split=split, allow_tf32=False, config=WCFG)
        assert _rel(out.cpu(), conv2d_weight(x64, wshape, dy64, **conv)) < tol, split
        out = conv2d_wgrad_nhwc(dz, y_prev, wshape, **conv, in_scale=sc, in_shift=sh, dy_bn=dy_bn, split=split,
                                allow_tf32=False, config=WCFG)
        assert _rel(out.cpu(), conv2d_weight(a64, wshape, dy_eff, **conv)) < 2 * tol, split
        dw, sums = conv2d_wgrad_nhwc(dz, x, wshape, **conv, dy_bn=dy_bn, dy_sums=True, split=split,
                                     allow_tf32=False, config=WCFG)
        assert _rel(dw.cpu(), conv2d_weight(x64, wshape, dy_eff, **conv)) < 2 * tol, split
        assert _rel(sums.cpu(), dy_eff.sum((0, 2, 3))) < tol, split  # the operand in the storage dtype
    assert taken and all(taken)


@pytest.mark.parametrize("shape,dtype,tf32", [((5, 32, 7, 5, 16, 3, 2), torch.float16, False),
                                              ((3, 16, 5, 4, 32, 1, 1), torch.float16, False),
                                              ((5, 32, 7, 5, 16, 3, 2), torch.float32, True)])
@pytest.mark.parametrize("idx64", [False, True])
def test_wgrad_carried_pixels(kernel_device, triton_backend, monkeypatch, shape, dtype, tf32, idx64):
    # the ALIGNED path advances (n, p, q) by carries (not under IEEE fp32): 16-pixel steps over images of 12 or
    # 20 pixels carry q into p and p into n; split 1 and 3 (chunks start mid-image); int32 and int64 offsets
    import resnet_fast.kernels.conv_wgrad as wg
    from resnet_fast.kernels.conv_common import ConvGeometry
    if idx64:
        monkeypatch.setattr(wg, "_needs_int64", lambda *a: True)
    N, C, H, W, K, R, st = shape
    conv = dict(stride=st, padding=R // 2, dilation=1, groups=1)
    g = ConvGeometry.make((N, C, H, W), (K, C, R, R), st, R // 2)
    gen = torch.Generator().manual_seed(31)
    x64 = torch.randn(N, C, H, W, generator=gen).to(dtype).double()
    dy64 = torch.randn(N, K, g.P, g.Q, generator=gen).to(dtype).double()
    x, dy = (t.to(dtype).to(kernel_device).contiguous(memory_format=CL) for t in (x64, dy64))
    cfg = ConvConfig(16, 16, 16, 1, 4, 1)
    assert wg._aligned(g, cfg, dy, x) and g.N * g.P * g.Q > 3 * cfg.BLOCK_K
    ref = conv2d_weight(x64, (K, C, R, R), dy64, **conv)
    tol = 5e-3 if tf32 else TOL[dtype]
    for split in (1, 3):
        out = conv2d_wgrad_nhwc(dy, x, (K, C, R, R), **conv, split=split, allow_tf32=tf32, config=cfg)
        assert _rel(out.cpu(), ref) < tol, split


def test_wgrad_path_switches():
    # PACKED only where C/groups < 16 and dy is aligned; int64 offsets only where an int32 one could overflow
    # (every ResNet-50 layer at batch 256 stays int32)
    import resnet_fast.kernels.conv_wgrad as wg
    from resnet_fast.kernels.conv_common import ConvGeometry
    meta = lambda *shape, fmt=CL: torch.empty(shape, dtype=torch.float16, device="meta").contiguous(  # noqa: E731
        memory_format=fmt)
    g = ConvGeometry.make((256, 3, 224, 224), (64, 3, 7, 7), 2, 3)
    x, dy = meta(256, 3, 224, 224), meta(256, 64, 112, 112)
    cands, default = wg._candidates(g, dy, x)
    assert cands == (default,) and wg._packed(g, default, dy, x) and not wg._needs_int64(g, dy, x)
    assert wg._grid(g, default, True, 4, True) == ((1, 1, 4), 1)  # 7*7*4 = 196 columns in one 256-wide tile
    assert not wg._packed(g, default, meta(256, 64, 112, 112, fmt=torch.contiguous_format), x)
    assert not wg._packed(g, ConvConfig(48, 128, 64, 8, 8, 2), dy, x)  # Kg % BLOCK_M != 0
    g = ConvGeometry.make((256, 64, 56, 56), (64, 64, 3, 3), 1, 1)
    x, dy = meta(256, 64, 56, 56), meta(256, 64, 56, 56)
    assert not wg._packed(g, wg._candidates(g, dy, x)[1], dy, x) and not wg._needs_int64(g, dy, x)
    g = ConvGeometry.make((4096, 64, 112, 112), (64, 64, 3, 3), 1, 1)  # 3.3e9 elements
    x = meta(4096, 64, 112, 112)
    assert wg._needs_int64(g, x, x)


@pytest.mark.parametrize("shape", [(256, 512, 7, 7, 512, 3, 1), (256, 128, 28, 28, 128, 3, 1),
                                   (256, 256, 14, 14, 1024, 1, 1), (256, 64, 56, 56, 64, 1, 1)])
def test_wgrad_split_from_occupancy(shape):
    # ResNet layers: the split leaves the last wave of 132 SMs × the tile's CTAs per SM at least 85 % full and
    # the critical path near the even spread (or takes all the chunks the reduction allows), keeping >= 8
    # BLOCK_K steps a chunk
    import itertools
    import math

    import resnet_fast.kernels.conv_wgrad as wg
    from resnet_fast.kernels.conv_common import ConvGeometry
    N, C, H, W, K, R, s = shape
    g = ConvGeometry.make((N, C, H, W), (K, C, R, R), s, R // 2)
    meta = lambda *sh: torch.empty(sh, dtype=torch.bfloat16, device="meta").contiguous(memory_format=CL)  # noqa
    cfg = wg._candidates(g, meta(N, K, g.P, g.Q), meta(N, C, H, W))[1]
    for dy_bn, prologue in itertools.product((False, True), repeat=2):
        split = wg.pick_split(g, cfg, dy_bn=dy_bn, prologue=prologue)
        steps = -(-g.N * g.P * g.Q // cfg.BLOCK_K)
        tiles = math.prod(wg._grid(g, cfg, False, 1, True)[0])
        slots = 132 * wg.ctas_per_sm(cfg, dy_bn, prologue)
        waves = tiles * split / slots
        assert split == 1 or steps // split >= 8, (split, steps)
        assert waves / math.ceil(waves) >= 0.85 or split == min(steps // 8, 256), (split, waves)
        # the critical path (waves × steps per chunk) within 20 % of the work spread evenly over every slot
        ideal = max(1.0, tiles * steps / slots)
        assert math.ceil(waves) * -(-steps // split) <= 1.2 * ideal or split == min(steps // 8, 256), split


def test_bad_inputs(kernel_device, triton_backend):
    x64, w64, dy64, x, w, dy, conv = _case("3x3s1", torch.float32, kernel_device)
    with pytest.raises(ValueError, match="grad_out"):
        conv2d_dgrad_nhwc(dy[:, :3], w, x.shape, **conv)
    with pytest.raises(ValueError, match="weight"):
        conv2d_dgrad_nhwc(dy, w.half(), x.shape, **conv)
    with pytest.raises(ValueError, match="groups"):
        conv2d_dgrad_nhwc(dy, w, x.shape, **{**conv, "groups": 5})
    with pytest.raises(ValueError, match="stride"):
        conv2d_dgrad_nhwc(dy, w, x.shape, **{**conv, "stride": 0})
    with pytest.raises(ValueError, match="in_centre"):
        conv2d_dgrad_nhwc(dy, w, x.shape, **conv, y_prev=x, in_scale=torch.ones(12, device=kernel_device),
                          in_shift=torch.ones(12, device=kernel_device))
    with pytest.raises(ValueError, match="dy_bn"):
        conv2d_dgrad_nhwc(dy, w, x.shape, **conv, dy_bn=(dy,))
    with pytest.raises(ValueError, match="x"):
        conv2d_wgrad_nhwc(dy, x.half(), w.shape, **conv)
    with pytest.raises(ValueError, match="split"):
        conv2d_wgrad_nhwc(dy, x, w.shape, **conv, split=0)
    with pytest.raises(ValueError, match="in_shift"):
        conv2d_wgrad_nhwc(dy, x, w.shape, **conv, in_scale=torch.ones(12, device=kernel_device))
    with pytest.raises(ValueError, match="in_scale"):
        conv2d_wgrad_nhwc(dy, x, w.shape, **conv, in_scale=torch.ones(11, device=kernel_device),
                          in_shift=torch.ones(11, device=kernel_device))
    with pytest.raises(ValueError, match="out_dtype"):
        conv2d_wgrad_nhwc(dy, x, w.shape, **conv, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="relu_out and dy_bn"):
        conv2d_dgrad_nhwc(dy, w, x.shape, **conv, relu_out=dy,
                          dy_bn=(dy, *[torch.ones(dy.shape[1], device=kernel_device)] * 4))
    with pytest.raises(ValueError, match="relu_out must have grad_out's strides"):
        conv2d_dgrad_nhwc(dy, w, x.shape, **conv, relu_out=dy.contiguous())
    with pytest.raises(ValueError, match="relu_out"):
        conv2d_dgrad_nhwc(dy, w, x.shape, **conv, relu_out=dy[:, :1])
    with pytest.raises(ValueError, match="dy_relu"):
        conv2d_wgrad_nhwc(dy, x, w.shape, **conv, dy_relu=True)
    with pytest.raises(ValueError, match="need_dw"):
        conv2d_wgrad_nhwc(dy, x, w.shape, **conv, need_dw=False)
    if kernel_device == "cpu":  # bf16 tl.dot is wrong in the interpreter: a clear error, not garbage
        for fn, args in ((conv2d_dgrad_nhwc, (dy.bfloat16(), w.bfloat16(), x.shape)),
                         (conv2d_wgrad_nhwc, (dy.bfloat16(), x.bfloat16(), w.shape))):
            with pytest.raises(RuntimeError, match="bf16"):
                fn(*args, **conv)


# -------------------------------------------------------------------------------------------------- configs
def _checked(mod) -> set:
    """(tile, warps, stages, pointer dtype, ALIGNED, DOT_IEEE) of every spec the sm_90 compile check covers."""
    out = set()
    for _fn, sig, cx, opts, *_ in mod.compile_specs():
        if "BLOCK_M" in cx:
            out.add((cx["BLOCK_M"], cx["BLOCK_N"], cx["BLOCK_K"], opts["num_warps"], opts["num_stages"],
                     sig["dy_ptr"], cx["ALIGNED"], cx["DOT_IEEE"]))
    return out


@pytest.mark.parametrize("layout", ["cl", "nchw"])
@pytest.mark.parametrize("dtype,ieee", [(torch.bfloat16, False), (torch.float16, False), (torch.float32, False),
                                        (torch.float32, True)])
@pytest.mark.parametrize("shape", [(8, 64, 14, 14, 128, 3, 2), (8, 256, 14, 14, 64, 1, 1),
                                   (8, 128, 7, 7, 128, 3, 1), (8, 24, 14, 14, 48, 3, 1), (8, 3, 32, 32, 64, 7, 2)])
def test_backward_tuning_candidates_are_compile_checked(shape, dtype, ieee, layout):
    # Autotuning may pick any candidate on the GPU: each must be a config whose path (ALIGNED or the masked
    # general one) the sm_90 compile check covers, and the untuned default must be one of them.
    import resnet_fast.kernels.conv_dgrad as dg
    import resnet_fast.kernels.conv_wgrad as wg
    from resnet_fast.kernels.conv_common import ConvGeometry
    N, C, H, W, K, R, s = shape
    fmt = CL if layout == "cl" else torch.contiguous_format
    x = torch.empty(N, C, H, W, dtype=dtype).contiguous(memory_format=fmt)
    g = ConvGeometry.make(x.shape, (K, C, R, R), s, R // 2)
    dy = torch.empty(N, K, g.P, g.Q, dtype=dtype).contiguous(memory_format=fmt)
    w = torch.empty(K, C, R, R, dtype=dtype).contiguous(memory_format=fmt)
    ptr = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}[dtype]
    cands, default = dg._candidates(g, dy, w, (x, x), ieee, tma=False)  # box tiles: test_conv_dgrad_box
    assert default in cands
    for c in cands:
        key = (c.BLOCK_M, c.BLOCK_N, c.BLOCK_K, c.num_warps, c.num_stages, ptr, dg._aligned(g, c, dy, w, (x, x)), ieee)
        assert key in _checked(dg), f"dgrad candidate {c} not compile-checked as {key}"
    cands, default = wg._candidates(g, dy, x, ieee=ieee)
    assert default in cands
    for c in cands:
        key = (c.BLOCK_M, c.BLOCK_N, c.BLOCK_K, c.num_warps, c.num_stages, ptr, wg._aligned(g, c, dy, x), ieee)
        assert key in _checked(wg), f"wgrad candidate {c} not compile-checked as {key}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("cin", [3, 64, 128, 256, 512])
def test_dgrad_candidates_are_compile_checked_per_variant(cin, dtype):
    # Each dgrad candidate, for the variant it launches (with or without the dReLU/dBN epilogue, which the
    # 128x256 tile cannot hold), is a compile-checked spec of that variant and path.
    import resnet_fast.kernels.conv_dgrad as dg
    from resnet_fast.kernels.conv_common import ConvGeometry
    ptr = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}[dtype]
    g = ConvGeometry.make((8, cin, 14, 14), (64, cin, 3, 3), 1, 1)
    x = torch.empty(8, cin, 14, 14, dtype=dtype).contiguous(memory_format=CL)
    dy = torch.empty(8, 64, 14, 14, dtype=dtype).contiguous(memory_format=CL)
    w = torch.empty(64, cin, 3, 3, dtype=dtype).contiguous(memory_format=CL)
    checked = {(cx["BLOCK_M"], cx["BLOCK_N"], cx["BLOCK_K"], opts["num_warps"], sig["dy_ptr"], cx["ALIGNED"],
                cx["EPI_ALIGNED"], cx["EPI"]) for _fn, sig, cx, opts, *_ in dg.compile_specs() if not cx["DOT_IEEE"]}
    for epilogue in (False, True):
        cands, default = dg._candidates(g, dy, w, (x, x), False, epilogue, tma=False)
        assert default == cands[0]
        for c in cands:
            key = (c.BLOCK_M, c.BLOCK_N, c.BLOCK_K, c.num_warps, ptr, dg._aligned(g, c, dy, w, (x, x)),
                   dg._epi_aligned(g, c, dy, w, (x, x)), epilogue)
            assert key in checked, f"dgrad candidate {c} (epilogue={epilogue}) not compile-checked as {key}"
        if epilogue:
            assert all(c.BLOCK_M * c.BLOCK_N <= 64 * 256 for c in cands)


def test_pinned_backward_configs_reach_the_launchers(kernel_device, triton_backend, monkeypatch):
    import resnet_fast.kernels.conv_wgrad as wg
    from resnet_fast.kernels import autotune
    _, w64, _, x, w, dy, conv = _case("3x3s2", torch.float32, kernel_device)
    sc, sh, mu = (torch.rand(x.shape[1], device=kernel_device) + 0.5 for _ in range(3))
    seen = []
    real = wg.pick_split
    monkeypatch.setattr(wg, "pick_split", lambda g, cfg, **k: seen.append(cfg) or real(g, cfg, **k))
    with autotune.pinned_config("conv_dgrad", DCFG), autotune.pinned_config("conv_wgrad", WCFG):
        _, part = conv2d_dgrad_nhwc(dy, w, x.shape, **conv, y_prev=x, in_scale=sc, in_shift=sh, in_centre=mu,
                                    allow_tf32=False)
        conv2d_wgrad_nhwc(dy, x, w64.shape, **conv, allow_tf32=False)
    n, _, h, wd = x.shape
    assert part.shape[1] == 4 * -(-n * -(-h // 2) * -(-wd // 2) // DCFG.BLOCK_M)  # 4 stride phases of BLOCK_M rows
    assert seen == [WCFG]


# ------------------------------------------------------------------------------------------------ GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_gpu_default_configs_all_dtypes(family, dtype):
    """Default (picked) configs and split on the GPU, bf16 included; fp32 with TF32 gets a TF32 tolerance."""
    x64, w64, dy64, x, w, dy, conv = _case(family, dtype, "cuda")
    tol = 5e-3 if dtype == torch.float32 else TOL[dtype]
    dx = conv2d_dgrad_nhwc(dy, w, x.shape, **conv, allow_tf32=True)
    assert _rel(dx.cpu(), conv2d_input(x64.shape, w64, dy64, **conv)) < tol
    dw = conv2d_wgrad_nhwc(dy, x, w.shape, **conv, allow_tf32=True)
    assert _rel(dw.cpu(), conv2d_weight(x64, w64.shape, dy64, **conv)) < tol


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_resnet_layer_shapes(dtype):
    """A realistic layer (stage 2 entry, 3×3/2, 64 -> 128) with every fusion on, default configs."""
    torch.manual_seed(0)
    N, C, H, K = 8, 64, 28, 128
    conv = dict(stride=2, padding=1, dilation=1, groups=1)
    y_prev = torch.randn(N, C, H, H, device="cuda").to(dtype).contiguous(memory_format=CL)
    sc, sh = torch.rand(C, device="cuda") + 0.5, torch.randn(C, device="cuda") * 0.5
    mu = torch.randn(C, device="cuda") * 0.1
    w = (torch.randn(K, C, 3, 3, device="cuda") / 24).to(dtype)
    dy = torch.randn(N, K, H // 2, H // 2, device="cuda").to(dtype).contiguous(memory_format=CL)
    a64 = torch.relu(y_prev.double() * sc.double().view(1, -1, 1, 1) + sh.double().view(1, -1, 1, 1))
    dz, part = conv2d_dgrad_nhwc(dy, w, y_prev.shape, **conv, y_prev=y_prev, in_scale=sc, in_shift=sh, in_centre=mu)
    ref = conv2d_input(y_prev.shape, w.double(), dy.double(), **conv) * (a64 > 0)
    assert _rel(dz, ref) < TOL[dtype]
    assert _rel(part[0].sum(0), ref.sum((0, 2, 3))) < TOL[dtype]
    dw = conv2d_wgrad_nhwc(dy, y_prev, w.shape, **conv, in_scale=sc, in_shift=sh)
    assert _rel(dw, conv2d_weight(a64, w.shape, dy.double(), **conv)) < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_every_tuning_candidate_is_correct(dtype):
    """What autotuning may pick, each checked: every candidate config of a ResNet layer, dgrad and wgrad."""
    import resnet_fast.kernels.conv_dgrad as dg
    import resnet_fast.kernels.conv_wgrad as wg
    from resnet_fast.kernels.conv_common import ConvGeometry
    torch.manual_seed(0)
    x64 = torch.randn(4, 128, 14, 14, dtype=torch.float64)
    w64 = torch.randn(128, 128, 3, 3, dtype=torch.float64) / 34
    conv = dict(stride=1, padding=1, dilation=1, groups=1)
    dy64 = torch.randn(4, 128, 14, 14, dtype=torch.float64)
    x, w, dy = (t.to("cuda", dtype).contiguous(memory_format=CL) for t in (x64, w64, dy64))
    g = ConvGeometry.make(x.shape, w.shape, 1, 1)
    ref_dx, ref_dw = conv2d_input(x64.shape, w64, dy64, **conv), conv2d_weight(x64, w64.shape, dy64, **conv)
    tol = TOL[dtype] if dtype != torch.float32 else 1e-5
    for cfg in dg._candidates(g, dy, w, (x, x), dtype == torch.float32)[0]:
        assert _rel(conv2d_dgrad_nhwc(dy, w, x.shape, **conv, allow_tf32=False, config=cfg).cpu(), ref_dx) < tol, cfg
    for cfg in wg._candidates(g, dy, x)[0]:
        assert _rel(conv2d_wgrad_nhwc(dy, x, w.shape, **conv, allow_tf32=False, config=cfg).cpu(), ref_dw) < tol, cfg
