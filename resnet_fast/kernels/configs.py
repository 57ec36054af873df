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
  Lookup order per key: this process's memory, the user's cache file, the shipped tuning table of the GPU's
  architecture (:mod:`.tuning_table`, keyed by :func:`table_key`: the device name replaced by ``sm_XY``), then
  tuning. ``RESNET_FAST_RETUNE=1`` skips the cache file and the table (and still stores what it measures).
  :func:`tuning_report` returns what it measured in this process (every candidate's time, failures);
  :func:`tuning_sources` where each key's answer came from.
* :func:`choose` — the one selection policy of every conv launcher (forward, dgrad, wgrad): a config pinned
  with :func:`pinned_config`, else the interpreter's, else the tuned winner, else the heuristic's choice.
* :func:`choose_impl` — per conv, which implementation runs: this project's Triton kernels or the cuDNN
  composite (``RESNET_FAST_CONV_IMPL`` = ``auto|triton|cudnn``, :func:`conv_impl_setting`); under ``auto``
  both are timed once per key on the GPU and the faster is kept like a config.

The device identity (:class:`DeviceIdentity`) and the "interpreting / capturing / compiling" predicates can be
injected into :func:`choose` and :func:`choose_impl`, so CPU tests exercise the GPU lookup and timing paths.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import tempfile
import threading
from dataclasses import asdict, dataclass, fields, replace
from typing import Callable, Mapping, NamedTuple, Optional

import torch

from .. import _backend

__all__ = ["ConvConfig", "FWD_CONFIGS", "INTERPRETER_CONFIG", "for_dtype", "fwd_configs", "prune",
           "checked_candidates", "heuristic", "tma_allowed", "conv_allows_tf32", "DeviceIdentity",
           "device_identity", "tuning_key", "TableKey", "table_key", "cache_path", "config_from_entry",
           "TABLE_FORMAT", "TABLE_VERSION", "TABLE_DIR", "TuningTable", "table_path", "check_table_entry", "load_table",
           "Autotuner", "SOURCES", "tuning_report", "tuning_sources", "choose", "pinned_config", "IMPLS",
           "conv_impl_setting", "impl_heuristic", "choose_impl"]


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


class DeviceIdentity(NamedTuple):
    """What a tuning key records of a GPU: its name (``torch.cuda.get_device_name``, e.g. ``"NVIDIA H200"``) and
    compute capability (``(9, 0)``). Tests pass a made-up one to run the GPU lookup path on a CPU machine."""
    name: str
    capability: tuple

    @property
    def arch(self) -> str:
        """``"sm_90"`` for capability (9, 0): the name of the shipped tuning table that serves this GPU."""
        return "sm_%d%d" % tuple(self.capability)


def device_identity(device: torch.device) -> Optional[DeviceIdentity]:
    """The identity of a CUDA ``device``; None for any other device (nothing is tuned off the GPU)."""
    if device.type != "cuda":
        return None
    return DeviceIdentity(torch.cuda.get_device_name(device), tuple(torch.cuda.get_device_capability(device)))


_NAME_FIELD = 11  # position of the device name in a tuning key; the capability follows it (see table_key)


def tuning_key(op: str, geometry, dtype: torch.dtype, device: torch.device, *extra,
               identity: Optional[DeviceIdentity] = None) -> str:
    """Autotune key: the op, every geometry field except the batch and spatial size (N·P·Q is bucketed),
    the dtype, the device's name and compute capability, and any ``extra`` kernel switches, joined by ``|``:
    ``conv_fwd|C|K|R|S|stride|padding|dilation|groups|bucket|float16|NVIDIA H200|(9, 0)|extra...``.
    ``identity`` replaces the device's own (tests); off CUDA the name is the device type and the capability ``()``.
    """
    g = geometry
    ident = identity if identity is not None else device_identity(device)
    name, cap = (ident.name.replace("|", "/"), tuple(ident.capability)) if ident is not None else (device.type, ())
    key_fields = (op, g.C, g.K, g.R, g.S, g.stride, g.padding, g.dilation, g.groups, _bucket(g.M),
                  str(dtype).replace("torch.", ""), name, cap) + tuple(extra)
    return "|".join(str(f) for f in key_fields)


class TableKey(NamedTuple):
    arch: str    # "sm_90"
    key: str     # the key in the shipped table
    device: str  # the GPU name the tuning key carried (provenance)


def table_key(key: str) -> Optional[TableKey]:
    """A GPU tuning key in the shipped table's form: the device-name and capability fields replaced by the arch,
    ``conv_fwd|64|64|3|3|(1, 1)|(1, 1)|(1, 1)|1|4096|float16|NVIDIA H200|(9, 0)|False`` ->
    ``conv_fwd|64|64|3|3|(1, 1)|(1, 1)|(1, 1)|1|4096|float16|sm_90|False``, so one table serves every GPU of an
    architecture (an H200's winners serve an H100). None for keys without a GPU capability (CPU, other forms)."""
    f = key.split("|")
    if len(f) < _NAME_FIELD + 2:
        return None
    m = re.fullmatch(r"\((\d+), (\d+)\)", f[_NAME_FIELD + 1])
    if m is None:
        return None
    arch = f"sm_{m[1]}{m[2]}"
    return TableKey(arch, "|".join(f[:_NAME_FIELD] + [arch] + f[_NAME_FIELD + 2:]), f[_NAME_FIELD])


def cache_path() -> str:
    base = os.environ.get("RESNET_FAST_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                    "resnet_fast")
    import triton  # the winners depend on the compiler that produced them
    return os.path.join(base, f"autotune-triton{triton.__version__}.json")


# ---------------------------------------------------------------- the shipped tuning table (format: tuning_table)
TABLE_FORMAT = "resnet_fast.tuning_table"
TABLE_VERSION = 1
TABLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned")


class TuningTable:
    """A loaded table (:mod:`.tuning_table` documents the file): ``entries`` ({table key: entry}, malformed
    ones already dropped), ``provenance``, and the file's one warning (:meth:`warn_once`)."""

    def __init__(self, path: str, arch: str, entries: dict, provenance: dict):
        self.path, self.arch, self.entries, self.provenance = path, arch, entries, provenance
        self.warned = False

    def warn_once(self, reason: str) -> None:
        """Log ``reason`` unless this file already logged a warning (one per file)."""
        if not self.warned:
            self.warned = True
            _table_warning(self.path, reason)


def _table_warning(path: str, reason: str) -> None:
    _backend.log.warning("resnet_fast: tuning table %s: %s (only this warning is logged for the file; "
                         "python -m resnet_fast.kernels.tuning_table export rewrites it)", path, reason)


def table_path(arch: str, table_dir: Optional[str] = None) -> str:
    """Where the table for ``arch`` (``"sm_90"``) lives: ``<table_dir or TABLE_DIR>/<arch>.json``."""
    return os.path.join(table_dir or TABLE_DIR, f"{arch}.json")


def check_table_entry(key: str, entry) -> Optional[str]:
    """Why a table entry is malformed (None if it is fine): keys ``impl:<role>|...`` hold
    ``{"impl": "triton"|"cudnn"|another runner's name, "ms": {impl: ms}?}``, all others a valid config
    (:func:`config_from_entry`)."""
    if not isinstance(entry, dict):
        return f"{key!r}: not an object"
    if key.startswith("impl:"):
        if not _impl_name_ok(entry.get("impl")) or not set(entry) <= {"impl", "ms"} \
                or not isinstance(entry.get("ms", {}), dict):
            return f"{key!r} = {entry}: not an implementation entry {{'impl': name, 'ms': {{name: ms}}}}"
        return None
    if config_from_entry(entry) is None:
        return f"{key!r} = {entry}: not a valid ConvConfig"
    return None


def load_table(path: str, arch: str) -> Optional[TuningTable]:
    """The table at ``path`` for ``arch``, or None: silently when the file does not exist, with one warning when
    it cannot be used (unreadable, bad JSON, another format/version/arch). Malformed entries, and keys not of
    ``arch``, are dropped (the rest stays usable) with one warning."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        _table_warning(path, f"unreadable, ignored ({type(exc).__name__}: {str(exc)[:200]})")
        return None
    if not isinstance(doc, dict) or doc.get("format") != TABLE_FORMAT \
            or type(doc.get("version")) is not int or doc["version"] != TABLE_VERSION:
        got = (doc.get("format"), doc.get("version")) if isinstance(doc, dict) else type(doc).__name__
        _table_warning(path, f"ignored: format/version {got}, expected ({TABLE_FORMAT!r}, {TABLE_VERSION})")
        return None
    if doc.get("arch") != arch or not isinstance(doc.get("entries"), dict):
        _table_warning(path, f"ignored: arch {doc.get('arch')!r} (expected {arch!r}) or no 'entries' object")
        return None
    entries, bad = {}, []
    for key, entry in doc["entries"].items():
        reason = check_table_entry(key, entry)
        f = key.split("|")
        if reason is None and (len(f) <= _NAME_FIELD or f[_NAME_FIELD] != arch):
            reason = f"{key!r}: not a {arch} table key"
        if reason is None:
            entries[key] = entry
        else:
            bad.append(reason)
    prov = doc.get("provenance")
    table = TuningTable(path, arch, entries, prov if isinstance(prov, dict) else {})
    if bad:
        table.warn_once(f"{len(bad)} malformed entr{'y' if len(bad) == 1 else 'ies'} ignored, e.g. {bad[0]}")
    return table


def _switched_on(var: str) -> bool:
    """An off-by-default environment switch (``RESNET_FAST_RETUNE``) set to 1/true/on/yes."""
    return os.environ.get(var, "0").strip().lower() in ("1", "true", "on", "yes")


_CONFIG_FIELDS = frozenset(f.name for f in fields(ConvConfig))
_REQUIRED_FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K")


def config_from_entry(entry) -> Optional[ConvConfig]:
    """The :class:`ConvConfig` a cache or table entry (``asdict(cfg)``) describes, or None when it is not one:
    unknown or missing tile fields, or values of the wrong type (positive ints; ``tma`` a bool). Entries written
    before a field existed (no ``tma``) still read, with the field's default."""
    if not isinstance(entry, dict) or not set(entry) <= _CONFIG_FIELDS \
            or not all(k in entry for k in _REQUIRED_FIELDS):
        return None
    for k, v in entry.items():
        ok = isinstance(v, bool) if k == "tma" else (isinstance(v, int) and not isinstance(v, bool) and v > 0)
        if not ok:
            return None
    return ConvConfig(**entry)


# Where the answer for a key came from, first time this process needed it (later hits are from memory):
# "cache" the user's cache file, "table" the shipped table, "tuned" measured now, "heuristic" not measured
# (tuning off, CUDA-graph capture, torch.compile tracing), "single" one candidate only.
SOURCES = ("cache", "table", "tuned", "heuristic", "single")


class Autotuner:
    """Fastest-candidate picker with a per-process dict, the user's JSON cache file and the shipped table.

    ``pick(key, candidates, bench)`` returns the known winner for ``key`` if it is one of ``candidates``
    (:meth:`lookup`), else times ``bench(cfg)`` (a callable returning milliseconds) for each candidate, stores
    the winner in memory and in the cache file, and returns it. The benchmarked kernels must be pure (only
    write their outputs), so running them several times has no side effects.

    Lookup order: memory, the cache file (:func:`cache_path`), the table ``<table_dir>/<arch>.json`` for the
    arch in the key (:func:`table_key`; ``table_dir`` defaults to the package's ``kernels/tuned``). With
    ``RESNET_FAST_RETUNE=1`` only memory is read. Besides config entries (``asdict(cfg)``) the cache and the
    table hold implementation entries ``{"impl": "cudnn", "ms": {...}}`` under ``impl:<role>`` keys
    (:func:`choose_impl`).
    """

    def __init__(self, table_dir: Optional[str] = None):
        self._mem: dict = {}            # key -> entry settled on in this process (tuned, or read from a file)
        self._hot: dict = {}            # key -> ConvConfig parsed from _mem[key]
        self._file: Optional[dict] = None  # the cache file's entries, read once
        self._tables: dict = {}         # arch -> TuningTable, or None (absent or unusable)
        self._absent: set = set()       # keys neither the cache file nor the table answered
        self._table_dir = table_dir
        self._lock = threading.RLock()
        self.measured: dict = {}  # key -> {"winner", "ms": {config: ms}, "failed": {config: error}}, this process
        self.sources: dict = {}   # key -> one of SOURCES

    @staticmethod
    def enabled() -> bool:
        return not _switched_off("RESNET_FAST_AUTOTUNE")

    def forget(self) -> None:
        """Drop everything this process knows (memory, the files read, sources, measurements), as if new: e.g.
        after a run whose winners went to a scratch cache directory."""
        with self._lock:
            self._mem.clear()
            self._hot.clear()
            self._absent.clear()
            self._tables.clear()
            self._file = None
            self.sources.clear()
            self.measured.clear()

    def _cache_entries(self) -> dict:
        if self._file is None:
            try:
                with open(cache_path()) as f:
                    data = json.load(f)
            except (OSError, ValueError):
                data = {}
            self._file = {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}
        return self._file

    def _table(self, arch: str):
        if arch not in self._tables:
            self._tables[arch] = load_table(table_path(arch, self._table_dir), arch)
        return self._tables[arch]

    def find(self, key: str, accept: Callable):
        """``accept(entry)`` (the value, or None to refuse) of the first acceptable entry for ``key`` in memory,
        the cache file, the shipped table; None if none. An entry the table holds but ``accept`` refuses (not
        among this launch's candidates) is ignored with the table's one warning."""
        with self._lock:
            hit = self._mem.get(key)
            if hit is not None and (value := accept(hit)) is not None:
                return value
            if _switched_on("RESNET_FAST_RETUNE") or key in self._absent:
                return None
            hit = self._cache_entries().get(key)
            if hit is not None and (value := accept(hit)) is not None:
                self.remember(key, hit, "cache")
                return value
            tk = table_key(key)
            table = self._table(tk.arch) if tk is not None else None
            hit = table.entries.get(tk.key) if table is not None else None
            value = accept(hit) if hit is not None else None
            if value is None:
                if hit is not None:
                    table.warn_once(f"entry {tk.key!r} = {hit} is not among the candidates of this launch; ignored")
                self._absent.add(key)  # untuned launches (tuning off, capture) do not re-read files each time
                return None
            self.remember(key, hit, "table")
            return value

    def lookup(self, key: str, candidates) -> Optional[ConvConfig]:
        """The known winner for ``key`` (:meth:`find`) if it is one of ``candidates``, else None."""
        cfg = self._hot.get(key)  # the parsed memory entry: every launch's fast path
        if cfg is not None and cfg in candidates:
            return cfg

        def accept(entry):
            cfg = config_from_entry(entry)
            return cfg if cfg is not None and cfg in candidates else None
        cfg = self.find(key, accept)
        if cfg is not None and self._mem.get(key) is not None:
            self._hot[key] = cfg
        return cfg

    def remember(self, key: str, entry: dict, source: str) -> None:
        """Keep ``entry`` for ``key`` in this process's memory (not in the cache file), served by ``source``."""
        with self._lock:
            self._mem[key] = entry
            self._hot.pop(key, None)
            self.sources[key] = source

    def note(self, key: str, source: str) -> None:
        """Record where ``key``'s answer came from when nothing is remembered (a heuristic config)."""
        with self._lock:
            self.sources.setdefault(key, source)

    def pick(self, key: str, candidates, bench) -> ConvConfig:
        hit = self.lookup(key, candidates)
        if hit is not None:
            return hit
        if len(candidates) == 1:
            self.note(key, "single")
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
            self._store(key, asdict(best))
        return best

    def _store(self, key: str, entry: dict) -> None:
        """Keep a measured winner in memory and add it to the cache file (merged with what other processes
        wrote meanwhile; only this key is written, so table entries never turn into cache entries)."""
        with self._lock:
            self.remember(key, entry, "tuned")
            path = cache_path()
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                merged = {}
                try:
                    with open(path) as f:
                        merged = json.load(f)
                except (OSError, ValueError):
                    pass
                if not isinstance(merged, dict):
                    merged = {}
                merged[key] = entry
                fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
                with os.fdopen(fd, "w") as f:
                    json.dump(merged, f, indent=1, sort_keys=True)
                os.replace(tmp, path)  # atomic: readers never see a half-written file
                self._file = {k: v for k, v in merged.items() if isinstance(v, dict)}
            except OSError:
                pass  # an unwritable cache only costs retuning in the next process


_TUNER = Autotuner()


def tuning_report() -> dict:
    """What this process's autotuner measured: ``{key: {"winner", "ms": {config name: ms}, "failed": {config
    name: error}}}`` for every key it tuned (keys served from the disk cache or the shipped table are not
    re-measured, so absent; :func:`tuning_sources` says where each came from). Implementation keys
    (``impl:<role>|...``, :func:`choose_impl`) name the runners instead of configs: ``{"triton": ms, "cudnn": ms}``.
    The benchmark stores it, so a report shows e.g. what the TMA twins measured against the pointer path."""
    with _TUNER._lock:
        return {k: {**v, "ms": dict(v["ms"]), "failed": dict(v["failed"])} for k, v in _TUNER.measured.items()}


def tuning_sources() -> dict:
    """Where this process's autotuner got each key's answer: ``{key: source}``, source one of :data:`SOURCES`
    (config keys as in :func:`tuning_report`, implementation keys ``impl:<role>|...``)."""
    with _TUNER._lock:
        return dict(_TUNER.sources)


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


def default_timer(fn: Callable[[], object]) -> float:
    """Milliseconds of one call of ``fn``: ``triton.testing.do_bench``'s median (5 ms warm-up, 25 ms of reps)."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")


def _measuring_allowed(device: torch.device, capturing, compiling) -> bool:
    """Whether a miss may be timed now: tuning is on, no CUDA graph is being captured on the current stream and
    torch.compile is not tracing (timing inside either would be recorded or traced, not run)."""
    if not Autotuner.enabled():
        return False
    if capturing is None:
        capturing = lambda: device.type == "cuda" and torch.cuda.is_current_stream_capturing()  # noqa: E731
    if compiling is None:
        compiling = torch.compiler.is_compiling
    return not capturing() and not compiling()


def choose(op: str, geometry, dtype: torch.dtype, device: torch.device, candidates, flags: tuple, launch,
           default: ConvConfig, *, identity: Optional[DeviceIdentity] = None, interpreting=None, capturing=None,
           compiling=None, timer=None) -> ConvConfig:
    """The config for one launch of kernel ``op``: pinned, else :data:`INTERPRETER_CONFIG` off the GPU, else the
    known winner among ``candidates`` (memory, cache file, shipped table: :meth:`Autotuner.find`), else the
    measured winner (timing ``launch(cfg)``), else ``default`` when tuning is off, a CUDA graph is being captured
    or torch.compile is tracing. ``launch`` must be pure: it only writes the kernel's outputs, so timing runs
    have no side effects. ``flags``: the kernel switches that enter the tuning key.

    Injectable (tests): ``identity`` (a :class:`DeviceIdentity`; given, the device counts as that GPU),
    ``interpreting``/``capturing``/``compiling`` (zero-argument predicates; default: ``TRITON_INTERPRET``,
    ``torch.cuda.is_current_stream_capturing``, ``torch.compiler.is_compiling``), ``timer(fn) -> ms``
    (default :func:`default_timer`)."""
    pinned = getattr(_PINNED, op, None)
    if pinned is not None:
        return pinned
    if (interpreting or _backend.interpreting)():
        return INTERPRETER_CONFIG
    ident = identity if identity is not None else device_identity(device)
    if ident is None:
        return INTERPRETER_CONFIG
    key = tuning_key(op, geometry, dtype, device, *flags, identity=ident)
    hit = _TUNER.lookup(key, candidates)  # this process's, an earlier one's or the shipped table's winner
    if hit is not None:
        return hit
    if not _measuring_allowed(device, capturing, compiling):
        _TUNER.note(key, "heuristic")
        return default
    timer = timer or default_timer
    return _TUNER.pick(key, candidates, lambda cfg: timer(lambda: launch(cfg)))


# ------------------------------------------------------------------------------ implementation per conv
# This project's kernels; the cuDNN composite (ATen conv + the fused kernels). A role may offer more runners
# under other names (e.g. the cuDNN composite's folded/fused forms): they are timed too but never forced.
IMPLS = ("triton", "cudnn")
_IMPL_VAR = "RESNET_FAST_CONV_IMPL"


def conv_impl_setting() -> str:
    """``RESNET_FAST_CONV_IMPL``: ``auto`` (default; measured per conv on the GPU), ``triton`` or ``cudnn``
    (forced everywhere). Case and surrounding whitespace are ignored; anything else raises ValueError."""
    raw = os.environ.get(_IMPL_VAR, "auto")
    value = raw.strip().lower() or "auto"
    if value not in ("auto",) + IMPLS:
        raise ValueError(f"{_IMPL_VAR}={raw!r}: expected one of auto, {', '.join(IMPLS)}")
    return value


def impl_heuristic(runners: Mapping) -> str:
    """The implementation when nothing was measured for a key: ``"cudnn"`` while cuDNN is enabled
    (``torch.backends.cudnn.enabled``) and the role has a cuDNN composite — the speed floor until a measurement
    shows the Triton kernels beat it — else ``"triton"`` (else the first runner: never an untimed extra form
    when one of those two is offered)."""
    if "cudnn" in runners and torch.backends.cudnn.enabled:
        return "cudnn"
    return "triton" if "triton" in runners else next(iter(runners))


def _impl_name_ok(name) -> bool:
    return isinstance(name, str) and bool(name) and "|" not in name


def _check_impl_args(role, runners) -> None:
    if not _impl_name_ok(role):
        raise ValueError(f"role={role!r}: expected a non-empty name without '|', e.g. 'conv2d'")
    if not isinstance(runners, Mapping) or not runners or not all(map(_impl_name_ok, runners)) \
            or not all(callable(r) for r in runners.values()):
        raise ValueError(f"runners={runners!r}: expected a mapping of implementation names ({', '.join(IMPLS)}, "
                         "or another name without '|') to zero-argument callables")


def choose_impl(role: str, geometry, dtype: torch.dtype, device: torch.device, switches, runners: Mapping,
                *, timer=None, identity: Optional[DeviceIdentity] = None, interpreting=None, capturing=None,
                compiling=None) -> str:
    """Which implementation runs conv role ``role`` for this geometry: ``"triton"``, ``"cudnn"`` or the name of
    another runner offered.

    Args:
        role: the op's conv role, e.g. ``"conv2d"`` (inference), ``"conv_bn_stats"`` (training forward),
            ``"conv_bn_stats_backward"``, ``"conv2d_backward"``; it names the key ``impl:<role>|...``.
        geometry: the conv's ``ConvGeometry``; dtype, device: the operands'.
        switches: the fusion switches that change the work (tuple; they enter the key like a kernel's flags).
        runners: ``{"triton": fn, "cudnn": fn}`` (or one of them), optionally more forms under other names
            (``"cudnn_conv_relu"``...): zero-argument callables that run that implementation once on the real
            operands and only write their own outputs (timing reruns them).
        timer, identity, interpreting, capturing, compiling: injectable as in :func:`choose`; ``timer(fn)`` is
            called with the runner itself and returns milliseconds.

    Rule: ``RESNET_FAST_CONV_IMPL`` forces one (ValueError when that role has no such runner); in the Triton
    interpreter or off CUDA ``auto`` means ``"triton"``; else the known choice for the key (memory, cache file,
    shipped table); else, when measuring is allowed (:func:`choose` conditions), each runner (triton, cudnn, then
    the others) is called once untimed (the Triton runner tunes its tile config there; cuDNN picks its
    algorithm), then timed; the fastest is kept in memory and the cache file and every time goes to
    :func:`tuning_report` (a runner that raises is skipped, logged and listed as failed). Otherwise
    :func:`impl_heuristic`, remembered for the process so eager, captured and compiled calls agree.
    """
    _check_impl_args(role, runners)
    setting = conv_impl_setting()
    if setting != "auto":
        if setting not in runners:
            raise ValueError(f"{_IMPL_VAR}={setting}: role {role!r} has no {setting} implementation "
                             f"(runners: {', '.join(runners)})")
        return setting
    ident = identity if identity is not None else device_identity(device)
    if (interpreting or _backend.interpreting)() or ident is None:
        return next((n for n in IMPLS if n in runners), next(iter(runners)))
    key = tuning_key("impl:" + role, geometry, dtype, device, *tuple(switches), identity=ident)

    def accept(entry):
        impl = entry.get("impl") if isinstance(entry, dict) else None
        return impl if impl in runners else None
    hit = _TUNER.find(key, accept)
    if hit is not None:
        return hit
    if len(runners) == 1:
        only = next(iter(runners))
        _TUNER.remember(key, {"impl": only}, "single")
        return only
    if not _measuring_allowed(device, capturing, compiling):
        choice = impl_heuristic(runners)
        _TUNER.remember(key, {"impl": choice}, "heuristic")
        return choice
    timer = timer or default_timer
    ms, failed = {}, {}
    for name in [n for n in IMPLS if n in runners] + [n for n in runners if n not in IMPLS]:
        run = runners[name]
        try:
            run()  # untimed first call: compiles / tunes what it needs
            ms[name] = float(timer(run))
        except Exception as exc:  # one implementation cannot run this conv: the other wins, and it is said
            failed[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
            _backend.log.warning("autotune %s: implementation %s failed and is skipped (%s)", key, name,
                                 failed[name])
    winner = min(ms, key=ms.get) if ms else impl_heuristic(runners)
    with _TUNER._lock:
        _TUNER.measured[key] = {"winner": winner, "ms": dict(ms), "failed": failed}
    if ms:
        _TUNER._store(key, {"impl": winner, "ms": dict(ms)})
    return winner
