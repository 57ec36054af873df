"""The BN+ReLU prologue as its own pass: the alternative to applying it inside a conv's K-loop.

Inside the loop (the kernels' ``PROLOGUE``) each loaded activation element is transformed once per tap and
output tile that reads it: 9 times for a 3×3 conv, and each time on the issue slots the tensor cores wait on
(the sm_90 cost report: a 3×3 training forward issues 1.8 instructions per MMA cycle with it, 0.72 without).
As a pass, ``a = act(x*scale[c] + shift[c])`` is formed once per element by the C++ ``bn_relu`` kernel (one
read of x, one write of a, rounded to x's dtype exactly as the in-loop prologue rounds it), and the conv runs
on ``a`` without the transform. Which is faster depends on the conv's arithmetic intensity, so the forward and
wgrad launchers offer it as a tuning twin of their configs (``ConvConfig.prologue_pass``) wherever the loop
would transform each input element several times (:func:`may_pay`: 3×3 stride 1), and make it their untuned
default there (the report's estimate); the measurement decides once tuning runs. It needs the C++ extension;
without it the twins are not offered.
"""
from __future__ import annotations

import torch

from .. import _ext
from .conv_common import ConvGeometry

__all__ = ["available", "may_pay", "worth_offering", "apply", "MIN_REUSE"]

# The cost report (bf16 RN50, batch 256): 3×3 stride 1, est 109 -> 62 µs forward and 186 -> 138 µs wgrad with the
# pass; 3×3 stride 2 (layer2.0.conv2), 109 -> 201 µs and 189 -> 230 µs.
MIN_REUSE = 4


def available() -> bool:
    """Whether the pass can run: the C++ extension with its ``bn_relu`` op is loaded."""
    return bool(_ext.load()) and hasattr(torch.ops.resnet_fast, "bn_relu")


def may_pay(g: ConvGeometry, prologue: bool) -> bool:
    """The geometry rule: a conv with a prologue whose loop would transform each input element at least
    :data:`MIN_REUSE` times (``R*S / (stride_h*stride_w)``: 9 for a 3×3 stride-1 conv; 2.25 at stride 2, where
    the input is 4× the output and the pass's two activation passes cost more than the loop's transforms; 1 for
    a 1×1 conv, which applies the in-loop prologue once per element already)."""
    return prologue and g.R * g.S >= MIN_REUSE * g.stride[0] * g.stride[1]


def worth_offering(g: ConvGeometry, prologue: bool) -> bool:
    """Whether the launchers offer the pass (and default to it): :func:`may_pay` and :func:`available`."""
    return may_pay(g, prologue) and available()


def apply(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, relu: bool) -> torch.Tensor:
    """``act(x*scale[c] + shift[c])``: x ``[N, C, H, W]`` channels_last fp32/fp16/bf16, scale/shift fp32 ``[C]``;
    returns a new channels_last tensor of x's dtype."""
    return torch.ops.resnet_fast.bn_relu(x.contiguous(memory_format=torch.channels_last),
                                         scale.to(torch.float32).contiguous(), shift.to(torch.float32).contiguous(),
                                         bool(relu))
