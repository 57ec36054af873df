"""The GPU suites: op (residual tail), conv, block and model, every implementation on the same inputs.

Each suite yields (Case, impl, build, estimate_s) jobs; :func:`run_suites` runs them through
:func:`runner.run_row` with progress, budget and optional profiling. Inputs are random (``randn``), several
buffers are cycled so L2 does not serve the next repeat, and every row of a case sees the same shapes.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from . import impls, reference, shapes
from .runner import CONV_IMPL_ROWS, DTYPES, Budget, Case, run_row
from .timing import measure

# Rough guesses of compile time on an H100 host, only used to decide whether a compiled row still fits the
# budget (a row that does not is reported as skipped, never estimated).
COMPILE_ESTIMATE_S = {"op": 8, "conv": 0, "block": 25, "model": 100}
MAX_AUTOTUNE_FACTOR = 4
SUITE_WEIGHTS = {"op": 1.0, "conv": 2.0, "block": 3.0, "model": 4.0}
L2_ROTATION_BYTES = 256 * 2 ** 20  # cycle enough input buffers to exceed this (H100 L2: 50 MB)


@dataclasses.dataclass
class Config:
    model: str = "resnet50"
    batch: int = 256
    resolution: int = 224
    dtype: str = "bf16"
    modes: tuple = ("train", "eval")
    layout: str = "channels_last"
    suites: tuple = ("op", "conv", "block", "model")
    impls: tuple = ("resnet_fast", "resnet_fast_triton", "resnet_fast_cudnn", "eager", "eager_fp32_nchw", "compile")
    repeats: int = 50
    warmup: int = 3
    max_row_s: float = 2.0  # cap on measuring time per row (repeats shrink for slow rows, never below 5)
    budget_s: Optional[float] = None
    profile_dir: Optional[Path] = None
    device: str = "cuda"
    width: int = 64  # base channel width of the op/conv/block shapes; < 64 only for CPU smoke runs


def n_buffers(bytes_per_set: int) -> int:
    return int(min(8, max(2, math.ceil(L2_ROTATION_BYTES / max(1, bytes_per_set)))))


def randn(shape, dtype, fmt, device, requires_grad=False):
    t = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
    return t.requires_grad_(requires_grad)


def _timing(cfg: Config, run, setup=None, repeats=None) -> dict:
    return measure(run, setup=setup, warmup=cfg.warmup, repeats=repeats or cfg.repeats,
                   max_time_s=cfg.max_row_s).as_dict()


# ---- op: the residual tail ------------------------------------------------------------------------------

def op_jobs(cfg: Config) -> Iterator:
    dt = DTYPES[cfg.dtype]
    esize = torch.empty((), dtype=dt).element_size()
    modes = ["fwd"] + (["bwd"] if "train" in cfg.modes else [])
    for tail, count in shapes.tails(cfg.model, cfg.resolution, cfg.width).items():
        n = tail.elements(cfg.batch)
        for mode in modes:
            # Compulsory traffic: fwd reads x, residual, writes out; bwd reads grad, x, residual and writes
            # grad_x, grad_residual (the ReLU mask is recomputed, per-channel sums are negligible).
            case = Case("op", cfg.model, tail.name, mode, cfg.dtype, cfg.batch, flops=None,
                        nbytes=(3 if mode == "fwd" else 5) * n * esize, extra={"count": count})
            for impl in cfg.impls:
                if impl == "eager_fp32_nchw" or impl in CONV_IMPL_ROWS:
                    continue  # the fused op vs the eager expression and its compile (no conv in the tail)
                yield case, impl, _op_build(cfg, tail, mode, impl), _estimate("op", impl)


def _op_build(cfg: Config, tail: shapes.TailShape, mode: str, impl: str):
    def build():
        fn = impls.tail_fn(impl)
        dt, dev = DTYPES[cfg.dtype], cfg.device
        fmt = impls.memory_format(impl, cfg.layout)
        shape = (cfg.batch, tail.c, tail.h, tail.w)
        k = n_buffers(3 * tail.elements(cfg.batch) * torch.empty((), dtype=dt).element_size())
        grad = mode == "bwd"

        def one_set():
            args = [randn(shape, dt, fmt, dev, grad), (torch.rand(tail.c, device=dev) + 0.5).requires_grad_(grad),
                    randn((tail.c,), torch.float32, torch.contiguous_format, dev, grad),
                    randn(shape, dt, fmt, dev, grad)]
            if tail.residual_bn:
                args += [(torch.rand(tail.c, device=dev) + 0.5).requires_grad_(grad),
                         randn((tail.c,), torch.float32, torch.contiguous_format, dev, grad)]
            return args
        sets = [one_set() for _ in range(k)]
        if mode == "fwd":
            def run(i):
                with torch.no_grad():
                    fn(*sets[i % k])
            return lambda: _timing(cfg, run)
        grads = [randn(shape, dt, fmt, dev) for _ in range(k)]

        def setup(i):  # forward untimed; its kernels are enqueued before the start event
            return fn(*sets[i % k])

        def run_bwd(i, out):
            torch.autograd.grad(out, sets[i % k], grads[i % k])
        return lambda: _timing(cfg, run_bwd, setup=setup)
    return build


# ---- conv -----------------------------------------------------------------------------------------------

def conv_jobs(cfg: Config) -> Iterator:
    for conv, count in shapes.convs(cfg.model, cfg.resolution, cfg.width).items():
        x_el, w_el, y_el = conv.elements(cfg.batch)
        for mode in cfg.modes:
            train = mode == "train"
            for impl in cfg.impls:
                if impl not in ("resnet_fast", "eager", "eager_fp32_nchw"):
                    continue  # the Triton conv against cuDNN (compile would call cuDNN too; the per-conv
                    # implementation rows are the block/model suites' and the autotune table's)
                esize = torch.empty((), dtype=impls.act_dtype(impl, cfg.dtype)).element_size()
                # fwd reads x, w and writes y; training adds dgrad (dy, w -> dx) and wgrad (x, dy -> dw).
                mult = 3 if train else 1
                case = Case("conv", cfg.model, conv.name, mode, cfg.dtype, cfg.batch,
                            flops=mult * conv.flops(cfg.batch), nbytes=mult * (x_el + w_el + y_el) * esize,
                            extra={"count": count})
                yield case, impl, _conv_build(cfg, conv, mode, impl), 0.0


def _conv_build(cfg: Config, c: shapes.ConvShape, mode: str, impl: str):
    def build():
        dt, dev = impls.act_dtype(impl, cfg.dtype), cfg.device
        fmt = impls.memory_format(impl, cfg.layout)
        x_el, _, y_el = c.elements(cfg.batch)
        k = n_buffers((x_el + y_el) * torch.empty((), dtype=dt).element_size())
        shape = (cfg.batch, c.cin, c.h, c.w)
        conv, bn = impls.conv_module(c)
        if mode == "eval":
            fn = impls.conv_eval_fn(impl, c, conv, bn, device=dev, layout=cfg.layout, dtype=dt)
            xs = [randn(shape, dt, fmt, dev) for _ in range(k)]

            def run(i):
                with torch.no_grad():
                    fn(xs[i % k])
            return lambda: _timing(cfg, run)
        fn = impls.conv_train_fn(impl, c)
        w = conv.weight.detach().to(dev, dt).contiguous(memory_format=fmt).requires_grad_(True)
        xs = [randn(shape, dt, fmt, dev, True) for _ in range(k)]
        ho, wo = c.out_hw
        gs = [randn((cfg.batch, c.cout, ho, wo), dt, fmt, dev) for _ in range(k)]

        def run_train(i):
            out = fn(xs[i % k], w)
            torch.autograd.grad(out, (xs[i % k], w), gs[i % k])
        return lambda: _timing(cfg, run_train)
    return build


# ---- block and model ------------------------------------------------------------------------------------

def block_jobs(cfg: Config) -> Iterator:
    for shape, count in shapes.blocks(cfg.model, cfg.resolution, cfg.width).items():
        ref = reference.block(shape)
        x_el = cfg.batch * shape.inplanes * shape.h * shape.w
        ho, wo = shape.out_hw
        y_el = cfg.batch * shape.out_channels * ho * wo
        w_el = sum(p.numel() for p in ref.parameters())
        for mode in cfg.modes:
            for impl in cfg.impls:
                esize = torch.empty((), dtype=impls.act_dtype(impl, cfg.dtype)).element_size()
                # GB/s only for inference (input + output + weights); training traffic has no honest minimum.
                case = Case("block", cfg.model, shape.name, mode, cfg.dtype, cfg.batch,
                            flops=(3 if mode == "train" else 1) * shape.flops(cfg.batch),
                            nbytes=None if mode == "train" else (x_el + y_el + w_el) * esize,
                            extra={"count": count})
                make_rf = functools.partial(impls.rf_block, shape, ref)
                shape_in = (cfg.batch, shape.inplanes, shape.h, shape.w)
                shape_out = (cfg.batch, shape.out_channels, ho, wo)
                yield case, impl, _module_build(cfg, ref, make_rf, mode, impl, shape_in, shape_out), \
                    _estimate("block", impl)


def model_jobs(cfg: Config) -> Iterator:
    ref = reference.model(cfg.model)
    # torch.compile rows last: their compile alone takes minutes, and a budget should not starve the others
    order = [(mode, impl) for compiled in (False, True) for mode in cfg.modes for impl in cfg.impls
             if impl.startswith("compile") == compiled]
    for mode, impl in order:
        case = Case("model", cfg.model, f"{cfg.model} {cfg.resolution}px", mode, cfg.dtype, cfg.batch,
                    flops=(3 if mode == "train" else 1) * shapes.model_flops(cfg.model, cfg.batch,
                                                                             cfg.resolution),
                    nbytes=None, extra={})
        make_rf = functools.partial(impls.rf_model, cfg.model, ref)
        shape_in = (cfg.batch, 3, cfg.resolution, cfg.resolution)
        yield case, impl, _module_build(cfg, ref, make_rf, mode, impl, shape_in, None, whole_model=True), \
            _estimate("model", impl)


def _module_build(cfg: Config, ref, make_rf: Callable, mode: str, impl: str, shape_in, shape_out,
                  whole_model: bool = False):
    """Build and time a block or a whole model: inference forward, or a training step.

    Block training step: forward + backward (input and parameter gradients). Model training step: forward,
    cross-entropy, backward, SGD step. Weights stay fp32; activations run under autocast in ``cfg.dtype``
    (the fp32 NCHW reference runs without autocast).
    """
    def build():
        dev, train = cfg.device, mode == "train"
        dt = impls.act_dtype(impl, cfg.dtype)
        fmt = impls.memory_format(impl, cfg.layout)
        m = impls.module_for(impl, ref, dev, cfg.layout, make_rf).train(train)
        call = impls.wrap_compiled(m, impl, eval_mode=not train)
        k = n_buffers(math.prod(shape_in) * torch.empty((), dtype=dt).element_size())
        xs = [randn(shape_in, dt, fmt, dev, requires_grad=train and not whole_model) for _ in range(k)]
        amp = lambda: impls.autocast(impl, cfg.dtype, dev)  # noqa: E731

        if not train:
            def run(i):
                with torch.no_grad(), amp():
                    call(xs[i % k])
        elif whole_model:
            ys = [torch.randint(0, ref.fc.out_features, (cfg.batch,), device=dev) for _ in range(k)]
            opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)

            def run(i):
                with amp():
                    loss = F.cross_entropy(call(xs[i % k]).float(), ys[i % k])
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        else:
            gs = [randn(shape_out, dt, fmt, dev) for _ in range(k)]
            params = [p for p in m.parameters() if p.requires_grad]

            def run(i):
                with amp():
                    out = call(xs[i % k])
                torch.autograd.grad(out, [xs[i % k]] + params, gs[i % k])

        def timed():
            with impls.freezing(impls.needs_freezing(impl, not train)):
                out = _timing(cfg, run, repeats=max(5, cfg.repeats // 2) if whole_model else None)
                if whole_model:
                    out["images_per_s"] = cfg.batch / (out["ms"] * 1e-3)
                if cfg.profile_dir is not None and train and impl in ("resnet_fast", "eager"):
                    from .profile import profile_steps
                    prof = profile_steps(run, f"{cfg.model}_{mode}_{impl}", cfg.profile_dir)
                    out["profile"] = {"trace": prof["trace"], "kernels": prof["kernels"]}
            return out
        return timed
    return build


def _estimate(suite: str, impl: str) -> float:
    if impl == "compile":
        return COMPILE_ESTIMATE_S[suite]
    if impl == "compile_max_autotune":
        return COMPILE_ESTIMATE_S[suite] * MAX_AUTOTUNE_FACTOR
    return 0.0


JOBS = {"op": op_jobs, "conv": conv_jobs, "block": block_jobs, "model": model_jobs}


def run_suites(cfg: Config, peaks: dict, progress=None, log: Optional[Callable] = None,
               on_row: Optional[Callable[[list], None]] = None) -> list[dict]:
    """Run the selected suites in ``cfg.suites`` order (a GPU session puts its priority first); the budget is
    split across them by :data:`SUITE_WEIGHTS`, and what one leaves passes to the next."""
    budget = Budget(cfg.budget_s, SUITE_WEIGHTS)
    rows = []
    suites = list(dict.fromkeys(s for s in cfg.suites if s in JOBS))
    if cfg.profile_dir is not None and "model" not in suites:
        log and log("--profile traces the model suite's training step; add it to --suites to get a trace")
    for idx, suite in enumerate(suites):
        budget.begin_suite(suites[idx:])
        for case, impl, build, est in JOBS[suite](cfg):
            if progress is not None:
                progress.set_description(f"{suite} {case.name[:28]} {case.mode} {impl}")
            rows.append(run_row(case, impl, build, peaks=peaks, budget=budget, estimate_s=est, log=log))
            if progress is not None:
                progress.update(1)
            if on_row is not None:
                on_row(rows)
    return rows


def count_jobs(cfg: Config) -> int:
    """Number of rows a run will produce (for the progress bar), without building anything."""
    n = 0
    for suite in cfg.suites:
        if suite == "op":
            per = len([i for i in cfg.impls if i != "eager_fp32_nchw" and i not in CONV_IMPL_ROWS])
            n += len(shapes.tails(cfg.model, cfg.resolution, cfg.width)) * (1 + ("train" in cfg.modes)) * per
        elif suite == "conv":
            per = len([i for i in cfg.impls if i in ("resnet_fast", "eager", "eager_fp32_nchw")])
            n += len(shapes.convs(cfg.model, cfg.resolution, cfg.width)) * len(cfg.modes) * per
        elif suite == "block":
            n += len(shapes.blocks(cfg.model, cfg.resolution, cfg.width)) * len(cfg.modes) * len(cfg.impls)
        elif suite == "model":
            n += len(cfg.modes) * len(cfg.impls)
    return n
