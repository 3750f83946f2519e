"""Hugging Face ``transformers`` SigLIP vision tower: ``SiglipVisionModel``, with or without its attention-pool head.

A ``SiglipEncoderLayer`` is CLIP's layer (:mod:`.hf_clip`: ``layer_norm1 / 2``, ``self_attn`` with ``num_heads`` /
``head_dim`` / ``scale``, ``mlp.fc1 / fc2``); there is no class token and no norm before the first layer;
``post_layernorm`` normalises every final token (``last_hidden_state``). The tower nests as CLIP's does (a
``vision_model`` in front of the paths up to some transformers 5.x). transformers 5.0's ``SiglipAttention`` reshapes
its output to its input's width, so there each layer's attention is tied to the residual's kept count (every head,
the ``sqrt(new/old)`` fold into q); later ones reshape to ``-1`` and give it its own width.

The head (``vision_use_head``, a ``SiglipMultiheadAttentionPoolingHead``) pools with one learned ``probe`` query
through an ``nn.MultiheadAttention`` (q / k / v packed in ``in_proj_weight`` ``[3E, E]``), then ``x + mlp(
layernorm(x))``, and outputs the probe's token (``pooler_output``). The attention reads the probe (its query) and the
tokens (its keys and values) through one set of ``in_proj`` columns, so the probe is indexed by the residual's
channels, and ``nn.MultiheadAttention`` takes its width from its query: ``head.attention`` is a group tied to the
residual's kept count (every head, equal dims per head; its scale ``1/sqrt(head_dim)`` computed inside, so q's
rows get the ``sqrt(new/old)`` fold and no head merge is possible). The head's stream (``out_proj`` rows, its
``layernorm``, its MLP's input and output) is the residual's, as ``from_pretrained`` builds it from ``hidden_size``;
``head.mlp`` is a group. The pooled output is thus a residual channel per feature (``output_group``). Without the
head, the output is the mean of ``last_hidden_state`` (what ``SiglipForImageClassification`` classifies).

While the UP-ViTs engines score, the pooling attention runs :func:`~.tv_vit.explicit_attention` (its ``F.linear``
calls tapped), and the fast engine zeroes a removed residual channel of the probe at the attention's input
(:meth:`residual_readers`).
"""
from __future__ import annotations

import contextlib
import inspect

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..overrides import replaced_forward
from ..space import Group, TensorSlice
from .common import QRows, linear_slices, norm_slices
from .hf_clip import HfClipVisionAdapter
from .tv_vit import explicit_attention

_POOL = "SiglipMultiheadAttentionPoolingHead"


class HfSiglipVisionAdapter(HfClipVisionAdapter):
    """``transformers`` ``SiglipVisionModel`` (eager and SDPA attention in the layers)."""

    arch = "hf_siglip"
    classes = ("SiglipVisionModel",)
    layer_classes = ("SiglipEncoderLayer",)
    heads = ()
    pre_norms = ()
    tokens_normed = True  # post_layernorm runs on every token

    @property
    def _pool(self) -> nn.Module | None:
        return getattr(self._enc, "head", None) if getattr(self._enc, "use_head", False) else None

    @property
    def _pool_path(self) -> str:
        return f"{self._base}head"

    def _check(self) -> None:
        super()._check()
        pool = self._pool
        if pool is None:
            return
        if type(pool).__name__ != _POOL:
            raise UnsupportedModelError(f"head: {type(pool).__name__} is not a {_POOL}")
        att = pool.attention
        if not (isinstance(att, nn.MultiheadAttention) and att._qkv_same_embed_dim and att.batch_first
                and att.in_proj_bias is not None and att.bias_k is None and not att.add_zero_attn):
            raise UnsupportedModelError("head.attention must be a batch-first nn.MultiheadAttention with one packed "
                                        "in_proj (bias, no bias_k / add_zero_attn)")
        if not (isinstance(pool.mlp.fc1, nn.Linear) and isinstance(pool.mlp.fc2, nn.Linear)):
            raise UnsupportedModelError("head.mlp must be fc1 / fc2 Linears")

    def _attention_tied(self, att: nn.Module) -> bool:
        """transformers 5.0's ``SiglipAttention`` reshapes its output to ``embed_dim``, its input's width (later ones
        to ``-1``): read from its source, tied where it cannot be read."""
        try:
            src = inspect.getsource(type(att).forward)
        except (OSError, TypeError):
            return True
        return "seq_length, embed_dim)" in src

    def _token_names(self) -> tuple[str, ...]:
        return ("position_embedding.weight",)

    def _prefix_tokens(self) -> int:
        return 0

    # ------------------------------------------------------------------------------------------- the head
    def _head_slices(self) -> list[TensorSlice]:
        """The probe, the pooling attention's in_proj columns and the head's stream (module docstring)."""
        if self._pool is None:
            return []
        m, p = self.model, self._pool_path
        return ([TensorSlice(f"{p}.probe", 2), TensorSlice(f"{p}.attention.in_proj_weight", 1)]
                + linear_slices(m, f"{p}.attention.out_proj", "out") + norm_slices(m, f"{p}.layernorm")
                + linear_slices(m, f"{p}.mlp.fc1", "in") + linear_slices(m, f"{p}.mlp.fc2", "out"))

    def _head_groups(self) -> dict[str, Group]:
        pool = self._pool
        if pool is None:
            return {}
        m, p = self.model, self._pool_path
        at, e, h = f"{p}.attention", pool.attention.in_proj_weight.shape[0] // 3, pool.attention.num_heads
        rows = [TensorSlice(f"{at}.in_proj_weight", 0, 3, e), TensorSlice(f"{at}.in_proj_bias", 0, 3, e)]
        return {at: Group(at, "attn", e, rows + linear_slices(m, f"{at}.out_proj", "in"), num_heads=h,
                          head_dim=e // h, module=at, tied_to="residual"),
                f"{p}.mlp": Group(f"{p}.mlp", "mlp", pool.mlp.fc2.in_features,
                                  linear_slices(m, f"{p}.mlp.fc1", "out") + linear_slices(m, f"{p}.mlp.fc2", "in"),
                                  module=f"{p}.mlp")}

    def head(self, x: torch.Tensor) -> torch.Tensor:
        x = self._enc.post_layernorm(x)
        return self._pool(x) if self._pool is not None else x.mean(1)

    def output(self, out) -> torch.Tensor:
        """``pooler_output`` with the head, else the mean of ``last_hidden_state``."""
        return out.pooler_output if out.pooler_output is not None else out.last_hidden_state.mean(1)

    def output_group(self) -> str | None:
        return "residual"

    def residual_readers(self, group: str) -> list[nn.Module]:
        return [self._pool.attention] if group == "residual" and self._pool is not None else []

    def scoring_context(self):
        """The pooling attention written out (module docstring)."""
        if self._pool is None:
            return contextlib.nullcontext()
        att = self._pool.attention
        return replaced_forward([(att, explicit_attention(att))])

    def q_rows(self, group: Group) -> QRows:
        if group.module == f"{self._pool_path}.attention":
            att = self.model.get_submodule(group.module)
            rows = slice(0, att.in_proj_weight.shape[0] // 3)
            return [(att.in_proj_weight, rows), (att.in_proj_bias, rows)]
        return super().q_rows(group)

    def set_heads(self, group: Group, heads: int) -> None:
        if group.module == f"{self._pool_path}.attention":
            self.model.get_submodule(group.module).num_heads = heads
        else:
            super().set_heads(group, heads)

    def regroup_heads_masked(self, group: Group, heads: int) -> None:
        if group.module == f"{self._pool_path}.attention":
            raise UnsupportedModelError(f"{group.name}: nn.MultiheadAttention computes its scale from its head size, "
                                        "so a head merge (which keeps the original per-dim scale) cannot be expressed")
        super().regroup_heads_masked(group, heads)

    def sync_attributes(self) -> None:
        """The layers' and the config's (:class:`~.hf_common.HfEncoderAdapter`), and the pooling attention's
        ``embed_dim`` / ``kdim`` / ``vdim`` / ``head_dim`` from its tensors."""
        super().sync_attributes()
        if self._pool is not None:
            att = self._pool.attention
            e = att.in_proj_weight.shape[1]
            att.embed_dim = att.kdim = att.vdim = e
            att.head_dim = e // att.num_heads

    def _layer_shapes(self) -> set[tuple[int, int, int]]:
        """The layers' (heads, attention width, MLP width), and the head's: ``from_pretrained`` builds its
        attention and MLP from the same config fields."""
        shapes = super()._layer_shapes()
        pool = self._pool
        if pool is not None:
            shapes.add((pool.attention.num_heads, pool.attention.in_proj_weight.shape[0] // 3,
                        pool.mlp.fc2.in_features))
        return shapes

    @classmethod
    def config_class(cls, name: str):
        from transformers import SiglipVisionConfig

        return SiglipVisionConfig
