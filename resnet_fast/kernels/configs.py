"""Tile configs and the kernel-level switches of the conv kernels.

* :class:`ConvConfig` — BLOCK_M × BLOCK_N output tile, BLOCK_K reduction step, GROUP_M swizzle, warps, stages.
* :data:`FWD_CONFIGS` — the forward kernel's candidates (sized for Hopper's 227 KB and Ampere's 164 KB of
  shared memory with 16-bit operands; :func:`for_dtype` halves BLOCK_K for fp32 so the staged bytes stay the
  same). :data:`INTERPRETER_CONFIG` — the one small config used in the CPU interpreter (never autotuned).
* :func:`prune`, :func:`checked_candidates` — a launch's tuning candidates; :func:`heuristic` — the untuned
  default among them.
* :func:`persistent_programs` — how many programs a persistent launch runs (:func:`persistent_allowed`: whether
  the installed Triton flattens a loop nest, which is what makes one worth running).
* :func:`tma_allowed` — whether a kernel may take its operands by TMA descriptors on a device
  (``RESNET_FAST_TMA=0`` turns them off, to measure what they buy).
* :func:`conv_allows_tf32` — fp32 convs use TF32 exactly when PyTorch would use it for a cuDNN conv.

Choosing among the candidates (tuning, the cache file, pinning) is :mod:`.autotune`'s; tuning keys, the device
identity and the shipped tables are :mod:`.tuning_table`'s.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, replace

import torch

from .. import _backend

__all__ = ["ConvConfig", "FWD_CONFIGS", "DENSE_CONFIGS", "INTERPRETER_CONFIG", "for_dtype", "fwd_configs", "prune",
           "checked_candidates", "heuristic", "tma_allowed", "conv_allows_tf32", "persistent_allowed",
           "persistent_programs"]


@dataclass(frozen=True)
class ConvConfig:
    """One launch configuration of an implicit-GEMM conv kernel."""
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 3
    tma: bool = False  # operand tiles by TMA descriptors (the forward's pointwise path, sm_90+; see conv_fwd)
    prologue_pass: bool = False  # the BN+ReLU prologue as its own pass before the GEMM (see prologue_pass.py)
    row_taps: bool = False  # wgrad: a program per filter row, its taps sharing each formed dy tile (see conv_wgrad)
    persistent: bool = False  # forward: a program per SM walks the output tiles (see conv_fwd)

    def smem_bytes(self, elem_bytes: int) -> int:
        """Shared memory of the pipelined A/B tiles (what num_stages multiplies)."""
        return self.num_stages * (self.BLOCK_M * self.BLOCK_K + self.BLOCK_K * self.BLOCK_N) * elem_bytes

    def name(self) -> str:
        return (f"m{self.BLOCK_M}n{self.BLOCK_N}k{self.BLOCK_K}g{self.GROUP_M}"
                f"w{self.num_warps}s{self.num_stages}" + ("-tma" if self.tma else "")
                + ("-pp" if self.prologue_pass else "") + ("-rt" if self.row_taps else "")
                + ("-ps" if self.persistent else ""))


# Candidates for 16-bit operands. The large tiles feed wgmma on sm_90 (8 warps = 2 warpgroups); the 16-wide
# ones serve the 7×7 stem (C=3 padded to 16) and ResNeXt's 4 channels per group.
FWD_CONFIGS = (
    ConvConfig(128, 128, 64, 8, 8, 3),
    ConvConfig(128, 256, 64, 8, 8, 3),
    ConvConfig(256, 128, 64, 8, 8, 3),
    ConvConfig(128, 64, 64, 8, 4, 4),
    ConvConfig(64, 128, 64, 8, 4, 4),
    ConvConfig(64, 64, 64, 8, 4, 4),
    ConvConfig(128, 64, 32, 8, 4, 4),
    ConvConfig(128, 64, 16, 8, 4, 4),
    ConvConfig(128, 16, 16, 8, 4, 4),
)

# The forward's dense-taps path (ConvGeometry.pack_c: the stem): BLOCK_K is the filter row's width (taps_k), set
# per launch. 128x64 w4 s4 is the default (K = 64: a 128-wide N tile would be half zeros); sm_90 compile, bf16:
# 179 instructions per warp per step, 3 tiles in flight, 128 registers.
DENSE_CONFIGS = (
    ConvConfig(128, 64, 32, 8, 4, 4),
    ConvConfig(256, 64, 32, 8, 8, 3),
    ConvConfig(128, 128, 32, 8, 8, 3),
)

# CPU interpreter: one config, never tuned. Its cost is per program and per loop step (Python), not per
# element (numpy), so mid-size tiles are fastest: 128x64x32 runs a resnet20 training step ~2x faster than
# 64x32x16 did. Multi-tile edge cases are covered by tests that pin small configs.
INTERPRETER_CONFIG = ConvConfig(128, 64, 32, 4, 4, 1)


def for_dtype(cfg: ConvConfig, dtype: torch.dtype) -> ConvConfig:
    """The config adjusted for ``dtype``: fp32 operands are twice as wide, so BLOCK_K is halved (>= 16)."""
    if dtype == torch.float32 and cfg.BLOCK_K > 16:
        return replace(cfg, BLOCK_K=cfg.BLOCK_K // 2)
    return cfg


def for_ieee(cfg: ConvConfig, num_stages: int | None = None) -> ConvConfig:
    """An IEEE fp32 (FMA dot) backward launch's config: 8 warps (and ``num_stages``, if given). Found by the
    compile check with the flags Triton 3.9 compiles with: at 4 warps the FMA dot's fp32 operands spill with the
    dy_bn transform (dgrad 64x32x16 16 B, wgrad 64x32x32 4 B); at 8 warps dgrad spills nothing at its 3 stages,
    wgrad nothing at 2 (4 B at 3)."""
    return replace(cfg, num_warps=8, num_stages=num_stages or cfg.num_stages)


def fwd_configs(dtype: torch.dtype) -> tuple:
    """The forward candidates for ``dtype``: :data:`FWD_CONFIGS` through :func:`for_dtype`; fp32 drops the
    tiles larger than 128×128, whose fp32 (tf32) operand layouts spill registers on sm_90 (see compile_check)."""
    out = []
    for cfg in FWD_CONFIGS:
        if dtype == torch.float32 and cfg.BLOCK_M * cfg.BLOCK_N > 128 * 128:
            continue
        cfg = for_dtype(cfg, dtype)
        if cfg not in out:
            out.append(cfg)
    return tuple(out)


def _pow2_at_least(v: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, math.ceil(math.log2(max(1, v)))))


def prune(configs, M: int, Kg: int, Cg_pad: int, dtype: torch.dtype) -> list:
    """Candidates (already for ``dtype``) that do not waste most of a tile on this shape (BLOCK_N > Kg,
    BLOCK_K > Cg_pad, BLOCK_M > M rounded up); never empty (else the smallest tile)."""
    out = [cfg for cfg in configs
           if cfg.BLOCK_N <= _pow2_at_least(Kg) and cfg.BLOCK_K <= _pow2_at_least(Cg_pad)
           and cfg.BLOCK_M <= _pow2_at_least(M, 64)]
    return out or [min(configs, key=lambda c: (c.BLOCK_M * c.BLOCK_N, c.BLOCK_K))]


def checked_candidates(configs, general: ConvConfig, dtype: torch.dtype, aligned, M: int, N: int, K: int) -> list:
    """A backward kernel's tuning candidates: ``configs`` for ``dtype`` whose path for the shape is the one the
    compile check covers (``aligned(cfg)`` true, or ``cfg`` is the ``general`` config, the only one compiled for the
    masked path), then :func:`prune`d for an M × N GEMM reducing over K. Never empty when ``general`` (already
    for ``dtype``) is among them."""
    cands = [c for c in (for_dtype(b, dtype) for b in configs) if c == general or aligned(c)]
    return prune(cands, M, N, K, dtype)


def heuristic(candidates, M: int, Kg: int, Cg_pad: int) -> ConvConfig:
    """Without tuning: the candidate closest (in log2 of each tile side) to tiles as wide as the channels
    allow, up to 128×128×64. Always one of ``candidates``, so always a compile-checked config."""
    want = (128 if M >= 128 else 64, min(128, _pow2_at_least(Kg)), min(64, _pow2_at_least(Cg_pad)))

    def dist(c):
        return sum(abs(math.log2(a) - math.log2(b)) for a, b in zip((c.BLOCK_M, c.BLOCK_N, c.BLOCK_K), want))
    return min(candidates, key=dist)


def _switched_off(var: str) -> bool:
    """An on-by-default environment switch (``RESNET_FAST_AUTOTUNE``, ``RESNET_FAST_TMA``) set to 0/false/off/no."""
    return os.environ.get(var, "1").strip().lower() in ("0", "false", "off", "no")



def _switched_on(var: str) -> bool:
    """An off-by-default environment switch (``RESNET_FAST_RETUNE``) set to 1/true/on/yes."""
    return os.environ.get(var, "0").strip().lower() in ("1", "true", "on", "yes")



@functools.cache
def _has_tma_descriptors() -> bool:
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return True


def tma_allowed(device: torch.device) -> bool:
    """Whether kernels may read operands through TMA descriptors on ``device``: the installed Triton has
    host-side descriptors (``triton.tools.tensor_descriptor``, triton >= 3.4), the device is sm_90 or newer
    (or the interpreter runs the kernels, for tests), and ``RESNET_FAST_TMA`` is not ``0`` (the switch that
    measures what TMA buys: its tuning keys differ, so each setting keeps its own winners)."""
    if _switched_off("RESNET_FAST_TMA"):
        return False
    if not _has_tma_descriptors():
        return False
    if _backend.interpreting():
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


@functools.cache
def persistent_allowed() -> bool:
    """Whether the installed Triton flattens a loop nest (``tl.range(..., flatten=True)``, triton >= 3.3): the
    persistent forward's tile loop and K-loop become one software-pipelined loop, so the next tile's loads are
    in flight during this tile's epilogue. Without it a persistent program gains nothing, so none is offered."""
    import inspect

    import triton.language as tl
    return "flatten" in inspect.signature(tl.range.__init__).parameters


INTERPRETER_PROGRAMS = 3  # the interpreter's "SMs": each program walks several tiles, unevenly


def persistent_programs(device: torch.device, tiles: int) -> int:
    """Programs of a persistent launch over ``tiles`` output tiles: one per SM of ``device`` (CUDA; its tiles fill
    an SM's registers), :data:`INTERPRETER_PROGRAMS` elsewhere, never more than the tiles."""
    if device.type == "cuda":
        slots = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        slots = INTERPRETER_PROGRAMS
    return max(1, min(tiles, slots))


def conv_allows_tf32() -> bool:
    """Whether an fp32 conv may use TF32: only when BOTH of PyTorch's switches allow it.

    IEEE fp32 is the default (this package's contract), which is stricter than cuDNN: PyTorch's conv setting
    defaults to TF32, its matmul setting to IEEE. TF32 needs (1) the cuDNN conv setting to allow it
    (``torch.backends.cudnn.conv.fp32_precision``, inherited through ``cudnn.fp32_precision`` and
    ``torch.backends.fp32_precision``, on torch >= 2.9; ``torch.backends.cudnn.allow_tf32`` before) and (2) the
    float32 matmul precision to be relaxed (``torch.set_float32_matmul_precision("high")`` or ``"medium"``).
    So ``torch.set_float32_matmul_precision("high")`` opts in, and ``cudnn.allow_tf32 = False`` still opts out.
    """
    if torch.get_float32_matmul_precision() == "highest":
        return False
    cudnn = torch.backends.cudnn
    conv = getattr(cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        # Only the new API is read: reading allow_tf32 raises once the two APIs disagree.
        for prec in (conv.fp32_precision, getattr(cudnn, "fp32_precision", "none"),
                     getattr(torch.backends, "fp32_precision", "none")):
            if prec != "none":
                return prec == "tf32"
        return True  # "none" all the way up: cuDNN's own default, TF32
    return bool(cudnn.allow_tf32)

