"""Data-free and gradient baselines as methods: group magnitude, random, first-order Taylor."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import Method, MethodData


@dataclass(frozen=True)
class MagnitudeMethod(Method):
    """The L2 norm of every weight a channel owns (:func:`~vitprune_fast.score.magnitude_scores`)."""

    name = "magnitude"
    summary = "L2 norm of every weight a channel owns (data-free)"
    comparable = "mean"
    draws = False

    def scores(self, model: nn.Module, data: MethodData):
        from ..score.baselines import magnitude_scores

        return magnitude_scores(model)


@dataclass(frozen=True)
class RandomMethod(Method):
    """Uniform random scores drawn from ``data.seed`` (:func:`~vitprune_fast.score.random_scores`)."""

    name = "random"
    summary = "uniform random scores (seeded)"
    comparable = "mean"

    def scores(self, model: nn.Module, data: MethodData):
        from ..score.baselines import random_scores

        return random_scores(model, torch.Generator().manual_seed(data.seed))


@dataclass(frozen=True)
class TaylorMethod(Method):
    """First-order Taylor importance ``|w * dL/dw|`` per channel group on labelled batches
    (:func:`~vitprune_fast.score.taylor_scores`)."""

    name = "taylor"
    summary = "first-order Taylor |w * dL/dw| per channel group"
    needs = frozenset({"labels"})
    comparable = "mean"

    def scores(self, model: nn.Module, data: MethodData):
        from ..score.baselines import taylor_scores

        return taylor_scores(model, data.loader, num_batches=data.batches, progress=data.progress is True)
