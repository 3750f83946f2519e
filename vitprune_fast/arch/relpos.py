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
from .base import Adapter, BlockRef, StageRef
from .common import SingleStageDefaults, check_block_norms


class RelPosViTAdapter(SingleStageDefaults, Adapter):
    """timm ``VisionTransformerRelPos`` with pre-norm ``RelPosBlock``s or post-norm ``ResPostRelPosBlock``s."""

    arch = "vit_relpos"
    model_class = "timm.models.vision_transformer_relpos.VisionTransformerRelPos"
    tokens = ("cls_token",)
    layer_scales = ("ls1.gamma", "ls2.gamma")

    def _check_block(self, where: str, blk: nn.Module) -> None:
        from timm.models.vision_transformer_relpos import RelPosAttention, RelPosBlock, ResPostRelPosBlock

        if type(blk) not in (RelPosBlock, ResPostRelPosBlock):
            raise UnsupportedModelError(f"{where}: {type(blk).__name__} is not supported (RelPosBlock and "
                                        "ResPostRelPosBlock are)")
        if type(blk.attn) is not RelPosAttention or not isinstance(blk.attn.qkv, nn.Linear):
            raise UnsupportedModelError(f"{where}.attn: {type(blk.attn).__name__} is not supported")
        if not (isinstance(blk.attn.q_norm, nn.Identity) and isinstance(blk.attn.k_norm, nn.Identity)):
            raise UnsupportedModelError(f"{where}.attn: qk-norm with a width tied to the residual is not supported "
                                        "(whole heads would have to follow the residual's count)")
        check_block_norms(blk, where)
        for ls in ("ls1", "ls2"):
            m = getattr(blk, ls, nn.Identity())
            if not isinstance(m, nn.Identity) and not hasattr(m, "gamma"):
                raise UnsupportedModelError(f"{where}.{ls}: {type(m).__name__} is not supported")

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
