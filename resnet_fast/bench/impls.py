"""Build every implementation of an op, block or model from public APIs only.

``resnet_fast`` rows go through ``resnet_fast.ops`` / ``resnet_fast.nn`` / ``resnet_fast.models`` /
``resnet_fast.convert``; a missing API raises :class:`~.runner.Unavailable` with the reason. Reference rows use
:mod:`.reference` (torchvision when importable). Nothing here times anything.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import reference, shapes
from .runner import DTYPES, Unavailable


def rf_attr(module: str, name: str):
    """``resnet_fast.<module>.<name>``, or Unavailable saying why not."""
    try:
        mod = importlib.import_module(f"resnet_fast.{module}" if module else "resnet_fast")
    except Exception as exc:  # noqa: BLE001
        raise Unavailable(f"import resnet_fast.{module} failed: {type(exc).__name__}: {exc}") from None
    fn = getattr(mod, name, None)
    if fn is None:
        raise Unavailable(f"resnet_fast{'.' + module if module else ''}.{name} does not exist yet")
    return fn


# ---- precision / layout policy --------------------------------------------------------------------------

def is_reference_fp32(impl: str) -> bool:
    return impl == "eager_fp32_nchw"


def act_dtype(impl: str, dtype: str) -> torch.dtype:
    return torch.float32 if is_reference_fp32(impl) else DTYPES[dtype]


def memory_format(impl: str, layout: str) -> torch.memory_format:
    if is_reference_fp32(impl) or layout == "nchw":
        return torch.contiguous_format
    return torch.channels_last


def autocast(impl: str, dtype: str, device: str):
    """bf16/fp16 autocast for every impl but the fp32 reference (module weights stay fp32, as in training)."""
    if is_reference_fp32(impl) or dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=DTYPES[dtype])


def compile_fn(fn, impl: str):
    """``torch.compile`` with the impl's mode (default, or max-autotune without CUDA graphs)."""
    if impl == "compile":
        return torch.compile(fn)
    if impl == "compile_max_autotune":
        return torch.compile(fn, mode="max-autotune-no-cudagraphs")
    raise ValueError(impl)


def freezing(enabled: bool):
    """``torch._inductor.config.freezing`` for compiled inference (weights folded as constants)."""
    if not enabled:
        return contextlib.nullcontext()
    import torch._inductor.config as inductor_config
    return inductor_config.patch(freezing=True)


def raise_recompile_limit(n: int = 64) -> None:
    """Many same-class blocks compiled in one run would otherwise hit dynamo's per-code recompile limit."""
    import torch._dynamo.config as dc
    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(dc, key):
            setattr(dc, key, max(n, getattr(dc, key)))


# ---- the residual tail ----------------------------------------------------------------------------------

def tail_eager(x, scale, shift, residual, res_scale=None, res_shift=None, relu=True):
    """The eager PyTorch expression of ``bn_add_relu``: per-channel affine on x (and optionally residual)."""
    view = (1, -1, 1, 1)
    y = x * scale.view(view) + shift.view(view)
    r = residual if res_scale is None else residual * res_scale.view(view) + res_shift.view(view)
    y = y + r
    return (torch.relu(y) if relu else y).to(x.dtype)


def tail_fn(impl: str):
    if impl.startswith("resnet_fast"):
        return rf_attr("ops", "bn_add_relu")
    if impl == "eager":
        return tail_eager
    if impl.startswith("compile"):
        return compile_fn(tail_eager, impl)
    raise Unavailable(f"{impl} is not an implementation of the residual tail")


# ---- convolution ----------------------------------------------------------------------------------------

def fold(bn: nn.BatchNorm2d):
    """(scale, shift) of an eval-mode BN through ``resnet_fast.ops.fold_bn``."""
    fold_bn = rf_attr("ops", "fold_bn")
    out = fold_bn(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise Unavailable(f"resnet_fast.ops.fold_bn returned {type(out).__name__}, expected (scale, shift)")
    return out


def fold_reference(bn: nn.BatchNorm2d):
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def conv_module(c: shapes.ConvShape) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    conv = nn.Conv2d(c.cin, c.cout, c.k, c.stride, c.padding, groups=c.groups, bias=False)
    return conv, reference.randomize_bn(nn.BatchNorm2d(c.cout)).eval()


def conv_eval_fn(impl: str, c: shapes.ConvShape, conv: nn.Conv2d, bn: nn.BatchNorm2d, *, device: str,
                 layout: str, dtype: torch.dtype, relu: bool = True):
    """Inference conv with BN folded: the fused epilogue for resnet_fast, a folded-weight conv for cuDNN.

    Weights are stored once in the activation dtype, as a deployed model does (no per-call casts).
    """
    fmt = memory_format(impl, layout)
    with torch.no_grad():
        if impl.startswith("resnet_fast"):
            conv2d = rf_attr("ops", "conv2d")
            scale, shift = fold(bn.to(device))
            w = conv.weight.detach().to(device, dtype).contiguous(memory_format=fmt)
            return lambda x: conv2d(x, w, stride=c.stride, padding=c.padding, groups=c.groups, scale=scale,
                                    shift=shift, relu=relu)
        if impl not in ("eager", "eager_fp32_nchw"):
            raise Unavailable(f"{impl} is not run in the conv suite")
        scale, shift = fold_reference(bn)
        w = (conv.weight * scale.view(-1, 1, 1, 1)).detach().to(device, dtype).contiguous(memory_format=fmt)
        b = shift.detach().to(device, dtype)

    def eager(x):
        y = F.conv2d(x, w, b, c.stride, c.padding, 1, c.groups)
        return F.relu(y) if relu else y
    return eager


def conv_train_fn(impl: str, c: shapes.ConvShape):
    """Training conv without epilogue (BN statistics are batch statistics, nothing to fold)."""
    if impl.startswith("resnet_fast"):
        conv2d = rf_attr("ops", "conv2d")
        return lambda x, w: conv2d(x, w, stride=c.stride, padding=c.padding, groups=c.groups)
    if impl in ("eager", "eager_fp32_nchw"):
        return lambda x, w: F.conv2d(x, w, None, c.stride, c.padding, 1, c.groups)
    raise Unavailable(f"{impl} is not run in the conv suite")


# ---- blocks and models ----------------------------------------------------------------------------------

def rf_block(shape: shapes.BlockShape, ref: nn.Module) -> nn.Module:
    """resnet_fast's block with ``ref``'s weights: its nn class (torchvision signature), else ``convert``."""
    cls_name = "BasicBlock" if shape.kind == "basic" else "Bottleneck"
    errors = []
    try:
        cls = rf_attr("nn", cls_name)
        blk = cls(shape.inplanes, shape.planes, shape.stride, reference.downsample(shape), groups=shape.groups,
                  base_width=shape.base_width)
        blk.load_state_dict(ref.state_dict())
        return blk
    except Exception as exc:  # noqa: BLE001
        errors.append(f"nn.{cls_name}: {exc}")
    try:
        return rf_attr("", "convert")(nn.Sequential(copy.deepcopy(ref)))[0]
    except Exception as exc:  # noqa: BLE001
        errors.append(f"convert: {exc}")
    raise Unavailable("; ".join(str(e).splitlines()[0][:150] for e in errors))


def rf_model(name: str, ref: nn.Module) -> nn.Module:
    """resnet_fast's model with ``ref``'s weights (identical state_dict keys), else ``convert(ref)``."""
    errors = []
    try:
        m = rf_attr("models", name)(num_classes=ref.fc.out_features)
        m.load_state_dict(ref.state_dict())
        return m
    except Exception as exc:  # noqa: BLE001
        errors.append(f"models.{name}: {exc}")
    try:
        return rf_attr("", "convert")(copy.deepcopy(ref))
    except Exception as exc:  # noqa: BLE001
        errors.append(f"convert: {exc}")
    raise Unavailable("; ".join(str(e).splitlines()[0][:150] for e in errors))


def module_for(impl: str, ref: nn.Module, device: str, layout: str, make_rf) -> nn.Module:
    """A device copy of ``ref`` (or resnet_fast's version of it) in the impl's memory format; fp32 weights."""
    m = make_rf() if impl.startswith("resnet_fast") else copy.deepcopy(ref)
    return m.to(device=device, memory_format=memory_format(impl, layout))


def wrap_compiled(m: nn.Module, impl: str, eval_mode: bool):
    """The callable that a row times: the module itself, or ``torch.compile`` of it."""
    if not impl.startswith("compile"):
        return m
    raise_recompile_limit()
    return compile_fn(m, impl)


def needs_freezing(impl: str, eval_mode: bool) -> bool:
    return eval_mode and impl.startswith("compile")


def device_of(x: Optional[torch.Tensor]) -> str:
    return x.device.type if x is not None else ("cuda" if torch.cuda.is_available() else "cpu")
