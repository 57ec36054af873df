"""The one list of C++/CUDA sources and compiler flags of the ``resnet_fast._C`` extension.

Used by ``setup.py`` (loaded by file path with importlib, so the package itself is not imported during a
build), by the JIT loader ``resnet_fast._ext`` and by ``tests/test_cuda_compiles.py``. Only the standard
library is imported at module level; torch is imported inside the functions that need it.

Environment:

* ``RESNET_FAST_CUDA=0|1``: force the CPU-only (``CppExtension``) or the CUDA build; default: CUDA when torch
  was built with CUDA and nvcc is found.
* ``RESNET_FAST_CUDA_ARCHS``: semicolon/comma separated SM list, default ``80;90`` (plus PTX for the last one,
  so newer GPUs can JIT it).
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"

EXT_NAME = "resnet_fast._C"  # module name of the setup.py build
JIT_NAME = "resnet_fast_C"  # module name (and cache sub-directory) of the JIT build

CPP_SOURCES = ["csrc/bn_add_relu.cpp"]
CUDA_SOURCES = ["csrc/bn_add_relu_cuda.cu"]
HEADERS = ["csrc/bn_add_relu.h"]

CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
DEFAULT_CUDA_ARCHS = ("80", "90")


def sources(cuda: bool, absolute: bool = False) -> list[str]:
    """Source files of the extension, relative to the repository root unless ``absolute``."""
    rel = CPP_SOURCES + (CUDA_SOURCES if cuda else [])
    return [str(ROOT / s) for s in rel] if absolute else list(rel)


def cuda_archs() -> list[str]:
    raw = os.environ.get("RESNET_FAST_CUDA_ARCHS", "").strip()
    archs = [a for a in re.split(r"[;, ]+", raw) if a] if raw else list(DEFAULT_CUDA_ARCHS)
    return [a.replace(".", "").replace("sm_", "") for a in archs]


def gencode_flags(archs: list[str] | None = None, ptx: bool = True) -> list[str]:
    """``-gencode`` flags: SASS for every arch, PTX for the last one."""
    archs = cuda_archs() if archs is None else archs
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    if ptx and archs:
        flags.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    return flags


def nvcc_path() -> str | None:
    """nvcc from CUDA_HOME/CUDA_PATH, /usr/local/cuda, or PATH; None when there is none."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    if Path("/usr/local/cuda/bin/nvcc").is_file():
        return "/usr/local/cuda/bin/nvcc"
    return shutil.which("nvcc")


def want_cuda() -> bool:
    """Whether to build the CUDA kernels: torch has CUDA and nvcc exists, unless RESNET_FAST_CUDA says."""
    forced = os.environ.get("RESNET_FAST_CUDA", "").strip().lower()
    if forced in ("0", "false", "off", "no"):
        return False
    import torch  # noqa: PLC0415  (only needed here; keeps the module importable without torch)

    has = torch.version.cuda is not None and nvcc_path() is not None
    if forced in ("1", "true", "on", "yes") and not has:
        raise RuntimeError("RESNET_FAST_CUDA=1 but torch was built without CUDA or nvcc was not found "
                           f"(torch.version.cuda={torch.version.cuda!r}, nvcc={nvcc_path()!r})")
    return has


def cxx_std() -> str:
    """The C++ standard torch itself was built with (``c++20`` for torch >= 2.10, else ``c++17``): its headers
    use that standard's features, and csrc/ is written to compile under both."""
    import torch  # noqa: PLC0415

    m = re.search(r"C\+\+ Version: (\d{4})", torch.__config__.show())
    return "c++20" if m and int(m.group(1)) >= 2020 else "c++17"


def cxx_flags() -> list[str]:
    return CXX_FLAGS + [f"-std={cxx_std()}"]


def nvcc_flags() -> list[str]:
    return NVCC_FLAGS + [f"-std={cxx_std()}"] + gencode_flags()


def nvcc_compile_command(src: str, obj: str, archs: list[str] | None = None,
                         extra_includes: list[str] = ()) -> list[str]:
    """nvcc command compiling one .cu file to an object exactly as torch's CUDAExtension would
    (torch's include paths and defines), for ``archs`` (default: the build's). Used by the CI compile test."""
    import sysconfig  # noqa: PLC0415

    import torch  # noqa: PLC0415
    from torch.utils import cpp_extension  # noqa: PLC0415

    nvcc = nvcc_path()
    if nvcc is None:
        raise RuntimeError("nvcc not found (looked in CUDA_HOME, CUDA_PATH, /usr/local/cuda/bin and PATH)")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}",
                                                                    f"-I{CSRC}"]
    includes += [f"-I{p}" for p in extra_includes]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    defines = ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    common = list(getattr(cpp_extension, "COMMON_NVCC_FLAGS", []))
    flags = [f for f in NVCC_FLAGS if f not in common]
    return [nvcc, "-c", src, "-o", obj, *includes, *defines, *common, *flags, f"-std={cxx_std()}",
            *gencode_flags(archs, ptx=False), "-Xcompiler", "-fPIC"]
