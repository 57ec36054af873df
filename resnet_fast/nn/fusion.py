"""What the fused paths can compute, decided in one place: a block's (conv, bn) parts, the rule for when a
(conv, bn) pair can be fused, and the dtype the activations run in.

Used by the runtime dispatch (:mod:`resnet_fast.nn.functional`: eval on folded BN, train on the training op)
and by :func:`resnet_fast.convert` (which modules to swap), so both refuse the same things with the same
messages.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as tnn

from .. import _backend, _ext
from ..kernels.checks import kernel_dtype_blocker
from .sync_bn import SyncBatchNorm2d

__all__ = ["activation_dtype", "block_pairs", "downsample_pair", "fused_pairs", "conv_bn_blocker", "pairs_blocker",
           "train_blocker", "conv_scope", "MODES"]

MODES = ("eval", "train", "convert")
_EXACT_BN_TYPES = (tnn.BatchNorm2d, SyncBatchNorm2d)  # convert: a subclass may compute something else


def activation_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the fused paths compute ``x``'s activations in: the autocast dtype of ``x``'s device type when
    autocast is on there (the custom ops are not autocast-aware, so the fused paths cast as autocast would for a
    conv), else ``x.dtype``."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def block_pairs(block) -> list:
    """A torchvision-structured block's (conv, bn) pairs in order: ``conv1/bn1, conv2/bn2`` and, for a
    Bottleneck, ``conv3/bn3`` (``bn3`` is None when missing)."""
    pairs = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
    if getattr(block, "conv3", None) is not None:
        pairs.append((block.conv3, getattr(block, "bn3", None)))
    return pairs


def downsample_pair(downsample):
    """(conv, bn) when ``downsample`` is torchvision's Sequential(Conv2d, BatchNorm2d), else None (no downsample
    or a parameter-free shortcut, which is called as it is)."""
    if isinstance(downsample, tnn.Sequential) and len(downsample) == 2 \
            and isinstance(downsample[0], tnn.Conv2d) and isinstance(downsample[1], tnn.BatchNorm2d):
        return downsample[0], downsample[1]
    return None


def fused_pairs(block) -> list:
    """Every (conv, bn) pair the fused forward of ``block`` computes: :func:`block_pairs` then the
    :func:`downsample_pair` when there is one."""
    ds_pair = downsample_pair(getattr(block, "downsample", None))
    return block_pairs(block) + ([ds_pair] if ds_pair is not None else [])


def conv_bn_blocker(conv, bn, mode: str, names=("conv", "bn")) -> str | None:
    """Why ``bn(conv(x))`` cannot be computed by the fused kernels in ``mode``, or None when it can.

    Args:
        conv, bn: the modules (any objects: a wrong type is a reason, not an error).
        mode: ``"eval"``: BN folded from its running statistics into the conv's epilogue (needs running stats
            and the affine parameters); ``"train"``: BN from batch statistics on the training op (needs the BN in
            training mode); ``"convert"``: what :func:`resnet_fast.convert` swaps in, a module that must compute
            both modes: exact types (``Conv2d``, ``BatchNorm2d``/``SyncBatchNorm2d``: a subclass may compute
            something else), running stats and affine parameters.
        names: how the reasons name the two modules.
    Every mode needs a Conv2d without bias and with zero padding given as numbers.
    """
    if mode not in MODES:
        raise ValueError(f"conv_bn_blocker: mode must be one of {', '.join(MODES)}, got {mode!r}")
    conv_name, bn_name = names
    exact = mode == "convert"
    if not (type(conv) is tnn.Conv2d if exact else isinstance(conv, tnn.Conv2d)):
        return f"{conv_name} is {type(conv).__name__}, not Conv2d"
    if conv.bias is not None:
        return f"{conv_name} has a bias"
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return f"{conv_name} uses padding {conv.padding!r} / mode {conv.padding_mode!r}"
    if not (type(bn) in _EXACT_BN_TYPES if exact else isinstance(bn, tnn.BatchNorm2d)):
        return f"{bn_name} is {type(bn).__name__}, not BatchNorm2d"
    if mode in ("eval", "convert"):
        if bn.running_mean is None or bn.running_var is None:
            return f"{bn_name} has no running statistics (track_running_stats=False)"
        if bn.weight is None or bn.bias is None:
            return f"{bn_name} has affine=False"
    if mode == "train" and not bn.training:
        return f"{bn_name} is in eval mode while the module trains"
    return None


def pairs_blocker(pairs, mode: str) -> str | None:
    """The first reason :func:`conv_bn_blocker` gives for one of the (conv, bn) ``pairs``, or None."""
    for conv, bn in pairs:
        reason = conv_bn_blocker(conv, bn, mode)
        if reason is not None:
            return reason
    return None


def train_blocker(x: torch.Tensor, pairs) -> str | None:
    """Why the training path cannot run the (conv, bn) ``pairs`` on ``x``, or None when it can: the C++
    extension (the tail ops), the activation dtype (:func:`activation_dtype`), then each pair."""
    if not _ext.available():
        return f"the C++ extension is not available: {_ext.error()}"
    reason = kernel_dtype_blocker(activation_dtype(x))
    if reason is not None:
        return reason
    return pairs_blocker(pairs, "train")


def conv_scope(conv: tnn.Module):
    """Context in which the ops' conv calls (forward here, backward through autograd) are recorded as ``conv``'s,
    for :func:`resnet_fast.conv_implementations`. Eager only: under torch.compile nothing is recorded (a
    compiled model reports what its eager calls recorded)."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return _backend.conv_owner(conv)
