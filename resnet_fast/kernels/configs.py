"""Tile configs, the TF32 rule, and an autotuner with a persistent on-disk cache, for the conv kernels.

* :class:`ConvConfig` — BLOCK_M × BLOCK_N output tile, BLOCK_K reduction step, GROUP_M swizzle, warps, stages.
* :data:`FWD_CONFIGS` — the forward kernel's candidates (sized for Hopper's 227 KB and Ampere's 164 KB of
  shared memory with 16-bit operands; :func:`for_dtype` halves BLOCK_K for fp32 so the staged bytes stay the
  same). :data:`INTERPRETER_CONFIG` — the one small config used in the CPU interpreter (never autotuned).
* :func:`tma_allowed` — whether a kernel may take its operands by TMA descriptors on a device
  (``RESNET_FAST_TMA=0`` turns them off, to measure what they buy).
* :func:`conv_allows_tf32` — fp32 convs use TF32 exactly when PyTorch would use it for a cuDNN conv.
* :class:`Autotuner` — picks the fastest candidate once per key, remembers it in memory and in a JSON file
  under ``$RESNET_FAST_CACHE_DIR`` (default ``~/.cache/resnet_fast``), so a second process does not retune.
  Keys come from :func:`tuning_key`, which buckets the GEMM row count coarsely (powers of 4) so a new batch
  size does not retune. ``RESNET_FAST_AUTOTUNE=0`` disables tuning (the shape heuristic decides).
  :func:`tuning_report` returns what it measured in this process (every candidate's time, failures).
* :func:`choose` — the one selection policy of every conv launcher (forward, dgrad, wgrad): a config pinned
  with :func:`pinned_config`, else the interpreter's, else the tuned winner, else the heuristic's choice.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import tempfile
import threading
from dataclasses import asdict, dataclass, replace

import torch

from .. import _backend

__all__ = ["ConvConfig", "FWD_CONFIGS", "INTERPRETER_CONFIG", "for_dtype", "fwd_configs", "prune",
           "checked_candidates", "heuristic", "tma_allowed", "conv_allows_tf32", "tuning_key", "cache_path",
           "Autotuner", "tuning_report", "choose", "pinned_config"]


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

    def smem_bytes(self, elem_bytes: int) -> int:
        """Shared memory of the pipelined A/B tiles (what num_stages multiplies)."""
        return self.num_stages * (self.BLOCK_M * self.BLOCK_K + self.BLOCK_K * self.BLOCK_N) * elem_bytes

    def name(self) -> str:
        return (f"m{self.BLOCK_M}n{self.BLOCK_N}k{self.BLOCK_K}g{self.GROUP_M}"
                f"w{self.num_warps}s{self.num_stages}" + ("-tma" if self.tma else ""))


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

# CPU interpreter: one config, never tuned. Its cost is per program and per loop step (Python), not per
# element (numpy), so mid-size tiles are fastest: 128x64x32 runs a resnet20 training step ~2x faster than
# 64x32x16 did. Multi-tile edge cases are covered by tests that pin small configs.
INTERPRETER_CONFIG = ConvConfig(128, 64, 32, 4, 4, 1)


def for_dtype(cfg: ConvConfig, dtype: torch.dtype) -> ConvConfig:
    """The config adjusted for ``dtype``: fp32 operands are twice as wide, so BLOCK_K is halved (>= 16)."""
    if dtype == torch.float32 and cfg.BLOCK_K > 16:
        return replace(cfg, BLOCK_K=cfg.BLOCK_K // 2)
    return cfg


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


def conv_allows_tf32() -> bool:
    """Whether an fp32 conv may use TF32: only when BOTH of PyTorch's switches allow it.

    IEEE fp32 is the default (the issue's contract), which is stricter than cuDNN: PyTorch's conv setting
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


def _bucket(M: int) -> int:
    """Coarse bucket of the GEMM row count: the next power of 4 (batch 32 and 48 share a bucket)."""
    return 4 ** max(0, math.ceil(math.log(max(1, M), 4)))


def tuning_key(op: str, geometry, dtype: torch.dtype, device: torch.device, *extra) -> str:
    """Autotune key: the op, every geometry field except the batch and spatial size (N·P·Q is bucketed),
    the dtype, the device's name and compute capability, and any ``extra`` kernel switches."""
    g = geometry
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else ()
    fields = (op, g.C, g.K, g.R, g.S, g.stride, g.padding, g.dilation, g.groups, _bucket(g.M),
              str(dtype).replace("torch.", ""), name, cap) + tuple(extra)
    return "|".join(str(f) for f in fields)


def cache_path() -> str:
    base = os.environ.get("RESNET_FAST_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                    "resnet_fast")
    import triton  # the winners depend on the compiler that produced them
    return os.path.join(base, f"autotune-triton{triton.__version__}.json")


class Autotuner:
    """Fastest-candidate picker with a per-process dict and a shared JSON file.

    ``pick(key, candidates, bench)`` returns the cached winner for ``key`` if it is one of ``candidates``,
    else times ``bench(cfg)`` (a callable returning milliseconds) for each candidate, stores the winner in
    memory and on disk, and returns it. The benchmarked kernels must be pure (only write their outputs), so
    running them several times has no side effects.
    """

    def __init__(self):
        self._mem: dict | None = None
        self._lock = threading.Lock()
        self.measured: dict = {}  # key -> {"winner", "ms": {config: ms}, "failed": {config: error}}, this process

    @staticmethod
    def enabled() -> bool:
        return not _switched_off("RESNET_FAST_AUTOTUNE")

    def _load(self) -> dict:
        if self._mem is None:
            try:
                with open(cache_path()) as f:
                    self._mem = {k: v for k, v in json.load(f).items() if isinstance(v, dict)}
            except (OSError, ValueError):
                self._mem = {}
        return self._mem

    def lookup(self, key: str, candidates) -> ConvConfig | None:
        with self._lock:
            hit = self._load().get(key)
        if hit is None:
            return None
        try:
            cfg = ConvConfig(**hit)
        except TypeError:
            return None
        return cfg if cfg in candidates else None

    def pick(self, key: str, candidates, bench) -> ConvConfig:
        hit = self.lookup(key, candidates)
        if hit is not None:
            return hit
        if len(candidates) == 1:
            return candidates[0]
        timings, failed = [], {}
        for cfg in candidates:
            try:
                timings.append((bench(cfg), cfg))
            except Exception as exc:  # e.g. out of resources: skipped, but said and kept in the record
                failed[cfg.name()] = f"{type(exc).__name__}: {str(exc)[:200]}"
                _backend.log.warning("autotune %s: config %s failed and is skipped (%s)", key, cfg.name(),
                                     failed[cfg.name()])
        best = min(timings, key=lambda t: t[0])[1] if timings else candidates[0]
        with self._lock:
            self.measured[key] = {"winner": best.name(), "ms": {c.name(): t for t, c in timings}, "failed": failed}
        if timings:
            self._store(key, best)
        return best

    def _store(self, key: str, cfg: ConvConfig) -> None:
        with self._lock:
            self._load()[key] = asdict(cfg)
            path = cache_path()
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                merged = {}
                try:  # merge with what other processes wrote meanwhile
                    with open(path) as f:
                        merged = json.load(f)
                except (OSError, ValueError):
                    pass
                merged.update(self._mem)
                fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
                with os.fdopen(fd, "w") as f:
                    json.dump(merged, f, indent=1, sort_keys=True)
                os.replace(tmp, path)  # atomic: readers never see a half-written file
            except OSError:
                pass  # an unwritable cache only costs retuning in the next process


_TUNER = Autotuner()


def tuning_report() -> dict:
    """What this process's autotuner measured: ``{key: {"winner", "ms": {config name: ms}, "failed": {config
    name: error}}}`` for every key it tuned (keys served from the disk cache are not re-measured, so absent).
    The benchmark stores it, so a report shows e.g. what the TMA twins measured against the pointer path."""
    with _TUNER._lock:
        return {k: {**v, "ms": dict(v["ms"]), "failed": dict(v["failed"])} for k, v in _TUNER.measured.items()}


_PINNED = threading.local()


@contextlib.contextmanager
def pinned_config(op: str, cfg: ConvConfig):
    """Launch kernel ``op`` (``"conv_fwd"``, ``"conv_dgrad"``, ``"conv_wgrad"``) with ``cfg`` in this thread
    (tests; reproducing a tuning result). The config must be one the kernel supports for the shape."""
    prev = getattr(_PINNED, op, None)
    setattr(_PINNED, op, cfg)
    try:
        yield cfg
    finally:
        setattr(_PINNED, op, prev)


def choose(op: str, geometry, dtype: torch.dtype, device: torch.device, candidates, flags: tuple, launch,
           default: ConvConfig) -> ConvConfig:
    """The config for one launch of kernel ``op``: pinned, else :data:`INTERPRETER_CONFIG` off the GPU, else the
    tuned winner among ``candidates`` (benchmarking ``launch(cfg)`` on a miss), else ``default`` when tuning is
    off or a CUDA graph is being captured (never benchmark inside a capture). ``launch`` must be pure: it only
    writes the kernel's outputs, so timing runs have no side effects. ``flags``: the kernel switches that
    enter the tuning key."""
    pinned = getattr(_PINNED, op, None)
    if pinned is not None:
        return pinned
    if _backend.interpreting() or device.type != "cuda":
        return INTERPRETER_CONFIG
    key = tuning_key(op, geometry, dtype, device, *flags)
    hit = _TUNER.lookup(key, candidates)  # this process's or an earlier one's winner
    if hit is not None:
        return hit
    if not Autotuner.enabled() or torch.cuda.is_current_stream_capturing():
        return default
    import triton.testing

    def bench(cfg):
        return triton.testing.do_bench(lambda: launch(cfg), warmup=5, rep=25)

    return _TUNER.pick(key, candidates, bench)
