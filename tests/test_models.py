"""Model constructors: parameter counts (torchvision docs / He et al.), state_dict keys and shapes, init, and
outputs against the plain nn reference (and torchvision where it imports)."""
import copy

import pytest
import torch
import torch.nn as nn

import resnet_fast
from resnet_fast import models
from resnet_fast.nn import reference

# torchvision's documented parameter counts.
IMAGENET = {
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032, "resnet101": 44_549_160,
    "resnet152": 60_192_808, "resnext50_32x4d": 25_028_904, "resnext101_32x8d": 88_791_336,
    "resnext101_64x4d": 83_455_272, "wide_resnet50_2": 68_883_240, "wide_resnet101_2": 126_886_696,
}
# He et al. 2016, table 6 (millions).
CIFAR = {"resnet20": 0.27, "resnet32": 0.46, "resnet44": 0.66, "resnet56": 0.85, "resnet110": 1.7,
         "resnet1202": 19.4}


def _count(model):
    return sum(p.numel() for p in model.parameters())


def _shapes(model):
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


@pytest.mark.parametrize("name", sorted(IMAGENET))
def test_imagenet_param_count_and_keys_match_reference(name):
    build = getattr(models, name)
    with torch.device("meta"):  # no memory, no init cost: counts and shapes only
        fused, plain = build(), build(fused=False)
    assert _count(fused) == IMAGENET[name]
    assert _shapes(fused) == _shapes(plain)
    summary = fused.resnet_fast_summary
    assert not summary.skipped
    assert len(summary.fused) == 1 + sum(len(getattr(fused, f"layer{i}")) for i in range(1, 5))


@pytest.mark.parametrize("name", sorted(CIFAR))
def test_cifar_param_count_matches_paper_and_depth(name):
    with torch.device("meta"):  # counts and structure only (resnet1202 has 19.4M parameters)
        model = getattr(models, name)()
    digits = 1 if name in ("resnet110", "resnet1202") else 2
    assert round(_count(model) / 1e6, digits) == CIFAR[name]
    depth = int(name[len("resnet"):])
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) + 1 == depth  # 6n+2 = convs + fc; option A shortcuts have no conv
    assert [k for k in model.state_dict()][:2] == ["conv1.weight", "bn1.weight"]
    assert model.fc.in_features == 64 and model.layer3[0].conv1.stride == (2, 2)


def test_resnet1202_converted_trains_like_its_reference(eager_backend):
    # The deepest model of He et al.: 600 blocks converted; a training forward/backward at a tiny batch matches
    # the plain model (train mode: BN keeps the 600-block residual stream finite at init).
    fused, plain = _pair(models.resnet1202)
    assert len(fused.resnet_fast_summary.fused) == 1 + 3 * 200 and not fused.resnet_fast_summary.skipped
    x = torch.randn(2, 3, 8, 8)
    xf, xp = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    yf, yp = fused(xf), plain(xp)
    assert torch.isfinite(yf).all()
    torch.testing.assert_close(yf, yp, rtol=1e-4, atol=1e-4)
    yf.square().sum().backward()
    yp.square().sum().backward()
    torch.testing.assert_close(xf.grad, xp.grad, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(fused.layer3[199].conv2.weight.grad, plain.layer3[199].conv2.weight.grad,
                               rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(fused.layer2[100].bn1.running_var, plain.layer2[100].bn1.running_var)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_same_weights_as_torchvision(name):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    want = getattr(tv.models, name)().state_dict()
    torch.manual_seed(0)
    got = getattr(models, name)().state_dict()
    assert list(got) == list(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_init_matches_reference_and_zero_init_residual():
    torch.manual_seed(3)
    want = reference.ResNet(reference.Bottleneck, [1, 1, 1, 1], zero_init_residual=True).state_dict()
    torch.manual_seed(3)
    model = models.ResNet(reference.Bottleneck, [1, 1, 1, 1], zero_init_residual=True)
    got = model.state_dict()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    for block in (model.layer1[0], model.layer4[0]):
        assert torch.count_nonzero(block.bn3.weight) == 0 and torch.all(block.bn1.weight == 1)
    fan_out = model.layer1[0].conv2.weight[0].numel() // model.layer1[0].conv2.in_channels * \
        model.layer1[0].conv2.out_channels
    std = model.layer1[0].conv2.weight.std().item()
    assert abs(std - (2.0 / fan_out) ** 0.5) < 0.2 * (2.0 / fan_out) ** 0.5  # kaiming_normal_, fan_out


def test_constructor_arguments():
    with pytest.raises(ValueError, match="weights"):
        models.resnet18(weights="IMAGENET1K_V1")
    with pytest.raises(ValueError, match="replace_stride_with_dilation"):
        models.resnet50(replace_stride_with_dilation=[True])
    with pytest.raises(ValueError, match="groups=1"):
        resnet_fast.nn.BasicBlock(8, 8, groups=2)
    with torch.device("meta"):
        m = models.resnet50(num_classes=7, replace_stride_with_dilation=[False, True, True])
        assert m.fc.out_features == 7
        assert m.layer4[1].conv2.dilation == (4, 4) and m.layer4[0].conv2.stride == (1, 1)
        assert _shapes(m) == _shapes(models.resnet50(num_classes=7, fused=False,
                                                      replace_stride_with_dilation=[False, True, True]))


def _pair(build, seed=0, **kw):
    torch.manual_seed(seed)
    fused = build(**kw)
    torch.manual_seed(seed)
    return fused, build(fused=False, **kw)


def _train_and_compare(fused, plain, x, steps=2):
    """Eval outputs, then training steps (outputs, input grads, running stats) against the reference."""
    fused.eval(), plain.eval()
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-4, atol=1e-5)
    fused.train(), plain.train()
    for _ in range(steps):
        xf, xp = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        yf, yp = fused(xf), plain(xp)
        torch.testing.assert_close(yf, yp, rtol=1e-4, atol=1e-5)
        yf.square().sum().backward()
        yp.square().sum().backward()
        torch.testing.assert_close(xf.grad, xp.grad, rtol=1e-4, atol=1e-5)
    for (k, a), b in zip(fused.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)
    for (k, a), b in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.parametrize("name,size,steps", [("resnet18", 16, 1), ("resnet20", 8, 2)])
def test_eager_backend_matches_reference(eager_backend, name, size, steps):
    fused, plain = _pair(getattr(models, name), num_classes=5)
    _train_and_compare(fused, plain, torch.randn(2, 3, size, size), steps)
    assert resnet_fast.stats()["fallbacks"] == {}  # eager was asked for: not a fallback


class _TinyNet(nn.Module):
    """A narrow ResNet-shaped net for convert() to fuse: the conv1/bn1/relu stem (3 -> 8 channels), then
    ``layer1, layer2, ...`` as given; plain nn."""

    def __init__(self, *layers):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.layers = len(layers)
        for i, layer in enumerate(layers, 1):
            setattr(self, f"layer{i}", layer)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(1, self.layers + 1):
            x = getattr(self, f"layer{i}")(x)
        return x


def _tiny_grouped_bottleneck_net():
    """ResNeXt-style Bottlenecks (groups=2, strided projection downsample, then dilation 2) at narrow width."""
    down = nn.Sequential(reference.conv1x1(8, 16, 2), nn.BatchNorm2d(16))
    return _TinyNet(nn.Sequential(reference.Bottleneck(8, 4, 2, down, groups=2),
                                  reference.Bottleneck(16, 4, groups=2, dilation=2)))


def test_eager_backend_grouped_dilated_bottlenecks_match_reference(eager_backend):
    torch.manual_seed(0)
    plain = _tiny_grouped_bottleneck_net()
    fused = resnet_fast.convert(plain)
    assert isinstance(fused.layer1[1], resnet_fast.nn.Bottleneck)
    _train_and_compare(fused, plain, torch.randn(2, 3, 8, 8))


def test_auto_on_cpu_counts_fallbacks(monkeypatch):
    monkeypatch.setenv("RESNET_FAST_BACKEND", "auto")
    resnet_fast.reset_stats()
    fused, plain = _pair(models.resnet20)
    fused.eval(), plain.eval()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fused(x), plain(x))
    fallbacks = resnet_fast.stats()["fallbacks"]
    assert sum(fallbacks["block"].values()) == 9 and sum(fallbacks["conv_bn"].values()) == 1
    resnet_fast.reset_stats()


def test_train_mode_runs_the_training_kernels(kernel_device, triton_backend):
    # Under the triton backend a converted model's train forward runs the training ops (9 blocks + the stem) and
    # computes PyTorch's training semantics (running stats included), with no fallback.
    fused, plain = _pair(models.resnet20, num_classes=4)
    fused.to(kernel_device).train(), plain.train()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fused(x.to(kernel_device)).cpu(), plain(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused.layer2[0].bn1.running_var.cpu(), plain.layer2[0].bn1.running_var)
    st = resnet_fast.stats()
    assert st["kernel_calls"]["block_train"] == 9 and st["kernel_calls"]["conv_bn_train"] == 1, st
    assert not st["fallbacks"], st["fallbacks"]


def test_non_batchnorm_norm_layer_stays_plain_and_is_reported(eager_backend):
    gn = lambda c: nn.GroupNorm(2, c)  # noqa: E731
    fused, plain = _pair(models.resnet18, num_classes=3, norm_layer=gn)
    skipped = dict(fused.resnet_fast_summary.skipped)
    assert len(skipped) == 8 and "not BatchNorm2d" in skipped["layer1.0"]
    assert isinstance(fused.layer1[0], reference.BasicBlock)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fused(x), plain(x))


def test_bad_input_is_a_clear_error():
    model = models.resnet20().eval()
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model(torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\).*\(2, 4, 8, 8\)"):
        model(torch.randn(2, 4, 8, 8))
    with pytest.raises(ValueError, match=r"BasicBlock.*\(N, 16, H, W\)"):
        model.layer1[0](torch.randn(2, 8, 8, 8))


# ------------------------------------------------------------------------------- project kernels (triton)
def _tiny_resnet18_style():
    """ResNet-18's pattern at narrow width (8/16 channels): BasicBlocks with a strided projection
    (Sequential(conv1x1, bn)) downsample."""
    down = nn.Sequential(reference.conv1x1(8, 16, 2), nn.BatchNorm2d(16))
    return _TinyNet(nn.Sequential(reference.BasicBlock(8, 8), reference.BasicBlock(8, 8)),
                    nn.Sequential(reference.BasicBlock(8, 16, 2, down), reference.BasicBlock(16, 16)))


@pytest.mark.parametrize("build,size", [("tiny_resnet18", 8), ("resnet20", 8), ("grouped_bottleneck", 8)])
def test_triton_backend_eval_matches_reference(kernel_device, triton_backend, build, size):
    torch.manual_seed(0)
    plain = {"resnet20": lambda: models.resnet20(fused=False), "tiny_resnet18": _tiny_resnet18_style,
             "grouped_bottleneck": _tiny_grouped_bottleneck_net}[build]()
    for m in plain.modules():  # non-trivial BN so folding is exercised
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5), m.weight.uniform_(0.5, 1.5)
    fused = resnet_fast.convert(plain).to(kernel_device).eval()  # a converted copy: plain stays on the CPU
    plain.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():  # inference (autograd-recording eval forwards: tests/test_conv2d_backward.py)
        torch.testing.assert_close(fused(x.to(kernel_device)).cpu(), plain(x), rtol=2e-3, atol=2e-3)
    stats = resnet_fast.stats()
    blocks = (resnet_fast.nn.BasicBlock, resnet_fast.nn.Bottleneck)
    assert stats["kernel_calls"].get("block", 0) == sum(1 for m in fused.modules() if isinstance(m, blocks))
    assert "block" not in stats["fallbacks"]


def test_triton_backend_eval_under_autograd_runs_the_kernels_and_backpropagates(kernel_device, triton_backend):
    # ops.conv2d has a kernel backward: an eval forward that autograd records stays on the kernels
    torch.manual_seed(0)
    block = resnet_fast.nn.BasicBlock(4, 4).eval()
    plain = reference.BasicBlock(4, 4).eval()
    plain.load_state_dict(block.state_dict())
    block.to(kernel_device)
    xp = torch.randn(1, 4, 4, 4, requires_grad=True)
    x = xp.detach().to(kernel_device).requires_grad_(True)
    block(x).sum().backward()
    plain(xp).sum().backward()
    torch.testing.assert_close(x.grad.cpu(), xp.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(block.conv1.weight.grad.cpu(), plain.conv1.weight.grad, rtol=1e-4, atol=1e-5)
    st = resnet_fast.stats()
    assert "block" not in st["fallbacks"] and st["kernel_calls"]["block"] == 1
    assert st["kernel_calls"]["conv2d_backward"] == 2


def test_triton_backend_eval_under_autocast_runs_the_kernels_in_half(kernel_device, triton_backend):
    torch.manual_seed(0)
    block = resnet_fast.nn.BasicBlock(8, 8).eval()
    plain = reference.BasicBlock(8, 8).eval()
    plain.load_state_dict(block.state_dict())
    block.to(kernel_device)
    x = torch.randn(2, 8, 6, 6)
    # float16: ops.conv2d's bfloat16 is wrong in the Triton interpreter (seen 2026-11; not this layer's bug).
    with torch.no_grad(), torch.autocast(kernel_device, dtype=torch.float16):
        y = block(x.to(kernel_device)).cpu()
    assert y.dtype == torch.float16 and resnet_fast.stats()["kernel_calls"]["block"] == 1
    with torch.no_grad():
        torch.testing.assert_close(y.float(), plain(x), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_conv_bn_relu_module(monkeypatch, backend):
    monkeypatch.setenv("RESNET_FAST_BACKEND", backend)
    resnet_fast.reset_stats()
    torch.manual_seed(0)
    fused = resnet_fast.nn.ConvBNReLU(4, 6, 3, stride=2)
    assert list(fused.state_dict())[:2] == ["conv.weight", "bn.weight"]
    plain = nn.Sequential(fused.conv, fused.bn, nn.ReLU())  # the same modules, eager
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        fused.bn.running_mean.uniform_(-0.5, 0.5)
        fused.eval(), plain.eval()
        torch.testing.assert_close(fused(x), plain(x), rtol=2e-3, atol=2e-3)
    assert resnet_fast.stats()["kernel_calls"].get("conv_bn", 0) == (1 if backend == "triton" else 0)
    fused.train(), plain.train()
    torch.testing.assert_close(fused(x), plain(x))
    with pytest.raises(ValueError, match=r"ConvBNReLU.*\(N, 4, H, W\)"):
        fused(torch.randn(2, 3, 7, 7))


def test_resnet50_train_step_on_the_kernels_matches_float64(kernel_device, triton_backend):
    # The product's main model, whole, on the training kernels (interpreter on CPU, ~3 min): the 7x7 stem,
    # maxpool, 16 Bottlenecks with projections. Narrow mid-widths (width_per_group=8) keep it affordable; 48 px
    # and batch 2 leave 8 values per channel for layer4's BatchNorms (at 32 px they would see 2, where even
    # PyTorch's own fp32 differs from float64 by ~25 %). Tolerances: 1e-4 for the outputs, 1e-3 for the
    # gradients, or 4x the error of PyTorch's own fp32 model where that is larger. (Measured: the kernels'
    # gradients are within ~4e-4 everywhere; eager fp32's below layer4.0 are ~1e-2 off float64 here.)
    torch.manual_seed(0)
    plain = models.resnet50(num_classes=5, width_per_group=8, fused=False).train()
    ref64, twin = copy.deepcopy(plain).double(), copy.deepcopy(plain)
    fused = resnet_fast.convert(plain).to(kernel_device)
    x = torch.randn(2, 3, 48, 48)
    outs, grads = [], []
    for model, xin in ((ref64, x.double()), (twin, x), (fused, x.to(kernel_device))):
        xin = xin.clone().requires_grad_(True)
        out = model(xin)
        out.square().sum().backward()
        outs.append(out.detach().cpu().double())
        grads.append([xin.grad.cpu().double()] + [p.grad.cpu().double() for p in model.parameters()])
    rel = lambda a, b: ((a - b).norm() / b.norm().clamp_min(1e-300)).item()  # noqa: E731
    assert rel(outs[2], outs[0]) <= max(1e-4, 4 * rel(outs[1], outs[0]))
    names = ["input"] + [n for n, _ in plain.named_parameters()]
    for name, want, theirs, ours in zip(names, *grads):  # float64, eager fp32, ours
        assert rel(ours, want) <= max(1e-3, 4 * rel(theirs, want)), f"grad {name}: {rel(ours, want):.2e}"
    st = resnet_fast.stats()
    assert st["kernel_calls"]["block_train"] == 16 and st["kernel_calls"]["conv_bn_train"] == 1
    assert not st["fallbacks"], st["fallbacks"]
