"""Compile every Triton kernel config for Hopper (sm_90) without a GPU and check the generated code.

Run: ``python -m resnet_fast.kernels.compile_check [--json PATH] [--only MODULE]`` with ``TRITON_INTERPRET``
unset (the interpreter replaces the compiler). Exit status 0 when every check passes.

Contract for kernel modules: any module in :mod:`resnet_fast.kernels` may define ``compile_specs()``
returning a list of 5-tuples ``(jit_fn, signature, constexprs, options, is_gemm)`` (or 6-tuples ending in
``div16``):

* ``jit_fn``: the ``@triton.jit`` function;
* ``signature``: ``{arg_name: type}`` for EVERY argument in the kernel's order, types as Triton spells them
  (``"*fp16"``, ``"*bf16"``, ``"*fp32"``, ``"*i32"``, ``"i32"``, ``"i64"``, ``"fp32"``, and ``"constexpr"``
  for each constexpr argument);
* ``constexprs``: ``{arg_name: value}`` for the constexpr arguments;
* ``options``: ``{"num_warps": int, "num_stages": int}``;
* ``is_gemm``: True when the kernel's inner loop is a ``tl.dot`` that must lower to ``wgmma`` on sm_90;
  a spec with a ``tensordesc<...>`` argument must also load through TMA (``cp.async.bulk.tensor``);
* ``div16`` (optional): names of integer arguments to treat as multiples of 16, as Triton's launcher
  specialises them at run time for such values (e.g. channel counts).

Pointer arguments are compiled as 16-byte aligned (``tt.divisibility=16``), which is what Triton's launcher
specialises for every fresh PyTorch allocation; without it the PTX would show the unaligned fallback
(scalar loads, no cp.async pipelining) that real launches never use.

Each spec is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` in a pool of
2 processes, then checked: (1) GEMM kernels contain ``wgmma`` in their PTX, and kernels given TMA descriptors
``cp.async.bulk.tensor``; (2) Triton's own ``ptxas -v`` run (its log, :func:`compile_checked`: the cubin that
runs, one ptxas run per spec) reports 0 bytes of spill stores and loads; (3) shared memory fits Hopper's 227 KB
per block. Where Triton's cache served a cubin compiled before the log was kept, ``ptxas -arch=sm_90a -v`` runs
here: Triton's bundled one (the toolkit's may reject the newer PTX version Triton emits), else
``$CUDA_HOME/bin``, ``/usr/local/cuda/bin`` or ``PATH``.

To check against another Triton (the GPU machine has 3.6): ``pip install --no-deps --target DIR triton==3.6.0``
and run with ``PYTHONPATH=DIR``; the summary line names the version that compiled.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import importlib
import io
import json
import multiprocessing as mp
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time

HOPPER_SMEM = 232448  # bytes of shared memory one block may use on sm_90 (227 KB)
_SKIP = {"compile_check", "configs", "conv_common", "cost_report"}


def kernel_modules(only: str | None = None) -> list:
    """Names of the resnet_fast.kernels submodules that define compile_specs()."""
    import resnet_fast.kernels as pkg
    names = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name in _SKIP or (only and info.name != only):
            continue
        mod = importlib.import_module(f"resnet_fast.kernels.{info.name}")
        if callable(getattr(mod, "compile_specs", None)):
            names.append(info.name)
    return sorted(names)


def find_ptxas() -> str | None:
    """Triton's bundled ptxas (it knows the PTX version Triton emits), else the CUDA toolkit's."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        try:
            tool = get_ptxas(90)  # triton >= 3.5 takes the arch
        except TypeError:
            tool = get_ptxas()
        path = getattr(tool, "path", None) or (tool[0] if isinstance(tool, (tuple, list)) else None)
        if path and os.path.exists(path):
            return path
    except Exception:  # API differs across Triton versions: fall back to the toolkit
        pass
    for base in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if base and os.path.exists(os.path.join(base, "bin", "ptxas")):
            return os.path.join(base, "bin", "ptxas")
    return shutil.which("ptxas")


_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def parse_usage(log: str) -> dict | None:
    """Registers and spill bytes from a ``ptxas -v`` log (None when it reports no register count)."""
    spills = [tuple(map(int, m)) for m in _SPILL.findall(log)]
    regs = [int(m) for m in _REGS.findall(log)]
    if not regs:
        return None
    return {"registers": max(regs), "spill_stores": sum(s for s, _ in spills),
            "spill_loads": sum(ld for _, ld in spills)}


def ptxas_usage(ptx: str, ptxas: str) -> dict:
    """Registers and spill bytes of the PTX's kernel per ``ptxas -arch=sm_90a -v`` (our own run: the fallback
    of :func:`compile_checked` where Triton's log is not to be had; its flags may differ from Triton's)."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, "-arch=sm_90a", "-v", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True)
    log = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed: {log.strip()[-2000:]}")
    return parse_usage(log) or {"registers": None, "spill_stores": 0, "spill_loads": 0}


def _describe(sig: dict, cx: dict, opts: dict) -> str:
    ptr_types = sorted({t for t in sig.values() if t.startswith("*") and t not in ("*fp32", "*i32")}
                       | {"desc:" + t[11:].split("[")[0] for t in sig.values() if t.startswith("tensordesc<")})
    blocks = "x".join(str(cx[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in cx)
    flags = ",".join(k for k, v in cx.items() if v is True)
    return (f"{'/'.join(ptr_types) or 'fp32'} {blocks} w{opts.get('num_warps')} s{opts.get('num_stages')}"
            + (f" [{flags}]" if flags else ""))


def compile_sm90(fn, sig: dict, cx: dict, opts: dict, div16=()):
    """``triton.compile`` of one spec for sm_90 with 16-byte-aligned pointers and ``div16`` integer arguments
    (the launcher's specialisation, see the module docstring); the compiled kernel (``.asm["ptx"]``,
    ``.asm["cubin"]``, ``.metadata``). Shared with :mod:`.cost_report`, so both compile identical specs
    identically (and Triton's on-disk cache serves the second)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    div16 = set(div16)
    attrs = {(i,): [["tt.divisibility", 16]] for i, (arg, ty) in enumerate(sig.items())
             if ty.startswith("*") or arg in div16}
    src = ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(opts))


_USAGE_FILE = "resnet_fast_ptxas_usage.json"  # kept in Triton's cache entry, beside the cubin it describes


def compile_checked(fn, sig: dict, cx: dict, opts: dict, div16=(), ptxas: str | None = None) -> tuple:
    """(compiled kernel, usage) of :func:`compile_sm90`: usage is the registers and spill bytes of the cubin
    Triton built, from Triton's own ``ptxas -v`` log (``TRITON_DUMP_PTXAS_LOG``, its flags, one ptxas run per
    spec). The usage is stored in the kernel's Triton cache entry, so a cache hit (no ptxas run, no log) reads it
    there; a cubin cached without it falls back to running ``ptxas`` on the PTX here."""
    from triton.runtime.cache import get_cache_manager
    buf, was = io.StringIO(), os.environ.get("TRITON_DUMP_PTXAS_LOG")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    try:
        with contextlib.redirect_stdout(buf):
            ck = compile_sm90(fn, sig, cx, opts, div16)
    finally:
        if was is None:
            del os.environ["TRITON_DUMP_PTXAS_LOG"]
        else:
            os.environ["TRITON_DUMP_PTXAS_LOG"] = was
    key = getattr(ck, "hash", None)  # the cache key of the compiled kernel (older Tritons may not expose it)
    cache = get_cache_manager(key) if key else None
    usage = parse_usage(buf.getvalue())
    if usage is not None:
        if cache is not None:
            cache.put(json.dumps(usage), _USAGE_FILE, binary=False)
        return ck, usage
    path = cache.get_file(_USAGE_FILE) if cache is not None else None
    if path:
        with open(path) as f:
            return ck, json.load(f)
    if not ptxas:
        return ck, {"registers": None, "spill_stores": None, "spill_loads": None}
    return ck, ptxas_usage(ck.asm["ptx"], ptxas)


def compile_one(job: tuple) -> dict:
    """Compile spec ``index`` of module ``name`` for sm_90 and check it (runs in a pool worker)."""
    name, index, ptxas = job
    mod = importlib.import_module(f"resnet_fast.kernels.{name}")
    fn, sig, cx, opts, is_gemm, *rest = mod.compile_specs()[index]
    row = {"module": name, "kernel": fn.__name__, "spec": _describe(sig, cx, opts), "is_gemm": bool(is_gemm)}
    t0 = time.time()
    try:
        ck, usage = compile_checked(fn, sig, cx, opts, rest[0] if rest else (), ptxas)
        ptx = ck.asm["ptx"]
        row["wgmma"] = "wgmma" in ptx
        row["tma"] = "cp.async.bulk.tensor" in ptx
        row["shared"] = int(getattr(ck.metadata, "shared", 0) or 0)
        row.update(usage)
        problems = []
        if is_gemm and not row["wgmma"]:
            problems.append("no wgmma in PTX")
        if any(t.startswith("tensordesc") for t in sig.values()) and not row["tma"]:
            problems.append("TMA descriptors given but no cp.async.bulk.tensor in PTX")
        if row["spill_stores"] or row["spill_loads"]:
            problems.append(f"spills {row['spill_stores']}B stores / {row['spill_loads']}B loads")
        if row["shared"] > HOPPER_SMEM:
            problems.append(f"shared memory {row['shared']} > {HOPPER_SMEM}")
        if row["spill_stores"] is None:
            problems.append("no ptxas log and no ptxas found: spills not checked")
        row["problems"] = problems
    except Exception as exc:  # report, don't crash the whole run
        row["problems"] = [f"compile failed: {type(exc).__name__}: {str(exc)[:500]}"]
    row["seconds"] = round(time.time() - t0, 2)
    row["ok"] = not row["problems"]
    return row


def run(only: str | None = None, workers: int = 2) -> list:
    """Compile and check every spec of every kernel module; returns one dict per spec."""
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
        raise RuntimeError("compile_check: unset TRITON_INTERPRET (the interpreter does not compile kernels)")
    ptxas = find_ptxas()
    jobs = []
    for name in kernel_modules(only):
        mod = importlib.import_module(f"resnet_fast.kernels.{name}")
        jobs += [(name, i, ptxas) for i in range(len(mod.compile_specs()))]
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        return list(pool.map(compile_one, jobs))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", help="one kernel module, e.g. conv_fwd")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    t0 = time.time()
    rows = run(args.only, args.workers)
    for r in rows:
        print(f"{'OK ' if r['ok'] else 'BAD'} {r['module']:<12} {r['kernel']:<26} {r['spec']:<44} "
              f"wgmma={r.get('wgmma')} regs={r.get('registers')} spill={r.get('spill_stores')}/"
              f"{r.get('spill_loads')} smem={r.get('shared')} {r['seconds']}s"
              + (f"  <- {'; '.join(r['problems'])}" if r["problems"] else ""))
    bad = [r for r in rows if not r["ok"]]
    import triton
    print(f"{len(rows)} specs, {len(bad)} failing, {time.time() - t0:.1f}s (triton {triton.__version__}, sm_90)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if bad or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
