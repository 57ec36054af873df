"""Fused modules with torchvision's parameter names, so a torchvision checkpoint loads as is.

Each holds ordinary ``nn.Conv2d`` / ``nn.BatchNorm2d`` submodules; only ``forward`` differs, and it lives in
:mod:`resnet_fast.nn.functional` (kernels in eval, the training path in train, eager under the eager backend).
"""
from __future__ import annotations

import torch.nn as tnn

from . import functional as F
from . import reference
from .sync_bn import SyncBatchNorm2d


class ConvBNReLU(tnn.Module):
    """``relu(bn(conv(x)))`` (ReLU optional) as one kernel conv in eval. Keys: ``conv.*``, ``bn.*``."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=None, dilation=1, groups=1,
                 relu=True, norm_layer=None):
        super().__init__()
        if padding is None:
            padding = dilation * (kernel_size - 1) // 2
        self.conv = tnn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                               dilation=dilation, groups=groups, bias=False)
        self.bn = (norm_layer or tnn.BatchNorm2d)(out_channels)
        self.relu = bool(relu)

    def forward(self, x):
        return F.conv_bn_act(x, self.conv, self.bn, relu=self.relu, who="ConvBNReLU")


class _FusedBlock:
    """Mixin over a plain reference block: its constructor, children and state_dict, with the fused forward."""

    _child_order: tuple = ()  # torchvision's registration order (state_dict order)

    def forward(self, x):
        return F.block_forward(self, x)

    @classmethod
    def from_block(cls, block: tnn.Module) -> "_FusedBlock":
        """A fused block that SHARES ``block``'s conv/bn/downsample modules (same Parameters and buffers)."""
        new = cls.__new__(cls)
        tnn.Module.__init__(new)
        for name in cls._child_order:
            child = tnn.ReLU(inplace=True) if name == "relu" else getattr(block, name)
            setattr(new, name, child)  # registration order = torchvision's, so state_dict order is kept
        new.stride = getattr(block, "stride", new.conv1.stride[0])
        new.training = block.training
        return new


class BasicBlock(_FusedBlock, reference.BasicBlock):
    """torchvision's BasicBlock (same signature, children and state_dict), fused forward."""

    _child_order = ("conv1", "bn1", "relu", "conv2", "bn2", "downsample")


class Bottleneck(_FusedBlock, reference.Bottleneck):
    """torchvision's Bottleneck (ResNet v1.5: stride on the 3x3 conv), fused forward."""

    _child_order = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "relu", "downsample")


# --------------------------------------------------------------------------------------------------- stem
class _Folded:
    """A BatchNorm whose math the preceding :class:`FusedStemConv` computes: same state, pass-through forward."""

    def forward(self, x):
        return x

    def normalize(self, x):
        return super(_Folded, self).forward(x)  # the real BatchNorm2d / SyncBatchNorm2d forward


class FoldedBatchNorm2d(_Folded, tnn.BatchNorm2d):
    pass


class FoldedSyncBatchNorm2d(_Folded, SyncBatchNorm2d):
    pass


class FusedStemConv(tnn.Conv2d):
    """The stem's ``conv1`` computing conv1 + bn1 + ReLU, so a ResNet's own forward and state_dict stay as they
    are: ``bn1`` becomes a :class:`FoldedBatchNorm2d` (pass-through, same state) and ``relu`` an Identity.

    Built (and taken apart) by :func:`resnet_fast.convert` / :func:`resnet_fast.revert`, which set three
    unregistered attributes: ``_stem_bn``, the model's (folded) ``bn1`` module, reached by reference so that
    ``.to()``, ``.half()`` and ``load_state_dict`` on the model are seen here; ``_stem_relu``, the activation
    module that revert puts back; ``_stem_act``, its attribute name on the model (``relu`` or ``act1``).
    """

    def forward(self, x):
        bn = self._stem_bn
        return F.conv_bn_act(x, self, bn, relu=True, bn_forward=bn.normalize, who="ResNet stem")
