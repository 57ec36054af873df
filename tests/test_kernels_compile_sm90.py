"""Every Triton kernel config compiles for Hopper (sm_90) without a GPU: wgmma in GEMM kernels, no register
spills (ptxas -v), shared memory within 227 KB.

The check (``python -m resnet_fast.kernels.compile_check``) runs once, in a subprocess with TRITON_INTERPRET
removed (this test process has the interpreter on), and each kernel module's rows are asserted by their own
test id, so a failure names the module that owns the kernel.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

KERNELS = pathlib.Path(__file__).resolve().parents[1] / "resnet_fast" / "kernels"
# modules with compile_specs(), found without importing them (importing would define interpreted kernels)
MODULES = sorted(p.stem for p in KERNELS.glob("*.py")
                 if re.search(r"^def compile_specs\(", p.read_text(), re.M) and p.stem != "compile_check")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    from resnet_fast.kernels.compile_check import find_ptxas
    if find_ptxas() is None:
        pytest.skip("no ptxas (Triton's bundled one or the CUDA toolkit's) to count spills")
    out = tmp_path_factory.mktemp("sm90") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "resnet_fast.kernels.compile_check", "--json", str(out)],
                          cwd=KERNELS.parents[1], env=env, capture_output=True, text=True, timeout=900)
    if not out.exists():
        pytest.fail(f"compile_check produced no report (rc={proc.returncode}):\n{proc.stdout[-3000:]}"
                    f"\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def test_every_module_with_specs_was_checked(rows):
    assert MODULES and "conv_fwd" in MODULES
    assert {r["module"] for r in rows} == set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_sm90_codegen(module, rows):
    mine = [r for r in rows if r["module"] == module]
    assert mine, f"{module}: compile_specs() returned nothing"
    bad = [f"{r['kernel']} {r['spec']}: {'; '.join(r['problems'])}" for r in mine if not r["ok"]]
    assert not bad, f"{module}: {len(bad)} of {len(mine)} specs fail on sm_90:\n" + "\n".join(bad)
    gemms = [r for r in mine if r["is_gemm"]]
    assert all(r["wgmma"] for r in gemms)
    assert all(r["spill_stores"] == 0 and r["spill_loads"] == 0 for r in mine)


def test_ptxas_log_parser():
    from resnet_fast.kernels.compile_check import parse_usage
    log = ("ptxas info    : Compiling entry function '_k' for 'sm_90a'\n"
           "ptxas info    : Function properties for _k\n"
           "    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 32 bytes smem\n")
    assert parse_usage(log) == {"registers": 255, "spill_stores": 8, "spill_loads": 12}
    assert parse_usage("ptxas fatal   : Unresolved extern function") is None  # not a usage report: never zeros


_SIDECAR = """
import json, sys
from resnet_fast.kernels import compile_check as cc, tile_stats
fn, sig, cx, opts, _gemm, *rest = tile_stats.compile_specs()[0]
out = []
for _ in range(2):  # compiled (Triton's ptxas log), then a cache hit (the usage kept beside the cubin)
    ck, usage = cc.compile_checked(fn, sig, cx, opts, rest[0] if rest else (), ptxas=None)
    out.append(usage)
json.dump(out, sys.stdout)
"""


def test_usage_comes_from_tritons_ptxas_run_and_its_cache(tmp_path):
    # ptxas=None: neither figure may come from a ptxas run of ours; the second compile is a cache hit
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", _SIDECAR], cwd=KERNELS.parents[1], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = json.loads(proc.stdout.strip().splitlines()[-1])
    assert first["registers"] and first["spill_stores"] == 0 and first == second
    assert len(list(tmp_path.glob("*/resnet_fast_ptxas_usage.json"))) == 1
