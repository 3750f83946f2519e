"""FLOPs, counted by ``torch.utils.flop_counter`` on a meta-device copy of the model (no compute, no weights copied).

One module for every FLOPs number of the library: :func:`count_flops` (a forward's total), :func:`flop_profile`
(per-Linear tokens and per-attention matmul FLOPs, for DIMAP's per-layer accounting) and :func:`plan_flops`
(the total after a Plan, for FLOPs targets). FLOPs follow FlopCounterMode's convention: 2 per multiply-add.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .arch import adapter_for


def meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers live on the meta device (no storage)."""
    memo: dict[int, torch.Tensor] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _resolve_img_size(model: nn.Module, img_size) -> tuple[int, int]:
    if img_size is None:
        return adapter_for(model).input_size()[1:]
    if isinstance(img_size, int):
        return img_size, img_size
    return int(img_size[0]), int(img_size[1])


def _count(meta: nn.Module, x: torch.Tensor):
    """Run ``meta`` (a meta copy, eval mode) on ``x`` under FlopCounterMode; returns the counter."""
    from torch.utils.flop_counter import FlopCounterMode

    for m in meta.modules():  # the counter has no formula for CPU fused SDPA; the explicit path does the same matmuls
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    for p in meta.parameters():  # a view of a parameter (an attention pool's expanded latent) trips its module tracker
        p.requires_grad_(False)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        meta(x)
    return counter


def count_flops(model: nn.Module, batch: int = 1, x: torch.Tensor | None = None,
                img_size: int | tuple[int, int] | None = None) -> int:
    """FLOPs of one forward pass (multiply-add = 2 FLOPs) of a supported model.

    Args:
        model: the model (not run: a meta-device copy is, in eval mode).
        batch: batch size when ``x`` is not given.
        x: optional input; only its shape is used.
        img_size: input size when ``x`` is not given (default the model's).

    Returns:
        Total FLOPs per forward of the batch.
    """
    return _meta_flops(meta_copy(model), batch, x, img_size)


def _meta_flops(meta: nn.Module, batch: int = 1, x: torch.Tensor | None = None,
                img_size: int | tuple[int, int] | None = None) -> int:
    """:func:`count_flops` of a model already on the meta device (it is put in eval mode)."""
    if x is not None:
        shape = tuple(x.shape)
    else:
        shape = (batch, adapter_for(meta).input_size()[0], *_resolve_img_size(meta, img_size))
    return int(_count(meta.eval(), torch.empty(shape, device="meta", dtype=_float_dtype(meta))).get_total_flops())


def plan_flops(model: nn.Module, plan, img_size: int | tuple[int, int] | None = None) -> int:
    """FLOPs of ``model`` after ``prune_(model, plan)``, counted on a pruned meta copy (``model`` is untouched)."""
    from .prune import prune_

    return _meta_flops(prune_(meta_copy(model), plan), img_size=img_size)


@dataclass
class FlopProfile:
    """Dense FLOPs of one forward (batch 1), measured once with ``torch.utils.flop_counter.FlopCounterMode``.

    Measured on a meta-device copy of the model, so no real compute and no second copy of the weights.

    Attributes:
        total: FLOPs of the whole forward.
        tokens: ``nn.Linear`` module path -> rows (tokens) it processes, recorded by a forward hook.
        linear: ``nn.Linear`` module path -> its FLOPs (``2 * tokens * in * out``).
        attn_matmul: attention module path -> FLOPs of its token-mixing matmuls (q k^T and attn v), i.e. the
            module's FLOPs minus its Linear layers (qkv, proj). Linear in the attention width.
        img_size: the input ``(H, W)`` used.
    """

    total: int
    tokens: dict[str, int]
    linear: dict[str, int]
    attn_matmul: dict[str, int]
    img_size: tuple[int, int]


def flop_profile(model: nn.Module, img_size: int | tuple[int, int] | None = None) -> FlopProfile:
    """Measure dense FLOPs, per-Linear token counts and per-attention matmul FLOPs (see :class:`FlopProfile`).

    Args:
        model: a supported model (not modified; a meta-device copy runs in eval mode).
        img_size: input size; default the model's.
    """
    adapter = adapter_for(model)
    size = _resolve_img_size(model, img_size)
    meta = meta_copy(model).eval()
    tokens: dict[str, int] = {}
    handles = []
    for path, m in meta.named_modules():
        if isinstance(m, nn.Linear):
            def _hook(mod, inp, out, path=path):
                tokens[path] = tokens.get(path, 0) + inp[0].numel() // mod.in_features
            handles.append(m.register_forward_hook(_hook))
    try:
        counter = _count(meta, torch.empty(1, adapter.input_size()[0], *size, device="meta",
                                           dtype=_float_dtype(model)))
    finally:
        for h in handles:
            h.remove()
    per_module = {_strip_root(k): sum(v.values()) for k, v in counter.get_flop_counts().items()}
    linear = {p: per_module.get(p, 0) for p in tokens}
    attn_mm = {b.attn: per_module.get(b.attn, 0) - sum(f for p, f in linear.items() if p.startswith(f"{b.attn}."))
               for blk in adapter.blocks() for b in blk.branches()}
    return FlopProfile(counter.get_total_flops(), tokens, linear, attn_mm, size)


def _strip_root(fqn: str) -> str:
    """FlopCounterMode names modules ``<RootClass>.<path>``; return ``<path>``."""
    return fqn.split(".", 1)[1] if "." in fqn else ""


__all__ = ["FlopProfile", "count_flops", "flop_profile", "meta_copy", "plan_flops"]
