"""Synchronised BatchNorm through torch.distributed, CPU-capable (unlike torch.nn.SyncBatchNorm).

One mechanism serves both paths: each rank computes its own per-channel (mean, invstd) -- the training kernels
(``conv_bn_stats``) on the fused path, ``torch.var_mean`` in :class:`SyncBatchNorm2d`'s own forward -- and
:func:`sync_batch_stats` merges them into the global batch's with ONE all-gather of a packed [2C+1] vector
(Chan's merge in float64). It is differentiable: the backward all-reduces the gradient of the gathered
statistics (one collective), so every rank's input gradient is that of the global batch, while weight/bias
gradients stay local, as in ``torch.nn.SyncBatchNorm``, for DDP to reduce. Running statistics follow
BatchNorm2d's rule with the global count (``ops.conv_bn_train.update_running_stats``).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as tnn

from ..ops.conv_bn_train import bn_affine, update_running_stats


_DIMS = (0, 2, 3)  # every dim but channels


def _bcast(t):
    return t.view(1, -1, 1, 1)


class _AllGather(torch.autograd.Function):
    """``[world, *t.shape]`` of every rank's ``t``; backward all-reduces the gradient (each rank's loss depends
    on every rank's ``t``) and keeps this rank's row. Plain all_gather + all_reduce: gloo has no reduce_scatter."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, t.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[dist.get_rank(ctx.group)], None


def sync_batch_stats(mean, invstd, count: int, eps: float, group=None):
    """Global-batch BatchNorm statistics from each rank's local ones, differentiably.

    Args: ``mean``, ``invstd`` fp32 ``[C]`` of this rank's batch (biased variance, ``invstd = (var+eps)^-1/2``);
    ``count`` values per channel on this rank; the BN's ``eps``. One collective (an all-gather of a packed
    ``[2C+1]`` vector); Chan's merge ``var = Σ n_r (var_r + (mean_r - mean)²) / N`` in float64, free of the
    ``E[y²] - mean²`` cancellation. Returns ``(mean, invstd, N)``: fp32 ``[C]`` and the global count as a
    0-d float64 device tensor (no host sync). Gradients reach every rank's ``mean``/``invstd``.
    """
    c = mean.shape[0]
    var = invstd.double().pow(-2) - eps
    n = torch.full((1,), float(count), dtype=torch.float64, device=mean.device)
    rows = _AllGather.apply(torch.cat([mean.double(), var, n]), group)  # [world, 2C+1]
    counts = rows[:, -1:]
    total = counts.sum()
    g_mean = (rows[:, :c] * counts).sum(0) / total
    g_var = ((rows[:, c:2 * c] + (rows[:, :c] - g_mean) ** 2) * counts).sum(0) / total
    return g_mean.float(), torch.rsqrt(g_var + eps).float(), total.detach()


def _global_stats(x, eps: float, group):
    """(mean, invstd, count) of ``x`` [N, C, H, W] over every rank's batch: this rank's fp32 statistics merged
    by :func:`sync_batch_stats` (differentiable)."""
    var, mean = torch.var_mean(x.float(), dim=_DIMS, unbiased=False)
    return sync_batch_stats(mean, torch.rsqrt(var + eps), x.numel() // x.shape[1], eps, group)


def _normalize(x, mean, invstd, weight, bias):
    scale, shift = bn_affine(mean, invstd, weight, bias)
    return (x.float() * _bcast(scale) + _bcast(shift)).to(x.dtype)


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
        update_running_stats(self, mean, invstd, n)  # BatchNorm2d's rule, with the global count
        return _normalize(x, mean, invstd, self.weight, self.bias)


def retype(module: tnn.Module, cls: type) -> tnn.Module:
    """A new module of class ``cls`` that SHARES ``module``'s parameters, buffers, submodules and attributes.

    Parameters are the same objects (an optimiser built before keeps working) and the state_dict is unchanged.
    """
    new = cls.__new__(cls)
    state = dict(module.__dict__)
    for key in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
        if key in state:
            state[key] = type(state[key])(state[key])  # own containers, same tensors
    new.__dict__.update(state)
    return new


def to_sync_batch_norm(bn: tnn.BatchNorm2d, process_group=None) -> SyncBatchNorm2d:
    """``bn`` as a SyncBatchNorm2d sharing its parameters and buffers."""
    new = retype(bn, SyncBatchNorm2d)
    new.process_group = process_group
    return new
