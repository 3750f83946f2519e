"""Adapter for timm ``VisionTransformerRelPos`` (relative-position ViTs: per-block or shared RelPosMlp / RelPosBias).

``RelPosAttention`` reshapes its output to its input width (``reshape(B, N, C)``), so each attention is tied to the
residual's kept count (``Group.tied_to``) and keeps every head, the same number of dims in each: the per-head
relative-position bias (a table or an MLP with one output per head) is never sliced.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..norms import is_norm
from ..space import Group, PruningSpace, TensorSlice
from .base import Adapter, BlockRef, StageRef
from .common import (
    SingleStageDefaults,
    check_conv_embed_and_head,
    linear_slices,
    mlp_input_slices,
    mlp_slices,
    norm_slices,
    patch_embed_slices,
    sync_generic_attributes,
)


class RelPosViTAdapter(SingleStageDefaults, Adapter):
    """timm ``VisionTransformerRelPos`` with pre-norm ``RelPosBlock``s or post-norm ``ResPostRelPosBlock``s."""

    arch = "vit_relpos"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from timm.models.vision_transformer_relpos import VisionTransformerRelPos

        return isinstance(model, VisionTransformerRelPos)

    def _check(self) -> None:
        from timm.models.vision_transformer_relpos import RelPosAttention, RelPosBlock, ResPostRelPosBlock

        m = self.model
        check_conv_embed_and_head(m)
        for i, blk in enumerate(m.blocks):
            where = f"blocks.{i}"
            if type(blk) not in (RelPosBlock, ResPostRelPosBlock):
                raise UnsupportedModelError(f"{where}: {type(blk).__name__} is not supported (RelPosBlock and "
                                            "ResPostRelPosBlock are)")
            if type(blk.attn) is not RelPosAttention or not isinstance(blk.attn.qkv, nn.Linear):
                raise UnsupportedModelError(f"{where}.attn: {type(blk.attn).__name__} is not supported")
            if not (isinstance(blk.attn.q_norm, nn.Identity) and isinstance(blk.attn.k_norm, nn.Identity)):
                raise UnsupportedModelError(f"{where}.attn: qk-norm with a width tied to the residual is not supported "
                                            "(whole heads would have to follow the residual's count)")
            for nm in ("norm1", "norm2"):
                if not is_norm(getattr(blk, nm)):
                    raise UnsupportedModelError(f"{where}.{nm}: {type(getattr(blk, nm)).__name__} is not supported")
            for ls in ("ls1", "ls2"):
                m = getattr(blk, ls, nn.Identity())
                if not isinstance(m, nn.Identity) and not hasattr(m, "gamma"):
                    raise UnsupportedModelError(f"{where}.{ls}: {type(m).__name__} is not supported")

    def describe(self) -> PruningSpace:
        """``residual``, ``blocks.{i}.attn`` (tied to the residual, dims per head), ``blocks.{i}.mlp``."""
        self._check()
        m = self.model
        res = patch_embed_slices(m)
        if m.cls_token is not None:
            res.append(TensorSlice("cls_token", 2))
        groups: dict[str, Group] = {}
        for i, blk in enumerate(m.blocks):
            p = f"blocks.{i}"
            a = blk.attn.qkv.out_features // 3
            res += norm_slices(m, f"{p}.norm1") + norm_slices(m, f"{p}.norm2")
            res += linear_slices(m, f"{p}.attn.qkv", "in") + linear_slices(m, f"{p}.attn.proj", "out")
            res += mlp_input_slices(m, f"{p}.mlp") + linear_slices(m, f"{p}.mlp.fc2", "out")
            res += [TensorSlice(f"{p}.{ls}.gamma", 0) for ls in ("ls1", "ls2")
                    if hasattr(getattr(blk, ls, None), "gamma")]
            groups[f"{p}.attn"] = Group(
                f"{p}.attn", "attn", a,
                linear_slices(m, f"{p}.attn.qkv", "out", repeats=3, stride=a)
                + linear_slices(m, f"{p}.attn.proj", "in"),
                num_heads=blk.attn.num_heads, head_dim=a // blk.attn.num_heads, module=f"{p}.attn", tied_to="residual")
            groups[f"{p}.mlp"] = Group(f"{p}.mlp", "mlp", blk.mlp.fc2.in_features, mlp_slices(m, f"{p}.mlp"),
                                       module=f"{p}.mlp")
        res += norm_slices(m, "norm") + norm_slices(m, "fc_norm")
        if isinstance(m.head, nn.Linear):
            res += linear_slices(m, "head", "in")
        return PruningSpace(self.arch, {"residual": Group("residual", "residual", m.embed_dim, res)} | groups)

    def stages(self) -> list[StageRef]:
        m = self.model
        from timm.models.vision_transformer_relpos import ResPostRelPosBlock

        blocks = tuple(dataclasses.replace(BlockRef.pre_norm(m, i, 0, f"blocks.{i}"),
                                           post_norm=type(blk) is ResPostRelPosBlock) for i, blk in enumerate(m.blocks))
        return [StageRef(0, blocks, "residual", None, m.patch_embed.proj.weight.shape[0],
                         tuple(m.patch_embed.grid_size), m.num_prefix_tokens, m.cls_token is not None)]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.patch_embed(images)
        if m.cls_token is not None:
            x = torch.cat((m.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return x

    def block_kwargs(self) -> dict:
        """The shared relative-position bias every block gets (None when each block has its own)."""
        m = self.model
        with torch.no_grad():
            return {"shared_rel_pos": m.shared_rel_pos.get_bias() if m.shared_rel_pos is not None else None}

    def sync_attributes(self) -> None:
        m = self.model
        sync_generic_attributes(m)
        c = m.patch_embed.proj.weight.shape[0]
        m.embed_dim = m.num_features = m.head_hidden_size = c
        for blk in m.blocks:
            blk.attn.head_dim = blk.attn.qkv.weight.shape[0] // 3 // blk.attn.num_heads
            blk.attn.scale = blk.attn.head_dim ** -0.5
        for info in m.feature_info:
            info["num_chs"] = c

