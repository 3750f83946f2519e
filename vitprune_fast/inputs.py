"""Checks of the images a public entry point is given, before any forward: a clear ``InputError`` instead of a
shape error from deep inside timm (``AssertionError: Input height (64) doesn't match model (224)``)."""
from __future__ import annotations

import torch
from torch import nn

from .errors import InputError


def check_images(model: nn.Module, x, what: str = "images", cast: bool = False) -> torch.Tensor:
    """``x`` if it is a batch ``model`` can take: a floating ``[N, C, H, W]`` tensor with ``N >= 1``, the model's
    dtype and device (unless ``cast``: the caller moves it), its channel count and an image size its adapter accepts
    (:meth:`Adapter.accepts_size`).

    Raises:
        InputError: one line naming what is wrong and what the model expects.
    """
    from .arch import adapter_for

    adapter = adapter_for(model)
    c, h, w = adapter.input_size()
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{what} must be a tensor [N, C, H, W], got {type(x).__name__}")
    if x.dim() != 4:
        raise InputError(f"{what} must be a 4-D tensor [N, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise InputError(f"no {what}: the batch is empty")
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    if not x.is_floating_point():
        raise InputError(f"{what} must be floating point (already transformed and normalised), got {x.dtype}")
    if not cast and p is not None and (x.dtype != p.dtype or x.device != p.device):
        raise InputError(f"{what} are {x.dtype} on {x.device}, the model is {p.dtype} on {p.device}: move them with "
                         ".to(model's device and dtype)")
    if x.shape[1] != c:
        raise InputError(f"{what} have {x.shape[1]} channels, the model takes {c}")
    if not adapter.accepts_size(x.shape[2], x.shape[3]):
        raise InputError(f"{what} are {x.shape[2]}x{x.shape[3]}, the model takes {h}x{w} (its patch embedding's "
                         "img_size)")
    return x


__all__ = ["check_images"]
