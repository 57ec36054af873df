"""dgrad's TMA-box path (:mod:`resnet_fast.kernels.conv_dgrad_box`): dx, dz and the dBN partials against float64
``conv2d_input`` in every variant the ops launch, blocks past H and W, dilation, 1×1 over flat pixel rows and
over strided views; where it is offered and the default; the launches it refuses. In the interpreter (TMA
descriptors are emulated there) or on sm_90+."""
from __future__ import annotations

import pytest
import torch
from torch.nn.grad import conv2d_input

from resnet_fast.kernels import conv_dgrad as dg
from resnet_fast.kernels import configs as cfgs
from resnet_fast.kernels import conv_dgrad_box as box
from resnet_fast.kernels.configs import ConvConfig
from resnet_fast.kernels.conv_common import ConvGeometry, DyBN, as_row, flat_rows, pixel_block, row_geometry
from helpers import rel_err, tensor_core_dtypes

CL = torch.channels_last
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
SMALL = ConvConfig(16, 16, 16, 1, 4, 2, tma=True)  # 16 dx pixels × 16 input channels × 16 output channels a step


# (N, C, H, W, K, R, S, padding, dilation, view): 7×5 maps in 2×8 blocks (past H and W); 3×1 taps; dilation 2;
# 5×5; 1×1 over flat rows (48 of them, 3 blocks) and, its tensors channel slices of wider ones, over 4-D blocks
GEOMETRIES = {"3x3": (2, 32, 7, 5, 16, 3, 3, 1, 1, False), "3x1": (1, 16, 6, 4, 32, 3, 1, (1, 0), 1, False),
              "dil2": (1, 16, 6, 6, 16, 3, 3, 2, 2, False), "5x5": (1, 16, 4, 8, 16, 5, 5, 2, 1, False),
              "1x1": (2, 16, 4, 6, 32, 1, 1, 0, 1, False), "1x1view": (2, 16, 4, 6, 32, 1, 1, 0, 1, True)}


def _cl(t, dtype, device, view):
    """``t`` in ``dtype`` channels_last on ``device``; ``view``: the first channels of a twice as wide tensor (a
    strided channels_last view: pixel stride 2C, 16-byte aligned)."""
    if not view:
        return t.to(dtype).to(device).contiguous(memory_format=CL)
    wide = torch.zeros(t.shape[0], 2 * t.shape[1], *t.shape[2:], dtype=dtype, device=device)
    wide = wide.contiguous(memory_format=CL)
    wide[:, :t.shape[1]] = t.to(dtype)
    return wide[:, :t.shape[1]]


@pytest.mark.parametrize("variant", list(dg.VARIANTS))
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_box_dgrad_matches_conv2d_input(tma_device, triton_backend, variant, geometry):
    N, C, H, W, K, R, S, pad, dil, view = GEOMETRIES[geometry]
    flags = dg.VARIANTS[variant]
    for dtype in tensor_core_dtypes(tma_device):
        gen = torch.Generator().manual_seed(R * S)
        g = ConvGeometry.make((N, C, H, W), (K, C, R, S), 1, pad, dil)
        dz64 = torch.randn(N, K, g.P, g.Q, generator=gen, dtype=torch.float64).to(dtype).double()
        w64 = (torch.randn(K, C, R, S, generator=gen, dtype=torch.float64) * 0.3).to(dtype).double()
        dev = lambda t, dt=dtype: _cl(t, dt, tma_device, view)  # noqa: E731
        kw, dy64 = {}, dz64
        if flags.get("DY_RELU"):
            relu = torch.relu(torch.randn(dz64.shape, generator=gen, dtype=torch.float64)).to(dtype).double()
            kw["relu_out"] = dev(relu)
            dy64 = dz64 * (relu > 0)
        if flags.get("DY_BN"):  # y around 0, a large mean: c3 must not leak into the padding or past the map
            y64 = torch.relu(torch.randn(dz64.shape, generator=gen, dtype=torch.float64) + 0.3).to(dtype).double()
            c1, c2, c3, mu = (torch.randn(K, generator=gen, dtype=torch.float64) for _ in range(4))
            kw["dy_bn"] = DyBN(dev(y64), *(v.float().to(tma_device) for v in (c1, c2, c3, mu * 10)))
            c1, c2, c3, mu = (v.float().double().view(1, -1, 1, 1) for v in (c1, c2, c3, mu * 10))
            dy64 = (c1 * dz64 + c2 * (y64 - mu) + c3).to(dtype).double()  # the operand, rounded as the kernel does
        ref = conv2d_input((N, C, H, W), w64, dy64, padding=pad, dilation=dil)
        if flags.get("EPI"):
            yp64 = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64).to(dtype).double()
            isc, ish, imu, osc = (torch.rand(C, generator=gen) + 0.5, torch.randn(C, generator=gen),
                                  torch.randn(C, generator=gen), torch.rand(C, generator=gen) + 0.5)
            kw.update(y_prev=dev(yp64), in_scale=isc.to(tma_device), in_shift=ish.to(tma_device),
                      in_centre=imu.to(tma_device), out_scale=osc.to(tma_device))
            v = lambda t: t.double().view(1, -1, 1, 1)  # noqa: E731
            dz = ref * ((yp64 * v(isc.float()) + v(ish.float())) > 0)
            sums = (dz.sum((0, 2, 3)), (dz * (yp64 - v(imu.float()))).sum((0, 2, 3)))
            ref = dz * v(osc.float())
        wt = w64.to(dtype).to(tma_device).contiguous(memory_format=CL)
        assert box.eligible(g, SMALL, dev(dz64), wt, tuple(t for t in (kw.get("relu_out"),) if t is not None))
        out = dg.conv2d_dgrad_nhwc(dev(dz64), wt, (N, C, H, W), padding=pad, dilation=dil, config=SMALL, **kw)
        dx, part = out if flags.get("EPI") else (out, None)
        assert rel_err(dx, ref) < TOL[dtype], (variant, geometry, dtype)
        if part is not None:
            gb = row_geometry(g) if flat_rows(g, dev(dz64), dx, kw["y_prev"]) else g
            assert part.shape[1] == box.num_tiles(gb, SMALL)
            assert rel_err(part[0].sum(0), sums[0]) < 1e-5 and rel_err(part[1].sum(0), sums[1]) < 1e-5


def test_flat_rows_and_blocks():
    g = ConvGeometry.make((2, 64, 56, 56), (64, 64, 1, 1))
    t = torch.empty(2, 64, 56, 56).contiguous(memory_format=CL)
    assert flat_rows(g, t, t) and not flat_rows(g, t, torch.empty(2, 64, 56, 56))  # NCHW: not one pixel row
    assert as_row(t).shape == (1, 64, 1, 2 * 56 * 56) and as_row(t).data_ptr() == t.data_ptr()
    gr = row_geometry(g)
    assert pixel_block(gr.H, gr.W, 128) == (1, 128) and box.num_tiles(gr, box.BOX_CONFIGS[0]) == 49
    assert pixel_block(1, 100, 64) == (1, 64)  # one row: blocks along it, the last one past its end
    g3 = ConvGeometry.make((2, 64, 56, 56), (64, 64, 3, 3), padding=1)
    assert pixel_block(56, 56, 64) == (8, 8) and box.num_tiles(g3, box.BOX_CONFIGS[-1]) == 2 * 7 * 7
    g28 = ConvGeometry.make((2, 128, 28, 28), (128, 128, 3, 3), padding=1)
    assert pixel_block(28, 28, 64) == (4, 16)  # no exact block: padded past W
    assert box.num_tiles(g28, box.BOX_CONFIGS[-1]) == 2 * 7 * 2


@pytest.mark.parametrize("why,kw", [("stride 2", dict(stride=2)), ("groups", dict(groups=2)),
                                    ("fp32", dict(dtype=torch.float32)), ("NCHW weight", dict(w_nchw=True)),
                                    ("K off the block", dict(K=24)), ("C off the tile", dict(C=40)),
                                    ("unaligned dy", dict(offset=4))])
def test_box_config_refused_where_it_cannot_run(tma_device, triton_backend, why, kw):
    dtype, C, K = kw.get("dtype", torch.float16), kw.get("C", 32), kw.get("K", 32)
    st, groups = kw.get("stride", 1), kw.get("groups", 1)
    dz = torch.randn(2, K, 8 // st, 8 // st).to(tma_device, dtype).contiguous(memory_format=CL)
    if kw.get("offset"):  # dz's strides on a base 8 bytes past a 16-byte boundary
        buf = torch.randn(dz.numel() + 8).to(tma_device, dtype)
        dz = buf.as_strided(dz.shape, dz.stride(), kw["offset"])
    w = torch.randn(K, C // groups, 3, 3).to(tma_device, dtype)
    w = w if kw.get("w_nchw") else w.contiguous(memory_format=CL)
    g = ConvGeometry.make((2, C, 8, 8), w.shape, st, 1, 1, groups)
    assert not box.eligible(g, SMALL, dz, w, (), dtype == torch.float32)
    with pytest.raises(ValueError, match="loads TMA boxes"):
        dg.conv2d_dgrad_nhwc(dz, w, (2, C, 8, 8), stride=st, padding=1, groups=groups, config=SMALL,
                             allow_tf32=False)


@pytest.mark.parametrize("R,H,C,K", [(3, 56, 64, 64), (3, 28, 128, 128), (1, 56, 256, 64), (1, 14, 1024, 256),
                                     (3, 7, 512, 512)])
@pytest.mark.parametrize("variant", ["fused", "relu", "epi"])
def test_box_candidates_and_default(R, H, C, K, variant):
    # offered where eligible, the channels fill BLOCK_N and (with the epilogue) the tile is not 128×256; the default
    # where the pixel blocks tile dx exactly or a pointwise conv runs over flat rows; never without TMA; each
    # candidate a compile-checked spec of its variant
    g = ConvGeometry.make((8, C, H, H), (K, C, R, R), 1, R // 2)
    dy = torch.empty(8, K, H, H, dtype=torch.bfloat16).contiguous(memory_format=CL)
    w = torch.empty(K, C, R, R, dtype=torch.bfloat16).contiguous(memory_format=CL)
    flags = dg.VARIANTS[variant]
    dx = torch.empty(8, C, H, H, dtype=torch.bfloat16).contiguous(memory_format=CL)
    others = ((dy,) if flags.get("DY_BN") or flags.get("DY_RELU") else ()) + (dx, dx)  # (y,) dx, y_prev
    epi = flags.get("EPI", False)
    cands, default = dg._candidates(g, dy, w, others, False, epi, tma=True)
    boxes = [c for c in cands if c.tma]
    want = [c for c in box.BOX_CONFIGS if c.BLOCK_N <= C and box.wide_ok(c, torch.bfloat16, epi)]
    assert boxes == want
    exact = R == 1 or H % 8 == 0
    assert default.tma == exact and (not exact or default == want[0])
    assert not any(c.tma for c in dg._candidates(g, dy, w, others, False, epi, tma=False)[0])
    checked = {(cx["BP"] * cx["BQ"], cx["BLOCK_N"], cx["BLOCK_K"], opts["num_warps"], opts["num_stages"],
                tuple(sorted(k for k in ("EPI", "OUT_SCALE", "DY_BN", "DY_RELU") if cx[k])))
               for _fn, sig, cx, opts, *_ in box.compile_specs() if "bf16" in sig["dy_desc"]}
    assert all((c.BLOCK_M, c.BLOCK_N, c.BLOCK_K, c.num_warps, c.num_stages, tuple(sorted(flags))) in checked
               for c in boxes)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_every_box_config_gpu(dtype):
    """Each box tile, pinned, on ResNet-50's layer1 3×3 (56², exact 8×8 blocks), a 28² 3×3 (padded blocks) and a
    1×1 (flat rows), plain and with the BN backward on load."""
    if not cfgs.tma_allowed(torch.device("cuda")):
        pytest.skip("this GPU / Triton has no TMA descriptors")
    for N, C, K, h, R in ((4, 64, 64, 56, 3), (4, 128, 128, 28, 3), (4, 256, 64, 56, 1)):
        g = ConvGeometry.make((N, C, h, h), (K, C, R, R), 1, R // 2)
        dz = torch.randn(N, K, h, h, device="cuda").to(dtype).contiguous(memory_format=CL)
        w = (torch.randn(K, C, R, R, device="cuda") * 0.05).to(dtype).contiguous(memory_format=CL)
        ref = conv2d_input((N, C, h, h), w.double(), dz.double(), padding=R // 2)
        for cfg in box.BOX_CONFIGS:
            if not box.eligible(g, cfg, dz, w):
                continue
            dx = dg.conv2d_dgrad_nhwc(dz, w, (N, C, h, h), padding=R // 2, config=cfg)
            assert rel_err(dx, ref) < TOL[dtype], cfg
