"""The training-path kernels composed by hand: conv -> BN -> ReLU -> conv -> BN, forward and backward.

This is the data flow the training op is built on (see docs/ARCHITECTURE.md, "Training path kernels"):

forward   y1, Σ1 = conv_fwd(x, W1, stats)            -> bn_finalize -> mean1, invstd1, sc1, sh1
          y2, Σ2 = conv_fwd(y1, W2, prologue relu(y1*sc1+sh1), stats) -> bn_finalize -> sc2, sh2
          out = y2*sc2 + sh2
backward  dz2 = dL/d out; BN2 coefficients from Σdz2, Σdz2·(y2-μ2) (here a torch reduction: in a network the
          next conv's dgrad epilogue or the tail op provides them)
          dz1, Σ' = dgrad(conv2, dy formed on load from (dz2, y2), epilogue dReLU(y1) + dBN sums)
          dW2 = wgrad(dy formed on load, x operand relu(y1*sc1+sh1) on load)
          BN1 coefficients from Σ' -> dx = dgrad(conv1, dy formed on load from (dz1, y1)), dW1 = wgrad(...)

Everything is checked against torch.nn (Conv2d/BatchNorm2d/ReLU) in float64 autograd: outputs ≤ 1e-4
relative, gradients ≤ 1e-3, running statistics ≤ 1e-5 -- in fp32 with IEEE MMAs.
"""
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from resnet_fast.kernels.bn_finalize import bn_backward_coeffs, bn_finalize
from resnet_fast.kernels.conv_common import ConvGeometry
from resnet_fast.kernels.conv_dgrad import conv2d_dgrad_nhwc
from resnet_fast.kernels.conv_fwd import conv2d_nhwc, pack_weight
from resnet_fast.kernels.conv_wgrad import conv2d_wgrad_nhwc
from resnet_fast.ops import conv_bn_stats
from helpers import rel_err

CL = torch.channels_last


def test_conv_bn_relu_conv_bn_chain_matches_torch(kernel_device, triton_backend):
    torch.manual_seed(0)
    momentum = None  # cumulative average: the factor comes from num_batches_tracked on the device
    N, C0, H, C1, C2 = 2, 4, 6, 8, 12
    conv1 = dict(stride=1, padding=1, dilation=1, groups=1)
    conv2 = dict(stride=2, padding=1, dilation=1, groups=2)
    ref = torch.nn.Sequential(
        torch.nn.Conv2d(C0, C1, 3, bias=False, **conv1), torch.nn.BatchNorm2d(C1, momentum=momentum),
        torch.nn.ReLU(), torch.nn.Conv2d(C1, C2, 3, bias=False, **conv2), torch.nn.BatchNorm2d(C2, momentum=momentum),
    ).double().train()
    with torch.no_grad():
        for bn in (ref[1], ref[4]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    x64 = torch.randn(N, C0, H, H, dtype=torch.float64, requires_grad=True)
    dev = lambda t: t.detach().float().to(kernel_device)  # noqa: E731
    w1, w2 = dev(ref[0].weight), dev(ref[3].weight)
    g1, b1, g2, b2 = dev(ref[1].weight), dev(ref[1].bias), dev(ref[4].weight), dev(ref[4].bias)
    state = [(dev(bn.running_mean), dev(bn.running_var), bn.num_batches_tracked.clone().to(kernel_device))
             for bn in (ref[1], ref[4])]
    x = dev(x64).contiguous(memory_format=CL)

    for step in range(2):  # two steps: running stats and num_batches_tracked evolve
        if step:
            x64 = (torch.randn(N, C0, H, H, dtype=torch.float64) * 2 + 0.5).requires_grad_(True)
            x = dev(x64).contiguous(memory_format=CL)
        out_ref = ref(x64)
        grad = torch.randn_like(out_ref)
        ref.zero_grad()
        out_ref.backward(grad)

        # ---- forward: conv (stats) -> finalize -> conv (BN+ReLU prologue, stats) -> finalize
        geo1 = ConvGeometry.make(x.shape, w1.shape, **conv1)
        y1, part1 = conv2d_nhwc(x, pack_weight(w1, 1, torch.float32), geo1, stats=True, allow_tf32=False)
        n1 = N * geo1.P * geo1.Q
        mean1, invstd1, sc1, sh1 = bn_finalize(part1.sum, part1.m2, n1, tile_rows=part1.tile_rows,
                                               running_mean=state[0][0], running_var=state[0][1],
                                               num_batches_tracked=state[0][2],
                                               momentum=momentum, eps=1e-5, weight=g1, bias=b1)
        geo2 = ConvGeometry.make(y1.shape, w2.shape, **conv2)
        y2, part2 = conv2d_nhwc(y1, pack_weight(w2, 2, torch.float32), geo2, in_scale=sc1, in_shift=sh1,
                                in_relu=True, stats=True, allow_tf32=False)
        n2 = N * geo2.P * geo2.Q
        mean2, invstd2, sc2, sh2 = bn_finalize(part2.sum, part2.m2, n2, tile_rows=part2.tile_rows,
                                               running_mean=state[1][0], running_var=state[1][1],
                                               num_batches_tracked=state[1][2],
                                               momentum=momentum, eps=1e-5, weight=g2, bias=b2)
        out = y2 * sc2.view(1, -1, 1, 1) + sh2.view(1, -1, 1, 1)
        assert rel_err(out, out_ref) < 1e-4

        # ---- backward
        dz2 = dev(grad).contiguous(memory_format=CL)
        yc2 = y2 - mean2.view(1, -1, 1, 1)
        s_dz2 = dz2.sum((0, 2, 3)).view(1, -1)  # stands in for the next layer's dgrad-epilogue partials
        s_dzy2 = (dz2 * yc2).sum((0, 2, 3)).view(1, -1)
        c1, c2, c3, dg2, db2 = bn_backward_coeffs(s_dz2, s_dzy2, invstd2, n2, weight=g2)
        dy_bn2 = (y2, c1, c2, c3, mean2)
        dz1, dpart1 = conv2d_dgrad_nhwc(dz2, w2, y1.shape, **conv2, y_prev=y1, in_scale=sc1, in_shift=sh1,
                                        in_centre=mean1, dy_bn=dy_bn2, allow_tf32=False)
        dw2 = conv2d_wgrad_nhwc(dz2, y1, w2.shape, **conv2, in_scale=sc1, in_shift=sh1, dy_bn=dy_bn2,
                                allow_tf32=False)
        e1, e2, e3, dg1, db1 = bn_backward_coeffs(dpart1[0], dpart1[1], invstd1, n1, weight=g1)
        dy_bn1 = (y1, e1, e2, e3, mean1)
        dx = conv2d_dgrad_nhwc(dz1, w1, x.shape, **conv1, dy_bn=dy_bn1, allow_tf32=False)
        dw1 = conv2d_wgrad_nhwc(dz1, x, w1.shape, **conv1, dy_bn=dy_bn1, allow_tf32=False)

        for name, got, want in (("dx", dx, x64.grad), ("dW1", dw1, ref[0].weight.grad),
                                ("dW2", dw2, ref[3].weight.grad), ("dgamma1", dg1, ref[1].weight.grad),
                                ("dbeta1", db1, ref[1].bias.grad), ("dgamma2", dg2, ref[4].weight.grad),
                                ("dbeta2", db2, ref[4].bias.grad)):
            assert rel_err(got, want) < 1e-3, name
        for (rm, rv, nbt), bn in zip(state, (ref[1], ref[4])):
            assert rel_err(rm, bn.running_mean) < 1e-5
            assert rel_err(rv, bn.running_var) < 1e-5
            assert int(nbt.cpu()) == int(bn.num_batches_tracked)


# ------------------------------------------------------------------- the op: resnet_fast::conv_bn_stats
def _eager_unit(x, w, sc, sh, conv, eps):
    """float64 autograd reference of the op: prologue, conv, biased batch mean and invstd."""
    a = x if sc is None else torch.relu(x * sc.view(1, -1, 1, 1) + sh.view(1, -1, 1, 1))
    y = torch.nn.functional.conv2d(a, w, None, **conv)
    mean = y.mean((0, 2, 3))
    invstd = torch.rsqrt(y.var((0, 2, 3), unbiased=False) + eps)
    return y, mean, invstd


@pytest.mark.parametrize("prologue", [False, True])
def test_conv_bn_stats_op_gradients_vs_float64(prologue, kernel_device, triton_backend):
    # Random upstream gradients on all three outputs: exercises dy = g_y + c2*(y - mean) + c3 on load, the
    # dReLU epilogue, the pre-scaled dgrad weight and the in_scale/in_shift sums.
    torch.manual_seed(5)
    conv = dict(stride=2, padding=1, dilation=1, groups=2)
    N, C, H, K, eps = 2, 8, 7, 12, 1e-5
    x64 = (torch.randn(N, C, H, H, dtype=torch.float64) + 0.2).requires_grad_(True)
    w64 = (torch.randn(K, C // 2, 3, 3, dtype=torch.float64) * 0.3).requires_grad_(True)
    sc64 = sh64 = cen = None
    if prologue:
        sc64 = torch.empty(C, dtype=torch.float64).uniform_(0.5, 1.5).requires_grad_(True)
        sh64 = torch.empty(C, dtype=torch.float64).uniform_(-0.5, 0.5).requires_grad_(True)
        cen = torch.full((C,), 0.2, device=kernel_device)
    ins64 = [t for t in (x64, w64, sc64, sh64) if t is not None]
    ins = [t.detach().float().to(kernel_device).requires_grad_(True) for t in ins64]
    ref = _eager_unit(x64, w64, sc64, sh64, conv, eps)
    got = conv_bn_stats(ins[0].contiguous(memory_format=CL), ins[1], *(ins[2:] if prologue else (None, None)),
                        cen, eps=eps, **conv)
    for g, r in zip(got, ref):
        assert rel_err(g, r) < 1e-5
    assert got[0].is_contiguous(memory_format=CL) and got[1].dtype == got[2].dtype == torch.float32
    ups = [torch.randn_like(r) for r in ref]
    ups[2] = ups[2] * 0.3
    grads64 = torch.autograd.grad(ref, ins64, ups)
    grads = torch.autograd.grad(got, ins, [u.float().to(kernel_device) for u in ups])
    for name, g, r in zip(("x", "weight", "in_scale", "in_shift"), grads, grads64):
        assert rel_err(g, r) < 1e-4, f"grad {name}: {rel_err(g, r):.2e}"


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(N=st.integers(1, 3), cg=st.integers(1, 5), kg=st.integers(1, 5), groups=st.sampled_from([1, 2]),
       H=st.integers(2, 8), W=st.integers(2, 8), R=st.sampled_from([1, 3]), stride=st.integers(1, 2),
       dilation=st.integers(1, 2), prologue=st.booleans(), seed=st.integers(0, 99))
def test_conv_bn_stats_random_shapes(N, cg, kg, groups, H, W, R, stride, dilation, prologue, seed, kernel_device,
                                     triton_backend):
    # The training op's forward and every gradient on random geometry (partial tiles, several stride phases,
    # groups, one-pixel outputs), upstream gradients on all three outputs.
    C, K, pad = cg * groups, kg * groups, dilation * (R // 2)
    conv = dict(stride=stride, padding=pad, dilation=dilation, groups=groups)
    P, Q = (H - 1) // stride + 1, (W - 1) // stride + 1
    assume(N * P * Q > 1)
    gen = torch.Generator().manual_seed(seed)
    x64 = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64)
    w64 = (torch.randn(K, cg, R, R, generator=gen, dtype=torch.float64) * 0.5).requires_grad_(True)
    sc64 = sh64 = None
    if prologue:
        sc64 = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).requires_grad_(True)
        sh64 = (torch.randn(C, generator=gen, dtype=torch.float64) * 0.3).requires_grad_(True)
        pre = x64 * sc64.detach().view(1, -1, 1, 1) + sh64.detach().view(1, -1, 1, 1)
        x64 = torch.where(pre.abs() < 0.05, x64 + 0.2 / sc64.detach().view(1, -1, 1, 1), x64)  # off the ReLU kink
    x64.requires_grad_(True)
    ins64 = [t for t in (x64, w64, sc64, sh64) if t is not None]
    ins = [t.detach().float().to(kernel_device).requires_grad_(True) for t in ins64]
    ref = _eager_unit(x64, w64, sc64, sh64, conv, 1e-5)
    got = conv_bn_stats(ins[0], ins[1], *(ins[2:] if prologue else (None, None)), eps=1e-5, **conv)
    for g, r, name in zip(got, ref, ("y", "mean", "invstd")):
        assert rel_err(g, r) < 1e-4, f"{name}: {rel_err(g, r):.2e}"
    ups = [torch.randn(r.shape, generator=gen, dtype=torch.float64) for r in ref]
    grads64 = torch.autograd.grad(ref, ins64, ups)
    grads = torch.autograd.grad(got, ins, [u.float().to(kernel_device) for u in ups])
    for name, g, r in zip(("x", "weight", "in_scale", "in_shift"), grads, grads64):
        assert rel_err(g, r) < 1e-3, f"grad {name}: {rel_err(g, r):.2e}"


def test_conv_bn_stats_zero_scale_channel_is_exact(kernel_device, triton_backend):
    # A prologue channel with in_scale exactly 0 (BN gamma 0, as zero_init_residual makes): grad_x is 0 there,
    # and its in_scale/in_shift gradients are still Σdz·x and Σdz (dgrad scales its output, not the weight).
    torch.manual_seed(6)
    x64 = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    w64 = torch.randn(4, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    sc64 = torch.tensor([1.0, 0.0, 0.7, 1.2], dtype=torch.float64, requires_grad=True)
    sh64 = torch.tensor([0.1, 0.3, -0.2, 0.0], dtype=torch.float64, requires_grad=True)
    ins = [t.detach().float().to(kernel_device).requires_grad_(True) for t in (x64, w64, sc64, sh64)]
    conv = dict(stride=1, padding=1, dilation=1, groups=1)
    ref = _eager_unit(x64, w64, sc64, sh64, conv, 1e-5)[0]
    got = conv_bn_stats(ins[0], ins[1], ins[2], ins[3], padding=1)[0]
    up = torch.randn_like(ref)
    gx64, gsc64, gsh64 = torch.autograd.grad(ref, (x64, sc64, sh64), up)
    gx, gsc, gsh = torch.autograd.grad(got, (ins[0], ins[2], ins[3]), up.float().to(kernel_device))
    assert rel_err(gx, gx64) < 1e-4 and float(gx[:, 1].abs().max()) == 0.0
    assert rel_err(gsc, gsc64) < 1e-4 and rel_err(gsh, gsh64) < 1e-4
    assert float(gsh64[1]) != 0.0  # the zero-scale channel's gradients are really exercised


def test_conv_bn_stats_bad_input(triton_backend):
    x = torch.randn(2, 4, 6, 6)
    w = torch.randn(8, 4, 3, 3)
    with pytest.raises(ValueError, match="in_scale and in_shift"):
        conv_bn_stats(x, w, torch.ones(4), None)
    with pytest.raises(ValueError, match=r"in_scale must be a float32 \[4\]"):
        conv_bn_stats(x, w, torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        conv_bn_stats(torch.randn(1, 4, 1, 1), w, padding=1, stride=2)
    with pytest.raises(ValueError, match="float64 has no kernel"):
        conv_bn_stats(x.double(), w.double())
    with pytest.raises(ValueError, match="dtype"):
        conv_bn_stats(x, w.half())
    with pytest.raises(ValueError, match="eps"):
        conv_bn_stats(x, w, eps=0.0)


def test_conv_bn_stats_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(2, 4, 8, 8).contiguous(memory_format=CL)
        y, mean, invstd = torch.ops.resnet_fast.conv_bn_stats(x, torch.empty(8, 2, 3, 3), torch.empty(4),
                                                             torch.empty(4), None, [2, 2], [1, 1], [1, 1], 2, 1e-5)
        assert y.shape == (2, 8, 4, 4) and y.is_contiguous(memory_format=CL) and mean.shape == invstd.shape == (8,)
