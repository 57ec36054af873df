"""CPU demo: numerics of every available resnet_fast op/block against a float64 reference, on tiny shapes.

Runs where there is no GPU (the CLI sets ``RESNET_FAST_BACKEND=triton`` and ``TRITON_INTERPRET=1`` before
resnet_fast is imported, so Triton kernels run in the interpreter). Shapes are ResNet's, derived by
:mod:`.shapes` at reduced width and resolution. What holds on a CPU, and what the report shows: per case the
relative error norm against the eager computation in float64 and the tolerance for the dtype, and which
implementation ran (kernel calls, or the ops that fell back to eager). Host wall-clock times of the interpreter
are kept in the JSON only (``ms``); they are NOT GPU timings and no speedup is formed from them.

Static estimates (:mod:`.estimates`: the cost report's, ResNet-50 at batch 256 on sm_90, read from the compiled
code, not measured): conv rows get an "estimate" column, the estimated microseconds of the full-size layer the
tiny conv stands for.
"""
from __future__ import annotations

import copy
import time
from typing import Callable, Optional

import torch

from . import impls, reference, shapes
from .runner import Case, Unavailable, _kernel_stats, base_row, error_status, kernel_path
from .timing import WallTimer, measure, summarize

TIMING_NOTE = ("CPU demo: Triton interpreter / CPU kernels on tiny shapes: numerical agreement and which "
               "implementation ran. Its host wall-clock times are NOT GPU timings and are not shown as speed.")
DEMO_WIDTH, DEMO_RES, DEMO_BATCH = 16, 32, 2
DTYPE = "fp32"  # the demo's kernels run in fp32 (bf16 tl.dot is wrong in the interpreter)


def _compare(got, want) -> tuple[float, float, bool]:
    """(worst relative error norm, its tolerance, all within tolerance) over matching tensors or sequences of
    tensors; the first tensor is an output (the dtype's tolerance), the rest gradients (x GRAD_FACTOR)."""
    from .smoke import GRAD_FACTOR, TOL, rel_err
    if isinstance(got, torch.Tensor):
        got, want = [got], [want]
    if len(got) != len(want):
        return float("inf"), TOL[DTYPE], False
    worst, worst_tol, ok = 0.0, TOL[DTYPE], True
    for i, (g, w) in enumerate(zip(got, want)):
        if g is None or w is None:
            ok = ok and g is None and w is None
            continue
        tol = TOL[DTYPE] * (1.0 if i == 0 else GRAD_FACTOR)
        err = rel_err(g, w)
        ok = ok and err <= tol
        if err / tol >= worst / worst_tol:
            worst, worst_tol = err, tol
    return worst, worst_tol, ok


def _f64(v):
    """Tensors (and tensors in lists/tuples) as float64 copies: the reference's inputs."""
    if isinstance(v, torch.Tensor):
        return v.detach().double().requires_grad_(v.requires_grad) if v.is_floating_point() else v
    if isinstance(v, (list, tuple)):
        return type(v)(_f64(e) for e in v)
    return v


class Demo:
    """Collects rows; every check runs the resnet_fast path and the eager reference on the same inputs."""

    def __init__(self, budget_s: float, repeats: int = 3, log: Optional[Callable] = None, progress=None):
        self.deadline = time.perf_counter() + budget_s
        self.repeats, self.log, self.progress = repeats, log, progress
        self.rows: list[dict] = []

    def check(self, case: Case, run_rf: Callable[[], object], run_ref: Callable[[], object],
              min_left_s: float = 0.0) -> None:
        """Compare ``run_rf()`` with ``run_ref()`` and time both (wall clock, CPU).

        ``min_left_s``: budget that must remain to start (a check cannot be interrupted once running).
        """
        if self.progress is not None:
            self.progress.set_description(f"{case.suite} {case.name[:30]} {case.mode}")
        rf, ref = base_row(case, "resnet_fast"), base_row(case, "eager")
        if time.perf_counter() + min_left_s > self.deadline:
            rf["status"] = ref["status"] = "skipped: time budget"
        else:
            try:
                want = run_ref()
                ref.update(measure(lambda i: run_ref(), warmup=0, repeats=self.repeats, timer=WallTimer()).as_dict())
                before = _kernel_stats()
                t0 = time.perf_counter()
                got = run_rf()
                first_s = time.perf_counter() - t0
                rf.update(kernel_path(before, _kernel_stats()))
                err, tol, ok = _compare(got, want)
                rf.update(rel_err=err if err != float("inf") else None, tol=tol, numerics="ok" if ok else "MISMATCH",
                          reference="eager float64")
                # Interpreted kernels can be slow: time only as many repeats as the budget still allows; with
                # no time left the checked call itself is the one sample.
                left = self.deadline - time.perf_counter()
                reps = int(min(self.repeats, left / max(first_s, 1e-6) - 1))
                if reps >= 1:
                    rf.update(measure(lambda i: run_rf(), warmup=0, repeats=reps, timer=WallTimer()).as_dict())
                else:
                    rf.update(summarize([first_s * 1e3]).as_dict())
            except Exception as exc:  # noqa: BLE001  (reported in the row)
                rf["status"] = error_status(exc)
                if self.log and not isinstance(exc, Unavailable):
                    self.log(f"demo {case.name} {case.mode}: {rf['status']}")
        self.rows += [rf, ref]
        if self.progress is not None:
            self.progress.update(1)


def _tail_checks(demo: Demo, model: str) -> None:
    for tail in list(shapes.tails(model, DEMO_RES, DEMO_WIDTH))[:2]:
        x = torch.randn(DEMO_BATCH, tail.c, tail.h, tail.w).contiguous(memory_format=torch.channels_last)
        r = torch.randn_like(x)
        args = [x, torch.rand(tail.c) + 0.5, torch.randn(tail.c), r]
        if tail.residual_bn:
            args += [torch.rand(tail.c) + 0.5, torch.randn(tail.c)]
        g = torch.randn_like(x)
        for mode in ("fwd", "bwd"):
            case = Case("op", model, tail.name, mode, "fp32", DEMO_BATCH)

            def run(fn, mode=mode, cast=lambda t: t, args=args, g=g):
                if mode == "fwd":
                    return fn(*[cast(a) for a in args])
                leaves = [cast(a).detach().clone().requires_grad_(True) for a in args]
                return torch.autograd.grad(fn(*leaves), leaves, cast(g))
            demo.check(case, lambda run=run: run(impls.tail_fn("resnet_fast")),
                       lambda run=run: run(impls.tail_eager, cast=_f64))


def _conv_checks(demo: Demo, model: str, limit: int) -> None:
    # The 7x7 stem (3 input channels) takes seconds per call in the interpreter: the GPU conv suite covers it.
    tiny = list(shapes.convs(model, DEMO_RES, DEMO_WIDTH))
    full = list(shapes.convs(model))
    picked = [c for c in tiny if c.k < 7][:limit]
    for c in picked:
        full_name = full[tiny.index(c)].name if len(full) == len(tiny) else None
        conv, bn = impls.conv_module(c)
        x = torch.randn(DEMO_BATCH, c.cin, c.h, c.w).contiguous(memory_format=torch.channels_last)
        case = Case("conv", model, c.name, "eval", "fp32", DEMO_BATCH, extra={"full_size": full_name})
        demo.check(case,
                   lambda c=c, conv=conv, bn=bn, x=x: impls.conv_eval_fn(
                       "resnet_fast", c, conv, bn, device="cpu", layout="channels_last", dtype=torch.float32)(x),
                   lambda c=c, conv=conv, bn=bn, x=x: impls.conv_eval_fn(
                       "eager", c, copy.deepcopy(conv).double(), copy.deepcopy(bn).double(), device="cpu",
                       layout="channels_last", dtype=torch.float64)(x.double()))
        ho, wo = c.out_hw
        g = torch.randn(DEMO_BATCH, c.cout, ho, wo).contiguous(memory_format=torch.channels_last)

        def train(impl, c=c, conv=conv, x=x, g=g, dt=torch.float32):
            xl = x.detach().to(dt).requires_grad_(True)
            w = conv.weight.detach().to(dt).contiguous(memory_format=torch.channels_last).requires_grad_(True)
            out = impls.conv_train_fn(impl, c)(xl, w)
            return [out] + list(torch.autograd.grad(out, (xl, w), g.to(dt)))
        demo.check(Case("conv", model, c.name, "train", "fp32", DEMO_BATCH, extra={"full_size": full_name}),
                   lambda train=train: train("resnet_fast"), lambda train=train: train("eager", dt=torch.float64))


def _fold_check(demo: Demo, model: str) -> None:
    c = shapes.stem(model, DEMO_RES, DEMO_WIDTH)
    _, bn = impls.conv_module(c)
    demo.check(Case("op", model, "fold_bn", "eval", "fp32", 1),
               lambda: impls.fold(bn), lambda: impls.fold_reference(copy.deepcopy(bn).double()))


def _block_checks(demo: Demo, model: str) -> None:
    # The first block (with downsample) and the first strided one: every branch of the block code.
    picked = [b for b in shapes.blocks(model, DEMO_RES, DEMO_WIDTH) if b.downsample][:2]
    for shape in picked:
        ref = reference.block(shape)
        x = torch.randn(DEMO_BATCH, shape.inplanes, shape.h, shape.w).contiguous(memory_format=torch.channels_last)
        ho, wo = shape.out_hw
        g = torch.randn(DEMO_BATCH, shape.out_channels, ho, wo).contiguous(memory_format=torch.channels_last)
        for mode in ("eval", "train"):
            def run(make, mode=mode, ref=ref, x=x, g=g, dt=torch.float32):
                m = make().to(dt).train(mode == "train")
                if mode == "eval":
                    with torch.no_grad():
                        return m(x.to(dt))
                xl = x.detach().to(dt).requires_grad_(True)
                out = m(xl)
                return [out] + list(torch.autograd.grad(out, [xl] + list(m.parameters()), g.to(dt)))
            demo.check(Case("block", model, shape.name, mode, "fp32", DEMO_BATCH),
                       lambda run=run, shape=shape, ref=ref: run(lambda: impls.rf_block(shape, copy.deepcopy(ref))),
                       lambda run=run, ref=ref: run(lambda: copy.deepcopy(ref), dt=torch.float64))


def _model_check(demo: Demo, model: str) -> None:
    ref = reference.model(model).eval()
    x = torch.randn(DEMO_BATCH, 3, DEMO_RES, DEMO_RES).contiguous(memory_format=torch.channels_last)

    def run(make, dt=torch.float32):
        with torch.no_grad():
            return make().to(dt).eval()(x.to(dt))
    # A full-width network with its 7x7 stem: tens of seconds per interpreted call, so only with time to spare.
    demo.check(Case("model", model, f"{model} {DEMO_RES}px", "eval", "fp32", DEMO_BATCH),
               lambda: run(lambda: impls.rf_model(model, copy.deepcopy(ref))),
               lambda: run(lambda: copy.deepcopy(ref), dt=torch.float64),
               min_left_s=40.0)


def plan(quick: bool) -> list[tuple[str, Callable]]:
    """The demo's checks in order (cheap first, so a tight budget still covers every layer)."""
    steps = [("op", lambda d: _tail_checks(d, "resnet50")), ("op", lambda d: _fold_check(d, "resnet50")),
             ("conv", lambda d: _conv_checks(d, "resnet50", 2 if quick else 4))]
    for m in ("resnet18", "resnet50") + (() if quick else ("resnext50_32x4d",)):
        steps.append(("block", lambda d, m=m: _block_checks(d, m)))
    if not quick:
        steps.append(("model", lambda d: _model_check(d, "resnet18")))
    return steps


def n_checks(quick: bool) -> int:
    """Number of check() calls (for the progress bar)."""
    return 4 + 1 + 2 * (2 if quick else 4) + 2 * 2 * (2 if quick else 3) + (0 if quick else 1)


def run(suites: tuple, budget_s: float, quick: bool, log=None, progress=None) -> list[dict]:
    demo = Demo(budget_s, log=log, progress=progress)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for suite, step in plan(quick):
            if suite in suites:
                step(demo)
    return demo.rows


def failures(rows: list[dict]) -> list[dict]:
    """Rows whose resnet_fast result disagrees with the reference."""
    return [r for r in rows if r.get("numerics") == "MISMATCH"]
