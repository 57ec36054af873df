"""Two gloo processes on CPU against one process on the concatenated batch.

* SyncBatchNorm2d (from ``convert(sync_bn=True)``): outputs, input/weight/bias grads and running stats equal a
  plain BatchNorm2d on the global batch, with unequal per-rank batch sizes, over two steps.
* DDP: a converted, synced CIFAR ResNet trained for two SGD steps equals the plain reference model trained on
  the concatenated batch (same parameters and running stats after the steps), on the eager path and on the
  fused kernels (Triton interpreter), whose per-rank statistics are merged by ``sync_batch_stats``.

One spawn runs both (process start-up dominates the cost).
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

WORLD = 2


def _close(a, b, what, atol=1e-5, rtol=1e-4):
    assert torch.allclose(a, b, atol=atol, rtol=rtol), f"{what}: max abs diff {(a - b).abs().max().item():.3g}"


def _check_sync_bn(rank):
    import resnet_fast
    torch.manual_seed(0)
    sizes = [3, 1]  # unequal local batches: the global count must weight the statistics
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    ref = nn.BatchNorm2d(4, momentum=0.3)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    holder = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, momentum=0.3))  # convert wants a model
    holder[1].load_state_dict(ref.state_dict())
    synced = resnet_fast.convert(holder, sync_bn=True).get_submodule("1")
    assert isinstance(synced, resnet_fast.nn.SyncBatchNorm2d)
    for step in range(2):
        x = torch.randn(sum(sizes), 4, 5, 5) * 3 + 1
        g = torch.randn_like(x)
        xr = x.clone().requires_grad_(True)
        ref_y = ref(xr)
        (ref_y * g).sum().backward()
        xl = x[lo:hi].clone().requires_grad_(True)
        y = synced(xl)
        (y * g[lo:hi]).sum().backward()
        _close(y.detach(), ref_y.detach()[lo:hi], f"step {step} output")
        _close(xl.grad, xr.grad[lo:hi], f"step {step} input grad")
        for name in ("weight", "bias"):
            grad = getattr(synced, name).grad.clone()
            dist.all_reduce(grad)  # local grads, summed across ranks as DDP would (before averaging)
            _close(grad, getattr(ref, name).grad, f"step {step} {name} grad")
            getattr(synced, name).grad = None
            getattr(ref, name).grad = None
        _close(synced.running_mean, ref.running_mean, f"step {step} running_mean")
        _close(synced.running_var, ref.running_var, f"step {step} running_var")
    assert int(synced.num_batches_tracked) == int(ref.num_batches_tracked) == 2


def _check_ddp(rank):
    import resnet_fast
    from resnet_fast.models import CifarResNet
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.manual_seed(1)
    ref = CifarResNet(8, num_classes=5, fused=False)
    model = resnet_fast.convert(ref, sync_bn=True)
    assert model.resnet_fast_summary.fused and model.resnet_fast_summary.sync_bn > 0
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):
        x = torch.randn(2 * WORLD, 3, 8, 8, generator=gen)
        target = torch.randint(0, 5, (2 * WORLD,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x[2 * rank:2 * rank + 2]), target[2 * rank:2 * rank + 2]).backward()
        opt.step()
        ref_opt.zero_grad()
        nn.functional.cross_entropy(ref(x), target).backward()
        ref_opt.step()
    got, want = model.state_dict(), ref.state_dict()
    assert list(got) == list(want)
    for key in want:
        if want[key].is_floating_point():
            _close(got[key], want[key], f"after 2 steps: {key}", atol=1e-4, rtol=1e-3)


def _worker(rank, init_file, backend):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        if backend == "eager":
            _check_sync_bn(rank)  # the module's own synced forward; the backend does not enter it
        import resnet_fast
        resnet_fast.reset_stats()
        _check_ddp(rank)
        if backend == "triton":  # the synced statistics came from the fused kernels, not a fallback
            st = resnet_fast.stats()
            assert st["kernel_calls"].get("block_train", 0) > 0, st
            assert st["kernel_calls"].get("conv_bn_train", 0) > 0, st
            assert not st["fallbacks"], st["fallbacks"]
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_sync_bn_and_ddp_match_single_process_on_concatenated_batch(tmp_path, monkeypatch, backend):
    # The spawned processes inherit os.environ: gloo runs CPU tensors, so the kernels run interpreted there, on a
    # GPU machine too.
    monkeypatch.setenv("RESNET_FAST_BACKEND", backend)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    mp.spawn(_worker, args=(str(tmp_path / "init"), backend), nprocs=WORLD, join=True)


def test_sync_bn_is_batch_norm_without_a_process_group():
    import resnet_fast
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    synced = resnet_fast.convert(ref, sync_bn=True)
    x = torch.randn(4, 3, 5, 5)
    _close(synced(x), ref(x), "single-process output")
    _close(synced[1].running_var, ref[1].running_var, "running_var")
    with pytest.raises(ValueError, match="4-D"):
        synced[1](torch.randn(4, 3, 5))
