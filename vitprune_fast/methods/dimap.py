"""DIMAP as a method: structured module-wise LAMP scores, with its own thresholds for a FLOPs budget."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import PlanError
from ..plan import PlanSpec, as_spec
from .base import Method, MethodData, MethodResult


@dataclass(frozen=True)
class DimapMethod(Method):
    """DIMAP (He & Zhou), our structured adaptation: data-free LAMP scores of attention dims and MLP units.

    A FLOPs budget is met by DIMAP's own module-wise thresholds (:func:`~vitprune_fast.dimap_structured_plan`: one
    threshold per module across the network, so every block gets its own width; the residual stays whole); keep
    ratios, a parameter budget or a target shape plan from its scores by the spec's allocation rule.
    """

    name = "dimap"
    summary = "DIMAP module-wise LAMP scores, structured (data-free; attention and MLP only)"
    kinds = ("attn", "mlp")
    draws = False

    def scores(self, model: nn.Module, data: MethodData):
        from ..score.dimap import dimap_scores

        return {k: v.detach().double().cpu() for k, v in dimap_scores(model, structured=True).items()}

    def plan(self, model: nn.Module, data: MethodData, spec: PlanSpec) -> MethodResult:
        spec = as_spec(spec)
        if spec.flops is None or spec.allocation != "uniform":
            return super().plan(model, data, spec)
        from ..score.dimap import dimap_structured_plan

        if spec.heads is not None or spec.round_to != 1:
            raise PlanError("DIMAP's FLOPs plan sets every block's width by its module thresholds: heads and "
                            "round_to do not apply to it")
        return MethodResult(dimap_structured_plan(model, flops=spec.flops, attn_mode=spec.attn_mode),
                            notes=[f"dimap: module-wise thresholds at {100 * spec.flops:.0f} % FLOPs"])
