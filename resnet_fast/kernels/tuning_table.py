"""Tuning keys, the device identity, the user's cache file, and the shipped tuning table (format, loader,
exporter).

* :func:`tuning_key` — the autotuner's key of a launch: the op, the geometry except the batch and spatial size
  (the GEMM row count is bucketed coarsely, powers of 4, so a new batch size does not retune), the dtype, the
  device's :class:`DeviceIdentity` (name and compute capability) and the kernel switches.
* :func:`cache_path` — the user's cache file of measured winners, under ``$RESNET_FAST_CACHE_DIR`` (default
  ``~/.cache/resnet_fast``), one per Triton version.
* :func:`table_key`, :func:`load`, :func:`check_entry`, :func:`config_from_entry` — the shipped table below;
  :func:`export`, :func:`main` — its exporter.

The autotuner that reads all of this is :mod:`.autotune` (it imports this module, never the reverse).

A shipped table is ``resnet_fast/kernels/tuned/<arch>.json`` (``sm_90.json`` serves every sm_90 GPU: H100, H200).
The autotuner (:class:`~resnet_fast.kernels.autotune.Autotuner`) reads it after this process's memory and the
user's cache file, before tuning, so a fresh install starts with a GPU run's winners and tunes only what the
table lacks. ``RESNET_FAST_RETUNE=1`` ignores it (and the cache file). Format, version 1::

    {"format": "resnet_fast.tuning_table", "version": 1, "arch": "sm_90",
     "provenance": {"gpu": "NVIDIA H200", "torch": "2.13.0", "triton": "3.9.0", "cuda": "13.0",
                    "date": "2026-12-01T06:00:00Z", "source": "autotune-triton3.9.0.json", "entries": 2},
     "entries": {
       "conv_fwd|64|64|3|3|(1, 1)|(1, 1)|(1, 1)|1|4096|float16|sm_90|False|True":
           {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4,
            "tma": false},
       "impl:conv2d|64|64|3|3|(1, 1)|(1, 1)|(1, 1)|1|4096|float16|sm_90": {"impl": "cudnn",
                                                                        "ms": {"triton": 0.2, "cudnn": 0.1}}}}

Keys are :func:`tuning_key` keys with the device name and capability replaced by the arch (:func:`table_key`),
so they never depend on the GPU's marketing name.
Values are config entries (``asdict(ConvConfig)``) or, under ``impl:<role>`` keys, implementation entries.
The table is used whatever Triton version runs (its winners stay valid configs; they may just be less fast
with another compiler): an entry that is not among a launch's candidates is skipped at lookup.

A missing table is normal (no warning). An unusable one — bad JSON, another format, version or arch — is
ignored whole; malformed entries (not a valid ConvConfig / implementation) and entries that are not among the
candidates for their key are ignored one by one. Either way the file logs ONE warning (``resnet_fast`` logger).

Exporter (run it on the GPU machine after a run that tuned, then commit the file)::

    python -m resnet_fast.kernels.tuning_table export --arch sm_90 -o resnet_fast/kernels/tuned/sm_90.json
    python -m resnet_fast.kernels.tuning_table export --from CACHE.json --arch sm_90 --gpu "NVIDIA H200" -o F
    python -m resnet_fast.kernels.tuning_table show resnet_fast/kernels/tuned/sm_90.json

``--from`` defaults to this machine's cache file (:func:`cache_path`); in Python,
:func:`resnet_fast.kernels.autotune.export_table` also takes what this process tuned. Only the entries of
``--arch`` are exported; a cache holding winners of several GPUs of that arch needs ``--gpu`` to pick one.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import fields
from typing import NamedTuple, Optional

import torch

from .. import _backend
from .configs import ConvConfig

__all__ = ["DeviceIdentity", "device_identity", "tuning_key", "TableKey", "table_key", "cache_path", "FORMAT",
           "VERSION", "TABLE_DIR", "TuningTable", "table_path", "check_entry", "config_from_entry", "load",
           "load_arch", "read_cache", "export", "write", "main"]


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


# ---------------------------------------------------------------- the table file (format: see above)
FORMAT = "resnet_fast.tuning_table"
VERSION = 1
TABLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned")


class TuningTable:
    """A loaded table (the module docstring documents the file): ``entries`` ({table key: entry}, malformed
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


def check_entry(key: str, entry) -> Optional[str]:
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


def load(path: str, arch: str) -> Optional[TuningTable]:
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
    if not isinstance(doc, dict) or doc.get("format") != FORMAT \
            or type(doc.get("version")) is not int or doc["version"] != VERSION:
        got = (doc.get("format"), doc.get("version")) if isinstance(doc, dict) else type(doc).__name__
        _table_warning(path, f"ignored: format/version {got}, expected ({FORMAT!r}, {VERSION})")
        return None
    if doc.get("arch") != arch or not isinstance(doc.get("entries"), dict):
        _table_warning(path, f"ignored: arch {doc.get('arch')!r} (expected {arch!r}) or no 'entries' object")
        return None
    entries, bad = {}, []
    for key, entry in doc["entries"].items():
        reason = check_entry(key, entry)
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



def _impl_name_ok(name) -> bool:
    return isinstance(name, str) and bool(name) and "|" not in name



_CONFIG_FIELDS = frozenset(f.name for f in fields(ConvConfig))
_REQUIRED_FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
_BOOL_FIELDS = tuple(f.name for f in fields(ConvConfig) if f.type in (bool, "bool"))


def config_from_entry(entry) -> Optional[ConvConfig]:
    """The :class:`ConvConfig` a cache or table entry (``asdict(cfg)``) describes, or None when it is not one:
    unknown or missing tile fields, or values of the wrong type (positive ints; ``tma``, ``prologue_pass``,
    ``row_taps``, ``persistent`` bools).
    Entries written before a field existed (no ``tma``) still read, with the field's default."""
    if not isinstance(entry, dict) or not set(entry) <= _CONFIG_FIELDS \
            or not all(k in entry for k in _REQUIRED_FIELDS):
        return None
    for k, v in entry.items():
        ok = isinstance(v, bool) if k in _BOOL_FIELDS else (isinstance(v, int) and not isinstance(v, bool) and v > 0)
        if not ok:
            return None
    return ConvConfig(**entry)


# ---------------------------------------------------------------- exporter
def load_arch(arch: str, table_dir: Optional[str] = None) -> Optional[TuningTable]:
    """The shipped table for ``arch`` (:func:`table_path`), or None (see :func:`load`)."""
    return load(table_path(arch, table_dir), arch)


def export(cache: Optional[dict] = None, arch: Optional[str] = None, gpu: Optional[str] = None,
           source: str = "") -> dict:
    """A table document (the format above) from the GPU tuning keys of ``cache`` ({tuning key: entry}, as in the
    cache file) for ``arch`` (default: this machine's GPU). ``cache`` None: this machine's cache file
    (:func:`resnet_fast.kernels.autotune.export_table` adds what this process tuned). ``gpu``: keep only that
    device name's entries; required when the arch's entries come from several GPUs. Malformed entries are skipped.
    ValueError (naming the argument) when nothing is left."""
    if cache is None:
        cache = read_cache(cache_path())
        source = source or os.path.basename(cache_path())
    if arch is None:
        if not torch.cuda.is_available():
            raise ValueError("arch: no CUDA device here to take it from; pass e.g. arch='sm_90'")
        arch = device_identity(torch.device("cuda")).arch
    entries, names = {}, {}
    for key, entry in sorted(cache.items()):
        tk = table_key(key)
        if tk is None or tk.arch != arch or (gpu is not None and tk.device != gpu):
            continue
        if check_entry(tk.key, entry) is not None:
            continue
        if not tk.key.startswith("impl:"):
            entry = dict(vars(config_from_entry(entry)))  # every field, defaults included
        entries[tk.key] = entry
        names[tk.device] = names.get(tk.device, 0) + 1
    if len(names) > 1:
        raise ValueError(f"gpu: the cache holds {arch} winners of several GPUs ({names}); pass one of them")
    if not entries:
        raise ValueError(f"arch: no valid {arch} entries" + (f" of gpu {gpu!r}" if gpu else "") + " in the cache")
    import triton
    provenance = {"gpu": next(iter(names)), "torch": torch.__version__, "triton": triton.__version__,
                  "cuda": torch.version.cuda, "source": source, "entries": len(entries),
                  "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    return {"format": FORMAT, "version": VERSION, "arch": arch, "provenance": provenance, "entries": entries}


def read_cache(path: str) -> dict:
    """The cache file at ``path`` ({tuning key: entry}); OSError or ValueError when it is missing or not one."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a tuning cache (a JSON object of tuning key -> entry)")
    return data


def write(doc: dict, path: str) -> None:
    """Write a table document atomically (readers never see half a file)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m resnet_fast.kernels.tuning_table", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="write a table from a tuning cache")
    ex.add_argument("--from", dest="src", default=None, help="cache JSON (default: this machine's cache file)")
    ex.add_argument("--arch", default=None, help="e.g. sm_90 (default: this machine's GPU)")
    ex.add_argument("--gpu", default=None, help="only this device name's entries (e.g. 'NVIDIA H200')")
    ex.add_argument("-o", "--output", required=True, help="table file, e.g. resnet_fast/kernels/tuned/sm_90.json")
    sh = sub.add_parser("show", help="validate a table and print its provenance and entry count")
    sh.add_argument("path")
    sh.add_argument("--arch", default=None, help="expected arch (default: the file name's)")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "export":
            src = args.src or cache_path()
            doc = export(read_cache(src), args.arch, args.gpu, source=os.path.basename(src))
            write(doc, args.output)
            print(f"wrote {args.output}: {len(doc['entries'])} {doc['arch']} entries of {doc['provenance']['gpu']}")
        else:
            arch = args.arch or os.path.splitext(os.path.basename(args.path))[0]
            table = load(args.path, arch)
            if table is None:
                print(f"{args.path}: missing or unusable (see the warning above)", file=sys.stderr)
                return 1
            print(json.dumps({"arch": table.arch, "provenance": table.provenance, "entries": len(table.entries),
                              "malformed": table.warned}, indent=1))
            return 1 if table.warned else 0
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
