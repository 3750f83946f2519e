"""Global allocation of widths: every group's kept count under one FLOPs, parameter or latency budget.

The uniform rule (:func:`vitprune_fast.targets.resolve_spec`) gives every block the same keep ratio. Scores that are
in one unit across groups (UP-ViTs: the KL of the model's output) say more: :func:`allocate` chooses every group's
kept count -- per block and per component -- to minimise the summed scores of what is removed, subject to the
budget and to the rules ``make_plan`` enforces (equal dims per head / whole heads / the head merge, tied attentions
following their residual, ``multiple_of``, ``round_to``, at least one unit per group, and at least ``min_keep`` of it).

Method, and the bound it comes with:

1. **Outer search over the residual widths** (they multiply every block's width, so the cost is not separable in
   them): every allowed width of a one-residual model (ViT); for several stages, every combination when there are at
   most ``max_combos``, else a coordinate search (each stage over all its widths in turn, the others held, from the
   best uniform ratio, until no stage changes).
2. **Given the residual widths, the cost is linear in every other group's count** (a block's Linears are
   ``width x residual``, its attention matmuls linear in the width: :meth:`CostModel.linearize`), and the removed
   score of a group is convex in what it removes (its lowest-scored items go first). Each group is a ladder of
   options (full, then one unit less, ...: a dim of every head, a whole head, a merged head's dim, an MLP unit,
   ``round_to`` of them at a time), and the allocation removes ladder steps across all groups in increasing order of
   score per cost until the budget holds (a greedy on the lower convex hull of each group's options; for a latency
   budget the options' costs are measured, not linear, and the hull skips options that cost more than a narrower
   one).

Every allocation this greedy returns is the optimum for the cost it reaches (it minimises ``score + lambda * cost``
for the ratio of its last step: Everett's theorem), its cost never exceeds the budget and falls short of it by less
than the cost of its last step; against the best allocation of the whole budget it is worse by at most the score of
that last step (``gap_bound`` in the report: the largest over the residual widths searched). The tests check all of
this against enumeration of every feasible allocation on small ViT and Swin spaces.
"""
from __future__ import annotations

import itertools
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
from torch import nn

from .arch import adapter_for
from .cost import CostModel
from .errors import PlanError
from .plan import Plan, PlanSpec, Selection, _attn_selections, _check_scores, plan_from_scores
from .space import Group, PruningSpace

MAX_COMBOS = 4096  # residual-width combinations searched exhaustively; beyond, a coordinate search


@dataclass
class _Ladder:
    """A group's options, widest first: kept channels, heads, removed score, and the keep ratio ``make_plan`` turns
    into that count (``ratio``)."""

    group: str
    kept: list[int]
    heads: list[int | None]
    score: list[float]
    ratio: list[float]


def _allowed(n: int, round_to: int) -> list[int]:
    """Per-selection counts ``make_plan`` can keep of ``n`` items, widest first (``round_to`` where ``n`` allows)."""
    if round_to > 1 and n > round_to:
        return [n] + [k for k in range(n // round_to * round_to, 0, -round_to) if k != n]
    return list(range(n, 0, -1))


def _removed(items_scores: torch.Tensor, counts: list[int]) -> list[float]:
    """Summed score of the lowest ``len - k`` items, for each kept count ``k`` (``items_scores`` [items])."""
    low = torch.sort(items_scores).values.cumsum(0)
    total = len(items_scores)
    return [float(low[total - k - 1]) if k < total else 0.0 for k in counts]


def _floor(g: Group, spec: PlanSpec) -> int:
    """The fewest channels ``spec.min_keep`` lets group ``g`` keep."""
    m = spec.min_keep
    if isinstance(m, Mapping):
        m = m.get(g.name, m.get(g.kind, 0.0))
    return math.ceil(m * g.size - 1e-9)


def _at_least(lad, kept: list[int], floor: int):
    """``lad`` without the options that keep fewer than ``floor`` channels (the widest always stays)."""
    n = max(1, sum(k >= floor for k in kept))
    for f in fields(lad):
        v = getattr(lad, f.name)
        if isinstance(v, list):
            setattr(lad, f.name, v[:n])
        elif isinstance(v, dict):
            setattr(lad, f.name, {k: opts[:n] for k, opts in v.items()})
    return lad


def _sel_ladder(g: Group, sels: list[Selection], s: torch.Tensor, round_to: int, unit: str) -> _Ladder:
    """The ladder of a group whose selections all keep the same count (every head, every merged head, one ranking)."""
    n_items = len(sels[0].items)
    counts = _allowed(n_items, round_to if unit == "channels" else 1)
    score = [0.0] * len(counts)
    for sel in sels:
        for i, v in enumerate(_removed(s[sel.items].sum(1), counts)):
            score[i] += v
    per = g.size // (n_items * len(sels)) if unit == "heads" else 1  # channels per item
    kept = [k * len(sels) * per for k in counts]
    heads = [k if unit == "heads" else sels[0].heads for k in counts]
    return _Ladder(g.name, kept, heads, score, [k / n_items for k in counts])


def _ladders(space: PruningSpace, scores: Mapping[str, torch.Tensor], spec: PlanSpec) -> dict[str, _Ladder]:
    """The ladder of every attention and MLP group that is not tied to a residual."""
    per_group = spec.heads if isinstance(spec.heads, Mapping) else None
    out = {}
    for g in space.groups.values():
        if g.kind == "residual" or g.tied_to is not None:
            continue
        s = _check_scores(g, scores)
        if g.kind == "mlp":
            out[g.name] = _sel_ladder(g, [Selection(g.name, torch.arange(g.size)[:, None], g.size)], s, spec.round_to,
                                      "channels")
            continue
        h = per_group.get(g.name) if per_group is not None else spec.heads
        sels = _attn_selections(g, 1.0, h, spec.attn_mode, spec.round_to)
        whole = sels[0].items.shape[1] > 1  # whole-head removal: items are heads
        out[g.name] = _sel_ladder(g, sels, s, 1 if whole else spec.round_to, "heads" if whole else "channels")
    return {n: _at_least(lad, lad.kept, _floor(space.groups[n], spec)) for n, lad in out.items()}


@dataclass
class _Residual:
    """A residual group's options, widest first (its tied attentions follow: their removed score is in ``score``)."""

    group: str
    kept: list[int]
    score: list[float]
    tied: dict[str, list[tuple[int, int]]]  # tied group -> (kept, heads) per option


def _residuals(space: PruningSpace, scores: Mapping[str, torch.Tensor], spec: PlanSpec) -> list[_Residual]:
    out = []
    ties: dict[str, list[Group]] = {}
    for g in space.groups.values():
        if g.tied_to is not None:
            ties.setdefault(g.tied_to, []).append(g)
    for g in space.of_kind("residual"):
        s = _check_scores(g, scores)
        mult = math.lcm(g.multiple_of, *(t.head_dim if t.whole_heads else t.num_heads for t in ties.get(g.name, [])))
        step = math.lcm(mult, spec.round_to) if spec.round_to > 1 and g.size > spec.round_to else mult
        widths = [g.size] + [c for c in range(g.size // step * step, 0, -step) if c != g.size]
        if g.size % mult:  # a width the tied heads cannot split: only the multiples are reachable
            widths = widths[1:]
        score = _removed(s, widths)
        tied: dict[str, list[tuple[int, int]]] = {}
        for t in ties.get(g.name, []):
            st = _check_scores(t, scores)
            if t.whole_heads:
                heads = [c // t.head_dim for c in widths]
                removed = _removed(st.view(t.num_heads, t.head_dim).sum(1), heads)
                tied[t.name] = [(m * t.head_dim, m) for m in heads]
            else:
                per = [c // t.num_heads for c in widths]
                removed = [0.0] * len(widths)
                for hh in range(t.num_heads):
                    for i, v in enumerate(_removed(st[hh * t.head_dim:(hh + 1) * t.head_dim], per)):
                        removed[i] += v
                tied[t.name] = [(d * t.num_heads, t.num_heads) for d in per]
            score = [a + b for a, b in zip(score, removed, strict=True)]
        out.append(_at_least(_Residual(g.name, widths, score, tied), widths, _floor(g, spec)))
    return out


def _hull(cost: list[float], score: list[float]) -> list[int]:
    """Indices of a ladder's options on the lower convex hull, widest (most costly) first: each next option costs
    less and removes more, at a non-decreasing score per cost."""
    order = [0]
    for i in range(1, len(cost)):
        if cost[i] >= cost[order[-1]]:
            continue  # costs no less than a wider option: never chosen
        while len(order) >= 2:
            a, b = order[-2], order[-1]
            if (score[b] - score[a]) * (cost[a] - cost[i]) >= (score[i] - score[a]) * (cost[a] - cost[b]):
                order.pop()  # b lies on or above the chord from a to i
            else:
                break
        order.append(i)
    return order


@dataclass
class _Result:
    choice: dict[str, int]  # group -> option index in its ladder
    cost: float
    score: float
    last: float  # score of the last step taken (the gap bound)
    last_cost: float  # and its cost (the most the budget is missed by)


def _greedy(ladders: dict[str, _Ladder], option_cost, base_cost: float, base_score: float,
            budget: float) -> _Result | None:
    """Remove hull steps across groups in increasing score per cost until ``cost <= budget`` (None: unreachable)."""
    steps = []  # (ratio, group order, step order, group, option, d_cost, d_score)
    for gi, (name, lad) in enumerate(ladders.items()):
        cost = option_cost(name)
        hull = _hull(cost, lad.score)
        for j in range(1, len(hull)):
            a, b = hull[j - 1], hull[j]
            dc, ds = cost[a] - cost[b], lad.score[b] - lad.score[a]
            steps.append((ds / dc, gi, j, name, b, dc, ds))
    steps.sort(key=lambda t: t[:3])
    choice = dict.fromkeys(ladders, 0)
    cost, score, last, last_cost = base_cost, base_score, 0.0, 0.0
    for _, _, _, name, opt, dc, ds in steps:
        if cost <= budget:
            break
        choice[name], cost, score, last, last_cost = opt, cost - dc, score + ds, ds, dc
    if cost > budget:
        return None
    return _Result(choice, cost, score, last, last_cost)


def allocate(model: nn.Module, scores: Mapping[str, torch.Tensor], spec: PlanSpec, *,
             cost_model: CostModel | None = None, latency_model=None,
             max_combos: int = MAX_COMBOS) -> tuple[Plan, dict]:
    """The Plan that keeps the most score under ``spec``'s budget (see the module docstring for the method and its
    bound).

    Args:
        model: a supported model (not modified).
        scores: group name -> scores comparable across groups (UP-ViTs' KL, or normalised per group), for every group.
        spec: a :class:`PlanSpec` with ``allocation="global"`` and one budget (``flops``, ``params`` or
            ``latency``: fractions of the dense model's), plus the head rules (``heads``, ``attn_mode``, ``round_to``).
        cost_model: a :class:`~vitprune_fast.cost.CostModel` of ``model`` for the budget's measure (built if None).
        latency_model: for a latency budget, a :class:`~vitprune_fast.latency.LatencyModel` of ``model``.
        max_combos: residual-width combinations searched exhaustively (beyond: the coordinate search).

    Returns:
        ``(plan, report)``: the report holds the target and achieved cost (absolute and as fractions), the removed
        score, ``gap_bound``, the residual widths searched and how, and the seconds.

    Raises:
        PlanError: no budget, an unreachable budget, missing or misshapen scores, or a model whose cost is not
            linear in its attention / MLP counts once the residual widths are fixed.
    """
    t0 = time.perf_counter()
    if spec.allocation != "global":
        raise PlanError(f"allocate takes allocation='global', got {spec.allocation!r}")
    measure = spec.budget
    if measure not in ("flops", "params", "latency"):
        raise PlanError(f"a global allocation needs a flops, params or latency budget, got {measure}")
    space = adapter_for(model).describe()
    ladders = _ladders(space, scores, spec)
    residuals = _residuals(space, scores, spec)
    if measure == "latency":
        if latency_model is None:
            raise PlanError("a latency budget needs a LatencyModel of the model (vitprune_fast.latency)")
        costs = latency_model
    else:
        costs = cost_model or CostModel(model, measure)
        if costs.measure != measure:
            raise PlanError(f"the cost model counts {costs.measure}, the budget is {measure}")
    dense = costs.dense
    budget = getattr(spec, measure) * dense

    def option_costs(widths: tuple[int, ...]):
        fixed, heads = {}, {}
        for res, i in zip(residuals, widths, strict=True):
            fixed[res.group] = res.kept[i]
            for t, opts in res.tied.items():
                fixed[t], heads[t] = opts[i]
        return costs.option_costs(fixed, heads, ladders)

    def solve(widths: tuple[int, ...]) -> _Result | None:
        oc = option_costs(widths)
        base_score = sum(res.score[i] for res, i in zip(residuals, widths, strict=True))
        return _greedy(ladders, oc.__getitem__, oc.base, base_score, budget)

    searched: dict[tuple[int, ...], _Result | None] = {}

    def best_of(candidates) -> tuple[tuple[int, ...], _Result] | None:
        found = None
        for w in candidates:
            if w not in searched:
                searched[w] = solve(w)
            r = searched[w]
            if r is not None and (found is None or r.score < found[1].score):
                found = (w, r)
        return found

    sizes = [len(r.kept) for r in residuals]
    n_combos = math.prod(sizes)
    if n_combos <= max_combos:
        how = "exhaustive"
        found = best_of(itertools.product(*(range(n) for n in sizes)))
    else:
        how = "coordinate"
        uniform = [tuple(min(int(round(f * (n - 1))), n - 1) for n in sizes) for f in torch.linspace(0, 1, 17).tolist()]
        found = best_of(uniform)
        changed = found is not None
        while changed:
            changed = False
            for s in range(len(residuals)):
                w = found[0]
                cand = best_of(w[:s] + (i,) + w[s + 1:] for i in range(sizes[s]))
                if cand[0] != w:
                    found, changed = cand, True
    if found is None:
        raise PlanError(f"{measure} budget {getattr(spec, measure)} is unreachable under these rules (every group "
                        "keeping one unit costs more)")
    widths, res = found
    if not res.last_cost:  # nothing removed past the residual widths: the last step is a residual one
        base = option_costs(widths).base
        res.last_cost = min((option_costs(widths[:s] + (i - 1,) + widths[s + 1:]).base - base
                             for s, i in enumerate(widths) if i > 0), default=0.0)
    keep: dict[str, float] = {}
    for r, i in zip(residuals, widths, strict=True):
        keep[r.group] = r.kept[i] / space.groups[r.group].size
    for name, opt in res.choice.items():
        lad = ladders[name]
        if opt or lad.heads[0] != space.groups[name].num_heads:
            keep[name] = lad.ratio[opt]
    plan_spec = PlanSpec(keep=keep, heads=spec.heads, attn_mode=spec.attn_mode, round_to=1)
    plan = plan_from_scores(space, scores, plan_spec)
    achieved = costs.plan_cost(plan) if measure != "latency" else costs.predict_plan(plan)
    report = {"measure": measure, "target": getattr(spec, measure), "dense": dense, "budget": budget,
              "achieved": achieved, "achieved_frac": achieved / dense, "removed_score": res.score,
              "gap_bound": max((r.last for r in searched.values() if r is not None), default=0.0),
              "last_step_score": res.last, "last_step_cost": res.last_cost, "residual_search": how,
              "residual_combos_searched": len(searched),
              "residual_widths": {r.group: r.kept[i] for r, i in zip(residuals, widths, strict=True)},
              "kept": plan.kept_sizes(space), "seconds": time.perf_counter() - t0}
    if measure != "latency" and abs(achieved - res.cost) > 0.5 + 1e-9 * dense:
        raise PlanError(f"internal: the allocation's predicted {measure} {res.cost} differs from the plan's {achieved}")
    return plan, report


def allocation_summary(report: dict) -> str:
    """One line for a person: the budget, what the allocation reached, and its bound."""
    unit = {"flops": "FLOPs", "params": "params", "latency": "latency"}[report["measure"]]
    return (f"global allocation: {100 * report['achieved_frac']:.2f} % {unit} for a {100 * report['target']:.1f} % "
            f"budget, removed score {report['removed_score']:.4g} (within {report['gap_bound']:.3g} of the best "
            f"allocation), residual widths {report['residual_widths']} ({report['residual_search']} search), "
            f"{report['seconds']:.1f} s")


def removed_score(space: PruningSpace, scores: Mapping[str, torch.Tensor], plan: Plan) -> float:
    """The summed score of every channel ``plan`` removes (the allocation's objective, for any plan)."""
    total = 0.0
    for name, kept in plan.keep.items():
        s = torch.as_tensor(scores[name]).double()
        mask = torch.ones(len(s), dtype=torch.bool)
        mask[kept] = False
        total += float(s[mask].sum())
    return total


__all__ = ["MAX_COMBOS", "allocate", "allocation_summary", "removed_score"]
