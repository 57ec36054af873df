"""Fused modules with torchvision's state_dict names: ConvBNReLU, BasicBlock, Bottleneck, SyncBatchNorm2d."""
from . import functional
from .modules import (BasicBlock, Bottleneck, ConvBNReLU, FoldedBatchNorm2d, FoldedSyncBatchNorm2d,
                      FusedStemConv)
from .sync_bn import SyncBatchNorm2d, sync_batch_norm

__all__ = ["functional", "ConvBNReLU", "BasicBlock", "Bottleneck", "FusedStemConv", "FoldedBatchNorm2d",
           "FoldedSyncBatchNorm2d", "SyncBatchNorm2d", "sync_batch_norm"]
