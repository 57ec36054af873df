"""dgrad with dy loaded as TMA boxes of a spatial block: no index math or padding masks in the loop (stride 1).

``dx[n, h, w, c] = Σ_{r, s, k} dy[n, h + pad_h - r*dil_h, w + pad_w - s*dil_w, k] · W[k, c, r, s]``

A program owns a ``BP × BQ`` block of dx pixels of one image (``BLOCK_M = BP*BQ`` rows, block ``(i, j)`` as row
``i*BQ + j``; :func:`.conv_common.pixel_block`, exact where powers of 2 allow) × ``BLOCK_N`` input channels. For
filter tap ``(r, s)`` the dy pixels it reads are the block shifted by ``(pad_h - r*dil_h, pad_w - s*dil_w)``: a
4-D NHWC box, TMA's zero fill the padding. The weight is a 2-D descriptor of its channels_last ``[K, R*S*C]``
view (a ``BLOCK_K × BLOCK_N`` box per step). A pointwise conv runs over its pixels as one row of one image
(:func:`.conv_common.flat_rows`) where its tensors are channels_last-contiguous.

Without an operand transform the GEMM runs transposed, ``dx^T = W^T · dy^T``, both wgmma operands from their
TMA buffers. ``DY_BN``/``DY_RELU`` form dy in registers (:func:`.conv_common.dy_on_load`, bit-identical to the
gather kernel; y's box is read beside dy's, and ``c3`` is masked outside the dy map), then wgmma takes it as A.
The epilogue (dReLU, dBN partials per tile, out_scale) is :func:`.dgrad_epilogue.epilogue`, the gather
kernel's; its partials are per pixel block (sums: any tiling serves ``bn_backward_coeffs``).

Where :func:`eligible`: groups 1, stride 1, 16-bit operands on tensor cores, ``K % BLOCK_K == 0``,
``C % BLOCK_N == 0``, channels_last dy (and y / relu_out) with 16-byte aligned bases and pixel strides, a
channels_last weight, channels_last dx and y_prev, TMA allowed (:func:`.configs.tma_allowed`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import ConvConfig
from .conv_common import (ConvGeometry, as_rows, block_origin, dy_on_load, next_tap_step, nhwc_descriptor, pixel_block,
                          swizzle_pid, tma_ready)
from .dgrad_epilogue import epilogue

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # triton < 3.4: configs.tma_allowed is False, nothing here runs
    TensorDescriptor = None

__all__ = ["VARIANTS", "wide_ok", "BOX_CONFIGS", "eligible", "num_tiles", "launch", "signature",
           "compile_specs"]


@triton.jit
def _conv_dgrad_box_kernel(
        dy_desc, w_desc, dx_ptr,
        y_ptr, isc_ptr, ish_ptr, imu_ptr, part_ptr, osc_ptr,   # EPI: y_prev, BN scale/shift/centre, partials, out scale
        z_desc, c1_ptr, c2_ptr, c3_ptr, mu_ptr,                # DY_BN: y's boxes, coefficients; DY_RELU: relu_out's
        H, W, C, K, P, Q, HB, WB, NUM_PID_M, PAD_H, PAD_W, DIL_H, DIL_W,
        sdx_n, sdx_h, sdx_w, sy_n, sy_h, sy_w,
        R: tl.constexpr, S: tl.constexpr, EPI: tl.constexpr, OUT_SCALE: tl.constexpr, DY_BN: tl.constexpr,
        DY_RELU: tl.constexpr, BP: tl.constexpr, BQ: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr):
    BLOCK_M: tl.constexpr = BP * BQ
    FORM: tl.constexpr = DY_BN or DY_RELU
    pid_m, pid_n = swizzle_pid(tl.program_id(0), NUM_PID_M, C // BLOCK_N, GROUP_M)
    n, h0, w0, bi, bj = block_origin(pid_m, HB, WB, BP, BQ)
    c0 = pid_n * BLOCK_N
    p0 = h0 + PAD_H  # the dy block's corner at tap (0, 0)
    q0 = w0 + PAD_W
    # no transform: dx^T = W^T · dy^T, both operands from shared memory (a reshaped box as A goes through registers)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    r = 0  # the step's tap (r, s) and output-channel block k0, carried (no division in the loop)
    s = 0
    k0 = 0
    for _ in range(0, R * S * (K // BLOCK_K)):
        p = p0 - r * DIL_H
        q = q0 - s * DIL_W
        a = dy_desc.load([n, p, q, k0]).reshape(BLOCK_M, BLOCK_K)
        b = w_desc.load([k0, (r * S + s) * C + c0])  # [BLOCK_K, BLOCK_N]: W[k, c] of tap (r, s)
        if FORM:
            yv = z_desc.load([n, p, q, k0]).reshape(BLOCK_M, BLOCK_K)
            if DY_RELU:  # dy = dz where relu_out > 0 (zero-filled outside the map: dy is 0 there)
                a = tl.where(yv > 0, a, 0.0)
            if DY_BN:  # dy = c1*dz + c2*(y - mean) + c3, zero outside the dy map
                kk = k0 + tl.arange(0, BLOCK_K)
                inside = ((p + bi).to(tl.uint32, bitcast=True) < P) & ((q + bj).to(tl.uint32, bitcast=True) < Q)
                a = dy_on_load(a, yv.to(tl.float32), tl.load(c1_ptr + kk)[None, :], tl.load(c2_ptr + kk)[None, :],
                               tl.load(c3_ptr + kk)[None, :], tl.load(mu_ptr + kk)[None, :], inside[:, None],
                               False)
        acc = tl.dot(b.T, a.T, acc)
        r, s, k0 = next_tap_step(r, s, k0, K, S, BLOCK_K)  # the next channel block, else the next tap
    acc = acc.T
    h = (h0 + bi).to(tl.int64)  # int64: a flat pointwise view's row index times C may pass 2**31
    w = (w0 + bj).to(tl.int64)
    c_glob = c0 + tl.arange(0, BLOCK_N)
    epilogue(acc, n.to(tl.int64), h, w, (h < H) & (w < W), c_glob, c_glob < C, pid_m, NUM_PID_M, C, dx_ptr,
             y_ptr, isc_ptr, ish_ptr, imu_ptr, part_ptr, osc_ptr, sdx_n, sdx_h, sdx_w, 1, sy_n, sy_h, sy_w, 1, EPI,
             OUT_SCALE, True)


# The constexpr variants the ops launch: plain (no op fuses anything), the training op with a BN+ReLU prologue
# (dReLU/dBN epilogue, out_scale, BN backward on load), the training op without prologue (dy_bn only), the
# inference op with ReLU (its mask on load; without ReLU it is plain, its scale folded into the weight), and the
# training op's triton_dy_pass runner with a prologue (the epilogue; dy formed beforehand).
VARIANTS = {
    "plain": {},
    "fused": {"EPI": True, "OUT_SCALE": True, "DY_BN": True},
    "dy_bn": {"DY_BN": True},
    "relu": {"DY_RELU": True},
    "epi": {"EPI": True, "OUT_SCALE": True},
}


def wide_ok(base: ConvConfig, dtype: torch.dtype, epilogue: bool) -> bool:
    """Whether config ``base`` may launch (and is compile-checked) for operands of ``dtype`` with or without the
    epilogue: the 256-wide channel tiles only with 16-bit operands, and with the epilogue only 64 rows wide."""
    return base.BLOCK_N <= 128 or (dtype != torch.float32 and (not epilogue or base.BLOCK_M <= 64))


# The box tiles (BLOCK_M dx pixels × BLOCK_N input channels × BLOCK_K output channels per step), widest first;
# the 256-wide ones as :func:`wide_ok` allows (128×256 spills with the dReLU/dBN epilogue). sm_90 bf16
# issue ratios against the gather tiles: 1×1 at 256 channels dy_bn 0.84 (gather 128×256×32: 1.07), relu 0.45
# (0.59); layer1's 64 channels 1×1 plain 0.72 (1.09), 3×3 with the epilogue alone (triton_dy_pass) 0.77 (0.93).
BOX_CONFIGS = (ConvConfig(128, 256, 64, 8, 8, 3, tma=True), ConvConfig(64, 256, 64, 8, 8, 3, tma=True),
               ConvConfig(128, 128, 64, 8, 8, 3, tma=True), ConvConfig(64, 128, 64, 8, 4, 3, tma=True),
               ConvConfig(64, 64, 64, 8, 4, 4, tma=True))


def num_tiles(g: ConvGeometry, cfg: ConvConfig) -> int:
    """Pixel blocks of a launch (the partials' rows T); ``g`` the launch's geometry (a pointwise conv over flat
    rows: :func:`.conv_common.as_rows`)."""
    bp, bq = pixel_block(g.H, g.W, cfg.BLOCK_M)
    return g.N * triton.cdiv(g.H, bp) * triton.cdiv(g.W, bq)


def eligible(g: ConvGeometry, cfg: ConvConfig, dy: torch.Tensor, weight: torch.Tensor, others=(),
             ieee: bool = False) -> bool:
    """Whether the box kernel can run this launch at ``cfg`` (module docstring); ``others``: y or relu_out (read by
    boxes like dy), dx and y_prev. TMA permission is the caller's."""
    return (TensorDescriptor is not None and cfg.tma and g.groups == 1 and g.stride == (1, 1) and not ieee
            and dy.dtype in (torch.float16, torch.bfloat16) and g.K % cfg.BLOCK_K == 0 and g.C % cfg.BLOCK_N == 0
            and tma_ready(dy) and all(tma_ready(t) for t in others if t is not None)
            and weight.permute(0, 2, 3, 1).is_contiguous() and weight.data_ptr() % 16 == 0)


def launch(cfg: ConvConfig, g: ConvGeometry, grad_out: torch.Tensor, weight: torch.Tensor, dx: torch.Tensor, epi_ops,
           part, osc, bn_ops, sw) -> None:
    """The launch of :func:`_conv_dgrad_box_kernel` into ``dx`` (and ``part``, ``[2, num_tiles, C]`` under EPI).
    ``epi_ops`` = (y_prev, in_scale, in_shift, in_centre), ``bn_ops`` = (y or relu_out, c1, c2, c3, mean) and
    ``osc`` as :func:`.conv_dgrad._launch_dgrad` (placeholders where ``sw``, a ``DgradSwitches``, has them off)."""
    # y_prev and the boxed y / relu_out are dx and grad_out where their switch is off
    g, (grad_out, dx, yp, z) = as_rows(g, grad_out, dx, epi_ops[0], bn_ops[0])
    bp, bq = pixel_block(g.H, g.W, cfg.BLOCK_M)
    hb, wb = triton.cdiv(g.H, bp), triton.cdiv(g.W, bq)
    dy_d = nhwc_descriptor(grad_out, bp, bq, cfg.BLOCK_K)
    z_d = nhwc_descriptor(z, bp, bq, cfg.BLOCK_K) if sw.dy_bn or sw.dy_relu else dy_d
    wv = weight.permute(0, 2, 3, 1)  # [K, R, S, C], contiguous
    w_d = TensorDescriptor(wv, [g.K, g.R * g.S * g.C], [g.R * g.S * g.C, 1], [cfg.BLOCK_K, cfg.BLOCK_N])
    num_pid_m = g.N * hb * wb
    _conv_dgrad_box_kernel[(num_pid_m * (g.C // cfg.BLOCK_N),)](
        dy_d, w_d, dx, yp, *epi_ops[1:], part, osc, z_d, *bn_ops[1:],
        g.H, g.W, g.C, g.K, g.P, g.Q, hb, wb, num_pid_m, *g.padding, *g.dilation,
        dx.stride(0), dx.stride(2), dx.stride(3), yp.stride(0), yp.stride(2), yp.stride(3),
        R=g.R, S=g.S, EPI=sw.epilogue, OUT_SCALE=sw.out_scale, DY_BN=sw.dy_bn, DY_RELU=sw.dy_relu, BP=bp, BQ=bq,
        BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)


DIV16 = ("C", "K", "sdx_n", "sdx_h", "sdx_w", "sy_n", "sy_h", "sy_w")  # channel counts and NHWC strides
_INTS = ("H", "W", "C", "K", "P", "Q", "HB", "WB", "NUM_PID_M", "PAD_H", "PAD_W", "DIL_H", "DIL_W",
         "sdx_n", "sdx_h", "sdx_w", "sy_n", "sy_h", "sy_w")


def signature(dt: str, cx: dict) -> dict:
    """The kernel's compile signature for ``dt`` ("bf16"/"fp16") operands and constexprs ``cx``."""
    box = f"1, {cx['BP']}, {cx['BQ']}, {cx['BLOCK_K']}"
    sig = {"dy_desc": f"tensordesc<{dt}[{box}]>", "w_desc": f"tensordesc<{dt}[{cx['BLOCK_K']}, {cx['BLOCK_N']}]>",
           "dx_ptr": f"*{dt}", "y_ptr": f"*{dt}", "isc_ptr": "*fp32", "ish_ptr": "*fp32", "imu_ptr": "*fp32",
           "part_ptr": "*fp32", "osc_ptr": "*fp32", "z_desc": f"tensordesc<{dt}[{box}]>", "c1_ptr": "*fp32",
           "c2_ptr": "*fp32", "c3_ptr": "*fp32", "mu_ptr": "*fp32"}
    sig.update({name: "i32" for name in _INTS})
    sig.update({k: "constexpr" for k in cx})
    return sig


def constexprs(rs: tuple, cfg: ConvConfig, blk: tuple, flags: dict) -> dict:
    """The kernel's constexprs for a filter of ``rs = (R, S)`` taps, ``cfg``, ``blk = (BP, BQ)`` and the
    switches ``flags`` (EPI, OUT_SCALE, DY_BN, DY_RELU; the rest off)."""
    cx = {"R": rs[0], "S": rs[1], "EPI": False, "OUT_SCALE": False, "DY_BN": False, "DY_RELU": False,
          "BP": blk[0], "BQ": blk[1], "BLOCK_N": cfg.BLOCK_N, "BLOCK_K": cfg.BLOCK_K, "GROUP_M": cfg.GROUP_M}
    cx.update(flags)
    return cx


def compile_specs(configs=None) -> list:
    """(jit_fn, signature, constexprs, options, is_gemm, div16) for the sm_90 compile check: each config of
    ``configs`` (default :data:`BOX_CONFIGS`) × bf16/fp16 × :data:`VARIANTS` it runs, at a 3×3 filter
    in 8×8 (or 8×16) blocks and, in bf16, at 1×1 over flat rows; TMA descriptors as arguments."""
    out = []
    for cfg in BOX_CONFIGS if configs is None else configs:
        for dt, rs, blk in (("bf16", (3, 3), (8, cfg.BLOCK_M // 8)), ("fp16", (3, 3), (8, cfg.BLOCK_M // 8)),
                            ("bf16", (1, 1), (1, cfg.BLOCK_M))):
            for flags in (f for f in VARIANTS.values() if wide_ok(cfg, torch.bfloat16, f.get("EPI", False))):
                cx = constexprs(rs, cfg, blk, flags)
                out.append((_conv_dgrad_box_kernel, signature(dt, cx), cx,
                            {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}, True, DIV16))
    return out
