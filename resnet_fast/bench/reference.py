"""torch.nn reference blocks and models for the eager/compile rows and for numerics checks.

Order of preference: torchvision (the GPU machine has it), then ``resnet_fast.models.reference`` (the package's
plain-PyTorch mirror of torchvision), and only when neither imports, the minimal stand-in below with
torchvision's structure and state_dict keys (ResNet v1.5: stride on the 3x3 conv). It is a reference, not a
model zoo.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import shapes


def _find_source():
    try:  # prefer the real thing
        from torchvision.models import resnet as tv
        return tv, "torchvision"
    except Exception:  # noqa: BLE001  (missing or broken: try the next one)
        pass
    try:
        from resnet_fast.models import reference as mirror
        if all(hasattr(mirror, n) for n in ("BasicBlock", "Bottleneck", "ResNet")):
            return mirror, "resnet_fast.models.reference"
    except Exception:  # noqa: BLE001
        pass
    return None, "resnet_fast.bench.reference"


_tv, SOURCE = _find_source()


def _conv3x3(cin, cout, stride=1, groups=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False)


def _conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample: Optional[nn.Module] = None, groups=1,
                 base_width=64, dilation=1, norm_layer=None):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self.conv1, self.bn1 = _conv3x3(inplanes, planes, stride), norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = _conv3x3(planes, planes), norm_layer(planes)
        self.downsample, self.stride = downsample, stride

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample: Optional[nn.Module] = None, groups=1,
                 base_width=64, dilation=1, norm_layer=None):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1, self.bn1 = _conv1x1(inplanes, width), norm_layer(width)
        self.conv2, self.bn2 = _conv3x3(width, width, stride, groups), norm_layer(width)
        self.conv3, self.bn3 = _conv1x1(width, planes * self.expansion), norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample, self.stride = downsample, stride

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


def block_classes():
    """(BasicBlock, Bottleneck) of torchvision when available, else the stand-ins above."""
    return (_tv.BasicBlock, _tv.Bottleneck) if _tv is not None else (BasicBlock, Bottleneck)


def downsample(shape: shapes.BlockShape) -> Optional[nn.Module]:
    """torchvision's downsample branch: 1x1 strided conv + BN."""
    if not shape.downsample:
        return None
    return nn.Sequential(_conv1x1(shape.inplanes, shape.out_channels, shape.stride),
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


class ResNet(nn.Module):
    """torchvision's ResNet structure (stem, four stages, avgpool, fc) for the architectures in shapes.ARCHS."""

    def __init__(self, model: str, num_classes: int = 1000):
        super().__init__()
        arch = shapes.ARCHS[model]
        blk = BasicBlock if arch.block == "basic" else Bottleneck
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(64), nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        specs = shapes.all_blocks(model)
        i = 0
        for stage, n in enumerate(arch.layers, start=1):
            mods = []
            for s in specs[i:i + n]:
                mods.append(blk(s.inplanes, s.planes, s.stride, downsample(s), s.groups, s.base_width))
            setattr(self, f"layer{stage}", nn.Sequential(*mods))
            i += n
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * arch.expansion, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def model(name: str, num_classes: int = 1000) -> nn.Module:
    """The reference network ``name`` built from ``shapes.ARCHS`` (torchvision's ResNet class when importable),
    untrained weights, randomized BN statistics."""
    if name not in shapes.ARCHS:
        raise ValueError(f"unknown model {name!r}")
    if _tv is not None:
        arch = shapes.ARCHS[name]
        blk = _tv.BasicBlock if arch.block == "basic" else _tv.Bottleneck
        m = _tv.ResNet(blk, list(arch.layers), num_classes=num_classes, groups=arch.groups,
                       width_per_group=arch.width_per_group)
    else:
        m = ResNet(name, num_classes)
    return randomize_bn(m)
