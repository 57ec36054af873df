"""Shapes of ResNet-18/50 and ResNeXt-50, derived from the architecture config (one source of truth).

The config is torchvision's: block type, blocks per stage, groups and width per group; stage ``i`` has
``planes = 64 * 2**i`` and stride 2 from stage 2 on, carried by the 3x3 conv of a Bottleneck (ResNet v1.5).
Every benchmark (CLI suites, ``benchmarks/test_blocks.py``, the CPU demo) walks the network through
:func:`blocks` / :func:`convs` / :func:`tails` instead of keeping hand-copied lists. ``width`` and
``resolution`` scale the network down for the CPU demo with the same derivation.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict


@dataclasses.dataclass(frozen=True)
class Arch:
    block: str  # "basic" or "bottleneck"
    layers: tuple[int, int, int, int]
    groups: int = 1
    width_per_group: int = 64

    @property
    def expansion(self) -> int:
        return 1 if self.block == "basic" else 4


ARCHS = {
    "resnet18": Arch("basic", (2, 2, 2, 2)),
    "resnet50": Arch("bottleneck", (3, 4, 6, 3)),
    "resnext50_32x4d": Arch("bottleneck", (3, 4, 6, 3), groups=32, width_per_group=4),
}


@dataclasses.dataclass(frozen=True)
class ConvShape:
    """One convolution: input channels/size, output channels, kernel, stride, padding, groups."""
    cin: int
    cout: int
    k: int
    stride: int
    padding: int
    groups: int
    h: int
    w: int

    @property
    def out_hw(self) -> tuple[int, int]:
        return ((self.h + 2 * self.padding - self.k) // self.stride + 1,
                (self.w + 2 * self.padding - self.k) // self.stride + 1)

    @property
    def name(self) -> str:
        g = f",g{self.groups}" if self.groups > 1 else ""
        return f"conv{self.k}x{self.k} {self.cin}->{self.cout} s{self.stride}{g} @{self.h}x{self.w}"

    def flops(self, batch: int) -> int:
        """Multiply-adds x 2 of the forward pass."""
        ho, wo = self.out_hw
        return 2 * batch * self.cout * ho * wo * (self.cin // self.groups) * self.k * self.k

    def elements(self, batch: int) -> tuple[int, int, int]:
        """(input, weight, output) element counts: the compulsory traffic of one forward."""
        ho, wo = self.out_hw
        return (batch * self.cin * self.h * self.w, self.cout * (self.cin // self.groups) * self.k * self.k,
                batch * self.cout * ho * wo)


@dataclasses.dataclass(frozen=True)
class BlockShape:
    """One residual block with torchvision's constructor arguments and its input size."""
    kind: str  # "basic" or "bottleneck"
    inplanes: int
    planes: int
    stride: int
    downsample: bool
    groups: int
    base_width: int
    h: int
    w: int
    expansion: int

    @property
    def width(self) -> int:
        """Channels of the 3x3 conv (torchvision: planes * base_width/64 * groups)."""
        return int(self.planes * (self.base_width / 64.0)) * self.groups

    @property
    def out_channels(self) -> int:
        return self.planes * self.expansion

    @property
    def out_hw(self) -> tuple[int, int]:
        return ((self.h - 1) // self.stride + 1, (self.w - 1) // self.stride + 1)

    @property
    def name(self) -> str:
        g = f" g{self.groups}x{self.base_width}" if self.groups > 1 else ""
        ds = " +ds" if self.downsample else ""
        return f"{self.kind} {self.inplanes}->{self.out_channels} s{self.stride}{g}{ds} @{self.h}x{self.w}"

    def convs(self) -> list[ConvShape]:
        """The block's convolutions in torchvision order (downsample last)."""
        h, w, s = self.h, self.w, self.stride
        ho, wo = self.out_hw
        if self.kind == "basic":
            out = [ConvShape(self.inplanes, self.planes, 3, s, 1, 1, h, w),
                   ConvShape(self.planes, self.planes, 3, 1, 1, 1, ho, wo)]
        else:
            out = [ConvShape(self.inplanes, self.width, 1, 1, 0, 1, h, w),
                   ConvShape(self.width, self.width, 3, s, 1, self.groups, h, w),
                   ConvShape(self.width, self.out_channels, 1, 1, 0, 1, ho, wo)]
        if self.downsample:
            out.append(ConvShape(self.inplanes, self.out_channels, 1, s, 0, 1, h, w))
        return out

    def flops(self, batch: int) -> int:
        return sum(c.flops(batch) for c in self.convs())


@dataclasses.dataclass(frozen=True)
class TailShape:
    """The residual tail ``relu(bn(x) + residual)`` at the end of a stage's blocks (NCHW sizes)."""
    stage: int
    c: int
    h: int
    w: int
    residual_bn: bool  # True for the first block of a stage, whose residual is the downsample BN

    @property
    def name(self) -> str:
        return f"layer{self.stage} {self.c}x{self.h}x{self.w}" + (" +res_bn" if self.residual_bn else "")

    def elements(self, batch: int) -> int:
        return batch * self.c * self.h * self.w


def _arch(model: str) -> Arch:
    try:
        return ARCHS[model]
    except KeyError:
        raise ValueError(f"unknown model {model!r}: expected one of {', '.join(ARCHS)}") from None


def stem(model: str, resolution: int = 224, width: int = 64) -> ConvShape:
    """The 7x7 stride-2 stem convolution (RGB input)."""
    _arch(model)
    return ConvShape(3, width, 7, 2, 3, 1, resolution, resolution)


def all_blocks(model: str, resolution: int = 224, width: int = 64) -> list[BlockShape]:
    """Every block of the network in order (with repeats), as torchvision's ``_make_layer`` builds them."""
    arch = _arch(model)
    h = stem(model, resolution, width).out_hw[0]
    h = (h + 2 - 3) // 2 + 1  # maxpool 3x3 s2 p1
    inplanes = width
    # base_width is a ratio to 64 (torchvision), so it does not change when ``width`` scales the planes.
    base_width = arch.width_per_group
    out = []
    for i, n in enumerate(arch.layers):
        planes = width * 2 ** i
        for j in range(n):
            stride = 2 if (i > 0 and j == 0) else 1
            ds = j == 0 and (stride != 1 or inplanes != planes * arch.expansion)
            out.append(BlockShape(arch.block, inplanes, planes, stride, ds, arch.groups, base_width, h, h,
                                  arch.expansion))
            h = (h - 1) // stride + 1
            inplanes = planes * arch.expansion
    return out


def _distinct(items):
    """Distinct items in first-seen order, with how many times each occurs."""
    counts: OrderedDict = OrderedDict()
    for it in items:
        counts[it] = counts.get(it, 0) + 1
    return counts


def blocks(model: str, resolution: int = 224, width: int = 64) -> "OrderedDict[BlockShape, int]":
    """Distinct blocks of the network -> number of occurrences."""
    return _distinct(all_blocks(model, resolution, width))


def all_convs(model: str, resolution: int = 224, width: int = 64) -> list[ConvShape]:
    """Every convolution of the network in order, stem first (the fc layer is not a conv)."""
    return [stem(model, resolution, width)] + [c for b in all_blocks(model, resolution, width) for c in b.convs()]


def convs(model: str, resolution: int = 224, width: int = 64) -> "OrderedDict[ConvShape, int]":
    """Distinct convolutions of the network -> number of occurrences."""
    return _distinct(all_convs(model, resolution, width))


def tails(model: str, resolution: int = 224, width: int = 64) -> "OrderedDict[TailShape, int]":
    """Distinct residual tails (one per stage and residual kind) -> number of occurrences."""
    stage_of, out = {}, []
    for b in all_blocks(model, resolution, width):
        # A new stage starts where the output channel count changes or the spatial size halves.
        key = (b.out_channels,) + b.out_hw
        stage = stage_of.setdefault(key, len(stage_of) + 1)
        out.append(TailShape(stage, b.out_channels, *b.out_hw, residual_bn=b.downsample))
    return _distinct(out)


def model_flops(model: str, batch: int, resolution: int = 224, num_classes: int = 1000) -> int:
    """Forward FLOPs of the whole network: every conv plus the fc layer (pooling/BN/ReLU not counted)."""
    arch = _arch(model)
    fc = 2 * batch * 512 * arch.expansion * num_classes
    return sum(c.flops(batch) for c in all_convs(model, resolution)) + fc
