"""The backend policy: RESNET_FAST_BACKEND parsing, and fallbacks that are logged once and counted."""
import logging

import pytest
import torch

import resnet_fast
from resnet_fast import _backend


def test_invalid_backend_is_refused(monkeypatch):
    monkeypatch.setenv("RESNET_FAST_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="RESNET_FAST_BACKEND='cudnn'"):
        _backend.backend()


def test_eager_backend_is_not_a_fallback(eager_backend):
    assert not _backend.use_kernels("op", torch.device("cpu"))
    assert resnet_fast.stats()["fallbacks"] == {}


def test_triton_backend_uses_interpreter_on_cpu(triton_backend):
    if torch.cuda.is_available():
        pytest.skip("interpreter only matters without CUDA")
    assert _backend.interpreting()
    assert _backend.use_kernels("op", torch.device("cpu"))


def test_auto_on_cpu_falls_back_logged_once_and_counted(monkeypatch, caplog):
    monkeypatch.setenv("RESNET_FAST_BACKEND", "auto")
    resnet_fast.reset_stats()
    with caplog.at_level(logging.WARNING, logger="resnet_fast"):
        for _ in range(3):
            assert not _backend.use_kernels("conv2d", torch.device("cpu"))
    warnings = [r for r in caplog.records if "conv2d falls back" in r.getMessage()]
    assert len(warnings) == 1
    (count,) = resnet_fast.stats()["fallbacks"]["conv2d"].values()
    assert count == 3
    resnet_fast.reset_stats()
    assert resnet_fast.stats()["fallbacks"] == {}


def test_kernel_calls_are_counted():
    resnet_fast.reset_stats()
    _backend.record_kernel_call("conv2d")
    _backend.record_kernel_call("conv2d")
    assert resnet_fast.stats()["kernel_calls"] == {"conv2d": 2}
    resnet_fast.reset_stats()


def test_impl_calls_counted_per_role_and_recorded_per_owner():
    resnet_fast.reset_stats()
    conv = torch.nn.Conv2d(2, 2, 1)
    with _backend.conv_owner(conv):
        _backend.record_impl_call("conv2d", "triton")
        with _backend.counting_paused():  # the chooser's timing runs
            _backend.record_impl_call("conv2d", "cudnn")
            _backend.record_kernel_call("conv2d")
            _backend.record_fallback("conv2d", "timing")
        _backend.record_impl_call("conv2d_backward", "cudnn")
    _backend.record_impl_call("conv2d", "cudnn")  # no owner: counted, not recorded for a layer
    st = resnet_fast.stats()
    assert st["impl_calls"] == {"conv2d": {"cudnn": 1, "triton": 1}, "conv2d_backward": {"cudnn": 1}}
    assert st["kernel_calls"] == {} and st["fallbacks"] == {}
    assert _backend.implementations_of(conv) == {"conv2d": "triton", "conv2d_backward": "cudnn"}
    assert _backend.current_conv_owner() is None
    resnet_fast.reset_stats()
    assert resnet_fast.stats()["impl_calls"] == {} and _backend.implementations_of(conv) == {}
