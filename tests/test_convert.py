"""convert()/revert(): structure matching (torchvision- and timm-like blocks), shared state, what is left
unfused and reported, and the ecosystem: torch.compile, activation checkpointing, CUDA graphs."""
import copy

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import resnet_fast
from resnet_fast import models
from resnet_fast.nn import reference
from resnet_fast.nn import BasicBlock, Bottleneck, FusedStemConv


class TimmLikeBlock(nn.Module):
    """timm's BasicBlock layout: act1/act2, drop_block/aa Identity, optional se and drop_path."""

    def __init__(self, inplanes, planes, stride=1, downsample=None, act=nn.ReLU, se=False):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.drop_block = nn.Identity()
        self.act1 = act(inplace=True)
        self.aa = nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.se = SE(planes) if se else None
        self.act2 = act(inplace=True)
        self.downsample = downsample
        self.drop_path = None

    def forward(self, x):
        shortcut = x
        x = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
        x = self.bn2(self.conv2(x))
        if self.se is not None:
            x = self.se(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        return self.act2(x + shortcut)


class SE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))


class TimmLikeNet(nn.Module):
    """timm's ResNet stem names (act1) and a mix of fusable and unfusable blocks."""

    def __init__(self, bad_blocks=True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU(inplace=True)
        down = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
        blocks = [TimmLikeBlock(8, 8), TimmLikeBlock(8, 16, 2, down)]
        if bad_blocks:
            blocks += [TimmLikeBlock(16, 16, se=True), TimmLikeBlock(16, 16, act=nn.SiLU)]
        self.layer1 = nn.Sequential(*blocks)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = self.layer1(self.act1(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def _randomise_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.3, 0.3), m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.3, 0.3)


def test_convert_fuses_timm_like_blocks_and_reports_the_rest(eager_backend, capsys):
    torch.manual_seed(0)
    plain = TimmLikeNet()
    _randomise_bn(plain)
    fused = resnet_fast.convert(plain, verbose=True)
    summary = fused.resnet_fast_summary
    assert summary.fused == ["conv1+bn1+act1", "layer1.0", "layer1.1"]
    skipped = dict(summary.skipped)
    assert set(skipped) == {"layer1.2", "layer1.3"}
    assert "se" in skipped["layer1.2"] and "SiLU" in skipped["layer1.3"]
    assert "skipped layer1.3: activation act1 is SiLU, not ReLU" in capsys.readouterr().out
    assert isinstance(fused.layer1[0], BasicBlock) and isinstance(fused.layer1[2], TimmLikeBlock)
    assert isinstance(fused.conv1, FusedStemConv) and type(plain.conv1) is nn.Conv2d
    assert type(plain.layer1[0]) is TimmLikeBlock  # inplace=False: the input is untouched
    x = torch.randn(2, 3, 8, 8)
    for mode in ("eval", "train"):
        getattr(fused, mode)(), getattr(plain, mode)()
        torch.testing.assert_close(fused(x), plain(x))


@pytest.mark.parametrize("bad", ["frozen_bn", "conv_bias", "avg_down", "drop_path"])
def test_unfusable_block_parts_are_left_alone(bad):
    block = reference.BasicBlock(8, 8)
    if bad == "frozen_bn":
        class FrozenBatchNorm2d(nn.BatchNorm2d):
            pass
        block.bn2 = FrozenBatchNorm2d(8)
    elif bad == "conv_bias":
        block.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=True)
    elif bad == "avg_down":
        block.downsample = nn.Sequential(nn.AvgPool2d(1), nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))
    else:
        block.drop_path = nn.Dropout(0.1)
    model = resnet_fast.convert(nn.Sequential(block))
    assert type(model[0]) is reference.BasicBlock
    (name, reason), = model.resnet_fast_summary.skipped
    assert name == "0" and reason


def test_state_dict_and_parameters_are_shared():
    torch.manual_seed(0)
    plain = models.resnet20(fused=False, num_classes=4)
    before = plain.state_dict()
    params = list(plain.parameters())
    fused = resnet_fast.convert(plain, inplace=True)
    assert fused is plain
    after = fused.state_dict()
    assert list(after) == list(before)
    for key in before:
        assert after[key] is before[key] or after[key].data_ptr() == before[key].data_ptr(), key
    assert all(a is b for a, b in zip(fused.parameters(), params))
    # A torchvision-format checkpoint loads strictly into the fused model, and back into the plain one.
    fused.load_state_dict(models.resnet20(fused=False, num_classes=4).state_dict())
    models.resnet20(fused=False, num_classes=4).load_state_dict(fused.state_dict())


def test_optimizer_built_before_convert_keeps_training_the_same_tensors(eager_backend):
    torch.manual_seed(0)
    model = models.CifarResNet(8, num_classes=4, fused=False)
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    resnet_fast.convert(model, inplace=True)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    start = model.layer2[0].conv1.weight.detach().clone()
    for _ in range(2):
        for m, o in ((model, opt), (twin, twin_opt)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    assert not torch.equal(model.layer2[0].conv1.weight, start)
    for (k, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


def test_revert_round_trip(eager_backend):
    torch.manual_seed(0)
    fused = models.resnet20(num_classes=4)
    plain = resnet_fast.revert(fused)
    assert not any(isinstance(m, (BasicBlock, Bottleneck, FusedStemConv)) for m in plain.modules())
    assert type(plain.bn1) is nn.BatchNorm2d and type(plain.relu) is nn.ReLU
    assert type(plain.layer1[0]).__name__ == "BasicBlock" and isinstance(fused.layer1[0], BasicBlock)
    assert list(plain.state_dict()) == list(fused.state_dict())
    x = torch.randn(2, 3, 8, 8)
    fused.eval(), plain.eval()
    torch.testing.assert_close(plain(x), fused(x))
    again = resnet_fast.convert(plain)
    assert again.resnet_fast_summary.fused == models.resnet20().resnet_fast_summary.fused


def test_sync_bn_convert_and_revert():
    model = resnet_fast.convert(models.resnet20(fused=False), sync_bn=True)
    assert model.resnet_fast_summary.sync_bn == 19  # stem + 9 blocks x 2 (option A: no downsample BN)
    assert isinstance(model.bn1, resnet_fast.nn.FoldedSyncBatchNorm2d)
    assert isinstance(model.layer1[0].bn1, resnet_fast.nn.SyncBatchNorm2d)
    plain = resnet_fast.revert(model)
    assert all(type(m) is nn.BatchNorm2d for m in plain.modules() if isinstance(m, nn.BatchNorm2d))
    # Syncing a model that was converted before reaches the folded stem BN too, and the stem computes with it.
    again = resnet_fast.convert(models.resnet20(), sync_bn=True)
    assert again.resnet_fast_summary.sync_bn == 19
    assert isinstance(again.bn1, resnet_fast.nn.FoldedSyncBatchNorm2d) and again.conv1._stem_bn is again.bn1


def test_convert_argument_errors():
    with pytest.raises(TypeError, match="nn.Module"):
        resnet_fast.convert("resnet")
    with pytest.raises(ValueError, match="not the block itself"):
        resnet_fast.convert(reference.BasicBlock(4, 4))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_torch_compile_has_no_graph_breaks(eager_backend, mode):
    torch._dynamo.reset()
    model = getattr(resnet_fast.convert(TimmLikeNet(bad_blocks=False)), mode)()
    explained = torch._dynamo.explain(model)(torch.randn(2, 3, 8, 8))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    torch._dynamo.reset()


def test_torch_compile_kernel_path_has_no_graph_breaks(kernel_device, triton_backend):
    torch._dynamo.reset()
    model = resnet_fast.convert(TimmLikeNet(bad_blocks=False)).to(kernel_device).eval()
    resnet_fast.reset_stats()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(torch.randn(2, 3, 8, 8, device=kernel_device))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert resnet_fast.stats()["kernel_calls"].get("conv2d", 0) > 0  # the custom op ran, not eager
    torch._dynamo.reset()


def test_activation_checkpointing_gives_the_same_gradients(eager_backend):
    torch.manual_seed(0)
    model = models.CifarResNet(8, num_classes=4)
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)

    def run(m, ckpt):
        h = m.relu(m.bn1(m.conv1(x)))
        for layer in (m.layer1, m.layer2, m.layer3):
            for block in layer:
                h = checkpoint(block, h, use_reentrant=False) if ckpt else block(h)
        m.fc(h.mean((2, 3))).square().sum().backward()

    run(model, ckpt=False)
    run(twin, ckpt=True)
    for (k, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=k)


def test_fused_block_honours_bn_changes_between_eval_calls(eager_backend, monkeypatch):
    # No stale folded cache: whichever path runs, a BN weight change between calls shows in the output.
    for backend in ("eager", "triton"):
        monkeypatch.setenv("RESNET_FAST_BACKEND", backend)
        torch.manual_seed(0)
        block = BasicBlock(4, 4).eval()
        x = torch.randn(2, 4, 6, 6)
        plain = reference.BasicBlock(4, 4).eval()
        with torch.no_grad():
            first = block(x)
            block.bn2.weight.mul_(3)
            plain.load_state_dict(block.state_dict())
            assert not torch.allclose(first, block(x))
            torch.testing.assert_close(block(x), plain(x), rtol=2e-3, atol=2e-3)
        if backend == "triton":
            assert resnet_fast.stats()["kernel_calls"]["block"] == 3 and "block" not in resnet_fast.stats()["fallbacks"]


def test_torchvision_models_convert_and_revert(eager_backend):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    for build, size in ((tv.models.resnet18, 32), (tv.models.resnext50_32x4d, 32)):
        plain = build(num_classes=3)
        fused = resnet_fast.convert(plain)
        assert not fused.resnet_fast_summary.skipped
        assert list(fused.state_dict()) == list(plain.state_dict())
        x = torch.randn(1, 3, size, size)
        fused.eval(), plain.eval()
        torch.testing.assert_close(fused(x), plain(x))
        back = resnet_fast.revert(fused)
        assert type(back.layer1[0]) is type(plain.layer1[0])


def test_timm_models_convert(eager_backend):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    plain = timm.create_model("resnet18", num_classes=3).eval()
    fused = resnet_fast.convert(plain)
    assert not fused.resnet_fast_summary.skipped and len(fused.resnet_fast_summary.fused) == 9
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(fused(x), plain(x))
    se = resnet_fast.convert(timm.create_model("seresnet18", num_classes=3))
    assert len(se.resnet_fast_summary.skipped) == 8


@pytest.mark.gpu
def test_cuda_graph_captures_a_training_step():
    torch.manual_seed(0)
    model = models.resnet20(num_classes=4).cuda()
    twin = copy.deepcopy(model)
    x = torch.randn(8, 3, 32, 32, device="cuda")
    graphed = torch.cuda.make_graphed_callables(model, (x,))
    (graphed(x).square().sum()).backward()
    twin(x).square().sum().backward()
    for (k, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-3, msg=k)
