"""wgrad's TMA-box path (:mod:`resnet_fast.kernels.conv_wgrad_box`): dW and the dy sums against float64
``conv2d_weight`` in every variant it runs, block edges past P and Q, dilation, split-K; where it is offered and
the default; the configs it refuses. In the interpreter (TMA descriptors are emulated there) or on sm_90+."""
from __future__ import annotations

import pytest
import torch
from torch.nn.grad import conv2d_weight

import resnet_fast.kernels.conv_wgrad as wg
from resnet_fast.kernels import configs as cfgs
from resnet_fast.kernels import conv_wgrad_box as box
from resnet_fast.kernels.configs import ConvConfig
from resnet_fast.kernels.conv_common import ConvGeometry, DyBN, flat_rows, pixel_block
from helpers import tensor_core_dtypes

CL = torch.channels_last
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
SMALL = ConvConfig(16, 32, 16, 1, 4, 2, tma=True)  # 16 output × 32 input channels, 16-pixel blocks
SMALL_ROWS = ConvConfig(16, 32, 16, 1, 4, 2, tma=True, row_taps=True)  # a program per filter row


def _rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


# (N, C, H, W, K, R, S, stride, padding, dilation): 5 columns in 8-wide blocks (edges past Q), 7 rows in blocks of 2
# (past P); stride 2 through the phase views, odd sizes, padding 2 at dilation 2
GEOMETRIES = {"3x3": (2, 32, 7, 5, 16, 3, 3, 1, 1, 1), "dil2": (1, 64, 6, 6, 32, 3, 3, 1, 2, 2),
              "3x2": (1, 32, 5, 6, 16, 3, 2, 1, 1, 1), "1x1": (2, 32, 4, 6, 16, 1, 1, 1, 0, 1),
              "3x3s2": (2, 32, 9, 7, 16, 3, 3, 2, 1, 1), "1x1s2": (2, 32, 8, 7, 16, 1, 1, 2, 0, 1),
              "dil2s2": (1, 32, 10, 9, 16, 3, 3, 2, 2, 2)}


@pytest.mark.parametrize("variant", list(box.VARIANTS))
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("split,cfg", [(1, SMALL), (3, SMALL), (2, SMALL_ROWS)], ids=["1", "3", "rows2"])
def test_box_wgrad_matches_conv2d_weight(tma_device, triton_backend, variant, geometry, split, cfg):
    N, C, H, W, K, R, S, st, pad, dil = GEOMETRIES[geometry]
    flags = box.VARIANTS[variant]
    if cfg.row_taps and (st > 1 or flags.get("PROLOGUE")):
        pytest.skip("row-taps tiles: stride 1 without the prologue (test_box_config_refused_where_it_cannot_run)")
    for dtype in tensor_core_dtypes(tma_device):
        gen = torch.Generator().manual_seed(split)
        x64 = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64).to(dtype).double()
        g = ConvGeometry.make(x64.shape, (K, C, R, S), st, pad, dil)
        dz64 = torch.randn(N, K, g.P, g.Q, generator=gen, dtype=torch.float64).to(dtype).double()
        dev = lambda t, dt=dtype: t.to(dt).to(tma_device).contiguous(memory_format=CL)  # noqa: E731
        kw, dy64, a64 = {}, dz64, x64
        if flags.get("PROLOGUE"):  # x is the previous conv's raw output: relu(x*scale + shift), 0 at the padding
            sc, sh = torch.rand(C, generator=gen) + 0.5, torch.randn(C, generator=gen) * 0.5
            kw.update(in_scale=sc.to(tma_device), in_shift=sh.to(tma_device))
            a64 = torch.relu(x64 * sc.double().view(1, -1, 1, 1) + sh.double().view(1, -1, 1, 1)).to(dtype).double()
        if flags.get("DY_BN"):
            # y around 0 (some exactly 0 for the ReLU mask), coefficients with a large mean: c3 must not leak into
            # the block's pixels past P and Q
            y64 = torch.relu(torch.randn(dz64.shape, generator=gen, dtype=torch.float64) + 0.3).to(dtype).double()
            c1, c2, c3, mu = (torch.randn(K, generator=gen, dtype=torch.float64) for _ in range(4))
            kw["dy_bn"] = DyBN(dev(y64), *(v.float().to(tma_device) for v in (c1, c2, c3, mu * 10)))
            c1, c2, c3, mu = (v.float().double().view(1, -1, 1, 1) for v in (c1, c2, c3, mu * 10))
            d = dz64 * (y64 > 0) if flags.get("DY_RELU") else dz64
            dy64 = (c1 * d + c2 * (y64 - mu) + c3).to(dtype).double()  # the operand, rounded as the kernel does
            kw["dy_relu"] = bool(flags.get("DY_RELU"))
        out = wg.conv2d_wgrad_nhwc(dev(dz64), dev(x64), (K, C, R, S), stride=st, padding=pad, dilation=dil,
                                   split=split, dy_sums=bool(flags.get("SUMS")), config=cfg, **kw)
        dw, sums = out if flags.get("SUMS") else (out, None)
        ref = conv2d_weight(a64, (K, C, R, S), dy64, stride=st, padding=pad, dilation=dil)
        assert _rel(dw.cpu(), ref) < TOL[dtype], (variant, geometry, dtype)
        if sums is not None:
            assert _rel(sums.cpu(), dy64.sum((0, 2, 3))) < 1e-5


def test_box_phases():
    # stride 2, 3×3, padding 1: rows r = 0, 2 read the odd rows (view offset -1, 0), r = 1 the even ones
    g = ConvGeometry.make((1, 16, 9, 8), (16, 16, 3, 3), 2, 1)
    assert sorted(box.phases(g)) == [(0, 0, 1, 2, 1, 1, 2, 1), (0, 1, 1, 2, 1, 0, 2, 2), (1, 0, 0, 2, 2, 1, 2, 1),
                                     (1, 1, 0, 2, 2, 0, 2, 2)]
    assert box.phases(ConvGeometry.make((1, 16, 9, 8), (16, 16, 3, 3), 1, 1)) == [(0, 0, 0, 1, 3, 0, 1, 3)]
    assert box.phases(ConvGeometry.make((1, 16, 8, 8), (16, 16, 1, 1), 2, 0)) == [(0, 0, 0, 2, 1, 0, 2, 1)]


@pytest.mark.parametrize("cfg", [SMALL, SMALL_ROWS], ids=["one-tap", "rows"])
def test_box_1x1_over_flat_rows_and_strided_views(tma_device, triton_backend, cfg):
    # contiguous tensors: the pixels as one row (50 of them: 4 blocks of 16, the last past the end); channel
    # slices of wider tensors: 4-D blocks of each image; both against float64, with dy_bn and the sums
    gen = torch.Generator().manual_seed(5)
    N, C, H, W, K = 2, 32, 5, 5, 16
    x64 = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64).half().double()
    dz64 = torch.randn(N, K, H, W, generator=gen, dtype=torch.float64).half().double()
    y64 = torch.randn(N, K, H, W, generator=gen, dtype=torch.float64).half().double()
    c1, c2, c3, mu = (torch.randn(K, generator=gen) for _ in range(4))
    v = lambda t: t.double().view(1, -1, 1, 1)  # noqa: E731
    dy64 = (v(c1) * dz64 + v(c2) * (y64 - v(mu)) + v(c3)).half().double()
    ref = conv2d_weight(x64, (K, C, 1, 1), dy64)
    g = ConvGeometry.make(x64.shape, (K, C, 1, 1))
    def dev(t, view):
        t = t.half().to(tma_device).contiguous(memory_format=CL)
        if not view:
            return t
        wide = torch.zeros(N, 2 * t.shape[1], H, W, dtype=t.dtype, device=t.device).contiguous(memory_format=CL)
        wide[:, :t.shape[1]] = t
        return wide[:, :t.shape[1]]
    for view in (False, True):
        dz, x, y = dev(dz64, view), dev(x64, view), dev(y64, view)
        assert flat_rows(g, dz, x, y) != view
        bn = DyBN(y, *(t.to(tma_device) for t in (c1, c2, c3, mu)))
        dw, sums = wg.conv2d_wgrad_nhwc(dz, x, (K, C, 1, 1), dy_bn=bn, dy_sums=True, split=2, config=cfg)
        assert _rel(dw.cpu(), ref) < TOL[torch.float16], view
        assert _rel(sums.cpu(), dy64.sum((0, 2, 3))) < 1e-5, view


def test_box_sums_only(tma_device, triton_backend):
    # need_dw=False: only the first column's programs run, and they form the sums
    gen = torch.Generator().manual_seed(4)
    dz = torch.randn(2, 16, 5, 5, generator=gen).half().to(tma_device).contiguous(memory_format=CL)
    x = torch.randn(2, 32, 5, 5, generator=gen).half().to(tma_device).contiguous(memory_format=CL)
    dw, sums = wg.conv2d_wgrad_nhwc(dz, x, (16, 32, 3, 3), padding=1, dy_sums=True, need_dw=False, split=2,
                                    config=SMALL)
    assert dw is None and _rel(sums.cpu(), dz.cpu().double().sum((0, 2, 3))) < 1e-5


def test_box_shape_and_blocks():
    g = ConvGeometry.make((2, 256, 28, 28), (256, 256, 3, 3), 1, 1)
    assert pixel_block(g.P, g.Q, 64) == (4, 16) and box.num_blocks(g, 64) == 2 * 7 * 2  # 28 columns in 2 × 16
    g7 = ConvGeometry.make((2, 512, 7, 7), (512, 512, 3, 3), 1, 1)
    assert pixel_block(g7.P, g7.Q, 64) == (8, 8) and box.num_blocks(g7, 64) == 2
    assert pixel_block(g7.P, g7.Q, 16) == (2, 8)
    g56 = ConvGeometry.make((2, 64, 56, 56), (64, 64, 3, 3), 1, 1)
    assert pixel_block(g56.P, g56.Q, 64) == (8, 8) and box.num_blocks(g56, 64) == 2 * 7 * 7  # exact: no padding


@pytest.mark.parametrize("why,kw", [("row taps stride", dict(stride=2, cfg=SMALL_ROWS)),
                                    ("row taps prologue", dict(prologue=True, cfg=SMALL_ROWS)),
                                    ("groups", dict(groups=2)), ("fp32", dict(dtype=torch.float32)),
                                    ("channels", dict(C=48)),
                                    ("nchw", dict(nchw=True)), ("y_misaligned", dict(y_offset=1))])
def test_box_config_refused_where_it_cannot_run(tma_device, triton_backend, why, kw):
    dtype, C = kw.get("dtype", torch.float16), kw.get("C", 32)
    stride = kw.get("stride", 1)
    x = torch.randn(2, C, 6, 6).to(dtype).to(tma_device)
    x = x if kw.get("nchw") else x.contiguous(memory_format=CL)
    dz = torch.randn(2, 16, 6 // stride, 6 // stride).to(dtype).to(tma_device).contiguous(memory_format=CL)
    pro = dict(in_scale=torch.ones(C, device=tma_device), in_shift=torch.zeros(C, device=tma_device)) \
        if kw.get("prologue") else {}
    if kw.get("y_offset"):  # dy's strides (as the kernels require) on a base 2 bytes past a 16-byte boundary
        buf = torch.randn(dz.numel() + 8).to(dtype).to(tma_device)
        y = buf.as_strided(dz.shape, dz.stride(), kw["y_offset"])
        pro = dict(dy_bn=DyBN(y, *(torch.ones(16, device=tma_device) for _ in range(4))))
    groups = kw.get("groups", 1)
    with pytest.raises(ValueError, match="loads TMA boxes"):
        wg.conv2d_wgrad_nhwc(dz, x, (16, C // groups, 3, 3), stride=stride, padding=1, groups=groups,
                             config=kw.get("cfg", SMALL), **pro)


@pytest.mark.parametrize("R,stride,C,K", [(3, 1, 256, 256), (1, 1, 256, 512), (3, 2, 256, 256), (3, 1, 128, 128),
                                          (3, 1, 64, 64), (1, 1, 64, 256), (1, 2, 256, 512), (3, 2, 128, 128),
                                          (1, 1, 128, 512)])
@pytest.mark.parametrize("dy_bn", [False, True])
@pytest.mark.parametrize("prologue", [False, True])
@pytest.mark.parametrize("nchw", [False, True], ids=["cl", "nchw_x"])
def test_box_candidates_and_default(R, stride, C, K, dy_bn, prologue, nchw):
    # offered where eligible and the channels fill the tile (row taps: stride 1, no prologue, more than one tap per
    # row; FLAT_CONFIGS: 1×1 over flat rows); the first offered is the default on filters of more than one tap, and
    # on 1×1 convs over flat rows or with dy_bn where it is as wide as the channels, unless the prologue is the only
    # transform and the wide cp.async tile (256×128) fits, or, for a one-tap tile narrower than 256, the cp.async
    # row-taps tiles run; never without TMA; each candidate a compile-checked spec of its variant
    g = ConvGeometry.make((8, C, 14, 14), (K, C, R, R), stride, R // 2)
    x = torch.empty(8, C, 14, 14, dtype=torch.bfloat16)
    x = x if nchw else x.contiguous(memory_format=CL)  # NCHW: not eligible (and no flat rows)
    dy = torch.empty(8, K, g.P, g.Q, dtype=torch.bfloat16).contiguous(memory_format=CL)
    cands, default = wg._candidates(g, dy, x, dy_bn, prologue=prologue, tma=True)
    boxes = [c for c in cands if c.tma]
    rows = flat_rows(g, dy, x)
    want = [c for c in box.BOX_CONFIGS + (box.FLAT_CONFIGS if rows else ()) if K % c.BLOCK_M == 0
            and C % c.BLOCK_N == 0 and (not c.row_taps or (R > 1 and stride == 1 and not prologue))] if not nchw else []
    assert boxes == want
    fits = R > 1 or ((rows or dy_bn) and bool(want) and want[0].BLOCK_N >= min(C, 256))
    # a one-tap tile narrower than 256 yields to the cp.async row-taps tiles where those run (no prologue)
    narrow = bool(want) and not want[0].row_taps and want[0].BLOCK_N < 256 and R > 1 and not prologue
    wide_fits = K >= 256 and C >= 128
    assert default.tma == bool(want and fits and not narrow and (dy_bn or not prologue or not wide_fits))
    assert not default.tma or default == want[0]
    assert not any(c.tma for c in wg._candidates(g, dy, x, dy_bn, prologue=prologue, tma=False)[0])
    checked = {(cx["BLOCK_M"], cx["BLOCK_N"], cx["BP"] * cx["BQ"], opts["num_warps"], cx["ROW_TAPS"], cx["DY_BN"],
                cx["PROLOGUE"], cx["SH"]) for _fn, sig, cx, opts, *_ in box.compile_specs() if "bf16" in sig["dy_desc"]}
    assert all((c.BLOCK_M, c.BLOCK_N, c.BLOCK_K, c.num_warps, c.row_taps, dy_bn, prologue, stride) in checked
               for c in boxes)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_every_box_candidate_on_1x1_flat_rows_gpu(dtype):
    """Each box tile offered on ResNet-50 1×1 layers over flat rows (layer1's 64 channels: FLAT_CONFIGS; 256
    channels: the wide tile), pinned, against float64."""
    if not cfgs.tma_allowed(torch.device("cuda")):
        pytest.skip("this GPU / Triton has no TMA descriptors")
    for N, C, K, h in ((4, 64, 256, 56), (4, 256, 512, 14)):
        x = torch.randn(N, C, h, h, device="cuda").to(dtype).contiguous(memory_format=CL)
        dz = torch.randn(N, K, h, h, device="cuda").to(dtype).contiguous(memory_format=CL)
        g = ConvGeometry.make(x.shape, (K, C, 1, 1))
        ref = conv2d_weight(x.double(), (K, C, 1, 1), dz.double())
        boxes = [c for c in wg._candidates(g, dz, x, False)[0] if c.tma]
        assert boxes
        for cfg in boxes:
            assert _rel(wg.conv2d_wgrad_nhwc(dz, x, (K, C, 1, 1), config=cfg).cpu(), ref.cpu()) < TOL[dtype], cfg
