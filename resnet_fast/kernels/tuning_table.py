"""The shipped tuning table: a GPU run's autotune winners, committed per GPU architecture.

A table is ``resnet_fast/kernels/tuned/<arch>.json`` (``sm_90.json`` serves every sm_90 GPU: H100, H200).
The autotuner (:class:`~resnet_fast.kernels.configs.Autotuner`) reads it after this process's memory and the
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

Keys are :func:`~resnet_fast.kernels.configs.tuning_key` keys with the device name and capability replaced by
the arch (:func:`~resnet_fast.kernels.configs.table_key`), so they never depend on the GPU's marketing name.
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

``--from`` defaults to this machine's cache file (``configs.cache_path()``); in Python, :func:`export` with no
cache also takes what this process tuned. Only the entries of ``--arch`` are exported; a cache holding winners
of several GPUs of that arch needs ``--gpu`` to pick one.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from typing import Optional

import torch

from . import configs

# The loader lives in configs (the autotuner reads tables; this module, the exporter, imports configs).
FORMAT, VERSION, TABLE_DIR = configs.TABLE_FORMAT, configs.TABLE_VERSION, configs.TABLE_DIR
TuningTable, table_path, check_entry, load = (configs.TuningTable, configs.table_path, configs.check_table_entry,
                                              configs.load_table)

__all__ = ["FORMAT", "VERSION", "TABLE_DIR", "TuningTable", "table_path", "check_entry", "load", "load_arch",
           "export", "write", "main"]


def load_arch(arch: str, table_dir: Optional[str] = None) -> Optional[TuningTable]:
    """The shipped table for ``arch`` (:func:`table_path`), or None (see :func:`load`)."""
    return load(table_path(arch, table_dir), arch)


def export(cache: Optional[dict] = None, arch: Optional[str] = None, gpu: Optional[str] = None,
           source: str = "") -> dict:
    """A table document (the format above) from the GPU tuning keys of ``cache`` ({tuning key: entry}, as in the
    cache file) for ``arch`` (default: this machine's GPU). ``cache`` None: this machine's cache file plus what
    this process tuned. ``gpu``: keep only that device name's entries; required when the arch's entries come from
    several GPUs. Malformed entries are skipped. ValueError (naming the argument) when nothing is left."""
    if cache is None:
        cache = _read_cache(configs.cache_path())
        with configs._TUNER._lock:
            cache.update({k: v for k, v in configs._TUNER._mem.items()
                          if configs._TUNER.sources.get(k) == "tuned"})
        source = source or os.path.basename(configs.cache_path())
    if arch is None:
        if not torch.cuda.is_available():
            raise ValueError("arch: no CUDA device here to take it from; pass e.g. arch='sm_90'")
        arch = configs.device_identity(torch.device("cuda")).arch
    entries, names = {}, {}
    for key, entry in sorted(cache.items()):
        tk = configs.table_key(key)
        if tk is None or tk.arch != arch or (gpu is not None and tk.device != gpu):
            continue
        if check_entry(tk.key, entry) is not None:
            continue
        if not tk.key.startswith("impl:"):
            entry = dict(vars(configs.config_from_entry(entry)))  # every field, defaults included
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


def _read_cache(path: str) -> dict:
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
            src = args.src or configs.cache_path()
            doc = export(_read_cache(src), args.arch, args.gpu, source=os.path.basename(src))
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
