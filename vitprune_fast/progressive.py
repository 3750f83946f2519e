"""Progressive UP-ViTs: reach the target widths in several steps, re-scoring the partly pruned model in between.

One-shot UP-ViTs scores every candidate once, on the unpruned model: a candidate's score is the KL of removing it
alone, so interactions between the removed channels do not count. Here the widths go from the model's to the
target's in ``steps`` equal steps; each step scores the model as pruned so far (exact engine or the screened one,
which gives the same selection), keeps the top candidates of the step's widths by the plan rules of
:func:`~vitprune_fast.make_plan`, and prunes. The final widths, head layout and FLOPs are those of the one-shot plan
with the same arguments; ``steps=1`` is the one-shot plan.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Mapping

import torch
from torch import nn

from .arch import adapter_for
from .errors import ConfigError, PlanError
from .plan import Plan, PlanSpec, Selection, as_spec, plan_from_scores, selections
from .prune import prune_
from .space import PruningSpace

ENGINES = ("exact", "screened")


def _step_ratios(model: nn.Module, final: list[Selection], step: int, steps: int) -> dict[str, float]:
    """Per-group keep ratios of ``model`` (pruned by the steps before) that give the step's item counts.

    Each of a group's selections goes linearly from its ``n`` items to its final ``k``: after ``step`` of ``steps``
    it keeps ``n - round((n - k) * step / steps)``. Items are channels per head (dims, merged heads), whole heads,
    or channels (residual, MLP); the ratio is taken over the items the model has now, so that
    :func:`~vitprune_fast.plan.selections` counts exactly that many.
    """
    space = adapter_for(model).describe()
    ratios = {}
    for sel in final:
        g, n = space.groups[sel.group], len(sel.items)
        kept = n - round((n - sel.keep) * step / steps)
        if g.kind != "attn":
            now = g.size
        elif sel.items.shape[1] > 1:  # whole heads
            now = g.num_heads
        else:  # channels of a head; merged heads: sel.heads of them (the merge happens at the first step)
            now = g.size // sel.heads
        ratios[sel.group] = kept / now
    return ratios


def upvits_progressive(
        model: nn.Module,
        images,
        spec: PlanSpec | float | Mapping[str, float] | None = None,
        *,
        steps: int = 2,
        engine: str = "screened",
        checkpoint: str | None = None,
        progress: bool = True,
        scores: Mapping[str, torch.Tensor] | None = None,
        **engine_kwargs,
) -> tuple[Plan, dict]:
    """The UP-ViTs plan reached in ``steps`` steps, each scored on the model as pruned by the steps before.

    Args:
        model: a supported model (not modified; the steps prune a copy).
        images: proxy images, as for :func:`~vitprune_fast.upvits_scores`.
        spec: the final plan (:class:`~vitprune_fast.PlanSpec`; a ratio or a dict of ratios is
            ``PlanSpec(keep=...)``), exactly as for :func:`~vitprune_fast.make_plan` (``round_to`` rounds the final
            widths; the intermediate ones are never deployed and are not rounded); a budget or a target shape is
            turned into ratios first (:func:`~vitprune_fast.targets.resolve_spec`).
        steps: number of scoring rounds (1: the one-shot plan).
        engine: ``"screened"`` (:func:`~vitprune_fast.upvits_select`, the exact selection for less) or ``"exact"``
            (:func:`~vitprune_fast.upvits_scores` on every candidate of the groups being narrowed).
        checkpoint: directory; step ``t`` keeps its resumable scoring results under ``step{t}/``.
        progress: progress bars of the scoring engine.
        scores: the exact engine's scores of ``model`` on ``images`` (:func:`~vitprune_fast.upvits_scores`), when
            already computed: the first step, which scores the unpruned model, uses them instead of scoring again
            (whatever ``engine``; the one-shot plan of these scores is the first step's plan either way).
        **engine_kwargs: passed to the engine (``batch_size``, ``autocast_dtype``, ``use_kernels``, ...).

    Returns:
        ``(plan, report)``: the Plan for the original ``model`` (original numbering; applied with ``prune_`` it gives
        the model the steps reached), and a JSON-able dict: per step the plan it made for the model of that step
        (``plan``, in that model's numbering), the sizes of the narrowed groups after it, its seconds and (screened
        engine) the engine's report; ``notes``: how a budget became ratios.
    """
    from .score.screened import upvits_select
    from .score.upvits import _chunks, upvits_scores
    from .targets import resolve_spec

    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {ENGINES}, got {engine!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ConfigError(f"steps must be an int >= 1, got {steps!r}")
    space = adapter_for(model).describe()
    spec = as_spec(spec)
    images = _chunks(images, engine_kwargs.get("batch_size", 64), model)  # checked once; every step reuses them
    if spec.allocation == "global":
        return _global(model, images, spec, steps, engine, checkpoint, progress, scores, engine_kwargs)
    spec, notes = resolve_spec(model, spec)
    final = selections(space, spec)  # validates everything before any scoring
    alive = {sel.group: torch.arange(space.groups[sel.group].size) for sel in final}  # original indices left
    current = model
    report: dict = {"steps": steps, "engine": engine, "per_step": [], "notes": notes}
    t_all = time.perf_counter()
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        step_spec = dataclasses.replace(spec, keep=_step_ratios(current, final, step, steps), round_to=1)
        ckpt = None if checkpoint is None else f"{checkpoint}/step{step}"
        rep = None
        if step == 1 and scores is not None:
            plan = plan_from_scores(space, scores, step_spec)
        elif engine == "screened":
            plan, rep = upvits_select(current, images, step_spec, checkpoint=ckpt, progress=progress, **engine_kwargs)
        else:
            deciding = [n for n, r in step_spec.keep.items() if r < 1.0]
            step_scores = upvits_scores(current, images, groups=deciding, checkpoint=ckpt, progress=progress,
                                        **engine_kwargs) if deciding else {}
            plan = plan_from_scores(adapter_for(current).describe(), step_scores, step_spec)
        for name, kept in plan.keep.items():
            alive[name] = alive[name][kept]  # the step's indices number the channels still present
        if step < steps:  # the next step scores the model pruned so far
            current = copy.deepcopy(model) if current is model else current
            prune_(current, plan)
        report["per_step"].append({"step": step, "plan": plan.to_dict(), "sizes": {n: len(a) for n, a in alive.items()},
                                   "seconds": time.perf_counter() - t0, **({"screened": rep} if rep else {})})
    report["seconds"] = time.perf_counter() - t_all
    new_heads = {sel.group: sel.heads for sel in final if sel.heads is not None}  # as make_plan records them
    return Plan.from_space(space, alive, new_heads), report


def _global(model, images, spec: PlanSpec, steps: int, engine: str, checkpoint, progress, scores,
            engine_kwargs) -> tuple[Plan, dict]:
    """Progressive global allocation: step ``t`` spends its share of the budget, ``dense - (dense - budget) * t / T``
    of the unpruned model's cost, allocating globally on the model the steps before left (re-scored by ``engine``)."""
    from .allocate import allocate
    from .cost import CostModel
    from .score.screened import upvits_select
    from .score.upvits import upvits_scores

    measure = spec.budget
    if measure == "latency":
        raise PlanError("a progressive global allocation takes a flops or params budget (a latency model describes "
                        "one model; the steps change it)")
    if measure not in ("flops", "params"):
        raise PlanError(f"a global allocation needs a flops or params budget, got {measure}")
    space = adapter_for(model).describe()
    dense = CostModel(model, measure).dense
    target = getattr(spec, measure) * dense
    alive = {n: torch.arange(g.size) for n, g in space.groups.items()}  # original indices left
    heads: dict[str, int] = {}
    current = model
    report: dict = {"steps": steps, "engine": engine, "allocation": "global", "per_step": [], "notes": []}
    t_all = time.perf_counter()
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        cm = CostModel(current, measure)
        share = (dense - (dense - target) * step / steps) / cm.dense  # of the model this step starts from
        step_spec = dataclasses.replace(spec, **{measure: min(1.0, share)}, min_keep=_step_floors(space, spec, alive))
        ckpt = None if checkpoint is None else f"{checkpoint}/step{step}"
        rep = None
        if step == 1 and scores is not None:
            plan, arep = allocate(current, scores, step_spec, cost_model=cm)
        elif engine == "screened":
            plan, rep = upvits_select(current, images, step_spec, checkpoint=ckpt, progress=progress, cost_model=cm,
                                      **engine_kwargs)
            arep = rep["allocation"]
        else:
            step_scores = upvits_scores(current, images, checkpoint=ckpt, progress=progress, **engine_kwargs)
            plan, arep = allocate(current, step_scores, step_spec, cost_model=cm)
        for name, kept in plan.keep.items():
            alive[name] = alive[name][kept]
        heads.update(plan.heads)
        if step < steps:
            current = copy.deepcopy(model) if current is model else current
            prune_(current, plan)
        report["per_step"].append({"step": step, "plan": plan.to_dict(), "budget_of_dense": share * cm.dense / dense,
                                   "allocation": arep, "seconds": time.perf_counter() - t0,
                                   **({"screened": rep} if rep else {})})
    report["seconds"] = time.perf_counter() - t_all
    keep = {n: a for n, a in alive.items() if len(a) < space.groups[n].size}
    heads = {n: h for n, h in heads.items() if n in keep or h != space.groups[n].num_heads}
    return Plan.from_space(space, keep, heads), report


def _step_floors(space: PruningSpace, spec: PlanSpec, alive: dict[str, torch.Tensor]) -> dict[str, float]:
    """``spec.min_keep`` of the unpruned model's groups, as fractions of what is left of them."""
    from .allocate import _floor

    return {n: _floor(g, spec) / len(alive[n]) for n, g in space.groups.items()}


def progressive_summary(report: dict) -> str:
    """One line for a person: steps, engine, seconds per step."""
    per = ", ".join(f"{s['seconds']:.1f}" for s in report["per_step"])
    return (f"progressive UP-ViTs: {report['steps']} step{'s' if report['steps'] > 1 else ''} scored by the "
            f"{report['engine']} engine in {report['seconds']:.1f} s (per step: {per} s)")
