"""Fused conv forward (resnet_fast.ops.conv2d / kernels.conv_fwd) against float64 references.

On CPU the Triton kernel runs in the interpreter (tiny shapes, fp32 and fp16; bf16 only on GPU, where the
interpreter's bf16 dot is unreliable). Every comparison is a relative error norm ||out - ref|| / ||ref||
against F.conv2d in float64 composed with the float64 epilogue.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
import triton
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import resnet_fast
from resnet_fast.kernels import autotune, conv_fwd, tuning_table
from resnet_fast.kernels import configs as cfgs
from resnet_fast.kernels.bn_finalize import bn_finalize
from resnet_fast.kernels.configs import ConvConfig
from resnet_fast.kernels.conv_common import ConvGeometry
from resnet_fast.ops import conv2d, fold_bn
from helpers import rel_err

TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
# Pinned in the interpreter: several row and column tiles even on tiny shapes, GROUP_M swizzle of 2.
SMALL = ConvConfig(32, 16, 16, 2, 4, 1)


def reference(x, w, bias=None, stride=1, padding=0, dilation=1, groups=1, scale=None, shift=None,
              residual=None, relu=False, in_scale=None, in_shift=None, in_relu=False) -> torch.Tensor:
    """float64 ``act((conv(pro(x), w) + bias)*scale + shift + residual)``; pro = the input prologue."""
    d = lambda t: None if t is None else t.double()  # noqa: E731
    x = x.double()
    if in_scale is not None:
        x = x * d(in_scale).view(1, -1, 1, 1) + d(in_shift).view(1, -1, 1, 1)
        if in_relu:
            x = torch.relu(x)
    y = F.conv2d(x, w.double(), d(bias), stride, padding, dilation, groups)
    v = (1, -1, 1, 1)
    if scale is not None:
        y = y * d(scale).view(v)
    if shift is not None:
        y = y + d(shift).view(v)
    if residual is not None:
        y = y + residual.double()
    return torch.relu(y) if relu else y


def make(N, C, H, W, K, R, S, groups, dtype, device, seed=0, **terms):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = rnd(N, C, H, W).to(device, dtype)
    w = (rnd(K, C // groups, R, S) / (C // groups * R * S) ** 0.5).to(device, dtype)
    vec = lambda: rnd(K).to(device)  # noqa: E731
    kw = {}
    if terms.get("bias"):
        kw["bias"] = vec()
    if terms.get("scale"):
        kw["scale"] = vec().abs() + 0.5
    if terms.get("shift"):
        kw["shift"] = vec()
    if terms.get("relu"):
        kw["relu"] = True
    return x, w, kw


@pytest.fixture
def small_config():
    with conv_fwd.pinned_config(SMALL):
        yield SMALL


# (N, C, H, W, K, R, stride, padding, dilation, groups)
FAMILIES = {
    "stem7x7s2_C3": (1, 3, 9, 9, 8, 7, 2, 3, 1, 1),
    "3x3s1": (1, 16, 6, 7, 24, 3, 1, 1, 1, 1),
    "3x3s2_oddC": (2, 20, 7, 5, 12, 3, 2, 1, 1, 1),
    "1x1s1_pointwise": (2, 24, 5, 3, 20, 1, 1, 0, 1, 1),
    "1x1s2": (1, 16, 7, 7, 8, 1, 2, 0, 1, 1),
    "dil2": (1, 8, 8, 9, 8, 3, 1, 2, 2, 1),
    "dil4": (1, 8, 9, 9, 16, 3, 1, 4, 4, 1),
    "groups_4_per_group": (2, 16, 5, 6, 16, 3, 1, 1, 1, 4),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_shape_families_full_epilogue(family, dtype, kernel_device, triton_backend, small_config):
    if dtype == torch.float16 and family in ("3x3s1", "1x1s2", "dil2"):
        pytest.skip("fp16 runs on a subset to keep the interpreter budget")
    N, C, H, W, K, R, s, p, d, gr = FAMILIES[family]
    x, w, kw = make(N, C, H, W, K, R, R, gr, dtype, kernel_device, bias=True, scale=True, shift=True, relu=True)
    geo = ConvGeometry.make(x.shape, w.shape, s, p, d, gr)
    res = torch.randn(N, K, geo.P, geo.Q).to(kernel_device, dtype).contiguous(memory_format=torch.channels_last)
    bias = kw.pop("bias")
    y = conv2d(x, w, bias, s, p, d, gr, residual=res, **kw)
    ref = reference(x, w, bias, s, p, d, gr, residual=res, **kw)
    assert y.shape == ref.shape and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(y, ref) < TOL[dtype]
    assert resnet_fast.stats()["kernel_calls"].get("conv2d") == 1
    assert not resnet_fast.stats()["fallbacks"]


@pytest.mark.parametrize("term", ["none", "bias", "scale", "shift", "residual", "relu"])
def test_each_epilogue_term_alone(term, kernel_device, triton_backend):
    x, w, kw = make(2, 6, 4, 5, 10, 3, 3, 1, torch.float32, kernel_device, **{term: True})
    if term == "residual":
        kw["residual"] = torch.randn(2, 10, 4, 5).to(kernel_device)  # NCHW residual: converted once
    y = conv2d(x, w, padding=1, **kw)
    ref = reference(x, w, padding=1, **kw)
    assert rel_err(y, ref) < TOL[torch.float32]
    if term != "none":  # the term must matter: without it the result differs
        plain = reference(x, w, padding=1)
        assert rel_err(y, plain) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("geom,pp", [((2, 12, 6, 6, 20, 3, 1, 1, 1), False), ((2, 12, 6, 6, 20, 3, 1, 1, 1), True),
                                     ((1, 3, 7, 7, 8, 7, 2, 3, 1), False), ((1, 3, 7, 7, 8, 7, 2, 3, 1), True),
                                     ((2, 12, 5, 3, 20, 1, 1, 0, 1), False)],
                         ids=["3x3_padded", "3x3_padded_prologue_pass", "stem", "stem_prologue_pass",
                              "1x1_row_and_channel_tails"])  # pointwise: no mask after the prologue
def test_prologue_and_stats(geom, pp, dtype, kernel_device, small_config, monkeypatch):
    # pp: the prologue as its own pass (the C++ bn_relu) before the GEMM, which then runs without it
    N, C, H, W, K, R, s, p, gr = geom
    x, w, _ = make(N, C, H, W, K, R, R, gr, dtype, kernel_device, seed=3)
    in_scale = (torch.rand(C) + 0.5).to(kernel_device)
    in_shift = (torch.rand(C) + 0.5).to(kernel_device)  # > 0: relu(shift) would leak into the zero padding
    geo = ConvGeometry.make(x.shape, w.shape, s, p, 1, gr)
    xc = x.contiguous(memory_format=torch.channels_last)
    passes = []
    real_apply = conv_fwd._pass.apply
    monkeypatch.setattr(conv_fwd._pass, "apply", lambda *a: passes.append(1) or real_apply(*a))
    cfg = dataclasses.replace(SMALL, prologue_pass=pp)
    y, part = conv_fwd.conv2d_nhwc(xc, conv_fwd.pack_weight(w, gr, dtype), geo, in_scale=in_scale,
                                   in_shift=in_shift, in_relu=True, stats=True, config=cfg)
    assert len(passes) == pp
    ref = reference(x, w, None, s, p, 1, gr, in_scale=in_scale, in_shift=in_shift, in_relu=True)
    assert rel_err(y, ref) < TOL[dtype]
    # partials: per tile of SMALL.BLOCK_M GEMM rows, Σy and Σ(y - tile mean)² of the stored (rounded) output
    tiles = -(-geo.M // SMALL.BLOCK_M)
    assert part.tile_rows == SMALL.BLOCK_M
    for t in (part.sum, part.m2):
        assert t.shape == (tiles, K) and t.dtype == torch.float32
    per_tile = y.permute(0, 2, 3, 1).reshape(geo.M, K).double().split(SMALL.BLOCK_M)  # last one shorter
    assert rel_err(part.sum, torch.stack([t.sum(0) for t in per_tile])) < 1e-5
    assert rel_err(part.m2, torch.stack([((t - t.mean(0)) ** 2).sum(0) for t in per_tile])) < 1e-5
    # and the prologue without ReLU, without stats
    y2, none = conv_fwd.conv2d_nhwc(xc, conv_fwd.pack_weight(w, gr, dtype), geo, in_scale=in_scale,
                                    in_shift=-in_shift, config=cfg)
    assert none is None
    assert rel_err(y2, reference(x, w, None, s, p, 1, gr, in_scale=in_scale, in_shift=-in_shift)) < TOL[dtype]


def test_prologue_pass_offered_where_it_may_pay(monkeypatch):
    """A prologue on a 3×3 stride-1 conv: every large tile gets a prologue-pass twin and the untuned default is one
    (the cost report's estimate); stride 2, a 1×1 conv or no prologue: none; a pass config where it is not
    offered is a ValueError."""
    seen = {}

    def choose(op, g, dtype, device, candidates, switches, launch, default):
        seen.update(cands=list(candidates), default=default)
        return default
    monkeypatch.setattr(conv_fwd._tune, "choose", choose)
    monkeypatch.setattr(conv_fwd, "_launch_fwd", lambda *a, **k: None)  # the choice only
    monkeypatch.setattr(conv_fwd._pass, "apply", lambda x, *a: x)
    sc = torch.ones(16)
    for (R, stride, prologue), offered in (((3, 1, True), True), ((3, 2, True), False), ((1, 1, True), False),
                                           ((3, 1, False), False)):
        x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
        w = torch.randn(32, 16, R, R)
        geo = ConvGeometry.make(x.shape, w.shape, stride, R // 2)
        kw = dict(in_scale=sc, in_shift=sc) if prologue else {}
        conv_fwd.conv2d_nhwc(x, conv_fwd.pack_weight(w, 1, torch.float32), geo, **kw)
        assert seen["default"].prologue_pass == offered
        twins = [c for c in seen["cands"] if c.prologue_pass]
        assert bool(twins) == offered and all(dataclasses.replace(c, prologue_pass=False) in seen["cands"]
                                              for c in twins)
        if not offered:
            with pytest.raises(ValueError, match="prologue as a pass"):
                conv_fwd.conv2d_nhwc(x, conv_fwd.pack_weight(w, 1, torch.float32), geo, **kw,
                                     config=dataclasses.replace(SMALL, prologue_pass=True))


def test_stats_partials_feed_bn_finalize(kernel_device, small_config):
    """The partials layout is the one bn_finalize consumes: batch mean/var of the conv output."""
    x, w, _ = make(2, 8, 5, 5, 12, 1, 1, 1, torch.float32, kernel_device, seed=5)
    geo = ConvGeometry.make(x.shape, w.shape)
    y, part = conv_fwd.conv2d_nhwc(x.contiguous(memory_format=torch.channels_last),
                                   conv_fwd.pack_weight(w, 1, torch.float32), geo, stats=True)
    mean, invstd, _, _ = bn_finalize(part.sum, part.m2, geo.M, tile_rows=part.tile_rows, eps=1e-5)
    yd = y.double()
    assert rel_err(mean, yd.mean((0, 2, 3))) < 1e-5
    assert rel_err(invstd, (yd.var((0, 2, 3), unbiased=False) + 1e-5).rsqrt()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_stats_of_a_large_mean_channel(dtype, kernel_device, small_config):
    """Channels whose output mean is ~1e3 standard deviations from 0 (a positive input through positive
    weights): the tile-centred partials keep invstd to ~1e-5, where Σy² partials lose eps·(mean/std)² ~ 1."""
    torch.manual_seed(0)
    N, C, H, W, K = 2, 16, 6, 7, 8
    x = (1.0 + 1e-3 * torch.randn(N, C, H, W)).to(kernel_device, dtype)
    w = (0.1 + 0.01 * torch.rand(K, C, 3, 3)).to(kernel_device, dtype)
    geo = ConvGeometry.make(x.shape, w.shape, padding=0)  # no padding: every output sees 144 inputs
    y, part = conv_fwd.conv2d_nhwc(x.contiguous(memory_format=torch.channels_last),
                                   conv_fwd.pack_weight(w, 1, dtype), geo, stats=True)
    yd = y.double()
    mean64, var64 = yd.mean((0, 2, 3)), yd.var((0, 2, 3), unbiased=False)
    assert (mean64.abs() / var64.sqrt()).min() > 300  # the regime the test is about
    mean, invstd, _, _ = bn_finalize(part.sum, part.m2, geo.M, tile_rows=part.tile_rows, eps=1e-12)
    assert rel_err(mean, mean64) < 1e-6
    assert rel_err(invstd, (var64 + 1e-12).rsqrt()) < 1e-4


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(N=st.integers(1, 2), cg=st.integers(1, 6), kg=st.integers(1, 6), groups=st.sampled_from([1, 2, 3]),
       H=st.integers(1, 8), W=st.integers(1, 8), R=st.sampled_from([1, 2, 3]), S=st.sampled_from([1, 3]),
       stride=st.integers(1, 3), padding=st.integers(0, 2), dilation=st.integers(1, 2), seed=st.integers(0, 99))
def test_random_shapes(N, cg, kg, groups, H, W, R, S, stride, padding, dilation, seed, kernel_device,
                       triton_backend):
    C, K = cg * groups, kg * groups
    assume((H + 2 * padding - dilation * (R - 1) - 1) >= 0 and (W + 2 * padding - dilation * (S - 1) - 1) >= 0)
    x, w, kw = make(N, C, H, W, K, R, S, groups, torch.float32, kernel_device, seed=seed, shift=True, relu=True)
    y = conv2d(x, w, None, stride, padding, dilation, groups, **kw)
    assert rel_err(y, reference(x, w, None, stride, padding, dilation, groups, **kw)) < TOL[torch.float32]


def test_every_output_element_written(kernel_device, small_config):
    """NaN-poisoned output buffer: every element is overwritten, none beyond the output is touched."""
    x, w, kw = make(2, 5, 9, 7, 40, 3, 3, 1, torch.float32, kernel_device, seed=7, bias=True)
    geo = ConvGeometry.make(x.shape, w.shape, 2, 1)
    big = torch.full((geo.N * geo.P * geo.Q * geo.K + 64,), float("nan"), device=kernel_device)
    out = big[:-64].view(geo.N, geo.P, geo.Q, geo.K).permute(0, 3, 1, 2)
    y, _ = conv_fwd.conv2d_nhwc(x.contiguous(memory_format=torch.channels_last),
                                conv_fwd.pack_weight(w, 1, torch.float32), geo, out=out, **kw)
    assert y.data_ptr() == out.data_ptr()
    assert not torch.isnan(y).any()
    assert torch.isnan(big[-64:]).all()
    assert rel_err(y, reference(x, w, kw["bias"], 2, 1)) < TOL[torch.float32]


SMALL_TMA = ConvConfig(32, 16, 16, 2, 4, 1, tma=True)


@pytest.fixture
def tma_device(kernel_device) -> str:
    """kernel_device where TMA descriptors are allowed (the interpreter, sm_90+ with triton >= 3.4)."""
    if not cfgs.tma_allowed(torch.device(kernel_device)):
        pytest.skip("no TMA descriptors here (GPU older than sm_90, Triton < 3.4, or RESNET_FAST_TMA=0)")
    return kernel_device


def check_pointwise(shape, cfg: ConvConfig, dtype, fused: bool, device: str, seed: int):
    """Run ``cfg`` pinned on a pointwise conv ``shape = (N, C, H, W, K)`` into a NaN-poisoned output, with the full
    inference epilogue or the training prologue + residual + stats, against float64: every output element, and
    with stats every tile's Σy and M2. TMA pairs with tensor-core dots only, so fp32 runs as tf32 there (the
    interpreter computes it exactly)."""
    N, C, H, W, K = shape
    x, w, kw = make(N, C, H, W, K, 1, 1, 1, dtype, device, seed=seed, bias=not fused, scale=not fused,
                    shift=not fused, relu=not fused)
    xc = x.contiguous(memory_format=torch.channels_last)
    geo = ConvGeometry.make(x.shape, w.shape)
    wp = conv_fwd.pack_weight(w, 1, dtype)
    assert not cfg.tma or conv_fwd.tma_eligible(xc, wp, geo, dot_ieee=False)
    out = torch.empty((N, K, H, W), dtype=dtype, device=device, memory_format=torch.channels_last).fill_(float("nan"))
    if fused:
        isc, ish = (torch.rand(C) + 0.5).to(device), (torch.rand(C) - 0.3).to(device)
        res = torch.randn(N, K, H, W).to(device, dtype).contiguous(memory_format=torch.channels_last)
        y, part = conv_fwd.conv2d_nhwc(xc, wp, geo, in_scale=isc, in_shift=ish, in_relu=True, residual=res,
                                       stats=True, allow_tf32=cfg.tma, config=cfg, out=out)
        ref = reference(x, w, in_scale=isc, in_shift=ish, in_relu=True, residual=res)
        rows = y.permute(0, 2, 3, 1).reshape(geo.M, K).double().split(cfg.BLOCK_M)
        assert rel_err(part.sum, torch.stack([t.sum(0) for t in rows])) < 1e-5
        assert rel_err(part.m2, torch.stack([((t - t.mean(0)) ** 2).sum(0) for t in rows])) < 1e-5
    else:
        bias = kw.pop("bias")
        y, _ = conv_fwd.conv2d_nhwc(xc, wp, geo, bias=bias, allow_tf32=cfg.tma, config=cfg, out=out, **kw)
        ref = reference(x, w, bias, **kw)
    assert not torch.isnan(y).any()
    tol = 5e-3 if cfg.tma and dtype == torch.float32 and device == "cuda" else TOL[dtype]
    assert rel_err(y, ref) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("fused", [False, True], ids=["inference", "training"])
def test_tma_pointwise_path(dtype, fused, tma_device):
    """The TMA variant on a pointwise conv whose M, C and K are not tile multiples (TMA's zero fill must stand
    in for the load masks): M = 30 rows, a partial 32-row tile; C = 24, a partial 16-channel step."""
    check_pointwise((2, 24, 5, 3, 20), SMALL_TMA, dtype, fused, tma_device, seed=11)


def test_tma_eligibility(tma_device, monkeypatch):
    """TMA only where its constraints hold; a pinned TMA config elsewhere is a clear error, not garbage."""
    def case(C=24, R=1, groups=1, dtype=torch.float16, offset=0, dot_ieee=False):
        x = torch.randn(2 * C * 15 + offset, dtype=dtype, device=tma_device)[offset:]
        x = x.view(2, 5, 3, C).permute(0, 3, 1, 2)  # channels_last [2, C, 5, 3]
        w = torch.randn(16, C // groups, R, R, dtype=dtype, device=tma_device)
        geo = ConvGeometry.make(x.shape, w.shape, padding=R // 2, groups=groups)
        return x, conv_fwd.pack_weight(w, groups, dtype), geo, dot_ieee
    assert conv_fwd.tma_eligible(*case())
    assert conv_fwd.tma_eligible(*case(C=20, dtype=torch.float32))  # 80-byte rows
    assert not conv_fwd.tma_eligible(*case(R=3))  # not pointwise
    assert not conv_fwd.tma_eligible(*case(groups=2))
    assert not conv_fwd.tma_eligible(*case(C=12))  # 24-byte rows: TMA strides are multiples of 16 bytes
    assert not conv_fwd.tma_eligible(*case(offset=4))  # base 8 bytes past an aligned address
    assert not conv_fwd.tma_eligible(*case(dtype=torch.float32, dot_ieee=True))
    monkeypatch.setenv("RESNET_FAST_TMA", "0")
    assert not conv_fwd.tma_eligible(*case())
    monkeypatch.delenv("RESNET_FAST_TMA")
    x, wp, geo, _ = case(R=3)
    with pytest.raises(ValueError, match="uses TMA"):
        conv_fwd.conv2d_nhwc(x, wp, geo, config=SMALL_TMA)


def test_tma_twins_are_tuning_candidates_never_the_default(monkeypatch, tma_device):
    """Eligible launches offer the autotuner TMA twins of the large tiles and key them apart; the untuned
    default stays the pointer path (TMA has to win a measurement); ineligible launches offer none."""
    seen = []

    def spy(op, geometry, dtype, device, candidates, flags, launch, default):
        seen.append((candidates, flags, default))
        return cfgs.INTERPRETER_CONFIG
    monkeypatch.setattr(autotune, "choose", spy)
    for R in (1, 3):
        x, w, _ = make(4, 64, 6, 6, 128, R, R, 1, torch.float16, tma_device)  # wide enough for 128x128 tiles
        geo = ConvGeometry.make(x.shape, w.shape, padding=R // 2)
        conv_fwd.conv2d_nhwc(x.contiguous(memory_format=torch.channels_last),
                             conv_fwd.pack_weight(w, 1, torch.float16), geo)
    (pw, pw_flags, pw_default), (c3, c3_flags, _) = seen
    twins = [c for c in pw if c.tma and not c.persistent]  # (persistent twins: their own test)
    assert twins and all(c.BLOCK_M * c.BLOCK_N >= 128 * 128 for c in twins)
    assert all(dataclasses.replace(c, tma=False) in pw for c in twins)
    assert not pw_default.tma and not any(c.tma for c in c3)
    assert pw_flags.tma is True and c3_flags.tma is False  # TMA-eligible launches tune under their own keys


def test_prologue_in_the_loop_defaults_to_the_widest_output_tile(monkeypatch):
    """With the BN prologue in the K-loop, each formed x element feeds BLOCK_N output channels: the untuned
    default is the 128×256 tile where the output channels offer it (not where the prologue runs as its own pass,
    nor without a prologue, nor where fewer than 256 channels prune it)."""
    seen = []

    def spy(op, geometry, dtype, device, candidates, flags, launch, default):
        seen.append(default)
        return cfgs.INTERPRETER_CONFIG
    monkeypatch.setattr(autotune, "choose", spy)
    monkeypatch.setattr(conv_fwd._pass, "available", lambda: True)
    for R, stride, K, pro in ((1, 1, 256, True), (1, 1, 256, False), (3, 2, 256, True), (3, 1, 256, True),
                              (1, 1, 128, True)):
        x, w, _ = make(2, 64, 16, 16, K, R, R, 1, torch.float16, "cpu")  # M >= 128 at stride 2
        geo = ConvGeometry.make(x.shape, w.shape, stride=stride, padding=R // 2)
        vec = torch.rand(64) if pro else None
        conv_fwd.conv2d_nhwc(x.contiguous(memory_format=torch.channels_last),
                             conv_fwd.pack_weight(w, 1, torch.float16), geo, in_scale=vec, in_shift=vec)
    one, plain, stride2, pass_, narrow = seen
    assert (one.BLOCK_M, one.BLOCK_N) == (stride2.BLOCK_M, stride2.BLOCK_N) == (128, 256)
    assert plain.BLOCK_N < 256 and pass_.prologue_pass and pass_.BLOCK_N < 256 and narrow.BLOCK_N <= 128


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_every_tma_twin_is_compile_checked(dtype):
    """Autotuning may pick any TMA twin on the GPU: each must be a spec the sm_90 compile check covers (fp16
    shares bf16's tiles and code shape)."""
    checked = {(cx["BLOCK_M"], cx["BLOCK_N"], cx["BLOCK_K"], opts["num_warps"], opts["num_stages"], sig["x_ptr"])
               for _, sig, cx, opts, *_ in conv_fwd.compile_specs() if cx["TMA"]}
    ptr = "*bf16" if dtype == torch.bfloat16 else "*fp32"
    twins = conv_fwd._tma_variants(cfgs.fwd_configs(dtype))
    assert twins
    assert {(c.BLOCK_M, c.BLOCK_N, c.BLOCK_K, c.num_warps, c.num_stages, ptr) for c in twins} <= checked


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("tma", [False, True], ids=["gather", "tma"])
@pytest.mark.parametrize("fused", [False, True], ids=["inference", "training"])
def test_persistent_pointwise_path(dtype, tma, fused, kernel_device):
    """The persistent variant: 3 programs in the interpreter walk 12 tiles (4 row tiles, the last partial, × 3
    column tiles, the last partial), so each program runs 4 tiles through one flattened loop."""
    if tma and not cfgs.tma_allowed(torch.device(kernel_device)):
        pytest.skip("no TMA descriptors here")
    N, C, H, W, K = 2, 40, 6, 5, 40  # M = 60 rows: 16-row tiles 16, 16, 16, 12; K = 40: 16, 16, 8 channels
    assert triton.cdiv(N * H * W, 16) * triton.cdiv(K, 16) == 12
    assert cfgs.persistent_programs(torch.device(kernel_device), 12) == (12 if kernel_device == "cuda" else 3)
    check_pointwise((N, C, H, W, K), ConvConfig(16, 16, 16, 2, 4, 2, tma=tma, persistent=True), dtype, fused,
                    kernel_device, seed=5)


def test_persistent_twins_are_tuning_candidates_on_pointwise_convs_only(monkeypatch):
    """Persistent twins of the 16-bit 128×128 tiles (of their TMA twins where offered) on pointwise convs, never
    the default; none on a filter of more taps, none for fp32; a pinned persistent config elsewhere is an error."""
    seen = []

    def spy(op, geometry, dtype, device, candidates, flags, launch, default):
        seen.append((candidates, default))
        return cfgs.INTERPRETER_CONFIG
    monkeypatch.setattr(autotune, "choose", spy)
    for R, dtype in ((1, torch.float16), (3, torch.float16), (1, torch.float32)):
        x, w, _ = make(4, 64, 6, 6, 128, R, R, 1, dtype, "cpu")
        geo = ConvGeometry.make(x.shape, w.shape, padding=R // 2)
        conv_fwd.conv2d_nhwc(x.contiguous(memory_format=torch.channels_last), conv_fwd.pack_weight(w, 1, dtype), geo)
    (pw, pw_default), (c3, _), (fp32, _) = seen
    twins = [c for c in pw if c.persistent]
    assert {(c.BLOCK_M, c.BLOCK_N, c.num_warps) for c in twins} == {(128, 128, 8)}
    assert {c.tma for c in twins} == {cfgs.tma_allowed(torch.device("cpu"))}  # the TMA twin's, where offered
    assert all(dataclasses.replace(c, persistent=False) in pw for c in twins)
    assert not pw_default.persistent and not any(c.persistent for c in c3 + fp32)
    x, w, _ = make(1, 16, 5, 5, 16, 3, 3, 1, torch.float16, "cpu")
    geo = ConvGeometry.make(x.shape, w.shape, padding=1)
    with pytest.raises(ValueError, match="is persistent, which needs a pointwise conv"):
        conv_fwd.conv2d_nhwc(x.contiguous(memory_format=torch.channels_last), conv_fwd.pack_weight(w, 1, torch.float16),
                             geo, config=ConvConfig(16, 16, 16, 2, 4, 2, persistent=True))


def test_every_persistent_twin_is_compile_checked():
    """Autotuning may pick any persistent twin on the GPU, plain or fused, gather or TMA: each is a compile-checked
    spec (fp16 shares bf16's tiles and code shape)."""
    checked = {(cx["BLOCK_M"], cx["BLOCK_N"], cx["BLOCK_K"], opts["num_warps"], opts["num_stages"], cx["TMA"],
                cx["STATS"]) for _, sig, cx, opts, *_ in conv_fwd.compile_specs() if cx["PERSISTENT"]}
    bf16 = cfgs.fwd_configs(torch.bfloat16)
    twins = conv_fwd._persistent_twins(list(bf16) + conv_fwd._tma_variants(bf16), torch.bfloat16)
    assert {c.tma for c in twins} == {False, True}
    assert {(c.BLOCK_M, c.BLOCK_N, c.BLOCK_K, c.num_warps, c.num_stages, c.tma, fused) for c in twins
            for fused in (False, True)} <= checked


def test_nchw_and_channels_last_inputs_agree(kernel_device, triton_backend):
    x, w, _ = make(2, 7, 6, 5, 9, 3, 3, 1, torch.float32, kernel_device, seed=9)
    x_before = x.clone()
    y_nchw = conv2d(x, w, stride=2, padding=1)
    y_cl = conv2d(x.contiguous(memory_format=torch.channels_last), w, stride=2, padding=1)
    assert torch.equal(x, x_before)  # input not mutated
    assert y_nchw.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y_nchw, y_cl)
    assert rel_err(y_nchw, reference(x, w, None, 2, 1)) < TOL[torch.float32]


@pytest.mark.parametrize("affine", [True, False])
def test_fold_bn_matches_eval_batchnorm(affine, kernel_device, triton_backend):
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(6, eps=1e-3, affine=affine).eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    if affine:
        bn.weight.data.normal_()
        bn.bias.data.normal_()
    scale, shift = fold_bn(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    assert scale.dtype == shift.dtype == torch.float32 and scale.shape == (6,)
    z = torch.randn(3, 6, 4, 4)
    ref = bn.double()(z.double())
    assert rel_err(z * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), ref) < 1e-6
    # fused into the conv (kernel path) against conv -> eval BN in float64
    x, w, _ = make(1, 4, 5, 5, 6, 3, 3, 1, torch.float32, kernel_device)
    y = conv2d(x, w, padding=1, scale=scale.to(kernel_device), shift=shift.to(kernel_device), relu=True)
    assert rel_err(y, torch.relu(bn(F.conv2d(x.double(), w.double(), padding=1)))) < TOL[torch.float32]


def test_fallbacks_are_counted_and_correct(kernel_device, triton_backend, monkeypatch):
    x, w, kw = make(1, 4, 5, 5, 6, 3, 3, 1, torch.float64, kernel_device, shift=True)
    y = conv2d(x, w, padding=1, **kw)  # float64: no kernel, an explicit counted fallback
    assert y.dtype == torch.float64 and y.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(y, reference(x, w, padding=1, **kw)) < 1e-12
    st_ = resnet_fast.stats()
    assert sum(st_["fallbacks"]["conv2d"].values()) == 1 and "conv2d" not in st_["kernel_calls"]
    if kernel_device == "cpu":  # interpreter: bf16 dots are wrong there, so bf16 is an explicit fallback
        xb, wb = x.bfloat16(), w.bfloat16()
        yb = conv2d(xb, wb, padding=1, **kw)
        assert rel_err(yb, reference(xb, wb, padding=1, **kw)) < TOL[torch.bfloat16]
        assert sum(resnet_fast.stats()["fallbacks"]["conv2d"].values()) == 2
        with pytest.raises(RuntimeError, match="interpreter"):
            conv_fwd.conv2d_nhwc(xb.contiguous(memory_format=torch.channels_last),
                                 conv_fwd.pack_weight(wb, 1, torch.bfloat16),
                                 ConvGeometry.make(xb.shape, wb.shape, 1, 1))
    monkeypatch.setenv("RESNET_FAST_BACKEND", "eager")
    x32, w32 = x.float(), w.float()
    y_eager = conv2d(x32, w32, padding=1, **kw)
    assert rel_err(y_eager, reference(x32, w32, padding=1, **kw)) < 1e-6
    assert "conv2d" not in resnet_fast.stats()["kernel_calls"]


def test_weight_pack_cache_never_stale(kernel_device, triton_backend):
    x, w, _ = make(1, 20, 4, 4, 5, 3, 3, 1, torch.float32, kernel_device)
    p1 = conv_fwd.pack_weight(w, 1, torch.float32)
    assert conv_fwd.pack_weight(w, 1, torch.float32) is p1  # cached
    assert p1.shape == (256, 3, 3, 32) and torch.all(p1[..., 20:] == 0) and torch.all(p1[5:] == 0)  # K_pad rows
    assert torch.equal(p1[:5, ..., :20], w.permute(0, 2, 3, 1))
    conv2d(x, w, padding=1)
    with torch.no_grad():
        w.mul_(-2.0)  # in place: bumps _version
    assert conv_fwd.pack_weight(w, 1, torch.float32) is not p1
    y = conv2d(x, w, padding=1)
    assert rel_err(y, reference(x, w, padding=1)) < TOL[torch.float32]


@pytest.mark.parametrize("C,S", [(3, 7), (1, 5), (8, 3)])
def test_dense_taps_weight_layout(C, S):
    """Few channels, groups 1: ``[K, R, taps_k]``, column ``s*pack_c + c``, zeros past C and past S taps."""
    w = torch.randn(6, C, 2, S)
    g = ConvGeometry.make((1, C, 9, 9), w.shape)
    p = conv_fwd.pack_weight(w, 1, torch.float32)
    assert g.pack_c and p.shape == g.packed_weight_shape == (256, 2, g.taps_k)
    want = torch.zeros(256, 2, g.taps_k)
    for s in range(S):
        want[:6, :, s * g.pack_c:s * g.pack_c + C] = w[:, :, :, s].permute(0, 2, 1)
    assert torch.equal(p, want)


def test_custom_op_fake_and_compile(kernel_device, triton_backend):
    x, w, kw = make(1, 4, 5, 5, 6, 3, 3, 1, torch.float32, kernel_device, scale=True, relu=True)
    op = torch.ops.resnet_fast.conv2d.default
    torch.library.opcheck(op, (x, w, None, [1, 1], [1, 1], [1, 1], 1, kw["scale"], None, None, True),
                          test_utils=("test_schema", "test_faketensor"))
    fn = torch.compile(lambda a, b: conv2d(a, b, padding=1, **kw) * 2, backend="aot_eager", fullgraph=True)
    assert rel_err(fn(x, w), 2 * reference(x, w, padding=1, **kw)) < TOL[torch.float32]


BAD = [
    ("x must be 4-D", lambda x, w: conv2d(x[0], w)),
    ("weight dtype", lambda x, w: conv2d(x, w.double())),
    ("C/groups=5", lambda x, w: conv2d(x, torch.randn(6, 5, 3, 3))),
    ("groups=3 must divide", lambda x, w: conv2d(x, w, groups=3)),
    ("weight must be 4-D", lambda x, w: conv2d(x, w[0])),
    ("scale must be a 1-D tensor of length K=6", lambda x, w: conv2d(x, w, scale=torch.ones(5))),
    ("shift must be a 1-D", lambda x, w: conv2d(x, w, shift=torch.ones(6, 1))),
    ("residual must have the output shape", lambda x, w: conv2d(x, w, residual=torch.ones(1, 6, 5, 5))),
    ("residual dtype", lambda x, w: conv2d(x, w, residual=torch.ones(1, 6, 3, 3, dtype=torch.float16))),
    ("stride must be", lambda x, w: conv2d(x, w, stride=0)),
    ("padding must be", lambda x, w: conv2d(x, w, padding=(1, 2, 3))),
    ("too small", lambda x, w: conv2d(x[:, :, :2, :2], w)),
    ("relu must be a bool", lambda x, w: conv2d(x, w, relu="yes")),
    ("x must be floating point", lambda x, w: conv2d(x.long(), w)),
    ("running_var must be a 1-D floating tensor of length 4",
     lambda x, w: fold_bn(torch.zeros(4), torch.ones(3), None, None, 1e-5)),
    ("eps must be a positive", lambda x, w: fold_bn(torch.zeros(4), torch.ones(4), None, None, -1.0)),
]


@pytest.mark.parametrize("match,call", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_raise_value_error(match, call, triton_backend):
    x, w = torch.randn(1, 4, 5, 5), torch.randn(6, 4, 3, 3)
    with pytest.raises(ValueError, match=match):
        call(x, w)


def test_choose_honours_a_pin_for_its_op_only():
    g = ConvGeometry.make((2, 16, 8, 8), (16, 16, 3, 3), 1, 1)
    cpu = torch.device("cpu")

    def never(cfg):
        raise AssertionError("launched")
    args = (g, torch.float32, cpu, [SMALL], (), never, SMALL)
    with autotune.pinned_config("conv_dgrad", SMALL):
        assert autotune.choose("conv_dgrad", *args) == SMALL
        assert autotune.choose("conv_fwd", *args) == cfgs.INTERPRETER_CONFIG  # off the GPU: never tuned
    assert autotune.choose("conv_dgrad", *args) == cfgs.INTERPRETER_CONFIG  # the pin ended with its block


def test_autotuner_persists_winners(tmp_path, monkeypatch):
    monkeypatch.setenv("RESNET_FAST_CACHE_DIR", str(tmp_path))
    g32 = ConvGeometry.make((32, 64, 56, 56), (64, 64, 3, 3), 1, 1)
    g48 = ConvGeometry.make((48, 64, 56, 56), (64, 64, 3, 3), 1, 1)
    key = tuning_table.tuning_key("conv_fwd", g32, torch.float16, torch.device("cpu"))
    assert key == tuning_table.tuning_key("conv_fwd", g48, torch.float16, torch.device("cpu"))  # same bucket
    g_other = ConvGeometry.make((32, 128, 56, 56), (64, 128, 3, 3), 1, 1)
    assert key != tuning_table.tuning_key("conv_fwd", g_other, torch.float16, torch.device("cpu"))
    cands = cfgs.prune(cfgs.fwd_configs(torch.float16), g32.M, g32.Kg, g32.Cg_pad, torch.float16)
    assert len(cands) > 1
    times = {c: 1.0 + i for i, c in enumerate(cands)}
    best = cands[-1]
    times[best] = 0.1
    calls = []
    tuner = autotune.Autotuner()
    win = tuner.pick(key, cands, lambda c: calls.append(c) or times[c])
    assert win == best and len(calls) == len(cands)
    assert tuner.measured[key] == {"winner": best.name(), "ms": {c.name(): times[c] for c in cands}, "failed": {}}
    saved = json.loads(open(tuning_table.cache_path()).read())
    assert ConvConfig(**saved[key]) == best
    fresh = autotune.Autotuner()  # a "second process": reads the file, never benchmarks

    def no_bench(c):
        raise AssertionError("retuned")
    assert fresh.pick(key, cands, no_bench) == best


def test_autotuner_reports_failing_candidates(tmp_path, monkeypatch, caplog):
    """A candidate that cannot run is skipped, but logged and kept in the tuning record (never silent); the
    report reaches the benchmark through autotune.tuning_report()."""
    monkeypatch.setenv("RESNET_FAST_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "_TUNER", autotune.Autotuner())
    bad, good = SMALL_TMA, SMALL

    def bench(c):
        if c.tma:
            raise RuntimeError("out of resources")
        return 0.5
    with caplog.at_level("WARNING", logger="resnet_fast"):
        assert autotune._TUNER.pick("k", [bad, good], bench) == good
    assert "out of resources" in caplog.text and bad.name() in caplog.text
    assert autotune.tuning_report() == {"k": {"winner": good.name(), "ms": {good.name(): 0.5},
                                              "failed": {bad.name(): "RuntimeError: out of resources"}}}


def test_fp32_is_ieee_unless_both_torch_switches_allow_tf32(monkeypatch):
    prev = torch.get_float32_matmul_precision()
    conv = getattr(torch.backends.cudnn, "conv", None)
    new_api = conv is not None and hasattr(conv, "fp32_precision")
    before = conv.fp32_precision if new_api else None
    try:
        torch.set_float32_matmul_precision("highest")  # PyTorch's default: IEEE whatever cuDNN says
        assert cfgs.conv_allows_tf32() is False
        torch.set_float32_matmul_precision("high")
        if new_api:
            conv.fp32_precision = "tf32"
            assert cfgs.conv_allows_tf32() is True
            conv.fp32_precision = "ieee"
            assert cfgs.conv_allows_tf32() is False
        else:
            monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
            assert cfgs.conv_allows_tf32() is True
            monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
            assert cfgs.conv_allows_tf32() is False
    finally:
        torch.set_float32_matmul_precision(prev)
        if new_api:
            conv.fp32_precision = before


# ------------------------------------------------------------------------------------------------------ GPU
def _resnet50_convs():
    """(C, K, R, stride, padding, H) of every distinct conv of torchvision ResNet-50 at 224x224."""
    shapes = {(3, 64, 7, 2, 3, 224)}
    c_in, h = 64, 56
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        out = width * 4
        for b in range(blocks):
            s = stride if b == 0 else 1
            shapes |= {(c_in, width, 1, 1, 0, h), (width, width, 3, s, 1, h), (width, out, 1, 1, 0, h // s)}
            if b == 0:
                shapes.add((c_in, out, 1, s, 0, h))
            c_in, h = out, h // s
    return sorted(shapes)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("shape", _resnet50_convs(), ids=lambda s: "C{}K{}r{}s{}p{}h{}".format(*s))
def test_resnet50_layers_gpu(shape, dtype, triton_backend, monkeypatch):
    monkeypatch.setenv("RESNET_FAST_AUTOTUNE", "0")  # heuristic config: every config is covered below
    C, K, R, s, p, h = shape
    x, w, kw = make(32, C, h, h, K, R, R, 1, dtype, "cuda", scale=True, shift=True, relu=True)
    x = x.contiguous(memory_format=torch.channels_last)
    geo = ConvGeometry.make(x.shape, w.shape, s, p)
    res = torch.randn(32, K, geo.P, geo.Q, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    y, _ = conv_fwd.conv2d_nhwc(x, conv_fwd.pack_weight(w, 1, dtype), geo, residual=res, allow_tf32=False, **kw)
    ref = reference(x, w, None, s, p, residual=res, **kw)
    assert rel_err(y, ref) < TOL[dtype]
    if dtype == torch.float32:  # TF32 when asked: within TF32's 10-bit mantissa
        y32, _ = conv_fwd.conv2d_nhwc(x, conv_fwd.pack_weight(w, 1, dtype), geo, residual=res, allow_tf32=True, **kw)
        assert rel_err(y32, ref) < 5e-3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_training_variants_gpu(dtype):
    """Prologue + stats on a ResNeXt grouped layer (4 channels per group) and a stem at batch 8."""
    for (C, K, R, s, p, gr, h) in ((128, 128, 3, 1, 1, 32, 28), (3, 64, 7, 2, 3, 1, 64)):
        x, w, _ = make(8, C, h, h, K, R, R, gr, dtype, "cuda", seed=1)
        x = x.contiguous(memory_format=torch.channels_last)
        isc, ish = torch.rand(C, device="cuda") + 0.5, torch.rand(C, device="cuda") - 0.2
        geo = ConvGeometry.make(x.shape, w.shape, s, p, 1, gr)
        y, part = conv_fwd.conv2d_nhwc(x, conv_fwd.pack_weight(w, gr, dtype), geo, in_scale=isc, in_shift=ish,
                                       in_relu=True, stats=True)
        ref = reference(x, w, None, s, p, 1, gr, in_scale=isc, in_shift=ish, in_relu=True)
        assert rel_err(y, ref) < TOL[dtype]
        assert rel_err(part.sum.sum(0), y.double().sum((0, 2, 3))) < 1e-5
        mean, invstd, _, _ = bn_finalize(part.sum, part.m2, geo.M, tile_rows=part.tile_rows, eps=1e-5)
        assert rel_err(invstd, (y.double().var((0, 2, 3), unbiased=False) + 1e-5).rsqrt()) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_every_tuning_config_gpu(dtype):
    """Each candidate the autotuner may pick, pinned, on an aligned and an unaligned (C=20, K=24) layer."""
    for C, K in ((64, 128), (20, 24)):
        x, w, kw = make(4, C, 15, 13, K, 3, 3, 1, dtype, "cuda", bias=True, relu=True)
        x = x.contiguous(memory_format=torch.channels_last)
        geo = ConvGeometry.make(x.shape, w.shape, 1, 1)
        ref = reference(x, w, kw["bias"], 1, 1, relu=True)
        for cfg in cfgs.fwd_configs(dtype):
            y, _ = conv_fwd.conv2d_nhwc(x, conv_fwd.pack_weight(w, 1, dtype), geo, config=cfg, allow_tf32=False,
                                        **kw)
            assert rel_err(y, ref) < TOL[dtype], cfg


def _pointwise_twins(kind: str, dtype) -> list:
    """The TMA or persistent twins the launcher may offer for ``dtype`` on this GPU (``[]``: none here)."""
    tma = cfgs.tma_allowed(torch.device("cuda"))
    tmas = conv_fwd._tma_variants(cfgs.fwd_configs(dtype)) if tma else []
    if kind == "tma":
        return tmas
    return conv_fwd._persistent_twins(list(cfgs.fwd_configs(dtype)) + tmas, dtype) if cfgs.persistent_allowed() \
        else []


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["tma", "persistent"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_every_pointwise_twin_gpu(kind, dtype):
    """Each TMA / persistent candidate, pinned, on ResNet-50 pointwise layers (the first with several tiles per
    persistent program) and one whose M, C, K are off the tiles, with the inference epilogue and with the training
    prologue + residual + stats (fp32 TMA runs as tf32; no persistent twin is offered for fp32)."""
    twins = _pointwise_twins(kind, dtype)
    if not twins:
        pytest.skip(f"no {kind} twin for {dtype} on this GPU / Triton")
    tol = 5e-3 if dtype == torch.float32 else TOL[dtype]
    for N, C, K, h in ((32, 256, 128, 56), (8, 1024, 2048, 7), (3, 40, 72, 9)):
        x, w, kw = make(N, C, h, h, K, 1, 1, 1, dtype, "cuda", scale=True, shift=True, relu=True)
        x = x.contiguous(memory_format=torch.channels_last)
        geo = ConvGeometry.make(x.shape, w.shape)
        wp = conv_fwd.pack_weight(w, 1, dtype)
        isc, ish = torch.rand(C, device="cuda") + 0.5, torch.rand(C, device="cuda") - 0.2
        res = torch.randn(N, K, h, h, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
        ref = reference(x, w, None, **kw)
        ref_train = reference(x, w, in_scale=isc, in_shift=ish, in_relu=True, residual=res)
        for cfg in twins:
            y, _ = conv_fwd.conv2d_nhwc(x, wp, geo, config=cfg, allow_tf32=True, **kw)
            assert rel_err(y, ref) < tol, cfg
            y, part = conv_fwd.conv2d_nhwc(x, wp, geo, config=cfg, allow_tf32=True, in_scale=isc, in_shift=ish,
                                           in_relu=True, residual=res, stats=True)
            assert rel_err(y, ref_train) < tol, cfg
            assert rel_err(part.sum.sum(0), y.double().sum((0, 2, 3))) < 1e-5, cfg


@pytest.mark.gpu
def test_autotune_then_cache_hit_gpu(tmp_path, monkeypatch, triton_backend):
    monkeypatch.setenv("RESNET_FAST_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "_TUNER", autotune.Autotuner())
    x, w, _ = make(8, 64, 28, 28, 64, 3, 3, 1, torch.float16, "cuda")
    y = conv2d(x, w, padding=1)
    assert rel_err(y, reference(x, w, padding=1)) < TOL[torch.float16]
    saved = json.loads(open(tuning_table.cache_path()).read())
    assert len(saved) == 1
    monkeypatch.setattr(autotune, "_TUNER", autotune.Autotuner())  # a fresh process's view: reads the file
    monkeypatch.setattr(autotune.Autotuner, "pick", lambda *a: pytest.fail("retuned despite the disk cache"),
                        raising=True)
    x2 = torch.randn(12, 64, 28, 28, device="cuda", dtype=torch.float16)  # another batch, same bucket
    assert rel_err(conv2d(x2, w, padding=1), reference(x2, w, padding=1)) < TOL[torch.float16]
