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
from ..space import Group
from .base import Adapter, BlockRef, StageRef
from .common import (
    QRows,
    SingleStageDefaults,
    attn_group,
    check_block_norms,
    fused_q_rows,
    linear_q_rows,
    separate_qkv_rows,
)


class CaitAdapter(SingleStageDefaults, Adapter):
    """timm ``Cait``: ``blocks.{i}`` (talking-heads) and ``blocks_token_only.{j}`` (class attention)."""

    arch = "cait"
    model_class = "timm.models.cait.Cait"
    block_lists = ("blocks", "blocks_token_only")
    tokens = ("pos_embed", "cls_token")

    def _check_block(self, where: str, blk: nn.Module) -> None:
        from timm.models.cait import ClassAttn, LayerScaleBlock, LayerScaleBlockClassAttn, TalkingHeadAttn

        block_cls, attn_cls = ((LayerScaleBlockClassAttn, ClassAttn) if _class_attention(where)
                               else (LayerScaleBlock, TalkingHeadAttn))
        if type(blk) is not block_cls or type(blk.attn) is not attn_cls:
            raise UnsupportedModelError(f"{where}: {type(blk).__name__} / {type(blk.attn).__name__} is not "
                                        "supported (CaiT's LayerScale blocks)")
        check_block_norms(blk, where)

    def _attn_inputs(self, p: str, blk: nn.Module) -> tuple[str, ...]:
        return ("attn.q", "attn.k", "attn.v") if _class_attention(p) else ("attn.qkv",)

    def _attn_group(self, p: str, blk: nn.Module) -> Group:
        """Talking-heads attention: the fused default; class attention: separate q / k / v Linears, tied too."""
        if not _class_attention(p):
            return super()._attn_group(p, blk)
        at = f"{p}.attn"
        return attn_group(self.model, at, blk.attn.proj.in_features, separate_qkv_rows(self.model, at),
                          tied_to="residual")

    def q_rows(self, group: Group) -> QRows:
        """Class attention: its ``q`` Linear; talking-heads attention: the fused qkv's first third of rows."""
        if _class_attention(group.module):
            return linear_q_rows(self.model, f"{group.module}.q")
        return fused_q_rows(self.model, group.module)

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

    def build_recipe(self) -> dict:
        return super().build_recipe() | {"depth_token_only": len(self.model.blocks_token_only)}


def _class_attention(path: str) -> bool:
    """Whether the block (or a module in it) at ``path`` is a class-attention block."""
    return path.startswith("blocks_token_only.")
