"""Helpers shared by the op modules: the conv arguments as the custom ops' ``int[]`` lists, and a gradient laid
out with the strides the backward kernels require."""
from __future__ import annotations

import torch

from ..kernels.conv_common import pair

__all__ = ["conv_arg_lists", "with_strides_of"]


def conv_arg_lists(stride, padding, dilation, who: str) -> tuple:
    """``(stride, padding, dilation)`` (each an int or a pair) as three 2-element int lists, the form the custom
    ops' ``int[]`` schema arguments take; ValueError naming the bad argument (stride/dilation >= 1, padding
    >= 0)."""
    return tuple(list(pair(v, name, who, lo))
                 for v, name, lo in ((stride, "stride", 1), (padding, "padding", 0), (dilation, "dilation", 1)))


def with_strides_of(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` with ``ref``'s strides (the backward kernels read a gradient and the saved output ``y`` of ``dy_bn``
    through one set of strides). Dense channels_last tensors differ only in the strides of size-1 dims, which
    index nothing: a view. Anything else is copied once."""
    if t.stride() == ref.stride():
        return t
    if t.is_contiguous(memory_format=torch.channels_last) and ref.is_contiguous(memory_format=torch.channels_last):
        return t.as_strided(ref.shape, ref.stride())
    return torch.empty_like(ref).copy_(t)
