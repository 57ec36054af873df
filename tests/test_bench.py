"""The benchmark tool on CPU: shape derivation, timing statistics, schema check, suites plumbing, CPU demo."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from resnet_fast.bench import reference, report, runner, shapes, timing
from resnet_fast.bench.suites import Config, count_jobs, run_suites
from resnet_fast.kernels import tuning_table
from resnet_fast.kernels.conv_common import ConvGeometry

ROOT = Path(__file__).resolve().parents[1]


# ---- shapes ---------------------------------------------------------------------------------------------

def test_resnet50_distinct_convs():
    convs = shapes.convs("resnet50")
    assert len(convs) == 23  # stem + 4 distinct in layer1 + 6 in each later stage
    assert sum(convs.values()) == 53
    known = {(c.cin, c.cout, c.k, c.stride, c.h): n for c, n in convs.items()}
    assert known[(64, 64, 3, 1, 56)] == 3  # (64,64,3,3,s1,56x56): once per layer1 block
    assert known[(3, 64, 7, 2, 224)] == 1
    assert known[(64, 256, 1, 1, 56)] == 4  # 3 conv3 + the downsample, same shape
    assert known[(128, 128, 3, 2, 56)] == 1  # v1.5: stride on the 3x3 conv
    assert known[(1024, 2048, 1, 2, 14)] == 1
    assert (512, 512, 3, 1, 7) in known


def test_distinct_blocks_and_tails():
    assert len(shapes.blocks("resnet18")) == 7  # layer1's two blocks coincide
    assert len(shapes.blocks("resnet50")) == 8
    rx = shapes.blocks("resnext50_32x4d")
    assert [b.width for b in rx][:2] == [128, 128] and all(b.groups == 32 for b in rx)
    tails = shapes.tails("resnet50")
    assert {(t.c, t.h) for t in tails} == {(256, 56), (512, 28), (1024, 14), (2048, 7)}
    assert sum(tails.values()) == 16


@pytest.mark.parametrize("model, gmacs", [("resnet18", 1.81), ("resnet50", 4.09), ("resnext50_32x4d", 4.23)])
def test_model_flops_match_published(model, gmacs):
    # torchvision's model cards list these GFLOPS (multiply-adds) at 224x224.
    assert shapes.model_flops(model, 1) / 2e9 == pytest.approx(gmacs, abs=0.01)


@pytest.mark.parametrize("model", list(shapes.ARCHS))
def test_shapes_match_the_reference_network(model):
    """Every conv the reference network runs at 224x224 is exactly what shapes.all_convs derives."""
    seen = []

    def hook(mod, inp, out):
        x = inp[0]
        seen.append(shapes.ConvShape(mod.in_channels, mod.out_channels, mod.kernel_size[0], mod.stride[0],
                                     mod.padding[0], mod.groups, x.shape[2], x.shape[3]))
    net = reference.model(model).eval()
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(hook)
    with torch.no_grad():
        net(torch.randn(1, 3, 224, 224))
    assert sorted(seen, key=repr) == sorted(shapes.all_convs(model), key=repr)


def test_reference_model_has_torchvision_structure():
    ref = reference.model("resnet50")
    keys = list(ref.state_dict())
    assert len(keys) == 320 and keys[:2] == ["conv1.weight", "bn1.weight"]
    assert "layer2.0.downsample.1.running_var" in keys
    assert sum(p.numel() for p in ref.parameters()) == 25557032  # torchvision resnet50


# ---- timing ---------------------------------------------------------------------------------------------

class ScriptedTimer:
    """Returns pre-set per-repeat times; counts the calls it makes."""

    def __init__(self, samples):
        self.samples, self.calls = samples, 0

    def run(self, fn, setup, repeats):
        for i in range(repeats):
            fn(i) if setup is None else fn(i, setup(i))
            self.calls += 1
        return self.samples[:repeats]

    def sync(self):
        pass


def test_summary_statistics():
    t = timing.summarize([7.0, 1.0, 3.0, 10.0, 2.0, 9.0, 4.0, 8.0, 5.0, 6.0], warmup_s=1.5)
    assert (t.median, t.p20, t.p80, t.min, t.n, t.warmup_s) == (5.5, pytest.approx(2.8), pytest.approx(8.2),
                                                                1.0, 10, 1.5)
    assert timing.quantile([4.0], 0.2) == 4.0
    with pytest.raises(ValueError):
        timing.quantile([], 0.5)


def test_measure_warms_up_then_uses_the_timer():
    calls = []
    timer = ScriptedTimer([3.0, 1.0, 2.0])
    t = timing.measure(lambda i: calls.append(i), warmup=2, repeats=3, timer=timer)
    assert calls == [0, 1, 0, 1, 2]  # 2 warm-up calls, then the 3 timed ones with their rotation index
    assert t.median == 2.0 and t.n == 3 and t.warmup_s >= 0


def test_measure_passes_setup_state():
    got = []
    timer = ScriptedTimer([1.0] * 5)
    timing.measure(lambda i, s: got.append(s), setup=lambda i: i * 10, warmup=1, repeats=5, timer=timer)
    assert got == [0, 0, 10, 20, 30, 40]


# ---- schema ---------------------------------------------------------------------------------------------

def _doc():
    row = {"suite": "block", "model": "resnet50", "name": "b", "mode": "train", "dtype": "bf16", "batch": 256,
           "impl": "eager", "ms": 1.25, "tflops": 100.0, "gbps": None, "peak_mem_MB": 12.0}
    return {"device": "NVIDIA H100", "date": "2025-01-01", "commit": "abc", "torch": "2.11", "triton": "3.6",
            "cuda": "13.0", "peaks": {"copy_GBps": 3000.0, "bf16_TFLOPs": 700.0}, "results": [row]}


def test_validator_accepts_a_good_document():
    assert report.validate(_doc())


@pytest.mark.parametrize("breakage", [
    lambda d: d.pop("commit"),
    lambda d: d["peaks"].pop("copy_GBps"),
    lambda d: d["results"][0].pop("ms"),
    lambda d: d["results"][0].update(impl="cudnn"),
    lambda d: d["results"][0].update(ms="1.2"),
    lambda d: d["results"][0].update(ms=None),  # status ok without a time
    lambda d: d["results"][0].update(ms=float("nan")),
    lambda d: d["results"][0].update(batch=0),
    lambda d: d["results"][0].update(suite="layer"),
    lambda d: d.update(results={}),
])
def test_validator_rejects_a_malformed_document(breakage):
    doc = _doc()
    breakage(doc)
    with pytest.raises(ValueError, match="invalid results document|must be"):
        report.validate(doc)


def test_unavailable_row_is_valid_and_shown():
    doc = _doc()
    doc["results"][0].update(ms=None, tflops=None, status="unavailable: resnet_fast.ops.conv2d does not exist yet")
    report.validate(doc)
    assert "unavailable: resnet_fast.ops.conv2d" in report.format_table(doc["results"])
    assert "unavailable" in report.to_markdown(doc)


def test_markdown_shows_what_the_autotuner_measured():
    """The report's autotune table: winner, best pointer-path vs best TMA-twin time per key, failures."""
    doc = _doc()
    g = ConvGeometry.make((256, 256, 56, 56), (64, 256, 1, 1))
    key = tuning_table.tuning_key("conv_fwd", g, torch.bfloat16, torch.device("cpu"), False, True)  # the real layout
    doc["autotune"] = {key: {
        "winner": "m128n128k64g8w8s3-tma",
        "ms": {"m128n128k64g8w8s3": 0.25, "m128n64k64g8w4s4": 0.3, "m128n128k64g8w8s3-tma": 0.2},
        "failed": {"m256n128k64g8w8s3-tma": "OutOfResources: shared memory"}}}
    md = report.to_markdown(doc)
    row = next(line for line in md.splitlines() if line.startswith("| conv_fwd/256/64/1/1/"))
    assert row.split(" | ")[0].endswith("/bfloat16")  # op and geometry up to the dtype
    assert row.split(" | ")[1:] == ["m128n128k64g8w8s3-tma", "0.2500", "0.2000", "m256n128k64g8w8s3-tma |"]
    assert "cpu" not in row and "True" not in row  # device and switches: in the header / not needed
    assert "## autotune" not in report.to_markdown(_doc())  # nothing tuned: no section


# ---- suites plumbing on CPU -----------------------------------------------------------------------------

def test_suites_run_every_row_on_cpu():
    """The GPU suites' plumbing on CPU with tiny shapes: one row per job, eager rows timed, none dropped."""
    cfg = Config(model="resnet50", batch=2, resolution=16, width=8, dtype="bf16", device="cpu", repeats=2,
                 warmup=1, impls=("resnet_fast", "eager", "eager_fp32_nchw"), max_row_s=0.1,
                 suites=("op", "conv", "block"))
    rows = run_suites(cfg, peaks={"copy_GBps": None, "bf16_TFLOPs": None})
    assert len(rows) == count_jobs(cfg)
    # The model suite is full width: the smallest network, eager rows only.
    cfg = Config(model="resnet18", batch=2, resolution=32, dtype="bf16", device="cpu", repeats=2, warmup=1,
                 impls=("eager", "eager_fp32_nchw"), suites=("model",))
    rows += run_suites(cfg, peaks={"copy_GBps": None, "bf16_TFLOPs": None})
    eager = [r for r in rows if r["impl"].startswith("eager")]
    not_ok = [r for r in eager if r["status"] != "ok"]
    assert eager and all(r["status"] == "ok" and r["ms"] > 0 for r in eager), not_ok[:2]
    assert all(r["tflops"] > 0 for r in eager if r["suite"] in ("conv", "block", "model"))
    assert {r["suite"] for r in rows} == {"op", "conv", "block", "model"}
    assert {r["dtype"] for r in eager if r["impl"] == "eager_fp32_nchw"} == {"fp32"}
    ours = [r for r in rows if r["impl"] == "resnet_fast"]
    assert all(r["status"] == "ok" or r["status"].startswith(("unavailable:", "error:")) for r in ours)
    assert all("kernel_calls" in r for r in ours)


def test_exhausted_budget_skips_rows_instead_of_dropping_them():
    case = runner.Case("op", "resnet50", "x", "fwd", "bf16", 1)
    budget = runner.Budget(0.0)
    row = runner.run_row(case, "eager", lambda: (lambda: {"ms": 1.0}), peaks=None, budget=budget, estimate_s=1)
    assert row["status"] == "skipped: time budget" and row["ms"] is None


def test_speedup_is_baseline_over_row():
    rows = [{"suite": "op", "model": "m", "name": "n", "mode": "fwd", "impl": "eager", "ms": 3.0},
            {"suite": "op", "model": "m", "name": "n", "mode": "fwd", "impl": "resnet_fast", "ms": 1.5}]
    runner.add_speedups(rows)
    assert rows[1]["speedup"] == 2.0 and rows[0]["speedup"] == 1.0


# ---- the CPU demo, end to end ---------------------------------------------------------------------------

def test_cpu_demo_end_to_end(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RESNET_FAST", "TRITON_INTERPRET"))}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the demo path even on a GPU machine
    proc = subprocess.run([sys.executable, "-m", "resnet_fast.bench", "--quick", "--demo-budget-s", "12",
                           "--output", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "NOT GPU timings" in proc.stdout
    assert "backend=triton" in proc.stdout  # re-executed into the interpreter backend
    files = sorted(tmp_path.iterdir())
    assert [f.suffix for f in files] == [".json", ".md", ".png"]
    doc = report.validate(json.loads(files[0].read_text()))
    assert doc["gpu_timings"] is False and "NOT GPU timings" in doc["timing_note"]
    assert doc["device"] == "cpu" and doc["backend"] == "triton"
    ours = [r for r in doc["results"] if r["impl"] == "resnet_fast"]
    assert ours and all(r.get("numerics") in ("ok", None) for r in ours)
    checked = [r for r in ours if r.get("numerics") == "ok"]
    assert checked and all(0 <= r["rel_err"] <= r["tol"] <= 2e-4 and r["reference"] == "eager float64"
                           for r in checked)
    assert all(r["kernel_calls"] > 0 and not r["fallbacks"] for r in checked if r["suite"] in ("conv", "block"))
    # What a CPU cannot say is never said: no speedup in the rows, the table, the Markdown or the chart's title.
    assert not any("speedup" in r for r in doc["results"])
    md = files[1].read_text()
    assert "NOT GPU timings" in md and "speedup" not in md and "| rel err | tol | numerics | ran |" in md
    assert "speedup" not in proc.stdout.split("NOT GPU timings")[-1] and "rel err" in proc.stdout
    assert files[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_estimates_from_a_cost_report_beside_the_rows_they_describe(tmp_path):
    """A cost report's per-layer estimates (µs, static) keyed by the full-size conv shape: eval = the inference
    forward, train = forward + dgrad + wgrad of the training roles (no triton_dy_pass alternative); on a CPU demo
    row by its full-size layer, on a GPU conv row only in eval, bf16, batch 256; nothing without a report."""
    from resnet_fast.bench import estimates
    rec = lambda role, kernel, us, layer="layer1.0.conv2", **kw: dict(  # noqa: E731
        layer=layer, role=role, kernel=kernel, est_us=us, **kw)
    records = [rec("infer", "fwd", 10.0), rec("train", "fwd", 11.0), rec("train", "dgrad", 12.0),
               rec("train", "wgrad", 13.0), rec("infer", "dgrad", 50.0),  # the frozen-BN backward: in neither
               rec("train", "wgrad", 7.0, alt=True),  # an alternative the chooser measures: not in the sum
               rec("infer", "fwd", 99.0, layer="layer1.1.conv2"),  # same shape: the first layer's
               rec("infer", "fwd", 1.0, layer="nowhere")]
    path = tmp_path / "cost.json"
    path.write_text(json.dumps({"records": records}))
    est = estimates.load(str(path))
    name = shapes.ConvShape(64, 64, 3, 1, 1, 1, 56, 56).name
    assert est == {name: {"eval": 10.0, "train": 36.0}}
    assert estimates.load(str(tmp_path / "missing.json")) == {} and estimates.load(None) == {}
    row = {"suite": "conv", "name": "c", "mode": "train", "impl": "resnet_fast", "dtype": "fp32", "status": "ok",
           "numerics": "ok", "rel_err": 1e-7, "tol": 1e-4, "kernel_calls": 2, "fallbacks": {}, "full_size": name}
    table = report.format_table(estimates.attach([row], est), cpu_demo=True)
    assert "estimate us" in table and table.splitlines()[-1].rstrip().endswith("36")
    gpu = [{"suite": "conv", "name": name, "mode": m, "impl": impl, "dtype": dt, "batch": b, "ms": 0.05,
            "status": "ok"} for m, impl, dt, b in (("eval", "resnet_fast", "bf16", 256), ("train", "resnet_fast",
                                                   "bf16", 256), ("eval", "resnet_fast", "fp16", 256),
                                                  ("eval", "resnet_fast", "bf16", 64), ("eval", "eager", "bf16", 256))]
    estimates.attach(gpu, est)
    assert [r.get("estimate_us") for r in gpu] == [{"eval": 10.0}, None, None, None, None]
    assert "est us" in report.format_table(gpu) and "| 10 |" in report.to_markdown(
        {"device": "d", "date": "x", "commit": "c", "torch": "t", "triton": "t", "cuda": "c", "results": gpu})
    # the committed baseline carries est_us for every record: the default source
    committed = estimates.load(estimates.default_path())
    assert len(committed) == len(shapes.convs("resnet50", 224)) and all(
        v["eval"] > 0 and v["train"] > v["eval"] / 2 for v in committed.values())
