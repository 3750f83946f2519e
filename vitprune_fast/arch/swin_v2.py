"""Adapters for timm ``SwinTransformerV2`` and ``SwinTransformerV2Cr``: post-norm blocks, cosine attention.

Its ``WindowAttention`` reshapes its output to its input width (``reshape(B_, N, C)``), so each attention is tied to
its stage's residual count (``Group.tied_to``) and keeps every head, the same number of dims in each: the learned
per-head logit scale and the continuous position-bias MLP (one output per head) are never sliced. Cosine attention
L2-normalises q and k over a head's dims; a removed (zeroed) dim adds nothing to that norm, so removal == masking.
"""
from __future__ import annotations

import dataclasses

from torch import nn

from ..errors import UnsupportedModelError
from .base import Adapter, BlockRef, StageRef
from .common import check_block_norms
from .swin import SwinAdapter


class SwinV2Adapter(SwinAdapter):
    """timm ``SwinTransformerV2``: stage s is ``layers.s`` (its PatchMerging, then its post-norm blocks)."""

    arch = "swin_v2"
    model_class = "timm.models.swin_transformer_v2.SwinTransformerV2"
    merging_class = "timm.models.swin_transformer_v2.PatchMerging"
    merge_norm_after = True
    tied_attention = True  # q / k / v rows include the separate q / v biases (and the zero k bias)

    def _check_block(self, where: str, blk: nn.Module) -> None:
        from timm.models.swin_transformer_v2 import SwinTransformerV2Block, WindowAttention

        if type(blk) is not SwinTransformerV2Block or type(blk.attn) is not WindowAttention:
            raise UnsupportedModelError(f"{where}: {type(blk).__name__} is not supported")
        if blk.attn.q_bias is not None and blk.attn.qkv_bias_separate:
            raise UnsupportedModelError(f"{where}.attn: qkv_bias_separate=True is not supported")
        check_block_norms(blk, where)

    def stages(self) -> list[StageRef]:
        out = []
        for st in super().stages():
            blocks = []
            for ref in st.blocks:
                attn = self.model.get_submodule(ref.attn)
                functional = getattr(attn, "q_bias", None) is not None  # F.linear with the q / v biases
                blocks.append(dataclasses.replace(ref, post_norm=True, qkv_functional=functional))
            out.append(dataclasses.replace(st, blocks=tuple(blocks)))
        return out

    def attention_bias(self, block: BlockRef, windows: int):
        raise UnsupportedModelError("Swin V2's cosine attention has no additive bias to report (its attention is "
                                    "tied to the residual and scored exactly)")

    def _sync_stage(self, s: int, stage: nn.Module, c: int, prev: int) -> None:
        if s > 0:
            stage.downsample.dim = stage.downsample.reduction.weight.shape[1] // 4
            stage.downsample.out_dim = c
        stage.dim = prev  # a V2 stage's ``dim`` is its input width
        for blk in stage.blocks:
            blk.dim = blk.attn.dim = c

    def build_recipe(self) -> dict:
        model = self.model
        pe = model.patch_embed
        wins = [list(st.blocks[0].window_size) if len(st.blocks) else [8, 8] for st in model.layers]
        return dict(
            img_size=list(pe.img_size), patch_size=pe.patch_size[0], in_chans=pe.proj.in_channels,
            num_classes=model.num_classes, global_pool=model.global_pool,
            embed_dim=model.patch_embed.proj.weight.shape[0],  # per-stage widths are restored from the saved shapes
            depths=[len(st.blocks) for st in model.layers],
            num_heads=[st.blocks[0].attn.num_heads if len(st.blocks) else 1 for st in model.layers],
            window_size=[tuple(w) for w in wins],
        )

    def stock_kwargs(self) -> dict:
        return Adapter.stock_kwargs(self)


class SwinV2CrAdapter(SwinV2Adapter):
    """timm ``SwinTransformerV2Cr`` (the "CR" Swin V2): stage s is ``stages.s`` (PatchMerging with its norm before
    the reduction, then post-norm blocks with an optional main-branch ``norm3``); attention tied like Swin V2's."""

    arch = "swin_v2_cr"
    model_class = "timm.models.swin_transformer_v2_cr.SwinTransformerV2Cr"
    stages_attr = "stages"
    merging_class = "timm.models.swin_transformer_v2_cr.PatchMerging"
    merge_norm_after = False

    def _check_block(self, where: str, blk: nn.Module) -> None:
        from timm.models.swin_transformer_v2_cr import SwinTransformerV2CrBlock, WindowMultiHeadAttention

        if type(blk) is not SwinTransformerV2CrBlock or type(blk.attn) is not WindowMultiHeadAttention:
            raise UnsupportedModelError(f"{where}: {type(blk).__name__} is not supported")
        if blk.attn.sequential_attn:
            raise UnsupportedModelError(f"{where}.attn: sequential_attn=True is not supported")
        check_block_norms(blk, where)

    def embed(self, images):
        from timm.models.swin_transformer_v2_cr import bchw_to_bhwc

        return bchw_to_bhwc(self.model.patch_embed(images))  # the blocks run channels-last

    def head(self, x):
        from timm.models.swin_transformer_v2_cr import bhwc_to_bchw

        return self.model.forward_head(bhwc_to_bchw(x))

    def _sync_stage(self, s: int, stage: nn.Module, c: int, prev: int) -> None:
        for blk in stage.blocks:
            blk.dim = blk.attn.in_features = c

    def build_recipe(self) -> dict:
        model = self.model
        pe = model.patch_embed
        wins = [tuple(st.blocks[0].window_size) if len(st.blocks) else (7, 7) for st in self._stages]
        return dict(
            img_size=list(pe.img_size), patch_size=pe.patch_size[0], in_chans=pe.proj.in_channels,
            num_classes=model.num_classes, global_pool=model.head.global_pool.pool_type,
            embed_dim=pe.proj.weight.shape[0],  # per-stage widths are restored from the saved shapes
            depths=[len(st.blocks) for st in self._stages],
            num_heads=[st.blocks[0].attn.num_heads if len(st.blocks) else 1 for st in self._stages],
            window_size=wins,
        )
