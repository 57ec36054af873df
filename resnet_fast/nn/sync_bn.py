"""Synchronised BatchNorm through torch.distributed, CPU-capable (unlike torch.nn.SyncBatchNorm).

One mechanism serves both paths: each rank computes its own per-channel (mean, invstd) -- the training kernels
(``conv_bn_stats``) on the fused path, ``torch.var_mean`` in :class:`SyncBatchNorm2d`'s own forward -- and
:func:`resnet_fast.ops.sync_batch_stats` merges them into the global batch's with ONE all-gather of a packed
[2C+1] vector (Chan's merge in float64). It is differentiable: the backward all-reduces the gradient of the
gathered statistics (one collective), so every rank's input gradient is that of the global batch, while
weight/bias gradients stay local, as in ``torch.nn.SyncBatchNorm``, for DDP to reduce. Running statistics follow
BatchNorm2d's rule with the global count (:func:`update_bn_running_stats`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as tnn

from ..ops import bn_affine, sync_batch_stats, update_running_stats

__all__ = ["SyncBatchNorm2d", "sync_batch_norm", "sync_batch_stats", "update_bn_running_stats"]


_DIMS = (0, 2, 3)  # every dim but channels


def _per_channel(t):
    return t.view(1, -1, 1, 1)


def update_bn_running_stats(bn: tnn.BatchNorm2d, mean: torch.Tensor, invstd: torch.Tensor, count) -> None:
    """``bn``'s train-mode running-statistics update from this batch's ``mean``/``invstd`` (fp32 [C]) over
    ``count`` values per channel (an int, or a 0-d device tensor: a synced BN's global count), by BatchNorm2d's
    rule (:func:`resnet_fast.ops.update_running_stats`). Nothing when ``bn`` is in eval mode or does not track
    running statistics."""
    if not bn.training or not bn.track_running_stats or bn.running_mean is None:
        return
    update_running_stats(bn.running_mean, bn.running_var, bn.num_batches_tracked, mean, invstd, count,
                         momentum=bn.momentum, eps=bn.eps)


def _global_stats(x, eps: float, group):
    """(mean, invstd, count) of ``x`` [N, C, H, W] over every rank's batch: this rank's fp32 statistics merged
    by :func:`sync_batch_stats` (differentiable)."""
    var, mean = torch.var_mean(x.float(), dim=_DIMS, unbiased=False)
    return sync_batch_stats(mean, torch.rsqrt(var + eps), x.numel() // x.shape[1], eps, group)


def _normalize(x, mean, invstd, weight, bias):
    scale, shift = bn_affine(mean, invstd, weight, bias)
    return (x.float() * _per_channel(scale) + _per_channel(shift)).to(x.dtype)


def sync_batch_norm(x, weight, bias, eps, group=None):
    """Batch-normalise ``x`` with global-batch statistics; returns (y, mean, biased var, global count).
    Autograd reaches every rank's input through the statistics' all-gather (one collective each way)."""
    mean, invstd, n = _global_stats(x, eps, group)
    var = (invstd.double().pow(-2) - eps).float()
    return _normalize(x, mean, invstd, weight, bias), mean, var, n


def _distributed(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


class SyncBatchNorm2d(tnn.BatchNorm2d):
    """A BatchNorm2d whose batch statistics span all ranks of ``process_group`` (the default group if None).

    Same parameters, buffers and state_dict as BatchNorm2d. Outside a multi-rank process group, or when
    running stats are used (eval), it is BatchNorm2d.
    """

    process_group = None

    def syncs(self) -> bool:
        """Whether this forward normalises with cross-rank batch statistics (training, or no running stats,
        inside a multi-rank process group)."""
        return (self.training or self.running_mean is None) and _distributed(self.process_group)

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError(f"SyncBatchNorm2d: expected a 4-D input, got shape {tuple(x.shape)}")
        if not self.syncs():
            return super().forward(x)
        mean, invstd, n = _global_stats(x, self.eps, self.process_group)
        update_bn_running_stats(self, mean, invstd, n)  # BatchNorm2d's rule, with the global count
        return _normalize(x, mean, invstd, self.weight, self.bias)
