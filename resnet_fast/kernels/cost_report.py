"""Static cost model of every ResNet-50 conv K-loop, read from the sm_90 SASS (no GPU needed).

Run: ``python -m resnet_fast.kernels.cost_report [--json FILE] [--check-baseline FILE | --write-baseline FILE]
[--misses FILE.md] [--only fwd|dgrad|wgrad] [--workers 2] [--transform-free] [--candidates]`` with
``TRITON_INTERPRET`` unset.
Prints one row per (layer, kernel, variant) and the target summary; exit status 1 when a baseline check fails.
``--transform-free`` (implied by ``--write-baseline`` and ``--misses``) also compiles each spec whose K-loop
transforms an operand (dy_bn, dy_relu, the BN+ReLU prologue) without it and reports that loop's issue ratio
(``transform_free_ratio``, column ``free``): what the transform itself costs. ``--misses`` writes every target miss
with its reason (:mod:`.cost_targets`; the committed one is ``docs/COST_MISSES.md``). ``--candidates`` (implied by
both as well) compiles every config the launcher may pick for each launch that misses its issue-ratio target
(:func:`best_candidates`) and keeps the lowest ratio (``best_candidate``): whether any offered tile reaches it.

Layers: every conv of ResNet-50 (batch 256, 224², bf16, channels_last activations AND weights, as
``model.to(memory_format=torch.channels_last)`` makes them) from :mod:`resnet_fast.bench.shapes`; identical
(shape, role) pairs are one record with a ``count``. Roles and the kernel variants the ops launch for them:

* ``fwd/infer`` -- ``ops.conv2d`` with the folded-BN epilogue (scale, shift; ReLU except the downsample; the
  residual on a bottleneck's conv3); ``fwd/train`` -- ``conv_bn_stats`` (STATS; the BN+ReLU PROLOGUE on conv2/conv3);
  on pointwise convs also the persistent TMA twin the autotuner measures (``+persistent``, ``alt``);
* ``dgrad/train``, ``wgrad/train`` -- ``conv_bn_stats_backward``: ``dy_bn`` (conv1, downsample, stem) or ``fused``
  (conv2/conv3: dgrad's dReLU/dBN epilogue, wgrad's prologue); on a filter of more than one tap (conv2) the
  forward's and wgrad's prologue runs as its own pass (:mod:`.prologue_pass`, the launchers' untuned default
  there with the C++ extension; config suffix ``-pp``): the record is the GEMM without it, and the pass's two
  activation passes count as extra bytes; no dgrad for the stem (the op runs only the
  gradients autograd asks for, and the image needs none);
* ``dgrad/infer``, ``wgrad/infer`` -- ``ops.conv2d``'s backward: dgrad ``relu`` (the mask on load) over the weight
  scaled by the folded BN (that weight-sized pass counts as extra bytes), wgrad ``dy_bn_relu_sums``; ``plain`` /
  ``sums`` for the downsample, which has no ReLU; none for the stem (the image needs no gradient).

Config: the untuned choice the launchers make on CUDA (``RESNET_FAST_AUTOTUNE=0`` or no tuning table): the
forward's ``configs.heuristic`` over its pruned candidates (never a TMA twin), dgrad's and wgrad's
``_candidates`` default, wgrad's ``pick_split``. Each distinct (kernel, constexprs, options) spec is compiled once
with :func:`compile_check.compile_checked` (the compile check's pointer alignment; integer ``div16`` hints from the
module's own compile spec of that path), then disassembled with Triton's bundled ``nvdisasm``/``cuobjdump``.

Model, per spec (from the SASS):

* main loop: the innermost loop containing ``HGMMA`` -- a backward branch ``BRA target`` (target address <=
  branch address) whose body ``[target, branch]`` holds an HGMMA and no ``EXIT``/``RET`` (that excludes Triton's
  out-of-line mbarrier-retry stubs, which branch back into the loop from the end of the kernel); the smallest
  such body. None found -> an error, never a zero.
* ``instr_per_step``: the static instruction count of that body = instructions each warp issues per K-step
  (every branch-free straight line; predicated-off instructions still issue).
* ``mma_cycles``: the HGMMA ``m×n×k`` shapes in the body times the warpgroups (``num_warps/4``) = FMAs per step,
  ÷ 2048 bf16/fp16 FMA per clock per SM (H100 SXM: 989 TFLOPS dense at 1.83 GHz over 132 SMs; one warpgroup's
  wgmma drives all 4 sub-partitions' tensor cores, so one CTA alone can reach the SM's rate), tf32 at 1024.
* ``issue_ratio`` = instr_per_step × num_warps ÷ 4 schedulers (1 instruction/clock each) ÷ mma_cycles: above 1
  the warps cannot even issue as fast as the tensor cores finish; it is independent of how many CTAs share an SM.
* ``tiles_in_flight``: K-step tiles resident at the MMA = 1 + the tiles still loading. cp.async: the loop's
  ``DEPBAR.LE SB0, N`` allows N commit groups outstanding and each step commits G groups (``LDGDEPBAR`` count in
  the body), so 1 + N/G. TMA (``UTMALDG`` in the body): the mbarrier ring (``mbarrier.init`` count in the PTX,
  at most ``num_stages``: operands with rings of their own each add one) minus the one buffer the async wgmma of
  the previous step still reads (an operand read into registers holds its buffer one step less; the box kernel's
  dy: ``num_stages - 1`` buffers, 2 in flight all the same). Any register load (``LDG``) in the
  body: 1, whatever else is pipelined (that operand arrives in the step that uses it).
* ``loads``: per body, ``utmaldg``, ``ldgsts128`` (16-byte cp.async), ``ldgsts_narrow`` (4/8-byte cp.async),
  ``ldg_scalar`` (LDG of <= 4 bytes), ``ldg_vector`` (8/16-byte LDG).
* ``registers``/``local_bytes`` from ``cuobjdump -res-usage``; ``spills``: LDL/STL instructions in the kernel.
* ``epilogue_instr``: instructions per warp per tile after the K-loop up to ``EXIT``; in a persistent kernel (the
  tile loop flattened into the K-loop, ``PERSISTENT``) the largest region of the loop that a forward branch skips
  and that stores to global memory, which is then not counted per step (:func:`epilogue_span`).

Per layer: ``tiles`` (the launch grid), ``steps`` per tile (average over dgrad's stride phases),
``ctas_per_sm = min(64K registers ÷ (regs rounded to 8 × 32 × warps), 228 KB ÷ (shared + 1 KB), 64 warps ÷ warps,
32)``, ``waves = tiles ÷ (132 × ctas_per_sm)``, ``tail_efficiency = waves ÷ ceil(waves)``. Times at 1.83 GHz:
``mma_us`` = tiles × steps × mma_cycles ÷ 132 SMs; ``issue_us`` = mma_us × issue_ratio; ``epilogue_us`` = tiles ×
epilogue_instr × warps ÷ 4 ÷ 132 SMs (persistent: one CTA per SM); ``memory_us`` = compulsory
bytes (each operand read once, outputs and fp32 split-K partials written once, BN partials ignored) plus the
dense-taps pad pass (the stem's image written as 4 channels and read back, in the forward and again in wgrad; not
in the roofline) ÷ 3.35 TB/s;
``est_us = max(mma, issue + epilogue, memory) ÷ tail_efficiency`` where the epilogue overlaps other work (2+ CTAs
per SM, or persistent: ``epilogue_overlap``), else ``(max(mma, issue, memory) + epilogue) ÷ tail_efficiency`` (one
CTA per SM: its loads and MMAs stop while it stores, and every SM is assumed in step, none borrowing another's
bandwidth). ``est_fraction_of_roofline`` = roofline time ÷ est_us, the
roofline being max(useful FMAs at 989 TFLOPS, compulsory bytes at 3.35 TB/s): padding waste (the stem's 3
channels padded to 4 and its 28-wide filter rows to 32, partial tiles) and wave tails count against it.

Summary: the records missing each target; of the issue-ratio misses, those whose issue time is within their MMA
or memory time (the ratio costs them nothing in this model), and per role the issue-bound time beyond
``max(mma_us, memory_us)`` per step, as the records stand and taking each launch's faster of the record and its
alternative (the backward's ``triton_dy_pass``, the forward's persistent twin: what the chooser would measure);
per alternative and role, what it changes per step, always taken and where faster.

Ignored: L2 re-reads of operands by neighbouring tiles, the prologue (address setup) and a new CTA's pipeline
fill, latency (a dependent load chain or a wgmma wait that the pipeline depth does not cover), bank conflicts,
predicated-off HGMMA/loads, the ``== 1`` integer specialisation of Triton's launcher, the wgrad combine kernel's
launch, clocks below boost. It ranks specs and catches regressions; it is not a timing.

Baseline: :data:`BASELINE` (committed; with each record's ``est_us``, the benchmark's estimates,
:mod:`resnet_fast.bench.estimates`). ``--write-baseline FILE`` rewrites it on purpose after a deliberate change;
``tests/test_cost_report.py`` fails when a record's ``issue_ratio`` grows by more than 5 %, its ``spills`` grow,
its ``tiles_in_flight`` drops, its config changes, a miss's reason (:func:`.cost_targets.reasons`) changes or a
record appears or disappears; ``docs/COST_MISSES.md`` must equal :func:`.cost_targets.render` of the baseline.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import importlib
import json
import math
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import time

from .cost_targets import issue_lost_us, issue_target, reasons, record_id, render, target_problems

BASELINE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cost_baseline.json")
BATCH, RESOLUTION, MODEL = 256, 224, "resnet50"
NUM_SMS = 132
CLOCK_HZ = 1.83e9
FMA_PER_CLK_SM = {"bf16": 2048, "fp16": 2048, "fp32": 1024}  # dense wgmma; fp32 operands run as tf32
HBM_BYTES_PER_S = 3.35e12
REGS_PER_SM, SMEM_PER_SM, WARPS_PER_SM, CTAS_PER_SM = 65536, 233472, 64, 32
ISSUE_TOLERANCE = 1.05  # the baseline check: issue_ratio may grow by at most 5 %


# ----------------------------------------------------------------------------------------------- SASS parsing
class SassFormatError(ValueError):
    """The listing does not look like ``nvdisasm`` output, or has no HGMMA loop: never report zeros."""


@dataclasses.dataclass(frozen=True)
class Instr:
    addr: int
    opcode: str  # full dotted opcode, e.g. "LDGSTS.E.BYPASS.128"
    text: str    # the instruction without address and predicate


_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:(@!?U?P[T0-9])\s+)?([A-Z][A-Za-z0-9_.]*)(.*?)\s*;?\s*$")
_LABEL = re.compile(r"^(\.L_x_\d+):\s*$")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
_HGMMA = re.compile(r"HGMMA\.(\d+)x(\d+)x(\d+)")


def parse_sass(text: str) -> tuple:
    """``nvdisasm -c`` listing -> (instructions in address order, {label: address of the next instruction})."""
    instrs, labels, pending = [], {}, []
    for line in text.splitlines():
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _LINE.match(line)
        if m:
            addr = int(m.group(1), 16)
            for lab in pending:
                labels[lab] = addr
            pending = []
            instrs.append(Instr(addr, m.group(3), (m.group(3) + m.group(4)).strip()))
    for lab in pending:  # a label after the last instruction (the function's end)
        labels[lab] = (instrs[-1].addr + 16) if instrs else 0
    if not instrs:
        raise SassFormatError("no instructions recognised: is this nvdisasm output (/*addr*/ OPCODE ...;)?")
    return instrs, labels


def find_main_loop(instrs: list, labels: dict) -> tuple:
    """(first, last) indices of the innermost loop body holding an HGMMA (see the module docstring)."""
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    best = None
    for j, ins in enumerate(instrs):
        if not ins.opcode.startswith("BRA"):
            continue
        m = _TARGET.search(ins.text)
        if not m:
            continue
        if m.group(1) not in labels:
            raise SassFormatError(f"branch to unknown label {m.group(1)} at {ins.addr:#x}")
        i = index.get(labels[m.group(1)])
        if i is None or i > j:
            continue  # forward branch
        body = instrs[i:j + 1]
        if not any(b.opcode.startswith("HGMMA") for b in body):
            continue
        if any(b.opcode in ("EXIT", "RET") or b.opcode.startswith("RET.") for b in body):
            continue
        if best is None or j - i < best[1] - best[0]:
            best = (i, j)
    if best is None:
        raise SassFormatError("no loop containing HGMMA found (no backward BRA around a wgmma)")
    return best


_DEPBAR = re.compile(r"DEPBAR\.LE\s+SB0\s*,\s*(0x[0-9a-f]+|\d+)")


def _ldg_bytes(opcode: str) -> int:
    parts = opcode.split(".")
    for p in reversed(parts):
        if p in ("128", "64", "32", "U16", "S16", "U8", "S8"):
            return {"128": 16, "64": 8, "32": 4, "U16": 2, "S16": 2, "U8": 1, "S8": 1}[p]
    return 4


def epilogue_span(instrs: list, labels: dict, i: int, j: int, persistent: bool) -> tuple:
    """``[a, b)`` indices of the epilogue of the main loop ``instrs[i..j]``: for a ``persistent`` kernel (one
    flattened loop over tiles and K-steps) the largest region inside the loop that a forward branch skips and that
    stores to global memory (``STG``: the tile's output); else the instructions after the loop up to the first
    ``EXIT``. A persistent loop without such a region is an error, never a zero."""
    if not persistent:
        end = next((k for k in range(j + 1, len(instrs)) if instrs[k].opcode == "EXIT"), len(instrs))
        return j + 1, end + 1
    index = {ins.addr: k for k, ins in enumerate(instrs)}
    best = None
    for k in range(i, j + 1):
        m = _TARGET.search(instrs[k].text) if instrs[k].opcode.startswith("BRA") else None
        t = index.get(labels.get(m.group(1))) if m else None
        if t is None or not k < t <= j:
            continue
        if any(ins.opcode.startswith("STG") for ins in instrs[k + 1:t]) and (best is None or t - k > best[1] - best[0]):
            best = (k + 1, t)
    if best is None:
        raise SassFormatError("persistent kernel: no branch-skipped region with global stores in its main loop")
    return best


def loop_stats(sass: str, num_warps: int, mbarriers: int = 0, num_stages: int = 0, persistent: bool = False) -> dict:
    """Main-loop figures of one kernel's SASS listing (``mbarriers``: ``mbarrier.init`` count of its PTX;
    ``num_stages``: the compile option, which bounds a TMA ring when several operands have rings of their own;
    ``persistent``: the tile loop is flattened into the K-loop, whose epilogue region is then not per step)."""
    instrs, labels = parse_sass(sass)
    i, j = find_main_loop(instrs, labels)
    e0, e1 = epilogue_span(instrs, labels, i, j, persistent)
    body = [ins for k, ins in enumerate(instrs[i:j + 1], i) if not e0 <= k < e1]
    fma = 0
    for b in body:
        m = _HGMMA.match(b.opcode)
        if m:
            fma += int(m.group(1)) * int(m.group(2)) * int(m.group(3))
    if not fma:
        raise SassFormatError("HGMMA found but its MxNxK shape was not recognised")
    loads = {"utmaldg": 0, "ldgsts128": 0, "ldgsts_narrow": 0, "ldg_scalar": 0, "ldg_vector": 0}
    groups, waits = 0, []
    for b in body:
        op = b.opcode
        if op.startswith("UTMALDG"):
            loads["utmaldg"] += 1
        elif op.startswith("LDGSTS"):
            loads["ldgsts128" if op.endswith(".128") else "ldgsts_narrow"] += 1
        elif op == "LDGDEPBAR":
            groups += 1
        elif op == "LDG" or op.startswith("LDG."):
            loads["ldg_vector" if _ldg_bytes(op) > 4 else "ldg_scalar"] += 1
        m = _DEPBAR.search(b.text) if op.startswith("DEPBAR") else None
        if m:
            waits.append(int(m.group(1), 0))
    cp_async = loads["ldgsts128"] + loads["ldgsts_narrow"]
    if cp_async and (not groups or not waits):
        raise SassFormatError("cp.async loads in the loop without LDGDEPBAR / DEPBAR.LE SB0 waits")
    if loads["ldg_scalar"] or loads["ldg_vector"]:
        in_flight = 1  # a register load is consumed in the step that issues it: that operand is not pipelined
    elif loads["utmaldg"]:
        in_flight = max(1, min(mbarriers, num_stages or mbarriers) - 1)
    elif cp_async:
        in_flight = 1 + min(waits) / groups
    else:
        in_flight = 1
    spills = sum(1 for ins in instrs if ins.opcode.startswith(("LDL", "STL")))
    warpgroups = max(1, num_warps // 4)
    return {"instr_per_step": len(body), "hgmma": sum(b.opcode.startswith("HGMMA") for b in body),
            "mma_fma_per_step": fma * warpgroups, "tiles_in_flight": round(in_flight, 2), "loads": loads,
            "spills": spills, "loop": [instrs[i].addr, instrs[j].addr], "epilogue_instr": e1 - e0,
            "epilogue_in_loop": persistent}


# -------------------------------------------------------------------------------------------------- compiling
def _tool(name: str) -> str:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} not found at {path} (Triton's NVIDIA backend ships it)")
    return path


_REG = re.compile(r"REG:(\d+)")
_LOCAL = re.compile(r"LOCAL:(\d+)")


def analyse_spec(job: tuple) -> dict:
    """Compile one spec for sm_90 and read its SASS (runs in a pool worker). ``job = (key, module, fn name,
    signature, constexprs, options, div16)``."""
    key, module, fn_name, sig, cx, opts, div16 = job
    from .compile_check import compile_checked
    fn = getattr(importlib.import_module(f"resnet_fast.kernels.{module}"), fn_name)
    t0 = time.time()
    ck, usage = compile_checked(fn, sig, cx, opts, div16)
    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(ck.asm["cubin"])
        sass = subprocess.run([_tool("nvdisasm"), "-c", cubin], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True,
                             check=True).stdout
    ptx = ck.asm["ptx"]
    types = " ".join(sig.values())  # pointers (*bf16) and TMA descriptors (tensordesc<bf16[...]>)
    dtype = "bf16" if "bf16" in types else "fp16" if "fp16" in types else "fp32"
    row = loop_stats(sass, opts["num_warps"], ptx.count("mbarrier.init"), opts["num_stages"],
                     bool(cx.get("PERSISTENT")))
    regs, local = _REG.search(res), _LOCAL.search(res)
    if regs is None:
        raise SassFormatError(f"cuobjdump -res-usage gave no REG count: {res[:300]}")
    # spill bytes from Triton's ptxas log (cuobjdump's LOCAL is 0 for them: they live in STACK), else LOCAL
    spilled = usage["spill_stores"] + usage["spill_loads"] if usage["spill_stores"] is not None else \
        int(local.group(1)) if local else 0
    row.update(key=key, dtype=dtype, registers=int(regs.group(1)), local_bytes=spilled,
               shared=int(getattr(ck.metadata, "shared", 0) or 0), num_warps=opts["num_warps"],
               num_stages=opts["num_stages"], seconds=round(time.time() - t0, 2))
    row["mma_cycles"] = row["mma_fma_per_step"] / FMA_PER_CLK_SM[dtype]
    row["issue_ratio"] = round(row["instr_per_step"] * opts["num_warps"] / 4 / row["mma_cycles"], 3)
    return row


# ------------------------------------------------------------------------------------------------- the layers
@dataclasses.dataclass
class Launch:
    """One (layer, kernel, variant) with its spec and the per-layer figures the model needs."""
    layer: str
    count: int
    role: str          # "infer" or "train"
    kernel: str        # "fwd", "dgrad", "wgrad"
    variant: str
    config: str
    module: str
    fn_name: str
    cx: dict
    opts: dict
    div16: tuple
    aligned: bool
    tiles: int
    steps: float
    useful_fma: int
    bytes: int
    sig: dict = dataclasses.field(default_factory=dict)
    extra_bytes: int = 0  # traffic beyond the compulsory bytes (the dense-taps path's pad pass): time, not roofline
    alt: bool = False     # an alternative the chooser measures (triton_dy_pass, the persistent twin), not in totals
    split_ctas: int = 0   # wgrad: the CTAs per SM its split-K assumed (conv_wgrad.ctas_per_sm)

    def spec_key(self) -> str:
        return json.dumps([self.module, self.fn_name, sorted(self.cx.items()), sorted(self.opts.items()),
                           sorted(self.div16)])


def _layers():
    """[(name, ConvShape, position)] of ResNet-50 in order; position in stem/conv1/conv2/conv3/downsample."""
    from ..bench import shapes
    out = [("stem", shapes.stem(MODEL, RESOLUTION), "stem")]
    stage, j, prev = 0, 0, None
    for b in shapes.all_blocks(MODEL, RESOLUTION):
        if b.planes != prev:
            stage, j, prev = stage + 1, 0, b.planes
        names = ["conv1", "conv2", "conv3", "downsample"] if b.kind == "bottleneck" else ["conv1", "conv2",
                                                                                            "downsample"]
        for name, conv in zip(names, b.convs()):
            out.append((f"layer{stage}.{j}.{name}", conv, name))
        j += 1
    return out


def _template(module, fn, dtype: str, **match):
    """(signature, div16) of the module's own compile spec for ``fn`` with ``dtype`` operands whose constexprs
    contain ``match`` (the path's divisibility hints, as the compile check specialises them)."""
    for spec in module.compile_specs():
        f, sig, cx, _opts, _gemm, *rest = spec
        if f is fn and f"*{dtype}" in sig.values() and all(cx.get(k) == v for k, v in match.items()):
            return sig, tuple(rest[0]) if rest else ()
    raise LookupError(f"{module.__name__}.compile_specs() has no {fn.__name__} spec for {dtype} with {match}")


def _merge_cx(template_sig: dict, cx: dict, who: str) -> dict:
    want = {k for k, t in template_sig.items() if t == "constexpr"}
    if set(cx) != want:
        raise LookupError(f"{who}: the kernel's constexprs changed (missing {sorted(want - set(cx))}, unknown "
                          f"{sorted(set(cx) - want)}): update cost_report's spec mapping")
    return cx


def launches(kernels=("fwd", "dgrad", "wgrad"), choose=None) -> list:
    """Every (layer, kernel, variant) launch of ResNet-50 at batch 256 in bf16, with its spec. ``choose(layer,
    kernel, role, variant, candidates, default)`` picks the config (default: the launcher's default; None:
    no launch), for :func:`best_candidates`."""
    import torch
    import triton
    from .bn_dy import dy_pass_may_pay
    from . import conv_dgrad, conv_dgrad_box, conv_fwd, conv_fwd_box, conv_wgrad, conv_wgrad_box, prologue_pass
    from .conv_common import ConvGeometry, as_rows, pixel_block
    dt, tdt, esize = "bf16", torch.bfloat16, 2
    CL = torch.channels_last
    seen: dict = {}

    def meta(shape):
        return torch.empty(shape, dtype=tdt, device="meta", memory_format=CL)

    def add(la: Launch):
        k = (la.layer.split(".")[-1] if la.layer != "stem" else "stem", la.kernel, la.role, la.variant,
             la.spec_key(), la.tiles, la.steps, la.bytes)
        if k in seen:  # an identical launch in another block: one record, counted
            seen[k].count += 1
        else:
            seen[k] = la

    def pick(name, kernel, role, variant, found):
        cands, default = found
        return default if choose is None else choose(name, kernel, role, variant, tuple(cands), default)

    for name, cs, pos in _layers():
        g = ConvGeometry.make((BATCH, cs.cin, cs.h, cs.w), (cs.cout, cs.cin // cs.groups, cs.k, cs.k), cs.stride,
                              cs.padding, 1, cs.groups)
        x, y, w = meta((g.N, g.C, g.H, g.W)), meta((g.N, g.K, g.P, g.Q)), meta((g.K, g.Cg, g.R, g.S))
        fma = g.M * g.Kg * g.Cg * g.R * g.S * g.groups
        nx, ny, nw = g.N * g.C * g.H * g.W, g.N * g.K * g.P * g.Q, g.K * g.Cg * g.R * g.S
        prologue = pos in ("conv2", "conv3")
        relu = pos != "downsample"
        dy_pass = dy_pass_may_pay(g, pos != "stem")
        wp = torch.empty(g.packed_weight_shape, dtype=tdt, device="meta")
        residual = pos == "conv3"
        for role, variant, flags, extra in (
                ("infer", "scale_shift" + ("_res" if residual else "") + ("_relu" if relu else ""),
                 dict(HAS_RES=residual, RELU=relu), ny if residual else 0),
                ("train", "prologue_stats" if prologue else "stats",
                 dict(PROLOGUE=prologue, IN_RELU=prologue, STATS=True), 0)) if "fwd" in kernels else ():
            pro = flags.get("PROLOGUE", False)
            as_pass = prologue_pass.may_pay(g, pro)  # the launcher's default there: the pass, then no prologue
            found = conv_fwd._candidates(g, tdt, False, conv_fwd._box_configs(g, x, wp, False), pro and not as_pass)
            default = pick(name, "fwd", role, variant, found)  # the default, TMA on
            if default is None:
                continue
            # alt: the persistent twin (its epilogue overlaps the next tile's loads), which the chooser measures; on a
            # pointwise conv the TMA one (offered there on sm_90: conv_fwd.tma_eligible holds for every ResNet layer)
            twin = next((dataclasses.replace(p, tma=g.is_pointwise) for p in found[0] if p.persistent), None) \
                if choose is None else None
            for c, alt in [(default, False)] + ([(twin, True)] if twin else []):
                box = c.tma and not g.is_pointwise  # the TMA-box kernel (conv_fwd_box)
                if g.pack_c:  # dense taps: the launcher's default, one step per filter row; x padded to pack_c first
                    c = dataclasses.replace(c, BLOCK_K=g.taps_k)
                    sig, div16 = _template(conv_fwd, conv_fwd._conv_fwd_kernel, dt, PACK_C=g.pack_c)
                    steps = g.R
                    pad = 2 * g.N * g.pack_c * g.H * g.W if g.C != g.pack_c else 0  # the pad pass: written, read
                else:
                    tma = c.tma and g.is_pointwise  # the pointwise TMA path (its descriptors' boxes are the tile's)
                    sig, div16 = _template(conv_fwd, conv_fwd._conv_fwd_kernel, dt, TMA=tma, PACK_C=0,
                                           EVEN_C=g.Cg % c.BLOCK_K == 0,
                                           **({"BLOCK_M": c.BLOCK_M, "BLOCK_N": c.BLOCK_N} if tma else {}))
                    if g.Cg % 16:
                        div16 = tuple(n for n in div16 if n not in ("C", "Cg"))
                    steps = g.R * g.S * triton.cdiv(g.Cg, c.BLOCK_K)
                    pad = 0
                tiles = triton.cdiv(g.M, c.BLOCK_M) * triton.cdiv(g.Kg, c.BLOCK_N) * g.groups
                cx = dict(R=g.R, S=g.S, POINTWISE=g.is_pointwise, HAS_BIAS=False, HAS_SCALE=role == "infer",
                          HAS_SHIFT=role == "infer", HAS_RES=False, RELU=False, PROLOGUE=False, IN_RELU=False,
                          STATS=False, DOT_IEEE=False, C_ALIGN=conv_fwd._pow2_divisor(g.Cg, 16),
                          EVEN_C=g.Cg % c.BLOCK_K == 0, TMA=c.tma and g.is_pointwise, PACK_C=g.pack_c,
                          PERSISTENT=c.persistent,
                          BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N, BLOCK_K=c.BLOCK_K, GROUP_M=c.GROUP_M)
                cx.update(flags)
                cr = c
                passes = 0
                if as_pass and not c.persistent:  # a persistent twin keeps the prologue in its loop (launcher)
                    cx.update(PROLOGUE=False, IN_RELU=False)
                    cr, passes = dataclasses.replace(c, prologue_pass=True), 2 * nx
                where = ("conv_fwd", "_conv_fwd_kernel", _merge_cx(sig, cx, "conv_fwd"), div16, sig)
                if box:  # same tiles and steps (its blocks tile the output exactly); the flags it has
                    bx = conv_fwd_box.constexprs((g.R, g.S), c, pixel_block(g.P, g.Q, c.BLOCK_M, exact_only=True))
                    bx.update({k: v for k, v in cx.items() if k in bx})
                    where = ("conv_fwd_box", "_conv_fwd_box_kernel", bx, conv_fwd_box.DIV16,
                             conv_fwd_box.signature(dt, bx))
                add(Launch(name, 1, role, "fwd", variant + ("+persistent" if alt else ""), cr.name(), *where[:3],
                           {"num_warps": c.num_warps, "num_stages": c.num_stages}, where[3], g.Cg % 16 == 0, tiles,
                           steps, fma, (nx + nw + ny + extra) * esize, where[4], (pad + passes) * esize, alt))
        bwd = [("train", "fused" if prologue else "dy_bn")]
        if pos != "stem":  # the inference op computes no input gradient for the image
            bwd.append(("infer", "relu" if relu else "plain"))
        if "dgrad" in kernels:
            for role, variant in (bwd if pos != "stem" else []):  # the image needs no gradient
                dx, yp = meta((g.N, g.C, g.H, g.W)), x
                vf = conv_dgrad.VARIANTS[variant]
                boxed = (y,) if vf.get("DY_BN") or vf.get("DY_RELU") else ()
                c = pick(name, "dgrad", role, variant,
                         conv_dgrad._candidates(g, y, w, (*boxed, dx, yp), False, vf.get("EPI", False), tma=True))
                if c is None:
                    continue
                aligned = conv_dgrad._aligned(g, c, y, w, (dx, yp))
                epi_aligned = conv_dgrad._epi_aligned(g, c, y, w, (dx, yp))
                sig, div16 = _template(conv_dgrad, conv_dgrad._conv_dgrad_kernel, dt, ALIGNED=aligned,
                                       EPI_ALIGNED=epi_aligned)
                sh, sw = g.stride
                hph, wph = triton.cdiv(g.H, sh), triton.cdiv(g.W, sw)
                tiles_m = triton.cdiv(g.N * hph * wph, c.BLOCK_M)
                ntaps = sum(len([1 for r in range(g.R) for s in range(g.S)
                                 if (ph + g.padding[0] - r) % sh == 0 and (pw + g.padding[1] - s) % sw == 0])
                            for ph in range(sh) for pw in range(sw))
                tiles = sh * sw * tiles_m * triton.cdiv(g.Cg, c.BLOCK_N) * g.groups
                steps = ntaps / (sh * sw) * triton.cdiv(g.Kg, c.BLOCK_K)
                cx = dict(sdy_c=1, sw_c=1, sdx_c=1, sy_c=1, SH=sh, SW=sw, EPI=False,
                          OUT_SCALE=False, DY_BN=False, DY_RELU=False, DOT_IEEE=False, ALIGNED=aligned,
                          EPI_ALIGNED=epi_aligned, BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N, BLOCK_K=c.BLOCK_K,
                          GROUP_M=c.GROUP_M)
                cx.update(conv_dgrad.VARIANTS[variant])
                if c.tma:  # the TMA-box kernel (conv_dgrad_box): its pixel blocks, every tap, no stride phases
                    gb = as_rows(g, y, dx, yp, *boxed)[0]  # as the launcher runs it
                    tiles = conv_dgrad_box.num_tiles(gb, c) * (g.C // c.BLOCK_N)
                    steps = g.R * g.S * g.K // c.BLOCK_K
                    cx = conv_dgrad_box.constexprs((g.R, g.S), c, pixel_block(gb.H, gb.W, c.BLOCK_M), vf)
                for alt in (False, True) if role == "train" and dy_pass else (False,):
                    # alt: the backward's triton_dy_pass runner: dy formed once (the pass's 3 activation passes
                    # counted here), the GEMM without DY_BN
                    cxa = dict(cx, DY_BN=False, DY_RELU=False) if alt else cx
                    nbytes = (ny * (2 if cxa["DY_BN"] or cxa["DY_RELU"] else 1) + nw + nx * (2 if cxa["EPI"] else 1)) \
                        * esize
                    where = ("conv_dgrad_box", "_conv_dgrad_box_kernel", cxa, conv_dgrad_box.DIV16,
                             conv_dgrad_box.signature(dt, cxa)) if c.tma else \
                        ("conv_dgrad", "_conv_dgrad_kernel", _merge_cx(sig, cxa, "conv_dgrad"), div16, sig)
                    add(Launch(name, 1, role, "dgrad", variant + ("+dy_pass" if alt else ""), c.name(), *where[:3],
                               {"num_warps": c.num_warps, "num_stages": c.num_stages}, where[3], aligned, tiles,
                               steps, fma, nbytes, where[4],
                               (3 * ny if alt else 2 * nw if role == "infer" else 0) * esize, alt))
        if "wgrad" in kernels:
            wb = [("train", "fused" if prologue else "dy_bn", True)]
            if dy_pass:
                wb.append(("train", wb[0][1] + "+dy_pass", True))
            if pos != "stem":
                wb.append(("infer", "dy_bn_relu_sums" if relu else "sums", True))
            else:
                wb = [("train", "dy_bn", True)]
            for role, variant, need_dw in wb:
                alt = variant.endswith("+dy_pass")  # triton_dy_pass: dy formed (and counted) before dgrad
                vflags = dict(conv_wgrad.VARIANTS[variant.split("+")[0]])
                if alt:
                    vflags.update(DY_BN=False, DY_RELU=False)
                passes = 0
                if prologue_pass.may_pay(g, vflags.get("PROLOGUE", False)):  # the launcher's default: the pass
                    vflags["PROLOGUE"], passes = False, 2 * nx
                c = pick(name, "wgrad", role, variant, conv_wgrad._candidates(
                    g, y, x, vflags.get("DY_BN", False), prologue=vflags.get("PROLOGUE", False), tma=True))
                if c is None:
                    continue
                aligned = conv_wgrad._aligned(g, c, y, x)
                packed = conv_wgrad._packed(g, c, y, x)
                pack_c = g.pack_c if packed else 0
                dy_flat, x_flat = conv_wgrad._flat_switches(g, y, x, packed)
                sig, div16 = _template(conv_wgrad, conv_wgrad._conv_wgrad_kernel, dt, ALIGNED=aligned,
                                       PACKED=packed, IDX64=False, PACK_C=pack_c)  # the path's hints
                if passes:
                    c = dataclasses.replace(c, prologue_pass=True)
                forms = {"dy_bn": vflags.get("DY_BN", False), "prologue": vflags.get("PROLOGUE", False)}
                gl = as_rows(g, y, x)[0] if c.tma else g  # the launch's (a 1×1 box: one row)
                split = conv_wgrad.pick_split(gl, c, first_column_only=not need_dw, packed=packed, **forms)
                split_ctas = conv_wgrad.ctas_per_sm(c, **forms)  # what the split assumed (tested against the SASS)
                _, split, steps = conv_wgrad.chunks(gl, c, split)  # the launcher's chunks (box: pixel blocks)
                parts = nw * 4 * (2 * split if split > 1 else 1)  # fp32 partials written and read back, or dW
                nbytes = (ny * (2 if vflags.get("DY_BN") else 1) + nx) * esize + parts
                if c.tma:  # the TMA-box kernel (conv_wgrad_box)
                    bp, bq = pixel_block(gl.P, gl.Q, c.BLOCK_K)
                    cx = dict(S=g.S, SH=g.stride[0], SW=g.stride[1], TILES_N=g.C // c.BLOCK_N, PROLOGUE=False,
                              DY_BN=False, DY_RELU=False, SUMS=False, ROW_TAPS=c.row_taps, BP=bp, BQ=bq,
                              BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N)
                    cx.update({k: v for k, v in vflags.items() if k in cx})
                    add(Launch(name, 1, role, "wgrad", variant, c.name() + f"-split{split}", "conv_wgrad_box",
                               "_conv_wgrad_box_kernel", cx, {"num_warps": c.num_warps, "num_stages": c.num_stages},
                               conv_wgrad_box.DIV16, True,
                               g.K // c.BLOCK_M * (g.R if c.row_taps else g.R * g.S) * cx["TILES_N"] * split,
                               steps, fma, nbytes, conv_wgrad_box.signature(dt, cx), passes * esize, alt,
                               split_ctas))
                    continue
                grid, tiles_n = conv_wgrad._grid(g, c, packed, split, need_dw)
                tiles = math.prod(grid)
                cx = dict(sdy_c=1, sx_c=1, SH=g.stride[0], SW=g.stride[1], S=g.S, TILES_N=tiles_n, SPLIT=split,
                          PROLOGUE=False, DY_BN=False, DY_RELU=False, SUMS=False, DOT_IEEE=False, ALIGNED=aligned,
                          PACKED=packed, IDX64=conv_wgrad._needs_int64(g, y, x), PACK_C=pack_c,
                          DY_FLAT=dy_flat, X_FLAT=x_flat, ROW_TAPS=c.row_taps and not packed, BLOCK_M=c.BLOCK_M,
                          BLOCK_N=c.BLOCK_N, BLOCK_K=c.BLOCK_K)
                cx.update(vflags)
                add(Launch(name, 1, role, "wgrad", variant, c.name() + f"-split{split}", "conv_wgrad",
                           "_conv_wgrad_kernel", _merge_cx(sig, cx, "conv_wgrad"),
                           {"num_warps": c.num_warps, "num_stages": c.num_stages}, div16, aligned, tiles,
                           steps, fma, nbytes, sig,
                           (2 * g.N * pack_c * g.H * g.W if pack_c and g.C != pack_c else 0) * esize
                           + passes * esize, alt, split_ctas))
    return list(seen.values())


def _ctas_per_sm(regs: int, warps: int, shared: int) -> int:
    by_regs = REGS_PER_SM // (math.ceil(max(regs, 1) / 8) * 8 * 32 * warps)
    by_smem = SMEM_PER_SM // (shared + 1024)
    return max(0, min(by_regs, by_smem, WARPS_PER_SM // warps, CTAS_PER_SM))


def model(la: Launch, spec: dict) -> dict:
    """The record of one launch from its spec's SASS figures (see the module docstring)."""
    persistent = spec.get("epilogue_in_loop", False)
    ctas = 1 if persistent else _ctas_per_sm(spec["registers"], spec["num_warps"], spec["shared"])
    waves = la.tiles / (NUM_SMS * max(ctas, 1))
    tail = waves / math.ceil(waves)
    mma_us = la.tiles * la.steps * spec["mma_cycles"] / NUM_SMS / CLOCK_HZ * 1e6
    issue_us = mma_us * spec["issue_ratio"]
    memory_us = (la.bytes + la.extra_bytes) / HBM_BYTES_PER_S * 1e6
    epilogue_us = la.tiles * spec["epilogue_instr"] * spec["num_warps"] / 4 / NUM_SMS / CLOCK_HZ * 1e6
    overlap = persistent or ctas >= 2  # the epilogue's issue runs beside loads and MMAs (another CTA's, or its own)
    est_us = (max(mma_us, issue_us + epilogue_us, memory_us) if overlap
              else max(mma_us, issue_us, memory_us) + epilogue_us) / tail
    peak = NUM_SMS * FMA_PER_CLK_SM[spec["dtype"]] * CLOCK_HZ
    roof_us = max(la.useful_fma / peak * 1e6, la.bytes / HBM_BYTES_PER_S * 1e6)
    return {"layer": la.layer, "count": la.count, "role": la.role, "kernel": la.kernel, "variant": la.variant,
            "config": la.config, "aligned": la.aligned, "registers": spec["registers"], "shared": spec["shared"],
            "spills": spec["spills"] + spec["local_bytes"], "instr_per_step": spec["instr_per_step"],
            "mma_cycles": spec["mma_cycles"], "issue_ratio": spec["issue_ratio"],
            "tiles_in_flight": spec["tiles_in_flight"], "loads": spec["loads"], "tiles": la.tiles,
            "steps": round(la.steps, 2), "ctas_per_sm": ctas, "waves": round(waves, 3),
            "tail_efficiency": round(tail, 3), "mma_us": round(mma_us, 2), "issue_us": round(issue_us, 2),
            "memory_us": round(memory_us, 2), "epilogue_instr": spec["epilogue_instr"],
            "epilogue_us": round(epilogue_us, 2), "epilogue_overlap": overlap, "est_us": round(est_us, 2),
            "est_fraction_of_roofline": round(roof_us / est_us, 3), "alt": la.alt,
            "loop_transforms": any(la.cx.get(k) for k in _TRANSFORMS), "loop_vectors": loop_vectors(la),
            **({"split_ctas": la.split_ctas} if la.split_ctas else {})}


# the operand transforms in a K-loop (dgrad's EPI and wgrad's SUMS act after it, or on its result)
_TRANSFORMS = ("DY_BN", "DY_RELU", "PROLOGUE", "IN_RELU")


def loop_vectors(la: Launch) -> int:
    """Per-channel fp32 vectors the K-loop reads each step, indexed by the reduction channel: dgrad's ``dy_bn``
    coefficients (c1, c2, c3, mean) and the forward prologue's scale and shift. wgrad's index the tile's own
    channels and load once before the loop."""
    if la.kernel == "dgrad":
        return 4 if la.cx.get("DY_BN") else 0
    return 2 if la.kernel == "fwd" and la.cx.get("PROLOGUE") else 0


def transform_free(la: Launch) -> Launch | None:
    """``la`` with its K-loop's operand transforms switched off (same config, path and grid), or None when it
    runs none: the loop it would be without them, to tell what the transforms cost."""
    if not any(la.cx.get(k) for k in _TRANSFORMS):
        return None
    return dataclasses.replace(la, cx={k: (False if k in _TRANSFORMS else v) for k, v in la.cx.items()})


def run(kernels=("fwd", "dgrad", "wgrad"), workers: int = 2, with_transform_free: bool = False) -> list:
    """Every record (see :func:`model`), compiling each distinct spec once. ``with_transform_free``: each record
    whose K-loop transforms an operand also gets ``transform_free_ratio``, the issue ratio of
    :func:`transform_free`'s spec (compiled too)."""
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
        raise RuntimeError("cost_report: unset TRITON_INTERPRET (the interpreter does not compile kernels)")
    las = launches(kernels)
    twins = {id(la): transform_free(la) for la in las} if with_transform_free else {}
    specs = _analyse(las + [t for t in twins.values() if t is not None], workers)
    records = [model(la, specs[la.spec_key()]) for la in las]
    for la, r in zip(las, records):
        if twins.get(id(la)) is not None:
            r["transform_free_ratio"] = specs[twins[id(la)].spec_key()]["issue_ratio"]
    shape_of = {name: cs for name, cs, _ in _layers()}
    for r in records:
        cs = shape_of[r["layer"]]
        r["shape"], r["shape_k"], r["shape_c"] = cs.name, cs.k, min(cs.cin, cs.cout)
    return records


def _analyse(las: list, workers: int, fn=None) -> dict:
    """{spec key: ``fn`` (:func:`analyse_spec`) row} of the launches' distinct specs, compiled in a pool."""
    jobs = {}
    for la in las:
        jobs.setdefault(la.spec_key(), (la.spec_key(), la.module, la.fn_name, la.sig, la.cx, la.opts, la.div16))
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        return {job[0]: r for job, r in zip(jobs.values(), pool.map(fn or analyse_spec, list(jobs.values())))}


def _analyse_any(job: tuple) -> dict | None:
    """:func:`analyse_spec`, or None for a candidate whose K-loop is not a HGMMA loop (e.g. one step, unrolled)."""
    try:
        return analyse_spec(job)
    except SassFormatError:
        return None


def best_candidates(ids: set, workers: int = 2) -> dict:
    """{record id: {"config", "issue_ratio", "candidates"}}: of every config the launcher may pick for the
    launch (its compile-checked candidates, the default among them), the one with the lowest issue ratio,
    compiled as the launch would run it. Shows whether any Triton tile reaches a missed target."""
    def rid(la):
        return record_id({"layer": la.layer, "role": la.role, "kernel": la.kernel, "variant": la.variant})

    sizes = []

    def count(name, kernel, role, variant, cands, default):
        sizes.append(len(cands))
        return default

    launches(choose=count)
    las = []
    for i in range(max(sizes)):
        def nth(name, kernel, role, variant, cands, default, i=i):  # the i-th candidate, or no launch
            return cands[i] if i < len(cands) else None
        las += [la for la in launches(choose=nth) if rid(la) in ids]
    specs = _analyse(las, workers, _analyse_any)
    best = {}
    for la in las:
        if specs[la.spec_key()] is None:
            continue
        ratio = specs[la.spec_key()]["issue_ratio"]
        b = best.setdefault(rid(la), {"config": la.config, "issue_ratio": ratio, "candidates": 0})
        b["candidates"] += 1
        if ratio < b["issue_ratio"]:
            b.update(config=la.config, issue_ratio=ratio)
    return best


# ------------------------------------------------------------------------------------------ targets, baseline
def _lost_ms(records: list, alt: bool = True) -> float:
    return sum(max(0.0, issue_lost_us(r)) * r["count"] for r in records if alt or not r.get("alt")) / 1e3


def stem_backward_ratio(records: list) -> float:
    stem = [r for r in records if r["layer"] == "stem" and r["role"] == "train"]
    fwd = sum(r["est_us"] for r in stem if r["kernel"] == "fwd")
    bwd = sum(r["est_us"] for r in stem if r["kernel"] != "fwd")
    return bwd / fwd


def summary(records: list) -> str:
    """The targets' state: records missing each target, the stem's backward/forward ratio, the estimated conv
    time of a training step, and the specs losing the most time against the roofline."""
    miss = target_problems(records)
    lines = [f"{len(records)} records, {len(miss)} miss a target:"]
    for what in ("issue_ratio", "tiles_in_flight", "spills", "scalar loads"):
        bad = [r for r, m in miss if any(what in x for x in m)]
        lines.append(f"  {what}: {len(bad)} records")
    issue_miss = [r for r, m in miss if any("issue_ratio" in x for x in m)]
    hidden = [r for r in issue_miss if issue_lost_us(r) <= 0]
    lines.append(f"  of the issue-ratio misses, {len(hidden)} are memory- or MMA-bound (est issue time <= max(memory, "
                 "MMA) time): the ratio costs them no time in the model")
    for role in ("train", "infer"):
        lost = [r for r in records if r["role"] == role]
        best = {}  # per base record: it, or its triton_dy_pass alternative where that is faster (the chooser's)
        for r in lost:
            k = record_id(r).split("+")[0]
            if k not in best or r["est_us"] < best[k]["est_us"]:
                best[k] = r
        lines.append(f"  {role}: issue-bound time beyond max(memory, MMA), est {_lost_ms(lost, alt=False):.2f} ms "
                     f"per step ({_lost_ms(list(best.values())):.2f} ms taking each alternative where it is faster)")
    over = [r for r in issue_miss if "transform_free_ratio" in r]
    if over:  # --transform-free: how many are over only because their loop transforms an operand
        only = [r for r in over if r["transform_free_ratio"] <= issue_target(r)]
        lines.append(f"  of the issue-ratio misses, {len(over)} transform an operand in the loop; without the "
                     f"transform {len(only)} would meet the target")
    if any(r["layer"] == "stem" and r["role"] == "train" and r["kernel"] == "fwd" for r in records):
        lines.append(f"stem training backward / forward (est) = {stem_backward_ratio(records):.2f} (target <= 2)")
    for role in ("train", "infer"):
        tot = {k: sum(r["est_us"] * r["count"] for r in records if r["role"] == role and r["kernel"] == k
                      and not r.get("alt")) for k in ("fwd", "dgrad", "wgrad")}
        lines.append(f"{role}: est conv time per step " + ", ".join(f"{k} {v / 1e3:.2f} ms" for k, v in tot.items()))
    base = {record_id(r): r for r in records if not r.get("alt")}
    for kind, role in (("dy_pass", "train"), ("persistent", "train"), ("persistent", "infer")):
        # each alternative against the record it replaces: always taken, and where faster (what the chooser keeps)
        gain = [(base[record_id(r).split("+")[0]]["est_us"] - r["est_us"]) * r["count"] for r in records
                if r.get("alt") and r["role"] == role and r["variant"].endswith("+" + kind)
                and record_id(r).split("+")[0] in base]
        if gain:
            lines.append(f"{role} with {'triton_dy_pass (its pass included)' if kind == 'dy_pass' else kind} where "
                         f"offered (est): {-sum(gain) / 1e3:+.2f} ms per step always, "
                         f"{-sum(g for g in gain if g > 0) / 1e3:+.2f} ms where faster, over {len(gain)} records")
    lost = sorted(records, key=lambda r: -(1 - r["est_fraction_of_roofline"]) * r["est_us"] * r["count"])
    lines.append("most time lost against the roofline (est_us × count × (1 - fraction)):")
    for r in lost[:12]:
        lines.append(f"  {record_id(r)} {r['config']} x{r['count']}: est {r['est_us']:.0f} us, roofline fraction "
                     f"{r['est_fraction_of_roofline']}, issue {r['issue_ratio']}, tiles {r['tiles_in_flight']}")
    return "\n".join(lines)


def compare(records: list, baseline: list) -> list:
    """Regressions of ``records`` against ``baseline`` (both lists of records), as messages."""
    base = {record_id(r): r for r in baseline}
    now = {record_id(r): r for r in records}
    out = [f"{k}: new record (not in the baseline)" for k in now if k not in base]
    out += [f"{k}: record disappeared" for k in base if k not in now]
    for k in now.keys() & base.keys():
        r, b = now[k], base[k]
        if r["config"] != b["config"]:
            out.append(f"{k}: config {b['config']} -> {r['config']}")
        if r["issue_ratio"] > b["issue_ratio"] * ISSUE_TOLERANCE:
            out.append(f"{k}: issue_ratio {b['issue_ratio']} -> {r['issue_ratio']} (> +5 %)")
        if r["spills"] > b["spills"]:
            out.append(f"{k}: spills {b['spills']} -> {r['spills']}")
        if r["tiles_in_flight"] < b["tiles_in_flight"]:
            out.append(f"{k}: tiles_in_flight {b['tiles_in_flight']} -> {r['tiles_in_flight']}")
        if "transform_free_ratio" in r and "transform_free_ratio" in b:  # a miss's documented reason must hold
            now_why, base_why = [w for *_, w in reasons(r)], [w for *_, w in reasons(b)]
            if now_why != base_why:
                out.append(f"{k}: miss reasons {base_why} -> {now_why}")
    return sorted(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=("fwd", "dgrad", "wgrad"), help="one kernel")
    ap.add_argument("--json", help="write the records to this file")
    ap.add_argument("--check-baseline", nargs="?", const=BASELINE, help="compare with a baseline (default: the "
                    "committed one); exit 1 on a regression")
    ap.add_argument("--write-baseline", nargs="?", const=BASELINE, help="write the records as the new baseline")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--transform-free", action="store_true", help="also compile each spec whose loop transforms "
                    "an operand without the transform (record field transform_free_ratio); implied by "
                    "--write-baseline and --misses")
    ap.add_argument("--misses", help="write the Markdown of every miss and its reason (cost_targets.render) here")
    ap.add_argument("--candidates", action="store_true", help="also compile every candidate config of each record "
                    "that misses its issue-ratio target (record field best_candidate, best_candidates); implied by "
                    "--write-baseline and --misses")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default at launch, without its warning
    t0 = time.time()
    free = args.transform_free or bool(args.write_baseline or args.misses)
    records = run((args.only,) if args.only else ("fwd", "dgrad", "wgrad"), args.workers, free)
    if args.candidates or args.write_baseline or args.misses:
        missed = {record_id(r) for r in records if r["issue_ratio"] > issue_target(r)}
        best = best_candidates(missed, args.workers)
        for r in records:
            if record_id(r) in best:
                r["best_candidate"] = best[record_id(r)]
    print(f"{'layer':<22}{'n':>2} {'role':<5} {'kernel':<5} {'variant':<22} {'config':<24} {'regs':>4} "
          f"{'ipw':>4} {'mma':>5} {'issue':>6} {'tif':>4} {'ld128/nar/tma/ldg':>17} {'spl':>3} {'waves':>6} "
          f"{'est_us':>8} {'roof':>5}" + (" free" if free else ""))
    for r in records:
        ld = r["loads"]
        print(f"{r['layer']:<22}{r['count']:>2} {r['role']:<5} {r['kernel']:<5} {r['variant']:<22} "
              f"{r['config']:<24} {r['registers']:>4} {r['instr_per_step']:>4} {r['mma_cycles']:>5.0f} "
              f"{r['issue_ratio']:>6.2f} {r['tiles_in_flight']:>4} "
              f"{ld['ldgsts128']:>5}/{ld['ldgsts_narrow']}/{ld['utmaldg']}/{ld['ldg_scalar'] + ld['ldg_vector']:<4} "
              f"{r['spills']:>3} {r['waves']:>6.2f} {r['est_us']:>8.1f} {r['est_fraction_of_roofline']:>5.2f}"
              + (f" {r['transform_free_ratio']:.2f}" if "transform_free_ratio" in r else ""))
    print("\n" + summary(records))
    print(f"{time.time() - t0:.0f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    rc = 0
    if args.check_baseline:
        with open(args.check_baseline) as f:
            problems = compare(records, json.load(f)["records"])
        print("\n".join(problems) or "baseline: no regression")
        rc = 1 if problems else 0
    if args.misses:
        with open(args.misses, "w") as f:
            f.write(render(records))
    if args.write_baseline:  # what compare() and cost_targets.render() read back
        keep = ("layer", "count", "role", "kernel", "variant", "config", "registers", "issue_ratio",
                "tiles_in_flight", "spills", "instr_per_step", "est_fraction_of_roofline", "est_us", "alt",
                "transform_free_ratio", "loads", "loop_transforms", "loop_vectors", "shape_k", "shape_c", "mma_us",
                "issue_us", "memory_us", "tail_efficiency", "best_candidate")
        import triton
        with open(args.write_baseline, "w") as f:
            head = json.dumps({"triton": triton.__version__, "model": MODEL, "batch": BATCH, "dtype": "bf16"})
            rows = ",\n".join(json.dumps({k: r[k] for k in keep if k in r}) for r in records)
            f.write(f'{head[:-1]}, "records": [\n{rows}\n]}}\n')  # a record per line: diffs show what moved
    return rc


if __name__ == "__main__":
    sys.exit(main())
