"""Test set-up shared by every test file.

Without CUDA the Triton kernels run in the interpreter: TRITON_INTERPRET must be set before any
``@triton.jit`` decorator executes, so it is set here, before resnet_fast is imported.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's one-time warning

import resnet_fast  # noqa: E402  (after the environment above)

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture
def kernel_device() -> str:
    """Where the Triton kernels run: the GPU when there is one, else the CPU interpreter."""
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture
def triton_backend(monkeypatch):
    """Force the project's kernels (interpreted on CPU) for the duration of a test."""
    monkeypatch.setenv("RESNET_FAST_BACKEND", "triton")
    resnet_fast.reset_stats()
    yield
    resnet_fast.reset_stats()


@pytest.fixture
def eager_backend(monkeypatch):
    monkeypatch.setenv("RESNET_FAST_BACKEND", "eager")
    resnet_fast.reset_stats()
    yield
    resnet_fast.reset_stats()


@pytest.fixture
def tma_device(kernel_device) -> str:
    """The kernel device where TMA descriptors run (sm_90+, or emulated in the interpreter), else skip."""
    from resnet_fast.kernels import configs
    if not configs.tma_allowed(torch.device(kernel_device)):
        pytest.skip("no TMA descriptors here (GPU older than sm_90, Triton < 3.4, or RESNET_FAST_TMA=0)")
    return kernel_device
