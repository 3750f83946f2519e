"""Adapter for timm ``SwinTransformer``: one residual group per stage, window attention, PatchMerging."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..space import Group, PruningSpace, TensorSlice
from .base import Adapter, BlockRef, StageRef, mlp_ratio_for
from .common import (
    NormTokens,
    PatchEmbedNormHead,
    QRows,
    TimmModelClass,
    attn_group,
    check_block_norms,
    fused_q_rows,
    fused_qkv_rows,
    import_class,
    is_layernorm,
    linear_slices,
    mlp_group,
    norm_slices,
    patch_embed_slices,
    prenorm_residual_slices,
    sync_generic_attributes,
)


class SwinAdapter(TimmModelClass, PatchEmbedNormHead, NormTokens, Adapter):
    """timm ``SwinTransformer``: stage s is ``layers.s`` (its PatchMerging, then its blocks).

    Attributes:
        stages_attr: the model's list of stages.
        merging_class: the PatchMerging class every stage after the first starts with.
        merge_norm_after: PatchMerging is norm -> reduction (V1, V2-CR), or reduction -> norm (V2).
        tied_attention: the window attention reshapes its output to its input width (V2, V2-CR): its group is tied
            to the stage's residual and no per-head table is sliced; else (V1) it has its own width and a per-head
            relative-position bias table.
    """

    arch = "swin"
    model_class = "timm.models.swin_transformer.SwinTransformer"
    stages_attr = "layers"
    merging_class = "timm.models.swin_transformer.PatchMerging"
    merge_norm_after = False
    tied_attention = False

    @property
    def _stages(self) -> nn.Sequential:
        return getattr(self.model, self.stages_attr)

    def _check_stage(self, s: int) -> None:
        stage = self._stages[s]
        if s > 0 and not isinstance(stage.downsample, import_class(self.merging_class)):
            raise UnsupportedModelError(f"{self.stages_attr}.{s}.downsample: stage without PatchMerging is not "
                                        "supported")
        for b, blk in enumerate(stage.blocks):
            self._check_block(f"{self.stages_attr}.{s}.blocks.{b}", blk)

    def _check_block(self, where: str, blk: nn.Module) -> None:
        """A clear ``UnsupportedModelError`` naming what the block at ``where`` has that cannot be pruned."""
        from timm.layers import Mlp
        from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention

        if type(blk) is not SwinTransformerBlock:
            raise UnsupportedModelError(f"{where}: {type(blk).__name__} is not supported (only SwinTransformerBlock)")
        if type(blk.attn) is not WindowAttention:
            raise UnsupportedModelError(f"{where}.attn: {type(blk.attn).__name__} is not supported")
        if type(blk.mlp) is not Mlp or not isinstance(blk.mlp.norm, nn.Identity):
            raise UnsupportedModelError(f"{where}.mlp: {type(blk.mlp).__name__} is not supported")
        check_block_norms(blk, where, accept=is_layernorm, message="{where}.{name}: only LayerNorm is supported")

    def describe(self) -> PruningSpace:
        """``layers.{s}.residual``, ``layers.{s}.blocks.{b}.attn`` / ``.mlp``."""
        model = self.model
        head_fc = getattr(model.head, "fc", None)
        if not isinstance(head_fc, (nn.Linear, nn.Identity)):
            raise UnsupportedModelError(f"head.fc: {type(head_fc).__name__} is not supported")
        groups: dict[str, Group] = {}
        stages = self._stages
        for s, stage in enumerate(stages):
            self._check_stage(s)
            p = f"{self.stages_attr}.{s}"
            if s == 0:
                res = patch_embed_slices(model)
            else:  # PatchMerging at the start of the stage produces this stage's width
                res = linear_slices(model, f"{p}.downsample.reduction", "out")
                if self.merge_norm_after:
                    res += norm_slices(model, f"{p}.downsample.norm")
            width = model.get_parameter(res[0].name).shape[0]
            for b, blk in enumerate(stage.blocks):
                q = f"{p}.blocks.{b}"
                norms = ("norm1", "norm2", "norm3") if hasattr(blk, "norm3") else ("norm1", "norm2")
                res += prenorm_residual_slices(model, q, norms=norms)
                groups[f"{q}.attn"] = self._attn_group(q, blk.attn, f"{p}.residual")
                groups[f"{q}.mlp"] = mlp_group(model, f"{q}.mlp")
            if s + 1 < len(stages):  # next PatchMerging sees 4 neighbours concatenated: [x0 | x1 | x2 | x3], each C
                nxt = f"{self.stages_attr}.{s + 1}.downsample"
                if not self.merge_norm_after:
                    res += norm_slices(model, f"{nxt}.norm", repeats=4, stride=width)
                res += linear_slices(model, f"{nxt}.reduction", "in", repeats=4, stride=width)
            else:
                res += norm_slices(model, "norm") if hasattr(model, "norm") else []
                if isinstance(head_fc, nn.Linear):
                    res += linear_slices(model, "head.fc", "in")
            groups[f"{p}.residual"] = Group(f"{p}.residual", "residual", width, res, module=p)
        order = sorted(groups, key=lambda n: (n.split(".blocks")[0], 0 if n.endswith("residual") else 1))
        return PruningSpace(self.arch, {n: groups[n] for n in order})

    def _attn_group(self, q: str, attn: nn.Module, residual: str) -> Group:
        """The window attention of block ``q``: fused qkv rows (with Swin V2's separate q / v biases), tied to the
        stage's ``residual`` or with its own width and per-head table (``tied_attention``)."""
        at = f"{q}.attn"
        a, rows = attn.qkv.out_features // 3, fused_qkv_rows(self.model, at)
        if self.tied_attention:
            return attn_group(self.model, at, a, rows, tied_to=residual)
        return attn_group(self.model, at, a, rows,
                          tables=(TensorSlice(f"{at}.relative_position_bias_table", 1, per_head=True),))

    def q_rows(self, group: Group) -> QRows:
        """The fused qkv's first third of rows (and Swin V2's separate ``q_bias``)."""
        return fused_q_rows(self.model, group.module)

    def stages(self) -> list[StageRef]:
        model = self.model
        out, index = [], 0
        for s, stage in enumerate(self._stages):
            p = f"{self.stages_attr}.{s}"
            blocks = []
            for b in range(len(stage.blocks)):
                blocks.append(BlockRef.pre_norm(model, index, s, f"{p}.blocks.{b}"))
                index += 1
            entry = None if isinstance(stage.downsample, nn.Identity) else f"{p}.downsample"
            first = stage.blocks[0] if len(stage.blocks) else None
            grid = tuple(getattr(first, "input_resolution", getattr(first, "feat_size", (0, 0))))
            width = (model.patch_embed.proj.weight if s == 0 else stage.downsample.reduction.weight).shape[0]
            out.append(StageRef(s, tuple(blocks), f"{p}.residual", entry, width, grid))
        return out

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.patch_embed(images)

    def attention_bias(self, block: BlockRef, windows: int) -> torch.Tensor:
        """Relative position bias ``[1, H, T, T]`` plus, for shifted blocks, the window mask of each window."""
        blk = self.model.get_submodule(block.path)
        bias = blk.attn._get_rel_pos_bias()  # [1, H, T, T]
        mask = blk.attn_mask
        if getattr(blk, "dynamic_mask", False):
            h, w = blk.input_resolution
            pad_h, pad_w = (-h) % blk.window_size[0], (-w) % blk.window_size[1]
            mask = blk.get_attn_mask(torch.empty(1, h + pad_h, w + pad_w, 1, device=bias.device, dtype=bias.dtype))
        if mask is None:
            return bias
        n_win = mask.shape[0]  # the attention batch is (image, window) with the window index fastest
        return bias + mask.repeat(windows // n_win, 1, 1).unsqueeze(1)  # [windows, H, T, T]

    def classifier_weights(self) -> list[torch.Tensor]:
        fc = getattr(self.model.head, "fc", None)
        return [fc.weight] if isinstance(fc, nn.Linear) else []

    def set_stage_blocks(self, stage: int, blocks: list[nn.Module]) -> None:
        st = self._stages[stage]
        st.blocks = nn.Sequential(*blocks) if isinstance(st.blocks, nn.Sequential) else nn.ModuleList(blocks)
        st.depth = len(blocks)

    def sync_attributes(self) -> None:
        model = self.model
        sync_generic_attributes(model)
        dims = []
        for s, stage in enumerate(self._stages):
            c = (model.patch_embed.proj.weight if s == 0 else stage.downsample.reduction.weight).shape[0]
            self._sync_stage(s, stage, c, dims[-1] if dims else c)
            dims.append(c)
            if s < len(model.feature_info):
                model.feature_info[s]["num_chs"] = c
        model.num_features = model.head_hidden_size = dims[-1]
        model.embed_dim = dims[0]
        head = model.head
        head.in_features = dims[-1]
        head.num_features = dims[-1] * head.global_pool.feat_mult() if hasattr(head, "global_pool") else dims[-1]

    def _sync_stage(self, s: int, stage: nn.Module, c: int, prev: int) -> None:
        """A stage's size attributes at width ``c`` (``prev``: the previous stage's width)."""
        if s > 0:
            stage.downsample.dim = stage.downsample.reduction.weight.shape[1] // 4
            stage.downsample.out_dim = c
        stage.dim = c
        for blk in stage.blocks:
            blk.dim = c
            blk.attn.dim = c
            hd = blk.attn.qkv.weight.shape[0] // 3 // blk.attn.num_heads
            blk.attn.scale = hd ** -0.5

    def build_recipe(self) -> dict:
        model = self.model
        pe = model.patch_embed
        wins = [list(st.blocks[0].attn.window_size) if len(st.blocks) else [7, 7] for st in model.layers]
        square = all(w == wins[0] for w in wins) and wins[0][0] == wins[0][1]
        return dict(
            img_size=list(pe.img_size),
            patch_size=pe.patch_size[0],
            in_chans=pe.proj.in_channels,
            num_classes=model.num_classes,
            global_pool=model.global_pool,
            embed_dim=model.layers[0].dim,  # per-stage widths are restored from the saved shapes
            depths=[len(st.blocks) for st in model.layers],
            num_heads=[st.blocks[0].attn.num_heads if len(st.blocks) else 1 for st in model.layers],
            window_size=wins[0][0] if square else wins,  # per-stage windows need a newer timm than the floor
            qkv_bias=model.layers[0].blocks[0].attn.qkv.bias is not None,
            strict_img_size=pe.strict_img_size,
        )

    def stock_kwargs(self) -> dict:
        """Stage widths C * 2**s and uniform blocks within each stage: timm's SwinTransformer with other widths.

        (timm computes the stage widths from one ``embed_dim``; per-stage heads, head_dim and mlp_ratio are free.)
        """
        kw = self.build_recipe()
        widths, heads, head_dims, ratios = [], [], [], []
        for s, stage in enumerate(self.model.layers):
            c = (self.model.patch_embed.proj.weight if s == 0 else stage.downsample.reduction.weight).shape[0]
            shapes = {(b.attn.num_heads, b.attn.qkv.out_features // 3, b.mlp.fc1.out_features) for b in stage.blocks}
            if len(shapes) != 1:
                raise UnsupportedModelError(f"layers.{s}: blocks differ in (heads, attention width, MLP width): "
                                            f"{sorted(shapes)}; a stock SwinTransformer stage has one of each")
            h, a, hidden = shapes.pop()
            widths.append(c)
            heads.append(h)
            head_dims.append(a // h)
            ratios.append(mlp_ratio_for(c, hidden))
        if any(w != widths[0] * 2 ** s for s, w in enumerate(widths)):
            raise UnsupportedModelError(f"stage widths {widths} are not embed_dim * 2**stage: timm's SwinTransformer "
                                        "derives every stage's width from one embed_dim")
        one = lambda v: v[0] if len(set(v)) == 1 else v  # noqa: E731 -- a scalar where it can (older timm)
        kw.update(embed_dim=widths[0], num_heads=heads, head_dim=one(head_dims), mlp_ratio=one(ratios))
        return kw

    def extra_state(self) -> dict:
        """Per-block window/shift layout: after depth pruning it no longer follows timm's even/odd rule."""
        return {f"{self.stages_attr}.{s}.blocks.{b}": {"window_size": list(blk.window_size),
                                                      "shift_size": list(blk.shift_size),
                                                      "target_shift_size": list(blk.target_shift_size)}
                for s, st in enumerate(self._stages) for b, blk in enumerate(st.blocks)}

    def apply_extra_state(self, state: dict) -> None:
        for path, d in state.items():
            blk = self.model.get_submodule(path)
            blk.window_size, blk.shift_size = tuple(d["window_size"]), tuple(d["shift_size"])
            blk.target_shift_size = tuple(d["target_shift_size"])
            blk.window_area = blk.window_size[0] * blk.window_size[1]
            blk._init_buffers()  # attention mask for this shift
