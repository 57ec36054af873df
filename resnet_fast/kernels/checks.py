"""Input checks shared by the kernel launchers: a ValueError that names the argument, never a crash in a kernel.

The ops above validate what users pass; these guard each launcher's own contract (shapes, dtypes, devices and
the unit strides the kernels index with), so a launcher called directly fails just as clearly.
"""
from __future__ import annotations

import torch

__all__ = ["check_tensor", "check_vector", "FLOAT_DTYPES"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _describe(t) -> str:
    return f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__


def check_tensor(name: str, t, shape, dtype: torch.dtype | None, device: torch.device, who: str) -> None:
    """``t`` is a tensor of ``shape`` (and ``dtype`` unless None) on ``device``; any strides."""
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape) or t.device != device \
            or (dtype is not None and t.dtype != dtype):
        raise ValueError(f"{who}: {name} must be a {tuple(shape)} {dtype or ''} tensor on {device}, "
                         f"got {_describe(t)}")


def check_vector(name: str, t, n: int, device: torch.device, who: str, dtypes=(torch.float32,),
                 contiguous: bool = True) -> None:
    """``t`` is a per-channel vector the kernels index as ``ptr + c``: 1-D, ``n`` elements, on ``device``, dtype
    in ``dtypes``, and (``contiguous``) unit stride."""
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != n or t.device != device \
            or t.dtype not in dtypes or (contiguous and n > 1 and t.stride(0) != 1):
        raise ValueError(f"{who}: {name} must be a {'contiguous ' if contiguous else ''}[{n}] tensor of dtype "
                         f"{' or '.join(str(d).replace('torch.', '') for d in dtypes)} on {device}, "
                         f"got {_describe(t)}")
