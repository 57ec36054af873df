"""The GPU session script without a GPU: its dry run's plan, time limits and files; the pieces it relies on
(compile counter, report merging, per-conv implementation rows, the smoke's failure detection)."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resnet_fast.bench import compiles, merge, report, runner, smoke

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RESNET_FAST", "TRITON_INTERPRET", "GPU_CHECK"))}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU forms even on a GPU machine
    env.update(extra)
    return env


def test_dry_run_plans_one_540s_call_and_returns_few_files(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=_env(GPU_CHECK_DRY_RUN="1", OUT=str(out)),
                          capture_output=True, text=True, timeout=240)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    # The plan: every default step with its limit, and a total within the one-call budget.
    plan = dict(re.findall(r"^  (\w+)\s+(\d+)s$", text, re.M))
    assert set(plan) >= {"versions", "install", "precompile", "smoke", "model", "blocks_convs", "tuning", "summary"}
    total = int(re.search(r"^  total\s+(\d+)s of (\d+)s$", text, re.M).group(1))
    assert total == sum(int(v) for v in plan.values()) and total <= 540
    # Every step ran (or said what it would run) and got a time limit.
    for name in ("versions", "smoke", "benchmark_demo"):
        assert re.search(rf"^### {name} \(timeout \d+s\)", text, re.M), name
        assert re.search(rf"^### {name}: rc=0 after \d+s", text, re.M), name
    for name in ("install", "precompile"):
        assert f"### {name} (dry run, not executed)" in text
    # What comes back: at most 8 files, at most 2 folders deep, plain names.
    files = [p.relative_to(out) for p in out.rglob("*") if p.is_file()]
    assert 0 < len(files) <= 8, files
    assert all(len(f.parts) <= 3 and all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in f.parts)
               for f in files), files
    assert {"gpu_check.log", "summary.txt"} <= {f.name for f in files}
    # The smoke ran its checks in the interpreter and they passed.
    doc = json.loads((out / "results" / "smoke.json").read_text())
    assert doc["device"] == "cpu" and doc["interpreter"] == "1"
    assert doc["summary"]["checks"] > 50 and doc["summary"]["failed"] == 0
    assert {r["group"] for r in doc["rows"]} == {"conv", "tail", "model"}
    assert "train_dy_pass" in {r["role"] for r in doc["rows"]}  # the backward's third implementation too
    assert doc["compile"]["count"] == 0  # the interpreter compiles nothing
    # The CPU demo stands in for the benchmark: numerics, no speedups anywhere.
    demo = json.loads(next((out / "results").glob("*cpu-demo.json")).read_text())
    assert demo["gpu_timings"] is False and not any("speedup" in r for r in demo["results"])
    md = next((out / "results").glob("*cpu-demo.md")).read_text()
    assert "speedup" not in md and "rel err" in md
    summary = (out / "summary.txt").read_text()
    assert "smoke:" in summary and "files in" in summary


def test_a_plan_over_budget_is_refused_before_running_anything(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=_env(GPU_CHECK_DRY_RUN="1", OUT=str(out), GPU_CHECK_BUDGET_S="300"))
    assert proc.returncode == 2
    assert "plan does not fit" in proc.stdout and "### " not in proc.stdout


# ---- compile counter, merge, implementation rows ---------------------------------------------------------

class _Times:
    def __init__(self, us):
        self.total = us


def test_compile_counter_counts_compiles_and_cache_hits_and_chains():
    seen = []
    c = compiles.CompileCounter()
    c._prev = lambda **kw: seen.append(kw["cache_hit"])
    c(src=None, metadata={"name": "_conv_fwd_kernel"}, metadata_group={}, times=_Times(1_500_000), cache_hit=False)
    c(src=None, metadata={"name": "_conv_fwd_kernel"}, metadata_group={}, times=_Times(2_000_000), cache_hit=False)
    c(src=None, metadata={"name": "_conv_dgrad_kernel"}, metadata_group={}, times=_Times(10), cache_hit=True)
    s = c.summary()
    assert (s["count"], s["seconds"], s["cache_hits"]) == (2, 3.5, 1)
    assert s["by_kernel"] == {"_conv_fwd_kernel": 2}
    assert seen == [False, False, True]


def test_compile_listener_exists_in_this_triton():
    """The knob the counter hooks (Triton 3.6 and 3.9 both have it, with the same keyword arguments)."""
    from triton import knobs
    prev = knobs.compilation.listener
    c = compiles.CompileCounter().install()
    try:
        assert c.installed and knobs.compilation.listener is c
    finally:
        knobs.compilation.listener = prev
    assert hasattr(knobs.runtime, "jit_cache_hook")  # what precompile's recording uses


def _doc(rows, **extra):
    return {"device": "NVIDIA H200", "date": "2026-12-01", "commit": "abc", "torch": "2.11", "triton": "3.6",
            "cuda": "13.0", "peaks": {"copy_GBps": 4000.0, "bf16_TFLOPs": 780.0}, "results": rows, **extra}


def _row(suite, impl, ms=1.0):
    return {"suite": suite, "model": "resnet50", "name": "n", "mode": "train", "dtype": "bf16", "batch": 256,
            "impl": impl, "ms": ms, "tflops": None, "gbps": None, "peak_mem_MB": None}


def test_merge_combines_two_reports_into_one(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    report.write_all(_doc([_row("model", "eager")], compile={"count": 3, "seconds": 2.0, "counted": True}), a,
                     "2026-12-01-nvidia-h200")
    report.write_all(_doc([_row("block", "resnet_fast_cudnn"), _row("conv", "eager")],
                          compile={"count": 4, "seconds": 1.5, "counted": True},
                          autotune={"impl:conv2d|64|64": {"winner": "cudnn", "ms": {"triton": 0.3, "cudnn": 0.2},
                                                          "failed": {}}}), b, "2026-12-01-nvidia-h200")
    doc = merge.merge_dirs(a, b)
    assert [r["suite"] for r in doc["results"]] == ["model", "block", "conv"]
    assert doc["compile"]["count"] == 7 and doc["compile"]["seconds"] == 3.5
    assert sorted(p.name for p in a.iterdir()) == ["2026-12-01-nvidia-h200.json", "2026-12-01-nvidia-h200.md",
                                                   "2026-12-01-nvidia-h200.png"]
    md = (a / "2026-12-01-nvidia-h200.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("| conv2d/64/64"))
    assert line.split(" | ")[1:4] == ["0.3000", "0.2000", "cudnn"]
    assert "Triton compiles: 7" in md


def test_autotune_table_tolerates_missing_fields():
    lines = report.autotune_lines({"impl:conv2d|1": {"winner": "triton"}, "conv_fwd|2": {"ms": {"a": 0.1}},
                                   "impl:conv_bn_stats|3": "not a record"})
    assert any(x.startswith("| conv2d/1 |  |  | triton") for x in lines)
    assert any(x.startswith("| conv_fwd/2 |  | 0.1000") for x in lines)


@pytest.mark.parametrize("impl, value", [("resnet_fast_triton", "triton"), ("resnet_fast_cudnn", "cudnn"),
                                         ("resnet_fast", None), ("eager", None)])
def test_conv_impl_rows_set_the_variable_for_the_row_only(monkeypatch, impl, value):
    monkeypatch.delenv("RESNET_FAST_CONV_IMPL", raising=False)
    case = runner.Case("block", "resnet50", "b", "train", "bf16", 2)
    seen = {}

    def build():
        seen["build"] = os.environ.get("RESNET_FAST_CONV_IMPL")

        def measure():
            seen["measure"] = os.environ.get("RESNET_FAST_CONV_IMPL")
            return {"ms": 1.0}
        return measure
    row = runner.run_row(case, impl, build, peaks=None)
    assert row["status"] == "ok" and seen == {"build": value, "measure": value}
    assert "RESNET_FAST_CONV_IMPL" not in os.environ
    report.validate(_doc([row]))


# ---- the smoke's checks can fail ------------------------------------------------------------------------

def test_rel_err_treats_nan_and_shape_mismatch_as_infinite():
    ref = torch.randn(4, 5, dtype=torch.float64)
    assert smoke.rel_err(ref.float(), ref) < 1e-6
    bad = ref.clone()
    bad[1, 2] = float("nan")
    assert smoke.rel_err(bad, ref) == math.inf
    assert smoke.rel_err(ref[:2], ref) == math.inf


def test_smoke_check_reports_a_wrong_result_an_error_and_a_fallback():
    s = smoke.Smoke(torch.device("cpu"), budget_s=60, log=lambda *a: None)
    x = torch.randn(16, dtype=torch.float64)
    s.check("conv", "c", "infer", "k", "fp32", lambda: {"y": (x * 1.01, x)}, {"y": 1e-4})
    s.check("conv", "c", "infer", "k", "fp32", lambda: {"y": (x, x)}, {"y": 1e-4})
    s.check("conv", "c", "infer", "k", "fp32", lambda: 1 / 0, {"y": 1e-4})

    def falls_back():
        import resnet_fast._backend as b
        b.record_fallback("conv2d", "a test fallback")
        return {"y": (x, x)}
    s.check("conv", "c", "conv2d_bwd", "k", "fp32", falls_back, {"y": 1e-4}, expect_ops=("conv2d",))
    assert [r["ok"] for r in s.rows] == [False, True, False, False]
    assert s.rows[0]["status"] == "MISMATCH" and s.rows[0]["err"] == pytest.approx(0.01)
    assert s.rows[2]["status"].startswith("error: ZeroDivisionError")
    assert s.rows[3]["status"].startswith("fell back: conv2d: a test fallback")


def test_smoke_pins_each_persistent_twin_on_a_pointwise_conv(triton_backend):
    """The smoke runs the persistent forward (a tuning twin, which its untuned run would never pick) pinned on
    pointwise convs, inference and training; here in the interpreter on a small 1×1 conv: 2 × 2 tiles of 128×128
    over its 3 programs."""
    from resnet_fast.bench.shapes import ConvShape
    from resnet_fast.kernels import configs
    if not configs.persistent_allowed():
        pytest.skip("this Triton does not flatten loop nests")
    s = smoke.Smoke(torch.device("cpu"), budget_s=600, log=print)
    with smoke.smoke_env():
        smoke.conv_checks(s, ConvShape(cin=64, cout=256, k=1, stride=1, padding=0, groups=1, h=12, w=12), "fp16", 1,
                          twins=True)
    assert {r["role"] for r in s.rows} == {"infer[m128n128k64g8w8s3-tma-ps]", "train[m128n128k64g8w8s3-tma-ps]"}
    assert s.rows and all(r["ok"] for r in s.rows), [r for r in s.rows if not r["ok"]]


# ---- precompile: a kernel compiled by preload in one process is a disk-cache hit on another's launch path --

_PROOF = r'''
import json, os, sys
stage, cache, recs = sys.argv[1], sys.argv[2], sys.argv[3]
cfg_idx = int(sys.argv[4]) if len(sys.argv) > 4 else 0
os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITON_CACHE_DIR"] = cache
import torch
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

class FakeDriver:  # enough of a CUDA driver for the JIT's key computation and compile (no launch)
    def get_current_target(self): return GPUTarget("cuda", 90, 32)
    def get_current_device(self): return 0
    def get_current_stream(self, device=None): return 0
    def get_active_torch_device(self): return torch.device("cpu")
driver.set_active(FakeDriver())

from resnet_fast.bench import compiles
from resnet_fast.kernels import conv_fwd, configs
from resnet_fast.kernels.conv_common import ConvGeometry

def launch():
    x = torch.randn(2, 64, 8, 8, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 3, 3, dtype=torch.float16)
    g = ConvGeometry.make(x.shape, w.shape, 1, 1, 1, 1, "proof")
    cfg = configs.fwd_configs(torch.float16)[cfg_idx]
    conv_fwd.conv2d_nhwc(x, conv_fwd.pack_weight(w, 1, torch.float16), g, scale=torch.ones(64),
                         shift=torch.zeros(64), relu=True, config=cfg)

if stage == "record":
    records = {}
    with compiles.recording(records):
        launch()
    print("recorded", compiles.save_records(records, recs))
elif stage == "preload":
    c = compiles.CompileCounter().install()
    out = compiles.preload(compiles.load_records(recs), workers=1)
    print("preload", out, c.summary())
else:
    c = compiles.CompileCounter().install()
    try:
        launch()
    except Exception as exc:
        print("launch failed after compile (expected, no GPU):", type(exc).__name__)
    print("launch", json.dumps(c.summary()))
'''


def test_preloaded_kernel_is_a_cache_hit_on_the_launch_path_of_another_process(tmp_path):
    """Without a GPU: a stand-in driver reports an sm_90 target so Triton's JIT computes its keys and compiles (with
    its bundled ptxas) as on the GPU machine; launching then fails (no CUDA), after the compile that is counted.
    Process 1 records the launch (nothing compiles), process 2 preloads the record (one compile), process 3's
    real launch path finds it on disk (a cache hit, no compile); a config that was not preloaded compiles."""
    script = tmp_path / "proof.py"
    script.write_text(_PROOF)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RESNET_FAST", "TRITON_INTERPRET"))}
    env["CUDA_VISIBLE_DEVICES"] = ""
    cache, recs = str(tmp_path / "cache"), str(tmp_path / "recs.json")

    def stage(*args):
        proc = subprocess.run([sys.executable, str(script), *args[:1], cache, recs, *args[1:]], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc.stdout
    assert "recorded 1" in stage("record")
    assert "'count': 1" in stage("preload")
    hit = json.loads(stage("launch").split("launch ", 2)[-1].strip().splitlines()[-1])
    assert (hit["count"], hit["cache_hits"]) == (0, 1)
    miss = json.loads(stage("launch", "3").split("launch ", 2)[-1].strip().splitlines()[-1])
    assert (miss["count"], miss["cache_hits"]) == (1, 0)


def test_sigterm_from_the_step_timeout_stops_a_row_instead_of_becoming_its_error():
    """gpu_check.sh's `timeout` sends SIGTERM first: it must end the run (so it writes what it has), not be
    swallowed as one more row's error."""
    import signal
    prev = signal.getsignal(signal.SIGTERM)
    try:
        runner.stop_on_sigterm()
        case = runner.Case("model", "resnet50", "m", "train", "bf16", 256)

        def build():
            os.kill(os.getpid(), signal.SIGTERM)
            return lambda: {"ms": 1.0}
        with pytest.raises(runner.TimeBoxExpired):
            runner.run_row(case, "resnet_fast", build, peaks=None)
    finally:
        signal.signal(signal.SIGTERM, prev)


def test_compile_count_records_every_tuning_candidate_without_running_kernels(triton_backend):
    """precompile --count's machinery on the conv suite's roles at batch 1: each tuned launch offers its
    candidates, every candidate is one recorded (kernel, constexprs, warps, stages), nothing runs."""
    from resnet_fast.bench import precompile
    seen, tuned = {}, {}
    with precompile.counting(seen, tuned):
        precompile.exercise(torch.device("cpu"), torch.float16, 1, 1, log=pytest.fail, parts=("convs",))
    kernels = {name for name, _ in seen}
    assert {"_conv_fwd_kernel", "_conv_dgrad_kernel", "_conv_wgrad_kernel"} <= kernels
    assert len(tuned) > 23 and sum(tuned.values()) >= len(tuned)
    fwd = [dict(cfg) for name, cfg in seen if name == "_conv_fwd_kernel"]
    assert any(c.get("TMA") for c in fwd) and any(not c.get("TMA") for c in fwd)  # the TMA twins are offered
    assert len({(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]) for c in fwd}) > 3
