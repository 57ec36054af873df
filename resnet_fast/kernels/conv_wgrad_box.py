"""wgrad with both operands loaded as TMA boxes of a spatial block: no im2col index math in the loop.

``dW[k, c, r, s] = Σ_{n, p, q} dy[n, p, q, k] · x[n, p*SH - pad_h + r*dil_h, q*SW - pad_w + s*dil_w, c]``

Each K-step takes a block of BP × BQ output pixels of one image (``BLOCK_K = BP*BQ``). At stride 1 the input
pixels of filter tap (r, s) for that block are the same block shifted by ``(r*dil_h - pad_h, s*dil_w - pad_w)``:
a 4-D NHWC box, which TMA loads with its out-of-bounds zero fill standing for the padding. At stride 2 they are a
box of one stride phase's view ``x[ph_h::SH, ph_w::SW]`` (:func:`phases`: one launch per phase some tap reads).
dy's block is a box too; its pixels past P or Q are zero-filled, so they add nothing (and the dy transform masks
them: ``c3`` must not leak there). The loop then issues only the TMA copies, the mbarrier waits and the wgmma:
the cp.async path of :mod:`.conv_wgrad` spends most of its instructions on per-row coordinates and padding masks
(sm_90 SASS, plain 3×3 at 128×256×32: 160 of 218 instructions per warp per step).

The blocks tile the map exactly where powers of 2 allow (:func:`.conv_common.pixel_block`: 56² in 8×8); else
the cost is padding work, ``ceil(P/BP)*BP × ceil(Q/BQ)*BQ`` pixels per image (14 % more MMA at 28², 31 % at 14²
and 7²). ``ROW_TAPS`` (stride 1, no prologue): a program per filter row, its S <= 3 taps sharing each step's dy
block (three x boxes, three accumulators), as :mod:`.conv_wgrad`'s row-taps path. ``PROLOGUE``:
``relu(x*in_scale + in_shift)`` on the x box in registers, zero outside the view.
A 1×1 conv whose tensors are channels_last-contiguous runs over its pixels as one row of one image
(:func:`.conv_common.flat_rows`: blocks of BLOCK_K pixels, none padded to a map's width).

The GEMM runs transposed, ``dW^T[c, k] = Σ x[pix, c] · dy[pix, k]``: with dy as wgmma's A operand (through
registers, ``dy^T``) the sm_90 SASS waited for each 16-deep wgmma before the next (its A fragments reused
registers); with dy as B, straight from its TMA buffer (or, formed, from shared memory), a step's wgmmas issue
back to back and the plain loop keeps one group in flight across steps. x, as A, takes the prologue in registers.

Same contract as :func:`.conv_wgrad._conv_wgrad_kernel` where :func:`eligible`: groups 1, 16-bit operands on
tensor cores, ``K % BLOCK_M == 0``, ``C % BLOCK_N == 0``, channels_last dy, y and x with 16-byte aligned bases
and pixel strides, each stride phase's view of x non-empty, TMA allowed (:func:`.configs.tma_allowed`).
DY_BN/DY_RELU form dy with :func:`.conv_common.dy_on_load` (bit-identical to the cp.async path); SUMS: the first
(tap, channel tile) column of the first launch sums the formed dy of its chunk in a loop before the GEMM, as
there. Partials ``[SPLIT, K, R, S, C]`` and the combine are :mod:`.conv_wgrad`'s; the split is over blocks.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import ConvConfig
from .conv_common import MAX_BQ, ConvGeometry, dy_on_load, nhwc_descriptor, pixel_block, tap_steps, tma_ready

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # triton < 3.4: configs.tma_allowed is False, nothing here runs
    TensorDescriptor = None

__all__ = ["BOX_CONFIGS", "FLAT_CONFIGS", "num_blocks", "eligible", "launch", "compile_specs"]

# The TMA-box tiles (``tma=True``), widest first: dy and x as boxes of a BP×BQ pixel block, no index math in the
# loop. Offered where :func:`eligible` and the channel counts fill the tile (the row-taps ones at stride 1 without
# the prologue, on filters of 2-3 taps per row: a program per filter row, its taps sharing each step's formed dy
# block, as conv_wgrad.ROW_CONFIGS); the first offered is conv_wgrad's default on filters of more than one tap
# and on 1×1 convs over flat rows (with :data:`FLAT_CONFIGS`), unless the prologue is the only transform and
# conv_wgrad's wide tile fits.
# sm_90 bf16 3×3 issue ratios, against the cp.async tiles: 256 channels plain 0.85 -> 0.27, dy_bn_relu_sums
# 1.51 -> 0.82, stride-2 fused (prologue and dy_bn) 3.00 -> 1.61 (254-255 registers, no spill); 128 channels
# (64×128 row taps) 0.89 -> 0.59 and 1.49 -> 0.95; 64 channels (64×64 row taps) 0.91 -> 0.52 and 2.05 -> 1.34.
# With the prologue alone the wide cp.async tile wins (0.93 vs 1.19). A 128×128 row-taps tile spills; the 128×128
# one-tap tile loses to the row taps (box or cp.async) where they run, and serves stride 2 at 128 channels with
# the prologue (layer2.0.conv2 fused 2.99 -> 2.37).
BOX_CONFIGS = (ConvConfig(128, 256, 64, 8, 8, 3, tma=True), ConvConfig(64, 128, 64, 8, 8, 3, tma=True, row_taps=True),
               ConvConfig(64, 64, 64, 8, 4, 3, tma=True, row_taps=True), ConvConfig(128, 128, 64, 8, 8, 3, tma=True))
# One-tap tiles for 1×1 convs over flat rows whose channels the wide tile does not fill (layer1's 64): sm_90 bf16
# plain/sums 0.39 at 128×64 w4 and 0.76 at 64×64 w4 (the cp.async 128×64 w8: 0.93), dy_bn 2.58 / 3.13 (3.44).
FLAT_CONFIGS = (ConvConfig(128, 64, 64, 8, 4, 3, tma=True), ConvConfig(64, 64, 64, 8, 4, 3, tma=True))


def num_blocks(g: ConvGeometry, block_k: int) -> int:
    """K-steps of the whole reduction: pixel blocks over all images."""
    bp, bq = pixel_block(g.P, g.Q, block_k)
    return g.N * triton.cdiv(g.P, bp) * triton.cdiv(g.Q, bq)


def eligible(g: ConvGeometry, cfg: ConvConfig, dy: torch.Tensor, x: torch.Tensor, prologue: bool, ieee: bool,
             y: torch.Tensor | None = None) -> bool:
    """Whether the box kernel can run this launch at ``cfg`` (see the module docstring; ``cfg.row_taps``: stride 1,
    no prologue, at most 3 taps per filter row). ``y``: the dy_bn tensor, read through a descriptor too
    (``check_like`` gives it dy's strides, not its base alignment). TMA permission is the caller's."""
    rows_ok = not cfg.row_taps or (g.stride == (1, 1) and not prologue and g.S <= 3)
    return (TensorDescriptor is not None and g.groups == 1 and not ieee and rows_ok
            and g.H >= g.stride[0] and g.W >= g.stride[1]  # every stride phase's view of x has a pixel
            and dy.dtype in (torch.float16, torch.bfloat16) and g.K % cfg.BLOCK_M == 0 and g.C % cfg.BLOCK_N == 0
            and all(tma_ready(t) for t in (dy, x, y) if t is not None))


def phases(g: ConvGeometry) -> list:
    """The launches of a conv: per stride phase ``(ph_h, ph_w)`` whose view ``x[ph_h::SH, ph_w::SW]`` some tap
    reads, ``(ph_h, ph_w, r0, rstep, nr, s0, sstep, ns)``: its taps ``r0 + rstep*i`` (i < nr) × ``s0 + sstep*j``
    (j < ns). Stride 1: one, every tap."""
    axes = []
    for size, st, dil, pad, step in zip((g.R, g.S), g.stride, g.dilation, g.padding, tap_steps(g)):
        taps = {ph: [t for t in range(size) if (t * dil - pad) % st == ph] for ph in range(st)}
        axes.append([(ph, ts[0], step, len(ts)) for ph, ts in taps.items() if ts])  # every `step`-th tap
    return [(ph_h, ph_w, r0, rstep, nr, s0, sstep, ns)
            for ph_h, r0, rstep, nr in axes[0] for ph_w, s0, sstep, ns in axes[1]]


@triton.jit
def _conv_wgrad_box_kernel(
        dy_desc, x_desc, z_desc, out_ptr,
        c1_ptr, c2_ptr, c3_ptr, mu_ptr,                        # DY_BN: coefficients [K]; z_desc: y's boxes
        sum_ptr,                                               # SUMS: [SPLIT, K] (or [K]) Σ of the dy operand
        isc_ptr, ish_ptr,                                      # PROLOGUE: x = relu(x*isc + ish)
        P, Q, PB, QB, NB, CHUNK, so_sum, pad_h, pad_w, dil_h, dil_w, HV, WV, R0, RSTEP, S0, SSTEP, NS, PH_H, PH_W,
        so_split, so_k, so_c, so_r, so_s,
        S: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, TILES_N: tl.constexpr, PROLOGUE: tl.constexpr,
        DY_BN: tl.constexpr, DY_RELU: tl.constexpr, SUMS: tl.constexpr, ROW_TAPS: tl.constexpr, BP: tl.constexpr,
        BQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    BLOCK_K: tl.constexpr = BP * BQ
    pid_m = tl.program_id(0)
    pid1 = tl.program_id(1)
    tap = pid1 // TILES_N
    pid_n = pid1 % TILES_N
    split = tl.program_id(2)
    # this launch's taps (one stride phase's): r = R0 + RSTEP*i, s = S0 + SSTEP*j; ROW_TAPS (stride 1): a filter
    # row per program, its S taps sharing each step's formed dy block
    if ROW_TAPS:
        tl.static_assert(S <= 3, "ROW_TAPS: at most 3 taps per filter row (the accumulators)")
        r = R0 + RSTEP * tap
        s = S0
    else:
        r = R0 + RSTEP * (tap // NS)
        s = S0 + SSTEP * (tap % NS)
    k0 = pid_m * BLOCK_M
    c0 = pid_n * BLOCK_N
    k_glob = k0 + tl.arange(0, BLOCK_M)
    c_glob = c0 + tl.arange(0, BLOCK_N)
    c1 = k_glob  # placeholders, unused without DY_BN
    c2 = k_glob
    c3 = k_glob
    mu = k_glob
    if DY_BN:
        c1 = tl.load(c1_ptr + k_glob)[None, :]
        c2 = tl.load(c2_ptr + k_glob)[None, :]
        c3 = tl.load(c3_ptr + k_glob)[None, :]
        mu = tl.load(mu_ptr + k_glob)[None, :]
    isc = c_glob  # placeholders, unused without PROLOGUE
    ish = c_glob
    if PROLOGUE:
        isc = tl.load(isc_ptr + c_glob)[None, :]
        ish = tl.load(ish_ptr + c_glob)[None, :]
    # a block's pixel (i, j) as the row i*BQ + j of its tiles
    bi = tl.arange(0, BLOCK_K) // BQ
    bj = tl.arange(0, BLOCK_K) % BQ
    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, NB)
    per_image = PB * QB
    n0 = lo // per_image  # the chunk's first block, advanced by carries below (no division in the loops)
    p00 = (lo % per_image) // QB * BP
    q00 = (lo % per_image) % QB * BQ
    if SUMS:
        if pid1 == 0:  # the first (tap, channel tile) column: Σ of the formed dy of its chunk, before the GEMM
            n = n0
            p0 = p00
            q0 = q00
            dsum = tl.zeros([BLOCK_M], dtype=tl.float32)
            for _ in range(lo, hi):
                a = _dy_block(dy_desc, z_desc, n, p0, q0, k0, bi, bj, P, Q, c1, c2, c3, mu, DY_BN, DY_RELU,
                              BP, BQ, BLOCK_M)
                dsum += tl.sum(a.to(tl.float32), axis=0)
                n, p0, q0 = _next_block(n, p0, q0, P, Q, BP, BQ)
            tl.store(sum_ptr + split * so_sum + k_glob, dsum)
    # output pixel (p, q) reads x at (SH*p + r*dil_h - pad_h, ...): in the phase view x[PH_H::SH, PH_W::SW] (x_desc)
    # that is (p + dh, q + dw), exact divisions; coordinates outside the view are the padding (TMA zero fill)
    dh = (r * dil_h - pad_h - PH_H) // SH
    dw = (s * dil_w - pad_w - PH_W) // SW
    n = n0
    p0 = p00
    q0 = q00
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # dW^T: dy is wgmma's B operand (module docstring)
    acc1 = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # ROW_TAPS: taps (r, 1) and (r, 2)
    acc2 = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for _ in range(lo, hi):
        a = _dy_block(dy_desc, z_desc, n, p0, q0, k0, bi, bj, P, Q, c1, c2, c3, mu, DY_BN, DY_RELU, BP, BQ, BLOCK_M)
        b = x_desc.load([n, p0 + dh, q0 + dw, c0]).reshape(BLOCK_K, BLOCK_N)
        if PROLOGUE:  # relu(x*isc + ish), zero at the padding (not relu(ish)); wgmma's A operand is in registers
            inside = ((p0 + dh + bi).to(tl.uint32, bitcast=True) < HV) & \
                ((q0 + dw + bj).to(tl.uint32, bitcast=True) < WV)
            b = tl.where(inside[:, None], tl.maximum(b.to(tl.float32) * isc + ish, 0.0), 0.0).to(b.dtype)
        acc = tl.dot(b.T, a, acc)
        if ROW_TAPS and S > 1:
            b = x_desc.load([n, p0 + dh, q0 + dw + dil_w, c0]).reshape(BLOCK_K, BLOCK_N)
            acc1 = tl.dot(b.T, a, acc1)
            if S > 2:
                b = x_desc.load([n, p0 + dh, q0 + dw + 2 * dil_w, c0]).reshape(BLOCK_K, BLOCK_N)
                acc2 = tl.dot(b.T, a, acc2)
        n, p0, q0 = _next_block(n, p0, q0, P, Q, BP, BQ)
    o_off = split * so_split + (k_glob * so_k)[None, :] + (c_glob * so_c + r * so_r + s * so_s)[:, None]
    tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty))
    if ROW_TAPS and S > 1:
        tl.store(out_ptr + o_off + so_s, acc1.to(out_ptr.dtype.element_ty))
        if S > 2:
            tl.store(out_ptr + o_off + 2 * so_s, acc2.to(out_ptr.dtype.element_ty))


@triton.jit
def _dy_block(dy_desc, z_desc, n, p0, q0, k0, bi, bj, P, Q, c1, c2, c3, mu, DY_BN: tl.constexpr,
              DY_RELU: tl.constexpr, BP: tl.constexpr, BQ: tl.constexpr, BLOCK_M: tl.constexpr):
    """dy of the block at (n, p0, q0), channels [k0, k0 + BLOCK_M): ``[BP*BQ, BLOCK_M]``, formed under DY_BN
    (zero at the block's pixels past P or Q)."""
    a = dy_desc.load([n, p0, q0, k0]).reshape(BP * BQ, BLOCK_M)
    if DY_BN:
        y = z_desc.load([n, p0, q0, k0]).reshape(BP * BQ, BLOCK_M).to(tl.float32)
        inside = ((p0 + bi) < P) & ((q0 + bj) < Q)
        a = dy_on_load(a, y, c1, c2, c3, mu, inside[:, None], DY_RELU)
    return a


@triton.jit
def _next_block(n, p0, q0, P, Q, BP: tl.constexpr, BQ: tl.constexpr):
    """The next pixel block in (n, p, q) order: along the row, then down, then the next image."""
    q0 += BQ
    wrap = q0 >= Q
    q0 = tl.where(wrap, 0, q0)
    p0 = tl.where(wrap, p0 + BP, p0)
    down = p0 >= P
    p0 = tl.where(down, 0, p0)
    n = tl.where(down, n + 1, n)
    return n, p0, q0


def launch(cfg, g: ConvGeometry, grad_out: torch.Tensor, x: torch.Tensor, out: torch.Tensor, so: tuple,
           so_split: int, sum_part, so_sum: int, bn_ops, pro_ops, sw, n_split: int, chunk: int) -> None:
    """The launches of :func:`_conv_wgrad_box_kernel` (one per stride phase, :func:`phases`) into ``out`` (dW,
    or the fp32 partials, with strides ``so`` = (k, c, r, s) and ``so_split``) and ``sum_part`` (formed by the
    first launch); ``chunk`` blocks per program, ``n_split`` chunks. ``bn_ops`` = (y, c1, c2, c3, mean) and
    ``pro_ops`` = (in_scale, in_shift) (placeholders where ``sw``, a ``conv_wgrad.WgradSwitches``, has them off)."""
    bp, bq = pixel_block(g.P, g.Q, cfg.BLOCK_K)
    dy_d = nhwc_descriptor(grad_out, bp, bq, cfg.BLOCK_M)
    z_d = nhwc_descriptor(bn_ops[0], bp, bq, cfg.BLOCK_M) if sw.dy_bn else dy_d
    tiles_n = g.C // cfg.BLOCK_N
    sh, sww = g.stride
    for i, (ph_h, ph_w, r0, rstep, nr, s0, sstep, ns) in enumerate(phases(g)):
        xv = x[:, :, ph_h::sh, ph_w::sww]
        taps = nr if cfg.row_taps else nr * ns
        sums = sw.dy_sums and i == 0
        if not (sw.need_dw or sums):
            continue
        grid = (g.K // cfg.BLOCK_M, taps * tiles_n if sw.need_dw else 1, n_split)
        _conv_wgrad_box_kernel[grid](
            dy_d, nhwc_descriptor(xv, bp, bq, cfg.BLOCK_N), z_d, out, *bn_ops[1:],
            out if sum_part is None else sum_part, *pro_ops,
            g.P, g.Q, triton.cdiv(g.P, bp), triton.cdiv(g.Q, bq), num_blocks(g, cfg.BLOCK_K), chunk, so_sum,
            g.padding[0], g.padding[1], g.dilation[0], g.dilation[1], xv.shape[2], xv.shape[3], r0, rstep, s0, sstep,
            ns, ph_h, ph_w, so_split, *so,
            S=g.S, SH=sh, SW=sww, TILES_N=tiles_n, PROLOGUE=sw.prologue, DY_BN=sw.dy_bn, DY_RELU=sw.dy_relu,
            SUMS=sums, ROW_TAPS=cfg.row_taps, BP=bp, BQ=bq, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)


# The constexpr variants of wgrad's ops (conv_wgrad.VARIANTS is this table; here the prologue ones run on the
# one-tap tiles only)
VARIANTS = {
    "plain": {},
    "fused": {"PROLOGUE": True, "DY_BN": True},
    "dy_bn": {"DY_BN": True},
    "sums": {"SUMS": True},
    "dy_bn_relu_sums": {"DY_BN": True, "DY_RELU": True, "SUMS": True},
    "prologue": {"PROLOGUE": True},
}


DIV16 = ("so_sum", "so_split", "so_k", "so_r", "so_s")  # K, and the partials' strides: multiples of C
_INTS = ("P", "Q", "PB", "QB", "NB", "CHUNK", "so_sum", "pad_h", "pad_w", "dil_h", "dil_w", "HV", "WV", "R0",
         "RSTEP", "S0", "SSTEP", "NS", "PH_H", "PH_W", "so_split", "so_k", "so_c", "so_r", "so_s")


def signature(dt: str, cx: dict) -> dict:
    """The kernel's compile signature for ``dt`` ("bf16"/"fp16") operands and constexprs ``cx`` (the descriptors'
    boxes follow BP, BQ, BLOCK_M, BLOCK_N)."""
    box = f"1, {cx['BP']}, {cx['BQ']}"
    sig = {"dy_desc": f"tensordesc<{dt}[{box}, {cx['BLOCK_M']}]>",
           "x_desc": f"tensordesc<{dt}[{box}, {cx['BLOCK_N']}]>",
           "z_desc": f"tensordesc<{dt}[{box}, {cx['BLOCK_M']}]>", "out_ptr": "*fp32", "c1_ptr": "*fp32",
           "c2_ptr": "*fp32", "c3_ptr": "*fp32", "mu_ptr": "*fp32", "sum_ptr": "*fp32", "isc_ptr": "*fp32",
           "ish_ptr": "*fp32"}
    sig.update({name: "i32" for name in _INTS})
    sig.update({k: "constexpr" for k in cx})
    return sig


def compile_specs(configs=None) -> list:
    """(jit_fn, signature, constexprs, options, is_gemm, div16) for the sm_90 compile check: each config of
    ``configs`` (default :data:`BOX_CONFIGS`) × bf16/fp16 × :data:`VARIANTS` it runs at a 3×3 geometry with 28-wide
    rows (BQ = 16; in bf16 also 7-wide ones, BQ = 8, and stride 2) and two channel tiles; in bf16 the one-tap
    tiles (and by default :data:`FLAT_CONFIGS`) at 1×1 over flat rows, one row of BLOCK_K pixels. TMA descriptors
    as arguments (the check also requires TMA loads in the PTX)."""
    configs = BOX_CONFIGS if configs is None else configs
    flat = [c for c in configs if not c.row_taps] + list(FLAT_CONFIGS if configs is BOX_CONFIGS else ())

    def spec(cfg, dt, variant, bq=MAX_BQ, stride=1, s=3):
        bp = cfg.BLOCK_K // bq
        cx = {"S": s, "SH": stride, "SW": stride, "TILES_N": 2, "PROLOGUE": False, "DY_BN": False,
              "DY_RELU": False, "SUMS": False, **VARIANTS[variant], "ROW_TAPS": cfg.row_taps, "BP": bp, "BQ": bq,
              "BLOCK_M": cfg.BLOCK_M, "BLOCK_N": cfg.BLOCK_N}
        return (_conv_wgrad_box_kernel, signature(dt, cx), cx,
                {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}, True, DIV16)

    def runs(cfg, v):  # row-taps tiles: stride 1 without the prologue
        return not (cfg.row_taps and VARIANTS[v].get("PROLOGUE"))
    return [spec(c, dt, v) for c in configs for dt in ("bf16", "fp16") for v in VARIANTS if runs(c, v)] + \
        [spec(c, "bf16", v, bq=8) for c in configs for v in VARIANTS if runs(c, v)] + \
        [spec(c, "bf16", v, bq=bq, stride=2) for c in configs if not c.row_taps for v in VARIANTS
         for bq in (MAX_BQ, 8)] + \
        [spec(c, "bf16", v, bq=c.BLOCK_K, s=1) for c in flat for v in VARIANTS]
    # 7-wide outputs: 8×8 blocks; stride 2: the phase views; 1×1 over flat rows: one row of BLOCK_K pixels
