"""Adapter for timm ``Beit`` (BEiT, BEiT v2): relative-position bias per head, layer scale, separate q / v biases.

BEiT's ``Attention`` reshapes its output to its input width (``reshape(B, N, C)``), so each attention is tied to the
residual's kept count (``Group.tied_to``) and keeps every head, the same number of dims in each: the per-head
relative-position tables (per block, or shared) are never sliced. Its fused qkv weight is applied with ``F.linear``
and the concatenated q / k / v biases, so the UP-ViTs engine taps that call (``BlockRef.qkv_functional``).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .base import Adapter, BlockRef, StageRef
from .common import SingleStageDefaults, check_block_norms


class BeitAdapter(SingleStageDefaults, Adapter):
    """timm ``Beit``: one stage, one residual group, ``blocks.{i}.attn`` tied to it, ``blocks.{i}.mlp``."""

    arch = "beit"
    model_class = "timm.models.beit.Beit"

    def _check_block(self, where: str, blk: nn.Module) -> None:
        from timm.models.beit import Attention, Block

        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise UnsupportedModelError(f"{where}: {type(blk).__name__} / {type(blk.attn).__name__} is not "
                                        "supported (only BEiT's Block and Attention)")
        if blk.attn.q_bias is not None and blk.attn.qkv_bias_separate:
            raise UnsupportedModelError(f"{where}.attn: qkv_bias_separate=True is not supported")
        check_block_norms(blk, where)

    def stages(self) -> list[StageRef]:
        m = self.model
        blocks = [BlockRef.pre_norm(m, i, 0, f"blocks.{i}", ("gamma_1", "gamma_2"),
                                    qkv_functional=blk.attn.q_bias is not None) for i, blk in enumerate(m.blocks)]
        return [StageRef(0, tuple(blocks), "residual", None, m.patch_embed.proj.weight.shape[0],
                         tuple(m.patch_embed.grid_size), 1, True)]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.patch_embed(images)
        x = torch.cat((m.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return x + m.pos_embed if m.pos_embed is not None else x

    def block_kwargs(self) -> dict:
        """The shared relative-position bias every block gets (None when each block has its own table)."""
        m = self.model
        with torch.no_grad():
            return {"shared_rel_pos_bias": m.rel_pos_bias() if m.rel_pos_bias is not None else None}
