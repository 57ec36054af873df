"""Forward computations of the fused modules, one function per path.

* :func:`block_forward` / :func:`conv_bn_act` dispatch: the kernel path in eval, the training path in train,
  the eager computation under the eager backend (or when the backend policy says no kernels).
* ``*_eval_kernels``: every conv runs ``resnet_fast.ops.conv2d`` with BatchNorm folded per call by
  ``resnet_fast.ops.fold_bn`` (no cached folding, so BN parameters changed between calls are honoured), the
  residual add and ReLU fused into the last conv's epilogue. Also under autograd (frozen BN statistics, e.g.
  fine-tuning in eval mode): ``ops.conv2d``'s backward runs the dgrad/wgrad kernels, and ``fold_bn`` is
  differentiable, so gradients reach the input, the conv weights and the BN affine parameters.
* :func:`block_forward_train` / :func:`conv_bn_act_train`: the training path, on the training op
  (:mod:`resnet_fast.nn.train_path`: fused conv + batch-statistics BN); a recorded eager fallback when the ops,
  the C++ extension, the dtype or the layers are not covered.
* What each path can fuse (and the fallback reasons) is decided by :mod:`resnet_fast.nn.fusion`.
* ``*_eager``: the explicit eager fallback, the blocks' own ``nn`` submodules, so running stats, momentum,
  ``num_batches_tracked`` and friends follow PyTorch exactly.
"""
from __future__ import annotations

import torch
import torch.nn as tnn

from .. import _backend, ops
from . import train_path
from .fusion import (activation_dtype, block_pairs, conv_scope, downsample_pair, fused_pairs, pairs_blocker,
                     train_blocker)


def _kernels(op: str, device: torch.device) -> bool:
    if torch.compiler.is_compiling():
        # Same decision as use_kernels, without the lock/logging that would break the graph; the eager
        # call that precedes compilation (or the first trace) has already logged any fallback.
        name = _backend.backend()
        return name != "eager" and (device.type == "cuda" or (name == "triton" and _backend.interpreting()))
    return _backend.use_kernels(op, device)


def _fallback(op: str, reason: str) -> None:
    if not torch.compiler.is_compiling():
        _backend.record_fallback(op, reason)


def _kernel_call(op: str) -> None:
    if not torch.compiler.is_compiling():
        _backend.record_kernel_call(op)


def check_input(x: torch.Tensor, channels: int, who: str) -> None:
    """ValueError unless ``x`` is a 4-D (N, C, H, W) tensor with ``C == channels``."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != channels:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{who}: expected a 4-D input of shape (N, {channels}, H, W), got {got}")


# ------------------------------------------------------------------------------------------ kernel path
def conv_bn_eval_kernels(x, conv, bn, *, residual=None, relu=False):
    """One kernel conv: ``relu(bn(conv(x)) + residual)`` with BN folded into a per-channel scale/shift."""
    # Custom ops are not autocast-aware: cast as autocast would for a conv, and the weight to x's dtype
    # (a preceding unfused layer may have produced half precision).
    x = x.to(activation_dtype(x))
    if residual is not None:
        residual = residual.to(x.dtype)
    scale, shift = ops.fold_bn(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    with conv_scope(conv):
        return ops.conv2d(x, conv.weight.to(x.dtype), stride=conv.stride, padding=conv.padding,
                          dilation=conv.dilation, groups=conv.groups, scale=scale, shift=shift, residual=residual,
                          relu=relu)


def block_forward_eval_kernels(block, x):
    """Eval forward of a block on the kernels; the residual add and final ReLU ride on the last conv."""
    pairs = block_pairs(block)
    ds = block.downsample
    ds_pair = downsample_pair(ds)
    reason = pairs_blocker(fused_pairs(block), "eval")
    if reason is not None:
        _fallback("block", reason)
        return block_forward_eager(block, x)
    if ds is None:
        identity = x
    elif ds_pair is not None:
        identity = conv_bn_eval_kernels(x, *ds_pair)
    else:  # a parameter-free shortcut (CIFAR option A): no conv or BN to fuse
        identity = ds(x)
    out = x
    for conv, bn in pairs[:-1]:
        out = conv_bn_eval_kernels(out, conv, bn, relu=True)
    conv, bn = pairs[-1]
    out = conv_bn_eval_kernels(out, conv, bn, residual=identity, relu=True)
    _kernel_call("block")
    return out


# -------------------------------------------------------------------------------------------- train path
def block_forward_train(block, x):
    """Training forward of a block on the training op (:func:`resnet_fast.nn.train_path.block_forward_train_kernels`:
    fused conv + batch-statistics BN units, C++ tail). Falls back to the eager computation (recorded) when the C++
    extension, the dtype or the block's layers are not covered."""
    reason = train_blocker(x, fused_pairs(block))
    if reason is not None:
        _fallback("block_train", reason)
        return block_forward_eager(block, x)
    _kernel_call("block_train")
    return train_path.block_forward_train_kernels(block, x)


def conv_bn_act_train(x, conv, bn, relu, bn_forward=None):
    """Training forward of conv + BN (+ ReLU) on the training op
    (:func:`resnet_fast.nn.train_path.conv_bn_act_train_kernels`), the same plug point as
    :func:`block_forward_train`."""
    reason = train_blocker(x, [(conv, bn)])
    if reason is not None:
        _fallback("conv_bn_train", reason)
        return conv_bn_act_eager(x, conv, bn, relu, bn_forward)
    _kernel_call("conv_bn_train")
    return train_path.conv_bn_act_train_kernels(x, conv, bn, relu)


# -------------------------------------------------------------------------------------------- eager path
def block_forward_eager(block, x):
    """torchvision's BasicBlock/Bottleneck forward, computed by the block's own nn submodules."""
    pairs = block_pairs(block)
    out = x
    for conv, bn in pairs[:-1]:
        out = block.relu(bn(conv(out)))
    conv, bn = pairs[-1]
    out = bn(conv(out))
    identity = x if block.downsample is None else block.downsample(x)
    return block.relu(out + identity)


def conv_bn_act_eager(x, conv, bn, relu, bn_forward=None):
    # nn.Conv2d.forward, not conv(x): the fused stem conv is itself a Conv2d whose __call__ comes here.
    out = (bn_forward or bn)(tnn.Conv2d.forward(conv, x))
    return torch.relu(out) if relu else out


# -------------------------------------------------------------------------------------------- dispatch
def block_forward(block, x):
    """Forward of a fused BasicBlock/Bottleneck: validates ``x``, then kernels (eval), train path, or eager."""
    check_input(x, block.conv1.in_channels, type(block).__name__)
    if not _kernels("block", x.device):
        return block_forward_eager(block, x)
    if block.training:
        return block_forward_train(block, x)
    return block_forward_eval_kernels(block, x)


def conv_bn_act(x, conv, bn, relu=True, bn_forward=None, who="ConvBNReLU"):
    """Forward of conv + BN (+ ReLU). ``bn_forward`` computes the BN in eager/train mode when it is not
    ``bn(...)`` itself (the fused stem's BN module is a pass-through in the model's own forward)."""
    check_input(x, conv.in_channels, who)
    if not _kernels("conv_bn", x.device):
        return conv_bn_act_eager(x, conv, bn, relu, bn_forward)
    if bn.training:
        return conv_bn_act_train(x, conv, bn, relu, bn_forward)
    reason = pairs_blocker([(conv, bn)], "eval")
    if reason is not None:
        _fallback("conv_bn", reason)
        return conv_bn_act_eager(x, conv, bn, relu, bn_forward)
    _kernel_call("conv_bn")
    return conv_bn_eval_kernels(x, conv, bn, relu=relu)
