"""Explicit eager-PyTorch fallbacks of the fused ops (shared by every op module).

These run only when :func:`resnet_fast._backend.use_kernels` says no kernels (eager backend, a device or
dtype the kernels do not cover, each such case counted by the backend) and as the computation tests compare
against. They produce the same output dtype and memory format as the kernel path, so a fallback is
indistinguishable to callers (and to the op's fake implementation).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["eager_conv2d", "eager_conv_epilogue"]


def eager_conv_epilogue(y: torch.Tensor, bias=None, scale=None, shift=None, residual=None,
                        relu: bool = False) -> torch.Tensor:
    """``act((y + bias) * scale + shift + residual)`` on ``y [N, K, P, Q]``, computed in float32 (float64 for
    float64 ``y``) and returned in that accumulation dtype (the caller rounds once)."""
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    y = y.to(acc)
    view = (1, -1, 1, 1)
    if bias is not None:
        y = y + bias.to(acc).view(view)
    if scale is not None:
        y = y * scale.to(acc).view(view)
    if shift is not None:
        y = y + shift.to(acc).view(view)
    if residual is not None:
        y = y + residual.to(acc)
    if relu:
        y = torch.relu(y)
    return y


def eager_conv2d(x, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, *,
                 scale=None, shift=None, residual=None, relu=False) -> torch.Tensor:
    """The fused conv computed by ``F.conv2d`` (without bias: bias joins the fp32 epilogue, like the
    kernel) + :func:`eager_conv_epilogue`; ``[N, K, P, Q]`` in x's dtype, channels_last like the kernel."""
    y = F.conv2d(x, weight, None, tuple(stride), tuple(padding), tuple(dilation), groups)
    y = eager_conv_epilogue(y, bias, scale, shift, residual, relu)
    return y.to(x.dtype).contiguous(memory_format=torch.channels_last)
