"""autotune.choose_impl: per conv, the Triton kernels or the cuDNN composite (RESNET_FAST_CONV_IMPL, timing,
caching, the heuristic while capturing/compiling). No GPU: a made-up device identity, injected predicates and
an injected timer; the runners only count their calls."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from resnet_fast.kernels import autotune, tuning_table
from resnet_fast.kernels import configs as cfgs
from resnet_fast.kernels.configs import ConvConfig
from resnet_fast.kernels.tuning_table import DeviceIdentity
from resnet_fast.kernels.conv_common import ConvGeometry

H200 = DeviceIdentity("NVIDIA H200", (9, 0))
CPU = torch.device("cpu")
DT = torch.bfloat16
G = ConvGeometry.make((32, 256, 56, 56), (64, 256, 1, 1))
SWITCHES = (True, False)
ON_GPU = {"identity": H200, "interpreting": lambda: False, "capturing": lambda: False, "compiling": lambda: False}


@pytest.fixture
def tuner(tmp_path, monkeypatch):
    monkeypatch.setenv("RESNET_FAST_CACHE_DIR", str(tmp_path / "cache"))
    for var in ("RESNET_FAST_RETUNE", "RESNET_FAST_AUTOTUNE", "RESNET_FAST_CONV_IMPL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "enabled", True)
    t = autotune.Autotuner(table_dir=str(tmp_path / "tuned"))
    monkeypatch.setattr(autotune, "_TUNER", t)
    return t


class Runners(dict):
    """{"triton": fn, "cudnn": fn} counting calls; ``ms`` is what the fake timer reports for each."""

    def __init__(self, triton_ms=1.0, cudnn_ms=2.0, fail=()):
        self.calls = {"triton": 0, "cudnn": 0}
        self.ms = {"triton": triton_ms, "cudnn": cudnn_ms}
        self.events = []
        for name in ("triton", "cudnn"):
            self[name] = self._runner(name, name in fail)

    def _runner(self, name, fail):
        def run():
            self.calls[name] += 1
            self.events.append(("run", name))
            if fail:
                raise RuntimeError(f"{name} cannot run this conv")
        run.impl = name
        return run

    def timer(self, fn):
        self.events.append(("time", fn.impl))
        fn()
        return self.ms[fn.impl]


def no_timer(fn):
    raise AssertionError("timed: the choice should not have been measured")


def key(role="conv2d"):
    return tuning_table.tuning_key("impl:" + role, G, DT, CPU, *SWITCHES, identity=H200)


def choose(runners, role="conv2d", **kw):
    return autotune.choose_impl(role, G, DT, CPU, SWITCHES, runners, **{**ON_GPU, "timer": runners.timer, **kw})


@pytest.mark.parametrize("triton_ms,cudnn_ms,want", [(1.0, 2.0, "triton"), (3.0, 0.5, "cudnn")])
def test_picks_the_faster_and_reports_both_times(tuner, triton_ms, cudnn_ms, want):
    r = Runners(triton_ms, cudnn_ms)
    assert choose(r) == want
    # each runner once untimed (the Triton runner tunes its tile config there) before it is timed
    for name in ("triton", "cudnn"):
        assert r.events.index(("run", name)) < r.events.index(("time", name))
    assert autotune.tuning_report()[key()] == {"winner": want, "ms": {"triton": triton_ms, "cudnn": cudnn_ms},
                                               "failed": {}}
    assert autotune.tuning_sources() == {key(): "tuned"}
    saved = json.load(open(tuning_table.cache_path()))
    assert saved[key()] == {"impl": want, "ms": {"triton": triton_ms, "cudnn": cudnn_ms}}
    before = dict(r.calls)
    assert choose(r, timer=no_timer) == want  # memory: no second timing, no extra runs
    assert r.calls == before


def test_choice_is_cached_across_processes(tuner, tmp_path):
    r = Runners(2.0, 1.0)
    assert choose(r) == "cudnn"
    fresh = autotune.Autotuner(table_dir=str(tmp_path / "tuned"))  # another instance reading the JSON
    assert fresh.find(key(), lambda e: e.get("impl")) == "cudnn" and fresh.sources == {key(): "cache"}
    script = textwrap.dedent(f"""
        import torch
        from resnet_fast.kernels import autotune, tuning_table
        from resnet_fast.kernels.conv_common import ConvGeometry
        def boom():
            raise AssertionError("ran")
        def no_timer(fn):
            raise AssertionError("timed")
        g = ConvGeometry.make((32, 256, 56, 56), (64, 256, 1, 1))
        print(autotune.choose_impl("conv2d", g, torch.bfloat16, torch.device("cpu"), {SWITCHES!r},
                                   {{"triton": boom, "cudnn": boom}}, timer=no_timer,
                                   identity=tuning_table.DeviceIdentity({H200.name!r}, {H200.capability!r}),
                                   interpreting=lambda: False))
        print(autotune.tuning_sources())
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "RESNET_FAST_CACHE_DIR": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == "cudnn" and "'cache'" in res.stdout.splitlines()[1]


def test_config_and_impl_entries_share_the_cache(tuner, tmp_path):
    """Both kinds of entries in one JSON; the config entries keep their format and stay readable."""
    g = ConvGeometry.make((32, 64, 56, 56), (64, 64, 3, 3), 1, 1)
    cands = cfgs.prune(cfgs.fwd_configs(torch.float16), g.M, g.Kg, g.Cg_pad, torch.float16)
    ckey = tuning_table.tuning_key("conv_fwd", g, torch.float16, CPU, identity=H200)
    tuner.pick(ckey, cands, lambda c: 0.1 if c == cands[-1] else 1.0)
    assert choose(Runners(2.0, 1.0)) == "cudnn"
    saved = json.load(open(tuning_table.cache_path()))
    assert ConvConfig(**saved[ckey]) == cands[-1] and saved[key()]["impl"] == "cudnn"
    fresh = autotune.Autotuner(table_dir=str(tmp_path / "tuned"))
    assert fresh.lookup(ckey, cands) == cands[-1]
    assert fresh.lookup(key(), cands) is None  # an implementation entry is never taken for a config


@pytest.mark.parametrize("value,want", [("triton", "triton"), (" CUDNN ", "cudnn"), ("Triton\n", "triton")])
def test_the_variable_forces_an_implementation(tuner, monkeypatch, value, want):
    monkeypatch.setenv("RESNET_FAST_CONV_IMPL", value)
    assert autotune.conv_impl_setting() == want
    r = Runners(triton_ms=5.0 if want == "triton" else 0.1, cudnn_ms=5.0 if want == "cudnn" else 0.1)
    assert choose(r, timer=no_timer) == want  # the slower one, because it is forced; nothing timed
    assert r.calls == {"triton": 0, "cudnn": 0} and autotune.tuning_report() == {}


@pytest.mark.parametrize("value", ["", "  ", "auto", "AUTO "])
def test_auto_is_the_default(monkeypatch, value):
    monkeypatch.setenv("RESNET_FAST_CONV_IMPL", value)
    assert autotune.conv_impl_setting() == "auto"
    monkeypatch.delenv("RESNET_FAST_CONV_IMPL")
    assert autotune.conv_impl_setting() == "auto"


@pytest.mark.parametrize("value", ["cudnn_composite", "eager", "1"])
def test_bad_variable_raises_naming_it(tuner, monkeypatch, value):
    monkeypatch.setenv("RESNET_FAST_CONV_IMPL", value)
    with pytest.raises(ValueError, match=r"RESNET_FAST_CONV_IMPL.*auto, triton, cudnn"):
        autotune.conv_impl_setting()
    with pytest.raises(ValueError, match="RESNET_FAST_CONV_IMPL"):
        choose(Runners())


def test_forcing_a_missing_implementation_raises(tuner, monkeypatch):
    monkeypatch.setenv("RESNET_FAST_CONV_IMPL", "cudnn")
    r = Runners()
    with pytest.raises(ValueError, match="RESNET_FAST_CONV_IMPL=cudnn.*conv_bn_stats"):
        autotune.choose_impl("conv_bn_stats", G, DT, CPU, SWITCHES, {"triton": r["triton"]}, **ON_GPU)


@pytest.mark.parametrize("runners", [{}, {"": lambda: None}, {"a|b": lambda: None}, {1: lambda: None},
                                     {"triton": 3}, None, "triton"])
def test_bad_runners_raise_naming_them(tuner, runners):
    with pytest.raises(ValueError, match="runners"):
        autotune.choose_impl("conv2d", G, DT, CPU, SWITCHES, runners, **ON_GPU)


@pytest.mark.parametrize("extra_ms,want", [(0.5, "cudnn_conv_relu"), (9.0, "cudnn")])
def test_extra_forms_are_timed_too(tuner, tmp_path, extra_ms, want):
    """A role may offer more forms (the composite's folded/fused ones): timed after triton and cudnn, kept
    when fastest, listed in the report and served from the cache like the two named implementations."""
    r = Runners(triton_ms=2.0, cudnn_ms=1.0)
    extra = r._runner("cudnn_conv_relu", False)
    r.calls["cudnn_conv_relu"], r.ms["cudnn_conv_relu"] = 0, extra_ms
    r["cudnn_conv_relu"] = extra
    assert choose(r) == want
    assert [e[1] for e in r.events if e[0] == "time"] == ["triton", "cudnn", "cudnn_conv_relu"]
    assert autotune.tuning_report()[key()]["ms"] == {"triton": 2.0, "cudnn": 1.0, "cudnn_conv_relu": extra_ms}
    fresh = autotune.Autotuner(table_dir=str(tmp_path / "tuned"))
    assert fresh.find(key(), lambda e: e["impl"] if e.get("impl") in r else None) == want
    # off the GPU (interpreter) the Triton kernels still run, whatever else is offered
    assert choose(r, interpreting=lambda: True, timer=no_timer) == "triton"


@pytest.mark.parametrize("role", ["", "a|b", None])
def test_bad_role_raises_naming_it(tuner, role):
    with pytest.raises(ValueError, match="role"):
        autotune.choose_impl(role, G, DT, CPU, SWITCHES, Runners(), **ON_GPU)


def test_interpreter_and_cpu_mean_triton(tuner):
    r = Runners(triton_ms=9.0, cudnn_ms=0.1)
    assert choose(r, interpreting=lambda: True, timer=no_timer) == "triton"
    # no identity injected: a CPU device is not a GPU (and this test process runs the interpreter)
    assert autotune.choose_impl("conv2d", G, DT, CPU, SWITCHES, r, timer=no_timer) == "triton"
    assert r.calls == {"triton": 0, "cudnn": 0} and autotune.tuning_sources() == {}


@pytest.mark.parametrize("blocked", ["capturing", "compiling", "autotune_off"])
def test_no_timing_while_capturing_or_compiling(tuner, monkeypatch, blocked):
    r = Runners(triton_ms=0.1, cudnn_ms=9.0)
    kw = {"timer": no_timer}
    if blocked == "autotune_off":
        monkeypatch.setenv("RESNET_FAST_AUTOTUNE", "0")
    else:
        kw[blocked] = lambda: True
    assert choose(r, **kw) == "cudnn"  # the heuristic: cuDNN as the speed floor until measured
    assert r.calls == {"triton": 0, "cudnn": 0}
    assert autotune.tuning_sources() == {key(): "heuristic"} and autotune.tuning_report() == {}
    assert not os.path.exists(tuning_table.cache_path())  # a guess is not persisted
    monkeypatch.delenv("RESNET_FAST_AUTOTUNE", raising=False)
    # a later eager call in the same process runs the same implementation (remembered, not retimed)
    assert choose(r, timer=no_timer) == "cudnn"


def test_heuristic_is_triton_without_cudnn(tuner, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "enabled", False)
    assert autotune.impl_heuristic(Runners()) == "triton"
    assert choose(Runners(), capturing=lambda: True) == "triton"
    monkeypatch.setattr(torch.backends.cudnn, "enabled", True)
    assert autotune.impl_heuristic(Runners()) == "cudnn"
    assert autotune.impl_heuristic({"triton": lambda: None}) == "triton"


def test_a_single_runner_is_taken_untimed(tuner):
    r = Runners()
    assert autotune.choose_impl("conv2d_backward", G, DT, CPU, SWITCHES, {"triton": r["triton"]},
                                timer=no_timer, **ON_GPU) == "triton"
    assert r.calls == {"triton": 0, "cudnn": 0} and autotune.tuning_sources() == {key("conv2d_backward"): "single"}


def test_failing_implementation_loses_and_is_reported(tuner, caplog):
    r = Runners(triton_ms=0.1, cudnn_ms=5.0, fail=("triton",))
    with caplog.at_level(logging.WARNING, logger="resnet_fast"):
        assert choose(r) == "cudnn"
    assert "triton cannot run this conv" in caplog.text
    rec = autotune.tuning_report()[key()]
    assert rec["winner"] == "cudnn" and rec["ms"] == {"cudnn": 5.0}
    assert rec["failed"] == {"triton": "RuntimeError: triton cannot run this conv"}


def test_keys_separate_roles_switches_and_configs(tuner):
    r = Runners(1.0, 2.0)
    assert choose(r, role="conv_bn_stats") == "triton"
    r2 = Runners(2.0, 1.0)
    assert choose(r2, role="conv_bn_stats_backward") == "cudnn"  # another role: timed on its own
    assert set(autotune.tuning_report()) == {key("conv_bn_stats"), key("conv_bn_stats_backward")}
    other = autotune.choose_impl("conv_bn_stats", G, DT, CPU, (False, False), Runners(2.0, 1.0), **ON_GPU,
                                 timer=Runners(2.0, 1.0).timer)
    assert other == "cudnn" and len(autotune.tuning_report()) == 3  # other switches: another key


def test_retune_retimes_a_cached_choice(tuner, tmp_path, monkeypatch):
    assert choose(Runners(2.0, 1.0)) == "cudnn"
    monkeypatch.setenv("RESNET_FAST_RETUNE", "1")
    monkeypatch.setattr(autotune, "_TUNER", autotune.Autotuner(table_dir=str(tmp_path / "tuned")))
    assert choose(Runners(1.0, 2.0)) == "triton"
    assert json.load(open(tuning_table.cache_path()))[key()]["impl"] == "triton"
