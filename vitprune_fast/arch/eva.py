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
from ..space import Group, TensorSlice
from .base import Adapter, BlockRef, StageRef
from .common import (
    QRows,
    SingleStageDefaults,
    attn_group,
    check_block_norms,
    fused_q_rows,
    fused_qkv_rows,
    linear_q_rows,
    norm_slices,
    separate_qkv_rows,
)

_PROJS = ("q_proj", "k_proj", "v_proj")  # an attention without a fused qkv Linear


class EvaAdapter(SingleStageDefaults, Adapter):
    """timm ``Eva``: one stage, one residual group, ``EvaBlock``s (or post-norm ``EvaBlockPostNorm``s) with a rotary
    embedding passed in."""

    arch = "eva"
    model_class = "timm.models.eva.Eva"
    tokens = ("cls_token", "reg_token", "pos_embed")

    # ------------------------------------------------------------------------------------------- checks
    def _check(self) -> None:
        if getattr(self.model, "rope_mixed", False):
            raise UnsupportedModelError("rope_type='mixed': learned rotary frequencies per block and per head are "
                                        "not supported (removing a head would have to slice them)")
        super()._check()

    def _check_block(self, where: str, blk: nn.Module) -> None:
        from timm.layers import AttentionRope
        from timm.models.eva import EvaAttention, EvaBlock, EvaBlockPostNorm

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
        check_block_norms(blk, where)

    @staticmethod
    def _tied(attn: nn.Module) -> bool:
        from timm.models.eva import EvaAttention

        return type(attn) is EvaAttention  # reshapes its output to the input width

    # ------------------------------------------------------------------------------------------ structure
    def _attn_inputs(self, p: str, blk: nn.Module) -> tuple[str, ...]:
        return ("attn.qkv",) if blk.attn.qkv is not None else tuple(f"attn.{n}" for n in _PROJS)

    def _attn_group(self, p: str, blk: nn.Module) -> Group:
        """Rows of the fused qkv (with EVA's separate q / k / v biases) or of q_proj / k_proj / v_proj, then the
        scale-norm; tied when the class reshapes to the input width, whole heads with rope or qk-norm."""
        m, at, attn = self.model, f"{p}.attn", blk.attn
        rows = fused_qkv_rows(m, at) if attn.qkv is not None else separate_qkv_rows(m, at, _PROJS)
        qk_norm = not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity))
        whole = m.rope is not None or qk_norm
        return attn_group(m, at, attn.num_heads * attn.head_dim, rows + norm_slices(m, f"{at}.norm"),
                          head_dim=attn.head_dim, whole_heads=whole, tied_to="residual" if self._tied(attn) else None)

    def _residual_group(self, res: list[TensorSlice]) -> Group:
        """With rope, a multiple of the (one) head size: the rotary module is rebuilt from it."""
        m = self.model
        head_dims = {blk.attn.head_dim for blk in m.blocks}
        if m.rope is not None and len(head_dims) > 1:
            raise UnsupportedModelError(f"blocks have different head sizes {sorted(head_dims)} with one rotary "
                                        "embedding")
        multiple = head_dims.pop() if m.rope is not None and head_dims else 1
        return Group("residual", "residual", m.embed_dim, res, module="", multiple_of=multiple)

    def q_rows(self, group: Group) -> QRows:
        """An attention pool's ``q``; a block's ``q_proj``, or its fused qkv's first third of rows and ``q_bias``."""
        m = self.model
        if group.module == "attn_pool":
            return linear_q_rows(m, "attn_pool.q")
        if m.get_submodule(group.module).qkv is None:
            return linear_q_rows(m, f"{group.module}.q_proj")
        return fused_q_rows(m, group.module)

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
    def _sync_attn(self, attn: nn.Module) -> None:
        """Head size and scale; an ``AttentionRope``'s widths and kv head count too."""
        super()._sync_attn(attn)
        if hasattr(attn, "attn_dim"):  # AttentionRope
            attn.attn_dim = attn.kv_dim = attn.proj.in_features
            attn.num_kv_heads = attn.num_heads

    # ------------------------------------------------------------------------------------- persistence
    def build_recipe(self) -> dict:
        """The one-stage recipe; with rope, ``num_heads`` is ``embed_dim / head_dim``: the rotary module is built
        from that ratio (the saved per-block head counts are restored apart)."""
        kw = super().build_recipe()
        blocks = self.model.blocks
        if self.model.rope is not None and len(blocks):
            kw["num_heads"] = kw["embed_dim"] // blocks[0].attn.head_dim
        return kw
