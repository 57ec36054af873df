"""Conv forward with the input loaded as TMA boxes of a spatial block: no im2col index math in the loop.

``y[n, p, q, k] = Σ_{r, s, c} x[n, p - pad_h + r*dil_h, q - pad_w + s*dil_w, c] · W[k, r, s, c]`` (stride 1)

A program owns the output pixels of a ``BP × BQ`` block of one image (``BLOCK_M = BP*BQ`` GEMM rows, block
``(i, j)`` as row ``i*BQ + j``) × ``BLOCK_N`` output channels. For filter tap ``(r, s)`` the input pixels of
that block are the block shifted by ``(r*dil_h - pad_h, s*dil_w - pad_w)``: a 4-D NHWC box, which TMA loads with
its out-of-bounds zero fill standing for the padding. The packed weight ``[K_pad, R*S*Cg_pad]`` is a 2-D
descriptor (a ``BLOCK_N × BLOCK_K`` box per step). So the loop issues the two TMA copies, the mbarrier wait and
the wgmma; :mod:`.conv_fwd`'s gather spends per step a coordinate and padding mask per row and tap
(:mod:`.cost_report`). Without the prologue the GEMM runs transposed, ``y^T = W · x^T``, so both wgmma operands
come straight from their TMA buffers. The blocks tile ``P × Q`` exactly (:func:`.conv_common.pixel_block`): no
MMA on padding pixels, and every stats tile has ``BLOCK_M`` rows, as :class:`.tile_stats.TileStats` says.

``PROLOGUE``: ``relu?(x*in_scale + in_shift)`` on the box in registers, zero outside the image (padding stays
zero, not ``relu(in_shift)``). The epilogue is :func:`.fwd_epilogue.epilogue` (bias, scale, shift, residual, ReLU,
stats), the same code as the gather kernel's.

Where :func:`eligible`: groups 1, stride 1, 16-bit operands on tensor cores, ``C % BLOCK_K == 0``, exact blocks,
16-byte aligned x (base and pixel strides) and packed weight, TMA allowed (:func:`.configs.tma_allowed`). A
config is ``ConvConfig.tma`` on a conv of more than one tap (on a pointwise conv ``tma`` is :mod:`.conv_fwd`'s
2-D TMA path).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import ConvConfig
from .conv_common import (ConvGeometry, block_origin, next_tap_step, nhwc_descriptor, pixel_block, swizzle_pid,
                          tma_ready)
from .fwd_epilogue import epilogue

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # triton < 3.4: configs.tma_allowed is False, nothing here runs
    TensorDescriptor = None

__all__ = ["BOX_CONFIGS", "VARIANTS", "eligible", "launch", "signature", "constexprs", "compile_specs"]


@triton.jit
def _conv_fwd_box_kernel(
        x_desc, w_desc, y_ptr,
        bias_ptr, scale_ptr, shift_ptr, res_ptr, in_scale_ptr, in_shift_ptr, part_ptr,
        H, W, C, P, Q, K, PB, QB, NUM_PID_M, pad_h, pad_w, dil_h, dil_w,
        R: tl.constexpr, S: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
        HAS_SHIFT: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr, PROLOGUE: tl.constexpr,
        IN_RELU: tl.constexpr, STATS: tl.constexpr, BP: tl.constexpr, BQ: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    BLOCK_M: tl.constexpr = BP * BQ
    pid_m, pid_n = swizzle_pid(tl.program_id(0), NUM_PID_M, tl.cdiv(K, BLOCK_N), GROUP_M)
    n, p0, q0, bi, bj = block_origin(pid_m, PB, QB, BP, BQ)
    k0 = pid_n * BLOCK_N
    h0 = p0 - pad_h  # the block's input corner at tap (0, 0)
    w0 = q0 - pad_w
    # without the prologue the GEMM runs transposed, y^T = W · x^T: both wgmma operands straight from their TMA
    # buffers (a reshaped box as A goes through registers, and the sm_90 SASS then waits after every wgmma)
    acc = tl.zeros([BLOCK_N, BLOCK_M] if not PROLOGUE else [BLOCK_M, BLOCK_N], dtype=tl.float32)
    r = 0  # the step's tap (r, s) and channel block c0, carried (no division in the loop)
    s = 0
    c0 = 0
    for _ in range(0, R * S * (C // BLOCK_K)):
        h = h0 + r * dil_h
        w = w0 + s * dil_w
        a = x_desc.load([n, h, w, c0]).reshape(BLOCK_M, BLOCK_K)
        b = w_desc.load([k0, (r * S + s) * C + c0])
        if PROLOGUE:  # zero at the padding (TMA's fill), not relu(in_shift)
            cc = c0 + tl.arange(0, BLOCK_K)
            af = a.to(tl.float32) * tl.load(in_scale_ptr + cc)[None, :] + tl.load(in_shift_ptr + cc)[None, :]
            if IN_RELU:
                af = tl.maximum(af, 0.0)
            inside = ((h + bi).to(tl.uint32, bitcast=True) < H) & ((w + bj).to(tl.uint32, bitcast=True) < W)
            a = tl.where(inside[:, None], af, 0.0).to(a.dtype)
            acc = tl.dot(a, b.T, acc)
        else:
            acc = tl.dot(b, a.T, acc)
        r, s, c0 = next_tap_step(r, s, c0, C, S, BLOCK_K)  # the next channel block, else the next tap
    if not PROLOGUE:
        acc = acc.T
    p = p0 + bi
    q = q0 + bj
    row_ok = (p < P) & (q < Q)
    offs_m = (n.to(tl.int64) * P + p) * Q + q  # int64: M may pass 2**31 / K
    rows = (tl.minimum(P - p0, BP) * tl.minimum(Q - q0, BQ)).to(tl.float32)
    k_glob = k0 + tl.arange(0, BLOCK_N)
    epilogue(acc, offs_m, row_ok, rows, k_glob, k_glob < K, pid_m, NUM_PID_M, K, y_ptr, bias_ptr,
             scale_ptr, shift_ptr, res_ptr, part_ptr, HAS_BIAS, HAS_SCALE, HAS_SHIFT, HAS_RES, RELU, STATS)


# The box tiles (BLOCK_M pixels × BLOCK_N output channels), widest first; offered where :func:`eligible`.
# sm_90 bf16 3×3 issue ratios (inference epilogue), against the gather kernel's: 64 channels at 56² (8×8 blocks)
# 64×64 w4 0.75 (gather 128×64 w4: 0.82); 64×128 w4 0.43; 128×128 w8 0.38 (gather 0.54). A 128-pixel block tiles
# no ResNet-50 stride-1 map exactly (56 = 7·8), and padding blocks would cost more MMA than the gather's issue.
BOX_CONFIGS = (ConvConfig(128, 128, 64, 8, 8, 3, tma=True), ConvConfig(64, 128, 64, 8, 4, 4, tma=True),
               ConvConfig(64, 64, 64, 8, 4, 4, tma=True))


def eligible(g: ConvGeometry, cfg: ConvConfig, x: torch.Tensor, w_packed: torch.Tensor, dot_ieee: bool) -> bool:
    """Whether the box kernel can run this launch at ``cfg`` (module docstring). TMA permission is the caller's."""
    return (TensorDescriptor is not None and cfg.tma and g.groups == 1 and g.stride == (1, 1) and g.R * g.S > 1
            and not g.pack_c and not dot_ieee and x.dtype in (torch.float16, torch.bfloat16)
            and g.C % cfg.BLOCK_K == 0 and pixel_block(g.P, g.Q, cfg.BLOCK_M, exact_only=True) is not None
            and tma_ready(x) and w_packed.data_ptr() % 16 == 0)


def launch(cfg: ConvConfig, g: ConvGeometry, x: torch.Tensor, w_packed: torch.Tensor, y: torch.Tensor, vecs: tuple,
           residual, part, *, relu: bool, in_relu: bool) -> None:
    """One launch of :func:`_conv_fwd_box_kernel` into ``y`` (and ``part``, ``[2, M/BLOCK_M, K]`` stats partials,
    or None). ``vecs`` = (bias, scale, shift, in_scale, in_shift), fp32 ``[K]``/``[C]`` or None."""
    bp, bq = pixel_block(g.P, g.Q, cfg.BLOCK_M, exact_only=True)
    x_d = nhwc_descriptor(x, bp, bq, cfg.BLOCK_K)
    w_d = TensorDescriptor(w_packed, [g.K_pad, g.R * g.S * g.C], [g.R * g.S * g.C, 1], [cfg.BLOCK_N, cfg.BLOCK_K])
    bias, scale, shift, in_scale, in_shift = vecs
    pb, qb = g.P // bp, g.Q // bq
    num_pid_m = g.N * pb * qb
    opt = [y if t is None else t for t in (bias, scale, shift, residual, in_scale, in_shift, part)]
    _conv_fwd_box_kernel[(num_pid_m * triton.cdiv(g.K, cfg.BLOCK_N),)](
        x_d, w_d, y, *opt, g.H, g.W, g.C, g.P, g.Q, g.K, pb, qb, num_pid_m, g.padding[0], g.padding[1],
        g.dilation[0], g.dilation[1], R=g.R, S=g.S, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None,
        HAS_SHIFT=shift is not None, HAS_RES=residual is not None, RELU=bool(relu), PROLOGUE=in_scale is not None,
        IN_RELU=bool(in_relu), STATS=part is not None, BP=bp, BQ=bq, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        GROUP_M=cfg.GROUP_M, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


DIV16 = ("C", "K")  # channel counts of the layers it runs (C: a multiple of BLOCK_K)
_INTS = ("H", "W", "C", "P", "Q", "K", "PB", "QB", "NUM_PID_M", "pad_h", "pad_w", "dil_h", "dil_w")


def signature(dt: str, cx: dict) -> dict:
    """The kernel's compile signature for ``dt`` ("bf16"/"fp16") operands and constexprs ``cx``."""
    sig = {"x_desc": f"tensordesc<{dt}[1, {cx['BP']}, {cx['BQ']}, {cx['BLOCK_K']}]>",
           "w_desc": f"tensordesc<{dt}[{cx['BLOCK_N']}, {cx['BLOCK_K']}]>", "y_ptr": f"*{dt}", "bias_ptr": "*fp32",
           "scale_ptr": "*fp32", "shift_ptr": "*fp32", "res_ptr": f"*{dt}", "in_scale_ptr": "*fp32",
           "in_shift_ptr": "*fp32", "part_ptr": "*fp32"}
    sig.update({name: "i32" for name in _INTS})
    sig.update({k: "constexpr" for k in cx})
    return sig


# The epilogue/prologue combinations the ops launch: inference (BN folded, ReLU; + residual at a block's end) and
# training (batch statistics; the previous BN+ReLU as a prologue, or already applied by the prologue pass).
VARIANTS = {
    "scale_shift_relu": {"HAS_SCALE": True, "HAS_SHIFT": True, "RELU": True},
    "scale_shift_res_relu": {"HAS_SCALE": True, "HAS_SHIFT": True, "HAS_RES": True, "RELU": True},
    "stats": {"STATS": True},
    "prologue_stats": {"PROLOGUE": True, "IN_RELU": True, "STATS": True},
}


def constexprs(g_rs: tuple, cfg: ConvConfig, block: tuple, variant: str | None = None) -> dict:
    """The kernel's constexprs for a filter of ``g_rs = (R, S)`` taps, ``cfg``, ``block = (BP, BQ)`` and a
    :data:`VARIANTS` entry (None: every switch off)."""
    cx = {"R": g_rs[0], "S": g_rs[1], "HAS_BIAS": False, "HAS_SCALE": False, "HAS_SHIFT": False, "HAS_RES": False,
          "RELU": False, "PROLOGUE": False, "IN_RELU": False, "STATS": False, "BP": block[0], "BQ": block[1],
          "BLOCK_N": cfg.BLOCK_N, "BLOCK_K": cfg.BLOCK_K, "GROUP_M": cfg.GROUP_M}
    cx.update(VARIANTS.get(variant, {}))
    return cx


def compile_specs(configs=None) -> list:
    """(jit_fn, signature, constexprs, options, is_gemm, div16) for the sm_90 compile check: each config of
    ``configs`` (default :data:`BOX_CONFIGS`) × bf16/fp16 × :data:`VARIANTS` at a 3×3 filter and 8-wide blocks
    (56² maps); TMA descriptors as arguments (the check also requires TMA loads in the PTX)."""
    out = []
    for cfg in BOX_CONFIGS if configs is None else configs:
        for dt in ("bf16", "fp16"):
            for variant in VARIANTS:
                cx = constexprs((3, 3), cfg, (cfg.BLOCK_M // 8, 8), variant)
                out.append((_conv_fwd_box_kernel, signature(dt, cx), cx,
                            {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}, True, DIV16))
    return out
