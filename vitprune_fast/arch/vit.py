"""Adapter for timm ``VisionTransformer`` (ViT, DeiT, DeiT-distilled, LayerScale, with/without class token)."""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..norms import is_norm
from ..space import Group, PruningSpace, TensorSlice
from .base import Adapter, BlockRef, StageRef, mlp_ratio_for
from .common import (
    NormTokens,
    PatchEmbedNormHead,
    QRows,
    TimmModelClass,
    attn_group,
    check_attn_pool,
    check_block_norms,
    check_conv_embed_and_head,
    fused_q_rows,
    fused_qkv_rows,
    linear_q_rows,
    linear_slices,
    mlp_group,
    mlp_slices,
    norm_slices,
    patch_embed_slices,
    prenorm_residual_slices,
    residual_tail,
    sync_generic_attributes,
    sync_single_stage_width,
    token_slices,
)

_BLOCK_REASONS = {  # why timm's other ViT blocks are refused
    "DiffParallelScalingBlock": "one out_proj over [attention | MLP] columns, as with ParallelScalingBlock("
                                "fuse_out_proj=True)",
}


class _Pair(NamedTuple):
    """Paths (relative to the block) of one attention / MLP pair: its norms, branches and layer scales."""

    norm1: str
    attn: str
    ls1: str
    norm2: str
    mlp: str
    ls2: str


def _pairs(blk: nn.Module) -> list[_Pair]:
    """The attention / MLP pairs of a Block / ResPostBlock (one) or a ParallelThingsBlock (``num_parallel``: each
    ``attns.j`` / ``ffns.j`` a ``Sequential(norm, attn | mlp, ls, drop_path)`` reading the same input)."""
    from timm.models.vision_transformer import ParallelThingsBlock

    if type(blk) is ParallelThingsBlock:
        return [_Pair(f"attns.{j}.norm", f"attns.{j}.attn", f"attns.{j}.ls", f"ffns.{j}.norm", f"ffns.{j}.mlp",
                      f"ffns.{j}.ls") for j in range(len(blk.attns))]
    return [_Pair("norm1", "attn", "ls1", "norm2", "mlp", "ls2")]


def _has_gamma(blk: nn.Module, ls: str) -> bool:
    """Whether the block has a LayerScale (``gamma``) at relative path ``ls`` (a ResPostBlock has none)."""
    return hasattr(blk, ls.split(".")[0]) and hasattr(blk.get_submodule(ls), "gamma")


def _is_diff(attn: nn.Module) -> bool:
    """timm's ``DiffAttention`` (differential attention): per head, ``(softmax(q1 k1) - lambda softmax(q2 k2)) v``
    over two half-size q/k sub-heads, a per-head RMS sub-norm, output reshaped to the input width."""
    try:
        from timm.layers.diff_attention import DiffAttention
    except ImportError:  # older timm
        return False
    return type(attn) is DiffAttention


def _is_parallel_scaling(blk: nn.Module) -> bool:
    """timm's ``ParallelScalingBlock`` (ViT-22B): ``x + ls(attn_out_proj(attn) + mlp_out_proj(act(mlp)))`` with one
    ``in_norm`` and one ``in_proj`` whose rows are ``[mlp hidden | q | k | v]``."""
    from timm.models.vision_transformer import ParallelScalingBlock

    return type(blk) is ParallelScalingBlock


class ViTAdapter(TimmModelClass, PatchEmbedNormHead, NormTokens, Adapter):
    """timm ``VisionTransformer``: one stage, one residual group, blocks in ``model.<blocks_attr>``.

    Subclasses of the model class that only rename the block list set ``blocks_attr``.
    """

    arch = "vit"
    model_class = "timm.models.vision_transformer.VisionTransformer"
    blocks_attr = "blocks"

    @property
    def _blocks(self) -> nn.Sequential:
        blocks = getattr(self.model, self.blocks_attr, None)
        if not isinstance(blocks, (nn.Sequential, nn.ModuleList)):
            raise UnsupportedModelError(
                f"{type(self.model).__name__} has no block list `{self.blocks_attr}`: a VisionTransformer subclass "
                "with its own layout needs its own adapter (vitprune_fast.arch.register_adapter)")
        return blocks

    def _check_block(self, i: int) -> None:
        from timm.models.vision_transformer import Block, ParallelThingsBlock, ResPostBlock

        blk = self._blocks[i]
        where = f"{self.blocks_attr}.{i}"
        if _is_parallel_scaling(blk):
            return self._check_parallel_block(blk, where)
        if type(blk) not in (Block, ResPostBlock, ParallelThingsBlock):
            raise UnsupportedModelError(f"{where}: block type {type(blk).__name__} is not supported (timm's Block, "
                                        "ResPostBlock, ParallelScalingBlock and ParallelThingsBlock are; "
                                        f"{_BLOCK_REASONS.get(type(blk).__name__, 'another layout')})")
        for pair in _pairs(blk):
            self._check_pair(blk, pair, where)

    def _check_pair(self, blk: nn.Module, pair: _Pair, where: str) -> None:
        from timm.models.vision_transformer import Attention

        attn = blk.get_submodule(pair.attn)
        where_attn = f"{where}.{pair.attn}"
        if type(attn) is not Attention and not _is_diff(attn):
            raise UnsupportedModelError(f"{where_attn}: attention class {type(attn).__module__}."
                                        f"{type(attn).__name__} is not supported (timm's ViT Attention with a fused "
                                        "qkv Linear and DiffAttention are)")
        if not isinstance(attn.qkv, nn.Linear):
            raise UnsupportedModelError(f"{where_attn}.qkv: {type(attn.qkv).__name__} is not an nn.Linear")
        if not _is_diff(attn) and not hasattr(attn, "attn_dim"):  # came with timm 1.0.23's Attention (the floor)
            raise UnsupportedModelError(f"{where_attn}: timm's ViT Attention has no attn_dim in timm "
                                        f"{_timm_version()}; vitprune_fast needs timm>=1.0.23")
        for part in ("q_norm", "k_norm"):
            m = getattr(attn, part, nn.Identity())
            if not isinstance(m, nn.Identity) and not is_norm(m):
                raise UnsupportedModelError(f"{where_attn}.{part}: {type(m).__name__} is not a LayerNorm / RMSNorm")
        if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
            norm_slices(self.model, f"{where_attn}.norm")  # a scale-norm over the attention width: must be prunable
        if getattr(attn, "gate", None) is not None:
            raise UnsupportedModelError(f"{where_attn}.gate: gated attention is not supported")
        mlp_slices(self.model, f"{where}.{pair.mlp}")  # raises for an MLP form it cannot prune
        for ls in (pair.ls1, pair.ls2):
            m = blk.get_submodule(ls) if hasattr(blk, ls.split(".")[0]) else nn.Identity()  # (ResPostBlock: none)
            if not isinstance(m, nn.Identity) and not hasattr(m, "gamma"):
                raise UnsupportedModelError(f"{where}.{ls}: {type(m).__name__} is not supported")
        check_block_norms(blk, where, (pair.norm1, pair.norm2),
                          message="{where}.{name}: {type} is not supported (only LayerNorm / RMSNorm in front of a "
                                  "branch)")

    def _pair_groups(self, p: str, pair: _Pair, groups: dict[str, Group], multiple: set[int]) -> list[TensorSlice]:
        """One attention / MLP pair of block ``p``: its groups (added to ``groups``) and its residual slices; the
        head size of an attention tied to the residual by whole heads is added to ``multiple``."""
        model = self.model
        at, ml = f"{p}.{pair.attn}", f"{p}.{pair.mlp}"
        res = prenorm_residual_slices(model, p, gammas=(f"{pair.ls1}.gamma", f"{pair.ls2}.gamma"),
                                      inputs=(f"{pair.attn}.qkv",), norms=(pair.norm1, pair.norm2), attn=pair.attn,
                                      mlp=pair.mlp)
        attn = model.get_submodule(at)
        a = attn.qkv.out_features // 3
        # differential attention: a head is two q/k sub-heads (2 * head_dim channels) sharing one v head, its
        # output reshaped to the input width (tied) and RMS-normed per head (whole heads)
        diff = _is_diff(attn)
        head_dim = 2 * attn.head_dim if diff else attn.head_dim
        if diff:
            multiple.add(head_dim)
        groups[at] = attn_group(
            model, at, a, fused_qkv_rows(model, at) + norm_slices(model, f"{at}.norm"), head_dim=head_dim,
            tied_to="residual" if diff else None,
            whole_heads=diff or not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)))
        groups[ml] = mlp_group(model, ml)
        return res

    def _check_parallel_block(self, blk: nn.Module, where: str) -> None:
        if blk.out_proj is not None:
            raise UnsupportedModelError(f"{where}: ParallelScalingBlock(fuse_out_proj=True) is not supported (one "
                                        "out_proj over [attention | MLP] columns)")
        for part in ("in_norm", "q_norm", "k_norm"):
            m = getattr(blk, part)
            if not (is_norm(m) or (part != "in_norm" and isinstance(m, nn.Identity))):
                raise UnsupportedModelError(f"{where}.{part}: {type(m).__name__} is not a LayerNorm / RMSNorm")
        if not isinstance(blk.ls, nn.Identity) and not hasattr(blk.ls, "gamma"):
            raise UnsupportedModelError(f"{where}.ls: {type(blk.ls).__name__} is not supported")
        if len(blk.in_split) != 4 or len(set(blk.in_split[1:])) != 1 or sum(blk.in_split) != blk.in_proj.out_features:
            raise UnsupportedModelError(f"{where}.in_split {blk.in_split} is not [hidden, dim, dim, dim]")

    def _parallel_groups(self, i: int, groups: dict[str, Group]) -> list[TensorSlice]:
        """A ParallelScalingBlock's attention and MLP groups (added to ``groups``); returns its residual slices.

        ``in_proj`` rows ``[0, H)`` are MLP units, rows ``H + r * A + d`` (r = q, k, v) attention dim d. The
        attention reshapes its output to the input width, so it is tied to the residual (whole heads with qk-norm).
        """
        model, p = self.model, f"{self.blocks_attr}.{i}"
        blk = self._blocks[i]
        hidden, a = blk.in_split[0], blk.in_split[1]
        res = norm_slices(model, f"{p}.in_norm") + linear_slices(model, f"{p}.in_proj", "in")
        res += linear_slices(model, f"{p}.attn_out_proj", "out") + linear_slices(model, f"{p}.mlp_out_proj", "out")
        if hasattr(blk.ls, "gamma"):
            res.append(TensorSlice(f"{p}.ls.gamma", 0))
        rows = [TensorSlice(f"{p}.in_proj.{t}", 0, 3, a, offset=hidden) for t in ("weight", "bias")
                if getattr(blk.in_proj, t) is not None]
        groups[f"{p}.attn"] = Group(
            f"{p}.attn", "attn", a, rows + linear_slices(model, f"{p}.attn_out_proj", "in"),
            num_heads=blk.num_heads, head_dim=blk.head_dim, module=p, tied_to="residual",
            whole_heads=not isinstance(blk.q_norm, nn.Identity) or not isinstance(blk.k_norm, nn.Identity))
        units = [TensorSlice(f"{p}.in_proj.{t}", 0) for t in ("weight", "bias") if getattr(blk.in_proj, t) is not None]
        if blk.mlp_bias is not None:
            units.append(TensorSlice(f"{p}.mlp_bias", 0))
        groups[f"{p}.mlp"] = Group(f"{p}.mlp", "mlp", hidden,
                                   units + linear_slices(model, f"{p}.mlp_out_proj", "in"), module=p)
        return res

    def describe(self) -> PruningSpace:
        """Residual / attn / mlp groups of a timm VisionTransformer.

        Attention with per-head q/k norms (qk-norm) is pruned by whole heads only (``Group.whole_heads``): a norm
        over each head's dims has one weight per position in the head, shared by every head, so removing different
        dims in different heads cannot be expressed and removing the same dims changes what every head normalises.
        A scale-norm over the attention width and an MLP's sub-norm are part of their group (masked over the kept
        channels, sliced on removal).

        An attention-pooling head (``attn_pool``, SigLIP's MAP head) reads the residual through its kv projection;
        its attention (``attn_pool.attn``) is tied to the residual's width (timm's ``AttentionPoolLatent`` reshapes
        the attention output to its input width), its MLP is a group (``attn_pool.mlp``), and its output width --
        proj, norm, MLP, fc_norm, head: one pooled token, a negligible share of the FLOPs -- is left whole.
        """
        model = self.model
        blocks = self._blocks
        pool = getattr(model, "attn_pool", None)
        if pool is not None:
            check_attn_pool(pool)
        check_conv_embed_and_head(model)
        groups: dict[str, Group] = {}
        res = patch_embed_slices(model) + token_slices(model, ("cls_token", "reg_token", "dist_token", "pos_embed"))
        res += norm_slices(model, "norm_pre")
        multiple = set()
        for i, blk in enumerate(blocks):
            self._check_block(i)
            p = f"{self.blocks_attr}.{i}"
            if _is_parallel_scaling(blk):
                res += self._parallel_groups(i, groups)
                if groups[f"{p}.attn"].whole_heads:  # tied whole heads: the residual keeps whole head sizes
                    multiple.add(blk.head_dim)
                continue
            for pair in _pairs(blk):
                res += self._pair_groups(p, pair, groups, multiple)
        res += residual_tail(model, groups, ("head", "head_dist"))  # a pool's output width is its own: left whole
        if len(multiple) > 1:
            raise UnsupportedModelError(f"attentions tied to the residual by whole heads have different head sizes "
                                        f"{sorted(multiple)}: the residual cannot keep whole heads of each")
        residual = Group("residual", "residual", model.embed_dim, res, module="",
                         multiple_of=multiple.pop() if multiple else 1)
        return PruningSpace(self.arch, {"residual": residual} | groups)

    def stages(self) -> list[StageRef]:
        model = self.model
        from timm.models.vision_transformer import ResPostBlock

        blocks = tuple(self._parallel_ref(i) if _is_parallel_scaling(blk)
                       else self._pairs_ref(i, type(blk) is ResPostBlock) for i, blk in enumerate(self._blocks))
        return [StageRef(0, blocks, "residual", None, model.patch_embed.proj.weight.shape[0],
                         tuple(model.patch_embed.grid_size), model.num_prefix_tokens, model.cls_token is not None)]

    def _pairs_ref(self, i: int, post_norm: bool) -> BlockRef:
        """A Block / ResPostBlock, or a ParallelThingsBlock as its first attention / MLP pair with the others in
        ``BlockRef.parallel`` (each pair's branch output is its Sequential: the layer scale included)."""
        p = f"{self.blocks_attr}.{i}"
        blk = self._blocks[i]
        refs, pairs = [], _pairs(blk)
        for pair in pairs:
            ls = [f"{p}.{n}.gamma" if _has_gamma(blk, n) else None for n in (pair.ls1, pair.ls2)]
            mlp = blk.get_submodule(pair.mlp)
            fc1 = "fc1_x" if hasattr(mlp, "fc1_x") else "fc1"  # SwiGLU: the value projection (fc1_g gates it)
            # side by side: a branch's contribution is its Sequential's output (attns.j / ffns.j)
            outs = (f"{p}.{pair.attn.rpartition('.')[0]}", f"{p}.{pair.mlp.rpartition('.')[0]}") if len(
                pairs) > 1 else None
            refs.append(BlockRef(i, 0, p, f"{p}.{pair.attn}", f"{p}.{pair.mlp}", f"{p}.{pair.norm1}",
                                 f"{p}.{pair.norm2}", f"{p}.{pair.attn}.qkv", f"{p}.{pair.attn}.proj",
                                 f"{p}.{pair.mlp}.{fc1}", f"{p}.{pair.mlp}.act", f"{p}.{pair.mlp}.fc2", *ls,
                                 post_norm=post_norm, branch_outputs=outs))
        return dataclasses.replace(refs[0], parallel=tuple(refs[1:]))

    def _parallel_ref(self, i: int) -> BlockRef:
        """A ParallelScalingBlock as a BlockRef: both branches read ``in_norm``; ``attn`` / ``mlp`` name its groups
        (no submodule holds either branch alone); q, k, v and the MLP's input are rows of ``in_proj``."""
        p = f"{self.blocks_attr}.{i}"
        ls = f"{p}.ls.gamma" if hasattr(self._blocks[i].ls, "gamma") else None
        return BlockRef(i, 0, p, f"{p}.attn", f"{p}.mlp", f"{p}.in_norm", f"{p}.in_norm", f"{p}.in_proj",
                        f"{p}.attn_out_proj", f"{p}.in_proj", f"{p}.mlp_act", f"{p}.mlp_out_proj", ls, ls,
                        branch_outputs=(f"{p}.attn_out_proj", f"{p}.mlp_out_proj"))

    def hybrid_refusal(self) -> str | None:
        if any(_is_parallel_scaling(b) for b in self._blocks):
            return "a ParallelScalingBlock's attention and MLP share in_norm and in_proj: neither half can move alone"
        return None

    def q_rows(self, group: Group) -> QRows:
        """An attention pool's ``q``; a ParallelScalingBlock's ``in_proj`` rows after its MLP rows; else the fused
        qkv's first third of rows."""
        model = self.model
        if group.module == "attn_pool":
            return linear_q_rows(model, "attn_pool.q")
        blk = model.get_submodule(group.module)
        if _is_parallel_scaling(blk):
            return linear_q_rows(model, f"{group.module}.in_proj", blk.in_split[0], blk.in_split[1])
        return fused_q_rows(model, group.module)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.patch_embed(images)
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        return m.norm_pre(x)

    def embed_modules(self) -> list[nn.Module]:
        return [self.model.patch_embed, self.model.norm_pre]

    def output_group(self) -> str | None:
        """An attention pool's output width is its own (left whole): then no group's channels are the features."""
        return None if getattr(self.model, "attn_pool", None) is not None else super().output_group()

    def classifier_weights(self) -> list[torch.Tensor]:
        return [h.weight for h in (self.model.head, getattr(self.model, "head_dist", None)) if isinstance(h, nn.Linear)]

    def set_stage_blocks(self, stage: int, blocks: list[nn.Module]) -> None:
        if stage != 0:
            raise IndexError(f"a VisionTransformer has one stage, got stage {stage}")
        setattr(self.model, self.blocks_attr, nn.Sequential(*blocks))

    def sync_attributes(self) -> None:
        model = self.model
        sync_generic_attributes(model)
        sync_single_stage_width(model, model.patch_embed.proj.weight.shape[0])
        for blk in self._blocks:
            if _is_parallel_scaling(blk):
                hidden = blk.mlp_out_proj.in_features
                a = (blk.in_proj.out_features - hidden) // 3
                blk.in_split = [hidden, a, a, a]
                blk.head_dim = a // blk.num_heads
                blk.scale = blk.head_dim ** -0.5
                continue
            for pair in _pairs(blk):
                attn = blk.get_submodule(pair.attn)
                if _is_diff(attn):  # q/k sub-heads of half a head
                    attn.head_dim = attn.qkv.weight.shape[0] // 3 // attn.num_heads // 2
                    attn.scale = attn.head_dim ** -0.5
                    continue
                attn.attn_dim = attn.qkv.weight.shape[0] // 3
                attn.head_dim = attn.attn_dim // attn.num_heads
                attn.scale = attn.head_dim ** -0.5

    def build_recipe(self) -> dict:
        model = self.model
        pe = model.patch_embed
        c = model.embed_dim
        blocks = self._blocks
        heads = _attn_of(blocks[0]).num_heads if len(blocks) else 1
        kw = dict(
            img_size=list(pe.img_size) if pe.img_size is not None else None,
            patch_size=list(pe.patch_size),
            in_chans=pe.proj.in_channels,
            num_classes=model.num_classes,
            global_pool=model.global_pool,
            depth=len(blocks),
            embed_dim=c,
            num_heads=heads if c % heads == 0 else 1,
            class_token=model.cls_token is not None,
            reg_tokens=model.reg_token.shape[1] if getattr(model, "reg_token", None) is not None else 0,
            no_embed_class=model.no_embed_class,
            pos_embed="learn" if model.pos_embed is not None else "none",
            qkv_bias=_qkv_of(blocks[0]).bias is not None if len(blocks) else True,
            init_values=1e-5 if len(blocks) and _has_layer_scale(blocks[0]) else None,
            pre_norm=not isinstance(model.norm_pre, nn.Identity),
            fc_norm=not isinstance(model.fc_norm, nn.Identity),
            dynamic_img_size=getattr(model, "dynamic_img_size", False),
        )
        if len(blocks):  # optional norms, passed only when present (older timm lacks the scale-norm kwargs)
            attn = _attn_of(blocks[0])
            mlp = None if _is_parallel_scaling(blocks[0]) else blocks[0].get_submodule(_pairs(blocks[0])[0].mlp)
            flags = {"qk_norm": not isinstance(attn.q_norm, nn.Identity),
                     "scale_attn_norm": not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity),
                     "scale_mlp_norm": not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity)}
            kw.update({k: True for k, v in flags.items() if v})
        if isinstance(model.fc_norm, nn.Identity) and isinstance(model.norm, nn.Identity):
            kw["final_norm"] = False  # only passed when needed: older timm has no such kwarg
            kw.pop("fc_norm")
        return kw

    def stock_kwargs(self) -> dict:
        """Uniform blocks with the attention width equal to embed_dim: timm's VisionTransformer with other widths."""
        kw = self.build_recipe()
        c = kw["embed_dim"]
        shapes = {shape for b in self._blocks for shape in _pair_shapes(b)}
        if len(shapes) > 1:
            raise UnsupportedModelError(f"blocks differ in (heads, attention width, MLP width): {sorted(shapes)}; "
                                        "a stock VisionTransformer has the same widths in every block")
        if shapes:
            heads, width, hidden = shapes.pop()
            if width != c:
                raise UnsupportedModelError(f"attention width {width} differs from embed_dim {c}; timm's "
                                            "VisionTransformer ties them (head_dim = embed_dim / num_heads)")
            kw.update(num_heads=heads, mlp_ratio=mlp_ratio_for(c, hidden))
        return kw


def _pair_shapes(blk: nn.Module) -> list[tuple[int, int, int]]:
    """(heads, attention width, MLP hidden_features) of every attention / MLP pair of a block."""
    if _is_parallel_scaling(blk):
        return [(blk.num_heads, blk.in_split[1], blk.in_split[0])]
    out = []
    for pair in _pairs(blk):
        attn, mlp = blk.get_submodule(pair.attn), blk.get_submodule(pair.mlp)
        fc1 = getattr(mlp, "fc1", None)
        out.append((attn.num_heads, attn.qkv.out_features // 3,
                    fc1.out_features if fc1 is not None else mlp.fc2.in_features))
    return out


def _attn_of(blk: nn.Module) -> nn.Module:
    """The module holding a block's (first) attention's attributes (num_heads, q_norm...): the block itself for a
    ParallelScalingBlock."""
    return blk if _is_parallel_scaling(blk) else blk.get_submodule(_pairs(blk)[0].attn)


def _qkv_of(blk: nn.Module) -> nn.Linear:
    """The Linear making a block's q, k, v (a parallel block's in_proj makes the MLP's input too)."""
    return blk.in_proj if _is_parallel_scaling(blk) else _attn_of(blk).qkv


def _has_layer_scale(blk: nn.Module) -> bool:
    return _has_gamma(blk, "ls" if _is_parallel_scaling(blk) else _pairs(blk)[0].ls1)


def _timm_version() -> str:
    import timm

    return timm.__version__
