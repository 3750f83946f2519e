"""Host-side helpers shared by the kernels (Liger-Kernel's ops/utils.py role), and the one backend choice.

triton is a Linux dependency only. Without it every op still imports: its kernels are defined against a
stand-in whose ``jit`` gives kernels that refuse to launch, :func:`resolve_backend` picks the op's plain-torch
reference, and asking for ``backend="triton"`` explicitly raises :class:`KernelUnavailableError`.
"""
from __future__ import annotations

import contextlib
import os

import torch

from ..errors import ConfigError, KernelUnavailableError

BACKENDS = ("auto", "triton", "torch")


class _Unlaunchable:
    """A ``@triton.jit`` kernel defined without triton: launching it is an error (resolve_backend never does)."""

    def __init__(self, name: str):
        self.__name__ = name

    def __getitem__(self, grid):
        raise KernelUnavailableError(f"Triton kernel {self.__name__} cannot run: triton is not installed")

    def __call__(self, *args, **kwargs):
        raise KernelUnavailableError(f"Triton helper {self.__name__} cannot run: triton is not installed")


class _TritonStandIn:
    """Stands in for ``triton`` and ``triton.language`` when triton is missing, so kernel files import.

    Only ``jit`` is usable (kernel bodies and ``tl.*`` annotations are never evaluated: every kernel file uses
    ``from __future__ import annotations``); any other attribute raises.
    """

    def jit(self, fn=None, **_options):
        if fn is None:
            return self.jit
        return _Unlaunchable(fn.__name__)

    def __getattr__(self, name: str):
        raise KernelUnavailableError(f"triton.{name} is unavailable: triton is not installed")


try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # macOS, Windows, or a CPU-only install without triton
    triton = tl = _TritonStandIn()
    HAS_TRITON = False


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (kernels then run on CPU tensors; CI tests them that way)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(*tensors: torch.Tensor) -> bool:
    """True when a Triton kernel can run: triton installed, and CUDA tensors or ``TRITON_INTERPRET=1``."""
    return HAS_TRITON and (interpreting() or all(x.is_cuda for x in tensors))


def resolve_backend(backend: str, *tensors: torch.Tensor, interpret_auto: bool = True) -> str:
    """The one kernel-or-reference choice of an op: ``"triton"`` or ``"torch"``.

    Args:
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
        tensors: the op's inputs.
        interpret_auto: whether ``"auto"`` also picks Triton for CPU tensors under ``TRITON_INTERPRET=1``
            (``False``: auto means CUDA tensors only).

    Raises:
        ConfigError: an unknown backend name.
        KernelUnavailableError: ``"triton"`` where it cannot run (no triton, or CPU tensors without the
            interpreter).
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        on_cuda = HAS_TRITON and all(x.is_cuda for x in tensors)
        return "triton" if on_cuda or (interpret_auto and triton_usable(*tensors)) else "torch"
    if not HAS_TRITON:
        raise KernelUnavailableError("backend='triton' needs triton, which is not installed (Linux: pip install "
                                     "triton); use backend='auto' or 'torch'")
    if not triton_usable(*tensors):
        raise KernelUnavailableError("the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    return "triton"


def device_guard(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``x``'s GPU the current one for a launch (Triton launches on the current device); no-op on CPU."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float64 when any input is float64, else float32."""
    return torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32
