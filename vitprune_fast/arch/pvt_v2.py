"""Adapter for timm ``PyramidVisionTransformerV2`` (PVTv2, the ViT variant UP-ViTs itself prunes).

Four stages, each: an overlapping patch embedding (a strided conv + LayerNorm), pre-norm blocks, a final LayerNorm.
A stage's residual channels run through the spatial-reduction branch of its attentions too: timm's ``Attention``
reshapes the reduction conv's output and the attention output to the input width (``reshape(B, C, -1)``,
``reshape(B, N, C)``), so residual channel c also names the reduction conv's output channel c (and its norm's), and
every attention is tied to the stage's kept count (``Group.tied_to``), the same number of dims in each head. An MLP
hidden unit is an fc1 row, a depthwise-conv channel and an fc2 column.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..space import Group, PruningSpace, TensorSlice
from .base import Adapter, BlockRef, StageRef, Trunk
from .common import (
    QRows,
    TimmModelClass,
    attn_group,
    check_block_norms,
    linear_q_rows,
    linear_slices,
    norm_slices,
    sync_generic_attributes,
)


def _conv_slices(path: str, side: str, conv: nn.Conv2d) -> list[TensorSlice]:
    """A dense conv's output channels (``side="out"``, + bias) or input channels."""
    if side == "in":
        return [TensorSlice(f"{path}.weight", 1)]
    return [TensorSlice(f"{path}.weight", 0)] + ([TensorSlice(f"{path}.bias", 0)] if conv.bias is not None else [])


class _StageEntry(nn.Module):
    """Tokens of stage s-1 -> tokens of stage s: its final norm, back to an image, the next overlapping embedding."""

    def __init__(self, adapter: PvtV2Adapter, s: int):
        super().__init__()
        self.adapter, self.s = adapter, s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stages = self.adapter.model.stages
        h, w = self.adapter.feat_sizes[self.s - 1]
        x = stages[self.s - 1].norm(x)
        x = stages[self.s].downsample(x.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2))  # [B, H', W', C']
        return x.reshape(x.shape[0], -1, x.shape[-1])


class PvtV2Adapter(TimmModelClass, Adapter):
    """timm ``PyramidVisionTransformerV2``: ``stages.{s}.residual``, ``stages.{s}.blocks.{b}.attn`` / ``.mlp``."""

    arch = "pvt_v2"
    model_class = "timm.models.pvt_v2.PyramidVisionTransformerV2"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.feat_sizes: list[tuple[int, int]] = []

    def _check(self) -> None:
        from timm.models.pvt_v2 import Attention, Block, MlpWithDepthwiseConv

        m = self.model
        if not isinstance(m.head, (nn.Linear, nn.Identity)):
            raise UnsupportedModelError(f"head: {type(m.head).__name__} is not supported")
        for s, stage in enumerate(m.stages):
            if (s == 0) != (stage.downsample is None):
                raise UnsupportedModelError(f"stages.{s}: only stage 0 may lack its overlapping patch embedding")
            for b, blk in enumerate(stage.blocks):
                where = f"stages.{s}.blocks.{b}"
                if (type(blk) is not Block or type(blk.attn) is not Attention
                        or type(blk.mlp) is not MlpWithDepthwiseConv):
                    raise UnsupportedModelError(f"{where}: {type(blk).__name__} is not supported")
                check_block_norms(blk, where)

    def _embed_path(self, s: int) -> str:
        return "patch_embed" if s == 0 else f"stages.{s}.downsample"

    def describe(self) -> PruningSpace:
        self._check()
        m = self.model
        groups: dict[str, Group] = {}
        for s, stage in enumerate(m.stages):
            p, e = f"stages.{s}", self._embed_path(s)
            res = _conv_slices(f"{e}.proj", "out", m.get_submodule(f"{e}.proj")) + norm_slices(m, f"{e}.norm")
            width = m.get_submodule(f"{e}.proj").out_channels
            for b, blk in enumerate(stage.blocks):
                q = f"{p}.blocks.{b}"
                attn = blk.attn
                res += norm_slices(m, f"{q}.norm1") + norm_slices(m, f"{q}.norm2")
                res += linear_slices(m, f"{q}.attn.q", "in") + linear_slices(m, f"{q}.attn.kv", "in")
                if attn.sr is not None:  # the reduction conv maps residual channels to residual channels
                    res += _conv_slices(f"{q}.attn.sr", "in", attn.sr) + _conv_slices(f"{q}.attn.sr", "out", attn.sr)
                    res += norm_slices(m, f"{q}.attn.norm")
                res += linear_slices(m, f"{q}.attn.proj", "out")
                res += linear_slices(m, f"{q}.mlp.fc1", "in") + linear_slices(m, f"{q}.mlp.fc2", "out")
                a = attn.q.out_features
                groups[f"{q}.attn"] = attn_group(
                    m, f"{q}.attn", a,
                    linear_slices(m, f"{q}.attn.q", "out") + linear_slices(m, f"{q}.attn.kv", "out", 2, a),
                    tied_to=f"{p}.residual")
                groups[f"{q}.mlp"] = Group(
                    f"{q}.mlp", "mlp", blk.mlp.fc2.in_features,
                    linear_slices(m, f"{q}.mlp.fc1", "out") + _conv_slices(f"{q}.mlp.dwconv", "out", blk.mlp.dwconv)
                    + linear_slices(m, f"{q}.mlp.fc2", "in"),
                    module=f"{q}.mlp")
            res += norm_slices(m, f"{p}.norm")
            if s + 1 < len(m.stages):
                res += _conv_slices(f"stages.{s + 1}.downsample.proj", "in", m.stages[s + 1].downsample.proj)
            elif isinstance(m.head, nn.Linear):
                res += linear_slices(m, "head", "in")
            groups[f"{p}.residual"] = Group(f"{p}.residual", "residual", width, res, module=p)
        order = sorted(groups, key=lambda n: (n.split(".blocks")[0], 0 if n.endswith("residual") else 1))
        return PruningSpace(self.arch, {n: groups[n] for n in order})

    def q_rows(self, group: Group) -> QRows:
        """The attention's ``q`` Linear (k and v come from ``kv``)."""
        return linear_q_rows(self.model, f"{group.module}.q")

    def stages(self) -> list[StageRef]:
        m = self.model
        out, index = [], 0
        c, h, w = self.input_size()
        for s, stage in enumerate(m.stages):
            blocks = []
            for b in range(len(stage.blocks)):
                ref = BlockRef.pre_norm(m, index, s, f"stages.{s}.blocks.{b}")
                blocks.append(dataclasses.replace(ref, qkv=f"{ref.attn}.q"))  # separate q and kv Linears
                index += 1
            width = m.get_submodule(f"{self._embed_path(s)}.proj").out_channels
            grid = (h // 2 ** (s + 2), w // 2 ** (s + 2))
            out.append(StageRef(s, tuple(blocks), f"stages.{s}.residual", None, width, grid))
        return out

    def trunk(self, tokens: bool = False) -> Trunk:
        """Blocks get their stage's token grid; the stage entries are :class:`_StageEntry` (norm, re-embed)."""
        t = super().trunk(tokens)
        starts = {st.blocks[0].index: _StageEntry(self, st.index) for st in self.stages()[1:] if st.blocks}
        stage_of = t.stage_of
        t.stage_start = starts
        t.block_kwargs = lambda i: {"feat_size": self.feat_sizes[stage_of[i]]}
        return t

    def _sizes(self, images: torch.Tensor) -> None:
        h, w = images.shape[-2:]
        self.feat_sizes = []
        for _ in self.model.stages:  # stride-4 embedding, then stride 2 per stage (kernel 3, padding 1)
            h, w = ((h + 3) // 4, (w + 3) // 4) if not self.feat_sizes else ((h + 1) // 2, (w + 1) // 2)
            self.feat_sizes.append((h, w))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        self._sizes(images)
        x = self.model.patch_embed(images)  # [B, H, W, C]
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def head(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        h, w = self.feat_sizes[-1]
        x = m.stages[-1].norm(x)
        return m.forward_head(x.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2))

    def embed_modules(self) -> list[nn.Module]:
        return [self.model.patch_embed]

    def input_size(self) -> tuple[int, int, int]:
        c, h, w = self.model.pretrained_cfg.get("input_size", (3, 224, 224))
        return self.model.patch_embed.proj.in_channels, h, w

    def accepts_size(self, h: int, w: int) -> bool:
        """Any size: PVTv2's overlapping conv embeddings take every image size (its configured one is DAP's)."""
        return True

    def classifier_weights(self) -> list[torch.Tensor]:
        return [self.model.head.weight] if isinstance(self.model.head, nn.Linear) else []

    def set_stage_blocks(self, stage: int, blocks: list[nn.Module]) -> None:
        self.model.stages[stage].blocks = nn.ModuleList(blocks)

    def sync_attributes(self) -> None:
        m = self.model
        sync_generic_attributes(m)
        dims = []
        for s, stage in enumerate(m.stages):
            c = m.get_submodule(f"{self._embed_path(s)}.proj").out_channels
            dims.append(c)
            for blk in stage.blocks:
                attn = blk.attn
                attn.dim = c
                attn.head_dim = attn.q.out_features // attn.num_heads
                attn.scale = attn.head_dim ** -0.5
            if s < len(m.feature_info):
                m.feature_info[s]["num_chs"] = c
        m.num_features = m.head_hidden_size = dims[-1]

    def build_recipe(self) -> dict:
        m = self.model
        return dict(in_chans=m.patch_embed.proj.in_channels, num_classes=m.num_classes, global_pool=m.global_pool,
                    depths=[len(st.blocks) for st in m.stages],
                    embed_dims=[m.get_submodule(f"{self._embed_path(s)}.proj").out_channels
                                for s in range(len(m.stages))],
                    num_heads=[st.blocks[0].attn.num_heads if len(st.blocks) else 1 for st in m.stages])
