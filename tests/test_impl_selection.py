"""Each conv op runs the implementation the chooser picks (``RESNET_FAST_CONV_IMPL`` = triton | cudnn | auto).

Converted torchvision-style blocks (``resnet_fast.nn.reference`` BasicBlock and Bottleneck, stride 1 and 2 with a
downsample) train and evaluate like the plain float64 blocks under each setting (Triton interpreter, fp32, small
shapes): outputs, every gradient, running statistics, SGD steps. ``torch.profiler`` shows which ATen ops ran: none
of ATen's convolutions under ``triton``; under ``cudnn`` ATen's convolution, and no ATen BatchNorm, ReLU or
activation-sized add/mul. The training backward computes only the gradients autograd asks for (launches counted),
and the chooser's timing runs are not counted.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import resnet_fast
from resnet_fast import _backend
from resnet_fast import nn as rnn
from resnet_fast.kernels import autotune, bn_dy, conv_dgrad, conv_fwd, conv_wgrad, tuning_table
from resnet_fast.nn import reference
from resnet_fast.ops import _common, conv_cudnn
from helpers import rel_err

CL = torch.channels_last
N = 3  # the batch: no channel count is 3, so a 4-D shape [3, ...] is an activation, never a weight
STEPS = 2


def _ds(cin, cout, stride):
    return torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 1, stride=stride, bias=False), torch.nn.BatchNorm2d(cout))


# name: (plain block constructor, input channels)
CASES = {
    "basic_s1": (lambda: reference.BasicBlock(8, 8), 8),
    "basic_s2_ds": (lambda: reference.BasicBlock(4, 8, stride=2, downsample=_ds(4, 8, 2)), 4),
    "bottleneck_s1_ds": (lambda: reference.Bottleneck(8, 4, downsample=_ds(8, 16, 1)), 8),
    "bottleneck_s2_ds": (lambda: reference.Bottleneck(8, 4, stride=2, downsample=_ds(8, 16, 2)), 8),
}


@pytest.fixture
def conv_impl(request, monkeypatch):
    """RESNET_FAST_CONV_IMPL=<param> with the kernels forced (interpreted on CPU); fresh counters."""
    monkeypatch.setenv("RESNET_FAST_BACKEND", "triton")
    monkeypatch.setenv("RESNET_FAST_CONV_IMPL", request.param)
    resnet_fast.reset_stats()
    yield request.param
    resnet_fast.reset_stats()


def _expected(setting):
    """The implementation every conv must run, or None when the GPU measures it (auto on CUDA). In the
    interpreter auto means the Triton kernels."""
    if setting != "auto":
        return setting
    return "triton" if _backend.interpreting() else None


def _check_impls(model, convs, roles, calls, setting):
    """``stats()["impl_calls"]`` has ``calls`` calls per role, each conv's record names one implementation per
    role, and both say ``setting``'s implementation when it is fixed."""
    want = _expected(setting)
    st = resnet_fast.stats()
    assert set(st["impl_calls"]) == set(roles), st
    for role in roles:
        assert sum(st["impl_calls"][role].values()) == calls, st
        if want is not None:
            assert st["impl_calls"][role] == {want: calls}, st
    record = resnet_fast.conv_implementations(model)
    assert sorted(record) == convs and all(set(r) == set(roles) for r in record.values()), record
    if want is not None:
        assert all(impl == want for r in record.values() for impl in r.values()), record


def _models(case, device):
    """(float64 plain block, float32 converted Sequential holding the fused block) with identical state."""
    make, cin = CASES[case]
    torch.manual_seed(0)
    plain = make()
    with torch.no_grad():
        for m in plain.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    model = resnet_fast.convert(torch.nn.Sequential(copy.deepcopy(plain))).float().to(device)
    assert isinstance(model[0], (rnn.BasicBlock, rnn.Bottleneck)), model.resnet_fast_summary
    return plain.double(), model, cin


def _conv_names(model):
    return sorted(f"0.{n}" for n, m in model[0].named_modules() if isinstance(m, torch.nn.Conv2d))


def _input(cin, seed, device, scale=1.0, shift=0.0):
    gen = torch.Generator().manual_seed(seed)
    x64 = (torch.randn(N, cin, 6, 6, generator=gen, dtype=torch.float64) * scale + shift).requires_grad_(True)
    x = x64.detach().float().to(device).contiguous(memory_format=CL).requires_grad_(True)
    return x64, x


def _compare_step(plain, model, x64, x, out_p, out_f, what):
    assert out_f.dtype == torch.float32 and out_f.shape == out_p.shape
    assert rel_err(out_f, out_p) < 1e-4, f"{what} output {rel_err(out_f, out_p):.2e}"
    g = torch.randn(out_p.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    out_p.backward(g)
    out_f.backward(g.float().to(out_f.device))
    assert rel_err(x.grad, x64.grad) < 1e-3, f"{what} input grad {rel_err(x.grad, x64.grad):.2e}"
    for (name, p), (_, q) in zip(plain.named_parameters(), model[0].named_parameters()):
        assert rel_err(q.grad, p.grad) < 1e-3, f"{what} grad {name}: {rel_err(q.grad, p.grad):.2e}"


@pytest.mark.parametrize("conv_impl", ["triton", "cudnn", "auto"], indirect=True)
@pytest.mark.parametrize("case", list(CASES))
def test_block_trains_and_evaluates_like_float64(case, conv_impl, kernel_device):
    plain, model, cin = _models(case, kernel_device)
    convs = _conv_names(model)
    opt_p = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    opt_f = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(STEPS):
        x64, x = _input(cin, step, kernel_device, scale=1 + step, shift=0.3 * step)
        opt_p.zero_grad()
        opt_f.zero_grad()
        _compare_step(plain, model, x64, x, plain(x64), model(x), f"train step {step}")
        for (name, b), (_, c) in zip(plain.named_buffers(), model[0].named_buffers()):
            if b.is_floating_point():
                assert rel_err(c, b) < 1e-5, f"step {step} buffer {name}: {rel_err(c, b):.2e}"
            else:
                assert int(c.cpu()) == int(b), name
        opt_p.step()
        opt_f.step()
    for (name, p), (_, q) in zip(plain.named_parameters(), model[0].named_parameters()):
        assert rel_err(q, p) < 1e-4, f"weight {name} after {STEPS} steps: {rel_err(q, p):.2e}"
    _check_impls(model, convs, ("conv_bn_stats", "conv_bn_stats_backward"), STEPS * len(convs), conv_impl)
    st = resnet_fast.stats()
    assert st["kernel_calls"]["block_train"] == STEPS and not st["fallbacks"], st
    if conv_impl == "auto" and _backend.interpreting():  # decided without a key: nothing measured or remembered
        assert not any(k.startswith("impl:") for k in autotune.tuning_sources())

    # eval: folded BN on the inference op, its backward under autograd (frozen statistics)
    plain.eval()
    model.eval()
    resnet_fast.reset_stats()
    opt_p.zero_grad()
    opt_f.zero_grad()
    x64, x = _input(cin, 10, kernel_device)
    _compare_step(plain, model, x64, x, plain(x64), model(x), "eval")
    _check_impls(model, convs, ("conv2d", "conv2d_backward"), len(convs), conv_impl)


# ------------------------------------------------------------------------------------------------ profiler
ATEN_CONVS = {"aten::conv2d", "aten::convolution", "aten::_convolution", "aten::convolution_backward",
              "aten::mkldnn_convolution", "aten::cudnn_convolution", "aten::_convolution_backward",
              "aten::mkldnn_convolution_backward", "aten::cudnn_convolution_backward",
              "aten::cudnn_convolution_relu", "aten::cudnn_convolution_add_relu", "aten::thnn_conv2d",
              "aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward", "aten::slow_conv_dilated2d"}
ATEN_BN_RELU = {"aten::batch_norm", "aten::_batch_norm_impl_index", "aten::native_batch_norm",
                "aten::_native_batch_norm_legit", "aten::_native_batch_norm_legit_no_training",
                "aten::cudnn_batch_norm", "aten::native_batch_norm_backward", "aten::cudnn_batch_norm_backward",
                "aten::relu", "aten::relu_", "aten::threshold_backward", "aten::clamp_min", "aten::clamp_min_"}
ELEMENTWISE = {"aten::add", "aten::add_", "aten::mul", "aten::mul_", "aten::addcmul", "aten::addcmul_"}


def _engine_accumulation(event) -> bool:
    """The autograd engine summing the gradients of a tensor used twice (eager PyTorch does the same)."""
    parent = event.cpu_parent
    return parent is not None and (parent.name.startswith("autograd::engine::evaluate_function")
                                   or parent.name == "torch::autograd::AccumulateGrad")


def _profiled_steps(model, cin, device):
    """ATen events of one training step and one eval forward + backward (fresh inputs, so no x.grad to add to)."""
    inputs = [(train, _input(cin, seed, device)[1]) for train, seed in ((True, 20), (False, 21))]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for train, x in inputs:
            model.train(train)
            out = model(x)
            out.backward(torch.ones_like(out))
    return [e for e in prof.events() if e.name.startswith("aten::")]


@pytest.mark.parametrize("conv_impl", ["triton", "cudnn"], indirect=True)
@pytest.mark.parametrize("case", ["basic_s1", "bottleneck_s2_ds"])
def test_profiler_sees_only_the_chosen_implementation(case, conv_impl, kernel_device):
    _, model, cin = _models(case, kernel_device)
    model(_input(cin, 19, kernel_device)[1]).sum().backward()  # first calls outside the profile (packing...)
    events = _profiled_steps(model, cin, kernel_device)
    ran = {e.name for e in events}
    if conv_impl == "triton":
        assert not ran & ATEN_CONVS, sorted(ran & ATEN_CONVS)
        return
    assert {"aten::convolution", "aten::convolution_backward"} <= ran, sorted(ran)
    assert not ran & ATEN_BN_RELU, sorted(ran & ATEN_BN_RELU)
    activation_math = [(e.name, e.input_shapes) for e in events if e.name in ELEMENTWISE
                       and any(len(s) == 4 and s[0] == N for s in e.input_shapes if isinstance(s, list))
                       and not _engine_accumulation(e)]
    assert not activation_math, activation_math


# --------------------------------------------------------------------------- only the gradients asked for
class Launches:
    """Counts dgrad and wgrad GEMMs on both implementations (the Triton launchers, ATen's backward)."""

    def __init__(self, monkeypatch):
        self.dgrad = self.wgrad = 0
        for mod, name, kind in ((conv_dgrad, "conv2d_dgrad_nhwc", "dgrad"),
                                (conv_wgrad, "conv2d_wgrad_nhwc", "wgrad")):
            monkeypatch.setattr(mod, name, self._counting(getattr(mod, name), kind))
        aten_bwd = conv_cudnn._aten_conv_backward

        def counted(dy, a, weight, g, need_input, need_weight):
            self.dgrad += bool(need_input)
            self.wgrad += bool(need_weight)
            return aten_bwd(dy, a, weight, g, need_input, need_weight)
        monkeypatch.setattr(conv_cudnn, "_aten_conv_backward", counted)

    def _counting(self, fn, kind):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            setattr(self, kind, getattr(self, kind) + 1)
            return fn(*args, **kwargs)
        return run

    def take(self):
        got = (self.dgrad, self.wgrad)
        self.dgrad = self.wgrad = 0
        return got


def _stats_case(prologue, device):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(N, 8, 6, 6, generator=gen).to(device).contiguous(memory_format=CL)
    w = (torch.randn(12, 8, 3, 3, generator=gen) / 8).to(device)
    in_scale = in_shift = None
    if prologue:
        in_scale = (torch.rand(8, generator=gen) + 0.5).to(device)
        in_shift = (torch.randn(8, generator=gen) * 0.3).to(device)
    return x, w, in_scale, in_shift


def _stats_grads(x, w, in_scale, in_shift, needs):
    """Gradients of a loss of conv_bn_stats w.r.t. the leaves whose ``needs`` flag is set (x, w, scale, shift)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(n)
              for t, n in zip((x, w, in_scale, in_shift), needs)]
    y, mean, invstd = resnet_fast.ops.conv_bn_stats(*leaves, stride=1, padding=1)
    ramp = torch.linspace(-1, 1, y.numel(), device=y.device).view(y.shape)
    loss = (y.float() * ramp).sum() + mean.sum() + invstd.sum()
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    return torch.autograd.grad(loss, wanted) if wanted else ()


@pytest.mark.parametrize("conv_impl", ["triton", "cudnn"], indirect=True)
@pytest.mark.parametrize("prologue", [False, True])
def test_training_backward_runs_only_the_gradients_asked_for(conv_impl, prologue, monkeypatch, kernel_device):
    launches = Launches(monkeypatch)
    case = _stats_case(prologue, kernel_device)
    full = _stats_grads(*case, (True, True, prologue, prologue))
    assert launches.take() == (1, 1)
    expect = {  # (x, weight, in_scale, in_shift) needs -> (dgrad, wgrad) launches
        (False, True, prologue, prologue): (1 if prologue else 0, 1),  # the input image; a prologue's sums
        (True, False, prologue, prologue): (1, 0),
        (False, True, False, False): (0, 1),
    }
    for needs, want in expect.items():
        got = _stats_grads(*case, needs)
        assert launches.take() == want, (needs, want)
        wanted = [f for f, n, t in zip(full, needs, case) if t is not None and n]
        for g, f in zip(got, wanted):
            assert torch.equal(g, f)  # the same computation, only less of it


@pytest.mark.parametrize("conv_impl", ["triton", "cudnn"], indirect=True)
def test_block_input_without_grad_runs_no_first_dgrad(conv_impl, monkeypatch, kernel_device):
    # the network's input image: conv1 and the downsample conv read it without a prologue, so no dgrad for them;
    # conv2/conv3 still need theirs (their prologue's BN parameters train)
    _, model, cin = _models("bottleneck_s2_ds", kernel_device)
    launches = Launches(monkeypatch)
    x = _input(cin, 30, kernel_device)[1].detach()
    model(x).sum().backward()
    assert launches.take() == (2, 4)


@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"])
@pytest.mark.parametrize("case", ["bottleneck_s2_ds", "basic_s1"])
def test_dy_pass_backward_trains_like_float64(case, tf32, monkeypatch, kernel_device):
    """``triton_dy_pass`` (dy formed once by form_dy, then plain dgrad/wgrad), offered for every conv with at least
    4 taps (in IEEE fp32 only those without a BN+ReLU prologue: bn_dy.dy_pass_may_pay) and picked here wherever
    offered: the same gradients as the float64 block, the other convs on triton."""
    if tf32 and kernel_device == "cuda":
        pytest.skip("TF32 changes the GPU's fp32 numerics (the interpreter computes its dots in fp32 either way)")
    monkeypatch.setenv("RESNET_FAST_BACKEND", "triton")
    monkeypatch.delenv("RESNET_FAST_CONV_IMPL", raising=False)
    monkeypatch.setattr(_common, "choose_impl", lambda role, geom, dtype, device, switches, runners:
                        "triton_dy_pass" if "triton_dy_pass" in runners else "triton")
    formed = []
    real_form_dy = bn_dy.form_dy
    monkeypatch.setattr(bn_dy, "form_dy", lambda *a, **k: formed.append(1) or real_form_dy(*a, **k))
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        resnet_fast.reset_stats()
        plain, model, cin = _models(case, kernel_device)
        x64, x = _input(cin, 3, kernel_device, scale=2.0, shift=0.3)
        _compare_step(plain, model, x64, x, plain(x64), model(x), "dy pass step")
    finally:
        torch.set_float32_matmul_precision(precision)
    # conv1 reads the block's input as is; conv2 and conv3 have the previous BN+ReLU as their prologue
    taps = [name for name, m in model[0].named_modules() if isinstance(m, torch.nn.Conv2d)
            and m.kernel_size[0] * m.kernel_size[1] > 3 and (tf32 or name.endswith("conv1"))]
    calls = resnet_fast.stats()["impl_calls"]["conv_bn_stats_backward"]
    assert calls.get("triton_dy_pass", 0) == len(taps) == len(formed), calls
    assert calls.get("triton", 0) == len(_conv_names(model)) - len(taps), calls
    if tf32:
        assert taps


# ------------------------------------------------------------------------------------- the timed choice
H200 = tuning_table.DeviceIdentity("NVIDIA H200", (9, 0))


def test_timed_choice_is_not_counted_and_reuses_the_winners_output(monkeypatch, tmp_path, kernel_device):
    """As on a GPU (a made-up identity, a fake timer: the composite is the faster): both implementations run
    for the measurement, the call is counted once, the winner is not run again, and later calls run it alone."""
    monkeypatch.setenv("RESNET_FAST_BACKEND", "triton")
    monkeypatch.setenv("RESNET_FAST_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("RESNET_FAST_CONV_IMPL", raising=False)
    monkeypatch.setattr(autotune, "_TUNER", autotune.Autotuner(table_dir=str(tmp_path / "tuned")))
    ms = {"triton": 2.0, "cudnn": 1.0}
    order = []

    def timer(fn):
        fn()
        return ms[order[-1]]
    monkeypatch.setattr(_common, "choose_impl", functools.partial(
        autotune.choose_impl, identity=H200, interpreting=lambda: False, capturing=lambda: False,
        compiling=lambda: False, timer=timer))
    for name, mod, attr in (("cudnn", conv_cudnn, "conv_bn_stats"), ("triton", conv_fwd, "conv2d_nhwc")):
        real = getattr(mod, attr)

        def tracked(*a, _real=real, _name=name, **k):
            order.append(_name)
            return _real(*a, **k)
        monkeypatch.setattr(mod, attr, tracked)
    resnet_fast.reset_stats()
    x, w, in_scale, in_shift = _stats_case(True, kernel_device)
    y, mean, invstd = resnet_fast.ops.conv_bn_stats(x, w, in_scale, in_shift, stride=1, padding=1)
    assert order == ["triton", "triton", "cudnn", "cudnn"]  # untimed + timed each; the winner not run again
    st = resnet_fast.stats()
    assert st["impl_calls"] == {"conv_bn_stats": {"cudnn": 1}} and st["kernel_calls"] == {"conv_bn_stats": 1}
    (key,) = [k for k in autotune.tuning_report() if k.startswith("impl:conv_bn_stats|")]
    assert autotune.tuning_report()[key]["winner"] == "cudnn" and autotune.tuning_sources()[key] == "tuned"
    order.clear()
    y2, _, _ = resnet_fast.ops.conv_bn_stats(x, w, in_scale, in_shift, stride=1, padding=1)
    assert order == ["cudnn"] and torch.equal(y2, y)
    monkeypatch.setenv("RESNET_FAST_CONV_IMPL", "triton")
    y_t, mean_t, invstd_t = resnet_fast.ops.conv_bn_stats(x, w, in_scale, in_shift, stride=1, padding=1)
    assert rel_err(y, y_t) < 2e-5 and rel_err(mean, mean_t) < 1e-5 and rel_err(invstd, invstd_t) < 1e-5
    assert resnet_fast.stats()["impl_calls"]["conv_bn_stats"] == {"cudnn": 2, "triton": 1}


def test_conv_implementations_needs_a_module():
    with pytest.raises(TypeError, match="conv_implementations: expected an nn.Module"):
        resnet_fast.conv_implementations({"conv1": None})
