"""Numerics helpers shared by the test files."""
import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖out − ref‖ / ‖ref‖`` in float64 on the CPU (either may be on any device, any dtype, with grad).

    An all-zero reference (e.g. dx of pixels no output reads) must be matched exactly: any difference then gives
    a huge error rather than 0/0."""
    out = out.detach().cpu().double()
    ref = ref.detach().cpu().double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def tensor_core_dtypes(device: str) -> list:
    """The 16-bit dtypes a tensor-core kernel test covers on ``device``: fp16, and bf16 on the GPU only (the
    interpreter's bf16 ``tl.dot`` is wrong)."""
    return [torch.float16] + ([torch.bfloat16] if device == "cuda" else [])
