"""Fused BasicBlock / Bottleneck / ConvBNReLU in train mode on the training op vs the same layers in torch.nn.

The reference is the plain block (``resnet_fast.nn.reference``, torchvision-identical) in float64; the fused
module holds the same weights in float32 and runs ``resnet_fast.nn.train_path.block_forward_train_kernels`` (Triton
interpreter on CPU). Bounds: outputs ≤ 1e-4 relative (norm) or 4× the drift of the same block in fp32 PyTorch
after the same SGD steps, every gradient ≤ 1e-3, running statistics ≤ 1e-5 (or 4× that drift), weights after
SGD steps ≤ 1e-3.
"""
import copy

import pytest
import torch

import resnet_fast
from resnet_fast import nn as rnn
from resnet_fast.nn import reference
from helpers import rel_err

STEPS = 10  # SGD steps per block (interpreter: ~1 s per fused step at these shapes)


def _ds(cin, cout, stride):
    return torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 1, stride=stride, bias=False), torch.nn.BatchNorm2d(cout))


# (name, plain constructor, fused class, input channels)
CASES = [
    ("basic_s1", lambda: reference.BasicBlock(8, 8), rnn.BasicBlock, 8),
    ("basic_s2_ds", lambda: reference.BasicBlock(4, 8, stride=2, downsample=_ds(4, 8, 2)), rnn.BasicBlock, 4),
    ("bottleneck_s1_ds", lambda: reference.Bottleneck(8, 4, downsample=_ds(8, 16, 1)), rnn.Bottleneck, 8),
    ("bottleneck_s2_ds", lambda: reference.Bottleneck(8, 4, stride=2, downsample=_ds(8, 16, 2)), rnn.Bottleneck, 8),
    ("bottleneck_s1", lambda: reference.Bottleneck(16, 4), rnn.Bottleneck, 16),
]


def _randomise_bn(module):
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)


def _pair(make_plain, fused_cls, device):
    """(float64 plain reference on CPU, float32 fused copy on ``device``) with identical state."""
    plain = make_plain()
    _randomise_bn(plain)
    fused = copy.deepcopy(plain)
    fused.__class__ = fused_cls  # same children and state: only forward differs (see nn/modules.py)
    return plain.double().train(), fused.float().to(device).train()


def _compare_state(fused, plain, *, grads=True, fp32_twin=None):
    """Grads within 1e-3 and running statistics within 1e-5 of the float64 reference. After SGD steps the
    weights have drifted by fp32 rounding, and PyTorch's own fp32 block drifts past 1e-5 too: with ``fp32_twin``
    (an eager fp32 copy trained alongside) a buffer may also be within 4x of that twin's own error."""
    for (name, p), (_, q) in zip(plain.named_parameters(), fused.named_parameters()):
        if grads:
            assert rel_err(q.grad, p.grad) < 1e-3, f"grad {name}: {rel_err(q.grad, p.grad):.2e}"
    twin = dict(fp32_twin.named_buffers()) if fp32_twin is not None else {}
    for (name, b), (_, c) in zip(plain.named_buffers(), fused.named_buffers()):
        if b.is_floating_point():
            tol = max(1e-5, 4 * rel_err(twin[name], b)) if name in twin else 1e-5
            assert rel_err(c, b) < tol, f"buffer {name}: {rel_err(c, b):.2e} (tolerance {tol:.1e})"
        else:
            assert int(c.cpu()) == int(b), name


def _assert_kernels_ran(op="block_train"):
    st = resnet_fast.stats()
    assert st["kernel_calls"].get(op, 0) > 0 and st["kernel_calls"].get("conv_bn_stats", 0) > 0, st
    assert op not in st["fallbacks"], st["fallbacks"]


@pytest.mark.parametrize("name,make_plain,fused_cls,cin", CASES, ids=[c[0] for c in CASES])
def test_block_train_steps_match_torch(name, make_plain, fused_cls, cin, kernel_device, triton_backend):
    torch.manual_seed(0)
    plain, fused = _pair(make_plain, fused_cls, kernel_device)
    opt_p = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    opt_f = torch.optim.SGD(fused.parameters(), lr=0.1, momentum=0.9)
    twin = copy.deepcopy(plain).float()  # PyTorch's own fp32 drift, for the running-stat tolerance
    opt_t = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    for step in range(STEPS):
        x64 = (torch.randn(2, cin, 8, 8, dtype=torch.float64) * (1 + step) + 0.3 * step).requires_grad_(True)
        x = x64.detach().float().to(kernel_device).contiguous(memory_format=torch.channels_last).requires_grad_(True)
        out_p, out_f, out_t = plain(x64), fused(x), twin(x64.detach().float())
        assert out_f.dtype == torch.float32 and out_f.shape == out_p.shape
        # fp32 drift compounds over SGD steps: bounded like the running statistics, by PyTorch's own fp32 twin
        tol = max(1e-4, 4 * rel_err(out_t, out_p))
        assert rel_err(out_f, out_p) < tol, f"step {step} output {rel_err(out_f, out_p):.2e} (tolerance {tol:.1e})"
        g = torch.randn_like(out_p)
        opt_p.zero_grad()
        opt_f.zero_grad()
        opt_t.zero_grad()
        out_p.backward(g)
        out_f.backward(g.float().to(kernel_device))
        out_t.backward(g.float())
        assert rel_err(x.grad, x64.grad) < 1e-3, f"step {step} input grad {rel_err(x.grad, x64.grad):.2e}"
        _compare_state(fused, plain, fp32_twin=twin)
        opt_p.step()
        opt_f.step()
        opt_t.step()
    for (pname, p), (_, q) in zip(plain.named_parameters(), fused.named_parameters()):
        assert rel_err(q, p) < 1e-3, f"weight {pname} after {STEPS} steps"
    _assert_kernels_ran()


@pytest.mark.parametrize("variant", ["momentum_none", "no_running_stats", "batch_of_one", "no_grad", "affine_off"])
def test_block_train_bn_variants(variant, kernel_device, triton_backend):
    torch.manual_seed(1)
    plain, fused = _pair(lambda: reference.BasicBlock(4, 8, stride=2, downsample=_ds(4, 8, 2)), rnn.BasicBlock,
                         kernel_device)
    for model in (plain, fused):
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                if variant == "momentum_none":
                    m.momentum = None
                if variant == "no_running_stats":
                    m.track_running_stats = False
                    m.running_mean = m.running_var = m.num_batches_tracked = None
                if variant == "affine_off":
                    m.weight = m.bias = None
    n = 1 if variant == "batch_of_one" else 2
    for step in range(2):
        x64 = torch.randn(n, 4, 6, 6, dtype=torch.float64) * 2 + step
        x = x64.float().to(kernel_device)
        if variant == "no_grad":
            with torch.no_grad():
                out_p, out_f = plain(x64), fused(x)
            assert not out_f.requires_grad
        else:
            x64.requires_grad_(True)
            x.requires_grad_(True)
            out_p, out_f = plain(x64), fused(x)
            g = torch.randn_like(out_p)
            plain.zero_grad()
            fused.zero_grad()
            out_p.backward(g)
            out_f.backward(g.float().to(kernel_device))
            assert rel_err(x.grad, x64.grad) < 1e-3
        assert rel_err(out_f, out_p) < 1e-4
        _compare_state(fused, plain, grads=variant != "no_grad")
    if variant in ("momentum_none", "no_grad"):
        assert int(fused.bn1.num_batches_tracked) == 2
    if variant == "no_running_stats":
        assert fused.bn1.running_mean is None
    _assert_kernels_ran()


def test_conv_bn_relu_module_train_matches_torch(kernel_device, triton_backend):
    torch.manual_seed(2)
    for relu in (True, False):
        fused = rnn.ConvBNReLU(3, 8, 3, stride=2, relu=relu).float().to(kernel_device).train()
        _randomise_bn(fused)
        plain = torch.nn.Sequential(copy.deepcopy(fused.conv), copy.deepcopy(fused.bn)).double().cpu().train()
        x64 = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
        x = x64.detach().float().to(kernel_device).requires_grad_(True)
        out_p = plain(x64)
        out_p = torch.relu(out_p) if relu else out_p
        out_f = fused(x)
        assert rel_err(out_f, out_p) < 1e-4
        g = torch.randn_like(out_p)
        out_p.backward(g)
        out_f.backward(g.float().to(kernel_device))
        assert rel_err(x.grad, x64.grad) < 1e-3
        for (name, p), (_, q) in zip(plain.named_parameters(), fused.named_parameters()):
            assert rel_err(q.grad, p.grad) < 1e-3, name
        for (name, b), (_, c) in zip(plain.named_buffers(), fused.named_buffers()):
            assert rel_err(c, b) < 1e-5 if b.is_floating_point() else int(c) == int(b), name
    _assert_kernels_ran("conv_bn_train")


def test_block_tail_large_mean_bn_grads(triton_backend):
    """A Bottleneck whose conv3 and downsample outputs have |mean|/std ~ 3e3, end to end on the kernels: the
    last BN's and the downsample BN's weight/bias gradients within the usual 1e-3 of float64 torch.nn.

    Two numerics meet here. The forward statistics: the conv's stats epilogue writes per-tile Σy and the
    tile-centred Σ(y - ȳ_tile)², merged Chan-style (Σy² partials lose ~eps·(mean/std)² of the variance: ~50 %
    here). The backward: the gradients need Σg·(y - mean), which the tail op sums centred on the batch means
    the block passes (x_centre, res_centre); without the centres (Σg·y - mean·Σg from an fp32 Σg·y) this test
    gave 2.6e-3 to 8.7e-3, with them 4e-5 to 4.3e-4 (measured with exact statistics). The upstream gradient is
    zero where the float64 pre-activation is within 1e-2 of the final ReLU's kink: at these means fp32 itself
    moves the pre-activation by ~1e-4, and a flipped mask bit is not what this test is about. Shapes:
    N*H*W = 8192 values per channel, 4 channels (the CPU kernel's NHWC chunks are then 4096 rows long)."""
    import resnet_fast.nn.train_path as bt

    ratio = 3000.0
    seed = 0  # one seed: ~75 s in the interpreter
    torch.manual_seed(seed)
    plain, fused = _pair(lambda: reference.Bottleneck(4, 1, downsample=_ds(4, 4, 1)), rnn.Bottleneck, "cpu")
    with torch.no_grad():
        for m in (plain, fused):
            m.downsample[0].weight.abs_()  # the input's offset gives the downsample output a large mean
            m.conv3.weight.abs_()
            # bn2 output ~ 1 + N(0, 1/ratio): conv3's output has mean ~ ratio * std
            m.bn2.weight.fill_(1.0 / ratio)
            m.bn2.bias.fill_(1.0)
    x = (torch.randn(2, 4, 64, 64) + ratio).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    out_f = bt.block_forward_train_kernels(fused, x)
    out_p = plain(x64)
    with torch.no_grad():
        a = torch.relu(plain.bn2(plain.conv2(torch.relu(plain.bn1(plain.conv1(x64))))))
        y3, yd = plain.conv3(a), plain.downsample[0](x64)
        for y in (y3, yd):  # the regime under test
            assert (y.mean((0, 2, 3)).abs() / y.std((0, 2, 3))).min() > 0.8 * ratio
        z = plain.bn3(y3) + plain.downsample[1](yd)
    g = torch.randn_like(out_p) * (z.abs() > 1e-2)
    out_p.backward(g)
    out_f.backward(g.float())
    grads = dict(fused.named_parameters())
    for name, p in plain.named_parameters():
        if name.startswith(("bn3.", "downsample.1.")):
            err = rel_err(grads[name].grad, p.grad)
            assert err < 1e-3, f"seed {seed} grad {name}: {err:.2e}"
    _assert_kernels_ran("bn_add_relu")


def test_block_and_stem_pass_batch_means_as_centres(monkeypatch, kernel_device, triton_backend):
    """The real training path hands the tail ops the batch means, detached: the last conv's (x_centre) and the
    downsample conv's (res_centre); the stem's bn_relu gets its conv's."""
    import resnet_fast.nn.train_path as bt

    calls = []

    def spy(fn):
        def wrapped(*args, **kwargs):
            calls.append((args, kwargs))
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(bt, "bn_add_relu", spy(bt.bn_add_relu))
    monkeypatch.setattr(bt, "bn_relu", spy(bt.bn_relu))
    torch.manual_seed(6)
    _, fused = _pair(lambda: reference.BasicBlock(4, 8, stride=2, downsample=_ds(4, 8, 2)), rnn.BasicBlock,
                     kernel_device)
    stem = rnn.ConvBNReLU(3, 4, 3, stride=2).float().to(kernel_device).train()
    fused(torch.randn(2, 4, 6, 6, device=kernel_device, requires_grad=True))
    stem(torch.randn(2, 3, 6, 6, device=kernel_device, requires_grad=True))
    assert len(calls) == 2
    (y, _, _, residual, *_), kwargs = calls[0]
    for t, c in ((y, kwargs["x_centre"]), (residual, kwargs["res_centre"])):
        assert c is not None and not c.requires_grad and c.dtype == torch.float32
        assert rel_err(c, t.double().mean((0, 2, 3))) < 1e-6
    (y, *_), kwargs = calls[1]
    c = kwargs["x_centre"]
    assert c is not None and not c.requires_grad and rel_err(c, y.double().mean((0, 2, 3))) < 1e-6
    _assert_kernels_ran()


def test_fallback_is_recorded_for_float64(triton_backend):
    block = rnn.BasicBlock(4, 4).double().train()
    block(torch.randn(2, 4, 6, 6, dtype=torch.float64))
    assert "float64" in next(iter(resnet_fast.stats()["fallbacks"]["block_train"]))


def test_sync_batchnorm_outside_a_process_group_runs_the_kernels(kernel_device, triton_backend):
    # SyncBatchNorm2d is BatchNorm2d without a multi-rank group; the synced case is tests/test_distributed.py.
    torch.manual_seed(4)
    plain = rnn.BasicBlock(4, 4).train().to(kernel_device)
    synced = copy.deepcopy(plain)
    for name in ("bn1", "bn2"):
        setattr(synced, name, rnn.SyncBatchNorm2d(4).to(kernel_device))
        getattr(synced, name).load_state_dict(getattr(plain, name).state_dict())
    x = torch.randn(2, 4, 6, 6, device=kernel_device)
    with torch.no_grad():
        assert rel_err(synced(x), plain(x)) < 1e-6
        assert rel_err(synced.bn2.running_var, plain.bn2.running_var) < 1e-6
    assert "block_train" not in resnet_fast.stats()["fallbacks"]
    assert resnet_fast.stats()["kernel_calls"]["block_train"] == 2


def test_train_step_compiles_fullgraph(kernel_device, triton_backend):
    torch.manual_seed(3)
    torch._dynamo.reset()
    _, fused = _pair(lambda: reference.BasicBlock(4, 8, stride=2, downsample=_ds(4, 8, 2)), rnn.BasicBlock,
                     kernel_device)
    ref = copy.deepcopy(fused)

    def loss(model, x):
        out = model(x)
        return out, out.square().sum()

    # fullgraph: the forward (kernels, running-stat updates) is one graph; AOTAutograd traces the backward
    # (the backward custom op through its fake) when .backward() runs.
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 4, 6, 6, device=kernel_device)
    out_c, l_c = compiled(fused, x)
    l_c.backward()
    out_e, l_e = loss(ref, x)
    l_e.backward()
    assert rel_err(out_c, out_e) < 1e-5
    for (name, p), (_, q) in zip(ref.named_parameters(), fused.named_parameters()):
        assert rel_err(q.grad, p.grad) < 1e-5, name
    for (name, b), (_, c) in zip(ref.named_buffers(), fused.named_buffers()):
        assert rel_err(c.float(), b.float()) < 1e-6, name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_block_train_autocast_gpu(dtype, triton_backend):
    torch.manual_seed(4)
    plain, fused = _pair(lambda: reference.Bottleneck(64, 32, stride=2, downsample=_ds(64, 128, 2)), rnn.Bottleneck,
                         "cuda")
    plain = plain.float().cuda()
    x = torch.randn(8, 64, 28, 28, device="cuda").contiguous(memory_format=torch.channels_last)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    with torch.autocast("cuda", dtype=dtype):
        out_p, out_f = plain(xs[0]), fused(xs[1])
    assert out_f.dtype == out_p.dtype == dtype
    assert rel_err(out_f, out_p) < 2e-2
    g = torch.randn_like(out_p)
    out_p.backward(g)
    out_f.backward(g)
    assert rel_err(xs[1].grad, xs[0].grad) < 5e-2
    for (name, p), (_, q) in zip(plain.named_parameters(), fused.named_parameters()):
        assert q.grad.dtype == torch.float32 and rel_err(q.grad, p.grad) < 5e-2, name
    for (name, b), (_, c) in zip(plain.named_buffers(), fused.named_buffers()):
        if b.is_floating_point():
            assert c.dtype == torch.float32 and rel_err(c, b) < 1e-2, name
    _assert_kernels_ran()


def _saved_bytes(model, x) -> int:
    """Bytes of the distinct storages autograd saves for the backward of ``model(x)`` (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(seen.values())


@pytest.mark.parametrize("name,make_plain,fused_cls,cin", CASES, ids=[c[0] for c in CASES])
def test_block_train_saves_no_more_than_eager(name, make_plain, fused_cls, cin, kernel_device, triton_backend):
    # Per conv-BN-ReLU only the raw conv output and two fp32 vectors are saved, so the fused block keeps
    # no more activation memory for its backward than torch.nn's (which saves BN inputs and ReLU outputs).
    plain, fused = _pair(make_plain, fused_cls, kernel_device)
    x = torch.randn(4, cin, 16, 16).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    eager = _saved_bytes(plain.float(), x)
    ours = _saved_bytes(fused, x.to(kernel_device))
    assert ours <= eager, f"fused block saves {ours} bytes, torch.nn {eager}"


@pytest.mark.gpu
def test_training_step_has_no_host_sync(triton_backend):
    # No host synchronisation (no .item(), no host->device copies) in a training step once warm
    # (the first step autotunes, which synchronises to time the candidates).
    torch.manual_seed(5)
    _, fused = _pair(lambda: reference.Bottleneck(32, 16, stride=2, downsample=_ds(32, 64, 2)), rnn.Bottleneck,
                     "cuda")
    x = torch.randn(4, 32, 16, 16, device="cuda").contiguous(memory_format=torch.channels_last)
    for sync_mode in ("default", "error"):
        torch.cuda.set_sync_debug_mode(sync_mode)
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = fused(x.requires_grad_(True))
            out.float().square().mean().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    _assert_kernels_ran()
