"""One table of scoring methods, shared by the CLI, the demo and the benchmarks.

A :class:`Scorer` says what a method needs (images or not), which group kinds it scores, how to call it, and --
for a method with its own way of meeting a FLOPs target (DIMAP's module-wise thresholds) -- how to plan for one.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..plan import Plan
from ..space import KINDS


@dataclass(frozen=True)
class ScoringData:
    """What data-driven scorers read.

    Attributes:
        loader: ``(images, labels)`` batches (Taylor's data; UP-ViTs' proxy images when ``images`` is None).
        images: UP-ViTs proxy images ``[N, C, H, W]``; default the first ``proxy`` images of ``loader``.
        proxy: UP-ViTs proxy images taken from ``loader``.
        chunk: UP-ViTs images per chunk (bounds the cached block inputs; the engine sums the chunks' scores).
        batches: Taylor batches.
        seed: random-scores seed.
        progress: progress bars.
    """

    loader: Iterable | None = None
    images: torch.Tensor | None = None
    proxy: int = 64
    chunk: int = 64
    batches: int = 4
    seed: int = 0
    progress: bool = True


@dataclass(frozen=True)
class Scorer:
    """One scoring method.

    Attributes:
        name: the method's name (``--method`` in the CLI).
        summary: one line for help texts.
        data: what it reads: ``None`` (weights only), ``"images"`` (UP-ViTs: proxy images, from ``images`` or the
            loader) or ``"labels"`` (Taylor: labelled batches from the loader).
        kinds: the group kinds it scores (others stay whole when planning from its scores).
        score: ``score(model, data) -> {group name: [size] scores}``, higher = more important.
        plan_for_flops: ``plan_for_flops(model, fraction) -> Plan`` when the method meets a FLOPs target its own
            way instead of one keep ratio for every group; else None.
    """

    name: str
    summary: str
    data: str | None
    kinds: tuple[str, ...]
    score: Callable[[nn.Module, ScoringData], dict[str, torch.Tensor]]
    plan_for_flops: Callable[[nn.Module, float], Plan] | None = None

    @property
    def needs_data(self) -> bool:
        return self.data is not None


def proxy_images(model: nn.Module, data: ScoringData) -> torch.Tensor:
    """UP-ViTs proxy images: ``data.images``, else the loader's first ``data.proxy``; on the model's device/dtype."""
    from ..data import take_images

    if data.images is None and data.loader is None:
        raise ConfigError("UP-ViTs needs proxy images (a loader of training images)")
    images = data.images if data.images is not None else take_images(data.loader, data.proxy)[0]
    p = next(model.parameters())
    return images.to(p.device, p.dtype)


def _upvits(model: nn.Module, data: ScoringData) -> dict[str, torch.Tensor]:
    from .upvits import upvits_scores

    return upvits_scores(model, proxy_images(model, data), batch_size=data.chunk, progress=data.progress)


def _dimap(model: nn.Module, data: ScoringData) -> dict[str, torch.Tensor]:
    from .dimap import dimap_scores

    return {k: v.detach().double().cpu() for k, v in dimap_scores(model, structured=True).items()}


def _dimap_plan(model: nn.Module, fraction: float) -> Plan:
    from .dimap import dimap_structured_plan

    return dimap_structured_plan(model, flops=fraction)


def _magnitude(model: nn.Module, data: ScoringData) -> dict[str, torch.Tensor]:
    from .baselines import magnitude_scores

    return magnitude_scores(model)


def _random(model: nn.Module, data: ScoringData) -> dict[str, torch.Tensor]:
    from .baselines import random_scores

    return random_scores(model, torch.Generator().manual_seed(data.seed))


def _taylor(model: nn.Module, data: ScoringData) -> dict[str, torch.Tensor]:
    from .baselines import taylor_scores

    return taylor_scores(model, data.loader, num_batches=data.batches, progress=data.progress)


SCORERS: dict[str, Scorer] = {s.name: s for s in (
    Scorer("upvits", "UP-ViTs KL of the model without each channel (exact, batched engine)", "images", KINDS,
           _upvits),
    Scorer("dimap", "DIMAP module-wise LAMP scores, structured (data-free; attention and MLP only)", None,
           ("attn", "mlp"), _dimap, _dimap_plan),
    Scorer("magnitude", "L2 norm of every weight a channel owns (data-free)", None, KINDS, _magnitude),
    Scorer("random", "uniform random scores (seeded)", None, KINDS, _random),
    Scorer("taylor", "first-order Taylor |w * dL/dw| per channel group", "labels", KINDS, _taylor),
)}
METHODS = tuple(SCORERS)
DATA_METHODS = tuple(n for n, s in SCORERS.items() if s.needs_data)


def get_scorer(method: str) -> Scorer:
    """The scorer called ``method``.

    Raises:
        ConfigError: an unknown method.
    """
    if method not in SCORERS:
        raise ConfigError(f"unknown method {method!r}; choose from {METHODS}")
    return SCORERS[method]


def compute_scores(method: str, model: nn.Module, train_loader: Iterable | None = None, proxy: int = 64,
                   batches: int = 4, seed: int = 0, progress: bool = True, images: torch.Tensor | None = None,
                   chunk: int = 64) -> dict[str, torch.Tensor]:
    """Scores of ``method`` for every group it defines (higher = more important).

    Args:
        method: a name from :data:`METHODS`.
        model: the model (not modified).
        train_loader: ``(images, labels)`` batches; needed by data-driven methods (``upvits`` can take
            ``images`` instead).
        proxy: UP-ViTs proxy images taken from ``train_loader``.
        batches: Taylor batches.
        seed: random-scores seed.
        progress: progress bars.
        images: UP-ViTs proxy images (instead of the loader's first ``proxy``).
        chunk: UP-ViTs images per chunk.

    Raises:
        ConfigError: an unknown method, or a data-driven one without data.
    """
    scorer = get_scorer(method)
    if train_loader is None and (scorer.data == "labels" or scorer.data == "images" and images is None):
        raise ConfigError(f"method {method!r} needs data (a loader of training images)")
    return scorer.score(model, ScoringData(train_loader, images, proxy, chunk, batches, seed, progress))


__all__ = ["DATA_METHODS", "METHODS", "SCORERS", "Scorer", "ScoringData", "compute_scores", "get_scorer",
           "proxy_images"]
