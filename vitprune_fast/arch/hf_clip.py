"""Hugging Face ``transformers`` CLIP vision towers: ``CLIPVisionModel`` and ``CLIPVisionModelWithProjection``.

A ``CLIPEncoderLayer`` is the pre-norm layer :mod:`.hf_common` reads (``layer_norm1`` / ``layer_norm2``,
``self_attn.q_proj / k_proj / v_proj / out_proj`` with the head attributes ``num_heads`` / ``head_dim`` /
``scale``, ``mlp.fc1 -> activation_fn -> fc2``). Around the layers: a 1-D ``class_embedding``, an ``nn.Embedding`` of
positions (its weight's dim 1 is the residual), ``pre_layrnorm`` between the embeddings and the first layer, and
``post_layernorm`` on the final class token; all follow the residual, as do ``visual_projection``'s input columns.

transformers has nested the tower two ways: up to some 5.x a ``CLIPVisionModel`` holds a ``vision_model``
(``CLIPVisionTransformer``), later it holds the embeddings and encoder itself and ``CLIPVisionModelWithProjection``'s
``vision_model`` is a ``CLIPVisionModel``. Both are read (``vision_model.`` in front of the paths where it exists).
Groups: ``vision_model.encoder.layers.3.self_attn`` / ``vision_model.encoder.layers.3.mlp`` (or without
``vision_model.``), and ``residual``.

Outputs (the features objective scores them; there is no classifier): a ``CLIPVisionModel``'s ``pooler_output``,
the final class token after ``post_layernorm``; ``CLIPVisionModelWithProjection``'s ``image_embeds``, its
projection (of its own width, left whole).
"""
from __future__ import annotations

import torch

from ..space import TensorSlice
from .common import linear_slices
from .hf_common import HfEncoderAdapter


class HfClipVisionAdapter(HfEncoderAdapter):
    """``transformers`` CLIP vision tower, with or without ``visual_projection`` (eager and SDPA attention)."""

    arch = "hf_clip"
    classes = ("CLIPVisionModel", "CLIPVisionModelWithProjection")
    base_attr = "vision_model"
    layer_classes = ("CLIPEncoderLayer",)
    heads = ("visual_projection",)
    patch_path = "embeddings.patch_embedding"
    pre_norms = ("pre_layrnorm",)
    final_norm = "post_layernorm"
    tokens_normed = False  # last_hidden_state is the last layer's output; post_layernorm makes the pooled token

    def block_kwargs(self) -> dict:
        """``CLIPEncoderLayer`` takes the (text tower's) attention mask positionally: None for images."""
        return {"attention_mask": None}

    def _token_names(self) -> tuple[str, ...]:
        return "class_embedding", "position_embedding.weight"

    def _prefix_tokens(self) -> int:
        return 1

    @property
    def _projection(self):
        return getattr(self.model, "visual_projection", None)

    def _head_slices(self) -> list[TensorSlice]:
        return linear_slices(self.model, "visual_projection", "in") if self._projection is not None else []

    def head(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self._enc.post_layernorm(x[:, 0])
        return self._projection(pooled) if self._projection is not None else pooled

    def output(self, out) -> torch.Tensor:
        """``image_embeds`` with a projection, else ``pooler_output`` (module docstring)."""
        embeds = getattr(out, "image_embeds", None)
        return embeds if embeds is not None else out.pooler_output

    def output_group(self) -> str | None:
        """The projection's output width is its own (left whole)."""
        return None if self._projection is not None else super().output_group()

    def classifier_weights(self) -> list[torch.Tensor]:
        return []

    def _has_head_dim(self) -> bool:
        """``CLIPVisionConfig`` has no ``head_dim``: ``from_pretrained`` ties the attention width to
        ``hidden_size``."""
        return False

    def _layout_name(self) -> str:
        """The class that holds the layers: ``CLIPVisionTransformer`` (the nested layout) or ``CLIPVisionModel``."""
        return type(self._enc).__name__

    @classmethod
    def _layout_advice(cls, saved: str) -> str:
        return "(the vision tower's nesting changed in transformers 5): load it with the transformers that saved it"

    @classmethod
    def config_class(cls, name: str):
        from transformers import CLIPVisionConfig

        return CLIPVisionConfig
