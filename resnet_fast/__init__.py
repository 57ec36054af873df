"""resnet_fast: fused Triton and C++/CUDA kernels for ResNet training and inference in PyTorch.

Layers (see docs/ARCHITECTURE.md): ``kernels`` (Triton) and ``csrc`` (C++/CUDA) -> ``ops`` (custom ops with
autograd and fake implementations) -> ``nn`` (fused modules) -> ``models`` (constructors) -> ``bench``.
"""
from . import _backend  # noqa: F401  (first: it decides whether Triton kernels are interpreted)
from ._backend import backend, reset_stats, stats
from . import ops

__version__ = "0.1.0"
__all__ = ["ops", "backend", "stats", "reset_stats", "__version__"]

# The module layer and above: fused modules, model constructors, convert()/revert().
from . import nn, models  # noqa: E402
from .convert import conv_implementations, convert, revert  # noqa: E402

__all__ += ["nn", "models", "convert", "revert", "conv_implementations"]
