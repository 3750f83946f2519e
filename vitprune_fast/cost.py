"""Exact FLOPs and parameter counts of any channel plan, as polynomials in the groups' kept counts.

A pruned tensor's size along each dim is its dense size minus what the groups that slice that dim remove
(``repeats`` entries per removed channel; a per-head dim follows the head count), so

- **parameters** = sum over parameter tensors of the product of their sizes;
- **FLOPs** (``torch.utils.flop_counter`` units, 2 per multiply-add, one image) = sum over modules of their own
  FLOPs, measured once on the dense model, scaled by how they shrink: a Linear's or convolution's FLOPs are
  ``2 x positions x weight entries`` (scaled by its weight's kept size), an attention's token-mixing matmuls
  (q k^T, attn v) are linear in its attention width (scaled by the attn group's kept count), anything else is not
  touched by channel pruning.

Both are exact for every plan ``prune_`` accepts (tested against ``FlopCounterMode`` and the parameter count of the
pruned model on every family in the catalogue). :class:`CostModel` evaluates them for kept counts without building
or pruning a model, which is what a global allocation of widths needs (thousands of evaluations).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .arch import adapter_for
from .errors import PlanError
from .plan import Plan
from .space import PruningSpace, tensor_of

MEASURES = ("flops", "params")


@dataclass(frozen=True)
class _Dim:
    """One dim of a tensor: ``size - sum(repeats * removed(group))``, or the head count of ``heads_of``."""

    size: int
    groups: tuple[tuple[str, int], ...] = ()
    heads_of: str | None = None


@dataclass(frozen=True)
class _OptionCosts:
    """What :meth:`CostModel.option_costs` returns: ``base``, the cost with every ladder at its first option (whole),
    and ``costs[name][i]``, the cost with group ``name`` at option ``i`` and the others whole."""

    base: float
    deltas: dict[str, list[float]]

    def __getitem__(self, name: str) -> list[float]:
        return [self.base + d for d in self.deltas[name]]


@dataclass(frozen=True)
class _Term:
    """``coef * prod(dim sizes) / prod(dense dim sizes)``: a tensor's entries, or a module's FLOPs."""

    coef: float
    dims: tuple[_Dim, ...]


class CostModel:
    """FLOPs or parameters of ``model`` after any channel plan, from the kept count of every group.

    Args:
        model: a supported model (not modified; FLOPs are measured once on a meta-device copy).
        measure: ``"flops"`` (one image at the model's input size) or ``"params"``.

    Attributes:
        dense: the cost of the unpruned model (an int).
        groups: group name -> the group (of ``describe(model)``).
    """

    def __init__(self, model: nn.Module, measure: str = "flops"):
        if measure not in MEASURES:
            raise PlanError(f"measure must be one of {MEASURES}, got {measure!r}")
        self.measure = measure
        self.space: PruningSpace = adapter_for(model).describe()
        self.groups = self.space.groups
        dims = self._tensor_dims(model)
        self.terms: list[_Term] = []
        if measure == "params":
            for name, p in model.named_parameters():
                self.terms.append(_Term(float(p.numel()), dims.get(name) or tuple(_Dim(s) for s in p.shape)))
        else:
            self._flop_terms(model, dims)
        self.dense = self.cost({})

    # ------------------------------------------------------------------------------------------------ building
    def _tensor_dims(self, model: nn.Module) -> dict[str, tuple[_Dim, ...]]:
        """Tensor name -> its dims with the groups that slice each."""
        per: dict[tuple[str, int], list[tuple[str, int]]] = {}
        heads: dict[tuple[str, int], str] = {}
        for g in self.groups.values():
            for sl in g.slices:
                if sl.per_head:
                    heads[(sl.name, sl.dim)] = g.name
                else:
                    per.setdefault((sl.name, sl.dim), []).append((g.name, sl.repeats))
        out = {}
        for name in {n for n, _ in per} | {n for n, _ in heads}:
            shape = tensor_of(model, name).shape
            out[name] = tuple(_Dim(s, tuple(per.get((name, d), ())), heads.get((name, d))) for d, s in enumerate(shape))
        return out

    def _flop_terms(self, model: nn.Module, dims: dict[str, tuple[_Dim, ...]]) -> None:
        """One term per (module, op) of the dense model's own FLOPs (``FlopCounterMode`` attributes an op to every
        module on the stack; a module's own share is what its nearest called descendants do not account for)."""
        from .flops import _count, _float_dtype, _strip_root, meta_copy

        c, h, w = adapter_for(model).input_size()
        counter = _count(meta_copy(model).eval(), torch.empty(1, c, h, w, device="meta", dtype=_float_dtype(model)))
        counts = {_strip_root(k): {str(op).split(".")[-1]: n for op, n in v.items()}
                  for k, v in counter.get_flop_counts().items() if k != "Global"}
        called = set(counts)
        parent = {p: max((q for q in called if q != p and (q == "" or p.startswith(f"{q}."))), key=len, default=None)
                  for p in called}
        own = {p: dict(ops) for p, ops in counts.items()}
        for p, q in parent.items():
            if q is not None:
                for op, n in counts[p].items():
                    own[q][op] -= n
        attn_of: dict[str, list[str]] = {}
        for g in self.groups.values():
            if g.kind == "attn":
                attn_of.setdefault(g.module, []).append(g.name)
        for path, ops in own.items():
            m = model.get_submodule(path)
            for op, n in ops.items():
                if n > 0:
                    self.terms += self._op_terms(model, path, m, op, n, dims, attn_of, called)

    def _op_terms(self, model, path, m, op, flops, dims, attn_of, called) -> list[_Term]:
        """How ``flops`` of op ``op`` done by module ``path`` itself scale with the plan."""
        linear_ops = ("addmm", "mm", "linear")
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and op in (*linear_ops, "convolution"):
            return [_Term(float(flops), dims.get(f"{path}.weight", ()))]
        if op in linear_ops:  # F.linear with a child Linear's weight (EVA / BEiT / Swin V2 q|k|v with separate biases)
            uncalled = [f"{path}.{n}" for n, c in m.named_children()
                        if isinstance(c, nn.Linear) and f"{path}.{n}" not in called]
            if uncalled:
                sizes = [model.get_submodule(u).weight.numel() for u in uncalled]
                return [_Term(flops * s / sum(sizes), dims.get(f"{u}.weight", ())) for u, s in zip(uncalled, sizes,
                                                                                                   strict=True)]
        if path in attn_of:  # token mixing (q k^T, attn v): linear in the attention width
            if len(attn_of[path]) > 1:
                raise PlanError(f"{path}: several attention groups in one module; its FLOPs cannot be split")
            g = self.groups[attn_of[path][0]]
            return [_Term(float(flops), (_Dim(g.size, ((g.name, 1),)),))]
        if any(dims.get(f"{path}.{n}") for n, _ in m.named_parameters(recurse=False)):
            raise PlanError(f"{path}: {type(m).__name__} does its own {op} FLOPs on sliced tensors; no cost rule")
        return [_Term(float(flops), ())]  # untouched by channel pruning

    # ------------------------------------------------------------------------------------------------ evaluation
    def cost(self, kept: Mapping[str, int], heads: Mapping[str, int] | None = None) -> int:
        """The cost after keeping ``kept[g]`` channels of each named group (others whole) and ``heads[g]`` heads of
        each named attention group (others: their count, or ``kept / head_dim`` for whole-head groups).

        Returns:
            FLOPs or parameters, rounded to the nearest integer (the measurements are integers; the scaling is
            exact up to float rounding).
        """
        removed = {n: self.groups[n].size - int(k) for n, k in kept.items()}
        n_heads = {n: self.heads_of(n, kept, heads) for n, g in self.groups.items() if g.kind == "attn"}
        total = 0.0
        for t in self.terms:
            f = t.coef
            for d in t.dims:
                if d.heads_of is not None:
                    f *= n_heads[d.heads_of] / self.groups[d.heads_of].num_heads
                elif d.groups:
                    f *= (d.size - sum(r * removed.get(g, 0) for g, r in d.groups)) / d.size
            total += f
        return int(round(total))

    def heads_of(self, name: str, kept: Mapping[str, int], heads: Mapping[str, int] | None = None) -> int:
        """The head count attention group ``name`` has for ``kept`` / ``heads``."""
        g = self.groups[name]
        if heads and name in heads:
            return int(heads[name])
        if g.whole_heads and name in kept:
            return int(kept[name]) // g.head_dim
        return g.num_heads

    def linearize(self, fixed: Mapping[str, int], fixed_heads: Mapping[str, int] | None = None
                  ) -> tuple[float, dict[str, float], dict[str, float]]:
        """The cost as an affine function of the other groups' counts, with the groups in ``fixed`` (the residual
        widths and the attentions tied to them) held at those kept counts (and head counts):
        ``cost = base - sum_g per_channel[g] * removed_g - sum_g per_head[g] * removed_heads_g``.

        Raises:
            PlanError: a term in which two groups that are not fixed multiply each other (the cost is then not
                linear in them).
        """
        fixed_heads = fixed_heads or {}
        removed = {n: self.groups[n].size - int(k) for n, k in fixed.items()}
        base, per_channel, per_head = 0.0, {}, {}
        for t in self.terms:
            f, free = t.coef, []
            for d in t.dims:
                if d.heads_of is not None:
                    if d.heads_of in fixed:
                        f *= self.heads_of(d.heads_of, fixed, fixed_heads) / self.groups[d.heads_of].num_heads
                    else:
                        free.append(("heads", d.heads_of, d))
                elif d.groups:
                    fixed_part = sum(r * removed[g] for g, r in d.groups if g in fixed)
                    others = [(g, r) for g, r in d.groups if g not in fixed]
                    if others:
                        free.append(("channels", others, d, fixed_part))
                    else:
                        f *= (d.size - fixed_part) / d.size
            if len(free) > 1:
                raise PlanError("the cost is not linear in the attention / MLP counts once the residual widths are "
                                f"fixed (a tensor sliced by {[x[1] for x in free]} in two dims)")
            base += f
            if free and free[0][0] == "heads":
                _, g, _ = free[0]
                per_head[g] = per_head.get(g, 0.0) + f / self.groups[g].num_heads
            elif free:
                _, others, d, fixed_part = free[0]
                base -= f * fixed_part / d.size  # the fixed groups' share of this dim
                for g, r in others:
                    per_channel[g] = per_channel.get(g, 0.0) + f * r / d.size
        return base, per_channel, per_head

    def option_costs(self, fixed: Mapping[str, int], fixed_heads: Mapping[str, int], ladders) -> _OptionCosts:
        """The cost of every option of every ladder (see :mod:`vitprune_fast.allocate`), the other groups whole."""
        base, per_channel, per_head = self.linearize(fixed, fixed_heads)
        out = {}
        for name, lad in ladders.items():
            g = self.groups[name]
            a, b = per_channel.get(name, 0.0), per_head.get(name, 0.0)
            out[name] = [-a * (g.size - k) - (b * (g.num_heads - h) if b and h is not None else 0.0)
                         for k, h in zip(lad.kept, lad.heads, strict=True)]
        return _OptionCosts(base, out)

    def plan_cost(self, plan: Plan) -> int:
        """The cost after ``plan`` (its kept counts and head counts)."""
        return self.cost({n: len(v) for n, v in plan.keep.items()}, plan.heads)

    def unit_cost(self, name: str, kept: Mapping[str, int]) -> float:
        """The cost one channel of group ``name`` adds at the kept counts ``kept`` (others' counts held): exact for
        the groups whose cost is linear in their count once the residual widths are fixed (attention, MLP)."""
        base = dict(kept)
        n = base.get(name, self.groups[name].size)
        if n < 1:
            raise PlanError(f"{name}: no channel kept")
        lo = dict(base, **{name: n - 1})
        return self.cost(base) - self.cost(lo) if n > 1 else self.cost(base) - self.cost(dict(base, **{name: 0}))

    def linear_in(self, name: str) -> bool:
        """Whether every term is at most linear in group ``name``'s count once the residual groups are fixed (what
        the global allocation relies on)."""
        for t in self.terms:
            uses = sum(any(g == name for g, _ in d.groups) for d in t.dims)
            if uses > 1:
                return False
        return True


def exact_cost(model: nn.Module, plan: Plan, measure: str = "flops") -> int:
    """The FLOPs or parameters of ``model`` after ``plan``, counted on a pruned meta copy (the reference the cost
    model is tested against)."""
    from .flops import plan_flops
    from .metrics import plan_params

    return plan_flops(model, plan) if measure == "flops" else plan_params(model, plan)


__all__ = ["MEASURES", "CostModel", "exact_cost"]
