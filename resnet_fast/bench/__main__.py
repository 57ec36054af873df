"""``python -m resnet_fast.bench`` / ``resnet-fast-bench``: the benchmark report, or the CPU demo.

With a GPU: measure the device ceilings, run the selected suites for every implementation, print a table and
write ``<date>-<gpu>.json``/``.md``/``.png`` to ``--output`` (default ``benchmarks/results``).
Without one (or with ``--cpu-demo``): check numerics of every available op/block on tiny shapes in the Triton
interpreter and write the same files, marked as not GPU timings, to a temporary folder.

The backend must be chosen before any kernel module is imported (Triton decides interpretation when a kernel
is decorated), and ``python -m`` has already imported the ``resnet_fast`` package by the time this module runs;
so the demo re-executes itself once with ``RESNET_FAST_BACKEND=triton TRITON_INTERPRET=1`` in the environment.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
_CHILD = "RESNET_FAST_BENCH_CHILD"


def parse_args(argv=None) -> argparse.Namespace:
    from .runner import IMPLS, SUITES
    from .shapes import ARCHS
    p = argparse.ArgumentParser(prog="resnet-fast-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=list(ARCHS), default="resnet50")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--mode", choices=["train", "eval", "both"], default="both",
                   help="train = forward+backward (a full step for the model suite), eval = inference")
    p.add_argument("--layout", choices=["channels_last", "nchw"], default="channels_last")
    p.add_argument("--suites", default="all", help=f"comma list of {','.join(SUITES)} or 'all'; run in the order given")
    p.add_argument("--impls", default="resnet_fast,resnet_fast_triton,resnet_fast_cudnn,eager,eager_fp32_nchw,compile",
                   help=f"comma list of {','.join(IMPLS)}")
    p.add_argument("--no-compile", action="store_true", help="drop the torch.compile implementations")
    p.add_argument("--max-autotune", action="store_true",
                   help="add compile_max_autotune (slow to compile; off by default to fit the time budget)")
    p.add_argument("--repeats", type=int, default=50, help="timed repeats per row (median over these)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (compilation/autotuning happen here)")
    p.add_argument("--max-row-s", type=float, default=2.0, help="cap on timed seconds per row")
    p.add_argument("--quick", action="store_true", help="few repeats, short rows (smoke run)")
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="wall-clock budget for the suites; rows beyond it are reported as skipped (0: none)")
    p.add_argument("--output", type=Path, default=None, help="output folder")
    p.add_argument("--profile", action="store_true",
                   help="torch.profiler Chrome trace + per-kernel table of the model training step")
    p.add_argument("--cpu-demo", action="store_true", help="run the CPU numerics demo even with a GPU")
    p.add_argument("--demo-budget-s", type=float, default=90.0, help="wall-clock budget of the CPU demo")
    p.add_argument("--cost-report", default=None,
                   help="a cost_report JSON whose static per-layer estimates go beside the rows they describe "
                        "(default $RESNET_FAST_COST_REPORT, else the committed kernels/cost_baseline.json)")
    args = p.parse_args(argv)
    args.suites = SUITES if args.suites == "all" else tuple(s.strip() for s in args.suites.split(",") if s.strip())
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    if args.max_autotune and "compile_max_autotune" not in impls:
        impls.append("compile_max_autotune")
    if args.no_compile:
        impls = [i for i in impls if not i.startswith("compile")]
    bad = [s for s in args.suites if s not in SUITES] + [i for i in impls if i not in IMPLS]
    if bad:
        p.error(f"unknown suite/impl: {', '.join(bad)}")
    args.impls = tuple(impls)
    args.modes = ("train", "eval") if args.mode == "both" else (args.mode,)
    if args.quick:
        args.repeats, args.max_row_s = min(args.repeats, 10), min(args.max_row_s, 0.5)
    return args


def _needs_reexec() -> bool:
    return os.environ.get(_CHILD) != "1" and not (
        os.environ.get("RESNET_FAST_BACKEND") and os.environ.get("TRITON_INTERPRET"))


def _reexec(argv) -> int:
    env = dict(os.environ, **{_CHILD: "1"})
    env.setdefault("RESNET_FAST_BACKEND", "triton")
    env.setdefault("TRITON_INTERPRET", "1")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return subprocess.call([sys.executable, "-m", "resnet_fast.bench", *argv], env=env)


def _progress(total: int):
    from tqdm import tqdm
    return tqdm(total=total, unit="row", dynamic_ncols=True, file=sys.stderr)


def _log(msg: str) -> None:
    from tqdm import tqdm
    tqdm.write(msg, file=sys.stderr)


def _finish(doc: dict, out_dir: Path, stem: str) -> dict:
    from . import report
    paths = report.write_all(doc, out_dir, stem)
    print("\n".join(report.header_lines(doc)))
    print(report.format_table(doc["results"], cpu_demo=not doc.get("gpu_timings", True)))
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    return paths


def run_demo(args) -> int:
    import resnet_fast
    from . import demo, estimates, meta, reference

    out_dir = args.output or Path(tempfile.gettempdir()) / "resnet_fast_bench_out"
    if out_dir.resolve() == REPO_RESULTS.resolve() or REPO_RESULTS.resolve() in out_dir.resolve().parents:
        print(f"note: CPU demo output never goes to {REPO_RESULTS}; writing to a temporary folder instead")
        out_dir = Path(tempfile.gettempdir()) / "resnet_fast_bench_out"
    print(f"resnet_fast CPU demo (backend={resnet_fast.backend()}, TRITON_INTERPRET="
          f"{os.environ.get('TRITON_INTERPRET', '0')}). {demo.TIMING_NOTE}", flush=True)
    t0 = time.perf_counter()
    with _progress(demo.n_checks(args.quick)) as bar:
        rows = demo.run(args.suites, args.demo_budget_s, args.quick, log=_log, progress=bar)
    doc = meta.base_doc()
    doc.update(gpu_timings=False, timing_note=demo.TIMING_NOTE, backend=resnet_fast.backend(),
               reference=reference.SOURCE, stats=resnet_fast.stats(), wall_s=time.perf_counter() - t0,
               config={"demo_width": demo.DEMO_WIDTH, "demo_resolution": demo.DEMO_RES, "batch": demo.DEMO_BATCH,
                       "dtype": "fp32", "quick": args.quick})
    est = estimates.load(args.cost_report or estimates.default_path())
    doc["results"] = estimates.attach(rows, est)  # no speedups: interpreter wall-clock against ATen CPU means nothing
    doc["estimates"] = "cost report (static, sm_90, batch 256)" if est else None
    _finish(doc, out_dir, f"{doc['date']}-cpu-demo")
    bad = demo.failures(rows)
    checked = [r for r in rows if r.get("numerics")]
    fell_back = sum(1 for r in checked if r.get("fallbacks"))
    ours = [r for r in rows if r["impl"].startswith("resnet_fast")]
    n_err = sum(1 for r in ours if r["status"].startswith("error"))
    n_skip = sum(1 for r in ours if r["status"].startswith(("unavailable", "skipped")))
    print(f"\n{len(checked)} resnet_fast results checked against eager float64 ({len(checked) - fell_back} through "
          f"the project's kernels, {fell_back} fell back to eager), {len(bad)} outside tolerance; {n_err} raised an "
          f"error, {n_skip} unavailable or skipped (see status). No timings: this is not a GPU.")
    return 1 if bad else 0


def run_gpu(args) -> int:
    import torch

    from . import ceilings, compiles, meta
    from .suites import Config, count_jobs, run_suites

    compiles.install()  # count Triton compiles / disk-cache hits and autotuning time from the start
    torch.backends.cudnn.benchmark = True
    out_dir = args.output or REPO_RESULTS
    cfg = Config(model=args.model, batch=args.batch, resolution=args.resolution, dtype=args.dtype,
                 modes=args.modes, layout=args.layout, suites=args.suites, impls=args.impls,
                 repeats=args.repeats, warmup=args.warmup, max_row_s=args.max_row_s,
                 budget_s=args.budget_s or None, profile_dir=(out_dir / "profile") if args.profile else None)
    doc = meta.base_doc()
    print(f"resnet_fast benchmark on {doc['device']}: measuring ceilings...", flush=True)
    t0 = time.perf_counter()
    from .runner import TimeBoxExpired, stop_on_sigterm
    stop_on_sigterm()  # a time-boxed run (gpu_check.sh) still writes what it measured
    rows: list = []
    stem = meta.file_stem(doc)

    def checkpoint(done):  # the JSON after every row: a killed run leaves its rows behind
        rows[:] = done
        _write_doc(doc, args, t0, rows, out_dir, stem, partial=True)
    try:
        doc["peaks"] = ceilings.measure_peaks(quick=args.quick)
        with _progress(count_jobs(cfg)) as bar:
            rows = run_suites(cfg, doc["peaks"], progress=bar, log=_log, on_row=checkpoint)
    except TimeBoxExpired as exc:
        _log(f"stopped: {exc}; writing the {len(rows)} rows measured")
        doc["stopped"] = str(exc)
    _write_doc(doc, args, t0, rows, out_dir, stem)
    return 0


def _write_doc(doc: dict, args, t0: float, rows: list, out_dir: Path, stem: str, partial: bool = False) -> None:
    """Fill ``doc`` with the rows so far and the run's records; ``partial``: the JSON alone (a checkpoint)."""
    import json

    import resnet_fast
    from . import compiles, estimates, reference, report
    from .runner import add_speedups
    add_speedups(rows)
    from ..kernels.autotune import tuning_report
    doc.setdefault("peaks", {"copy_GBps": None, "bf16_TFLOPs": None})
    doc.update(gpu_timings=True, backend=resnet_fast.backend(), reference=reference.SOURCE,
               stats=resnet_fast.stats(), autotune=tuning_report(), wall_s=time.perf_counter() - t0,
               **compiles.report(),
               config={k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
                       if k in ("model", "batch", "resolution", "dtype", "modes", "layout", "suites", "impls",
                                "repeats", "warmup", "max_row_s", "budget_s", "quick")},
               timing="CUDA events around each repeat, median and p20/p80; warm-up (compile/autotune) excluded "
                      "and reported as warmup_s; inputs cycled across buffers; random data", partial=partial)
    doc["results"] = list(rows)
    if not partial:  # the cost report's static estimate beside the rows it describes (conv suite, eval)
        est = estimates.load(args.cost_report or estimates.default_path())
        estimates.attach(doc["results"], est)
        doc["estimates"] = "cost report (static, sm_90 model, bf16, batch 256; Triton at untuned configs)" \
            if est else None
    if partial:
        report.validate(doc)
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f".{stem}.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        tmp.replace(out_dir / f"{stem}.json")
        return
    _finish(doc, out_dir, stem)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import torch
    if args.cpu_demo or not torch.cuda.is_available():
        if _needs_reexec():
            return _reexec(argv)
        return run_demo(args)
    return run_gpu(args)


if __name__ == "__main__":
    sys.exit(main())
