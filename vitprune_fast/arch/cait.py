"""Adapter for timm ``Cait``: talking-heads self-attention blocks, then class-attention blocks, layer scale.

Both attention classes reshape their output to their input width (``reshape(B, N, C)``): each attention is tied to
the residual's kept count (``Group.tied_to``) and keeps every head, the same number of dims in each -- which also
leaves the talking-heads projections across heads (``proj_l``, ``proj_w``) whole. The class-attention blocks take
two inputs (patch tokens and the class token), so the trunk the engines see ends at the self-attention blocks and
the class-attention blocks are part of the head (their groups are scored by rerunning the head).
"""
from __future__ import annotations

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


class CaitAdapter(SingleStageDefaults, Adapter):
    """timm ``Cait``: ``blocks.{i}`` (talking-heads) and ``blocks_token_only.{j}`` (class attention)."""

    arch = "cait"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from timm.models.cait import Cait

        return isinstance(model, Cait)

    def _check(self) -> None:
        from timm.models.cait import ClassAttn, LayerScaleBlock, LayerScaleBlockClassAttn, TalkingHeadAttn

        m = self.model
        check_conv_embed_and_head(m)
        kinds = [("blocks", LayerScaleBlock, TalkingHeadAttn),
                 ("blocks_token_only", LayerScaleBlockClassAttn, ClassAttn)]
        for attr, block_cls, attn_cls in kinds:
            for i, blk in enumerate(getattr(m, attr)):
                if type(blk) is not block_cls or type(blk.attn) is not attn_cls:
                    raise UnsupportedModelError(f"{attr}.{i}: {type(blk).__name__} / {type(blk.attn).__name__} is not "
                                                "supported (CaiT's LayerScale blocks)")
                for nm in ("norm1", "norm2"):
                    if not is_norm(getattr(blk, nm)):
                        raise UnsupportedModelError(f"{attr}.{i}.{nm}: {type(getattr(blk, nm)).__name__} is not "
                                                    "supported")

    def describe(self) -> PruningSpace:
        """``residual``; ``blocks.{i}.attn`` / ``blocks_token_only.{j}.attn`` (tied to it) and their ``.mlp``."""
        self._check()
        m = self.model
        res = patch_embed_slices(m) + [TensorSlice("pos_embed", 2), TensorSlice("cls_token", 2)]
        groups: dict[str, Group] = {}
        for attr, projs in (("blocks", ("qkv",)), ("blocks_token_only", ("q", "k", "v"))):
            for i, blk in enumerate(getattr(m, attr)):
                p = f"{attr}.{i}"
                a = blk.attn.proj.in_features
                res += norm_slices(m, f"{p}.norm1") + norm_slices(m, f"{p}.norm2")
                res += [s for n in projs for s in linear_slices(m, f"{p}.attn.{n}", "in")]
                res += linear_slices(m, f"{p}.attn.proj", "out")
                res += mlp_input_slices(m, f"{p}.mlp") + linear_slices(m, f"{p}.mlp.fc2", "out")
                res += [TensorSlice(f"{p}.gamma_1", 0), TensorSlice(f"{p}.gamma_2", 0)]
                rows = (linear_slices(m, f"{p}.attn.qkv", "out", repeats=3, stride=a) if projs == ("qkv",)
                        else [s for n in projs for s in linear_slices(m, f"{p}.attn.{n}", "out")])
                groups[f"{p}.attn"] = Group(f"{p}.attn", "attn", a, rows + linear_slices(m, f"{p}.attn.proj", "in"),
                                            num_heads=blk.attn.num_heads, head_dim=a // blk.attn.num_heads,
                                            module=f"{p}.attn", tied_to="residual")
                groups[f"{p}.mlp"] = Group(f"{p}.mlp", "mlp", blk.mlp.fc2.in_features, mlp_slices(m, f"{p}.mlp"),
                                           module=f"{p}.mlp")
        res += norm_slices(m, "norm")
        if isinstance(m.head, nn.Linear):
            res += linear_slices(m, "head", "in")
        return PruningSpace(self.arch, {"residual": Group("residual", "residual", m.embed_dim, res)} | groups)

    def stages(self) -> list[StageRef]:
        m = self.model
        blocks = [BlockRef.pre_norm(m, i, 0, f"blocks.{i}", ("gamma_1", "gamma_2")) for i in range(len(m.blocks))]
        # the class token joins in the head (class-attention blocks): the self-attention blocks see patch tokens only
        return [StageRef(0, tuple(blocks), "residual", None, m.patch_embed.proj.weight.shape[0],
                         tuple(m.patch_embed.grid_size), 0, False)]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.patch_embed(images) + m.pos_embed

    def head(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.forward_head(m.norm(m.forward_cls(x)))

    def sync_attributes(self) -> None:
        m = self.model
        sync_generic_attributes(m)
        c = m.patch_embed.proj.weight.shape[0]
        m.embed_dim = m.num_features = m.head_hidden_size = c
        for blk in [*m.blocks, *m.blocks_token_only]:
            blk.attn.scale = (blk.attn.proj.in_features // blk.attn.num_heads) ** -0.5
        for info in m.feature_info:
            info["num_chs"] = c

    def build_recipe(self) -> dict:
        return super().build_recipe() | {"depth_token_only": len(self.model.blocks_token_only)}
