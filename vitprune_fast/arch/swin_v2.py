"""Adapter for timm ``SwinTransformerV2``: post-norm blocks, cosine attention, PatchMerging with the norm after it.

Its ``WindowAttention`` reshapes its output to its input width (``reshape(B_, N, C)``), so each attention is tied to
its stage's residual count (``Group.tied_to``) and keeps every head, the same number of dims in each: the learned
per-head logit scale and the continuous position-bias MLP (one output per head) are never sliced. Cosine attention
L2-normalises q and k over a head's dims; a removed (zeroed) dim adds nothing to that norm, so removal == masking.
"""
from __future__ import annotations

import dataclasses

from torch import nn

from ..errors import UnsupportedModelError
from ..norms import is_norm
from ..space import Group, PruningSpace, TensorSlice
from .base import Adapter, BlockRef, StageRef
from .common import linear_slices, mlp_input_slices, mlp_slices, norm_slices, sync_generic_attributes
from .swin import SwinAdapter


class SwinV2Adapter(SwinAdapter):
    """timm ``SwinTransformerV2``: stage s is ``layers.s`` (its PatchMerging, then its post-norm blocks)."""

    arch = "swin_v2"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from timm.models.swin_transformer_v2 import SwinTransformerV2

        return isinstance(model, SwinTransformerV2)

    def _check_stage(self, s: int) -> None:
        from timm.models.swin_transformer_v2 import PatchMerging, SwinTransformerV2Block, WindowAttention

        stage = self.model.layers[s]
        if s > 0 and not isinstance(stage.downsample, PatchMerging):
            raise UnsupportedModelError(f"layers.{s}.downsample: stage without PatchMerging is not supported")
        for b, blk in enumerate(stage.blocks):
            where = f"layers.{s}.blocks.{b}"
            if type(blk) is not SwinTransformerV2Block or type(blk.attn) is not WindowAttention:
                raise UnsupportedModelError(f"{where}: {type(blk).__name__} is not supported")
            if blk.attn.q_bias is not None and blk.attn.qkv_bias_separate:
                raise UnsupportedModelError(f"{where}.attn: qkv_bias_separate=True is not supported")
            for nm in ("norm1", "norm2"):
                if not is_norm(getattr(blk, nm)):
                    raise UnsupportedModelError(f"{where}.{nm}: {type(getattr(blk, nm)).__name__} is not supported")

    def describe(self) -> PruningSpace:
        """``layers.{s}.residual``, ``layers.{s}.blocks.{b}.attn`` (tied to it) / ``.mlp``."""
        model = self.model
        head_fc = getattr(model.head, "fc", None)
        if not isinstance(head_fc, (nn.Linear, nn.Identity)):
            raise UnsupportedModelError(f"head.fc: {type(head_fc).__name__} is not supported")
        groups: dict[str, Group] = {}
        n_stages = len(model.layers)
        for s, stage in enumerate(model.layers):
            self._check_stage(s)
            p = f"layers.{s}"
            if s == 0:
                res = [TensorSlice("patch_embed.proj.weight", 0)]
                if model.patch_embed.proj.bias is not None:
                    res.append(TensorSlice("patch_embed.proj.bias", 0))
                res += norm_slices(model, "patch_embed.norm")
            else:  # PatchMerging: reduction, then its norm, at this stage's width
                res = linear_slices(model, f"{p}.downsample.reduction", "out")
                res += norm_slices(model, f"{p}.downsample.norm")
            width = model.get_parameter(res[0].name).shape[0]
            for b, blk in enumerate(stage.blocks):
                q = f"{p}.blocks.{b}"
                attn = blk.attn
                a = attn.qkv.out_features // 3
                res += norm_slices(model, f"{q}.norm1") + norm_slices(model, f"{q}.norm2")
                res += linear_slices(model, f"{q}.attn.qkv", "in") + linear_slices(model, f"{q}.attn.proj", "out")
                res += mlp_input_slices(model, f"{q}.mlp") + linear_slices(model, f"{q}.mlp.fc2", "out")
                rows = linear_slices(model, f"{q}.attn.qkv", "out", repeats=3, stride=a)
                rows += [TensorSlice(f"{q}.attn.{n}", 0) for n in ("q_bias", "k_bias", "v_bias")
                         if getattr(attn, n, None) is not None]
                groups[f"{q}.attn"] = Group(f"{q}.attn", "attn", a, rows + linear_slices(model, f"{q}.attn.proj", "in"),
                                            num_heads=attn.num_heads, head_dim=a // attn.num_heads,
                                            module=f"{q}.attn", tied_to=f"{p}.residual")
                groups[f"{q}.mlp"] = Group(f"{q}.mlp", "mlp", blk.mlp.fc2.in_features, mlp_slices(model, f"{q}.mlp"),
                                           module=f"{q}.mlp")
            if s + 1 < n_stages:  # the next PatchMerging reads 4 neighbours concatenated, each width C
                res += linear_slices(model, f"layers.{s + 1}.downsample.reduction", "in", repeats=4, stride=width)
            else:
                res += norm_slices(model, "norm")
                if isinstance(head_fc, nn.Linear):
                    res += linear_slices(model, "head.fc", "in")
            groups[f"{p}.residual"] = Group(f"{p}.residual", "residual", width, res, module=p)
        order = sorted(groups, key=lambda n: (n.split(".blocks")[0], 0 if n.endswith("residual") else 1))
        return PruningSpace(self.arch, {n: groups[n] for n in order})

    def stages(self) -> list[StageRef]:
        out = []
        for st in super().stages():
            blocks = []
            for ref in st.blocks:
                attn = self.model.get_submodule(ref.attn)
                blocks.append(dataclasses.replace(ref, post_norm=True, qkv_functional=attn.q_bias is not None))
            out.append(dataclasses.replace(st, blocks=tuple(blocks)))
        return out

    def attention_bias(self, block: BlockRef, windows: int):
        raise UnsupportedModelError("Swin V2's cosine attention has no additive bias to report (its attention is "
                                    "tied to the residual and scored exactly)")

    def sync_attributes(self) -> None:
        model = self.model
        sync_generic_attributes(model)
        dims = []
        for s, stage in enumerate(model.layers):
            c = (model.patch_embed.proj.weight if s == 0 else stage.downsample.reduction.weight).shape[0]
            if s > 0:
                stage.downsample.dim = stage.downsample.reduction.weight.shape[1] // 4
                stage.downsample.out_dim = c
            stage.dim = dims[-1] if dims else c
            dims.append(c)
            for blk in stage.blocks:
                blk.dim = blk.attn.dim = c
            if s < len(model.feature_info):
                model.feature_info[s]["num_chs"] = c
        model.num_features = model.head_hidden_size = dims[-1]
        model.embed_dim = dims[0]
        head = model.head
        head.in_features = dims[-1]
        head.num_features = dims[-1] * head.global_pool.feat_mult() if hasattr(head, "global_pool") else dims[-1]

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
