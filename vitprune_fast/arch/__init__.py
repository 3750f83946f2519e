"""Architecture adapters: the one owner of model structure (see :mod:`vitprune_fast.arch.base`).

``adapter_for(model)`` returns the registered :class:`Adapter` bound to ``model``; adapters registered later take
precedence over earlier ones, so a subclass of a supported model class can bring its own adapter.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..space import PruningSpace
from .base import Adapter, BlockRef, StageRef, Trunk
from .beit import BeitAdapter
from .cait import CaitAdapter
from .eva import EvaAdapter
from .hf_clip import HfClipVisionAdapter
from .hf_deit import HfDeiTAdapter
from .hf_dinov2 import HfDinov2Adapter
from .hf_siglip import HfSiglipVisionAdapter
from .hf_swin import HfSwinAdapter
from .hf_vit import HfViTAdapter
from .pvt_v2 import PvtV2Adapter
from .relpos import RelPosViTAdapter
from .swin import SwinAdapter
from .swin_v2 import SwinV2Adapter, SwinV2CrAdapter
from .tv_swin import TvSwinAdapter
from .tv_vit import TvViTAdapter
from .vit import ViTAdapter
from .xcit import XcitAdapter

# checked in order: most specific first
_ADAPTERS: list[type[Adapter]] = [BeitAdapter, CaitAdapter, EvaAdapter, PvtV2Adapter, RelPosViTAdapter,
                                  SwinV2CrAdapter, SwinV2Adapter, SwinAdapter, ViTAdapter, XcitAdapter, HfViTAdapter,
                                  HfDinov2Adapter, HfDeiTAdapter, HfClipVisionAdapter, HfSiglipVisionAdapter,
                                  HfSwinAdapter, TvViTAdapter, TvSwinAdapter]


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Add an adapter class, checked before every adapter registered so far (usable as a class decorator).

    Raises:
        TypeError: ``cls`` is not an :class:`Adapter` subclass with an ``arch`` name.
    """
    if not (isinstance(cls, type) and issubclass(cls, Adapter)) or not isinstance(getattr(cls, "arch", None), str):
        raise TypeError(f"expected a subclass of vitprune_fast.arch.Adapter with an `arch` name, got {cls!r}")
    if cls not in _ADAPTERS:
        _ADAPTERS.insert(0, cls)
    return cls


def unregister_adapter(cls: type[Adapter]) -> None:
    """Remove an adapter added by :func:`register_adapter` (no-op if it is not registered)."""
    if cls in _ADAPTERS:
        _ADAPTERS.remove(cls)


def adapters() -> tuple[type[Adapter], ...]:
    """The registered adapter classes, in the order they are tried."""
    return tuple(_ADAPTERS)


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter bound to ``model``, or a clear error naming what is unsupported."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"expected a torch.nn.Module, got {type(model).__name__}")
    for cls in _ADAPTERS:
        if cls.matches(model):
            return cls(model)
    raise UnsupportedModelError(
        f"{type(model).__module__}.{type(model).__name__} is not supported: vitprune_fast prunes timm "
        "VisionTransformer (ViT/DeiT/SigLIP/AIMv2/...), Eva (EVA/EVA-02/...), Swin (V1/V2/V2-CR), BEiT, CaiT, "
        "PVTv2 and XCiT models, transformers ViT (ViTModel / ViTForImageClassification), DeiT (DeiTModel / "
        "DeiTForImageClassification[WithTeacher]) and DINOv2 (Dinov2Model / Dinov2ForImageClassification, with or "
        "without registers), CLIP vision towers (CLIPVisionModel[WithProjection]), SiglipVisionModel and Swin "
        "(SwinModel / SwinForImageClassification), and torchvision VisionTransformer (vit_b_16, ...) and "
        "SwinTransformer (swin_t, swin_v2_t, ...)"
    )


def adapter_class(arch: str) -> type[Adapter]:
    """The registered adapter class whose ``arch`` name is ``arch`` (as saved in an architecture file).

    Raises:
        UnsupportedModelError: no registered adapter has that name.
    """
    for cls in _ADAPTERS:
        if cls.arch == arch:
            return cls
    raise UnsupportedModelError(f"no registered adapter is called {arch!r}")


def model_output(model: nn.Module, images):
    """``model(images)`` as a tensor: the logits (or, without a classifier, the features) of any supported model,
    also of those returning an output object (:meth:`Adapter.output`; a DDP / DataParallel / compiled wrapper is
    looked through)."""
    out = model(images)
    if isinstance(out, torch.Tensor):
        return out
    inner = getattr(model, "_orig_mod", model)
    if isinstance(inner, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        inner = inner.module
    return adapter_for(inner).output(out)


def describe(model: nn.Module) -> PruningSpace:
    """Describe ``model`` as a PruningSpace: groups of channels that are removed together.

    Args:
        model: a model a registered adapter supports (timm ``VisionTransformer`` or ``SwinTransformer``).

    Returns:
        The model's PruningSpace. Group names are module paths (``blocks.3.attn``, ``layers.2.blocks.5.mlp``)
        plus ``residual`` (ViT) or ``layers.{s}.residual`` (Swin).

    Raises:
        UnsupportedModelError: the model or one of its modules cannot be pruned exactly.
    """
    return adapter_for(model).describe()


__all__ = ["Adapter", "BeitAdapter", "BlockRef", "CaitAdapter", "EvaAdapter", "HfViTAdapter", "PvtV2Adapter",
           "RelPosViTAdapter", "StageRef", "SwinAdapter", "SwinV2Adapter", "SwinV2CrAdapter", "Trunk", "ViTAdapter",
           "XcitAdapter", "adapter_class", "adapter_for", "adapters", "describe", "model_output", "register_adapter",
           "unregister_adapter"]
