"""Plan: which channels of each group to keep (and the new head layout), built from scores and ratios."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import torch

from .errors import PlanError
from .space import KINDS, Group, PruningSpace

ATTN_MODES = ("dims", "heads")


@dataclass
class Plan:
    """Kept channels per group, in original numbering.

    Attributes:
        keep: group name -> sorted kept indices (LongTensor). Groups not listed are kept whole.
        heads: attn group name -> new number of heads. Kept attention channels, in ascending order, are cut
            into ``heads`` equal consecutive chunks; chunk g becomes head g.
        sizes: group name -> group size the plan was made for (checked against the model by prune_).
    """

    keep: dict[str, torch.Tensor]
    heads: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_space(cls, space: PruningSpace, keep: Mapping[str, torch.Tensor], heads: Mapping[str, int] | None = None):
        """A plan for ``space`` (records its group sizes so a mismatched model is detected)."""
        return cls(
            keep={k: torch.as_tensor(v, dtype=torch.long) for k, v in keep.items()},
            heads=dict(heads or {}),
            sizes={name: g.size for name, g in space.groups.items()},
        )

    def kept_sizes(self, space: PruningSpace) -> dict[str, int]:
        """Group name -> number of channels left after this plan."""
        return {n: (len(self.keep[n]) if n in self.keep else g.size) for n, g in space.groups.items()}

    def to_dict(self) -> dict:
        """JSON-friendly form."""
        return {"keep": {k: v.tolist() for k, v in self.keep.items()}, "heads": self.heads, "sizes": self.sizes}

    @classmethod
    def from_dict(cls, d: Mapping) -> Plan:
        return cls(
            keep={k: torch.tensor(v, dtype=torch.long) for k, v in d["keep"].items()},
            heads={k: int(v) for k, v in d.get("heads", {}).items()},
            sizes={k: int(v) for k, v in d.get("sizes", {}).items()},
        )

    def __repr__(self) -> str:
        return f"Plan({len(self.keep)} groups pruned, {len(self.heads)} head layouts)"


BUDGETS = ("flops", "params", "latency")
ALLOCATIONS = ("uniform", "global")


@dataclass(frozen=True)
class PlanSpec:
    """What a plan must reach and the rules it follows; every planner and method takes one.

    Exactly one of ``keep``, ``flops``, ``params``, ``latency`` and ``target`` says how much stays (none: keep
    everything). A budget or a target is turned into keep ratios by :func:`vitprune_fast.targets.resolve_spec`
    under the ``allocation`` rule; methods with their own way of meeting a budget (DIMAP's module-wise thresholds,
    DAP's parameter budget) read it directly.

    Attributes:
        keep: one keep ratio in (0, 1] for every group, or a dict keyed by kind (``residual`` / ``attn`` / ``mlp``)
            and/or by group name (a group name wins over its kind; missing kinds keep 1.0).
        flops: fraction of the dense FLOPs to keep, in (0, 1].
        params: fraction of the parameters to keep, in (0, 1].
        latency: fraction of the measured latency to keep, in (0, 1] (a global allocation; not available with
            ``allocation="uniform"``).
        target: a timm model name whose widths and head counts to reach (:func:`vitprune_fast.targets.shape_targets`);
            it sets the head layout itself, so ``heads``, ``attn_mode`` and ``round_to`` keep their defaults.
        heads: the UP-ViTs head-merge rule: one head count for every attention, or attn group name -> head count
            (see :func:`make_plan`).
        attn_mode: without ``heads``: ``"dims"`` keeps every head and the same number of dims per head; ``"heads"``
            removes whole heads.
        round_to: round every narrowed width to a multiple of this (see :func:`make_plan`).
        allocation: how a budget becomes widths: ``"uniform"`` (the UP-ViTs rule: one keep ratio for the residual,
            attention and MLP groups of every block) or ``"global"`` (every group's count chosen to keep the most
            score under the budget, :func:`vitprune_fast.allocate.allocate`; needs scores comparable across groups).
        min_keep: with ``allocation="global"``: the smallest fraction of every group the allocation may keep, in
            [0, 1], or a dict keyed by kind and/or group name like ``keep`` (Torch-Pruning's ``max_pruning_ratio`` is
            ``1 - min_keep``). 0 lets a group go down to one unit, which is right for scores in one unit (UP-ViTs'
            KL); per-group normalised scores make every group's channels alike and can starve the group whose
            channels cost the most (README: Global allocation of widths). A tied attention follows its residual's.
    """

    keep: float | Mapping[str, float] | None = None
    flops: float | None = None
    params: float | None = None
    latency: float | None = None
    target: str | None = None
    heads: int | Mapping[str, int | None] | None = None
    attn_mode: str = "dims"
    round_to: int = 1
    allocation: str = "uniform"
    min_keep: float | Mapping[str, float] = 0.0

    def __post_init__(self):
        given = [n for n in ("keep", "flops", "params", "latency", "target") if getattr(self, n) is not None]
        if len(given) > 1:
            raise PlanError(f"give one of keep, flops, params, latency or target, not {' and '.join(given)}")
        if not given:
            object.__setattr__(self, "keep", 1.0)
        for name in ("keep", "heads", "min_keep"):  # a copy: the caller's dict may change later
            v = getattr(self, name)
            if isinstance(v, Mapping):
                object.__setattr__(self, name, dict(v))
        for name in BUDGETS:
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v)
                                  or not 0 < v <= 1):
                raise PlanError(f"{name} budget must be a fraction in (0, 1], got {v!r}")
        if self.target is not None and (self.heads is not None or self.attn_mode != "dims" or self.round_to != 1):
            raise PlanError("a target shape sets the widths and head counts itself: leave heads, attn_mode and "
                            "round_to at their defaults")
        if self.allocation not in ALLOCATIONS:
            raise PlanError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        floors = self.min_keep.values() if isinstance(self.min_keep, Mapping) else [self.min_keep]
        for m in floors:
            if isinstance(m, bool) or not isinstance(m, (int, float)) or math.isnan(m) or not 0 <= m <= 1:
                raise PlanError(f"min_keep must be a fraction in [0, 1], got {m!r}")
        if any(floors) and self.allocation != "global":
            raise PlanError("min_keep bounds a global allocation (allocation='global'); the uniform rule keeps one "
                            "ratio everywhere")

    @property
    def budget(self) -> str:
        """Which of ``keep``, ``flops``, ``params``, ``latency``, ``target`` this spec gives."""
        return next(n for n in ("keep", "flops", "params", "latency", "target") if getattr(self, n) is not None)

    def to_dict(self) -> dict:
        """JSON-friendly form (``PlanSpec(**d)`` rebuilds it)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def as_spec(spec: PlanSpec | float | Mapping[str, float] | None) -> PlanSpec:
    """``spec`` itself, or ``PlanSpec(keep=spec)`` for a ratio or a dict of ratios (None: keep everything)."""
    if isinstance(spec, PlanSpec):
        return spec
    if spec is None or isinstance(spec, (int, float, Mapping)) and not isinstance(spec, bool):
        return PlanSpec(keep=spec)
    raise PlanError(f"expected a PlanSpec, a keep ratio or a dict of keep ratios, got {type(spec).__name__}")


def _ratio_for(group: Group, keep: float | Mapping[str, float]) -> float:
    if isinstance(keep, Mapping):
        r = keep.get(group.name, keep.get(group.kind, 1.0))
    else:
        r = keep
    try:
        r = float(r)
    except (TypeError, ValueError) as e:
        raise PlanError(f"{group.name}: keep ratio must be a number, got {r!r}") from e
    if not (0.0 < r <= 1.0) or math.isnan(r):
        raise PlanError(f"{group.name}: keep ratio must be in (0, 1], got {r}")
    return r


def _top(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the n highest scores (ties broken by lower index), sorted ascending."""
    order = torch.argsort(-scores, stable=True)
    return order[:n].sort().values


def _check_scores(group: Group, scores: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
    if scores is None or group.name not in scores:
        raise PlanError(f"no scores for group {group.name!r} (needed because its keep ratio is < 1)")
    s = torch.as_tensor(scores[group.name]).detach().to("cpu", torch.float64)
    if s.shape != (group.size,):
        raise PlanError(f"scores[{group.name!r}] has shape {tuple(s.shape)}, expected ({group.size},)")
    if not torch.isfinite(s).all():
        raise PlanError(f"scores[{group.name!r}] contains NaN or inf")
    return s


def _count(r: float, n: int, round_to: int = 1) -> int:
    """Channels kept of ``n`` at ratio ``r``: at least one, a multiple of ``round_to`` where ``n`` allows it."""
    if round_to > 1 and n > round_to:
        return min(n, max(round_to, round_to * round(r * n / round_to)))
    return max(1, round(r * n))


@dataclass(frozen=True)
class Selection:
    """One ranking a Plan makes: keep the ``keep`` top-scored items of ``items`` (ties: the lower item first).

    Attributes:
        group: the group name.
        items: ``[n_items, item_size]`` channel indices; an item's score is the sum of its channels' scores (items
            are single channels, or whole heads when heads are removed).
        keep: how many items stay.
        heads: the attention group's head count after the plan (None for other kinds).
    """

    group: str
    items: torch.Tensor
    keep: int
    heads: int | None = None


def whole_heads_error(g: Group) -> PlanError:
    """The error for a plan that would split the heads of a ``whole_heads`` group."""
    return PlanError(f"{g.name}: this attention normalises q / k per head (qk-norm), so only whole heads can be "
                     "removed exactly: use attn_mode='heads' (and no head merge) for it")


def check_whole_heads(space: PruningSpace, attn_mode: str) -> None:
    """Raise :func:`whole_heads_error` when ``attn_mode`` would split the heads of a ``whole_heads`` group (for
    planners that narrow every attention, DIMAP's structured plan and DAP)."""
    bad = [g for g in space.of_kind("attn") if g.whole_heads and g.tied_to is None]  # tied ones follow their partner
    if bad and attn_mode != "heads":
        raise whole_heads_error(bad[0])


def _attn_selections(g: Group, r: float, heads: int | None, attn_mode: str, round_to: int) -> list[Selection]:
    h, hd = g.num_heads, g.head_dim
    if g.whole_heads and (heads not in (None, h) or attn_mode != "heads"):
        raise whole_heads_error(g)
    if heads is not None:  # UP-ViTs head merge: h_t groups of h/h_t consecutive heads, same count kept in each
        if heads < 1 or h % heads:
            raise PlanError(f"{g.name}: heads={heads} must divide the number of heads ({h})")
        width = g.size // heads
        n = _count(r, width, round_to)  # the merged heads' head_dim
        return [Selection(g.name, (i * width + torch.arange(width))[:, None], n, heads) for i in range(heads)]
    if attn_mode == "heads":  # whole-head removal ranked by the summed channel scores; head_dim unchanged
        n = max(1, round(r * h))
        return [Selection(g.name, torch.arange(g.size).view(h, hd), n, n)]
    n = _count(r, hd, round_to)  # uniform head_dim: the same number of dims kept in every head
    return [Selection(g.name, (i * hd + torch.arange(hd))[:, None], n, h) for i in range(h)]


def selections(space: PruningSpace, spec: PlanSpec) -> list[Selection]:
    """The rankings :func:`plan_from_scores` makes for ``spec`` (keep ratios), group by group (validated the same
    way).

    Groups left whole are absent; a group whose only change is its head count has selections that keep every item.
    """
    if not isinstance(space, PruningSpace):
        raise PlanError(f"make_plan needs the PruningSpace from describe(model), got {type(space).__name__}")
    if not isinstance(spec, PlanSpec):
        raise PlanError(f"expected a vitprune_fast.PlanSpec, got {type(spec).__name__}")
    if spec.keep is None:
        raise PlanError(f"this planner takes keep ratios; resolve the spec's {spec.budget} budget first "
                        "(vitprune_fast.targets.resolve_spec)")
    keep, heads, attn_mode, round_to = spec.keep, spec.heads, spec.attn_mode, spec.round_to
    if attn_mode not in ATTN_MODES:
        raise PlanError(f"attn_mode must be one of {ATTN_MODES}, got {attn_mode!r}")
    if isinstance(keep, Mapping):
        unknown = [k for k in keep if k not in KINDS and k not in space.groups]
        if unknown:
            raise PlanError(f"keep has unknown keys {unknown}; use kinds {KINDS} or group names")
    per_group = heads if isinstance(heads, Mapping) else None
    if per_group is not None:
        bad = [n for n in per_group
               if n not in space.groups or space.groups[n].kind != "attn" or space.groups[n].tied_to]
        if bad:
            raise PlanError(f"heads has keys {bad[:5]} that are not attention groups of this model")
    for h in per_group.values() if per_group is not None else [heads]:
        if h is not None and (not isinstance(h, int) or isinstance(h, bool)):
            raise PlanError(f"heads must be an int, got {h!r}")
    if not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1:
        raise PlanError(f"round_to must be an int >= 1, got {round_to!r}")
    out: list[Selection] = []
    ties = _ties(space)
    for g in space.groups.values():
        if g.tied_to is not None:
            continue  # planned with the group it is tied to
        r = _ratio_for(g, keep)
        h = per_group.get(g.name) if per_group is not None else heads
        if g.kind == "attn" and h is not None and h != g.num_heads:
            if g.num_heads % h:
                raise PlanError(f"{g.name}: heads={h} must divide the number of heads ({g.num_heads})")
        elif r == 1.0:
            continue
        if g.kind == "attn":
            out += _attn_selections(g, r, h, attn_mode, round_to)
            continue
        n = _count(r, g.size, round_to)
        mult = math.lcm(g.multiple_of, *(t.head_dim if t.whole_heads else t.num_heads for t in ties.get(g.name, [])))
        if mult > 1:  # tied attentions split the kept count into equal heads; multiples of mult <= the group's size
            n = min(g.size // mult * mult, max(mult, mult * round(n / mult)))
        out.append(Selection(g.name, torch.arange(g.size)[:, None], n))
        for t in ties.get(g.name, []):
            if t.whole_heads:
                out.append(Selection(t.name, torch.arange(t.size).view(t.num_heads, t.head_dim), n // t.head_dim,
                                     n // t.head_dim))
            else:
                out += [Selection(t.name, (i * t.head_dim + torch.arange(t.head_dim))[:, None], n // t.num_heads,
                                  t.num_heads) for i in range(t.num_heads)]
    return out


def _ties(space: PruningSpace) -> dict[str, list[Group]]:
    """Group name -> the attention groups tied to its kept count."""
    out: dict[str, list[Group]] = {}
    for g in space.groups.values():
        if g.tied_to is not None:
            out.setdefault(g.tied_to, []).append(g)
    return out


def make_plan(
        space: PruningSpace,
        scores: Mapping[str, torch.Tensor] | None,
        keep: float | Mapping[str, float] = 1.0,
        heads: int | Mapping[str, int | None] | None = None,
        attn_mode: str = "dims",
        round_to: int = 1,
) -> Plan:
    """Build a Plan from importance scores by the UP-ViTs rules.

    Every group is ranked on its own and keeps the same ratio of its kind in every block.

    Args:
        space: from ``describe(model)``.
        scores: group name -> 1-D tensor of ``group.size`` scores, higher = more important. Needed only for
            groups whose keep ratio is below 1.
        keep: one ratio for every group, or a dict keyed by kind (``residual``/``attn``/``mlp``) and/or by
            group name (a group name wins over its kind). Missing kinds keep 1.0. Ratios must be in (0, 1].
        heads: UP-ViTs head-merge rule: merge each run of ``num_heads // heads`` consecutive heads into one
            and keep the top ``keep * attn_dim / heads`` channels inside each merged group. Must divide
            every attention's head count. A dict gives a count per attention group (Swin stages differ);
            a group left out or mapped to ``None`` is planned as with ``heads=None``.
        attn_mode: without ``heads``: ``"dims"`` keeps every head and the same number of dims per head;
            ``"heads"`` removes whole heads ranked by their summed channel scores. An attention with per-head q/k
            norms (``Group.whole_heads``) can only be narrowed with ``"heads"`` (a clear PlanError otherwise).
            An attention tied to a residual (``Group.tied_to``: SigLIP's attention pool) is not planned by ``keep``
            or ``heads``: it keeps the residual's count, split evenly over its heads (the residual's count is
            rounded to a multiple of those heads).
        round_to: round every narrowed width (residual, MLP hidden, head_dim; merged heads' head_dim) to the
            nearest multiple of this, at least one multiple (a group of at most ``round_to`` channels is not
            rounded). GPU kernels want multiples of 8: cuBLAS tensor-core tiles, and SDPA's fused kernels need
            head_dim % 8 == 0 in half precision. Whole-head removal keeps head_dim and rounds nothing.

    Returns:
        The Plan (kept indices sorted, in the original numbering).
    """
    return plan_from_scores(space, scores, PlanSpec(keep=keep, heads=heads, attn_mode=attn_mode, round_to=round_to))


def plan_from_scores(space: PruningSpace, scores: Mapping[str, torch.Tensor] | None, spec: PlanSpec) -> Plan:
    """The Plan of ``spec`` (keep ratios, heads, attn_mode, round_to) from importance scores: each ranking of
    :func:`selections` keeps its top items (see :func:`make_plan` for the rules).

    Args:
        space: from ``describe(model)``.
        scores: group name -> 1-D tensor of ``group.size`` scores, higher = more important (needed only for groups
            whose keep ratio is below 1).
        spec: a :class:`PlanSpec` with keep ratios (a budget or a target shape is turned into ratios first by
            :func:`vitprune_fast.targets.resolve_spec`).
    """
    by_group: dict[str, list[Selection]] = {}
    for sel in selections(space, spec):
        by_group.setdefault(sel.group, []).append(sel)
    kept: dict[str, torch.Tensor] = {}
    new_heads: dict[str, int] = {}
    for name, sels in by_group.items():
        g = space.groups[name]
        needed = any(sel.keep < len(sel.items) for sel in sels)  # scores matter only where some item goes
        s = _check_scores(g, scores) if needed else torch.zeros(g.size, dtype=torch.float64)
        kept[name] = torch.cat([sel.items[_top(s[sel.items].sum(1), sel.keep)].flatten() for sel in sels])
        if sels[0].heads is not None:
            new_heads[name] = sels[0].heads
    return Plan.from_space(space, kept, new_heads)
