"""Synchronised BatchNorm through torch.distributed, CPU-capable (unlike torch.nn.SyncBatchNorm).

Forward all-reduces each layer's per-channel (sum, sum of squares) and the element count in ONE collective
(a packed [2C+1] float32 tensor), so batch statistics and running stats are those of the global batch. Backward
all-reduces the two per-channel gradient sums (sum dy, sum dy*xhat) in one collective, so the input gradient is
that of the global batch; weight/bias gradients stay local, as in SyncBatchNorm, for DDP to reduce.

The training kernels (``conv_bn_stats``) compute each rank's statistics themselves; :func:`sync_batch_stats`
merges those per-rank (mean, var, count) into the global batch's in one differentiable all-gather, so the
kernel path stays fused under ``convert(sync_bn=True)``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as tnn


_DIMS = (0, 2, 3)  # every dim but channels


def _bcast(t):
    return t.view(1, -1, 1, 1)


class _SyncBatchNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, group):
        c = x.shape[1]
        xf = x.float()
        count = torch.full((1,), float(x.numel() // c), dtype=torch.float32, device=x.device)
        packed = torch.cat([xf.sum(_DIMS), (xf * xf).sum(_DIMS), count])
        dist.all_reduce(packed, group=group)  # the one forward collective
        n = packed[-1].clone()
        mean = packed[:c] / n
        var = (packed[c:2 * c] / n - mean * mean).clamp_min(0)  # biased, as BN normalises with
        invstd = torch.rsqrt(var + eps)
        xhat = (xf - _bcast(mean)) * _bcast(invstd)
        y = xhat
        if weight is not None:
            y = y * _bcast(weight.float()) + _bcast(bias.float())
        ctx.save_for_backward(xhat, invstd, weight, n)
        ctx.group = group
        ctx.mark_non_differentiable(mean, var, n)
        return y.to(x.dtype), mean, var, n

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dn):
        xhat, invstd, weight, n = ctx.saved_tensors
        c = xhat.shape[1]
        dyf = dy.float()
        local = torch.cat([dyf.sum(_DIMS), (dyf * xhat).sum(_DIMS)])
        grad_weight = local[c:].clone() if weight is not None else None
        grad_bias = local[:c].clone() if weight is not None else None
        dist.all_reduce(local, group=ctx.group)  # the one backward collective
        sum_dy, sum_dy_xhat = local[:c], local[c:]
        gain = invstd if weight is None else invstd * weight.float()
        dx = _bcast(gain) * (dyf - _bcast(sum_dy / n) - xhat * _bcast(sum_dy_xhat / n))
        if weight is not None:
            grad_weight, grad_bias = grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)
        return dx.to(dy.dtype), grad_weight, grad_bias, None, None


def sync_batch_norm(x, weight, bias, eps, group=None):
    """Batch-normalise ``x`` with global-batch statistics; returns (y, mean, biased var, global count)."""
    return _SyncBatchNormFn.apply(x, weight, bias, eps, group)


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
        y, mean, var, n = sync_batch_norm(x, self.weight, self.bias, self.eps, self.process_group)
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                # momentum=None is a cumulative moving average, as in BatchNorm2d.
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * (n / (n - 1).clamp_min(1))
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        return y


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
