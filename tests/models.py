"""Small random-init timm configs for tests (32-px images), with randomised biases and norm weights.

The models come from the one catalogue, :mod:`vitprune_fast.testing` (keyed by adapter); ``CONFIGS`` are its core
configs (ViT / DeiT / Swin), which most engine tests use.
"""
from __future__ import annotations

import torch

from vitprune_fast.testing import CATALOGUE, randomize_, representatives

CONFIGS = {r.key: (r.timm_name, r.kwargs) for r in representatives(core=True)}
VIT_KEYS = tuple(r.key for r in representatives("vit", core=True))
SWIN_KEYS = tuple(r.key for r in representatives("swin", core=True))


def make_model(key: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.nn.Module:
    return CATALOGUE[key].build(dtype, seed)


def make_input(model: torch.nn.Module, batch: int = 3, seed: int = 1) -> torch.Tensor:
    p = next(model.parameters())
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=g, dtype=p.dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def random_scores(space, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(gr.size, generator=g) for n, gr in space.groups.items()}


def kept_features(model: torch.nn.Module, plan, out: torch.Tensor) -> torch.Tensor:
    """``out`` (the unpruned or masked model's output) at the features the pruned model still outputs: a model whose
    outputs are a group's channels (no classifier; ``Adapter.output_group``) loses the removed ones."""
    from vitprune_fast.arch import adapter_for

    group = adapter_for(model).output_group()
    return out[:, plan.keep[group]] if group is not None and group in plan.keep else out


__all__ = ["CONFIGS", "SWIN_KEYS", "VIT_KEYS", "kept_features", "make_input", "make_model", "random_scores",
           "randomize_", "rel_err"]
