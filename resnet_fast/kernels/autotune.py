"""The autotuner with its persistent on-disk cache, the per-launch config choice, and the per-conv implementation
choice.

* :class:`Autotuner` — picks the fastest candidate once per key, remembers it in memory and in the user's JSON
  cache file (:func:`.tuning_table.cache_path`), so a second process does not retune. Keys come from
  :func:`.tuning_table.tuning_key`. ``RESNET_FAST_AUTOTUNE=0`` disables tuning (the shape heuristic decides).
  Lookup order per key: this process's memory, the user's cache file, the shipped tuning table of the GPU's
  architecture (:mod:`.tuning_table`, keyed by :func:`.tuning_table.table_key`: the device name replaced by
  ``sm_XY``), then tuning. ``RESNET_FAST_RETUNE=1`` skips the cache file and the table (and still stores what it
  measures). :func:`tuning_report` returns what it measured in this process (every candidate's time, failures);
  :func:`tuning_sources` where each key's answer came from; :func:`export_table` a table document of this
  machine's cache file plus what this process tuned.
* :func:`choose` — the one selection policy of every conv launcher (forward, dgrad, wgrad): a config pinned
  with :func:`pinned_config`, else the interpreter's, else the tuned winner, else the heuristic's choice.
* :func:`choose_impl` — per conv, which implementation runs: this project's Triton kernels or the cuDNN
  composite (``RESNET_FAST_CONV_IMPL`` = ``auto|triton|cudnn``, :func:`conv_impl_setting`); under ``auto``
  both are timed once per key on the GPU and the faster is kept like a config.

The device identity (:class:`.tuning_table.DeviceIdentity`) and the "interpreting / capturing / compiling"
predicates can be injected into :func:`choose` and :func:`choose_impl`, so CPU tests exercise the GPU lookup and
timing paths. The candidates, the untuned default and the kernel switches come from :mod:`.configs`.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from dataclasses import asdict
from typing import Callable, Mapping, Optional

import torch

from .. import _backend
from . import tuning_table
from .configs import INTERPRETER_CONFIG, ConvConfig, _switched_off, _switched_on
from .tuning_table import DeviceIdentity, _impl_name_ok, cache_path, config_from_entry, device_identity, \
    table_key, table_path, tuning_key

__all__ = ["Autotuner", "SOURCES", "tuning_report", "tuning_sources", "export_table", "choose", "pinned_config",
           "default_timer", "IMPLS", "conv_impl_setting", "impl_heuristic", "choose_impl"]


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

    Lookup order: memory, the cache file (:func:`.tuning_table.cache_path`), the table ``<table_dir>/<arch>.json``
    for the arch in the key (:func:`.tuning_table.table_key`; ``table_dir`` defaults to the package's
    ``kernels/tuned``). With ``RESNET_FAST_RETUNE=1`` only memory is read. Besides config entries (``asdict(cfg)``)
    the cache and the table hold implementation entries ``{"impl": "cudnn", "ms": {...}}`` under ``impl:<role>``
    keys (:func:`choose_impl`).
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
            self._tables[arch] = tuning_table.load(table_path(arch, self._table_dir), arch)
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


def export_table(arch: Optional[str] = None, gpu: Optional[str] = None) -> dict:
    """:func:`.tuning_table.export` of this machine's cache file plus what this process tuned (its measured
    winners, also those the file could not take). OSError/ValueError as :func:`.tuning_table.read_cache` when the
    cache file is missing or not a cache."""
    path = cache_path()
    cache = tuning_table.read_cache(path)
    with _TUNER._lock:
        cache.update({k: v for k, v in _TUNER._mem.items() if _TUNER.sources.get(k) == "tuned"})
    return tuning_table.export(cache, arch, gpu, source=os.path.basename(path))


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
