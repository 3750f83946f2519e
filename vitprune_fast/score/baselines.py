"""Data-free baseline scores: group magnitude and random."""
from __future__ import annotations

import torch
from torch import nn

from ..arch import describe
from ..prune import _tensor_of


def magnitude_scores(model: nn.Module, p: int = 2) -> dict[str, torch.Tensor]:
    """Group magnitude: the L``p`` norm of every weight a channel owns, over all tensors of its group.

    Per-head tensors (Swin relative-position bias) are left out: they belong to whole heads.
    """
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p}")
    space = describe(model)
    out = {}
    with torch.no_grad():
        for name, g in space.groups.items():
            acc = torch.zeros(g.size, dtype=torch.float64)
            for sl in g.slices:
                if sl.per_head:
                    continue
                t = _tensor_of(model, sl.name).detach().double()
                red = t.abs() if p == 1 else t.square()
                dims = [d for d in range(t.dim()) if d != sl.dim]
                per_index = red.sum(dims) if dims else red  # [t.shape[dim]]
                acc += per_index.cpu().view(sl.repeats, -1)[:, : g.size].sum(0) if sl.repeats > 1 else per_index.cpu()
            out[name] = acc if p == 1 else acc.sqrt()
    return out


def random_scores(model: nn.Module, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Uniform random scores (the random-pruning baseline)."""
    return {n: torch.rand(g.size, generator=generator, dtype=torch.float64) for n, g in describe(model).groups.items()}
