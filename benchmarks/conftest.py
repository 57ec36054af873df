"""pytest-benchmark suite set-up: GPU only (skipped without CUDA); not collected by the plain ``pytest`` run
(``testpaths = ["tests"]``). Run: ``pytest benchmarks --benchmark-only [--bench-batch 64]``."""
import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--bench-batch", type=int, default=256, help="batch size of the block benchmarks")
    parser.addoption("--bench-resolution", type=int, default=224, help="input resolution the shapes derive from")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA device")
    for item in items:
        item.add_marker(skip)


@pytest.fixture
def bench_batch(request):
    return request.config.getoption("--bench-batch")


@pytest.fixture
def bench_resolution(request):
    return request.config.getoption("--bench-resolution")
