"""Adapter for timm ``Xcit`` (cross-covariance image transformers).

A block has three pre-norm residual branches: cross-covariance attention (XCA), local patch interaction (LPI: two
depthwise 3x3 convs around a BatchNorm) and an MLP; class-attention blocks (CaiT's) follow, then the head. The
residual width runs through the last conv + BatchNorm of the convolutional patch embedding, the Fourier position
encoding's projection and every LPI channel (depthwise: channel c only ever meets channel c).

XCA attends over channels: per head, ``softmax(normalize(q) normalize(k)^T * temperature)`` is a ``head_dim x
head_dim`` matrix whose softmax runs over the head's key channels. A zeroed channel still takes part in that softmax
(its logits are 0, not -inf), so removing one dim of a head is not what masking it computes; removing a whole head
is. XCA groups are therefore ``whole_heads`` (with the head's ``temperature``), and since XCA reshapes its output to
its input width (as CaiT's class attention does), both attentions are tied to the residual, which keeps a multiple
of the head size. The class-attention blocks take the class token, so the trunk the engines see ends at the XCA
blocks and the class-attention blocks are part of the head (their groups are scored by rerunning the head). Block
units are whole blocks: a hybrid unit (MLP_i + attention_{i+1}) would leave block i+1's LPI in the middle.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..space import Group, PruningSpace, TensorSlice
from .base import Adapter, BlockRef, StageRef
from .common import (
    QRows,
    TimmModelClass,
    attn_group,
    check_block_norms,
    fused_q_rows,
    fused_qkv_rows,
    linear_q_rows,
    linear_slices,
    mlp_group,
    norm_slices,
    prenorm_residual_slices,
    residual_tail,
    separate_qkv_rows,
    sync_generic_attributes,
    sync_single_stage_width,
)

_BN = ("weight", "bias", "running_mean", "running_var")


def _conv_out(path: str, conv: nn.Conv2d) -> list[TensorSlice]:
    """A conv's output channels (+ bias)."""
    return [TensorSlice(f"{path}.weight", 0)] + ([TensorSlice(f"{path}.bias", 0)] if conv.bias is not None else [])


class XcitAdapter(TimmModelClass, Adapter):
    """timm ``Xcit``: ``residual``, ``blocks.{i}.attn`` / ``.mlp``, ``cls_attn_blocks.{j}.attn`` / ``.mlp``."""

    arch = "xcit"
    model_class = "timm.models.xcit.Xcit"

    # ------------------------------------------------------------------------------------------- checks
    def _last_embed_conv(self) -> str:
        """Path of the patch embedding's last conv3x3 (a ``Sequential(Conv2d, BatchNorm2d)``): its output is the
        residual."""
        proj = self.model.patch_embed.proj
        last = len(proj) - 1
        unit = proj[last]
        if not (isinstance(unit, nn.Sequential) and len(unit) == 2 and isinstance(unit[0], nn.Conv2d)
                and type(unit[1]) is nn.BatchNorm2d):
            raise UnsupportedModelError("patch_embed.proj must end in timm's conv3x3 (Conv2d + BatchNorm2d)")
        return f"patch_embed.proj.{last}"

    def _check(self) -> None:
        from timm.models.cait import ClassAttn
        from timm.models.xcit import LPI, XCA, ClassAttentionBlock, ConvPatchEmbed, PositionalEncodingFourier, XCABlock

        m = self.model
        if type(m.patch_embed) is not ConvPatchEmbed:
            raise UnsupportedModelError(f"patch_embed: {type(m.patch_embed).__name__} is not supported")
        self._last_embed_conv()
        if m.pos_embed is not None and type(m.pos_embed) is not PositionalEncodingFourier:
            raise UnsupportedModelError(f"pos_embed: {type(m.pos_embed).__name__} is not supported")
        if m.cls_attn_blocks is None or m.cls_token is None:
            raise UnsupportedModelError("an Xcit without class-attention blocks (prune_intermediate_layers) is not "
                                        "supported")
        if not isinstance(m.head, (nn.Linear, nn.Identity)):
            raise UnsupportedModelError(f"head: {type(m.head).__name__} is not supported")
        kinds = [("blocks", XCABlock, XCA), ("cls_attn_blocks", ClassAttentionBlock, ClassAttn)]
        for attr, block_cls, attn_cls in kinds:
            for i, blk in enumerate(getattr(m, attr)):
                where = f"{attr}.{i}"
                if type(blk) is not block_cls or type(blk.attn) is not attn_cls:
                    raise UnsupportedModelError(f"{where}: {type(blk).__name__} / {type(blk.attn).__name__} is not "
                                                "supported (XCiT's XCA and class-attention blocks)")
                norms = ("norm1", "norm2", "norm3") if attr == "blocks" else ("norm1", "norm2")
                check_block_norms(blk, where, norms, message="{where}.{name}: {type} is not a LayerNorm / RMSNorm")
                if attr == "blocks":
                    lpi = blk.local_mp
                    c = blk.attn.proj.out_features
                    ok = (type(lpi) is LPI and type(lpi.bn) is nn.BatchNorm2d
                          and all(conv.groups == conv.in_channels == conv.out_channels == c
                                  for conv in (lpi.conv1, lpi.conv2)))
                    if not ok:
                        raise UnsupportedModelError(f"{where}.local_mp: only timm's LPI with depthwise convs over the "
                                                    "residual width is supported")

    # ------------------------------------------------------------------------------------------ structure
    def describe(self) -> PruningSpace:
        """``residual`` (multiple of the head size); ``blocks.{i}.attn`` / ``cls_attn_blocks.{j}.attn`` (whole
        heads, tied to it) and their ``.mlp``."""
        self._check()
        m = self.model
        conv = self._last_embed_conv()
        res = _conv_out(f"{conv}.0", m.get_submodule(f"{conv}.0")) + [TensorSlice(f"{conv}.1.{t}", 0) for t in _BN]
        if m.pos_embed is not None:
            res += _conv_out("pos_embed.token_projection", m.pos_embed.token_projection)
        res.append(TensorSlice("cls_token", 2))
        groups: dict[str, Group] = {}
        head_dims = set()
        for attr in ("blocks", "cls_attn_blocks"):
            for i, blk in enumerate(getattr(m, attr)):
                p, at = f"{attr}.{i}", f"{attr}.{i}.attn"
                a = blk.attn.proj.in_features
                res += prenorm_residual_slices(m, p, ("gamma1", "gamma2", "gamma3"), inputs=())
                if attr == "blocks":
                    lpi = f"{p}.local_mp"
                    res += norm_slices(m, f"{p}.norm3") + linear_slices(m, f"{at}.qkv", "in")
                    res += _conv_out(f"{lpi}.conv1", blk.local_mp.conv1) + _conv_out(f"{lpi}.conv2", blk.local_mp.conv2)
                    res += [TensorSlice(f"{lpi}.bn.{t}", 0) for t in _BN]
                    rows = fused_qkv_rows(m, at) + [TensorSlice(f"{at}.temperature", 0, per_head=True)]
                    head_dims.add(a // blk.attn.num_heads)
                else:
                    res += [s for n in ("q", "k", "v") for s in linear_slices(m, f"{at}.{n}", "in")]
                    rows = separate_qkv_rows(m, at)
                groups[at] = attn_group(m, at, a, rows, whole_heads=True, tied_to="residual")
                groups[f"{p}.mlp"] = mlp_group(m, f"{p}.mlp")
        res += residual_tail(m, groups)
        if len(head_dims) > 1:
            raise UnsupportedModelError(f"XCA blocks have different head sizes {sorted(head_dims)}: the residual "
                                        "cannot keep whole heads of each")
        multiple = head_dims.pop() if head_dims else 1
        residual = Group("residual", "residual", m.embed_dim, res, module="", multiple_of=multiple)
        return PruningSpace(self.arch, {"residual": residual} | groups)

    def q_rows(self, group: Group) -> QRows:
        """Class attention: its ``q`` Linear; XCA: the fused qkv's first third of rows."""
        if group.module.startswith("cls_attn_blocks."):
            return linear_q_rows(self.model, f"{group.module}.q")
        return fused_q_rows(self.model, group.module)

    def _width(self) -> int:
        """The residual width: the output channels of the patch embedding's last conv."""
        return self.model.get_submodule(self._last_embed_conv())[0].out_channels

    def _grid(self) -> tuple[int, int]:
        pe = self.model.patch_embed
        return pe.img_size[0] // pe.patch_size, pe.img_size[1] // pe.patch_size

    def stages(self) -> list[StageRef]:
        m = self.model
        blocks = [BlockRef.pre_norm(m, i, 0, f"blocks.{i}", ("gamma1", "gamma2")) for i in range(len(m.blocks))]
        # the class token joins in the head (class-attention blocks): the XCA blocks see patch tokens only
        return [StageRef(0, tuple(blocks), "residual", None, self._width(), self._grid(), 0, False)]

    def hybrid_refusal(self) -> str | None:
        return ("block i+1's local patch interaction (LPI) runs between its attention and its MLP; a re-packed "
                "block would lose it")

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        m = self.model
        x, (hp, wp) = m.patch_embed(images)
        if m.pos_embed is not None:
            x = x + m.pos_embed(x.shape[0], hp, wp).reshape(x.shape[0], -1, x.shape[1]).permute(0, 2, 1)
        return m.pos_drop(x)

    def block_kwargs(self) -> dict:
        """The token grid every XCA block gets (its LPI works on the image layout)."""
        hp, wp = self._grid()
        return {"H": hp, "W": wp}

    def head(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.forward_head(m.norm(m.forward_cls(x)))

    def embed_modules(self) -> list[nn.Module]:
        m = self.model
        return [m.patch_embed] + ([m.pos_embed] if m.pos_embed is not None else [])

    def input_size(self) -> tuple[int, int, int]:
        pe = self.model.patch_embed
        return pe.proj[0][0].in_channels, *pe.img_size

    def classifier_weights(self) -> list[torch.Tensor]:
        return [self.model.head.weight] if isinstance(self.model.head, nn.Linear) else []

    # ---------------------------------------------------------------------------------------- mutation
    def set_stage_blocks(self, stage: int, blocks: list[nn.Module]) -> None:
        if stage != 0:
            raise IndexError(f"an Xcit has one stage of blocks, got stage {stage}")
        self.model.blocks = nn.ModuleList(blocks)

    def sync_attributes(self) -> None:
        m = self.model
        sync_generic_attributes(m)  # the LPI depthwise convs and the BatchNorms too
        c = self._width()
        sync_single_stage_width(m, c)
        if m.pos_embed is not None:
            m.pos_embed.dim = c
        for blk in m.blocks:
            blk.attn.num_heads = blk.attn.temperature.shape[0]
        for blk in m.cls_attn_blocks:
            blk.attn.scale = (blk.attn.q.out_features // blk.attn.num_heads) ** -0.5

    # ------------------------------------------------------------------------------------- persistence
    def build_recipe(self) -> dict:
        """Input, classes, depths, width, head count and the class-attention norm rule; the registered name's
        defaults give the rest (the module layout is checked against the model at save time)."""
        m = self.model
        pe = m.patch_embed
        heads = m.blocks[0].attn.num_heads if len(m.blocks) else m.cls_attn_blocks[0].attn.num_heads
        return dict(img_size=list(pe.img_size), patch_size=pe.patch_size, in_chans=pe.proj[0][0].in_channels,
                    num_classes=m.num_classes, global_pool=m.global_pool, depth=len(m.blocks),
                    cls_attn_layers=len(m.cls_attn_blocks), embed_dim=self._width(), num_heads=heads,
                    tokens_norm=m.cls_attn_blocks[0].tokens_norm if len(m.cls_attn_blocks) else False)
