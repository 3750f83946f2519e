"""Temporary module overrides that put back exactly what was there.

Patching ``module.forward`` on an instance and then deleting it would also delete a forward that another library
had bound to that instance; :func:`replaced_forward` saves and restores the instance attribute itself.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

_ABSENT = object()


@contextlib.contextmanager
def replaced_forward(pairs: Iterable[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """Inside the block, calling each module runs its paired function instead of its forward.

    Hooks registered on the modules still run (``nn.Module.__call__`` calls the instance's ``forward``).

    Args:
        pairs: ``(module, fn)``; ``fn`` takes the forward's arguments.
    """
    saved = []
    try:
        for module, fn in pairs:
            saved.append((module, module.__dict__.get("forward", _ABSENT)))
            module.forward = fn
        yield
    finally:
        for module, old in reversed(saved):
            if old is _ABSENT:
                del module.__dict__["forward"]
            else:
                module.forward = old


@contextlib.contextmanager
def replaced_output(pairs: Iterable[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """Inside the block, each module's output is replaced by ``fn(output)`` (a forward hook, removed after)."""
    handles = [m.register_forward_hook(lambda _m, _i, out, fn=fn: fn(out)) for m, fn in pairs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def replaced_input(pairs: Iterable[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """Inside the block, each module's first input is replaced by ``fn(input)`` (a forward pre-hook, removed after)."""
    handles = [m.register_forward_pre_hook(lambda _m, args, fn=fn: (fn(args[0]), *args[1:])) for m, fn in pairs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _LinearOutputTap(TorchFunctionMode):
    """Replace the output of every ``F.linear`` call whose weight is ``weight`` (module call or not)."""

    def __init__(self, weight, fn: Callable):
        super().__init__()
        self.weight, self.fn = weight, fn

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.linear and (args[1] if len(args) > 1 else kwargs.get("weight")) is self.weight:
            out = self.fn(out)
        return out


@contextlib.contextmanager
def replaced_linear_output(weight, fn: Callable) -> Iterator[None]:
    """Inside the block, ``F.linear(x, weight, bias)`` returns ``fn(output)`` for this ``weight``: a tap for the
    projections timm calls functionally (BEiT's and EVA's fused qkv with separate q / v biases)."""
    with _LinearOutputTap(weight, fn):
        yield


__all__ = ["replaced_forward", "replaced_input", "replaced_linear_output", "replaced_output"]
