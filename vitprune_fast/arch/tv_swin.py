"""torchvision ``SwinTransformer``: ``swin_t`` / ``swin_s`` / ``swin_b`` (V1) and ``swin_v2_t`` / ``_s`` / ``_b`` (V2;
torchvision is imported only when such a model is passed).

``features`` is one flat ``nn.Sequential``: ``[patch embedding (Conv2d, Permute, LayerNorm), stage 0's blocks,
PatchMerging, stage 1's blocks, ...]``; then ``norm -> permute -> avgpool -> flatten -> head``. The tokens are
channels-last ``[B, H, W, C]`` throughout. A V1 block is pre-norm (``x + attn(norm1(x))``, ``x + mlp(norm2(x))``), a
V2 block post-norm (``x + norm1(attn(x))``); the MLP is ``torchvision.ops.MLP`` (``mlp.0 -> GELU -> mlp.3``). V1's
``PatchMerging`` normalises the 4 neighbours concatenated (4C) before its ``reduction``, V2's ``PatchMergingV2``
normalises the reduction's output (the next stage's width).

``shifted_window_attention`` takes its head size from its input (``C // num_heads``) and reshapes its output to
``C``, so each attention is tied to its stage's residual count (``Group.tied_to``) and keeps every head, the same
number of dims in each: the per-head relative-position bias table (V1) and V2's per-head logit scale and
position-bias MLP are never sliced, and V1's scale ``1/sqrt(C // heads)`` changes with the width (``prune_`` folds
``sqrt(new/old)`` into q's rows; V2's cosine attention normalises q, so the fold leaves it unchanged). q / k / v and
the output projection are applied with ``F.linear`` (``BlockRef.qkv_functional``: the engines tap the weights).
Groups are named by module path: stage s's blocks are ``features.{2s+1}``, so ``features.1.residual``,
``features.3.0.attn``, ``features.3.0.mlp``.

The model takes any image size; the adapter's (DAP's probes, FLOPs targets) is the model's ``image_size`` attribute
when it has one (the CLI sets it from the data), else 224, the size torchvision's weights are trained at.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..space import Group, PruningSpace
from .base import Adapter, BlockRef, StageRef
from .common import (
    QRows,
    attn_group,
    conv_out_slices,
    fused_q_rows,
    fused_qkv_rows,
    linear_slices,
    merged_grids,
    norm_slices,
    sync_generic_attributes,
)

_CLASS = "torchvision.models.swin_transformer.SwinTransformer"


class TvSwinAdapter(Adapter):
    """torchvision ``SwinTransformer`` (V1 and V2 blocks): a residual per stage, a tied ``attn`` and an ``mlp``
    group per block."""

    arch = "tv_swin"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        t = type(model)
        return f"{t.__module__}.{t.__name__}" == _CLASS

    # ------------------------------------------------------------------------------------------ helpers
    def _stage_paths(self) -> list[str]:
        """``features.{2s+1}`` for every stage s."""
        return [f"features.{i}" for i in range(1, len(self.model.features), 2)]

    def _blocks(self, s: int) -> list[tuple[str, nn.Module]]:
        p = self._stage_paths()[s]
        return [(f"{p}.{n}", blk) for n, blk in self.model.get_submodule(p).named_children()]

    def _merging(self, s: int) -> nn.Module | None:
        """The merging after stage s (None after the last)."""
        i = 2 * s + 2
        return self.model.features[i] if i < len(self.model.features) else None

    @property
    def _v2(self) -> bool:
        from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformerBlockV2

        return any(isinstance(m, (SwinTransformerBlockV2, PatchMergingV2)) for m in self.model.features.modules())

    def _widths(self) -> list[int]:
        embed = self.model.features[0][0]
        return [embed.out_channels if s == 0 else self._merging(s - 1).reduction.out_features
                for s in range(len(self._stage_paths()))]

    def _check(self) -> None:
        from torchvision.models.swin_transformer import (
            PatchMerging,
            PatchMergingV2,
            ShiftedWindowAttention,
            ShiftedWindowAttentionV2,
            SwinTransformerBlock,
            SwinTransformerBlockV2,
        )
        from torchvision.ops import MLP

        m = self.model
        embed = m.features[0]
        if not (isinstance(embed, nn.Sequential) and isinstance(embed[0], nn.Conv2d)
                and isinstance(embed[-1], nn.LayerNorm)):
            raise UnsupportedModelError("features.0: only the Conv2d -> Permute -> LayerNorm patch embedding is "
                                        "supported")
        v2 = self._v2
        block, attn, merging = ((SwinTransformerBlockV2, ShiftedWindowAttentionV2, PatchMergingV2) if v2 else
                                (SwinTransformerBlock, ShiftedWindowAttention, PatchMerging))
        for s in range(len(self._stage_paths())):
            for q, blk in self._blocks(s):
                if type(blk) is not block or type(blk.attn) is not attn or type(blk.mlp) is not MLP:
                    raise UnsupportedModelError(f"{q}: {type(blk).__name__} is not torchvision's {block.__name__} "
                                                "(V1 and V2 blocks are not mixed)")
                for norm in ("norm1", "norm2"):
                    if not isinstance(getattr(blk, norm), nn.LayerNorm):
                        raise UnsupportedModelError(f"{q}.{norm}: only LayerNorm is supported")
                if len(blk.mlp) != 5 or not isinstance(blk.mlp[0], nn.Linear) or not isinstance(blk.mlp[3], nn.Linear):
                    raise UnsupportedModelError(f"{q}.mlp: only Linear -> act -> Dropout -> Linear is supported")
            down = self._merging(s)
            if down is not None and type(down) is not merging:
                raise UnsupportedModelError(f"features.{2 * s + 2}: {type(down).__name__} is not {merging.__name__}")
        if not isinstance(m.head, (nn.Linear, nn.Identity)):
            raise UnsupportedModelError(f"head: {type(m.head).__name__} is not supported")

    # ------------------------------------------------------------------------------------------ structure
    def describe(self) -> PruningSpace:
        """``features.{2s+1}.residual`` and its blocks' ``attn`` (tied to it) and ``mlp`` groups."""
        self._check()
        m = self.model
        groups: dict[str, Group] = {}
        widths, v2 = self._widths(), self._v2
        paths = self._stage_paths()
        for s, p in enumerate(paths):
            if s == 0:
                res = conv_out_slices(m, "features.0.0") + norm_slices(m, "features.0.2")
            else:
                prev = f"features.{2 * s}"
                res = linear_slices(m, f"{prev}.reduction", "out") + (norm_slices(m, f"{prev}.norm") if v2 else [])
            block_groups: dict[str, Group] = {}
            for q, blk in self._blocks(s):
                at = f"{q}.attn"
                res += norm_slices(m, f"{q}.norm1") + norm_slices(m, f"{q}.norm2")
                res += linear_slices(m, f"{at}.qkv", "in") + linear_slices(m, f"{at}.proj", "out")
                res += linear_slices(m, f"{q}.mlp.0", "in") + linear_slices(m, f"{q}.mlp.3", "out")
                block_groups[at] = attn_group(m, at, blk.attn.qkv.out_features // 3, fused_qkv_rows(m, at),
                                              tied_to=f"{p}.residual")
                block_groups[f"{q}.mlp"] = Group(
                    f"{q}.mlp", "mlp", blk.mlp[0].out_features,
                    linear_slices(m, f"{q}.mlp.0", "out") + linear_slices(m, f"{q}.mlp.3", "in"), module=f"{q}.mlp")
            if s + 1 < len(paths):  # the merging after this stage sees [x0 | x1 | x2 | x3], each this stage's width
                nxt = f"features.{2 * s + 2}"
                res += [] if v2 else norm_slices(m, f"{nxt}.norm", repeats=4, stride=widths[s])
                res += linear_slices(m, f"{nxt}.reduction", "in", repeats=4, stride=widths[s])
            else:
                res += norm_slices(m, "norm") + (linear_slices(m, "head", "in") if isinstance(m.head, nn.Linear)
                                                 else [])
            groups[f"{p}.residual"] = Group(f"{p}.residual", "residual", widths[s], res, module=p)
            groups |= block_groups
        return PruningSpace(self.arch, groups)

    def stages(self) -> list[StageRef]:
        out, index = [], 0
        v2 = self._v2
        for s, (p, width, grid) in enumerate(zip(self._stage_paths(), self._widths(), self._grids(), strict=True)):
            refs = []
            for q, _ in self._blocks(s):
                at = f"{q}.attn"
                refs.append(BlockRef(index, s, q, at, f"{q}.mlp", f"{q}.norm1", f"{q}.norm2", f"{at}.qkv",
                                     f"{at}.proj", f"{q}.mlp.0", f"{q}.mlp.1", f"{q}.mlp.3", qkv_functional=True,
                                     post_norm=v2))
                index += 1
            out.append(StageRef(s, tuple(refs), f"{p}.residual", f"features.{2 * s}" if s else None, width, grid))
        return out

    def _grids(self) -> list[tuple[int, int]]:
        """Each stage's token grid at :meth:`input_size`: the patch grid, halved (rounding up) by every merging."""
        return merged_grids(self.input_size()[1:], self.model.features[0][0].stride, len(self._stage_paths()))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        embed = self.model.features[0]
        return embed(images.to(embed[0].weight.dtype))

    def embed_modules(self) -> list[nn.Module]:
        return [self.model.features[0]]

    def head(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.head(m.flatten(m.avgpool(m.permute(m.norm(x)))))

    def final_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``norm(features(x))``, channels-last."""
        return self.model.norm(x)

    def model_tokens(self, images: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.norm(m.features(images))

    def input_size(self) -> tuple[int, int, int]:
        size = getattr(self.model, "image_size", 224)
        h, w = (size, size) if isinstance(size, int) else size
        return 3, int(h), int(w)

    def accepts_size(self, h: int, w: int) -> bool:
        return True  # windows pad, mergings pad: any size runs

    def classifier_weights(self) -> list[torch.Tensor]:
        return [self.model.head.weight] if isinstance(self.model.head, nn.Linear) else []

    def num_classes(self) -> int:
        return self.model.head.out_features if isinstance(self.model.head, nn.Linear) else 0

    def q_rows(self, group: Group) -> QRows:
        return fused_q_rows(self.model, group.module)

    # ---------------------------------------------------------------------------------------- mutation
    def regroup_heads_masked(self, group: Group, heads: int) -> None:
        raise UnsupportedModelError(f"{group.name}: torchvision's window attention takes its head size from its "
                                    "input width, so a head merge cannot be expressed")

    def set_stage_blocks(self, stage: int, blocks: list[nn.Module]) -> None:
        self.model.features[2 * stage + 1] = nn.Sequential(*blocks)

    def sync_attributes(self) -> None:
        """Linear / LayerNorm sizes and each merging's ``dim`` (its input width) from the tensors."""
        sync_generic_attributes(self.model)
        for s in range(len(self._stage_paths())):
            down = self._merging(s)
            if down is not None:
                down.dim = down.reduction.in_features // 4

    # ------------------------------------------------------------------------------------- persistence
    def model_name(self) -> str:
        return "torchvision.SwinTransformer"

    @classmethod
    def build_model(cls, model_name: str, kwargs: dict) -> nn.Module:
        """``torchvision.models.SwinTransformer(**kwargs)`` with V2's block and merging where ``version`` is 2, an
        ``nn.Identity`` head where ``num_classes`` is 0, and the ``image_size`` attribute (the stage-0 width and the
        recipe's head counts; tensors are resized after)."""
        from torchvision.models import swin_transformer as tv

        if model_name != "torchvision.SwinTransformer":
            raise UnsupportedModelError(f"{model_name} is not a class {cls.__name__} builds")
        kw = dict(kwargs)
        size = kw.pop("image_size", None)
        if kw.pop("version", 1) == 2:
            kw.update(block=tv.SwinTransformerBlockV2, downsample_layer=tv.PatchMergingV2)
        headless = kw["num_classes"] == 0
        model = tv.SwinTransformer(**(kw | {"num_classes": 1} if headless else kw))
        if headless:
            model.head = nn.Identity()
        if size is not None:
            model.image_size = size
        return model

    def build_recipe(self) -> dict:
        m = self.model
        first = [self._blocks(s)[0][1] for s in range(len(self._stage_paths())) if self._blocks(s)]
        attn = first[0].attn if first else None
        recipe = {"patch_size": list(m.features[0][0].kernel_size), "embed_dim": m.features[0][0].out_channels,
                  "depths": [len(self._blocks(s)) for s in range(len(self._stage_paths()))],
                  "num_heads": [blk.attn.num_heads for blk in first] if len(first) == len(self._stage_paths())
                  else [1] * len(self._stage_paths()),
                  "window_size": list(attn.window_size) if attn is not None else [7, 7],
                  "stochastic_depth_prob": 0.0, "num_classes": self.num_classes(),
                  "version": 2 if self._v2 else 1}
        if hasattr(m, "image_size"):
            recipe["image_size"] = m.image_size
        return recipe

    def extra_state(self) -> dict:
        """Each block's shift: after depth pruning it no longer follows the even/odd rule the recipe rebuilds."""
        return {q: {"shift_size": list(blk.attn.shift_size)} for s in range(len(self._stage_paths()))
                for q, blk in self._blocks(s)}

    def apply_extra_state(self, state: dict) -> None:
        for path, d in state.items():
            self.model.get_submodule(path).attn.shift_size = list(d["shift_size"])
