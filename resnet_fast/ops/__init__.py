"""Custom ops (torch.library) with autograd and fake implementations.

The op layer takes tensors and numbers only (never an ``nn.Module``) and imports nothing from
:mod:`resnet_fast.nn`; the module-level paths built on these ops are in :mod:`resnet_fast.nn`.
"""
from .bn_add_relu import bn_add_relu, bn_relu
from .conv import conv2d, fold_bn
from .conv_bn_train import bn_affine, conv_bn_stats, update_running_stats
from .sync_stats import sync_batch_stats

__all__ = ["bn_add_relu", "bn_relu", "conv2d", "fold_bn", "conv_bn_stats", "bn_affine", "update_running_stats",
           "sync_batch_stats"]
