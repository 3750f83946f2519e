"""Helpers shared by the architecture adapters."""
from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from ..space import TensorSlice


def is_layernorm(m: nn.Module) -> bool:
    """timm uses nn.LayerNorm and subclasses of it (timm.layers.LayerNorm)."""
    return isinstance(m, nn.LayerNorm)


def norm_slices(model: nn.Module, path: str, repeats: int = 1, stride: int = 0) -> list[TensorSlice]:
    """Slices of a LayerNorm at ``path`` (nothing for Identity); anything else is an error."""
    m = model.get_submodule(path)
    if isinstance(m, nn.Identity):
        return []
    if not is_layernorm(m) or not m.elementwise_affine:
        raise UnsupportedModelError(f"{path}: {type(m).__name__} is not an affine LayerNorm; cannot prune its width")
    out = [TensorSlice(f"{path}.weight", 0, repeats, stride)]
    if m.bias is not None:
        out.append(TensorSlice(f"{path}.bias", 0, repeats, stride))
    return out


def linear_slices(model: nn.Module, path: str, side: str, repeats: int = 1, stride: int = 0) -> list[TensorSlice]:
    """Slices of an nn.Linear at ``path``: ``side="out"`` rows (+ bias), ``side="in"`` input columns."""
    m = model.get_submodule(path)
    if not isinstance(m, nn.Linear):
        raise UnsupportedModelError(f"{path}: expected nn.Linear, found {type(m).__name__}")
    if side == "in":
        return [TensorSlice(f"{path}.weight", 1, repeats, stride)]
    out = [TensorSlice(f"{path}.weight", 0, repeats, stride)]
    if m.bias is not None:
        out.append(TensorSlice(f"{path}.bias", 0, repeats, stride))
    return out


def sync_generic_attributes(model: nn.Module) -> None:
    """Make stock torch layers' size attributes agree with their (possibly sliced) tensors."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif isinstance(m, nn.LayerNorm) and m.weight is not None:
            m.normalized_shape = tuple(m.weight.shape)
        elif isinstance(m, nn.Conv2d):
            m.out_channels = m.weight.shape[0]
            m.in_channels = m.weight.shape[1] * m.groups

