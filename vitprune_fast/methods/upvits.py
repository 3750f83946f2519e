"""UP-ViTs as a method: exact KL scores, the screened selection, and progressive re-scoring, as options."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..allocate import allocation_summary
from ..errors import ConfigError
from ..plan import PlanSpec, as_spec
from ..score.objective import OBJECTIVES
from .base import Method, MethodData, MethodResult, cost_models, proxy_images

ENGINES = ("exact", "screened")


@dataclass(frozen=True)
class UpvitsMethod(Method):
    """UP-ViTs (Yu & Wu): every channel's score is the KL of the model's output without it, on proxy images.

    Attributes:
        engine: ``"exact"`` (:func:`~vitprune_fast.upvits_scores`, the fast engine on every candidate) or
            ``"screened"`` (:func:`~vitprune_fast.upvits_select`: the same selection, scoring exactly only the
            candidates near each cut).
        steps: reach the widths in that many steps, re-scoring the partly pruned model between them
            (:func:`~vitprune_fast.upvits_progressive`, each step by ``engine``; 1 gives the one-shot plan with the
            progressive report); None: one shot.
        objective: what a score measures (:mod:`vitprune_fast.score.objective`): ``"kl"`` of the logits,
            ``"features"`` (output features' squared error over their variance) or None: KL for a classifier, the
            features objective for a model without one.
    """

    engine: str = "exact"
    steps: int | None = None
    objective: str | None = None

    name = "upvits"
    summary = "UP-ViTs KL of the model without each channel (exact, batched engine)"
    needs = frozenset({"images"})
    comparable = "global"

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ConfigError(f"upvits: engine must be one of {ENGINES}, got {self.engine!r}")
        if self.steps is not None and (not isinstance(self.steps, int) or isinstance(self.steps, bool)
                                       or self.steps < 1):
            raise ConfigError(f"upvits: steps must be None or an int >= 1, got {self.steps!r}")
        if self.objective is not None and self.objective not in OBJECTIVES:
            raise ConfigError(f"upvits: objective must be None or one of {OBJECTIVES}, got {self.objective!r}")

    def score_key(self) -> str:
        # the one-shot exact scores, whatever the engine and steps (of one objective)
        return self.name if self.objective is None else f"{self.name}.{self.objective}"

    def scores(self, model: nn.Module, data: MethodData):
        from ..score.upvits import upvits_scores

        images = proxy_images(model, data)
        if data.log is not None:
            from ..arch import describe

            n = sum(g.size for g in describe(model).groups.values())
            data.log(f"UP-ViTs exact engine: {n} candidates on {len(images)} proxy images, every one scored exactly; "
                     "the screened engine (engine='screened', CLI --screened) gives the same selection scoring "
                     "exactly only those near each cut")
        return upvits_scores(model, images, batch_size=data.chunk, progress=data.progress, objective=self.objective)

    def plan(self, model: nn.Module, data: MethodData, spec: PlanSpec) -> MethodResult:
        spec = as_spec(spec)
        if self.steps is None and self.engine == "exact":
            return super().plan(model, data, spec)
        costs = cost_models(model, data, spec) if spec.allocation == "global" else {}
        spec, notes = (spec, []) if spec.allocation == "global" else self.resolve(model, data, spec)
        if self.steps is not None:
            from ..progressive import progressive_summary, upvits_progressive

            self.check_data(data)
            first = data.cache.get(("scores", self.score_key()))  # the first step scores the unpruned model
            plan, rep = upvits_progressive(model, proxy_images(model, data), spec, steps=self.steps,
                                           engine=self.engine, batch_size=data.chunk, progress=data.progress,
                                           scores=first, objective=self.objective)
            notes += [allocation_summary(s["allocation"]) for s in rep["per_step"] if "allocation" in s][-1:]
            rep["notes"] = notes
            return MethodResult(plan, report={"progressive": rep}, notes=[*notes, progressive_summary(rep)])
        from ..score.screened import screened_summary, upvits_select

        self.check_data(data)
        plan, rep = upvits_select(model, proxy_images(model, data), spec, batch_size=data.chunk,
                                  progress=data.progress, objective=self.objective, **costs)
        rep["notes"] = notes = notes + rep["notes"]
        return MethodResult(plan, report={"screened": rep}, notes=[*notes, screened_summary(rep)])
