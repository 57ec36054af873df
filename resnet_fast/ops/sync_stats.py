"""Cross-rank BatchNorm statistics: each rank's per-channel (mean, invstd) merged into the global batch's.

Tensors in, tensors out, through torch.distributed (CPU-capable: gloo works). One all-gather of a packed
``[2C+1]`` vector per call, Chan's merge in float64, differentiable: the backward all-reduces the gradient of the
gathered statistics (one collective), so every rank's input gradient is that of the global batch. The modules
that use it (:class:`resnet_fast.nn.SyncBatchNorm2d` and the fused training path) live in :mod:`resnet_fast.nn`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["sync_batch_stats"]


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
    ``count`` values per channel on this rank; the BN's ``eps``; the process ``group`` (None: the default).
    One collective (an all-gather of a packed ``[2C+1]`` vector); Chan's merge
    ``var = Σ n_r (var_r + (mean_r - mean)²) / N`` in float64, free of the ``E[y²] - mean²`` cancellation.
    Returns ``(mean, invstd, N)``: fp32 ``[C]`` and the global count as a 0-d float64 device tensor (no host
    sync). Gradients reach every rank's ``mean``/``invstd``.
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
