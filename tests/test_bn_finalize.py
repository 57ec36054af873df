"""bn_finalize / bn_backward_coeffs (Triton, interpreted on CPU) vs torch.nn.BatchNorm2d and float64 math."""
import pytest
import torch

from resnet_fast.kernels import bn_finalize as bn_finalize_module
from resnet_fast.kernels.bn_finalize import bn_backward_coeffs, bn_finalize
from helpers import rel_err

CFG = (4, 16, 4)  # small BLOCK_T/BLOCK_C so the tests cover several programs and several tile steps


@pytest.fixture(params=["one_chunk", "chunks_of_4"])
def chunking(request, monkeypatch):
    """The first stage's chunk size: the default (these small tests then have one chunk) or 4 tiles (several
    chunks, the last one ragged), so the two-stage merge is exercised against the same references."""
    if request.param == "chunks_of_4":
        monkeypatch.setattr(bn_finalize_module, "CHUNK_T", 4)
    return request.param


def _tile_partials(y, rows_per_tile):
    """Σy and Σ(y - tile mean)² per tile of ``rows_per_tile`` rows of the NHWC-flattened y, in fp32, like the
    conv stats epilogue."""
    C = y.shape[1]
    flat = y.permute(0, 2, 3, 1).reshape(-1, C).float()
    s = torch.stack([t.sum(0) for t in flat.split(rows_per_tile)])
    q = torch.stack([((t - t.sum(0) / len(t)) ** 2).sum(0) for t in flat.split(rows_per_tile)])
    return s.contiguous(), q.contiguous()


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(2, 20, 5, 3), (1, 7, 3, 4)])  # batch of one with spatial > 1 too
def test_matches_batchnorm_over_steps(kernel_device, triton_backend, chunking, momentum, affine, shape):
    torch.manual_seed(0)
    N, C, H, W = shape
    bn = torch.nn.BatchNorm2d(C, momentum=momentum, affine=affine)
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    rm, rv = bn.running_mean.clone().to(kernel_device), bn.running_var.clone().to(kernel_device)
    nbt = bn.num_batches_tracked.clone().to(kernel_device)
    w = bn.weight.detach().to(kernel_device) if affine else None
    b = bn.bias.detach().to(kernel_device) if affine else None
    bn.train()
    for step in range(3):
        y = torch.randn(shape) * (1 + step) + 3.0 * step  # mean far from 0: exercises the cancellation
        out_ref = bn(y)
        s, q = _tile_partials(y, rows_per_tile=7)
        mean, invstd, scale, shift = bn_finalize(
            s.to(kernel_device), q.to(kernel_device), N * H * W, tile_rows=7, running_mean=rm, running_var=rv,
            num_batches_tracked=nbt, momentum=momentum, eps=bn.eps, weight=w, bias=b, config=CFG)
        y64 = y.double()
        mean64 = y64.mean((0, 2, 3))
        var64 = y64.var((0, 2, 3), unbiased=False)
        assert rel_err(mean.cpu(), mean64) < 1e-6
        assert rel_err(invstd.cpu(), (var64 + bn.eps).rsqrt()) < 1e-5
        out = y * scale.cpu().view(1, -1, 1, 1) + shift.cpu().view(1, -1, 1, 1)
        assert rel_err(out, out_ref.detach()) < 1e-5
        assert rel_err(rm.cpu(), bn.running_mean) < 1e-5
        assert rel_err(rv.cpu(), bn.running_var) < 1e-5
        assert int(nbt.cpu()) == int(bn.num_batches_tracked) == step + 1


def test_no_running_stats_leaves_nothing_updated(kernel_device, triton_backend):
    torch.manual_seed(1)
    y = torch.randn(2, 5, 3, 3)
    bn = torch.nn.BatchNorm2d(5, track_running_stats=False, affine=False).train()
    s, q = _tile_partials(y, rows_per_tile=4)
    mean, invstd, scale, shift = bn_finalize(s.to(kernel_device), q.to(kernel_device), 18, tile_rows=4,
                                             momentum=None, config=CFG)
    out = y * scale.cpu().view(1, -1, 1, 1) + shift.cpu().view(1, -1, 1, 1)
    assert rel_err(out, bn(y)) < 1e-5


@pytest.mark.parametrize("rows_per_tile", [16, 128])
def test_large_mean_keeps_its_variance(kernel_device, triton_backend, chunking, rows_per_tile):
    """mean/std = 1e3: the Chan merge of tile-centred fp32 partials gives invstd to ~1e-5, where the old
    Σy/Σy² partials (simulated here, merged in float64 as before) are off by ~1e-2 (eps·(mean/std)² per tile sum)."""
    torch.manual_seed(3)
    y = 1e3 + torch.randn(4, 6, 16, 16)  # fp32, like the conv output the epilogue sums
    s, m2 = _tile_partials(y, rows_per_tile)
    n = y.numel() // 6
    mean, invstd, _, _ = bn_finalize(s.to(kernel_device), m2.to(kernel_device), n, tile_rows=rows_per_tile,
                                     eps=1e-12, config=CFG)
    var64 = y.double().var((0, 2, 3), unbiased=False)
    assert rel_err(mean.cpu(), y.double().mean((0, 2, 3))) < 1e-7
    assert rel_err(invstd.cpu(), var64.rsqrt()) < 1e-4
    flat = y.permute(0, 2, 3, 1).reshape(-1, 6)
    sq = torch.stack([(t * t).sum(0) for t in flat.split(rows_per_tile)]).double().sum(0)  # old partials
    old_var = sq / n - (s.double().sum(0) / n) ** 2
    assert rel_err(old_var.clamp_min(1e-30).rsqrt(), var64.rsqrt()) > 1e-3  # the failure this guards against


def test_ticket_counter_resets_between_launches(kernel_device, triton_backend):
    # The nbt increment is done by the last program; with C=40 and BLOCK_C=16 there are 3 programs.
    s = torch.rand(3, 40, device=kernel_device)
    q = s * s + 1
    rm, rv = torch.zeros(40, device=kernel_device), torch.ones(40, device=kernel_device)
    nbt = torch.tensor(5, dtype=torch.int64, device=kernel_device)
    for _ in range(4):
        bn_finalize(s, q, 10, tile_rows=4, running_mean=rm, running_var=rv, num_batches_tracked=nbt, config=CFG)
    assert int(nbt.cpu()) == 9


@pytest.mark.parametrize("affine", [True, False])
def test_backward_coeffs_match_autograd(kernel_device, triton_backend, chunking, affine):
    torch.manual_seed(2)
    N, C, H, W = 2, 6, 4, 3
    y = torch.randn(N, C, H, W, dtype=torch.float64, requires_grad=True)
    gamma = torch.rand(C, dtype=torch.float64) + 0.5 if affine else None
    beta = torch.randn(C, dtype=torch.float64) if affine else None
    if affine:
        gamma.requires_grad_(True)
        beta.requires_grad_(True)
    z = torch.nn.functional.batch_norm(y, None, None, gamma, beta, training=True, eps=1e-5)
    dz = torch.randn_like(z)
    z.backward(dz)
    mean = y.detach().mean((0, 2, 3))
    invstd = (y.detach().var((0, 2, 3), unbiased=False) + 1e-5).rsqrt()
    yc = y.detach() - mean.view(1, -1, 1, 1)
    s1, _ = _tile_partials(dz, 5)
    s2, _ = _tile_partials(dz * yc, 5)
    c1, c2, c3, dg, db = bn_backward_coeffs(
        s1.to(kernel_device), s2.to(kernel_device), invstd.float().to(kernel_device), N * H * W,
        weight=gamma.detach().float().to(kernel_device) if affine else None, config=CFG)
    v = lambda t: t.cpu().double().view(1, -1, 1, 1)  # noqa: E731
    dy = v(c1) * dz + v(c2) * yc + v(c3)
    assert rel_err(dy, y.grad) < 1e-5
    if affine:
        assert rel_err(dg.cpu(), gamma.grad) < 1e-5
        assert rel_err(db.cpu(), beta.grad) < 1e-5


def test_chunk_must_be_whole_block_steps(kernel_device, triton_backend, monkeypatch):
    monkeypatch.setattr(bn_finalize_module, "CHUNK_T", 6)
    s = torch.rand(3, 4, device=kernel_device)
    with pytest.raises(ValueError, match="must divide CHUNK_T"):
        bn_finalize(s, s + 1, 10, tile_rows=4, config=CFG)


def test_bad_inputs(kernel_device, triton_backend):
    s = torch.rand(3, 4, device=kernel_device)
    t = dict(tile_rows=4)  # 3 tiles of 10 rows
    with pytest.raises(ValueError, match="m2_y"):
        bn_finalize(s, s.double(), 10, **t)
    with pytest.raises(ValueError, match="count"):
        bn_finalize(s, s, 1, **t)
    with pytest.raises(ValueError, match="tile_rows"):
        bn_finalize(s, s, 10, tile_rows=3)  # 4 tiles, not 3
    with pytest.raises(ValueError, match="running_var"):
        bn_finalize(s, s, 10, running_mean=torch.zeros(4, device=kernel_device), **t)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        bn_finalize(s, s, 10, running_mean=torch.zeros(4, device=kernel_device),
                    running_var=torch.ones(4, device=kernel_device), **t)
    with pytest.raises(ValueError, match="momentum"):
        bn_finalize(s, s, 10, momentum=1.5, **t)
    with pytest.raises(ValueError, match="weight"):
        bn_finalize(s, s, 10, weight=torch.ones(5, device=kernel_device), bias=torch.ones(5, device=kernel_device),
                    **t)
    with pytest.raises(ValueError, match="invstd"):
        bn_backward_coeffs(s, s, torch.ones(3, device=kernel_device), 10)
