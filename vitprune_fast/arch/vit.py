"""Adapter for timm ``VisionTransformer`` (ViT, DeiT, DeiT-distilled, LayerScale, with/without class token)."""
from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from ..space import Group, PruningSpace, TensorSlice
from .common import is_layernorm, linear_slices, norm_slices, sync_generic_attributes

ARCH = "vit"


def matches(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def _check_block(model: nn.Module, i: int) -> None:
    from timm.layers import Mlp
    from timm.models.vision_transformer import Block

    blk = model.blocks[i]
    where = f"blocks.{i}"
    if type(blk) is not Block:
        raise UnsupportedModelError(f"{where}: block type {type(blk).__name__} is not supported (only timm Block)")
    attn, mlp = blk.attn, blk.mlp
    if not hasattr(attn, "qkv") or not isinstance(attn.qkv, nn.Linear) or not hasattr(attn, "num_heads"):
        raise UnsupportedModelError(f"{where}.attn: {type(attn).__name__} has no fused qkv Linear")
    if not hasattr(attn, "attn_dim"):
        raise UnsupportedModelError(f"{where}.attn: this timm version's Attention has no attn_dim; need timm>=1.0.15")
    for part in ("q_norm", "k_norm", "norm"):
        if not isinstance(getattr(attn, part, nn.Identity()), nn.Identity):
            raise UnsupportedModelError(f"{where}.attn.{part}: qk/scale norms are not supported")
    if getattr(attn, "gate", None) is not None:
        raise UnsupportedModelError(f"{where}.attn.gate: gated attention is not supported")
    if type(mlp) is not Mlp or not isinstance(mlp.fc1, nn.Linear) or not isinstance(mlp.norm, nn.Identity):
        raise UnsupportedModelError(f"{where}.mlp: {type(mlp).__name__} is not supported (only timm Mlp, no norm)")
    for ls in ("ls1", "ls2"):
        m = getattr(blk, ls)
        if not isinstance(m, nn.Identity) and not hasattr(m, "gamma"):
            raise UnsupportedModelError(f"{where}.{ls}: {type(m).__name__} is not supported")
    for nm in ("norm1", "norm2"):
        if not is_layernorm(getattr(blk, nm)):
            raise UnsupportedModelError(f"{where}.{nm}: only LayerNorm is supported")


def describe(model: nn.Module) -> PruningSpace:
    """Describe a timm VisionTransformer as residual / attn / mlp groups."""
    if getattr(model, "attn_pool", None) is not None:
        raise UnsupportedModelError("attention pooling head (attn_pool) is not supported")
    if not isinstance(model.patch_embed.proj, nn.Conv2d):
        raise UnsupportedModelError("patch_embed.proj must be a Conv2d")
    if not isinstance(model.head, (nn.Linear, nn.Identity)):
        raise UnsupportedModelError(f"head: {type(model.head).__name__} is not supported")
    groups: dict[str, Group] = {}
    res: list[TensorSlice] = []
    res += [TensorSlice("patch_embed.proj.weight", 0)]
    if model.patch_embed.proj.bias is not None:
        res.append(TensorSlice("patch_embed.proj.bias", 0))
    res += norm_slices(model, "patch_embed.norm")
    for tok in ("cls_token", "reg_token", "dist_token", "pos_embed"):
        if getattr(model, tok, None) is not None:
            res.append(TensorSlice(tok, 2))
    res += norm_slices(model, "norm_pre")
    for i, blk in enumerate(model.blocks):
        _check_block(model, i)
        p = f"blocks.{i}"
        res += norm_slices(model, f"{p}.norm1") + norm_slices(model, f"{p}.norm2")
        res += linear_slices(model, f"{p}.attn.qkv", "in") + linear_slices(model, f"{p}.attn.proj", "out")
        res += linear_slices(model, f"{p}.mlp.fc1", "in") + linear_slices(model, f"{p}.mlp.fc2", "out")
        for ls in ("ls1", "ls2"):
            if hasattr(getattr(blk, ls), "gamma"):
                res.append(TensorSlice(f"{p}.{ls}.gamma", 0))
        attn = blk.attn
        a = attn.attn_dim
        groups[f"{p}.attn"] = Group(
            f"{p}.attn", "attn", a,
            linear_slices(model, f"{p}.attn.qkv", "out", repeats=3, stride=a)
            + linear_slices(model, f"{p}.attn.proj", "in"),
            num_heads=attn.num_heads, head_dim=attn.head_dim, module=f"{p}.attn",
        )
        h = blk.mlp.fc1.out_features
        groups[f"{p}.mlp"] = Group(
            f"{p}.mlp", "mlp", h,
            linear_slices(model, f"{p}.mlp.fc1", "out") + linear_slices(model, f"{p}.mlp.fc2", "in"),
            module=f"{p}.mlp",
        )
    res += norm_slices(model, "norm") + norm_slices(model, "fc_norm")
    for head in ("head", "head_dist"):
        if isinstance(getattr(model, head, None), nn.Linear):
            res += linear_slices(model, head, "in")
    groups = {"residual": Group("residual", "residual", model.embed_dim, res, module="")} | groups
    return PruningSpace(ARCH, groups)


def sync_attributes(model: nn.Module) -> None:
    """Derive every size attribute from the tensors (after slicing or when rebuilding from a checkpoint)."""
    sync_generic_attributes(model)
    c = model.patch_embed.proj.weight.shape[0]
    model.embed_dim = model.num_features = model.head_hidden_size = c
    for blk in model.blocks:
        attn = blk.attn
        attn.attn_dim = attn.qkv.weight.shape[0] // 3
        attn.head_dim = attn.attn_dim // attn.num_heads
        attn.scale = attn.head_dim ** -0.5


def build_recipe(model: nn.Module) -> dict:
    """Structural create_model kwargs that rebuild this model's module tree (sizes are restored separately)."""
    pe = model.patch_embed
    c = model.embed_dim
    heads = model.blocks[0].attn.num_heads if len(model.blocks) else 1
    kw = dict(
        img_size=list(pe.img_size) if pe.img_size is not None else None,
        patch_size=list(pe.patch_size),
        in_chans=pe.proj.in_channels,
        num_classes=model.num_classes,
        global_pool=model.global_pool,
        depth=len(model.blocks),
        embed_dim=c,
        num_heads=heads if c % heads == 0 else 1,
        class_token=model.cls_token is not None,
        reg_tokens=model.reg_token.shape[1] if getattr(model, "reg_token", None) is not None else 0,
        no_embed_class=model.no_embed_class,
        pos_embed="learn" if model.pos_embed is not None else "none",
        qkv_bias=model.blocks[0].attn.qkv.bias is not None if len(model.blocks) else True,
        init_values=1e-5 if len(model.blocks) and hasattr(model.blocks[0].ls1, "gamma") else None,
        pre_norm=not isinstance(model.norm_pre, nn.Identity),
        fc_norm=not isinstance(model.fc_norm, nn.Identity),
        dynamic_img_size=getattr(model, "dynamic_img_size", False),
    )
    if isinstance(model.fc_norm, nn.Identity) and isinstance(model.norm, nn.Identity):
        kw["final_norm"] = False  # only passed when needed: older timm has no such kwarg
        kw.pop("fc_norm")
    return kw


def extra_state(model: nn.Module) -> dict:
    return {}


def apply_extra_state(model: nn.Module, state: dict) -> None:
    pass
