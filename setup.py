"""Builds the C++/CUDA extension resnet_fast._C from csrc/ (package metadata lives in pyproject.toml).

CUDAExtension (nvcc, sm_80 + sm_90 SASS and sm_90 PTX, -O3) when torch was built with CUDA and nvcc is
found, else a CppExtension with the CPU kernels only; RESNET_FAST_CUDA=0/1 forces either. Sources and flags
come from resnet_fast/_build_config.py, loaded by path so that the package itself is not imported here.

    pip install --no-build-isolation -e .
"""
import importlib.util
import os
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_resnet_fast_build_config", ROOT / "resnet_fast" / "_build_config.py")
cfg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cfg)

cuda = cfg.want_cuda()
kwargs = dict(
    name=cfg.EXT_NAME,
    sources=cfg.sources(cuda),
    include_dirs=[str(cfg.CSRC)],
    depends=cfg.HEADERS,
)
if cuda:
    ext = CUDAExtension(**kwargs, extra_compile_args={"cxx": cfg.cxx_flags(), "nvcc": cfg.nvcc_flags()})
else:
    ext = CppExtension(**kwargs, extra_compile_args={"cxx": cfg.cxx_flags()})
print(f"resnet_fast: building {cfg.EXT_NAME} ({'CUDA + CPU' if cuda else 'CPU only'}) "
      f"from {', '.join(cfg.sources(cuda))}")

# Two compile jobs by default keep a 2-core machine responsive; MAX_JOBS overrides (torch reads it).
os.environ.setdefault("MAX_JOBS", str(max(1, min(4, os.cpu_count() or 1))))

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension})
