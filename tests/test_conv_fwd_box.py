"""The forward's TMA-box path (:mod:`resnet_fast.kernels.conv_fwd_box`): every variant against float64
references (the epilogue terms, the BN+ReLU prologue with its zero padding, the stats partials through
``bn_finalize``), dilation and non-square filters; where it is offered and the default; the launches it refuses.
In the interpreter (TMA descriptors are emulated there) or on sm_90+."""
from __future__ import annotations

import pytest
import torch

from resnet_fast.kernels import autotune, conv_fwd
from resnet_fast.kernels import configs as cfgs
from resnet_fast.kernels import conv_fwd_box as box
from resnet_fast.kernels.bn_finalize import bn_finalize
from resnet_fast.kernels.configs import ConvConfig
from resnet_fast.kernels.conv_common import ConvGeometry, pixel_block
from helpers import rel_err, tensor_core_dtypes
from test_conv_fwd import TOL, make, reference

CL = torch.channels_last
SMALL = ConvConfig(16, 16, 16, 1, 4, 2, tma=True)  # 16-pixel blocks (2×8 on 8-wide maps), 16 output channels


# (N, C, H, W, K, R, S, padding, dilation): several channel blocks and taps, two output-channel tiles, blocks of
# 2×8 or 4×4 pixels; 3×1 taps; dilation 2 with padding 2; a 5×5 filter whose padding reaches 2 pixels out
GEOMETRIES = {"3x3": (2, 32, 8, 8, 24, 3, 3, 1, 1), "3x1": (1, 16, 4, 8, 32, 3, 1, (1, 0), 1),
              "dil2": (1, 16, 8, 4, 16, 3, 3, 2, 2), "5x5": (1, 16, 4, 8, 16, 5, 5, 2, 1)}


@pytest.mark.parametrize("variant", list(box.VARIANTS))
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_box_fwd_matches_conv2d(tma_device, triton_backend, variant, geometry):
    N, C, H, W, K, R, S, pad, dil = GEOMETRIES[geometry]
    flags = box.VARIANTS[variant]
    for dtype in tensor_core_dtypes(tma_device):
        x, w, kw = make(N, C, H, W, K, R, S, 1, dtype, tma_device, seed=R + S,
                        scale=flags.get("HAS_SCALE"), shift=flags.get("HAS_SHIFT"))
        g = ConvGeometry.make(x.shape, w.shape, 1, pad, dil)
        assert box.eligible(g, SMALL, x.contiguous(memory_format=CL), conv_fwd.pack_weight(w, 1, dtype), False)
        if flags.get("HAS_RES"):
            kw["residual"] = torch.randn(N, K, g.P, g.Q).to(tma_device, dtype).contiguous(memory_format=CL)
        if flags.get("PROLOGUE"):  # x is the previous conv's raw output, its mean far from 0: padding must stay 0
            gen = torch.Generator().manual_seed(1)
            kw.update(in_scale=(torch.rand(C, generator=gen) + 0.5).to(tma_device),
                      in_shift=(torch.randn(C, generator=gen) + 1.0).to(tma_device), in_relu=True)
        y, part = conv_fwd.conv2d_nhwc(x.contiguous(memory_format=CL), conv_fwd.pack_weight(w, 1, dtype), g,
                                       relu=bool(flags.get("RELU")), stats=bool(flags.get("STATS")), config=SMALL,
                                       **kw)
        xr = x
        if flags.get("PROLOGUE"):  # the operand as the kernel rounds it
            xr = torch.relu(x.double() * kw.pop("in_scale").double().view(1, -1, 1, 1)
                            + kw.pop("in_shift").double().view(1, -1, 1, 1)).to(dtype)
            kw.pop("in_relu")
        ref = reference(xr, w, None, 1, g.padding, dil, relu=bool(flags.get("RELU")), **kw)
        assert rel_err(y, ref) < TOL[dtype], (variant, geometry, dtype)
        assert (part is not None) == bool(flags.get("STATS"))
        if part is not None:  # tile_rows = BLOCK_M: the blocks tile the output exactly
            assert part.tile_rows == SMALL.BLOCK_M and part.sum.shape == (g.M // SMALL.BLOCK_M, K)
            mean, invstd, _, _ = bn_finalize(part.sum, part.m2, g.M, tile_rows=part.tile_rows, eps=1e-5)
            yd = y.double()
            assert rel_err(mean, yd.mean((0, 2, 3))) < 1e-5
            assert rel_err(invstd, (yd.var((0, 2, 3), unbiased=False) + 1e-5).rsqrt()) < 1e-5


@pytest.mark.parametrize("P,Q,block,want", [(56, 56, 64, (8, 8)), (56, 56, 128, None), (8, 8, 16, (2, 8)),
                                             (4, 8, 16, (2, 8)), (8, 4, 16, (4, 4)), (32, 32, 128, (4, 32)),
                                             (7, 7, 64, None), (1, 512, 256, (1, 256))])
def test_exact_block_tiles_the_output(P, Q, block, want):
    assert pixel_block(P, Q, block, exact_only=True) == want


def _case(device, C=32, H=8, W=8, K=32, R=3, stride=1, groups=1, dtype=torch.float16, offset=0):
    x = torch.randn(2, C, H, W).to(device, dtype).contiguous(memory_format=CL)
    if offset:  # the same tensor shifted by `offset` elements: a base that is not 16-byte aligned
        buf = torch.empty(x.numel() + offset, dtype=dtype, device=device)
        x = buf[offset:].view(2, H, W, C).permute(0, 3, 1, 2)
    w = torch.randn(K, C // groups, R, R).to(device, dtype)
    g = ConvGeometry.make(x.shape, w.shape, stride, R // 2, 1, groups)
    return g, x, conv_fwd.pack_weight(w, groups, dtype)


@pytest.mark.parametrize("why,kw", [("stride 2", dict(stride=2)), ("groups", dict(groups=2)),
                                    ("pointwise", dict(R=1)), ("fp32", dict(dtype=torch.float32)),
                                    ("channels off the block", dict(C=24)), ("no exact block", dict(H=7, W=7)),
                                    ("unaligned base", dict(offset=4))])
def test_box_config_refused_where_it_cannot_run(tma_device, triton_backend, why, kw):
    g, x, wp = _case(tma_device, **kw)
    assert not box.eligible(g, SMALL, x, wp, False)
    assert not conv_fwd._box_configs(g, x, wp, False)
    if g.is_pointwise:  # a tma config there is the pointwise TMA path's
        return
    with pytest.raises(ValueError, match="uses TMA"):
        conv_fwd.conv2d_nhwc(x, wp, g, config=SMALL)


def test_box_is_offered_and_the_default_where_it_fits(tma_device, monkeypatch):
    """A stride-1 3×3 conv whose blocks tile the output: the box tiles whose BLOCK_N the channels fill are
    candidates beside the gather tiles, the widest the untuned default, under a TMA tuning key; RESNET_FAST_TMA=0
    takes them away."""
    seen = []

    def spy(op, geometry, dtype, device, candidates, flags, launch, default):
        seen.append((candidates, flags, default))
        return cfgs.INTERPRETER_CONFIG
    monkeypatch.setattr(autotune, "choose", spy)
    g, x, wp = _case(tma_device, C=64, H=8, W=8, K=64)
    conv_fwd.conv2d_nhwc(x, wp, g)
    cands, flags, default = seen.pop()
    boxes = [c for c in cands if c.tma]
    assert boxes == [c for c in box.BOX_CONFIGS if c.BLOCK_N <= 64]
    assert default == boxes[0] and flags.tma and any(not c.tma for c in cands)
    monkeypatch.setenv("RESNET_FAST_TMA", "0")
    conv_fwd.conv2d_nhwc(x, wp, g)
    cands, flags, default = seen.pop()
    assert not any(c.tma for c in cands) and not default.tma and not flags.tma


def test_every_box_config_is_compile_checked():
    """The tuner may pick any box tile on the GPU: each is a spec of the sm_90 compile check in every variant."""
    checked = {(cx["BP"] * cx["BQ"], cx["BLOCK_N"], cx["BLOCK_K"], opts["num_warps"], opts["num_stages"],
                tuple(sorted(k for k, v in cx.items() if v is True)))
               for _, _, cx, opts, *_ in box.compile_specs()}
    for c in box.BOX_CONFIGS:
        for flags in box.VARIANTS.values():
            assert (c.BLOCK_M, c.BLOCK_N, c.BLOCK_K, c.num_warps, c.num_stages, tuple(sorted(flags))) in checked


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_every_box_config_gpu(dtype):
    """Each box tile, pinned, on ResNet-50's layer1 3×3 (56², 8×8 blocks) and a 32² map, inference and
    training epilogues."""
    if not cfgs.tma_allowed(torch.device("cuda")):
        pytest.skip("this GPU / Triton has no TMA descriptors")
    for N, C, K, h in ((4, 64, 64, 56), (2, 128, 128, 32)):
        x, w, kw = make(N, C, h, h, K, 3, 3, 1, dtype, "cuda", scale=True, shift=True)
        x = x.contiguous(memory_format=CL)
        g = ConvGeometry.make(x.shape, w.shape, padding=1)
        wp = conv_fwd.pack_weight(w, 1, dtype)
        ref = reference(x, w, None, 1, 1, relu=True, **kw)
        for cfg in box.BOX_CONFIGS:
            if not box.eligible(g, cfg, x, wp, False):
                continue
            y, _ = conv_fwd.conv2d_nhwc(x, wp, g, config=cfg, relu=True, **kw)
            assert rel_err(y, ref) < TOL[dtype], cfg
            y, part = conv_fwd.conv2d_nhwc(x, wp, g, config=cfg, stats=True)
            assert rel_err(part.sum.sum(0), y.double().sum((0, 2, 3))) < 1e-5, cfg
