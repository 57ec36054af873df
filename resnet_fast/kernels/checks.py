"""Input checks shared by the ops and the kernel launchers: a ValueError that names the argument, never a crash
in a kernel.

The ops validate what users pass; the launchers guard their own contract (shapes, dtypes, devices and the unit
strides the kernels index with), so a launcher called directly fails just as clearly. Both use the helpers here:
the one dtype set the kernels compute in (:data:`FLOAT_DTYPES`), the one rule for when a dtype cannot run them
(:func:`kernel_dtype_blocker`) and the one ``check(cond, msg)``.
"""
from __future__ import annotations

import torch

from .. import _backend

__all__ = ["FLOAT_DTYPES", "check", "check_tensor", "check_like", "check_vector", "describe", "kernel_dtype_blocker",
           "check_operand_dtype", "check_pow2"]

# The dtypes the Triton kernels compute in (activations and weights); per-channel vectors may be any of them.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check(cond: bool, msg: str) -> None:
    """ValueError(msg) unless ``cond``."""
    if not cond:
        raise ValueError(msg)


def describe(t) -> str:
    """A tensor's shape, dtype and device for an error message (or the type name of a non-tensor)."""
    return f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__


def kernel_dtype_blocker(dtype: torch.dtype) -> str | None:
    """Why the Triton kernels cannot compute in ``dtype`` here, or None when they can: a dtype outside
    :data:`FLOAT_DTYPES`, or bfloat16 in the Triton interpreter, whose bf16 ``tl.dot`` returns wrong results."""
    if dtype not in FLOAT_DTYPES:
        return f"dtype {dtype} has no kernel (float32/float16/bfloat16 only)"
    if dtype == torch.bfloat16 and _backend.interpreting():
        return "bf16 tl.dot is wrong in the Triton interpreter"
    return None


def check_tensor(name: str, t, shape, dtype: torch.dtype | None, device: torch.device, who: str) -> None:
    """``t`` is a tensor of ``shape`` (and ``dtype`` unless None) on ``device``; any strides."""
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape) or t.device != device \
            or (dtype is not None and t.dtype != dtype):
        raise ValueError(f"{who}: {name} must be a {tuple(shape)} {dtype or ''} tensor on {device}, "
                         f"got {describe(t)}")


def check_like(name: str, t, ref: torch.Tensor, ref_name: str, who: str) -> None:
    """``t`` has ``ref``'s shape, dtype, device and strides: a tensor a kernel indexes with ``ref``'s offsets."""
    check_tensor(name, t, ref.shape, ref.dtype, ref.device, who)
    if t.stride() != ref.stride():
        raise ValueError(f"{who}: {name} must have {ref_name}'s strides {ref.stride()}, got {t.stride()}")


def check_vector(name: str, t, n: int, device: torch.device, who: str, dtypes=(torch.float32,),
                 contiguous: bool = True) -> None:
    """``t`` is a per-channel vector the kernels index as ``ptr + c``: 1-D, ``n`` elements, on ``device``, dtype
    in ``dtypes``, and (``contiguous``) unit stride."""
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != n or t.device != device \
            or t.dtype not in dtypes or (contiguous and n > 1 and t.stride(0) != 1):
        raise ValueError(f"{who}: {name} must be a {'contiguous ' if contiguous else ''}[{n}] tensor of dtype "
                         f"{' or '.join(str(d).replace('torch.', '') for d in dtypes)} on {device}, "
                         f"got {describe(t)}")


def check_operand_dtype(name: str, t, who: str) -> None:
    """``t`` is a 4-D fp32/fp16/bf16 tensor (the operand dtype of a conv kernel), else ValueError naming ``name``;
    RuntimeError where the kernels cannot run that dtype (:func:`kernel_dtype_blocker`: bf16 in the Triton
    interpreter, an error rather than garbage; the ops fall back to eager there)."""
    if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{who}: {name} must be a 4-D float32/float16/bfloat16 tensor, got {describe(t)}")
    why = kernel_dtype_blocker(t.dtype)
    if why is not None:
        raise RuntimeError(f"{who}: {why}; use fp16/fp32 on CPU")


def check_pow2(who: str, **sizes) -> None:
    """Each of ``sizes`` (config block sizes, by name) is a power-of-two int, else ValueError naming it."""
    for name, v in sizes.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1 or v & (v - 1):
            raise ValueError(f"{who}: config {name} must be a power of two, got {v!r}")
