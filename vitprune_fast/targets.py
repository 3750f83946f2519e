"""Plans for a target: a FLOPs budget or the widths of a stock timm model, and plans with per-group head counts.

These build on :func:`vitprune_fast.plan.make_plan`. None of them modifies the model it is given: FLOPs are
counted on pruned meta-device copies (:func:`vitprune_fast.flops.plan_flops`), shapes are read from
:func:`vitprune_fast.arch.describe`. Bad input raises
:class:`~vitprune_fast.errors.PlanError` (an unsupported model: ``UnsupportedModelError``) before any work.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .arch import adapter_for, describe
from .errors import PlanError
from .flops import count_flops, plan_flops
from .meta import create_on_meta
from .plan import Plan, PlanSpec, as_spec, make_plan, plan_from_scores
from .space import KINDS, PruningSpace


def plan_with_heads(space: PruningSpace, scores: Mapping[str, torch.Tensor] | None,
                    keep: float | Mapping[str, float], heads: int | Mapping[str, int | None] | None = None,
                    attn_mode: str = "dims", round_to: int = 1) -> Plan:
    """``make_plan`` with a head count per attention group (Swin stages differ): the same call, kept by name.

    Args:
        space: ``describe(model)``.
        scores: group name -> ``[group.size]`` scores, higher = more important (needed for groups kept < 1).
        keep: as for ``make_plan``: one ratio, or a dict by kind and/or group name.
        heads: ``None``, one head count for every attention, or attn group name -> head count (a group left out
            or mapped to ``None`` is planned as with ``heads=None``).
        attn_mode: see ``make_plan``.
        round_to: see ``make_plan``.

    Returns:
        The Plan for the whole space.

    Raises:
        PlanError: anything ``make_plan`` rejects (not a PruningSpace, ``heads`` keys that are not attention
            groups, unknown keep keys, ratios outside (0, 1], head counts that do not divide, missing or
            misshapen scores).
    """
    return make_plan(space, scores, keep=keep, heads=heads, attn_mode=attn_mode, round_to=round_to)


_BUDGET_NAMES = {"flops": "FLOPs", "params": "params"}


def _check_target(target, what: str = "FLOPs") -> float:
    """``target`` as a float in (0, 1]."""
    if isinstance(target, bool):
        raise PlanError(f"{what} target must be a fraction in (0, 1], got {target!r}")
    try:
        t = float(target)
    except (TypeError, ValueError) as e:
        raise PlanError(f"{what} target must be a fraction in (0, 1], got {target!r}") from e
    if math.isnan(t) or not 0 < t <= 1:
        raise PlanError(f"{what} target must be in (0, 1], got {target}")
    return t


def _check_kinds(kinds: str | Iterable[str]) -> tuple[str, ...]:
    """``kinds`` as a non-empty tuple of distinct kinds (one kind may be given as a string)."""
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    if not kinds or len(set(kinds)) != len(kinds) or not set(kinds) <= set(KINDS):
        raise PlanError(f"kinds must be distinct names from {KINDS}, got {list(kinds)}")
    return kinds


def keep_for_flops(model: nn.Module, target: float, kinds: str | Iterable[str] = KINDS,
                   heads: int | Mapping[str, int | None] | None = None, attn_mode: str = "dims",
                   iters: int = 14, round_to: int = 1) -> tuple[float, float]:
    """One keep ratio ``r`` for every group of ``kinds`` whose pruned model has FLOPs closest to ``target`` x dense.

    FLOPs do not depend on which channels are kept, only on how many, so the search plans with dummy scores and
    counts each candidate ratio on a pruned meta-device copy (:func:`vitprune_fast.flops.plan_flops`: exact, no
    model of FLOPs, no weights copied). The model itself is not modified.

    Tolerance: channel counts are integers, so the reachable fractions form a staircase in ``r``. The bisection
    brackets ``target`` between two ratios ``2**-iters`` apart and returns the one whose fraction is nearer, so
    ``achieved`` is the reachable fraction nearest to ``target``: it misses ``target`` by at most half of one
    step of the staircase (the FLOPs of the channels one rounding step adds), and no other single ratio gets
    closer, up to that resolution of ``r``.

    Args:
        model: a supported timm ViT/DeiT/Swin (its own device and dtype are used for counting).
        target: wanted fraction of the dense FLOPs, in (0, 1].
        kinds: the kinds that get ratio ``r``; the others stay whole.
        heads: as for :func:`plan_with_heads` (an int, or attn group name -> head count).
        attn_mode: see ``make_plan``.
        iters: bisection steps (>= 1).
        round_to: see ``make_plan`` (rounded widths keep the FLOPs non-decreasing in ``r``).

    Returns:
        ``(r, achieved)``: the keep ratio and the FLOPs fraction of the model pruned with it (a float in
        (0, 1]), the same for any scores given to ``make_plan(space, scores, keep={kind: r for kind in kinds},
        heads=heads, attn_mode=attn_mode, round_to=round_to)``.

    Raises:
        PlanError: ``target`` outside (0, 1] or below the smallest reachable fraction (that of ``r = 0.001``),
            unknown ``kinds``, ``iters`` < 1, or bad ``heads`` / ``attn_mode``.
        UnsupportedModelError: a model the adapters cannot prune.
    """
    return keep_for_budget(model, target, "flops", kinds, PlanSpec(heads=heads, attn_mode=attn_mode,
                                                                     round_to=round_to), iters)


def keep_for_budget(model: nn.Module, target: float, measure: str = "flops", kinds: str | Iterable[str] = KINDS,
                    rules: PlanSpec | None = None, iters: int = 14) -> tuple[float, float]:
    """One keep ratio for every group of ``kinds`` whose pruned model's FLOPs or parameters come closest to
    ``target`` x the dense model's (:func:`keep_for_flops` is ``measure="flops"``; the same tolerance holds).

    Args:
        model: a supported model (not modified; counted on pruned meta-device copies).
        target: wanted fraction, in (0, 1].
        measure: ``"flops"`` (:func:`vitprune_fast.flops.plan_flops`) or ``"params"``
            (:func:`vitprune_fast.metrics.plan_params`).
        kinds: the kinds that get the ratio; the others stay whole.
        rules: the spec whose ``heads``, ``attn_mode`` and ``round_to`` the plans follow (its budget is ignored).
        iters: bisection steps (>= 1).

    Returns:
        ``(r, achieved)`` as for :func:`keep_for_flops`.
    """
    if measure not in _BUDGET_NAMES:
        raise PlanError(f"measure must be one of {tuple(_BUDGET_NAMES)}, got {measure!r}")
    target = _check_target(target, _BUDGET_NAMES[measure])
    kinds = _check_kinds(kinds)
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
        raise PlanError(f"iters must be an int >= 1, got {iters!r}")
    space = describe(model)
    _uniform_plan(space, kinds, 1.0, rules)  # bad heads / attn_mode raise here, before anything is counted
    dense = _dense(model, measure)
    cache: dict[tuple, float] = {}  # by the plan's widths and head counts: the channels do not change the cost

    def frac(r: float) -> float:
        plan = _uniform_plan(space, kinds, r, rules)
        key = (tuple(sorted(plan.kept_sizes(space).items())), tuple(sorted(plan.heads.items())))
        if key not in cache:  # neighbouring ratios of the bisection often round to the same widths
            cache[key] = _COST[measure](model, plan) / dense
        return cache[key]

    lo, hi = 1e-3, 1.0  # frac is non-decreasing in r; frac(lo) <= target <= frac(hi) from here on
    if frac(lo) > target:
        raise PlanError(f"{_BUDGET_NAMES[measure]} target {target} is below the smallest reachable fraction "
                        f"{frac(lo):.3f}")
    for _ in range(iters):
        mid = (lo + hi) / 2
        if frac(mid) > target:
            hi = mid
        else:
            lo = mid
    r = min((lo, hi), key=lambda x: abs(frac(x) - target))
    return r, frac(r)


def _uniform_plan(space: PruningSpace, kinds: tuple[str, ...], r: float, rules: PlanSpec | None) -> Plan:
    """The plan keeping ratio ``r`` of every group of ``kinds`` under ``rules``' head rules (dummy scores: the
    counts, not the channels, set FLOPs and parameters)."""
    zeros = {n: torch.zeros(g.size) for n, g in space.groups.items()}  # name -> [size]; any scores give the same
    return plan_from_scores(space, zeros, dataclasses.replace(rules or PlanSpec(), keep=dict.fromkeys(kinds, r),
                                                              flops=None, params=None, latency=None, target=None))


def _dense(model: nn.Module, measure: str) -> int:
    from .metrics import count_params

    return count_flops(model) if measure == "flops" else count_params(model)


def _plan_params(model: nn.Module, plan: Plan) -> int:
    from .metrics import plan_params

    return plan_params(model, plan)


_COST = {"flops": plan_flops, "params": _plan_params}


def uniform_fraction(model: nn.Module, r: float, measure: str = "flops", kinds: str | Iterable[str] = KINDS,
                     rules: PlanSpec | None = None) -> float:
    """The FLOPs or parameter fraction of ``model`` left by one keep ratio ``r`` for every group of ``kinds``
    (the fraction :func:`keep_for_budget` searches over)."""
    if measure not in _BUDGET_NAMES:
        raise PlanError(f"measure must be one of {tuple(_BUDGET_NAMES)}, got {measure!r}")
    plan = _uniform_plan(describe(model), _check_kinds(kinds), r, rules)
    return _COST[measure](model, plan) / _dense(model, measure)


def resolve_spec(model: nn.Module, spec: PlanSpec, kinds: str | Iterable[str] = KINDS) -> tuple[PlanSpec, list[str]]:
    """``spec`` with keep ratios: a FLOPs or parameter budget, or a target shape, turned into the ratios the
    ``allocation`` rule gives (``"uniform"``: one ratio for the groups of ``kinds`` in every block, the others whole,
    :func:`keep_for_budget`; a target: :func:`shape_plan_args`).

    Returns:
        ``(spec, notes)``: the spec with ``keep`` (and, for a target, ``heads``) set and its budget cleared, and
        lines for a person (the ratio found and the fraction it reaches; a target's depth difference).

    Raises:
        PlanError: an unreachable budget, a latency budget (it needs a global allocation), or a bad target.
    """
    spec = as_spec(spec)
    if spec.keep is not None:
        return spec, []
    cleared = dict(flops=None, params=None, latency=None, target=None)
    if spec.target is not None:
        keep, heads, notes = shape_plan_args(model, spec.target)
        return dataclasses.replace(spec, keep=keep, heads=heads, **cleared), notes
    if spec.latency is not None:
        raise PlanError("a latency budget needs a global allocation of widths; with allocation='uniform' give a "
                        "flops or params budget")
    measure, kinds = spec.budget, _check_kinds(kinds)
    r, achieved = keep_for_budget(model, getattr(spec, measure), measure, kinds, rules=spec)
    note = f"keep ratio {r:.4f} for {'/'.join(kinds)} reaches {100 * achieved:.1f} % {_BUDGET_NAMES[measure]}"
    return dataclasses.replace(spec, keep=dict.fromkeys(kinds, r), **cleared), [note]


def _stage_keys(model: nn.Module) -> dict[str, tuple[str, int]]:
    """Group name -> ``(kind, stage)``: one key for a stage's residual and one per kind for all its blocks."""
    keys = {}
    for st in adapter_for(model).stages():
        keys[st.residual] = ("residual", st.index)
        for b in st.blocks:
            keys[b.attn], keys[b.mlp] = ("attn", st.index), ("mlp", st.index)
    return keys


def shape_targets(model: nn.Module, target: str) -> tuple[dict[str, float], dict[str, int], list[str]]:
    """Keep ratios and head counts that give ``model`` the widths of the stock timm model ``target``.

    Widths come from the target's first block of each stage (embed_dim, num_heads, attention width, MLP hidden
    width); depth is not changed (a depth difference is returned as a note). The target is built on the meta
    device with timm's default arguments (shapes only, no memory, no weights).

    Args:
        model: a supported timm ViT/DeiT/Swin (not modified).
        target: a timm model name of the same architecture, no wider than ``model`` anywhere, whose head
            counts divide ``model``'s.

    Returns:
        ``(keep, heads, notes)``: group name -> keep ratio (target width / width; 1.0 where equal), attn group
        name -> head count of the target, and human-readable notes (e.g. a depth difference).

    Raises:
        PlanError: not a timm model name, another architecture, another number of stages, a wider target, or
            head counts that cannot be merged.
        UnsupportedModelError: a model the adapters cannot prune.
    """
    import timm

    if not isinstance(target, str) or not timm.is_model(target):
        raise PlanError(f"unknown target model {target!r} (expected a timm model name)")
    src = describe(model)
    try:
        ref = create_on_meta(target)  # shapes only, no memory
    except Exception as e:  # timm raises many types for models it cannot build this way
        raise PlanError(f"cannot build target {target}: {type(e).__name__}: {e}") from e
    tgt = describe(ref)
    if src.arch != tgt.arch:
        raise PlanError(f"target {target} is a {tgt.arch} model; the model to prune is {src.arch}")
    src_keys, tgt_keys = _stage_keys(model), _stage_keys(ref)
    by_key = {}  # (kind, stage) -> the target's group in the first block of that stage
    for name, g in tgt.groups.items():
        if name in tgt_keys:  # groups outside the stages (an attention pool's) follow their stage's plan
            by_key.setdefault(tgt_keys[name], g)
    missing = sorted(by_key[k].name for k in set(by_key) - set(src_keys.values()))
    if missing:  # the target has stages the model lacks: matching the first ones only would be a silent guess
        raise PlanError(f"target {target} has groups {missing[:3]} with no counterpart in the model "
                        "(different number of stages)")
    keep, heads, notes = {}, {}, []
    for name, g in src.groups.items():
        if name not in src_keys:
            continue
        t = by_key.get(src_keys[name])
        if t is None:
            raise PlanError(f"target {target} has no counterpart of group {name} (different number of stages)")
        if t.size > g.size:
            raise PlanError(f"cannot prune to {target}: {name} would grow from {g.size} to {t.size} channels")
        if g.tied_to is not None:  # follows its residual's count (make_plan plans it with that group)
            continue
        keep[name] = t.size / g.size
        if g.kind == "attn":
            if g.num_heads % t.num_heads:
                raise PlanError(f"cannot prune to {target}: {name} has {g.num_heads} heads, which cannot be merged "
                                f"into {t.num_heads}")
            heads[name] = t.num_heads
    n_src = sum(g.kind == "mlp" for g in src.groups.values())  # one mlp group per block
    n_tgt = sum(g.kind == "mlp" for g in tgt.groups.values())
    if n_src != n_tgt:
        notes.append(f"depth differs ({n_src} blocks here, {n_tgt} in {target}): only widths are matched")
    return keep, heads, notes


def shape_plan_args(model: nn.Module, target: str) -> tuple[dict[str, float], dict[str, int | None] | None, list[str]]:
    """The ``keep`` and ``heads`` arguments of ``make_plan`` (or ``upvits_select``) that give ``model`` the widths
    of the stock timm model ``target`` (see :func:`shape_targets`).

    Returns:
        ``(keep, heads, notes)``: ``heads`` maps every attention group to its merged head count (None where the
        target has as many heads: every head keeps the same number of dims), or is None when no head is merged.
    """
    keep, heads, notes = shape_targets(model, target)
    space = describe(model)
    merge = {n: h for n, h in heads.items() if h != space.groups[n].num_heads}  # attn name -> fewer heads
    return keep, ({n: merge.get(n) for n in heads} if merge else None), notes


def plan_for_shape(model: nn.Module, target: str,
                   scores: Mapping[str, torch.Tensor] | None) -> tuple[Plan, list[str]]:
    """A Plan giving ``model`` the widths of the stock timm model ``target`` (see :func:`shape_targets`).

    Where the target has fewer heads, heads are merged by the UP-ViTs rule (``make_plan``'s ``heads``); where it
    has as many, every head keeps the same number of dims. For the screened UP-ViTs selection, pass
    :func:`shape_plan_args` to :func:`~vitprune_fast.upvits_select` instead.

    Args:
        model: a supported timm ViT/DeiT/Swin (not modified; prune it with ``prune_(model, plan)``).
        target: a timm model name (see :func:`shape_targets`).
        scores: group name -> ``[group.size]`` scores for every group that narrows.

    Returns:
        ``(plan, notes)``, notes as from :func:`shape_targets`.

    Raises:
        PlanError: as :func:`shape_targets`, or missing / misshapen scores.
    """
    keep, heads, notes = shape_plan_args(model, target)
    return plan_with_heads(describe(model), scores, keep, heads), notes
