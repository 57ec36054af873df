"""Triton kernels (NHWC implicit-GEMM convolutions, BN finalize).

Submodules are imported on demand (``resnet_fast.kernels.conv_fwd`` etc.) so that importing the package never
defines a ``@triton.jit`` kernel before :mod:`resnet_fast._backend` has decided whether to interpret them.
Shared geometry/index math: :mod:`.conv_common`; tile configs: :mod:`.configs`; tuning keys, the cache file
and the shipped tables: :mod:`.tuning_table`; the autotuner and the per-conv implementation choice:
:mod:`.autotune`; the sm_90 compile check over every module's ``compile_specs()``: :mod:`.compile_check`.
"""
from . import _interpreter_compat

_interpreter_compat.apply()
_interpreter_compat.skip_discarded_overflow_checks()
