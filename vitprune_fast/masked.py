"""Masked execution: the function a Plan computes, without slicing anything.

``masked_copy(model, plan)`` returns a copy of ``model`` whose removed channels are zeroed, and whose norms over a
pruned width (LayerNorm / RMSNorm over the residual, an attention's scale-norm, an MLP's sub-norm) normalise over the
kept channels only. It is the reference that physical removal must reproduce (README, 'What is exact, and the
choices we made'), and the building block of the literal UP-ViTs scorer.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .arch import adapter_for
from .norms import MaskedNorm, is_norm
from .plan import Plan
from .prune import head_columns, resolve_plan
from .space import tensor_of


def _is_head_subset(keep: torch.Tensor, head_dim: int, heads: int) -> bool:
    """True when every new head is made of channels of a single original head (no merging)."""
    return all(torch.unique(chunk // head_dim).numel() == 1 for chunk in keep.view(heads, -1))


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def masked_copy(model: nn.Module, plan: Plan) -> nn.Module:
    """A deep copy of ``model`` that computes what the pruned model computes, at the original sizes.

    attn/mlp groups: removed channels are zeroed (q, k, v rows and proj columns; fc1 rows and fc2
    columns). residual groups: removed channels are zeroed in every tensor. Every norm a group's slices reach
    (residual LayerNorms / RMSNorms, an attention's scale-norm, an MLP's sub-norm) becomes a :class:`MaskedNorm`.
    A change of head count (UP-ViTs head merge) re-groups the heads of the copy and keeps the original attention
    scale (the adapter's :meth:`~vitprune_fast.arch.Adapter.regroup_heads_masked`), which is what the merged pruned
    model computes.
    """
    changes = resolve_plan(adapter_for(model).describe(), plan, physical=False)
    out = copy.deepcopy(model)
    adapter = adapter_for(out)
    with torch.no_grad():
        for ch in changes:
            g = ch.group
            removed = torch.ones(g.size, dtype=torch.bool)
            removed[ch.keep] = False
            removed = removed.nonzero().flatten()
            merging = g.kind == "attn" and not _is_head_subset(ch.keep, g.head_dim, ch.heads)
            norms = {}
            for sl in g.slices:
                t = tensor_of(out, sl.name)
                if sl.per_head:
                    if merging:  # merged heads: the same mean-of-columns rule as prune_
                        cols = head_columns(t, ch.keep, g.head_dim, ch.heads, sl.dim)
                        if isinstance(cols, list):
                            cols = t.index_select(sl.dim, torch.tensor(cols, device=t.device))
                        t.set_(cols.contiguous())
                    continue
                if removed.numel():
                    t.index_fill_(sl.dim, sl.indices(removed).to(t.device), 0.0)  # index on t's device (CUDA)
                mod_path, _, pname = sl.name.rpartition(".")
                if is_norm(out.get_submodule(mod_path)):
                    mask = torch.zeros(t.shape[0], dtype=torch.bool)
                    mask[sl.indices(ch.keep)] = True
                    norms[mod_path] = mask
            for path, mask in norms.items():
                ln = out.get_submodule(path)
                _set_submodule(out, path, MaskedNorm(ln, mask.to(ln.weight.device)))
            if merging:
                adapter.regroup_heads_masked(g, ch.heads)
    return out


def forward_masked_logits(model: nn.Module, plan: Plan, x: torch.Tensor) -> torch.Tensor:
    """Logits of the masked model (convenience for tests and the reference scorer)."""
    m = masked_copy(model, plan).eval()
    with torch.no_grad():
        return m(x)


__all__ = ["MaskedNorm", "masked_copy", "forward_masked_logits"]
