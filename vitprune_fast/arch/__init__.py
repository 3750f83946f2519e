"""Architecture adapters: describe a timm model as prunable groups, keep its attributes consistent."""
from __future__ import annotations

from types import ModuleType

from torch import nn

from ..errors import UnsupportedModelError
from ..space import PruningSpace
from . import swin, vit

ADAPTERS: tuple[ModuleType, ...] = (vit, swin)


def adapter_for(model: nn.Module) -> ModuleType:
    """The adapter module for ``model`` or a clear error naming what is unsupported."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"expected a torch.nn.Module, got {type(model).__name__}")
    for ad in ADAPTERS:
        if ad.matches(model):
            return ad
    raise UnsupportedModelError(
        f"{type(model).__module__}.{type(model).__name__} is not supported: vitprune_fast prunes timm "
        "VisionTransformer (ViT/DeiT/DeiT-distilled) and SwinTransformer models"
    )


def describe(model: nn.Module) -> PruningSpace:
    """Describe ``model`` as a PruningSpace: groups of channels that are removed together.

    Args:
        model: a timm ``VisionTransformer`` or ``SwinTransformer``.

    Returns:
        The model's PruningSpace. Group names are timm module paths (``blocks.3.attn``,
        ``layers.2.blocks.5.mlp``) plus ``residual`` (ViT) or ``layers.{s}.residual`` (Swin).

    Raises:
        UnsupportedModelError: the model or one of its modules cannot be pruned exactly.
    """
    return adapter_for(model).describe(model)
