"""The cuDNN composites (``resnet_fast.ops.conv_cudnn``) and their kernels (``tile_stats``, ``bn_dy``) vs float64.

On CPU the GEMM is ATen's CPU convolution, the passes around it the C++ CPU ops and the two Triton kernels in the
interpreter (float32/float16; bf16 only where no Triton kernel runs). References are float64 computations from
the same (rounded) inputs, tolerances those of the Triton path's tests (test_conv_fwd, test_conv2d_backward,
test_conv_bn_train). The last tests check that a composite returns what the Triton path's op returns.
"""
import pytest
import torch
import torch.nn.functional as F

import resnet_fast
from resnet_fast import _backend
from resnet_fast.kernels.bn_finalize import bn_finalize
from resnet_fast.ops import conv_cudnn
from helpers import rel_err

CL = torch.channels_last
TOL_FWD = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
TOL_BWD = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
DTYPES = (torch.float32, torch.float16)  # the dtypes that run the Triton kernels in the interpreter

# (N, C, H, W, K, R, stride, padding, dilation, groups)
GEOMS = {
    "3x3": (2, 8, 7, 6, 12, 3, 1, 1, 1, 1),
    "3x3s2g2": (2, 8, 9, 7, 12, 3, 2, 1, 1, 2),
    "dil2": (2, 6, 9, 9, 8, 3, 1, 2, 2, 1),
    "stem7x7s2": (2, 3, 12, 12, 16, 7, 2, 3, 1, 1),
    "1x1": (2, 16, 5, 5, 24, 1, 1, 0, 1, 1),
    "3x3wide": (4, 4, 24, 24, 4, 3, 1, 1, 1, 1),  # many rows per channel (2304)
}


@pytest.fixture(autouse=True)
def _ieee_fp32(monkeypatch):
    # fp32 compared at fp32 tolerances: IEEE on both paths on a GPU too (conv_allows_tf32 is then False)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")


def _conv(geom):
    *_, st, pd, dl, g = GEOMS[geom]
    return [st, st], [pd, pd], [dl, dl], g


def _make(geom, dtype, device, seed=0):
    """x (channels_last) and weight in ``dtype``, and the output shape."""
    N, C, H, W, K, R, st, pd, dl, g = GEOMS[geom]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=gen).to(device, dtype).contiguous(memory_format=CL)
    w = (torch.randn(K, C // g, R, R, generator=gen) / (C // g * R * R) ** 0.5).to(device, dtype)
    P = (H + 2 * pd - dl * (R - 1) - 1) // st + 1
    Q = (W + 2 * pd - dl * (R - 1) - 1) // st + 1
    return x, w, (N, K, P, Q), gen


def _conv64(a, w, geom):
    stride, padding, dilation, groups = _conv(geom)
    return F.conv2d(a.double().cpu(), w.double().cpu(), None, stride, padding, dilation, groups)


def _v(t):
    return t.double().cpu().view(1, -1, 1, 1)


def _prologue64(x, in_scale, in_shift):
    return torch.relu(x.double().cpu() * _v(in_scale) + _v(in_shift))


def _off_kink(x, in_scale, in_shift):
    """x moved away from the prologue's ReLU kink, so fp32/fp16 and float64 agree on every mask bit."""
    pre = x.double().cpu() * _v(in_scale) + _v(in_shift)
    moved = torch.where(pre.abs() < 0.1, x.double().cpu() + 0.3 / _v(in_scale).clamp_min(1e-3), x.double().cpu())
    return moved.to(x.dtype).to(x.device).contiguous(memory_format=CL)


# ------------------------------------------------------------------------------------------------ kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", [None, (32, 16, 4)], ids=["default", "32x16"])
def test_tile_stats_per_tile_vs_float64(kernel_device, dtype, config):
    # partial last tile (M = 105), channels not a multiple of the channel block (K = 40)
    from resnet_fast.kernels.tile_stats import tile_stats
    y = (torch.randn(3, 40, 5, 7) * 2 + 1).to(kernel_device, dtype).contiguous(memory_format=CL)
    st = tile_stats(y, config=config)
    rows = y.double().cpu().permute(0, 2, 3, 1).reshape(-1, 40).split(st.tile_rows)
    assert st.sum.shape == st.m2.shape == (len(rows), 40) and st.sum.dtype == torch.float32
    assert rel_err(st.sum, torch.stack([t.sum(0) for t in rows])) < 1e-5
    assert rel_err(st.m2, torch.stack([((t - t.mean(0)) ** 2).sum(0) for t in rows])) < 1e-5


def test_tile_stats_large_mean_through_bn_finalize(kernel_device):
    # mean/std ≈ 1e3: the tile-centred partials keep the variance; fp32 E[y²] - E[y]² loses it
    gen = torch.Generator().manual_seed(1)
    y = (1000.0 + torch.randn(4, 24, 9, 9, generator=gen)).to(kernel_device).contiguous(memory_format=CL)
    st = tile_stats_of(y, (64, 16, 4))
    mean, invstd, _, _ = bn_finalize(st.sum, st.m2, 4 * 81, tile_rows=st.tile_rows, momentum=0.0, eps=1e-12)
    y64 = y.double().cpu()
    var64 = y64.var((0, 2, 3), unbiased=False)
    assert rel_err(mean, y64.mean((0, 2, 3))) < 1e-6
    assert rel_err(invstd, (var64 + 1e-12).rsqrt()) < 1e-4
    y32 = y.float().cpu()
    naive = (y32 * y32).mean((0, 2, 3)) - y32.mean((0, 2, 3)) ** 2
    assert rel_err(naive, var64) > 1e-2  # the case really needs the centring


def tile_stats_of(y, config=None):
    from resnet_fast.kernels.tile_stats import tile_stats
    return tile_stats(y, config=config)


@pytest.mark.parametrize("dtype", DTYPES)
def test_form_dy_bn_transform_vs_float64(kernel_device, dtype):
    from resnet_fast.kernels.bn_dy import form_dy
    gen = torch.Generator().manual_seed(2)
    shape = (3, 40, 5, 7)
    dz, y = (torch.randn(shape, generator=gen).to(kernel_device, dtype).contiguous(memory_format=CL)
             for _ in range(2))
    c2, c3, mean = (torch.randn(40, generator=gen).to(kernel_device) for _ in range(3))
    got = form_dy(dz, y, c2=c2, c3=c3, mean=mean)
    ref = dz.double().cpu() + _v(c2) * (y.double().cpu() - _v(mean)) + _v(c3)
    assert got.dy.dtype == dtype and got.dy.is_contiguous(memory_format=CL) and got.sums is None
    assert rel_err(got.dy, ref) < TOL_FWD[dtype] / 3


@pytest.mark.parametrize("dtype", DTYPES)
def test_form_dy_relu_mask_and_sums(kernel_device, dtype):
    from resnet_fast.kernels.bn_dy import form_dy
    gen = torch.Generator().manual_seed(3)
    grad, out = (torch.randn(2, 20, 9, 8, generator=gen).to(kernel_device, dtype).contiguous(memory_format=CL)
                 for _ in range(2))
    masked = form_dy(grad, out, relu=True, sums=True, config=(32, 16, 4))
    g64 = grad.double().cpu() * (out.cpu() > 0)
    assert torch.equal(masked.dy.cpu(), g64.to(dtype))  # masking is exact
    assert masked.sums.shape == (5, 20)  # cdiv(144, 32) tiles
    assert rel_err(masked.sums.sum(0), g64.sum((0, 2, 3))) < 1e-6
    only = form_dy(grad, write=False, sums=True)
    assert only.dy is None and rel_err(only.sums.sum(0), grad.double().cpu().sum((0, 2, 3))) < 1e-6


def test_kernel_input_checks(kernel_device):
    from resnet_fast.kernels.bn_dy import form_dy
    from resnet_fast.kernels.tile_stats import tile_stats
    y = torch.randn(2, 8, 4, 4, device=kernel_device).contiguous(memory_format=CL)
    v = torch.zeros(8, device=kernel_device)
    with pytest.raises(ValueError, match="tile_stats: y must be channels_last"):
        tile_stats(y.contiguous())
    with pytest.raises(ValueError, match="tile_stats: y must be a 4-D float32/float16/bfloat16 tensor"):
        tile_stats(y.double().contiguous(memory_format=CL))
    with pytest.raises(ValueError, match="tile_rows must be a power of two"):
        tile_stats(y, config=(48, 16, 4))
    with pytest.raises(ValueError, match="c2, c3 and mean go together"):
        form_dy(y, y, c2=v, c3=v)
    with pytest.raises(ValueError, match="c2 must be a contiguous"):
        form_dy(y, y, c2=torch.zeros(7, device=kernel_device), c3=v, mean=v)
    with pytest.raises(ValueError, match="y must be a channels_last"):
        form_dy(y, y.half().contiguous(memory_format=CL), relu=True)
    with pytest.raises(ValueError, match="y is needed"):
        form_dy(y, relu=True)
    with pytest.raises(ValueError, match="dz must be channels_last"):
        form_dy(y.contiguous(), y)
    if _backend.interpreting():
        with pytest.raises(RuntimeError, match="bf16"):
            tile_stats(y.bfloat16().contiguous(memory_format=CL))


# ---------------------------------------------------------------------------------------- inference forward
VARIANTS = {
    "plain": (), "bias": ("bias",), "scale_shift": ("scale", "shift"), "scale": ("scale",),
    "bias_bn_relu": ("bias", "scale", "shift", "relu"), "relu": ("relu",),
    "residual_relu": ("scale", "shift", "residual", "relu"), "bias_residual": ("bias", "residual"),
    "bias32": ("bias32",),
}


def _conv2d_case(geom, dtype, device, terms, seed=0):
    x, w, yshape, gen = _make(geom, dtype, device, seed)
    K = yshape[1]
    scale = torch.rand(K, generator=gen) + 0.5
    scale[1] = 0.0  # a BN with gamma 0
    vec = {"bias": (torch.randn(K, generator=gen) * 0.3).to(device, dtype), "scale": scale.to(device),
           "shift": (torch.randn(K, generator=gen) * 0.3).to(device),
           "residual": torch.randn(yshape, generator=gen).to(device, dtype).contiguous(memory_format=CL)}
    kw = {k: (vec[k] if k in terms else None) for k in ("bias", "scale", "shift", "residual")}
    if "bias32" in terms:  # an fp32 bias with 16-bit activations: added in fp32 by the pass, not rounded
        kw["bias"] = vec["bias"].float() + 1e-3
    kw["relu"] = "relu" in terms
    return x, w, kw


def _conv2d_ref(x, w, geom, bias, scale, shift, residual, relu):
    y = _conv64(x, w, geom)
    if bias is not None:
        y = y + _v(bias)
    if scale is not None:
        y = y * _v(scale)
    if shift is not None:
        y = y + _v(shift)
    if residual is not None:
        y = y + residual.double().cpu()
    return torch.relu(y) if relu else y


@pytest.mark.parametrize("dtype", DTYPES + (torch.bfloat16,))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_conv2d_variants_vs_float64(kernel_device, dtype, variant):
    x, w, kw = _conv2d_case("3x3s2g2", dtype, kernel_device, VARIANTS[variant])
    y = conv_cudnn.conv2d(x, w, kw["bias"], *_conv("3x3s2g2"), kw["scale"], kw["shift"], kw["residual"],
                          kw["relu"])
    assert y.dtype == dtype and y.is_contiguous(memory_format=CL) and y.shape == (2, 12, 5, 4)
    assert rel_err(y, _conv2d_ref(x, w, "3x3s2g2", **kw)) < TOL_FWD[dtype]
    if kw["scale"] is not None and kw["residual"] is None:  # the zero-scale channel is its shift, exactly
        c1 = 0.0 if kw["shift"] is None else float(kw["shift"][1])
        assert torch.equal(y[:, 1].cpu(), torch.full_like(y[:, 1].cpu(), max(c1, 0.0) if kw["relu"] else c1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom", list(GEOMS))
def test_conv2d_geometries_vs_float64(kernel_device, dtype, geom):
    x, w, kw = _conv2d_case(geom, dtype, kernel_device, ("bias", "scale", "shift", "residual", "relu"), seed=1)
    y = conv_cudnn.conv2d(x.contiguous(), w, kw["bias"], *_conv(geom), kw["scale"], kw["shift"], kw["residual"],
                          True)  # an NCHW x is converted
    assert y.is_contiguous(memory_format=CL)
    assert rel_err(y, _conv2d_ref(x, w, geom, **kw)) < TOL_FWD[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_folded_candidate(kernel_device, dtype):
    # the folded form (W*scale, bias*scale + shift rounded to x's dtype once) is within the dtype's tolerance
    x, w, kw = _conv2d_case("3x3", dtype, kernel_device, ("bias", "scale", "shift"), seed=2)
    cands = conv_cudnn.conv2d_fused_candidates(x, w, kw["bias"], *_conv("3x3"), kw["scale"], kw["shift"], None,
                                               False)
    assert set(cands) == {"conv_folded"}
    y = cands["conv_folded"]()
    assert y.dtype == dtype and y.is_contiguous(memory_format=CL)
    assert rel_err(y, _conv2d_ref(x, w, "3x3", **kw)) < TOL_FWD[dtype] * (1 if dtype == torch.float32 else 2)
    relu_cands = conv_cudnn.conv2d_fused_candidates(x, w, kw["bias"], *_conv("3x3"), kw["scale"], kw["shift"],
                                                    None, True)
    assert set(relu_cands) == ({"cudnn_conv_relu"} if x.is_cuda else set())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True])
def test_cudnn_fused_candidates_cuda(dtype, residual):
    terms = ("bias", "scale", "shift", "relu") + (("residual",) if residual else ())
    x, w, kw = _conv2d_case("3x3", dtype, "cuda", terms, seed=3)
    cands = conv_cudnn.conv2d_fused_candidates(x, w, kw["bias"], *_conv("3x3"), kw["scale"], kw["shift"],
                                               kw["residual"], True)
    (name, fn), = cands.items()
    assert name == ("cudnn_conv_add_relu" if residual else "cudnn_conv_relu")
    y = fn()
    assert y.dtype == dtype and y.is_contiguous(memory_format=CL)
    assert rel_err(y, _conv2d_ref(x, w, "3x3", **kw)) < TOL_FWD[dtype] * (1 if dtype == torch.float32 else 2)


# -------------------------------------------------------------------------------------- inference backward
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom,relu,with_scale", [("3x3s2g2", True, True), ("3x3s2g2", False, True),
                                                  ("3x3", True, False), ("3x3", False, False),
                                                  ("stem7x7s2", True, True), ("dil2", True, True)])
def test_conv2d_backward_vs_float64(kernel_device, dtype, geom, relu, with_scale):
    x, w, yshape, gen = _make(geom, dtype, kernel_device, seed=4)
    grad, out = (torch.randn(yshape, generator=gen).to(kernel_device, dtype) for _ in range(2))
    scale = None
    if with_scale:
        scale = torch.rand(yshape[1], generator=gen) + 0.5
        scale[1] = 0.0
        scale = scale.to(kernel_device)
    gx, dw, sg = conv_cudnn.conv2d_backward(grad, x, w, scale, out if relu else None, *_conv(geom), relu, True,
                                            True, True)
    g64 = grad.double().cpu() * ((out.cpu() > 0) if relu else 1)
    stride, padding, dilation, groups = _conv(geom)
    conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    dy64 = g64 if scale is None else g64 * _v(scale)
    gx64 = torch.nn.grad.conv2d_input(x.shape, w.double().cpu(), dy64, **conv)
    dw64 = torch.nn.grad.conv2d_weight(x.double().cpu(), w.shape, g64, **conv)
    assert gx.dtype == dtype and gx.is_contiguous(memory_format=CL) and gx.shape == x.shape
    assert dw.dtype == sg.dtype == torch.float32 and dw.is_contiguous() and dw.shape == w.shape
    assert rel_err(gx, gx64) < TOL_BWD[dtype]
    assert rel_err(dw, dw64) < TOL_BWD[dtype]
    assert rel_err(sg, g64.sum((0, 2, 3))) < 1e-5
    if with_scale:
        # zero-scale channel: nothing reaches x through it (grad_x bit-identical whatever its gradient), its
        # dW_g and Σg are still the full ones (nothing is divided by the scale)
        other = grad.clone()
        other[:, 1] = torch.randn(other[:, 1].shape, generator=gen).to(other)
        gx_other = conv_cudnn.conv2d_backward(other, x, w, scale, out if relu else None, *_conv(geom), relu, True,
                                              False, False)[0]
        assert torch.equal(gx_other, gx)
        assert rel_err(dw[1], dw64[1]) < TOL_BWD[dtype] and float(dw64[1].abs().max()) > 0


@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True),
                                  (False, True, True)], ids=["x", "dw", "sums", "dw+sums"])
@pytest.mark.parametrize("relu", [True, False])
def test_conv2d_backward_only_what_is_needed(kernel_device, need, relu):
    x, w, yshape, gen = _make("3x3", torch.float32, kernel_device, seed=5)
    grad, out = (torch.randn(yshape, generator=gen).to(kernel_device) for _ in range(2))
    full = conv_cudnn.conv2d_backward(grad, x, w, None, out, *_conv("3x3"), relu, True, True, True)
    part = conv_cudnn.conv2d_backward(grad, x, w, None, out, *_conv("3x3"), relu, *need)
    for n, f, p in zip(need, full, part):
        if n:
            assert torch.equal(p, f)
        else:
            assert p.numel() == 0 and p.dtype == torch.float32


# ---------------------------------------------------------------------------------------- training forward
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom,prologue", [("3x3", True), ("3x3", False), ("3x3s2g2", True), ("dil2", True),
                                           ("stem7x7s2", False), ("1x1", True)])
def test_conv_bn_stats_vs_float64(kernel_device, dtype, geom, prologue):
    x, w, yshape, gen = _make(geom, dtype, kernel_device, seed=6)
    in_scale = in_shift = None
    a64 = x.double().cpu()
    if prologue:
        C = x.shape[1]
        in_scale = (torch.rand(C, generator=gen) + 0.5).to(kernel_device)
        in_shift = (torch.randn(C, generator=gen) * 0.3).to(kernel_device)
        x = _off_kink(x, in_scale, in_shift)
        a64 = _prologue64(x, in_scale, in_shift)
    y, st = conv_cudnn.conv_bn_stats(x, w, in_scale, in_shift, *_conv(geom))
    assert y.dtype == dtype and y.is_contiguous(memory_format=CL) and y.shape == yshape
    assert rel_err(y, _conv64(a64, w, geom)) < TOL_FWD[dtype] * (2 if prologue and dtype != torch.float32 else 1)
    M = yshape[0] * yshape[2] * yshape[3]
    mean, invstd, _, _ = bn_finalize(st.sum, st.m2, M, tile_rows=st.tile_rows, momentum=0.0, eps=1e-5)
    ys = y.double().cpu()  # the statistics are those of the stored y
    assert rel_err(mean, ys.mean((0, 2, 3))) < 1e-5
    assert rel_err(invstd, (ys.var((0, 2, 3), unbiased=False) + 1e-5).rsqrt()) < 1e-5


def test_conv_bn_stats_large_mean(kernel_device):
    # every output channel at mean/std ≈ 1e3 (x = 1 + 1e-3·noise, positive weights): the statistics of the
    # stored y stay float64-accurate
    gen = torch.Generator().manual_seed(7)
    x = (1 + 1e-3 * torch.randn(4, 8, 10, 10, generator=gen)).to(kernel_device).contiguous(memory_format=CL)
    w = (torch.rand(16, 8, 3, 3, generator=gen) + 0.5).to(kernel_device)
    y, st = conv_cudnn.conv_bn_stats(x, w, None, None, [1, 1], [0, 0], [1, 1], 1)
    ys = y.double().cpu()
    ratio = (ys.mean((0, 2, 3)) / ys.std((0, 2, 3))).min()
    assert ratio > 300
    mean, invstd, _, _ = bn_finalize(st.sum, st.m2, 4 * 64, tile_rows=st.tile_rows, momentum=0.0, eps=1e-12)
    assert rel_err(mean, ys.mean((0, 2, 3))) < 1e-6
    assert rel_err(invstd, (ys.var((0, 2, 3), unbiased=False) + 1e-12).rsqrt()) < 1e-4


# --------------------------------------------------------------------------------------- training backward
def _train_bwd_case(geom, dtype, device, prologue, seed, zero_scale=False, x_mean=0.0):
    x, w, yshape, gen = _make(geom, dtype, device, seed)
    if x_mean:
        x = (x.float() + x_mean).to(dtype).contiguous(memory_format=CL)
    C, K = x.shape[1], yshape[1]
    in_scale = in_shift = centre = None
    if prologue:
        sc = torch.rand(C, generator=gen) + 0.5
        if zero_scale:
            sc[1] = 0.0
        in_scale = sc.to(device)
        sh = torch.randn(C, generator=gen) * 0.3 - x_mean * sc
        if zero_scale:
            sh[1] = 0.4  # the zero-scale channel's ReLU passes: its gradients are not zero
        in_shift = sh.to(device)
        centre = torch.full((C,), x_mean, device=device)
        x = _off_kink(x, in_scale, in_shift)
    g_y, y = (torch.randn(yshape, generator=gen).to(device, dtype).contiguous(memory_format=CL) for _ in range(2))
    c2, c3, mean = (torch.randn(K, generator=gen).to(device) * s for s in (0.05, 0.1, 1.0))
    return dict(g_y=g_y, c2=c2, c3=c3, x=x, weight=w, in_scale=in_scale, in_shift=in_shift, in_centre=centre,
                y=y, mean=mean)


def _train_bwd_ref(case, geom):
    """float64 (grad_x, grad_w, grad_scale, grad_shift) for the gradient dy formed from the same inputs."""
    dy = case["g_y"].double().cpu() + _v(case["c2"]) * (case["y"].double().cpu() - _v(case["mean"])) \
        + _v(case["c3"])
    x64 = case["x"].double().cpu().requires_grad_(True)
    w64 = case["weight"].double().cpu().requires_grad_(True)
    ins = [x64, w64]
    a = x64
    if case["in_scale"] is not None:
        sc = case["in_scale"].double().cpu().requires_grad_(True)
        sh = case["in_shift"].double().cpu().requires_grad_(True)
        ins += [sc, sh]
        a = torch.relu(x64 * sc.view(1, -1, 1, 1) + sh.view(1, -1, 1, 1))
    return torch.autograd.grad(_conv64(a, w64, geom), ins, dy)


def _train_bwd(case, geom, need_x=True, need_w=True):
    c = case
    return conv_cudnn.conv_bn_stats_backward(c["g_y"], c["c2"], c["c3"], c["x"], c["weight"], c["in_scale"],
                                             c["in_shift"], c["in_centre"], c["y"], c["mean"], *_conv(geom),
                                             need_x=need_x, need_w=need_w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom,prologue", [("3x3", True), ("3x3", False), ("3x3s2g2", True), ("dil2", True),
                                           ("stem7x7s2", False), ("1x1", True)])
def test_conv_bn_stats_backward_vs_float64(kernel_device, dtype, geom, prologue):
    case = _train_bwd_case(geom, dtype, kernel_device, prologue, seed=8)
    got = _train_bwd(case, geom)
    ref = _train_bwd_ref(case, geom)
    x, w = case["x"], case["weight"]
    assert got[0].dtype == dtype and got[0].is_contiguous(memory_format=CL) and got[0].shape == x.shape
    assert got[1].dtype == dtype and got[1].shape == w.shape and got[1].stride() == w.stride()
    names = ("grad_x", "grad_w", "grad_scale", "grad_shift")
    tol = {torch.float32: 1e-4, torch.float16: 4e-3}[dtype]
    for name, g, r in zip(names, got, ref):
        assert rel_err(g, r) < tol, f"{name}: {rel_err(g, r):.2e}"
    if not prologue:
        assert got[2].numel() == got[3].numel() == 0


def test_conv_bn_stats_backward_zero_scale_and_large_mean(kernel_device):
    # prologue channel 1 has in_scale exactly 0: grad_x is 0 there, its in_scale/in_shift gradients are still
    # Σdz·x and Σdz. x has mean 1e3 (std 1), its centre the mean: Σdz·(x - centre) keeps its accuracy, so
    # grad_scale - centre·grad_shift (what BN's dgamma needs) matches float64 (4e-5 here; 5e-4 uncentred).
    case = _train_bwd_case("3x3wide", torch.float32, kernel_device, True, seed=9, zero_scale=True, x_mean=1000.0)
    got = _train_bwd(case, "3x3wide")
    ref = _train_bwd_ref(case, "3x3wide")
    assert float(got[0][:, 1].abs().max()) == 0.0 and rel_err(got[0], ref[0]) < 1e-4
    assert float(ref[3][1].abs()) > 1e-3 and rel_err(got[3], ref[3]) < 1e-4
    c = case["in_centre"].double().cpu()
    assert rel_err(got[2].double() - c * got[3].double(), ref[2] - c * ref[3]) < 1e-4


@pytest.mark.parametrize("prologue", [False, True])
def test_conv_bn_stats_backward_need_flags(kernel_device, prologue):
    case = _train_bwd_case("3x3s2g2", torch.float32, kernel_device, prologue, seed=10)
    full = _train_bwd(case, "3x3s2g2")
    no_x = _train_bwd(case, "3x3s2g2", need_x=False)  # e.g. the network's input image
    no_w = _train_bwd(case, "3x3s2g2", need_w=False)
    assert no_x[0].numel() == 0 and torch.equal(no_x[1], full[1])
    assert no_w[1].numel() == 0 and torch.equal(no_w[0], full[0])
    for got in (no_x, no_w):  # the prologue's gradients come with the dgrad either way
        assert torch.equal(got[2], full[2]) and torch.equal(got[3], full[3])
    none = _train_bwd(case, "3x3s2g2", need_x=False, need_w=False)
    assert none[0].numel() == none[1].numel() == 0
    assert torch.equal(none[2], full[2]) if prologue else none[2].numel() == 0


# -------------------------------------------------------------------------------------- vs the Triton path
def test_conv2d_matches_triton_op(kernel_device, triton_backend):
    from resnet_fast.ops import conv2d
    for geom, dtype in (("3x3s2g2", torch.float32), ("1x1", torch.float16)):
        x, w, kw = _conv2d_case(geom, dtype, kernel_device, ("bias", "scale", "shift", "residual", "relu"), 11)
        stride, padding, dilation, groups = _conv(geom)
        ref = conv2d(x, w, kw["bias"], stride, padding, dilation, groups, scale=kw["scale"], shift=kw["shift"],
                     residual=kw["residual"], relu=True)
        got = conv_cudnn.conv2d(x, w, kw["bias"], stride, padding, dilation, groups, kw["scale"], kw["shift"],
                                kw["residual"], True)
        assert got.dtype == ref.dtype and got.stride() == ref.stride()
        assert rel_err(got, ref) < TOL_FWD[dtype]
    st = resnet_fast.stats()  # the op counts its calls; a composite called directly is not a call of an op
    assert st["kernel_calls"]["conv2d"] == 2 and st["impl_calls"] == {"conv2d": {"triton": 2}}


def test_conv2d_backward_matches_triton_op(kernel_device, triton_backend):
    from resnet_fast.ops.conv import _conv2d_backward_op
    x, w, yshape, gen = _make("3x3s2g2", torch.float32, kernel_device, seed=12)
    grad, out = (torch.randn(yshape, generator=gen).to(kernel_device).contiguous(memory_format=CL)
                 for _ in range(2))
    scale = (torch.rand(yshape[1], generator=gen) + 0.5).to(kernel_device)
    args = (grad, x, w, scale, out, *_conv("3x3s2g2"), True, True, True, True)
    for name, r, g in zip(("grad_x", "dW_g", "sum_g"), _conv2d_backward_op(*args), conv_cudnn.conv2d_backward(*args)):
        assert g.dtype == r.dtype and g.shape == r.shape and g.stride() == r.stride(), name
        assert rel_err(g, r) < TOL_BWD[torch.float32], name


def test_conv_bn_stats_matches_triton_op(kernel_device, triton_backend):
    from resnet_fast.ops.conv_bn_train import _conv_bn_stats_backward_op, _conv_bn_stats_op
    case = _train_bwd_case("3x3s2g2", torch.float32, kernel_device, True, seed=13)
    c = case
    conv = _conv("3x3s2g2")
    y_t, mean_t, invstd_t = _conv_bn_stats_op(c["x"], c["weight"], c["in_scale"], c["in_shift"], None, *conv, 1e-5)
    y, st = conv_cudnn.conv_bn_stats(c["x"], c["weight"], c["in_scale"], c["in_shift"], *conv)
    M = y.shape[0] * y.shape[2] * y.shape[3]
    mean, invstd, _, _ = bn_finalize(st.sum, st.m2, M, tile_rows=st.tile_rows, momentum=0.0, eps=1e-5)
    assert y.stride() == y_t.stride() and rel_err(y, y_t) < TOL_FWD[torch.float32]
    assert rel_err(mean, mean_t) < 1e-5 and rel_err(invstd, invstd_t) < 1e-5
    c.update(y=y_t, mean=mean_t)
    ref = _conv_bn_stats_backward_op(c["g_y"], c["c2"], c["c3"], c["x"], c["weight"], c["in_scale"],
                                     c["in_shift"], c["in_centre"], y_t, mean_t, *conv, True, True, True)
    for name, g, r in zip(("grad_x", "grad_w", "grad_scale", "grad_shift"), _train_bwd(c, "3x3s2g2"), ref):
        assert g.dtype == r.dtype and g.shape == r.shape and g.stride() == r.stride(), name
        assert rel_err(g, r) < 1e-4, f"{name}: {rel_err(g, r):.2e}"


def test_ops_count_the_composite_as_cudnn(kernel_device, triton_backend, monkeypatch):
    # RESNET_FAST_CONV_IMPL=cudnn: the ops run the composite and count it per role; the composites do not count
    monkeypatch.setenv("RESNET_FAST_CONV_IMPL", "cudnn")
    case = _train_bwd_case("3x3", torch.float32, kernel_device, True, seed=14)
    conv_cudnn.conv_bn_stats(case["x"], case["weight"], case["in_scale"], case["in_shift"], *_conv("3x3"))
    assert resnet_fast.stats()["impl_calls"] == {}
    x = case["x"].requires_grad_(True)
    y, mean, invstd = resnet_fast.ops.conv_bn_stats(x, case["weight"], case["in_scale"], case["in_shift"],
                                                    stride=1, padding=1)
    (y.float().square().sum() + mean.sum() + invstd.sum()).backward()
    st = resnet_fast.stats()
    assert st["impl_calls"] == {"conv_bn_stats": {"cudnn": 1}, "conv_bn_stats_backward": {"cudnn": 1}}, st
    assert st["kernel_calls"]["conv_bn_stats"] == 1


def test_composite_input_checks(kernel_device):
    x, w, yshape, _ = _make("3x3", torch.float32, kernel_device)
    conv = _conv("3x3")
    with pytest.raises(ValueError, match="conv2d_cudnn: weight must be a tensor of x's dtype"):
        conv_cudnn.conv2d(x, w.half(), None, *conv, None, None, None, False)
    with pytest.raises(ValueError, match="conv2d_cudnn: scale must be a 1-D float tensor of length 12"):
        conv_cudnn.conv2d(x, w, None, *conv, torch.ones(3), None, None, False)
    with pytest.raises(ValueError, match="conv2d_cudnn: residual must be"):
        conv_cudnn.conv2d(x, w, None, *conv, None, None, torch.ones(2, 12, 3, 3), True)
    with pytest.raises(ValueError, match="conv_bn_stats_cudnn: in_scale and in_shift go together"):
        conv_cudnn.conv_bn_stats(x, w, torch.ones(8), None, *conv)
    with pytest.raises(ValueError, match="groups=3 must divide"):
        conv_cudnn.conv_bn_stats(x, w, None, None, [1, 1], [1, 1], [1, 1], 3)
    with pytest.raises(ValueError, match="out must be the forward's"):
        conv_cudnn.conv2d_backward(torch.ones(yshape), x, w, None, None, *conv, True, True, True, True)
    with pytest.raises(ValueError, match="x dtype torch.float64"):
        conv_cudnn.conv2d(x.double(), w.double(), None, *conv, None, None, None, False)


def test_autocast_does_not_reach_the_gemm(kernel_device):
    # the op bodies hold their operands in the activation dtype: ATen's conv must not recast them (CUDA's
    # autocast casts aten::convolution to 16 bits; CPU's only lists aten::conv2d, so this bites on a GPU)
    x, w, kw = _conv2d_case("3x3", torch.float32, kernel_device, ("scale", "shift", "relu"), seed=15)
    with torch.autocast(kernel_device, dtype=torch.bfloat16):
        y = conv_cudnn.conv2d(x, w, None, *_conv("3x3"), kw["scale"], kw["shift"], None, True)
        y_stats, _ = conv_cudnn.conv_bn_stats(x, w, None, None, *_conv("3x3"))
    assert y.dtype == y_stats.dtype == torch.float32
    assert rel_err(y, _conv2d_ref(x, w, "3x3", **kw)) < TOL_FWD[torch.float32]
    assert rel_err(y_stats, _conv64(x, w, "3x3")) < TOL_FWD[torch.float32]
