"""Hugging Face ``transformers`` DeiT: ``DeiTModel``, ``DeiTForImageClassification`` and
``DeiTForImageClassificationWithTeacher``.

A ``DeiTLayer`` is ViT's layer (:mod:`.hf_vit`, either transformers layout); the embeddings add a distillation token
after the class token (two prefix tokens), which the residual also covers. Groups: ``deit.layers.3.attention`` /
``deit.layers.3.mlp`` from transformers 5.9 (``deit.encoder.layer.3.attention`` / ``.intermediate`` before), and
``residual``.

Outputs: ``logits`` -- with a teacher head, the mean of the class token's ``cls_classifier`` and the distillation
token's ``distillation_classifier``; a ``DeiTModel``'s ``pooler_output`` with a pooler, else its final class token.
"""
from __future__ import annotations

import torch
from torch import nn

from ..space import TensorSlice
from .common import linear_slices
from .hf_vit import HfViTAdapter


class HfDeiTAdapter(HfViTAdapter):
    """``transformers`` DeiT (eager and SDPA attention; either layout)."""

    arch = "hf_deit"
    classes = ("DeiTModel", "DeiTForImageClassification", "DeiTForImageClassificationWithTeacher")
    base_attr = "deit"
    layer_classes = ("DeiTLayer",)
    heads = ("classifier", "cls_classifier", "distillation_classifier")  # the teacher variant has the last two

    def _token_names(self) -> tuple[str, ...]:
        return "cls_token", "distillation_token", "mask_token", "position_embeddings"

    def _prefix_tokens(self) -> int:
        return 2

    def _linear_heads(self) -> list[str]:
        return [n for n in self.heads if isinstance(getattr(self.model, n, None), nn.Linear)]

    def _head_slices(self) -> list[TensorSlice]:
        if self._linear_heads():
            return [s for n in self._linear_heads() for s in linear_slices(self.model, n, "in")]
        return super()._head_slices()

    def classifier_weights(self) -> list[torch.Tensor]:
        return [getattr(self.model, n).weight for n in self._linear_heads()]

    def head(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        if m is self._enc:
            return super().head(x)
        x = self._enc.layernorm(x)
        if hasattr(m, "classifier"):
            return m.classifier(x[:, 0])
        return (m.cls_classifier(x[:, 0]) + m.distillation_classifier(x[:, 1])) / 2

    @classmethod
    def config_class(cls, name: str):
        from transformers import DeiTConfig

        return DeiTConfig
