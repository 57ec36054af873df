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
