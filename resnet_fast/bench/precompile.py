"""Warm Triton's cache for a GPU session in parallel, or count the compiles a session's plan asks for.

``python -m resnet_fast.bench.precompile [--workers 16] [--batch 256] [--smoke-batch 8] [--json PATH]``

On a GPU: (1) one process runs :func:`exercise` — the launches of the benchmark's block/stem/conv rows at
``--batch`` and of the smoke at ``--smoke-batch`` — under :func:`.compiles.recording`: every Triton cache miss
hands over Triton's own ``specialization_data`` and is skipped (nothing compiles or runs; the autotuner "times"
every candidate at a constant, into a scratch ``RESNET_FAST_CACHE_DIR``, so each candidate is recorded). (2)
``--workers`` spawned processes compile the distinct records with ``JITFunction.preload`` into
``TRITON_CACHE_DIR``. The session's later steps then load those kernels from disk; their compile counter
(:mod:`.compiles`) reports what still compiled and how many loads were cache hits, which is the measure of
how well this step covered them. It never changes results: a kernel it missed simply compiles when first
launched, as without it.

``--count`` (no GPU needed; runs in the Triton interpreter): the same :func:`exercise` with every kernel
replaced by a recorder and every tuner offering all its candidates, then prints how many distinct
``(kernel, constexprs, num_warps, num_stages)`` compiles the plan asks for per kernel, and how many with an
approximation of Triton's argument specialisation (16-divisibility of integers, pointer alignment, dtypes).
fp16 stands in for bf16 there (the interpreter's bf16 ``tl.dot`` is wrong; the candidate lists are the same).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

_CHILD = "RESNET_FAST_PRECOMPILE_CHILD"
_NOT_KERNEL_MODULES = {"autotune", "compile_check", "configs", "conv_common", "checks", "cost_report", "cost_targets",
                       "tuning_table", "_interpreter_compat"}


def kernel_modules() -> list:
    """Every ``resnet_fast.kernels`` submodule that may define Triton kernels."""
    import pkgutil
    import resnet_fast.kernels as pkg
    return [i.name for i in pkgutil.iter_modules(pkg.__path__) if i.name not in _NOT_KERNEL_MODULES]


def exercise(device: torch.device, dtype: torch.dtype, batch: int, smoke_batch: int, log=print,
             parts=("blocks", "stem", "convs", "smoke")) -> None:
    """Make the Triton launches of a GPU session: the fused blocks (train fwd+bwd, eval) and the stem of
    ResNet-50 at ``batch`` (224 px, channels_last, autocast ``dtype``), the conv suite's ``ops.conv2d`` roles at
    ``batch``, and the smoke's roles at ``smoke_batch``. Outputs are not checked (under recording they are
    garbage)."""
    from .. import ops
    from . import impls, reference, shapes, smoke
    CL = torch.channels_last
    amp = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 else contextlib.nullcontext

    def guarded(what, fn):
        try:
            fn()
        except Exception as exc:  # noqa: BLE001  (a part that fails only leaves its kernels uncompiled)
            log(f"precompile: {what}: {type(exc).__name__}: {str(exc)[:200]}")

    if "blocks" in parts:
        for shape in shapes.blocks("resnet50"):
            def block(shape=shape):
                m = impls.rf_block(shape, reference.block(shape)).to(device, memory_format=CL)
                x = torch.randn(batch, shape.inplanes, shape.h, shape.w, device=device).contiguous(memory_format=CL)
                with amp():
                    out = m.train()(x.requires_grad_(True))
                out.float().sum().backward()
                with torch.no_grad(), amp():
                    m.eval()(x.detach())
            guarded(f"block {shape.name}", block)
    if "stem" in parts:
        def stem():
            ref = reference.model("resnet50")
            m = impls.rf_model("resnet50", ref).to(device, memory_format=CL)
            x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=CL)
            head = torch.nn.Sequential(m.conv1, m.bn1, m.relu)
            with amp():
                out = head.train()(x)
            out.float().sum().backward()
            with torch.no_grad(), amp():
                head.eval()(x)
        guarded("stem", stem)
    if "convs" in parts:
        for c in shapes.convs("resnet50"):
            def conv(c=c):
                conv_m, bn = impls.conv_module(c)
                kw = dict(stride=c.stride, padding=c.padding, groups=c.groups)
                x = torch.randn(batch, c.cin, c.h, c.w, device=device, dtype=dtype).contiguous(memory_format=CL)
                w = conv_m.weight.detach().to(device, dtype).contiguous(memory_format=CL)
                scale, shift = impls.fold(bn.to(device))
                with torch.no_grad():
                    ops.conv2d(x, w, scale=scale, shift=shift, relu=True, **kw)
                xl, wl = x.requires_grad_(True), w.requires_grad_(True)
                y = ops.conv2d(xl, wl, **kw)
                torch.autograd.grad(y, (xl, wl), torch.randn_like(y))
            guarded(f"conv {c.name}", conv)
    if "smoke" in parts:  # as the smoke runs (smoke.smoke_env): Triton kernels untuned, blocks/stem at its batch
        with smoke.smoke_env():
            exercise(device, dtype, smoke_batch, smoke_batch, log, parts=("blocks", "stem"))
            _smoke_convs(device, dtype, smoke_batch)


def _smoke_convs(device, dtype, smoke_batch):
    """The smoke's per-conv roles (its references run too; their results are not looked at)."""
    from . import smoke
    s = smoke.Smoke(device, budget_s=1e9, log=lambda *a: None)
    s.ref_dtype = torch.float32
    name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    jobs, _tails, _model, _, main, _other = smoke.plan(torch.device("cuda"), False, smoke_batch)
    for c, dt in jobs:
        smoke.conv_checks(s, c, name if dt == main else dt, smoke_batch)
    for c in smoke.twin_shapes(jobs, main):  # its pinned persistent twins
        smoke.conv_checks(s, c, name, smoke_batch, twins=True)


# ---- counting without a GPU (interpreter) ----------------------------------------------------------------

class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the launch's compile key and runs nothing."""

    def __init__(self, name: str, seen: dict):
        self.name, self.seen = name, seen

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            cfg = tuple(sorted((k, v) for k, v in kwargs.items() if not isinstance(v, torch.Tensor)))
            spec = tuple(_arg_spec(a) for a in list(args) + [v for v in kwargs.values()
                                                              if isinstance(v, torch.Tensor)])
            self.seen.setdefault((self.name, cfg), set()).add(spec)
        return launch


def _arg_spec(a) -> str:
    if isinstance(a, torch.Tensor):
        return f"{a.dtype}{':16' if a.data_ptr() % 16 == 0 else ''}"
    if isinstance(a, bool):
        return f"b{a}"
    if isinstance(a, int):
        return "1" if a == 1 else ("D" if a % 16 == 0 else ("i64" if abs(a) >= 2 ** 31 else "i"))
    if isinstance(a, float):
        return "f"
    if a is None:
        return "None"
    return type(a).__name__ + str(getattr(a, "block_shape", ""))


@contextlib.contextmanager
def counting(seen: dict, tuned: dict):
    """Every kernel of :func:`kernel_modules` replaced by a recorder; ``autotune.choose`` launches a pinned config,
    else every candidate it is offered (as a tuning run would), and returns the untuned default."""
    import importlib
    from ..kernels import autotune, tuning_table
    mods = [importlib.import_module(f"resnet_fast.kernels.{m}") for m in kernel_modules()]
    saved = []
    for mod in mods:
        for attr, val in list(vars(mod).items()):
            if type(val).__name__ in ("JITFunction", "InterpretedFunction"):
                saved.append((mod, attr, val))
                setattr(mod, attr, _Recorder(attr, seen))

    def choose(op, geometry, dtype, device, candidates, flags, launch, default, **_):
        pinned = getattr(autotune._PINNED, op, None)  # a pin wins, as in autotune.choose (the smoke's twins)
        if pinned is not None:
            launch(pinned)
            return pinned
        if not autotune.Autotuner.enabled():  # tuning off: the default is all that runs
            launch(default)
            return default
        key = tuning_table.tuning_key(op, geometry, dtype, device, *flags)
        if key not in tuned:
            tuned[key] = len(candidates)
            for cfg in candidates:
                launch(cfg)
        return default
    targets = [autotune] + [m for m in mods if hasattr(m, "choose")]
    prev = [(m, m.choose) for m in targets]
    for m in targets:
        m.choose = choose
    try:
        yield
    finally:
        for mod, attr, val in saved:
            setattr(mod, attr, val)
        for m, fn in prev:
            m.choose = fn


def count(batch: int, smoke_batch: int, log=print) -> dict:
    """Compiles asked for by the benchmark rows (tuned: every candidate) and by the smoke (untuned), apart and
    together (a kernel both ask for compiles once)."""
    out = {"batch": batch, "smoke_batch": smoke_batch}
    union: dict = {}
    for part, parts in (("benchmark", ("blocks", "stem", "convs")), ("smoke", ("smoke",))):
        seen: dict = {}
        tuned: dict = {}
        t0 = time.perf_counter()
        with counting(seen, tuned):
            exercise(torch.device("cpu"), torch.float16, batch, smoke_batch, log=log, parts=parts)
        for k, v in seen.items():
            union.setdefault(k, set()).update(v)
        out[part] = {**_tally(seen), "tuned_keys": len(tuned), "tuning_candidates": sum(tuned.values()),
                     "seconds": round(time.perf_counter() - t0, 1)}
    out["both"] = _tally(union)
    return out


def _tally(seen: dict) -> dict:
    per = collections.Counter(name for name, _ in seen)
    per_spec = collections.Counter()
    for (name, _), specs in seen.items():
        per_spec[name] += len(specs)
    return {"compiles": sum(per.values()), "compiles_with_arg_specialisation": sum(per_spec.values()),
            "by_kernel": dict(per), "by_kernel_with_arg_specialisation": dict(per_spec)}


# ---- the GPU step ----------------------------------------------------------------------------------------

def warm(batch: int, smoke_batch: int, workers: int, log=print, budget_s: Optional[float] = None) -> dict:
    from . import compiles
    records: dict = {}
    t0 = time.perf_counter()
    scratch = tempfile.mkdtemp(prefix="rf_precompile_tuning_")
    prev = os.environ.get("RESNET_FAST_CACHE_DIR")
    os.environ["RESNET_FAST_CACHE_DIR"] = scratch  # the recording run's "winners" must not be kept
    try:
        with compiles.recording(records):
            exercise(torch.device("cuda"), torch.bfloat16, batch, smoke_batch, log=log)
            torch.cuda.synchronize()
    finally:
        if prev is None:
            os.environ.pop("RESNET_FAST_CACHE_DIR", None)
        else:
            os.environ["RESNET_FAST_CACHE_DIR"] = prev
        from ..kernels import autotune
        autotune._TUNER.forget()  # forget the scratch winners in this process too
    t_rec = time.perf_counter() - t0
    items = [(mod, name, spec) for spec, (mod, name) in records.items()]
    log(f"precompile: recorded {len(items)} distinct kernels in {t_rec:.1f}s; compiling with {workers} workers "
        f"into {compiles.cache_dir()}")
    t1 = time.perf_counter()
    left = None if budget_s is None else budget_s - (time.perf_counter() - t0)
    done = compiles.preload(items, workers, left)
    bad = [d for d in done if not d["ok"]]
    for d in bad[:5]:
        log(f"precompile: {d['kernel']} failed: {d['error']}")
    by = collections.Counter(d["kernel"] for d in done)
    return {"recorded": len(items), "compiled": len(done) - len(bad), "failed": len(bad),
            "not_started": len(items) - len(done),
            "record_s": round(t_rec, 1), "compile_wall_s": round(time.perf_counter() - t1, 1),
            "compile_cpu_s": round(sum(d["seconds"] for d in done), 1), "workers": workers, "by_kernel": dict(by)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m resnet_fast.bench.precompile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--batch", type=int, default=256, help="batch of the benchmark rows")
    ap.add_argument("--smoke-batch", type=int, default=8, help="batch of the smoke")
    ap.add_argument("--count", action="store_true", help="count the plan's compiles (no GPU; interpreter)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting compiles after this many seconds (the rest compile when first launched)")
    args = ap.parse_args(argv)
    for name in ("workers", "batch", "smoke_batch"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.count or not torch.cuda.is_available():
        if not args.count:
            print("precompile: no GPU, nothing to warm (use --count to count the plan's compiles)")
            return 0
        if os.environ.get(_CHILD) != "1" and not os.environ.get("TRITON_INTERPRET"):
            env = dict(os.environ, **{_CHILD: "1", "RESNET_FAST_BACKEND": "triton", "TRITON_INTERPRET": "1"})
            return subprocess.call([sys.executable, "-m", "resnet_fast.bench.precompile",
                                    *(argv if argv is not None else sys.argv[1:])], env=env)
        doc = count(args.batch, args.smoke_batch)
    else:
        doc = warm(args.batch, args.smoke_batch, args.workers, budget_s=args.budget_s)
    print(json.dumps(doc, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
