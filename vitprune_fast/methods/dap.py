"""DAP as a method: it plans while it fine-tunes, so its result carries the trained, pruned model."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import PlanError
from ..plan import PlanSpec, as_spec
from .base import Method, MethodData, MethodResult


@dataclass(frozen=True)
class DapMethod(Method):
    """DAP / P3B (Glandorf & Rosenhahn): per-block keep ratios from probes while fine-tuning
    (:func:`~vitprune_fast.dap.finetune_dap` on a copy of the model, ``data.steps`` steps at ``data.lr``, distilling
    from ``data.teacher``; its probes are drawn from ``data.seed``).

    The spec must give a parameter budget (``params``: the fraction of the parameters to keep) and may set
    ``attn_mode``; the widths come from DAP's own budget rule.
    """

    name = "dap"
    summary = "DAP: depth-aware keep ratios learned while fine-tuning (a --params budget; trains --steps)"
    needs = frozenset({"labels", "training"})
    has_scores = False

    def plan(self, model: nn.Module, data: MethodData, spec: PlanSpec) -> MethodResult:
        from ..dap import finetune_dap

        spec = as_spec(spec)
        if spec.params is None or spec.heads is not None or spec.round_to != 1:
            raise PlanError("DAP plans against a parameter budget: give params (the fraction of the parameters to "
                            "keep) and no heads / round_to")
        self.check_data(data)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(data.seed)
            student, plan, history = finetune_dap(
                copy.deepcopy(model), data.loader, 1 - spec.params, steps=data.steps, lr=data.lr,
                teacher=data.teacher, dap_kwargs={"attn_mode": spec.attn_mode},
                progress=data.progress is True)
        note = (f"dap: {data.steps} steps, params {history['params_before']:,} -> {history['params_after']:,} "
                f"(target {history['target_params']:,})")
        report = {k: history[k] for k in ("params_before", "params_after", "target_params", "keep_ratios")}
        return MethodResult(plan, report={"dap": report}, notes=[note], model=student)
