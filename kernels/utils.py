"""Host-side helpers shared by the kernels (Liger-Kernel's ops/utils.py role)."""
from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (kernels then run on CPU tensors; CI tests them that way)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(*tensors: torch.Tensor) -> bool:
    """True when a Triton kernel can run: CUDA tensors, or any tensors under ``TRITON_INTERPRET=1``."""
    return interpreting() or all(x.is_cuda for x in tensors)


def acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float64 when any input is float64, else float32."""
    return torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32
