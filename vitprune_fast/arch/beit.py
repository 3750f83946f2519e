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
    qkv_bias_slices,
    sync_generic_attributes,
)


class BeitAdapter(SingleStageDefaults, Adapter):
    """timm ``Beit``: one stage, one residual group, ``blocks.{i}.attn`` tied to it, ``blocks.{i}.mlp``."""

    arch = "beit"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from timm.models.beit import Beit

        return isinstance(model, Beit)

    def _check(self) -> None:
        from timm.models.beit import Attention, Block

        m = self.model
        check_conv_embed_and_head(m)
        for i, blk in enumerate(m.blocks):
            where = f"blocks.{i}"
            if type(blk) is not Block or type(blk.attn) is not Attention:
                raise UnsupportedModelError(f"{where}: {type(blk).__name__} / {type(blk.attn).__name__} is not "
                                            "supported (only BEiT's Block and Attention)")
            if blk.attn.q_bias is not None and blk.attn.qkv_bias_separate:
                raise UnsupportedModelError(f"{where}.attn: qkv_bias_separate=True is not supported")
            for nm in ("norm1", "norm2"):
                if not is_norm(getattr(blk, nm)):
                    raise UnsupportedModelError(f"{where}.{nm}: {type(getattr(blk, nm)).__name__} is not supported")

    def describe(self) -> PruningSpace:
        """``residual``, ``blocks.{i}.attn`` (tied to the residual, dims per head), ``blocks.{i}.mlp``."""
        self._check()
        m = self.model
        res = patch_embed_slices(m) + [TensorSlice("cls_token", 2)]
        if m.pos_embed is not None:
            res.append(TensorSlice("pos_embed", 2))
        groups: dict[str, Group] = {}
        for i, blk in enumerate(m.blocks):
            p = f"blocks.{i}"
            attn = blk.attn
            a = attn.qkv.out_features // 3
            res += norm_slices(m, f"{p}.norm1") + norm_slices(m, f"{p}.norm2")
            res += linear_slices(m, f"{p}.attn.qkv", "in") + linear_slices(m, f"{p}.attn.proj", "out")
            res += mlp_input_slices(m, f"{p}.mlp") + linear_slices(m, f"{p}.mlp.fc2", "out")
            res += [TensorSlice(f"{p}.{g}", 0) for g in ("gamma_1", "gamma_2") if getattr(blk, g) is not None]
            rows = linear_slices(m, f"{p}.attn.qkv", "out", repeats=3, stride=a)
            rows += qkv_bias_slices(m, f"{p}.attn")
            groups[f"{p}.attn"] = Group(f"{p}.attn", "attn", a, rows + linear_slices(m, f"{p}.attn.proj", "in"),
                                        num_heads=attn.num_heads, head_dim=a // attn.num_heads, module=f"{p}.attn",
                                        tied_to="residual")
            groups[f"{p}.mlp"] = Group(f"{p}.mlp", "mlp", blk.mlp.fc2.in_features, mlp_slices(m, f"{p}.mlp"),
                                       module=f"{p}.mlp")
        res += norm_slices(m, "norm") + norm_slices(m, "fc_norm")
        if isinstance(m.head, nn.Linear):
            res += linear_slices(m, "head", "in")
        return PruningSpace(self.arch, {"residual": Group("residual", "residual", m.embed_dim, res)} | groups)

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

    def sync_attributes(self) -> None:
        m = self.model
        sync_generic_attributes(m)
        c = m.patch_embed.proj.weight.shape[0]
        m.embed_dim = m.num_features = m.head_hidden_size = c
        for blk in m.blocks:
            hd = blk.attn.qkv.weight.shape[0] // 3 // blk.attn.num_heads
            blk.attn.scale = hd ** -0.5
        for info in m.feature_info:
            info["num_chs"] = c

