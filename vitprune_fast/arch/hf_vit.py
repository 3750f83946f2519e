"""Hugging Face ``transformers`` ViT: ``ViTModel`` and ``ViTForImageClassification`` (``transformers`` is an optional
extra, imported only when such a model is passed).

A ``ViTLayer`` is the pre-norm layer :mod:`.hf_common` reads (``layernorm_before`` / ``layernorm_after``; either
transformers layout). Groups: ``vit.layers.3.attention`` and ``vit.layers.3.mlp`` from transformers 5.9,
``vit.encoder.layer.3.attention`` and ``vit.encoder.layer.3.intermediate`` before; and ``residual``.

Outputs: a classifier's ``logits``; a ``ViTModel``'s ``pooler_output`` when it has a pooler, else the class token of
its final ``layernorm`` (what ``ViTForImageClassification`` classifies) -- the features objective scores those.
"""
from __future__ import annotations

import torch

from ..space import TensorSlice
from .common import linear_slices
from .hf_common import HfEncoderAdapter, is_transformers_model

__all__ = ["HfViTAdapter", "is_transformers_model"]


class HfViTAdapter(HfEncoderAdapter):
    """``transformers`` ``ViTModel`` / ``ViTForImageClassification`` (eager and SDPA attention; either layout)."""

    arch = "hf_vit"
    classes = ("ViTModel", "ViTForImageClassification")
    base_attr = "vit"
    layer_classes = ("ViTLayer",)

    def _head_slices(self) -> list[TensorSlice]:
        if getattr(self._enc, "pooler", None) is not None:  # its output width is its own: left whole
            return linear_slices(self.model, f"{self._base}pooler.dense", "in")
        return super()._head_slices()

    def head(self, x: torch.Tensor) -> torch.Tensor:
        vit, m = self._enc, self.model
        x = vit.layernorm(x)
        if m is not vit:
            return m.classifier(x[:, 0])
        return vit.pooler(x) if vit.pooler is not None else x[:, 0]

    def output(self, out) -> torch.Tensor:
        """The tensor the model's output object carries (module docstring)."""
        if hasattr(out, "logits"):
            return out.logits
        if getattr(out, "pooler_output", None) is not None:
            return out.pooler_output
        return out.last_hidden_state[:, 0]

    def output_group(self) -> str | None:
        """A pooler's output width is its own (left whole)."""
        if getattr(self._enc, "pooler", None) is not None and self.model is self._enc:
            return None
        return super().output_group()

    @classmethod
    def config_class(cls, name: str):
        from transformers import ViTConfig

        return ViTConfig

