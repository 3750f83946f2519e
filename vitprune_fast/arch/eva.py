"""Adapter for timm ``Eva``: EVA / EVA-02, and what builds on ``timm.models.eva`` (PE, DINOv3, RoPE-ViT, ...).

Two facts of timm's classes shape the pruning space:

* ``EvaAttention`` reshapes its output to its INPUT width (``reshape(B, N, C)``), so its attention width must equal
  the residual width: every ``EvaAttention`` group is tied to the residual (``Group.tied_to``) and keeps exactly
  the residual's kept count. ``AttentionRope`` has its own ``attn_dim`` and is planned on its own.
* Rotary embeddings rotate pairs of dims inside a head with frequencies fixed by the head size, so a head keeps
  all its dims: attention with rope (or per-head q/k norms) is pruned by whole heads (``Group.whole_heads``), and
  the residual keeps a multiple of the head size (the rotary module is rebuilt from ``embed_dim / num_heads``).
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
    attn_pool_groups,
    check_attn_pool,
    check_conv_embed_and_head,
    linear_slices,
    mlp_input_slices,
    mlp_slices,
    norm_slices,
    patch_embed_slices,
    qkv_bias_slices,
    sync_attn_pool,
    sync_generic_attributes,
)


class EvaAdapter(SingleStageDefaults, Adapter):
    """timm ``Eva``: one stage, one residual group, ``EvaBlock``s (or post-norm ``EvaBlockPostNorm``s) with a rotary
    embedding passed in."""

    arch = "eva"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from timm.models.eva import Eva

        return isinstance(model, Eva)

    # ------------------------------------------------------------------------------------------- checks
    def _check(self) -> None:
        from timm.layers import AttentionRope
        from timm.models.eva import EvaAttention, EvaBlock, EvaBlockPostNorm

        m = self.model
        if getattr(m, "rope_mixed", False):
            raise UnsupportedModelError("rope_type='mixed': learned rotary frequencies per block and per head are "
                                        "not supported (removing a head would have to slice them)")
        check_conv_embed_and_head(m)
        if getattr(m, "attn_pool", None) is not None:
            check_attn_pool(m.attn_pool)
        for i, blk in enumerate(m.blocks):
            where = f"blocks.{i}"
            if type(blk) not in (EvaBlock, EvaBlockPostNorm):
                raise UnsupportedModelError(f"{where}: {type(blk).__name__} is not supported (EvaBlock and "
                                            "EvaBlockPostNorm are)")
            attn = blk.attn
            if type(attn) not in (EvaAttention, AttentionRope):
                raise UnsupportedModelError(f"{where}.attn: {type(attn).__name__} is not supported")
            if getattr(attn, "gate", None) is not None:
                raise UnsupportedModelError(f"{where}.attn.gate: gated attention is not supported")
            if getattr(attn, "num_kv_groups", 1) != 1:
                raise UnsupportedModelError(f"{where}.attn: grouped-query attention (num_kv_heads) is not supported")
            for part in ("q_norm", "k_norm"):
                q = getattr(attn, part)
                if not isinstance(q, nn.Identity) and not is_norm(q):
                    raise UnsupportedModelError(f"{where}.attn.{part}: {type(q).__name__} is not a LayerNorm / RMSNorm")
            for nm in ("norm1", "norm2"):
                if not is_norm(getattr(blk, nm)):
                    raise UnsupportedModelError(f"{where}.{nm}: {type(getattr(blk, nm)).__name__} is not supported")

    @staticmethod
    def _tied(attn: nn.Module) -> bool:
        from timm.models.eva import EvaAttention

        return type(attn) is EvaAttention  # reshapes its output to the input width

    def _qkv_slices(self, p: str, side: str, a: int) -> list[TensorSlice]:
        """The q, k, v projections of attention ``p``: input columns (``side="in"``) or the rows of attention dim d
        (fused qkv rows d, A + d, 2A + d, and EVA's separate q / k / v biases)."""
        attn = self.model.get_submodule(p)
        if attn.qkv is None:
            return [s for n in ("q_proj", "k_proj", "v_proj") for s in linear_slices(self.model, f"{p}.{n}", side)]
        if side == "in":
            return linear_slices(self.model, f"{p}.qkv", "in")
        out = linear_slices(self.model, f"{p}.qkv", "out", repeats=3, stride=a)
        return out + qkv_bias_slices(self.model, p)

    # ------------------------------------------------------------------------------------------ structure
    def describe(self) -> PruningSpace:
        """``residual``, ``blocks.{i}.attn`` (tied / whole heads, see the module docstring), ``blocks.{i}.mlp``."""
        self._check()
        m = self.model
        rope = m.rope is not None
        res = patch_embed_slices(m)
        for tok in ("cls_token", "reg_token", "pos_embed"):
            if getattr(m, tok, None) is not None:
                res.append(TensorSlice(tok, 2))
        res += norm_slices(m, "norm_pre")
        groups: dict[str, Group] = {}
        head_dims = set()
        for i, blk in enumerate(m.blocks):
            p = f"blocks.{i}"
            attn = blk.attn
            a = attn.num_heads * attn.head_dim
            res += norm_slices(m, f"{p}.norm1") + norm_slices(m, f"{p}.norm2")
            res += self._qkv_slices(f"{p}.attn", "in", a) + linear_slices(m, f"{p}.attn.proj", "out")
            res += mlp_input_slices(m, f"{p}.mlp") + linear_slices(m, f"{p}.mlp.fc2", "out")
            res += [TensorSlice(f"{p}.{g}", 0) for g in ("gamma_1", "gamma_2") if getattr(blk, g, None) is not None]
            whole = rope or not isinstance(attn.q_norm, nn.Identity) or not isinstance(attn.k_norm, nn.Identity)
            groups[f"{p}.attn"] = Group(
                f"{p}.attn", "attn", a,
                self._qkv_slices(f"{p}.attn", "out", a) + norm_slices(m, f"{p}.attn.norm")
                + linear_slices(m, f"{p}.attn.proj", "in"),
                num_heads=attn.num_heads, head_dim=attn.head_dim, module=f"{p}.attn", whole_heads=whole,
                tied_to="residual" if self._tied(attn) else None)
            groups[f"{p}.mlp"] = Group(f"{p}.mlp", "mlp", blk.mlp.fc2.in_features, mlp_slices(m, f"{p}.mlp"),
                                       module=f"{p}.mlp")
            head_dims.add(attn.head_dim)
        res += norm_slices(m, "norm")
        if getattr(m, "attn_pool", None) is not None:
            res += attn_pool_groups(m, "attn_pool", groups)
        else:
            res += norm_slices(m, "fc_norm")
            if isinstance(m.head, nn.Linear):
                res += linear_slices(m, "head", "in")
        if rope and len(head_dims) > 1:
            raise UnsupportedModelError(f"blocks have different head sizes {sorted(head_dims)} with one rotary "
                                        "embedding")
        multiple = head_dims.pop() if rope and head_dims else 1
        residual = Group("residual", "residual", m.embed_dim, res, module="", multiple_of=multiple)
        return PruningSpace(self.arch, {"residual": residual} | groups)

    def stages(self) -> list[StageRef]:
        from timm.models.eva import EvaBlockPostNorm

        m = self.model
        blocks = []
        for i, blk in enumerate(m.blocks):
            p = f"blocks.{i}"
            fc1 = "fc1_x" if hasattr(blk.mlp, "fc1_x") else "fc1"
            qkv = f"{p}.attn.qkv" if blk.attn.qkv is not None else f"{p}.attn.q_proj"
            ls = {g: f"{p}.{g}" if getattr(blk, g, None) is not None else None for g in ("gamma_1", "gamma_2")}
            # q, k, v are tapped where no fused qkv Linear is called (separate projections, or EVA's q / v biases
            # added by F.linear / after the call)
            untapped = blk.attn.qkv is not None and getattr(blk.attn, "q_bias", None) is None
            taps = None if untapped else (f"{p}.attn.q_norm", f"{p}.attn.k_norm", f"{p}.attn.norm")
            blocks.append(BlockRef(i, 0, p, f"{p}.attn", f"{p}.mlp", f"{p}.norm1", f"{p}.norm2", qkv,
                                   f"{p}.attn.proj", f"{p}.mlp.{fc1}", f"{p}.mlp.act", f"{p}.mlp.fc2",
                                   ls["gamma_1"], ls["gamma_2"], taps, post_norm=type(blk) is EvaBlockPostNorm))
        return [StageRef(0, tuple(blocks), "residual", None, m.patch_embed.proj.weight.shape[0],
                         tuple(m.patch_embed.grid_size), m.num_prefix_tokens, m.cls_token is not None)]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        m = self.model
        x, _ = m._pos_embed(m.patch_embed(images))
        return m.norm_pre(x)

    def block_kwargs(self) -> dict:
        """The rotary embedding every block gets (independent of the images at a fixed size)."""
        m = self.model
        if m.rope is None:
            return {}
        p = next(m.parameters())
        c, h, w = self.input_size()
        with torch.no_grad():
            _, rope = m._pos_embed(m.patch_embed(torch.zeros(1, c, h, w, dtype=p.dtype, device=p.device)))
        return {"rope": rope}

    def embed_modules(self) -> list[nn.Module]:
        return [self.model.patch_embed, self.model.norm_pre]

    # ---------------------------------------------------------------------------------------- mutation
    def sync_attributes(self) -> None:
        m = self.model
        sync_generic_attributes(m)
        c = m.patch_embed.proj.weight.shape[0]
        m.embed_dim = m.num_features = c
        for blk in m.blocks:
            attn = blk.attn
            q_rows = (attn.qkv.weight.shape[0] // 3) if attn.qkv is not None else attn.q_proj.weight.shape[0]
            attn.head_dim = q_rows // attn.num_heads
            attn.scale = attn.head_dim ** -0.5
            if hasattr(attn, "attn_dim"):  # AttentionRope
                attn.attn_dim = attn.kv_dim = q_rows
                attn.num_kv_heads = attn.num_heads
        for info in getattr(m, "feature_info", []):
            info["num_chs"] = c
        pool = getattr(m, "attn_pool", None)
        if pool is not None:
            sync_attn_pool(pool)
        m.head_hidden_size = pool.out_features if pool is not None else c

    # ------------------------------------------------------------------------------------- persistence
    def build_recipe(self) -> dict:
        """The one-stage recipe; with rope, ``num_heads`` is ``embed_dim / head_dim``: the rotary module is built
        from that ratio (the saved per-block head counts are restored apart)."""
        kw = super().build_recipe()
        blocks = self.model.blocks
        if self.model.rope is not None and len(blocks):
            kw["num_heads"] = kw["embed_dim"] // blocks[0].attn.head_dim
        return kw
