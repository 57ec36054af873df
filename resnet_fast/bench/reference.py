"""torch.nn reference blocks and models for the eager/compile rows and for numerics checks.

torchvision's classes where torchvision imports (the GPU machine), else ``resnet_fast.nn.reference``, the
package's plain-PyTorch mirror of torchvision (same structure, state_dict keys and init). Either way the
reference is made of torch.nn layers only.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..nn import reference as _mirror
from . import shapes

_src, SOURCE = _mirror.plain_classes()


def block_classes():
    """(BasicBlock, Bottleneck) of torchvision when available, else of the mirror."""
    return _src.BasicBlock, _src.Bottleneck


def downsample(shape: shapes.BlockShape) -> Optional[nn.Module]:
    """torchvision's downsample branch: 1x1 strided conv + BN."""
    if not shape.downsample:
        return None
    return nn.Sequential(_mirror.conv1x1(shape.inplanes, shape.out_channels, shape.stride),
                         nn.BatchNorm2d(shape.out_channels))


def randomize_bn(module: nn.Module, generator: Optional[torch.Generator] = None) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so folded-BN epilogues are really exercised."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_(0, 0.1, generator=generator)
                m.running_var.uniform_(0.5, 1.5, generator=generator)
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.normal_(0, 0.1, generator=generator)
    return module


def block(shape: shapes.BlockShape) -> nn.Module:
    """A reference block with torchvision's constructor arguments for ``shape``."""
    basic, bottleneck = block_classes()
    cls = basic if shape.kind == "basic" else bottleneck
    return randomize_bn(cls(shape.inplanes, shape.planes, shape.stride, downsample(shape), groups=shape.groups,
                            base_width=shape.base_width))


def model(name: str, num_classes: int = 1000) -> nn.Module:
    """The reference network ``name`` of ``shapes.ARCHS`` (torchvision's ResNet class when importable, else
    the mirror's), untrained weights, randomized BN statistics."""
    if name not in shapes.ARCHS:
        raise ValueError(f"unknown model {name!r}")
    arch = shapes.ARCHS[name]
    blk = _src.BasicBlock if arch.block == "basic" else _src.Bottleneck
    m = _src.ResNet(blk, list(arch.layers), num_classes=num_classes, groups=arch.groups,
                    width_per_group=arch.width_per_group)
    return randomize_bn(m)
