"""Helpers shared by the op modules: the conv arguments as the custom ops' ``int[]`` lists, a gradient laid
out with the strides the backward kernels require, and the per-conv choice between implementations
(:func:`run_chosen`)."""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from .. import _backend
from ..kernels.autotune import choose_impl
from ..kernels.checks import FLOAT_DTYPES, check, describe
from ..kernels.configs import conv_allows_tf32
from ..kernels.conv_common import ConvGeometry, pair

__all__ = ["conv_arg_lists", "conv_geometry", "with_strides_of", "tf32_switch", "run_chosen"]


def conv_arg_lists(stride, padding, dilation, who: str) -> tuple:
    """``(stride, padding, dilation)`` (each an int or a pair) as three 2-element int lists, the form the custom
    ops' ``int[]`` schema arguments take; ValueError naming the bad argument (stride/dilation >= 1, padding
    >= 0)."""
    return tuple(list(pair(v, name, who, lo))
                 for v, name, lo in ((stride, "stride", 1), (padding, "padding", 0), (dilation, "dilation", 1)))


def conv_geometry(who: str, x, weight, stride, padding, dilation, groups) -> ConvGeometry:
    """The geometry of a conv of ``x`` [N, C, H, W] (float32/float16/bfloat16) with ``weight`` of x's dtype and
    device; ValueError naming the bad argument."""
    check(isinstance(x, torch.Tensor) and x.dim() == 4,
          f"{who}: x must be a 4-D [N, C, H, W] tensor, got {describe(x)}")
    check(x.dtype in FLOAT_DTYPES, f"{who}: x dtype {x.dtype} has no kernel (float32/float16/bfloat16)")
    check(isinstance(weight, torch.Tensor) and weight.dtype == x.dtype and weight.device == x.device,
          f"{who}: weight must be a tensor of x's dtype {x.dtype} on {x.device}, got {describe(weight)}")
    return ConvGeometry.make(tuple(x.shape), tuple(weight.shape), stride, padding, dilation, groups, who)


def with_strides_of(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` with ``ref``'s strides (the backward kernels read a gradient and the saved output ``y`` of ``dy_bn``
    through one set of strides). Dense channels_last tensors differ only in the strides of size-1 dims, which
    index nothing: a view. Anything else is copied once."""
    if t.stride() == ref.stride():
        return t
    if t.is_contiguous(memory_format=torch.channels_last) and ref.is_contiguous(memory_format=torch.channels_last):
        return t.as_strided(ref.shape, ref.stride())
    return torch.empty_like(ref).copy_(t)


def tf32_switch(dtype: torch.dtype) -> bool:
    """Whether this conv may use TF32 (fp32 and :func:`resnet_fast.kernels.configs.conv_allows_tf32`, which both
    implementations follow): a switch of every role's choice, since it changes the work of both."""
    return dtype == torch.float32 and conv_allows_tf32()


def run_chosen(role: str, geom: ConvGeometry, x: torch.Tensor, switches: tuple, runners: Mapping[str, Callable]):
    """Run the implementation of conv role ``role`` that :func:`resnet_fast.kernels.autotune.choose_impl` picks
    for this geometry, x's dtype and device and ``switches`` (what changes the work), and return its result.

    ``runners``: ``{"triton": fn, "cudnn": fn, ...}``, zero-argument closures that only write their own outputs.
    A miss on the GPU times them (once per key): that happens with counting paused (:func:`_backend.counting_paused`)
    and the winner's last timed output is returned rather than computed again. The call is counted in
    ``stats()["impl_calls"][role][impl]`` and recorded for the caller's :func:`_backend.conv_owner`."""
    last = {}

    def keeping(name, fn):
        def run():
            last[name] = out = fn()
            return out
        return run

    with _backend.counting_paused():
        impl = choose_impl(role, geom, x.dtype, x.device, tuple(switches),
                           {name: keeping(name, fn) for name, fn in runners.items()})
    out = last.pop(impl) if impl in last else runners[impl]()
    last.clear()
    _backend.record_impl_call(role, impl)
    return out
