"""GPU correctness smoke: every kernel family and op role on every distinct ResNet-50 conv, in minutes.

``python -m resnet_fast.bench.smoke [--json PATH] [--batch N] [--budget-s S] [--quick]``

For each distinct conv of ResNet-50 (:func:`.shapes.convs`) and dtype (bf16 on every shape; fp16 and fp32 on a
few), three roles, each against a float32 reference (cuDNN with TF32 off, eager autograd; float64 on a CPU):

* ``infer``: ``conv_fwd.conv2d_nhwc`` with the inference epilogue (folded-BN scale/shift, residual, ReLU) into a
  NaN-filled ``out=``;
* ``conv2d_bwd``: ``ops.conv2d`` (scale, shift, ReLU) and its autograd backward (dgrad with the ReLU mask and
  scale applied on load, wgrad with the Σg epilogue): grads of x, weight, scale, shift;
* ``train``: ``ops.conv_bn_stats`` with the BN+ReLU prologue (none on the stem) and the per-tile statistics
  merged by ``bn_finalize`` (y, mean, invstd), and its backward (dgrad's dReLU epilogue, wgrad's prologue, the
  BN gradient formed on load) through a normalised output: grads of x, weight, in_scale, in_shift.

Then the C++/CUDA ops ``bn_add_relu`` / ``bn_relu`` forward and backward at every residual-tail shape, and one
converted model (ResNet-50 on a GPU) against eager: training step (loss, parameter gradients, running
statistics after the step) and eval logits, under autocast. A converted model passes when its error against
the float32 reference is within the dtype's tolerance or 4x eager's own error at that dtype. Last (the time budget
cuts it first), on the first :data:`PINNED_SHAPES` pointwise convs: ``infer`` and ``train`` with the forward pinned
to each persistent twin, a tuning candidate the untuned run never picks (the autotuner keeps the fastest unchecked).

Errors are ``‖out − ref‖ / ‖ref‖`` in float64; a NaN/Inf anywhere counts as infinite. Before each op role the
CUDA caching allocator is handed a NaN-filled block, so an output element a kernel fails to write stays NaN.
A check whose op fell back to eager PyTorch fails (it did not test the kernels). Every failure prints the
shape, the kernel, the tensor and the error, and the run goes on; one JSON document holds every row.

Without a GPU it runs in the Triton interpreter (re-executing itself with ``RESNET_FAST_BACKEND=triton
TRITON_INTERPRET=1``) on the same derivation at width 8 and 16 px, fp32 and fp16 only (bf16 ``tl.dot`` is
wrong in the interpreter), with a CIFAR ResNet-20 (1x1 projection shortcuts) as the model, so that the code
is exercised everywhere. Exit status: 0 when every executed check passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .runner import TimeBoxExpired, stop_on_sigterm

# Relative-error-norm tolerances against the float32 (GPU) / float64 (CPU) reference. bf16 keeps 8 bits of
# mantissa (2^-9 relative rounding per stored element, compounded through epilogues and BN normalisation);
# fp16 11 bits; fp32 kernels are IEEE (TF32 stays off unless PyTorch allows it). Gradients pass through one more
# rounded operand (dy formed on load), hence the factor.
TOL = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 2e-2}
GRAD_FACTOR = 2.0
MODEL_TWIN_FACTOR = 4.0
PINNED_SHAPES = 4  # pointwise convs that run each forward tuning twin pinned (see _run_checks)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_CHILD = "RESNET_FAST_SMOKE_CHILD"
CL = torch.channels_last


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """‖got − ref‖ / ‖ref‖ in float64; inf for a shape mismatch or any non-finite element of ``got``."""
    if got is None or ref is None or tuple(got.shape) != tuple(ref.shape):
        return math.inf
    g, r = got.detach().double().cpu(), ref.detach().double().cpu()
    if not bool(torch.isfinite(g).all()):
        return math.inf
    den = float(r.norm())
    num = float((g - r).norm())
    return num / den if den > 0 else num


def poison_allocator(device: torch.device, nbytes: int) -> None:
    """Leave a NaN-filled block of ``nbytes`` in the CUDA caching allocator: tensors allocated next reuse it,
    so an unwritten output element reads NaN (no-op on a CPU)."""
    if device.type != "cuda" or nbytes <= 0:
        return
    t = torch.full((nbytes // 4 + 1,), float("nan"), dtype=torch.float32, device=device)
    del t


@contextlib.contextmanager
def ieee_reference():
    """float32 references in IEEE fp32: cuDNN conv and matmul TF32 off for the duration, then restored exactly
    (``cudnn.flags`` is avoided: on torch 2.13 it leaves the conv precision changed after exit)."""
    prev_mm = torch.get_float32_matmul_precision()
    conv = getattr(torch.backends.cudnn, "conv", None)
    new_api = conv is not None and hasattr(conv, "fp32_precision")
    prev = conv.fp32_precision if new_api else torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    if new_api:
        conv.fp32_precision = "ieee"
    else:
        torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev_mm)
        if new_api:
            conv.fp32_precision = prev
        else:
            torch.backends.cudnn.allow_tf32 = prev


@contextlib.contextmanager
def smoke_env(tune: bool = False, conv_impl: str = "triton"):
    """The smoke's settings for the duration: the Triton kernels for every conv role
    (``RESNET_FAST_CONV_IMPL``; the cuDNN composite is checked separately on the model) and, unless ``tune``,
    no autotuning (``RESNET_FAST_AUTOTUNE=0``: the untuned default configs, a fraction of the compiles; every
    tuning candidate's correctness is the GPU-marked tests' job)."""
    want = {"RESNET_FAST_CONV_IMPL": conv_impl}
    if not tune:
        want["RESNET_FAST_AUTOTUNE"] = "0"
    prev = {k: os.environ.get(k) for k in want}
    os.environ.update(want)
    try:
        yield
    finally:
        for k, v in prev.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def offered_impl(name: str):
    """Every op that offers implementation ``name`` (e.g. ``triton_dy_pass``, which the variable cannot force) runs
    it for the duration; the others run ``RESNET_FAST_CONV_IMPL``'s."""
    from ..ops import _common
    real = _common.choose_impl

    def choose(role, geometry, dtype, device, switches, runners, **kw):
        return name if name in runners else real(role, geometry, dtype, device, switches, runners, **kw)
    _common.choose_impl = choose
    try:
        yield
    finally:
        _common.choose_impl = real


class Smoke:
    """Runs checks, keeps one row per compared tensor (or per failed check), prints failures as they come."""

    def __init__(self, device: torch.device, budget_s: float, log: Callable = print):
        self.device = device
        self.ref_dtype = torch.float32 if device.type == "cuda" else torch.float64
        self.deadline = time.perf_counter() + budget_s
        self.rows: list[dict] = []
        self.log = log

    def out_of_time(self) -> bool:
        return time.perf_counter() > self.deadline

    def check(self, group: str, case: str, role: str, kernels: str, dtype: str, fn: Callable[[], dict],
              tol: dict, expect_ops: tuple = ()) -> None:
        """``fn()`` returns ``{tensor name: (got, ref)}``; ``tol`` maps each name to its tolerance.
        ``expect_ops``: resnet_fast op names whose fallbacks during ``fn`` make the check fail."""
        base = {"group": group, "case": case, "role": role, "kernels": kernels, "dtype": dtype}
        if self.out_of_time():
            self.rows.append({**base, "tensor": "*", "status": "skipped: time budget", "ok": None})
            return
        import resnet_fast
        before = resnet_fast.stats()
        t0 = time.perf_counter()
        try:
            pairs = fn()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001  (reported, the run goes on)
            msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
            self.rows.append({**base, "tensor": "*", "status": f"error: {msg}", "ok": False,
                              "seconds": time.perf_counter() - t0})
            self.log(f"SMOKE FAIL {group} | {case} | {role} ({kernels}) | {dtype}: {msg}\n"
                     + traceback.format_exc(limit=3))
            return
        fell = _new_fallbacks(before, resnet_fast.stats(), expect_ops)
        seconds = time.perf_counter() - t0
        for name, (got, ref) in pairs.items():
            err = rel_err(got, ref)
            ok = err <= tol[name] and not fell
            status = "ok" if ok else ("fell back: " + "; ".join(fell) if fell else "MISMATCH")
            self.rows.append({**base, "tensor": name, "err": err if math.isfinite(err) else None,
                              "finite": math.isfinite(err), "tol": tol[name], "ok": ok, "status": status,
                              "seconds": seconds})
            if not ok:
                self.log(f"SMOKE FAIL {group} | {case} | {role} ({kernels}) | {dtype} | {name}: rel err "
                         f"{err:.3g} > tol {tol[name]:.3g}" + (f" [{status}]" if fell else ""))

    def record(self, group: str, case: str, role: str, kernels: str, dtype: str, name: str, err: float,
               tol: float, extra: Optional[dict] = None) -> None:
        ok = err <= tol
        self.rows.append({"group": group, "case": case, "role": role, "kernels": kernels, "dtype": dtype,
                          "tensor": name, "err": err if math.isfinite(err) else None, "finite": math.isfinite(err),
                          "tol": tol, "ok": ok, "status": "ok" if ok else "MISMATCH", **(extra or {})})
        if not ok:
            self.log(f"SMOKE FAIL {group} | {case} | {role} ({kernels}) | {dtype} | {name}: rel err {err:.3g} > "
                     f"tol {tol:.3g}")


def _new_fallbacks(before: dict, after: dict, ops: tuple) -> list:
    out = []
    for op in ops:
        for reason, n in after["fallbacks"].get(op, {}).items():
            if n > before["fallbacks"].get(op, {}).get(reason, 0):
                out.append(f"{op}: {reason}")
    return out


def _randn(shape, dtype, device, fmt=CL):
    return torch.randn(shape, dtype=torch.float32, device=device).to(dtype).contiguous(memory_format=fmt)


def _up(t: torch.Tensor, dtype) -> torch.Tensor:
    """A float leaf copy of ``t`` in the reference dtype."""
    return t.detach().to(dtype).requires_grad_(True)


# ---- conv roles -----------------------------------------------------------------------------------------

def conv_checks(s: Smoke, conv, dtype: str, batch: int, twins: bool = False) -> None:
    """The three roles of one conv shape in one dtype; with ``twins`` instead ``infer`` and ``train`` with the
    forward pinned to each persistent twin the autotuner may pick for it (a pointwise conv: see
    :func:`conv_fwd._candidates`), which the untuned run never runs."""
    from ..kernels import configs, conv_fwd
    from ..kernels.conv_common import ConvGeometry
    from .. import ops

    dev, dt, rd = s.device, DTYPES[dtype], s.ref_dtype
    tol, gtol = TOL[dtype], TOL[dtype] * GRAD_FACTOR
    ho, wo = conv.out_hw
    kw = dict(stride=conv.stride, padding=conv.padding, groups=conv.groups)
    x = _randn((batch, conv.cin, conv.h, conv.w), dt, dev)
    w = (_randn((conv.cout, conv.cin // conv.groups, conv.k, conv.k), dt, dev)
         * (1.0 / math.sqrt(conv.cin // conv.groups * conv.k * conv.k))).to(dt).contiguous(memory_format=CL)
    scale = torch.rand(conv.cout, device=dev) + 0.5
    shift = torch.randn(conv.cout, device=dev) * 0.1
    res = _randn((batch, conv.cout, ho, wo), dt, dev)
    out_bytes = batch * conv.cout * ho * wo * x.element_size()
    name = conv.name

    def infer():
        g = ConvGeometry.make(x.shape, w.shape, conv.stride, conv.padding, 1, conv.groups, "smoke")
        out = torch.full((batch, conv.cout, ho, wo), float("nan"), dtype=dt, device=dev).contiguous(
            memory_format=CL)
        y, _ = conv_fwd.conv2d_nhwc(x, conv_fwd.pack_weight(w, conv.groups, dt), g, scale=scale, shift=shift,
                                    residual=res, relu=True, out=out)
        with ieee_reference():
            ref = F.relu(F.conv2d(x.to(rd), w.to(rd), None, **kw) * scale.to(rd).view(1, -1, 1, 1)
                         + shift.to(rd).view(1, -1, 1, 1) + res.to(rd))
        return {"y": (y, ref)}
    if not twins:
        s.check("conv", name, "infer", "conv_fwd", dtype, infer, {"y": tol})

    def conv2d_bwd():
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, scale, shift)]
        grad = _randn((batch, conv.cout, ho, wo), dt, dev)
        poison_allocator(dev, 4 * out_bytes)
        y = ops.conv2d(leaves[0], leaves[1], scale=leaves[2], shift=leaves[3], relu=True, **kw)
        poison_allocator(dev, 4 * x.numel() * x.element_size())
        got = torch.autograd.grad(y, leaves, grad)
        with ieee_reference():
            r = [_up(t, rd) for t in (x, w, scale, shift)]
            yr = F.relu(F.conv2d(r[0], r[1], None, **kw) * r[2].view(1, -1, 1, 1) + r[3].view(1, -1, 1, 1))
            want = torch.autograd.grad(yr, r, grad.to(rd))
        names = ("y", "grad_x", "grad_w", "grad_scale", "grad_shift")
        return dict(zip(names, [(y, yr)] + list(zip(got, want))))
    if not twins:
        s.check("conv", name, "conv2d_bwd", "conv_fwd+conv_dgrad+conv_wgrad", dtype, conv2d_bwd,
                {"y": tol, **{n: gtol for n in ("grad_x", "grad_w", "grad_scale", "grad_shift")}},
                expect_ops=("conv2d", "conv2d_backward"))

    prologue = conv.cin != 3  # every conv but the stem reads a BN+ReLU output in training

    def train():
        in_scale = (torch.rand(conv.cin, device=dev) + 0.5) if prologue else None
        in_shift = (torch.randn(conv.cin, device=dev) * 0.2) if prologue else None
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, w) + ((in_scale, in_shift) if prologue
                                                                            else ())]
        gy = torch.randn((batch, conv.cout, ho, wo), device=dev)
        poison_allocator(dev, 4 * out_bytes)
        y, mean, invstd = ops.conv_bn_stats(*leaves, **kw)
        yhat = (y.float() - mean.view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1)
        poison_allocator(dev, 4 * x.numel() * x.element_size())
        got = torch.autograd.grad((yhat * gy).sum(), leaves)
        with ieee_reference():
            r = [_up(t, rd) for t in leaves]
            a = F.relu(r[0] * r[2].view(1, -1, 1, 1) + r[3].view(1, -1, 1, 1)) if prologue else r[0]
            yr = F.conv2d(a, r[1], None, **kw)
            var, mr = torch.var_mean(yr, dim=(0, 2, 3), unbiased=False)
            ir = torch.rsqrt(var + 1e-5)
            want = torch.autograd.grad((((yr - mr.view(1, -1, 1, 1)) * ir.view(1, -1, 1, 1)) * gy.to(rd)).sum(),
                                       r)
        names = ("grad_x", "grad_w", "grad_in_scale", "grad_in_shift")
        return {"y": (y, yr), "mean": (mean, mr), "invstd": (invstd, ir), **dict(zip(names, zip(got, want)))}
    tols = {"y": tol, "mean": tol, "invstd": tol, "grad_x": gtol, "grad_w": gtol, "grad_in_scale": gtol,
            "grad_in_shift": gtol}
    kernels = "conv_fwd(prologue,stats)+bn_finalize+conv_dgrad(epilogue)+conv_wgrad(prologue)"
    if twins:
        g = ConvGeometry.make(x.shape, w.shape)
        tma = conv_fwd.tma_eligible(x, conv_fwd.pack_weight(w, 1, dt), g,
                                    dot_ieee=dt == torch.float32 and not configs.conv_allows_tf32())
        kept = configs.prune(configs.fwd_configs(dt), g.M, g.Kg, g.Cg_pad, dt)  # the launcher's tiles for the shape
        for cfg in conv_fwd.persistent_configs(dt, tma) if g.is_pointwise and conv.groups == 1 else ():
            if dataclasses.replace(cfg, persistent=False, tma=False) in kept:
                with conv_fwd.pinned_config(cfg):
                    s.check("conv", name, f"infer[{cfg.name()}]", "conv_fwd", dtype, infer, {"y": tol})
                    s.check("conv", name, f"train[{cfg.name()}]", kernels, dtype, train, tols,
                            expect_ops=("conv_bn_stats",))
        return
    s.check("conv", name, "train", kernels, dtype, train, tols, expect_ops=("conv_bn_stats",))
    if conv.k > 1 and prologue:  # the backward's third implementation (the chooser's, not forceable by variable)
        with offered_impl("triton_dy_pass"):
            s.check("conv", name, "train_dy_pass", "conv_fwd+bn_finalize+form_dy+conv_dgrad(epilogue)+conv_wgrad",
                    dtype, train, tols, expect_ops=("conv_bn_stats",))


# ---- the C++/CUDA residual tail -------------------------------------------------------------------------

def tail_checks(s: Smoke, tail, dtype: str, batch: int) -> None:
    from .. import ops
    dev, dt, rd = s.device, DTYPES[dtype], s.ref_dtype
    tol, gtol = TOL[dtype], TOL[dtype] * GRAD_FACTOR
    shape = (batch, tail.c, tail.h, tail.w)
    x, r, grad = _randn(shape, dt, dev), _randn(shape, dt, dev), _randn(shape, dt, dev)
    vec = [torch.rand(tail.c, device=dev) + 0.5, torch.randn(tail.c, device=dev)]
    if tail.residual_bn:
        vec += [torch.rand(tail.c, device=dev) + 0.5, torch.randn(tail.c, device=dev)]

    def ref_fn(xx, ss, bb, rr, *rest):
        v = (1, -1, 1, 1)
        rr = rr if not rest else rr * rest[0].view(v) + rest[1].view(v)
        return F.relu(xx * ss.view(v) + bb.view(v) + rr)

    def bn_add_relu():
        leaves = [t.detach().clone().requires_grad_(True) for t in [x, vec[0], vec[1], r] + vec[2:]]
        poison_allocator(dev, 4 * x.numel() * x.element_size())
        y = ops.bn_add_relu(*leaves)
        got = torch.autograd.grad(y, leaves, grad)
        ref_leaves = [_up(t, rd) for t in leaves]
        yr = ref_fn(*ref_leaves)
        want = torch.autograd.grad(yr, ref_leaves, grad.to(rd))
        names = ["grad_x", "grad_scale", "grad_shift", "grad_residual", "grad_res_scale", "grad_res_shift"]
        return {"y": (y, yr), **dict(zip(names, zip(got, want)))}
    names = ["y", "grad_x", "grad_scale", "grad_shift", "grad_residual"] + (
        ["grad_res_scale", "grad_res_shift"] if tail.residual_bn else [])
    s.check("tail", tail.name, "bn_add_relu fwd+bwd", "csrc bn_add_relu", dtype, bn_add_relu,
            {n: (tol if n == "y" else gtol) for n in names}, expect_ops=("bn_add_relu",))

    def bn_relu():
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, vec[0], vec[1])]
        y = ops.bn_relu(*leaves)
        got = torch.autograd.grad(y, leaves, grad)
        ref_leaves = [_up(t, rd) for t in leaves]
        yr = F.relu(ref_leaves[0] * ref_leaves[1].view(1, -1, 1, 1) + ref_leaves[2].view(1, -1, 1, 1))
        want = torch.autograd.grad(yr, ref_leaves, grad.to(rd))
        return {"y": (y, yr), **dict(zip(("grad_x", "grad_scale", "grad_shift"), zip(got, want)))}
    s.check("tail", tail.name, "bn_relu fwd+bwd", "csrc bn_relu", dtype, bn_relu,
            {"y": tol, "grad_x": gtol, "grad_scale": gtol, "grad_shift": gtol}, expect_ops=("bn_relu",))


# ---- a converted model against eager --------------------------------------------------------------------

def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().double().flatten().cpu() for t in tensors])


def model_checks(s: Smoke, make_ref: Callable, name: str, dtype: str, batch: int, res: int, classes: int) -> None:
    """One training step and one eval forward of ``convert(ref)`` and of eager ``ref`` at ``dtype`` (autocast
    for 16-bit), each against the reference network in ``s.ref_dtype`` without autocast."""
    if s.out_of_time():
        s.rows.append({"group": "model", "case": name, "role": "*", "kernels": "*", "dtype": dtype, "tensor": "*",
                       "status": "skipped: time budget", "ok": None})
        return
    import resnet_fast
    from ..convert import convert
    dev, dt, rd = s.device, DTYPES[dtype], s.ref_dtype
    torch.manual_seed(1)
    base = make_ref()
    x = torch.randn(batch, 3, res, res, device=dev)
    labels = torch.randint(0, classes, (batch,), device=dev)

    def run(model, run_dtype, train: bool):
        model = model.to(dev, memory_format=CL).train(train)
        xx = x.to(run_dtype if run_dtype == torch.float64 else torch.float32).contiguous(memory_format=CL)
        amp = (torch.autocast(dev.type, dtype=run_dtype) if run_dtype in (torch.float16, torch.bfloat16)
               else contextlib.nullcontext())
        if not train:
            with torch.no_grad(), amp:
                return {"logits": model(xx).double()}
        with amp:
            loss = F.cross_entropy(model(xx).double(), labels)
        loss.backward()
        params = [p for p in model.parameters() if p.requires_grad]
        bufs = [b for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))]
        return {"loss": loss.detach().reshape(1), "grads": _flat(p.grad for p in params), "running_stats": _flat(bufs)}

    for train in (True, False):
        role = "train step" if train else "eval"
        t0 = time.perf_counter()
        before = resnet_fast.stats()
        try:
            with ieee_reference():
                ref = run(copy.deepcopy(base).to(rd), rd, train)
            twin = run(copy.deepcopy(base), dt, train)
            poison_allocator(dev, 1 << 28)
            rf = run(convert(copy.deepcopy(base)), dt, train)
            if dev.type == "cuda":
                torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001
            msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
            s.rows.append({"group": "model", "case": name, "role": role, "kernels": "convert()", "dtype": dtype,
                           "tensor": "*", "status": f"error: {msg}", "ok": False})
            s.log(f"SMOKE FAIL model | {name} | {role} | {dtype}: {msg}\n" + traceback.format_exc(limit=3))
            continue
        after = resnet_fast.stats()
        fell = _new_fallbacks(before, after, tuple(after["fallbacks"]))
        calls = sum(after["kernel_calls"].values()) - sum(before["kernel_calls"].values())
        for key in ref:
            twin_err = rel_err(twin[key], ref[key])
            tol = max(TOL[dtype] * (1 if key == "logits" else GRAD_FACTOR), MODEL_TWIN_FACTOR * twin_err)
            s.record("model", name, role, "convert()", dtype, key, rel_err(rf[key], ref[key]), tol,
                     {"eager_err": twin_err, "kernel_calls": calls, "fallbacks": fell,
                      "seconds": time.perf_counter() - t0})
        if fell:
            s.log(f"SMOKE note model | {name} | {role}: fell back: {'; '.join(fell)}")


# ---- plan ------------------------------------------------------------------------------------------------

def plan(device: torch.device, quick: bool, batch: Optional[int]):
    """(conv shapes with their dtypes, tails, model spec, batch) for this device."""
    from . import shapes
    on_gpu = device.type == "cuda"
    res, width = (224, 64) if on_gpu else (16, 8)
    batch = batch or (8 if on_gpu else 2)
    convs = list(shapes.convs("resnet50", res, width))
    if quick:  # one of each family: 1x1, 3x3 s1, 3x3 s2, 1x1 s2 (downsample), stem last
        picks = []
        for pred in (lambda c: c.k == 1 and c.stride == 1, lambda c: c.k == 3 and c.stride == 1,
                     lambda c: c.k == 3 and c.stride == 2, lambda c: c.k == 1 and c.stride == 2):
            picks += [c for c in convs if pred(c)][:1]
        convs = picks + ([c for c in convs if c.k == 7] if on_gpu else [])
    few = [c for c in convs if c.k in (1, 3)][:3]  # fp16/fp32 on a 1x1 and 3x3s
    main = "bf16" if on_gpu else "fp32"
    other = ("fp16", "fp32") if on_gpu else ("fp16",)
    jobs = [(c, main) for c in convs] + [(c, d) for d in other for c in few]
    tails = list(shapes.tails("resnet50", res, width))
    if on_gpu:
        from . import reference
        model = ("resnet50", lambda: reference.model("resnet50"), 224, 1000, batch)
    else:
        def tiny():
            from ..models import resnet20
            from . import reference
            return reference.randomize_bn(resnet20(fused=False, shortcut="B"))
        model = ("resnet20 (1x1 shortcuts) 8px", tiny, 8, 10, batch)
    return jobs, tails, model, batch, main, other


def run(device: torch.device, budget_s: float, quick: bool = False, batch: Optional[int] = None,
        log: Callable = print, tune: bool = False) -> dict:
    from . import compiles, meta
    compiles.install()
    s = Smoke(device, budget_s, log)
    jobs, tails, model, batch, main, other = plan(device, quick, batch)
    t0 = time.perf_counter()
    stopped = None
    try:
        _run_checks(s, device, jobs, tails, model, batch, main, other, tune)
    except TimeBoxExpired as exc:  # the step's timeout: keep what was checked
        stopped = str(exc)
        log(f"smoke stopped: {exc}")
    doc = meta.base_doc()
    doc["stopped"] = stopped
    executed = [r for r in s.rows if r["ok"] is not None]
    failed = [r for r in executed if not r["ok"]]
    doc.pop("peaks", None)
    doc.pop("results", None)
    doc.update(kind="smoke", backend=_backend_name(), interpreter=os.environ.get("TRITON_INTERPRET", "0"),
               batch=batch, tolerances=TOL, grad_factor=GRAD_FACTOR, wall_s=round(time.perf_counter() - t0, 2),
               summary={"checks": len(executed), "failed": len(failed),
                        "skipped": sum(1 for r in s.rows if r["ok"] is None),
                        "failed_cases": sorted({f"{r['group']}|{r['case']}|{r['role']}|{r['dtype']}"
                                                for r in failed})},
               **compiles.report(), rows=s.rows)
    return doc


def _run_checks(s: Smoke, device, jobs, tails, model, batch, main, other, tune) -> None:
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.type == "cuda" else []):
        torch.manual_seed(0)
        with smoke_env(tune):
            for conv, dtype in jobs:
                conv_checks(s, conv, dtype, batch)
            for tail in tails:
                for dtype in (main,) + other[:1]:
                    tail_checks(s, tail, dtype, batch)
        name, make, res, classes, mbatch = model
        # The model on the Triton kernels; on a GPU also with every conv on the cuDNN composite.
        for impl in ("triton",) + (("cudnn",) if device.type == "cuda" else ()):
            with smoke_env(tune, conv_impl=impl):
                model_checks(s, make, f"{name} [{impl}]", main, mbatch, res, classes)
        # tuning twins the untuned run never picks (the autotuner keeps the fastest unchecked), pinned: last, so
        # the time budget cuts these first
        with smoke_env(tune):
            for conv in twin_shapes(jobs, main):
                conv_checks(s, conv, main, batch, twins=True)


def twin_shapes(jobs, main: str) -> list:
    """The first :data:`PINNED_SHAPES` pointwise convs (wide enough for a 128×128 tile) of ``jobs`` in the main
    dtype: where the smoke pins the forward's persistent twins."""
    return [conv for conv, dtype in jobs if dtype == main and conv.k == 1 and conv.stride == 1 and conv.groups == 1
            and conv.cout >= 128][:PINNED_SHAPES]


def _backend_name() -> str:
    import resnet_fast
    return resnet_fast.backend()


def format_summary(doc: dict) -> str:
    """A short table: per (group, role, dtype) the checks, failures and the worst error / its tolerance."""
    groups: dict = {}
    for r in doc["rows"]:
        k = (r["group"], r["role"], r["dtype"])
        g = groups.setdefault(k, {"n": 0, "fail": 0, "skip": 0, "worst": 0.0})
        if r["ok"] is None:
            g["skip"] += 1
            continue
        g["n"] += 1
        g["fail"] += not r["ok"]
        ratio = (r["err"] / r["tol"]) if r.get("err") is not None and r.get("tol") else (
            math.inf if not r["ok"] else 0.0)
        g["worst"] = max(g["worst"], ratio)
    lines = [f"{'group':6} {'role':22} {'dtype':5} {'checks':>6} {'failed':>6} {'skipped':>7} {'worst err/tol':>13}"]
    for (grp, role, dt), g in groups.items():
        lines.append(f"{grp:6} {role[:22]:22} {dt:5} {g['n']:6d} {g['fail']:6d} {g['skip']:7d} {g['worst']:13.3g}")
    sm = doc["summary"]
    comp = doc.get("compile", {})
    lines.append(f"smoke: {sm['checks']} checks, {sm['failed']} failed, {sm['skipped']} skipped in {doc['wall_s']}s "
                 f"on {doc['device']} (batch {doc['batch']}); triton compiles {comp.get('count')} "
                 f"({comp.get('seconds')} s), disk-cache hits {comp.get('cache_hits')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m resnet_fast.bench.smoke", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=None, help="write the result document here")
    ap.add_argument("--batch", type=int, default=None, help="batch of every check (default 8 on a GPU, 2 on CPU)")
    ap.add_argument("--budget-s", type=float, default=150.0, help="checks not started by then are skipped")
    ap.add_argument("--quick", action="store_true", help="one conv of each family instead of all distinct ones")
    ap.add_argument("--tune", action="store_true", help="autotune as a normal run would (default: untuned configs)")
    args = ap.parse_args(argv)
    if args.batch is not None and args.batch < 1:
        ap.error("--batch must be >= 1")
    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get(_CHILD) != "1" and not (
            os.environ.get("RESNET_FAST_BACKEND") == "triton" and os.environ.get("TRITON_INTERPRET")):
        env = dict(os.environ, **{_CHILD: "1", "RESNET_FAST_BACKEND": "triton", "TRITON_INTERPRET": "1"})
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        return subprocess.call([sys.executable, "-m", "resnet_fast.bench.smoke", *(argv if argv is not None
                                                                                  else sys.argv[1:])], env=env)
    device = torch.device("cuda" if cuda else "cpu")
    stop_on_sigterm()
    doc = run(device, args.budget_s, args.quick, args.batch, tune=args.tune)
    print(format_summary(doc), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0 if doc["summary"]["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
