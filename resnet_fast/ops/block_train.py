"""Training forwards of a ResNet block and of a conv+BN+ReLU (the stem) on the training op.

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

from .bn_add_relu import bn_add_relu, bn_relu
from .conv_bn_train import conv_bn_train

__all__ = ["block_forward_train_kernels", "conv_bn_act_train_kernels"]

CL = torch.channels_last


def _act_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _centre(mean: torch.Tensor) -> torch.Tensor:
    # The batch mean as a centre (the next conv's in_centre, the tail op's x_centre/res_centre): it only sets the
    # rounding of the backward sums, so no gradient.
    return mean.detach().contiguous()


def _pairs(block) -> list:
    pairs = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
    if getattr(block, "conv3", None) is not None:
        pairs.append((block.conv3, block.bn3))
    return pairs


def block_forward_train_kernels(block, x: torch.Tensor) -> torch.Tensor:
    """Train-mode forward of a torchvision-structured BasicBlock/Bottleneck on the kernels.

    Args: ``block`` with conv1/bn1/conv2/bn2[/conv3/bn3] (``nn.Conv2d`` without bias, train-mode
    ``nn.BatchNorm2d``) and ``downsample`` None, ``Sequential(Conv2d, BatchNorm2d)`` or a parameter-free module;
    ``x`` ``[N, C, H, W]`` float32/float16/bfloat16 (or under autocast). Returns ``[N, K, P, Q]`` channels_last in
    the activation dtype; running statistics of every BN are updated as ``nn.BatchNorm2d`` would.
    """
    dt = _act_dtype(x)
    xa = x.to(dt).contiguous(memory_format=CL)
    pairs = _pairs(block)
    y, scale, shift, mean = conv_bn_train(xa, *pairs[0])
    for conv, bn in pairs[1:]:
        y, scale, shift, mean = conv_bn_train(y, conv, bn, scale, shift, _centre(mean))
    ds = block.downsample
    res_scale = res_shift = res_centre = None
    if ds is None:
        residual = xa
    elif isinstance(ds, torch.nn.Sequential) and len(ds) == 2 and isinstance(ds[0], torch.nn.Conv2d) \
            and isinstance(ds[1], torch.nn.BatchNorm2d):
        residual, res_scale, res_shift, res_mean = conv_bn_train(xa, ds[0], ds[1])
        res_centre = _centre(res_mean)
    else:  # parameter-free shortcut (CIFAR option A): nothing to fuse
        residual = ds(xa).to(dt).contiguous(memory_format=CL)
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
    dt = _act_dtype(x)
    y, scale, shift, mean = conv_bn_train(x.to(dt).contiguous(memory_format=CL), conv, bn)
    return bn_relu(y, scale, shift, relu=relu, x_centre=_centre(mean))
