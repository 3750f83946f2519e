"""Screened UP-ViTs selection: the exact engine's Plan, scoring exactly only the candidates that can change it.

The Plan of UP-ViTs depends on the scores only through rankings (:func:`vitprune_fast.plan.selections`): which
items of each ranking stay. So instead of scoring all ~47k candidates of a DeiT-B exactly:

1. **Screen** every attention dim and MLP unit with the second-order term of the same KL
   (:mod:`.second_order`, a few backward passes per image). Residual channels and block units are few: they are
   scored exactly.
2. **Calibrate**: score exactly a sample of every group's candidates (3/4 the nearest to their ranking's cut, the rest
   at random) and take the group's band half-width ``w`` (in log-score) as ``safety`` x the largest screen error
   near a cut (``|log(estimate / exact)|`` of candidates within a factor e of it), at least ``min_width``: from
   the group's own errors once it has ``OWN_ERRORS`` of them (the screen is less accurate in early blocks), else
   from every group of its kind.
3. **Band**: with the best scores known (exact where scored, else the estimate), find each ranking's cut ``t``
   (the geometric mean of the last kept and the first removed item) and score exactly every item whose estimate is
   within ``w`` of it: ``|log(estimate / t)| <= w``. Repeat until no unscored item is that close (the cut moves as
   exact scores arrive); a scored candidate whose screen error exceeds ``w / safety`` widens the band first.
4. **Audit**: score exactly a random sample of the remaining candidates, drawn toward the band's edges. A flip
   (exact score on the other side of the cut from the estimate) or an error beyond the band widens that group's
   ``w`` to ``safety`` x the largest error seen and goes back to 3.

Every unscored item then lies further than ``w`` from its cut while its estimate errs by less, so the Plan is the
one all-exact scores give, up to items tied with the cut. :func:`upvits_select` returns it with a report of what was
scored; with ``checkpoint=`` every screen and exact evaluation is saved and a rerun resumes, and under
torch.distributed the screen's image chunks and every exact evaluation are sharded over the ranks.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import nn

from ..allocate import allocation_summary
from ..arch import adapter_for
from ..distributed import dist_info, gather_objects
from ..errors import ConfigError, PlanError
from ..kernels.utils import HAS_TRITON
from ..norms import group_norms
from ..plan import Plan, PlanSpec, Selection, as_spec, plan_from_scores, selections
from ..progress import stage
from ..space import Group
from .objective import objective_for
from .second_order import second_order_screen
from .store import ScoreStore, fingerprint
from .upvits import FastEngine, _auto_rows, _chunks, _Work, fitted_objective

_TINY = 1e-300  # floor under scores before taking logs (exact KLs can round to 0 or below)
NEAR = math.log(1.1)  # "near the cut": within +-10 %, where the report's screen-error quantiles are taken
OWN_ERRORS = 8  # a group's band width comes from its own screen errors once it has this many near its cut
MAX_ALLOCATIONS = 8  # a global allocation redone with the band's exact scores at most this many times


class _Exact:
    """Exact scores of chosen candidates, summed over the image chunks: cached, resumable, sharded over ranks."""

    def __init__(self, engine: FastEngine, chunks: list[torch.Tensor], store: ScoreStore | None, bar=None):
        self.engine, self.chunks, self.store, self.bar = engine, chunks, store, bar  # bar: the current stage's
        self.values: dict[str, torch.Tensor] = {}  # group -> [size] float64, NaN where not scored
        self.count = 0

    def known(self, g: Group) -> torch.Tensor:
        return self.values.setdefault(g.name, torch.full((g.size,), math.nan, dtype=torch.float64))

    def evaluate(self, g: Group, cands: torch.Tensor, tag: str) -> None:
        """Score ``cands`` of ``g`` exactly (those not scored yet)."""
        vals = self.known(g)
        cands = cands[vals[cands].isnan()].sort().values
        if not len(cands):
            return
        key = f"exact.{tag}.{g.name}"
        if self.store is not None and self.store.has(key):
            got = self.store.load_tensors(key)
        else:
            rank, world = dist_info()
            mine = cands[rank::world]
            work = _Work(g.name, g.kind, g.size)
            part = torch.zeros(len(mine), dtype=torch.float64)
            for i, x in enumerate(self.chunks):  # a fixed chunk order: the same sums however it is sharded
                part += self.engine.score_candidates(work, mine, x, i).detach().double().cpu()
            pieces = gather_objects((mine, part))
            got = {"idx": torch.cat([p[0] for p in pieces]), "val": torch.cat([p[1] for p in pieces])}
            if self.store is not None and rank == 0:
                self.store.save_tensors(key, got)
        vals[got["idx"]] = got["val"]
        self.count += len(cands)
        self.bar.update(len(cands))


def _screen(model: nn.Module, groups: list[Group], chunks: list[torch.Tensor], store: ScoreStore | None,
            screen_batch: int, eps: float, max_rank: int | None, bar, objective=None) -> dict[str, torch.Tensor]:
    """Second-order estimates of ``groups``, summed over every image (chunks sharded over ranks); ``bar`` counts
    this rank's images."""
    rank, world = dist_info()
    parts = {}
    for i, x in enumerate(chunks):
        if i % world != rank:
            continue
        key = f"screen.{i:05d}"
        if store is not None and store.has(key):
            parts[i] = store.load_tensors(key)
            bar.update(len(x))
            continue
        est = {g.name: torch.zeros(g.size, dtype=torch.float64) for g in groups}
        for sub in x.split(screen_batch):
            for name, v in second_order_screen(model, sub, groups, eps=eps, max_rank=max_rank,
                                                 objective=objective).items():
                est[name] += v.detach().double().cpu()
            bar.update(len(sub))
        parts[i] = est
        if store is not None:
            store.save_tensors(key, est)
    merged = {k: v for part in gather_objects(parts) for k, v in part.items()}
    return {g.name: sum((merged[i][g.name] for i in range(len(chunks))), torch.zeros(g.size, dtype=torch.float64))
            for g in groups}


def _cut(sel: Selection, scores: torch.Tensor, edge: bool = False) -> float | None:
    """The ranking's cut: the geometric mean of the last kept and the first removed item score (None: all kept; with
    ``edge``, a ranking that keeps everything has its cut at its lowest item, the next one a global allocation
    could remove)."""
    if sel.keep >= len(sel.items):
        return max(float(scores[sel.items].sum(1).min()), _TINY) if edge else None
    items = scores[sel.items].sum(1)
    order = torch.argsort(-items, stable=True)
    a, b = (max(float(items[order[i]]), _TINY) for i in (sel.keep - 1, sel.keep))
    return math.sqrt(a * b)


def _log_dist(x: torch.Tensor, tau: float) -> torch.Tensor:
    return (x.clamp_min(_TINY) / tau).log().abs()


class _State:
    """The selection's rankings, the screen and the exact scores known so far."""

    def __init__(self, space, sels: list[Selection], estimates: dict[str, torch.Tensor], exact: _Exact,
                 edges: bool = False):
        self.space, self.sels, self.est, self.exact, self.edges = space, sels, estimates, exact, edges

    def best(self, name: str) -> torch.Tensor:
        """Exact scores where known, estimates elsewhere."""
        known = self.exact.known(self.space.groups[name])
        est = self.est.get(name)
        return known if est is None else torch.where(known.isnan(), est, known)

    def near_cut(self, width: Mapping[str, float]) -> dict[str, torch.Tensor]:
        """Per screened group, the unscored candidates of items within ``width`` of their cut."""
        out = {}
        for sel in self.sels:
            if sel.group not in self.est:
                continue
            best = self.best(sel.group)
            tau = _cut(sel, best, self.edges)
            if tau is None:
                continue
            unknown = self.exact.known(self.space.groups[sel.group])[sel.items].isnan()  # [items, size]
            close = _log_dist(best[sel.items].sum(1), tau) <= width[sel.group]
            cands = sel.items[close[:, None] & unknown]
            if len(cands):
                out[sel.group] = torch.cat([out.get(sel.group, cands[:0]), cands])
        return out

    def cut_distance(self) -> dict[str, torch.Tensor]:
        """Per screened group and channel, ``|log(best item score / cut)|`` of its item (inf: nothing decided)."""
        out = {}
        for sel in self.sels:
            if sel.group not in self.est:
                continue
            dist = out.setdefault(sel.group, torch.full((self.space.groups[sel.group].size,), math.inf,
                                                        dtype=torch.float64))
            best = self.best(sel.group)
            tau = _cut(sel, best, self.edges)
            if tau is not None:
                dist[sel.items] = _log_dist(best[sel.items].sum(1), tau)[:, None].expand_as(sel.items)
        return out

    def errors(self, names: list[str], near: float | None = None,
               dist: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``|log(estimate / exact)|`` of the scored candidates of groups ``names`` (within ``near`` of their cut;
        ``dist``: :meth:`cut_distance`, when the caller has it for the current scores)."""
        if near is not None and dist is None:
            dist = self.cut_distance()
        out = [torch.zeros(0, dtype=torch.float64)]
        for name in names:
            est, ex = self.est[name], self.exact.known(self.space.groups[name])
            ok = ~ex.isnan()
            if near is not None:
                ok &= dist[name] <= near
            out.append((est[ok].clamp_min(_TINY) / ex[ok].clamp_min(_TINY)).log().abs())
        return torch.cat(out)


def upvits_select(
        model: nn.Module,
        images,
        spec: PlanSpec | float | Mapping[str, float] | None = None,
        *,
        batch_size: int = 64,
        max_rows: int | None = None,
        checkpoint: str | None = None,
        progress: bool = True,
        autocast_dtype: torch.dtype | None = None,
        use_kernels: bool | None = None,
        calibration: int = 16,
        audit: int = 64,
        safety: float = 2.0,
        min_width: float = 0.02,
        eps: float = 1e-3,
        max_rank: int | None = None,
        screen_batch: int = 8,
        seed: int = 0,
        cost_model=None,
        latency_model=None,
        objective=None,
) -> tuple[Plan, dict]:
    """The UP-ViTs Plan (``make_plan`` of the exact KL scores) for a small share of the exact engine's cost.

    Args:
        model: a supported model (eval mode inside; not modified).
        images: proxy images, as for :func:`~vitprune_fast.upvits_scores`.
        spec: the plan (:class:`~vitprune_fast.PlanSpec`; a ratio or a dict of ratios is ``PlanSpec(keep=...)``):
            keep ratios, heads, attn_mode and round_to exactly as for :func:`~vitprune_fast.make_plan`; a FLOPs or
            parameter budget or a target shape is turned into ratios first
            (:func:`~vitprune_fast.targets.resolve_spec`, the uniform rule).
        batch_size, max_rows, autocast_dtype, use_kernels: the exact engine's settings (see ``upvits_scores``).
        checkpoint: directory for resumable results (every screen chunk and exact evaluation; a different job is
            refused).
        progress: ``True``: a bar per stage (exact residual, screen, calibration, band and audit rounds), each with
            its own count and ETA; ``"lines"``: one line per stage on stderr; ``False``: nothing; a callable
            ``(stage, done, total)``: events (:mod:`vitprune_fast.progress`).
        calibration: candidates per screened group scored exactly up front to size its band.
        audit: candidates per kind (attn, mlp) and audit round scored exactly outside the band.
        safety: the band is this many times wider than the largest screen error seen near a cut.
        min_width: the narrowest band half-width in log-score (0.02: +-2 %).
        eps, max_rank: the screen's Fisher factorisation (:func:`.second_order.fisher_cotangents`).
        screen_batch: images per screen pass (memory: the pass keeps every block's activations and gradients).
        seed: the calibration and audit draws.
        cost_model, latency_model: a global allocation's cost model (:func:`vitprune_fast.allocate.allocate`; a
            :class:`~vitprune_fast.cost.CostModel` is built for a FLOPs or parameter budget when None).
        objective: what the scores measure, as for :func:`~vitprune_fast.upvits_scores` (None: KL for a
            classifier, the features objective for a model without one); the screen factors its second-order term.

    With ``spec.allocation == "global"`` the rankings are the global allocation's: it runs on the screen (and the
    exact residual scores), the band is scored around every group's cut (a group kept whole: around its lowest item,
    the next a reallocation could take), and the allocation is redone with the scores found until its counts stand
    (at most ``MAX_ALLOCATIONS`` times); the items that decide it are those at the groups' cuts, which the band
    scores exactly.

    Returns:
        ``(plan, report)``: the Plan, and a JSON-able dict: per group the candidates, how many were scored exactly
        (by calibration, band and audit), audit flips and the screen's error quantiles near the cut; the band
        widths, rounds, the share of candidates scored exactly, the seconds of every stage, the plan's arguments
        (``plan``: keep, heads, attn_mode, round_to) and ``notes`` (how a budget became ratios).
    """
    from ..targets import resolve_spec

    t_start = time.perf_counter()
    adapter = adapter_for(model)
    space = adapter.describe()
    spec = as_spec(spec)
    global_ = spec.allocation == "global"
    if global_:  # every group may narrow; the rankings follow the allocation (computed once the screen is in)
        if spec.budget not in ("flops", "params", "latency"):
            raise PlanError(f"a global allocation needs a flops, params or latency budget, got {spec.budget}")
        notes, sels = [], []
        deciding = list(space.groups)
        if spec.budget == "latency":
            if latency_model is None:
                raise PlanError("a latency budget needs a LatencyModel of the model (vitprune_fast.latency)")
            cost_models = {"latency_model": latency_model}
        else:
            from ..cost import CostModel

            cost_models = {"cost_model": cost_model or CostModel(model, spec.budget)}
    else:
        spec, notes = resolve_spec(model, spec)
        sels = selections(space, spec)
        deciding = sorted({s.group for s in sels if s.keep < len(s.items)}, key=list(space.groups).index)
    if safety < 1 or min_width <= 0 or calibration < 0 or audit < 0:
        raise ConfigError("safety must be >= 1, min_width > 0, calibration and audit >= 0")
    chunks = _chunks(images, batch_size, model)
    in_blocks = ({b.mlp for b in adapter.blocks() if not b.post_norm}
                 | {b.attn for b in adapter.blocks() if b.taps is None and not b.qkv_functional and not b.post_norm
                    and _fused_qkv(model, b, space.groups[b.attn])})
    screened = [space.groups[n] for n in deciding if _screenable(model, space.groups[n], in_blocks)]
    exact_only = [space.groups[n] for n in deciding if not _screenable(model, space.groups[n], in_blocks)]
    kernels = chunks[0].is_cuda and HAS_TRITON if use_kernels is None else bool(use_kernels)
    amp = (torch.autocast(chunks[0].device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    if objective_for(objective, adapter.classifier_weights()).name == "tokens":  # before any forward
        raise ConfigError("the screened engine's second-order screen takes the pooled output; score the final tokens "
                          "with the exact engines (upvits_scores, engine='fast' or 'reference')")
    obj = fitted_objective(model, chunks, objective, amp)
    settings = {"selected": "screened", "plan": [spec.keep, spec.heads, spec.attn_mode, spec.round_to]
                + ([spec.to_dict()] if global_ else []),
                "dtype": str(autocast_dtype), "kernels": kernels, "screen": [eps, max_rank, screen_batch],
                "draws": [calibration, audit, seed], "band": [safety, min_width]} | obj.settings()
    store = None
    if checkpoint is not None:
        store = ScoreStore(checkpoint, fingerprint(model, chunks, {"settings": repr(settings)}),
                           {"model": type(model).__name__, "images": sum(len(c) for c in chunks)})
    gen = torch.Generator().manual_seed(seed)
    seconds = {}
    was_training = model.training
    model.eval()
    total = sum(g.size for g in space.groups.values() if g.name in deciding)
    rank, world = dist_info()
    n_images = sum(len(c) for i, c in enumerate(chunks) if i % world == rank)  # this rank's share of the screen
    current = []  # the open stage

    def enter(name: str, work: int | None, unit: str = "cand"):
        """Close the stage in progress and open the next: its own bar (and ETA), or one line under "lines"."""
        if current:
            current.pop().close()
        current.append(stage(progress, "UP-ViTs screened", name, work, unit))
        exact.bar = current[0]
        return current[0]

    try:
        with torch.no_grad(), amp, adapter_for(model).scoring_context():
            engine = FastEngine(model, space, max_rows or _auto_rows(model, chunks[0]), kernels, obj)
            exact = _Exact(engine, chunks, store)
            t0 = time.perf_counter()
            enter("exact residual", sum(g.size for g in exact_only))
            for g in exact_only:  # residual channels: few, and their change reaches every LayerNorm
                exact.evaluate(g, torch.arange(g.size), "all")
            seconds["exact_residual"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        bar = enter("screen", n_images * bool(screened), "img")
        with adapter_for(model).scoring_context():
            estimates = _screen(model, screened, chunks, store, screen_batch, eps, max_rank, bar,
                                obj) if screened else {}
        seconds["screen"] = time.perf_counter() - t0
        with torch.no_grad(), amp, adapter_for(model).scoring_context():
            state = _State(space, sels, estimates, exact, edges=global_)
            allocations = []
            if global_:  # the first allocation, by the screen: its rankings decide what calibration looks at
                state.sels, allocation = _allocation_sels(model, space, state, spec, cost_models, allocations)
            stats = {g.name: {"calibration": 0, "band": 0, "audit": 0, "flips": 0} for g in screened}
            t0 = time.perf_counter()
            enter("calibration", sum(min(calibration, g.size) for g in screened))
            width = _calibrate(state, screened, calibration, safety, min_width, gen, stats)
            seconds["calibration"] = time.perf_counter() - t0
            rounds = audits = 0
            while True:  # a global allocation is redone with the scores the band found, until it stands
                r, a = _band_and_audit(state, screened, width, audit, safety, gen, stats, seconds, enter, audits)
                rounds, audits = rounds + r, a
                if not global_:
                    break
                previous = [(s.group, s.keep, s.heads) for s in state.sels]
                state.sels, allocation = _allocation_sels(model, space, state, spec, cost_models, allocations)
                if [(s.group, s.keep, s.heads) for s in state.sels] == previous or len(allocations) >= MAX_ALLOCATIONS:
                    break
    finally:
        if current:
            current.pop().close()
        model.train(was_training)
    scores = {n: state.best(n) for n in deciding}
    plan = plan_from_scores(space, scores, spec) if not global_ else allocation[0]
    seconds["total"] = time.perf_counter() - t_start
    report = _report(space, state, screened, exact_only, stats, width, rounds, audits, seconds, exact.count, total)
    report["plan"] = {"keep": spec.keep, "heads": spec.heads, "attn_mode": spec.attn_mode, "round_to": spec.round_to}
    if global_:  # the rankings the final allocation made (the tie rule of selection_differences reads them)
        report["plan"]["keep"] = _kept_ratios(space, plan)
        report["allocation"] = {**allocation[1], "allocations": len(allocations)}
        notes = [allocation_summary(allocation[1])]
    report["notes"] = notes
    return plan, report


def _allocation_sels(model, space, state: _State, spec: PlanSpec, cost_models: dict, log: list
                     ) -> tuple[list[Selection], tuple[Plan, dict]]:
    """Allocate by the best scores known; the rankings of that allocation, every group included (kept whole or not)."""
    from ..allocate import allocate

    plan, rep = allocate(model, {n: state.best(n) for n in space.groups}, spec, **cost_models)
    log.append(rep["kept"])
    ratios = {n: 1.0 for n in space.groups if space.groups[n].tied_to is None} | _kept_ratios(space, plan)
    sels = selections(space, replace(spec, keep=ratios, flops=None, params=None, latency=None, allocation="uniform",
                                     min_keep=0.0, round_to=1))
    ranked = {s.group for s in sels}
    for g in space.groups.values():  # groups kept whole: a ranking that keeps everything (its lowest item is an edge)
        if g.name not in ranked and g.tied_to is None and g.name in state.est:
            sels.append(Selection(g.name, torch.arange(g.size)[:, None], g.size))
    return sels, (plan, rep)


def _kept_ratios(space, plan: Plan) -> dict[str, float]:
    """The keep ratio of every group ``plan`` narrows (the ``keep`` that makes those counts by the plan rules)."""
    out = {}
    for name, kept in plan.keep.items():
        g = space.groups[name]
        if g.tied_to is None:
            out[name] = len(kept) / g.size
    return out


def selection_differences(space, scores: Mapping[str, torch.Tensor], a: Plan, b: Plan,
                          spec: PlanSpec | float | Mapping[str, float] | None = None, rtol: float = 1e-6) -> list[str]:
    """Where plans ``a`` and ``b`` (both made for ``spec``, with keep ratios) select differently, beyond ties at the
    cut.

    "The same selection" as UP-ViTs defines it at fixed numerics: every item of every ranking is kept by both plans
    or by neither, except items whose ``scores`` (the exact ones) lie within a relative ``rtol`` of the ranking's
    cut (the score of its last kept item), which may go either way.

    Returns:
        One line per difference (empty: the same selection).
    """
    out = []
    if a.heads != b.heads or a.keep.keys() != b.keep.keys():
        out.append(f"heads {a.heads} vs {b.heads}, narrowed groups {sorted(a.keep)} vs {sorted(b.keep)}")
        return out
    for sel in selections(space, as_spec(spec)):
        s = torch.as_tensor(scores[sel.group]).double()[sel.items].sum(1)  # [items]
        kept = [torch.isin(sel.items, p.keep[sel.group]).all(1) for p in (a, b)]
        differ = (kept[0] != kept[1]).nonzero().flatten()
        if not len(differ):
            continue
        tau = float(s[torch.argsort(-s, stable=True)[sel.keep - 1]])
        loose = [int(i) for i in differ if abs(float(s[i]) - tau) > rtol * abs(tau)]
        if loose:
            out.append(f"{sel.group}: items {loose[:8]} (scores {[float(s[i]) for i in loose[:8]]}, cut {tau})")
    return out


def _calibrate(state: _State, screened: list[Group], n: int, safety: float, min_width: float, gen,
               stats: dict) -> dict[str, float]:
    """Score ``n`` candidates of every group exactly (3/4 the nearest to a cut, the rest at random); the widths."""
    dist = state.cut_distance()
    for g in screened:
        take = min(n, g.size)
        nearest = torch.argsort(dist[g.name], stable=True)[: take * 3 // 4]
        rest = torch.ones(g.size, dtype=torch.bool)
        rest[nearest] = False
        others = rest.nonzero().flatten()
        pick = torch.cat([nearest, others[torch.randperm(len(others), generator=gen)[: take - len(nearest)]]])
        before = state.exact.count
        state.exact.evaluate(g, pick, "calibration")
        stats[g.name]["calibration"] += state.exact.count - before
    dist = state.cut_distance()
    return {g.name: _width(state, g, screened, safety, min_width, dist) for g in screened}


def _width(state: _State, g: Group, screened: list[Group], safety: float, floor: float,
           dist: dict[str, torch.Tensor]) -> float:
    """``safety`` x the largest screen error within a factor e of a cut (``dist``: ``state.cut_distance()``): the
    group's own once it has ``OWN_ERRORS`` such errors (screen errors differ between blocks), else those of every
    group of its kind."""
    err = state.errors([g.name], near=1.0, dist=dist)
    if len(err) < OWN_ERRORS:
        kind = [h.name for h in screened if h.kind == g.kind]
        err = state.errors(kind, near=1.0, dist=dist)
        if not len(err):
            err = state.errors(kind)
    worst = float(err.max()) if len(err) else 0.0
    return max(floor, safety * worst)


def _band_and_audit(state: _State, screened: list[Group], width: dict[str, float], audit: int, safety: float, gen,
                    stats: dict, seconds: dict, enter, audits: int = 0) -> tuple[int, int]:
    """Score the band exactly until it is stable, audit outside it; widen and repeat on a flip. (band rounds, audit
    rounds so far, counting from ``audits``).

    ``enter(name, work)`` opens each band and audit pass's progress stage."""
    groups = {g.name: g for g in screened}
    rounds = 0
    seconds.setdefault("band", 0.0)
    seconds.setdefault("audit", 0.0)
    while True:
        t0 = time.perf_counter()
        bar = enter(f"band {audits + 1}", None)  # how much it scores is known only as it goes
        while True:  # the band: score what is close to a cut; the cuts move as exact scores arrive
            todo = state.near_cut(width)
            if not todo:
                break
            rounds += 1
            bar.set_postfix_str(f"round {rounds}: {sum(len(c) for c in todo.values())} near a cut", refresh=True)
            for name, cands in todo.items():
                before = state.exact.count
                state.exact.evaluate(groups[name], cands, f"band{rounds}")
                stats[name]["band"] += state.exact.count - before
            dist = state.cut_distance()
            for g in screened:  # scored candidates erring beyond the band's premise widen it
                width[g.name] = _width(state, g, screened, safety, width[g.name], dist)
        seconds["band"] += time.perf_counter() - t0
        if audit == 0:
            return rounds, audits
        t0 = time.perf_counter()
        audits += 1
        enter(f"audit {audits}", audit * len({g.kind for g in screened}))
        flipped = _audit(state, groups, width, audit, gen, stats, audits)
        seconds["audit"] += time.perf_counter() - t0
        widened = False
        dist = state.cut_distance()
        for g in screened:
            new = max(_width(state, g, screened, safety, width[g.name], dist),
                      safety * flipped.get(g.name, 0.0))
            widened |= new > width[g.name]
            width[g.name] = new
        if not widened:
            return rounds, audits


def _audit(state: _State, groups: dict[str, Group], width: dict[str, float], n: int, gen, stats: dict,
           number: int) -> dict[str, float]:
    """Score ``n`` candidates per kind outside the band exactly, drawn toward its edges; per group the largest
    screen error among the items that flipped to the other side of their cut (absent: no flip)."""
    flipped: dict[str, float] = {}
    dist = state.cut_distance()
    for kind in ("attn", "mlp"):
        pool = [(name, c) for name, g in groups.items() if g.kind == kind
                for c in (state.exact.known(g).isnan() & dist[name].isfinite()).nonzero().flatten().tolist()]
        if not pool:
            continue
        d = torch.tensor([float(dist[name][c]) / width[name] for name, c in pool], dtype=torch.float64)
        weight = torch.exp(-(d - 1).clamp_min(0))  # toward the band's edges: e^-1 at twice the width
        chosen: dict[str, list[int]] = {}
        for i in torch.multinomial(weight, min(n, len(pool)), replacement=False, generator=gen).tolist():
            chosen.setdefault(pool[i][0], []).append(pool[i][1])
        sides = []  # (selection, item, cut, estimated side) of every item holding a drawn candidate
        for sel in state.sels:
            tau = _cut(sel, state.best(sel.group), state.edges) if sel.group in chosen else None
            if tau is None:
                continue
            items = state.best(sel.group)[sel.items].sum(1)
            hit = torch.isin(sel.items, torch.tensor(chosen[sel.group])).any(1)
            sides += [(sel, j, tau, bool(items[j] > tau)) for j in hit.nonzero().flatten().tolist()]
        for name, cands in chosen.items():
            before = state.exact.count
            state.exact.evaluate(groups[name], torch.tensor(cands), f"audit{number}")
            stats[name]["audit"] += state.exact.count - before
        for sel, j, tau, above in sides:
            best = state.best(sel.group)
            if bool(best[sel.items[j]].sum() > tau) != above:
                stats[sel.group]["flips"] += 1
                est = state.est[sel.group][sel.items[j]].sum().clamp_min(_TINY)
                err = float((est / best[sel.items[j]].sum().clamp_min(_TINY)).log().abs())
                flipped[sel.group] = max(flipped.get(sel.group, 0.0), err)
    return flipped


def _fused_qkv(model: nn.Module, ref, group: Group) -> bool:
    """Whether block ``ref``'s ``qkv`` Linear makes q, k and v together (the screen recomputes the heads from its
    output; transformers' separate query / key / value Linears do not)."""
    return model.get_submodule(ref.qkv).weight.shape[0] == 3 * group.size


def _screenable(model: nn.Module, group, in_blocks: set[str]) -> bool:
    """The screen models an attention dim / MLP unit of a plain block; a norm over the group's channels (scale-norm,
    MLP sub-norm), per-head q/k norms (whole heads only), a width tied to the residual, q / k / v without a called
    fused qkv Linear (EVA, transformers) or a group outside the blocks (an attention pool's) make its local change
    something else: scored exactly."""
    return (group.name in in_blocks and not group.whole_heads and group.tied_to is None
            and not group_norms(model, group))


def _report(space, state: _State, screened, exact_only, stats, width, rounds, audits, seconds, count, total) -> dict:
    groups = {}
    dist = state.cut_distance()
    for g in screened:
        err = state.errors([g.name], near=NEAR, dist=dist)
        q = {f"p{p}": float(err.quantile(p / 100)) if len(err) else None for p in (50, 99, 99.9)}
        groups[g.name] = {"kind": g.kind, "candidates": g.size,
                          "scored_exactly": int((~state.exact.known(g).isnan()).sum()), **stats[g.name],
                          "near_cut_scored": len(err), "screen_log_error_near_cut": q}
    for g in exact_only:
        groups[g.name] = {"kind": g.kind, "candidates": g.size, "scored_exactly": g.size}
    return {"groups": groups, "band_half_width": dict(width), "band_rounds": rounds, "audit_rounds": audits,
            "flips": sum(s["flips"] for s in stats.values()), "scored_exactly": count, "candidates": total,
            "share_scored_exactly": count / max(total, 1), "seconds": seconds}


def screened_summary(report: dict) -> str:
    """One line for a report of :func:`upvits_select`."""
    widths = report["band_half_width"].values()
    band = (f"band +-{100 * math.expm1(min(widths)):.0f}..{100 * math.expm1(max(widths)):.0f} % of each cut"
            if widths else "no screened group")
    return (f"screened UP-ViTs: {report['scored_exactly']:,} of {report['candidates']:,} candidates scored exactly "
            f"({100 * report['share_scored_exactly']:.1f} %), {band}, {report['flips']} audit flips, "
            f"{report['seconds']['total']:.1f} s")


__all__ = ["screened_summary", "selection_differences", "upvits_select"]
