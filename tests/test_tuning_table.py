"""The shipped tuning table (resnet_fast/kernels/tuning_table.py) and the autotuner's lookup order.

No GPU here: the lookup runs with a made-up device identity (tuning_table.DeviceIdentity) and injected
interpreting/capturing/compiling predicates and timer, never by mocking CUDA. Tables live in a temporary
directory handed to a fresh Autotuner(table_dir=...), the cache file under RESNET_FAST_CACHE_DIR.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from resnet_fast.kernels import autotune, tuning_table
from resnet_fast.kernels import configs as cfgs
from resnet_fast.kernels.configs import ConvConfig
from resnet_fast.kernels.tuning_table import DeviceIdentity
from resnet_fast.kernels.conv_common import ConvGeometry

H200 = DeviceIdentity("NVIDIA H200", (9, 0))
H100 = DeviceIdentity("NVIDIA H100 80GB HBM3", (9, 0))  # same arch, another name: the table must serve it
A100 = DeviceIdentity("NVIDIA A100-SXM4-80GB", (8, 0))
CPU = torch.device("cpu")
DT = torch.float16
G = ConvGeometry.make((32, 64, 56, 56), (64, 64, 3, 3), 1, 1)
G2 = ConvGeometry.make((32, 256, 14, 14), (128, 256, 1, 1))
FLAGS = (False, True)


@pytest.fixture
def tuner(tmp_path, monkeypatch):
    """A fresh process's autotuner: empty memory, cache file and table directory under tmp_path."""
    monkeypatch.setenv("RESNET_FAST_CACHE_DIR", str(tmp_path / "cache"))
    for var in ("RESNET_FAST_RETUNE", "RESNET_FAST_AUTOTUNE", "RESNET_FAST_CONV_IMPL"):
        monkeypatch.delenv(var, raising=False)
    t = autotune.Autotuner(table_dir=str(tmp_path / "tuned"))
    monkeypatch.setattr(autotune, "_TUNER", t)
    return t


def cands(g=G):
    return cfgs.prune(cfgs.fwd_configs(DT), g.M, g.Kg, g.Cg_pad, DT)


def default(g=G):
    return cfgs.heuristic(cands(g), g.M, g.Kg, g.Cg_pad)


def other_than_default(g=G):
    """A candidate the heuristic would not pick: what a table/cache hit must return instead of it."""
    c = [x for x in cands(g) if x != default(g)]
    assert c, "the test needs a shape with more than one candidate"
    return c[-1]


def never_launch(cfg):
    raise AssertionError(f"launched {cfg.name()}: the answer should have come from a lookup")


def never_time(fn):
    raise AssertionError("timed: the answer should have come from a lookup")


def choose(identity=H100, g=G, timer=never_time, launch=never_launch, **kw):
    """autotune.choose for a conv_fwd launch on a made-up GPU (by default nothing may launch or be timed)."""
    kw = {"interpreting": lambda: False, "capturing": lambda: False, "compiling": lambda: False, **kw}
    return autotune.choose("conv_fwd", g, DT, CPU, cands(g), FLAGS, launch, default(g), identity=identity,
                           timer=timer, **kw)


def timing(fast):
    """A recording launch and a timer under which ``fast`` is the fastest config: (launch, timer, launched)."""
    launched = []

    def timer(fn):
        fn()  # the timed closure launches one config: the recording launch says which
        return 0.1 if launched[-1] == fast else 1.0
    return {"launch": launched.append, "timer": timer}, launched


def key(identity=H200, g=G, op="conv_fwd", extra=FLAGS):
    return tuning_table.tuning_key(op, g, DT, CPU, *extra, identity=identity)


def write_table(tmp_path, entries: dict, arch="sm_90", **over) -> str:
    """A table file in the shipped format, from {tuning key: entry} (keys converted by table_key)."""
    doc = {"format": tuning_table.FORMAT, "version": tuning_table.VERSION, "arch": arch,
           "provenance": {"gpu": "NVIDIA H200"},
           "entries": {tuning_table.table_key(k).key: v for k, v in entries.items()}}
    doc.update(over)
    path = tuning_table.table_path(arch, str(tmp_path / "tuned"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f)
    return path


def write_cache(entries: dict) -> None:
    path = tuning_table.cache_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(entries, f)


def table_warnings(caplog) -> list:
    return [r for r in caplog.records if r.name == "resnet_fast" and "tuning table" in r.getMessage()]


def test_table_key_replaces_the_device_by_its_arch():
    k200, k100, ka = key(H200), key(H100), key(A100)
    assert k200 != k100  # the user cache keeps each GPU's own winners
    t200, t100 = tuning_table.table_key(k200), tuning_table.table_key(k100)
    assert t200.key == t100.key and t200.arch == "sm_90" and tuning_table.table_key(ka).arch == "sm_80"
    assert (t200.device, t100.device) == (H200.name, H100.name)
    assert "H200" not in t200.key and "(9, 0)" not in t200.key
    f_key, f_tab = k200.split("|"), t200.key.split("|")
    assert f_tab == f_key[:11] + ["sm_90"] + f_key[13:]  # geometry, dtype and the switches stay
    assert f_tab[-2:] == [str(x) for x in FLAGS]
    assert tuning_table.table_key(key(None)) is None  # a CPU key: no table
    assert tuning_table.table_key("k") is None
    assert tuning_table.DeviceIdentity("x", (10, 0)).arch == "sm_100"


def test_table_beats_the_heuristic_and_tuning(tuner, tmp_path, monkeypatch):
    want = other_than_default()
    write_table(tmp_path, {key(H200): vars(want)})
    monkeypatch.setenv("RESNET_FAST_AUTOTUNE", "0")
    assert choose() == want  # an H100 served by the H200's sm_90 table
    assert autotune.tuning_sources() == {key(H100): "table"}
    monkeypatch.delenv("RESNET_FAST_AUTOTUNE")
    fresh = autotune.Autotuner(table_dir=str(tmp_path / "tuned"))
    monkeypatch.setattr(autotune, "_TUNER", fresh)
    assert choose() == want  # tuning on: the table still answers before any timing (never_time)
    assert not os.path.exists(tuning_table.cache_path())  # a table hit is not copied into the user cache


def test_without_table_the_heuristic_or_tuning_decides(tuner, monkeypatch):
    monkeypatch.setenv("RESNET_FAST_AUTOTUNE", "0")
    assert choose() == default()
    assert autotune.tuning_sources() == {key(H100): "heuristic"}
    monkeypatch.delenv("RESNET_FAST_AUTOTUNE")
    fast = other_than_default()
    kw, launched = timing(fast)
    assert choose(**kw) == fast and sorted(map(str, launched)) == sorted(map(str, cands()))
    assert autotune.tuning_sources() == {key(H100): "tuned"}
    assert set(autotune.tuning_report()[key(H100)]["ms"]) == {c.name() for c in cands()}


def test_user_cache_beats_the_table(tuner, tmp_path):
    c = cands()
    in_cache, in_table = c[0], c[-1]
    assert in_cache != in_table
    write_table(tmp_path, {key(H200): vars(in_table)})
    write_cache({key(H100): vars(in_cache)})
    assert choose() == in_cache
    assert autotune.tuning_sources() == {key(H100): "cache"}
    # a cache entry that is no longer a candidate falls through to the table
    tuner2 = autotune.Autotuner(table_dir=str(tmp_path / "tuned"))
    write_cache({key(H100): vars(ConvConfig(16, 16, 16, 1, 1, 1))})
    assert tuner2.lookup(key(H100), c) == in_table and tuner2.sources == {key(H100): "table"}


def test_retune_ignores_cache_and_table_but_stores(tuner, tmp_path, monkeypatch):
    c = cands()
    write_table(tmp_path, {key(H200): vars(c[0])})
    write_cache({key(H100): vars(c[0])})
    monkeypatch.setenv("RESNET_FAST_RETUNE", " 1 ")
    fast = c[-1]
    kw, launched = timing(fast)
    assert choose(**kw) == fast and len(launched) == len(c)
    assert autotune.tuning_sources() == {key(H100): "tuned"}
    assert ConvConfig(**json.load(open(tuning_table.cache_path()))[key(H100)]) == fast  # stored over the old entry
    assert choose() == fast  # later calls: this process's memory, no retiming (never_time)
    monkeypatch.delenv("RESNET_FAST_RETUNE")
    fresh = autotune.Autotuner(table_dir=str(tmp_path / "tuned"))
    assert fresh.lookup(key(H100), c) == fast and fresh.sources == {key(H100): "cache"}


@pytest.mark.parametrize("case", ["bad_json", "not_object", "format", "version", "arch", "entries"])
def test_unusable_table_is_ignored_with_one_warning(tuner, tmp_path, monkeypatch, caplog, case):
    want = other_than_default()
    path = write_table(tmp_path, {key(H200): vars(want)})
    doc = json.load(open(path))
    if case == "bad_json":
        text = open(path).read()[:-7]
    elif case == "not_object":
        text = json.dumps([doc])
    else:
        doc.update({"format": {"format": "something.else"}, "version": {"version": 99}, "arch": {"arch": "sm_80"},
                    "entries": {"entries": ["not", "a", "dict"]}}[case])
        text = json.dumps(doc)
    open(path, "w").write(text)
    monkeypatch.setenv("RESNET_FAST_AUTOTUNE", "0")
    with caplog.at_level(logging.WARNING, logger="resnet_fast"):
        assert choose() == default()
        assert choose(g=G2) == default(G2)  # a second key, same file: no second warning
        assert choose() == default()
    warns = table_warnings(caplog)
    assert len(warns) == 1 and path in warns[0].getMessage()


def test_bad_entries_are_ignored_one_by_one_with_one_warning(tuner, tmp_path, monkeypatch, caplog):
    good = other_than_default()
    g3 = ConvGeometry.make((32, 64, 28, 28), (128, 64, 3, 3), 2, 1)
    g4 = ConvGeometry.make((32, 512, 7, 7), (2048, 512, 1, 1))
    path = write_table(tmp_path, {
        key(H200): vars(good),
        key(H200, G2): {"BLOCK_M": "big", "BLOCK_N": 64, "BLOCK_K": 32},  # not a ConvConfig
        key(H200, g3): {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "warps": 4},  # unknown field
        key(H200, g4): vars(ConvConfig(16, 16, 16, 1, 1, 1)),  # valid, but never a candidate
    })
    monkeypatch.setenv("RESNET_FAST_AUTOTUNE", "0")
    with caplog.at_level(logging.WARNING, logger="resnet_fast"):
        assert choose() == good
        assert choose(g=G2) == default(G2)
        assert choose(g=g3) == default(g3)
        assert choose(g=g4) == default(g4)
    warns = table_warnings(caplog)
    assert len(warns) == 1 and path in warns[0].getMessage() and "2 malformed entries" in warns[0].getMessage()
    assert autotune.tuning_sources() == {key(H100): "table", key(H100, G2): "heuristic", key(H100, g3): "heuristic",
                                         key(H100, g4): "heuristic"}


def test_candidate_miss_alone_warns_once(tuner, tmp_path, monkeypatch, caplog):
    g4 = ConvGeometry.make((32, 512, 7, 7), (2048, 512, 1, 1))
    stale = vars(ConvConfig(16, 16, 16, 1, 1, 1))
    path = write_table(tmp_path, {key(H200): stale, key(H200, g4): stale})
    monkeypatch.setenv("RESNET_FAST_AUTOTUNE", "0")
    with caplog.at_level(logging.WARNING, logger="resnet_fast"):
        assert choose() == default() and choose(g=g4) == default(g4) and choose() == default()
    warns = table_warnings(caplog)
    assert len(warns) == 1 and path in warns[0].getMessage() and "not among the candidates" in warns[0].getMessage()


def test_absent_table_is_silent(tuner, monkeypatch, caplog):
    monkeypatch.setenv("RESNET_FAST_AUTOTUNE", "0")
    with caplog.at_level(logging.DEBUG, logger="resnet_fast"):
        assert choose() == default()
        assert choose(identity=A100) == default()
    assert not [r for r in caplog.records if r.name == "resnet_fast"]


def test_shipped_tables_load_cleanly():
    """The package's own table directory: a table there must load without a warning (none ships today)."""
    if os.path.isdir(tuning_table.TABLE_DIR):
        for name in os.listdir(tuning_table.TABLE_DIR):
            if name.endswith(".json"):
                t = tuning_table.load(os.path.join(tuning_table.TABLE_DIR, name), name[:-5])
                assert t is not None and not t.warned and t.entries, name
    assert tuning_table.load_arch("sm_1") is None


def test_interpreter_and_cpu_never_read_the_table(tuner, tmp_path):
    write_table(tmp_path, {key(H200): vars(other_than_default())})
    assert choose(interpreting=lambda: True) == cfgs.INTERPRETER_CONFIG
    assert autotune.choose("conv_fwd", G, DT, CPU, cands(), FLAGS, never_launch, default(),
                           interpreting=lambda: False) == cfgs.INTERPRETER_CONFIG  # real identity of a CPU: none
    assert autotune.tuning_sources() == {}


def test_no_tuning_while_capturing_or_compiling(tuner):
    assert choose(capturing=lambda: True) == default()
    assert choose(compiling=lambda: True) == default()
    assert autotune.tuning_sources() == {key(H100): "heuristic"} and autotune.tuning_report() == {}


def _tuned_cache(tmp_path, monkeypatch):
    """Tune two conv_fwd keys and one implementation key on a made-up H200; returns the winners."""
    win = {}
    for g in (G, G2):
        fast = cands(g)[-1]
        win[g] = choose(identity=H200, g=g, **timing(fast)[0])
        assert win[g] == fast
    runners = {"triton": lambda: None, "cudnn": lambda: None}
    impl = autotune.choose_impl("conv2d", G, DT, CPU, (), runners, identity=H200, interpreting=lambda: False,
                                capturing=lambda: False, compiling=lambda: False,
                                timer=lambda fn: 0.5 if fn is runners["cudnn"] else 0.7)
    assert impl == "cudnn"
    return win


def test_exporter_round_trip(tuner, tmp_path, monkeypatch):
    win = _tuned_cache(tmp_path, monkeypatch)
    cache = json.load(open(tuning_table.cache_path()))
    cache[key(A100)] = vars(cands()[0])  # another arch: not exported
    cache[key(None)] = vars(cands()[0])  # a CPU key: not exported
    cache[key(H200, G, extra=(True, True))] = {"BLOCK_M": 7}  # malformed: skipped
    cache["junk"] = {"x": 1}
    write_cache(cache)
    out = tuning_table.table_path("sm_90", str(tmp_path / "tuned"))
    assert tuning_table.main(["export", "--from", tuning_table.cache_path(), "--arch", "sm_90", "-o", out]) == 0
    doc = json.load(open(out))
    assert doc["format"] == tuning_table.FORMAT and doc["version"] == tuning_table.VERSION
    assert doc["arch"] == "sm_90" and len(doc["entries"]) == 3
    prov = doc["provenance"]
    import triton
    assert prov["gpu"] == H200.name and prov["torch"] == torch.__version__ and prov["triton"] == triton.__version__
    assert prov["source"] == os.path.basename(tuning_table.cache_path()) and prov["date"].endswith("Z")
    assert all("H200" not in k for k in doc["entries"])
    # a fresh process on an H100 with an empty user cache: every answer from the table, nothing timed
    monkeypatch.setenv("RESNET_FAST_CACHE_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(autotune, "_TUNER", autotune.Autotuner(table_dir=str(tmp_path / "tuned")))
    for g in (G, G2):
        assert choose(identity=H100, g=g) == win[g]

    def boom():
        raise AssertionError("ran: the table should have answered")
    assert autotune.choose_impl("conv2d", G, DT, CPU, (), {"triton": boom, "cudnn": boom}, identity=H100,
                                interpreting=lambda: False, timer=never_time) == "cudnn"
    assert set(autotune.tuning_sources().values()) == {"table"} and len(autotune.tuning_sources()) == 3
    assert tuning_table.main(["show", out]) == 0


def test_exporter_needs_one_gpu_per_arch(tuner, tmp_path, capsys):
    c = cands()
    cache = {key(H200): vars(c[0]), key(H100, G2): vars(c[-1])}
    with pytest.raises(ValueError, match="gpu"):
        tuning_table.export(cache, "sm_90")
    doc = tuning_table.export(cache, "sm_90", gpu=H100.name)
    assert doc["provenance"]["gpu"] == H100.name and list(doc["entries"]) == [tuning_table.table_key(key(H100, G2)).key]
    with pytest.raises(ValueError, match="arch"):
        tuning_table.export(cache, "sm_80")
    write_cache(cache)
    assert tuning_table.main(["export", "--arch", "sm_90", "-o", str(tmp_path / "t.json")]) == 2
    assert "gpu" in capsys.readouterr().err


def test_exporter_default_takes_this_process_tuning(tuner, tmp_path, monkeypatch):
    win = _tuned_cache(tmp_path, monkeypatch)
    os.remove(tuning_table.cache_path())
    write_cache({})
    doc = autotune.export_table(arch="sm_90")  # the (now empty) cache file plus what this process tuned
    tkey = {g: tuning_table.table_key(key(H200, g)).key for g in win}
    assert {tkey[g]: ConvConfig(**doc["entries"][tkey[g]]) for g in win} == {tkey[g]: w for g, w in win.items()}
    assert len(doc["entries"]) == 3


def test_exporter_command_line(tuner, tmp_path, monkeypatch):
    """``python -m resnet_fast.kernels.tuning_table export`` in a subprocess, then the table in this one."""
    want = other_than_default()
    write_cache({key(H200): vars(want)})
    out = tmp_path / "tuned" / "sm_90.json"
    env = {**os.environ, "RESNET_FAST_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "resnet_fast.kernels.tuning_table", "export", "--arch", "sm_90",
                        "-o", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "1 sm_90 entries" in r.stdout
    monkeypatch.setenv("RESNET_FAST_CACHE_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("RESNET_FAST_AUTOTUNE", "0")
    assert choose(identity=H100) == want


@pytest.mark.gpu
def test_real_gpu_tune_export_and_serve(tuner, tmp_path, monkeypatch):
    """On the GPU, nothing injected: do_bench times real work, the exporter writes this GPU's arch table, and a
    fresh process with an empty cache gets every answer from it without timing."""
    dev = torch.device("cuda")
    ident = tuning_table.device_identity(dev)
    small = torch.randn(256, 256, device=dev)
    big = torch.randn(4096, 4096, device=dev)
    c = cands()
    slow = {cfg: (big if i % 2 else small) for i, cfg in enumerate(c)}  # every other config does 256x more work
    cfg = autotune.choose("conv_fwd", G, DT, dev, c, FLAGS, lambda cfg: slow[cfg] @ slow[cfg], default())
    assert slow[cfg] is small and autotune.tuning_sources() == {key(ident): "tuned"}
    assert all(ms > 0 for ms in autotune.tuning_report()[key(ident)]["ms"].values())
    impl = autotune.choose_impl("conv2d", G, DT, dev, (), {"triton": lambda: small @ small, "cudnn": lambda: big @ big})
    rec = autotune.tuning_report()[tuning_table.tuning_key("impl:conv2d", G, DT, dev)]
    assert impl == "triton" and rec["ms"]["cudnn"] > rec["ms"]["triton"] > 0
    out = tuning_table.table_path(ident.arch, str(tmp_path / "tuned"))
    assert tuning_table.main(["export", "-o", out]) == 0  # arch and cache file: this machine's
    assert json.load(open(out))["provenance"]["gpu"] == ident.name
    monkeypatch.setenv("RESNET_FAST_CACHE_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(autotune, "_TUNER", autotune.Autotuner(table_dir=str(tmp_path / "tuned")))
    assert autotune.choose("conv_fwd", G, DT, dev, c, FLAGS, never_launch, default()) == cfg

    def boom():
        raise AssertionError("ran: the table should have answered")
    assert autotune.choose_impl("conv2d", G, DT, dev, (), {"triton": boom, "cudnn": boom}) == "triton"
    assert set(autotune.tuning_sources().values()) == {"table"}


def test_forget_starts_over(tuner, tmp_path, monkeypatch):
    """Autotuner.forget: memory, sources and measurements dropped, files re-read (a scratch cache dir undone)."""
    fast = other_than_default()
    kw, _ = timing(fast)
    assert choose(**kw) == fast and autotune.tuning_report() and autotune.tuning_sources()
    monkeypatch.setenv("RESNET_FAST_CACHE_DIR", str(tmp_path / "other"))
    tuner.forget()
    assert autotune.tuning_report() == {} and autotune.tuning_sources() == {}
    monkeypatch.setenv("RESNET_FAST_AUTOTUNE", "0")
    assert choose() == default()  # the winner lived only in the scratch cache and in memory


def test_entry_switch_fields_are_bools():
    """``tma`` and ``prologue_pass`` round-trip as bools; any other type makes the entry malformed."""
    from resnet_fast.kernels.tuning_table import config_from_entry
    cfg = ConvConfig(128, 128, 64, 8, 8, 3, prologue_pass=True)
    assert config_from_entry(vars(cfg)) == cfg and cfg.name().endswith("-pp")
    for field in ("tma", "prologue_pass"):
        assert config_from_entry(dict(vars(cfg), **{field: 1})) is None
