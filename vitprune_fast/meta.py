"""Models built on the meta device for their structure only (module types and shapes, no storage).

timm initialises every weight as it builds a model; on the meta device those in-place initialisers compute nothing
but still run through torch's Python meta decompositions, which dominates the build (seconds for a ViT-g). While
:func:`create_on_meta` builds, they are skipped: a meta tensor has no values to set.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

# in-place ops that only set values (the ones weight initialisers use); shape-changing in-place ops still run
_VALUE_OPS = frozenset({"uniform_", "normal_", "erfinv_", "mul_", "add_", "sub_", "div_", "clamp_", "zero_", "fill_",
                        "copy_", "exp_", "log_", "sqrt_", "abs_", "neg_", "bernoulli_", "exponential_", "fmod_"})


class _SkipMetaValues(TorchFunctionMode):
    """Returns a meta tensor's value-setting in-place op's target unchanged instead of running the op."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if (getattr(func, "__name__", "") in _VALUE_OPS and args and isinstance(args[0], torch.Tensor)
                and args[0].is_meta):
            return args[0]
        return func(*args, **(kwargs or {}))


def create_on_meta(name: str, **kwargs) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)`` on the meta device, its initialisers skipped and its
    warnings silenced."""
    import timm

    with warnings.catch_warnings(), torch.device("meta"), _SkipMetaValues():
        warnings.simplefilter("ignore")
        return timm.create_model(name, pretrained=False, **kwargs)


__all__ = ["create_on_meta"]
