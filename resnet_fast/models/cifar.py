"""The CIFAR-10 ResNets of He et al. 2016 (sec. 4.2): resnet20/32/44/56/110 and the 1202-layer resnet1202.

Three stages of 16/32/64 channels at 32/16/8 pixels, ``n`` BasicBlocks each, 6n+2 weighted layers. The shortcut
that changes shape is option A of the paper by default: the strided identity zero-padded with extra channels
(:class:`ZeroPadShortcut`, no parameters), which is what gives the paper's parameter counts
(0.27M / 0.46M / 0.66M / 0.85M / 1.7M / 19.4M). ``shortcut="B"`` uses a 1x1 conv + BN projection instead.
State_dict keys follow torchvision's naming: conv1, bn1, layer{1,2,3}.i.conv1/bn1/conv2/bn2, fc.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..nn import reference


class ZeroPadShortcut(nn.Module):
    """Option A shortcut: ``x[:, :, ::stride, ::stride]`` with zero channels added (half before, half after)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        if out_planes < in_planes:
            raise ValueError(f"ZeroPadShortcut: out_planes={out_planes} < in_planes={in_planes}")
        self.in_planes, self.out_planes, self.stride = in_planes, out_planes, stride

    def forward(self, x):
        extra = self.out_planes - self.in_planes
        x = x[:, :, ::self.stride, ::self.stride]
        return nn.functional.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))

    def extra_repr(self):
        return f"{self.in_planes}->{self.out_planes}, stride={self.stride}"


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images. ``fused=True`` converts itself to the fused blocks and stem."""

    def __init__(self, depth: int = 20, num_classes: int = 10, zero_init_residual: bool = False,
                 shortcut: str = "A", fused: bool = True):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CifarResNet: depth must be 6n+2 with n >= 1, got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"CifarResNet: shortcut must be 'A' or 'B', got {shortcut!r}")
        n = (depth - 2) // 6
        self.shortcut = shortcut
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, n, 1)
        self.layer2 = self._make_layer(32, n, 2)
        self.layer3 = self._make_layer(64, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)
        reference.init_weights(self, zero_init_residual, (reference.BasicBlock,))
        if fused:
            from ..convert import convert
            convert(self, inplace=True)

    def _make_layer(self, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            if self.shortcut == "A":
                downsample = ZeroPadShortcut(self.inplanes, planes, stride)
            else:
                downsample = nn.Sequential(reference.conv1x1(self.inplanes, planes, stride), nn.BatchNorm2d(planes))
        layers = [reference.BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [reference.BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _cifar(depth):
    def build(*, num_classes: int = 10, zero_init_residual: bool = False, shortcut: str = "A", fused: bool = True):
        return CifarResNet(depth, num_classes, zero_init_residual, shortcut, fused)
    build.__name__ = f"resnet{depth}"
    build.__doc__ = f"CIFAR ResNet-{depth} of He et al. (fused unless ``fused=False``)."
    return build


resnet20, resnet32, resnet44, resnet56, resnet110, resnet1202 = (_cifar(d) for d in (20, 32, 44, 56, 110, 1202))
