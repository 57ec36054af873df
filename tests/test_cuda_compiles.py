"""Every csrc/*.cu compiles to an object with nvcc for sm_90, with torch's include paths and defines.

CI has no GPU, so this is what catches CUDA compile errors there. Skipped without nvcc, except when the
environment variable CI is set: then a missing nvcc fails. The flags come from resnet_fast._build_config (the
ones the CUDAExtension build uses), with the arch list reduced to sm_90 to keep it within ~1 minute a file.
The objects are compiled once per session; a second test reads their symbol table to check that the 16-byte
vector kernels exist for both the residual tail (bn_add_relu) and the residual-free bn_relu.
"""
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from torch.utils import cpp_extension

from resnet_fast import _build_config as cfg

CU_FILES = sorted(cfg.CSRC.glob("*.cu"))


def _shim_includes(tmp_path: Path) -> list[str]:
    # CPU-only torch wheels ship the c10/cuda headers but not this CMake-generated one; its content in CUDA
    # builds is the one define below.
    name = "c10/cuda/impl/cuda_cmake_macros.h"
    if any((Path(p) / name).is_file() for p in cpp_extension.include_paths()):
        return []
    shim = tmp_path / "shim"
    (shim / name).parent.mkdir(parents=True)
    (shim / name).write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return [str(shim)]


def test_cu_sources_are_listed_in_build_config():
    assert {str(p.relative_to(cfg.ROOT)) for p in CU_FILES} == set(cfg.CUDA_SOURCES)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """[(source, command, CompletedProcess)] of every csrc/*.cu compiled for sm_90 into one directory."""
    if cfg.nvcc_path() is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but nvcc was not found (CUDA_HOME, CUDA_PATH, /usr/local/cuda/bin, PATH)")
        pytest.skip("nvcc not found")
    assert CU_FILES, "no csrc/*.cu files"
    tmp_path = tmp_path_factory.mktemp("cu")
    extra = _shim_includes(tmp_path)

    def compile_one(src: Path):
        cmd = cfg.nvcc_compile_command(str(src), str(tmp_path / (src.stem + ".o")), archs=["90"],
                                       extra_includes=extra)
        return src, cmd, subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(max_workers=max(1, min(len(CU_FILES), os.cpu_count() or 1))) as pool:
        return tmp_path, list(pool.map(compile_one, CU_FILES))


def test_cuda_sources_compile_for_sm90(compiled):
    tmp_path, results = compiled
    failures = [f"{src.name}: exit {r.returncode}\n$ {' '.join(cmd)}\n{r.stderr[-6000:]}"
                for src, cmd, r in results if r.returncode != 0]
    assert not failures, "\n\n".join(failures)
    for src, _, _ in results:
        assert (tmp_path / (src.stem + ".o")).stat().st_size > 0


# Itanium-mangled element type, math type and 16-byte vector width V of each dtype the kernels dispatch on.
_VEC_TYPES = {"float32": ("f", "f", 4), "float16": ("N3c104HalfE", "f", 8), "bfloat16": ("N3c108BFloat16E", "f", 8),
              "float64": ("d", "d", 2)}


# Kernel -> number of bool template parameters before kHasRes (the last one): fwd (kCL, k32), nchw (k32).
_KERNEL_BOOLS = {"fwd_kernel": 2, "bwd_nhwc_kernel": 0, "bwd_nchw_kernel": 1}


@pytest.mark.parametrize("kernel", list(_KERNEL_BOOLS))
def test_vector_kernels_instantiated_with_and_without_residual(compiled, kernel):
    """Every kernel of bn_add_relu_cuda.cu has its 16-byte vector instantiation (V = 16 / sizeof(T)) for each
    dtype with kHasRes = true (bn_add_relu) and false (bn_relu): the last template argument of each kernel."""
    tmp_path, results = compiled
    obj = tmp_path / "bn_add_relu_cuda.o"
    if not obj.is_file():
        pytest.skip("bn_add_relu_cuda.cu did not compile (see test_cuda_sources_compile_for_sm90)")
    if shutil.which("nm") is None:
        pytest.skip("nm not found")
    symbols = subprocess.run(["nm", str(obj)], capture_output=True, text=True, check=True).stdout
    for dtype, (t, a, v) in _VEC_TYPES.items():
        for has_res in (1, 0):
            pattern = rf"{kernel}I{t}{a}Li{v}E(?:Lb[01]E){{{_KERNEL_BOOLS[kernel]}}}Lb{has_res}EE"
            assert re.search(pattern, symbols), f"{kernel}: no V={v} instantiation for {dtype}, kHasRes={has_res}"
