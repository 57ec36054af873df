"""Training forwards of a ResNet block and of a conv+BN+ReLU (the stem) on the training op, module by module.

Per block (torchvision structure: conv1/bn1/conv2/bn2[/conv3/bn3], downsample Sequential(conv, bn),
a parameter-free shortcut, or None)::

    y1, s1, t1 = conv_bn_train(x)                       conv_fwd + stats -> bn_finalize
    y2, s2, t2 = conv_bn_train(y1, prologue relu(y1*s1 + t1))
    (y3 likewise for a Bottleneck)
    out = bn_add_relu(y_last, s_last, t_last, residual, res_scale, res_shift,   C++ tail op
                      x_centre=mean_last, res_centre=mean_ds)

``residual`` is x (identity), the downsample conv's raw output with its own (scale, shift), or the
parameter-free shortcut's output. Only raw conv outputs are materialised; every BN application and ReLU is
recomputed where it is consumed, forward and backward (see :mod:`resnet_fast.ops.conv_bn_train`).
:func:`conv_bn_train` is the unit: the op on one (Conv2d, BatchNorm2d) pair, the BN's running statistics and,
for a syncing :class:`~resnet_fast.nn.SyncBatchNorm2d`, the cross-rank merge of the statistics.
The stem is ``y, s, t = conv_bn_train(x)`` then ``bn_relu(y, s, t, x_centre=mean)`` (the tail op's kernels without
a residual).

Centres: every BN input here is a raw conv output whose batch mean can be large against its spread, and the BN
backward needs Σg·(y - mean). The tail ops get the (detached) batch means as ``x_centre`` / ``res_centre`` so
that they sum Σg·(y - mean) directly instead of Σg·y, whose fp32 accumulation error would swamp the difference
(as the conv prologue's ``in_centre`` does for the inner BNs).

Autocast: activations run in the autocast dtype (the convs in low precision, as eager autocast does);
statistics, the BN affine, parameters' gradients and running stats stay fp32.
"""
from __future__ import annotations

import torch

from ..ops import bn_add_relu, bn_affine, bn_relu, conv_bn_stats, sync_batch_stats
from .fusion import activation_dtype, block_pairs, conv_scope, downsample_pair
from .sync_bn import SyncBatchNorm2d, update_bn_running_stats

__all__ = ["conv_bn_train", "block_forward_train_kernels", "conv_bn_act_train_kernels"]


def _centre(mean: torch.Tensor) -> torch.Tensor:
    # The batch mean as a centre (the next conv's in_centre, the tail op's x_centre/res_centre): it only sets the
    # rounding of the backward sums, so no gradient.
    return mean.detach().contiguous()


def conv_bn_train(x: torch.Tensor, conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d, in_scale=None, in_shift=None,
                  in_centre=None):
    """One training unit ``bn(conv(act_in(x)))`` in folded form: returns ``(y_raw, scale, shift, mean)`` with
    ``bn(conv(...)) == y_raw*scale + shift`` (never materialised; the next conv's prologue or the tail op
    applies it) and updates ``bn``'s running statistics. ``x`` must already be in the activation dtype;
    ``in_scale``/``in_shift``/``in_centre``: the previous unit's (scale, shift, detached mean), fp32 [C], or None.

    A :class:`~resnet_fast.nn.SyncBatchNorm2d` that syncs merges the kernel's per-rank statistics into the
    global batch's (one all-gather of [2C+1] values, differentiable), so the fused path serves synced BN too."""
    with conv_scope(conv):
        y, mean, invstd = conv_bn_stats(x, conv.weight.to(x.dtype), in_scale, in_shift, in_centre,
                                        stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                                        groups=conv.groups, eps=bn.eps)
    count = y.shape[0] * y.shape[2] * y.shape[3]
    if isinstance(bn, SyncBatchNorm2d) and bn.syncs():
        mean, invstd, count = sync_batch_stats(mean, invstd, count, bn.eps, bn.process_group)
    update_bn_running_stats(bn, mean, invstd, count)
    scale, shift = bn_affine(mean, invstd, bn.weight, bn.bias)
    return y, scale, shift, mean


def block_forward_train_kernels(block, x: torch.Tensor) -> torch.Tensor:
    """Train-mode forward of a torchvision-structured BasicBlock/Bottleneck on the kernels.

    Args: ``block`` with conv1/bn1/conv2/bn2[/conv3/bn3] (``nn.Conv2d`` without bias, train-mode
    ``nn.BatchNorm2d``) and ``downsample`` None, ``Sequential(Conv2d, BatchNorm2d)`` or a parameter-free module;
    ``x`` ``[N, C, H, W]`` float32/float16/bfloat16 (or under autocast). Returns ``[N, K, P, Q]`` channels_last in
    the activation dtype; running statistics of every BN are updated as ``nn.BatchNorm2d`` would.
    """
    dt = activation_dtype(x)
    xa = x.to(dt).contiguous(memory_format=torch.channels_last)
    pairs = block_pairs(block)
    y, scale, shift, mean = conv_bn_train(xa, *pairs[0])
    for conv, bn in pairs[1:]:
        y, scale, shift, mean = conv_bn_train(y, conv, bn, scale, shift, _centre(mean))
    ds = block.downsample
    ds_pair = downsample_pair(ds)
    res_scale = res_shift = res_centre = None
    if ds is None:
        residual = xa
    elif ds_pair is not None:
        residual, res_scale, res_shift, res_mean = conv_bn_train(xa, *ds_pair)
        res_centre = _centre(res_mean)
    else:  # parameter-free shortcut (CIFAR option A): nothing to fuse
        residual = ds(xa).to(dt).contiguous(memory_format=torch.channels_last)
    # An identity / parameter-free residual has no BN, so no res_scale gradient to centre.
    return bn_add_relu(y, scale, shift, residual, res_scale, res_shift, relu=True, x_centre=_centre(mean),
                       res_centre=res_centre)


def conv_bn_act_train_kernels(x: torch.Tensor, conv, bn, relu: bool = True) -> torch.Tensor:
    """Train-mode ``act(bn(conv(x)))`` (the stem), materialised: a module boundary follows, so the folded
    affine cannot ride on a later prologue. The affine + ReLU is applied by ``bn_relu``, the tail op's kernels
    instantiated without a residual: one read of y and one write in the forward, and a backward that reads
    (grad, y) and writes only grad_y plus the per-channel sums -- no zero residual is allocated, read or
    differentiated.

    Returns ``[N, K, P, Q]`` channels_last in the activation dtype (autocast dtype under autocast).
    """
    dt = activation_dtype(x)
    xa = x.to(dt).contiguous(memory_format=torch.channels_last)
    y, scale, shift, mean = conv_bn_train(xa, conv, bn)
    return bn_relu(y, scale, shift, relu=relu, x_centre=_centre(mean))
