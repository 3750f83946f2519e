"""Apply a Plan to a timm model in place: same Parameter objects, sliced .grad and optimizer state."""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from .arch import adapter_for
from .compact import compact_many_
from .errors import PlanError
from .plan import Plan, whole_heads_error
from .space import Group, PruningSpace, tensor_of

# Optimizer state entries that are second moments: they scale with the square of a reparametrisation.
_SQUARED_STATE = ("exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum")


@dataclass
class _GroupChange:
    group: Group
    keep: torch.Tensor  # sorted kept channels
    heads: int | None  # new head count (attn only)


def _as_index(name: str, keep, size: int) -> torch.Tensor:
    if not isinstance(keep, torch.Tensor):
        try:
            keep = torch.as_tensor(keep)
        except (TypeError, ValueError) as e:
            raise PlanError(f"plan.keep[{name!r}] is not a list of indices") from e
    if keep.dim() != 1 or keep.dtype.is_floating_point or keep.dtype == torch.bool:
        raise PlanError(f"plan.keep[{name!r}] must be a 1-D integer tensor, got {keep.dtype} {tuple(keep.shape)}")
    keep = keep.to("cpu", torch.long)
    if keep.numel() == 0:
        raise PlanError(f"plan.keep[{name!r}] removes every channel of the group")
    if (keep < 0).any() or (keep >= size).any():
        raise PlanError(f"plan.keep[{name!r}] has indices outside [0, {size})")
    if keep.numel() > 1 and not (keep[1:] > keep[:-1]).all():
        raise PlanError(f"plan.keep[{name!r}] must be sorted ascending without duplicates")
    return keep


def resolve_plan(space: PruningSpace, plan: Plan, physical: bool = True) -> list[_GroupChange]:
    """Check ``plan`` against ``space`` (no tensor is touched) and list the group changes.

    Args:
        physical: the plan is for removal (``prune_``): tied widths must agree. Masking can express any plan.
    """
    if not isinstance(plan, Plan):
        raise PlanError(f"expected a vitprune_fast.Plan, got {type(plan).__name__}")
    unknown = sorted((set(plan.keep) | set(plan.heads)) - set(space.groups))
    if unknown:
        raise PlanError(f"plan names groups this model does not have: {unknown[:5]}")
    for name, size in plan.sizes.items():
        g = space.groups.get(name)
        if g is None or g.size != size:
            have = "missing" if g is None else f"size {g.size}"
            raise PlanError(f"plan was made for another model: group {name!r} had size {size}, here {have}")
    changes = []
    for name, g in space.groups.items():
        if name not in plan.keep and name not in plan.heads:
            continue
        keep = _as_index(name, plan.keep.get(name, torch.arange(g.size)), g.size)
        heads = None
        if g.kind == "attn":
            heads = int(plan.heads.get(name, g.num_heads))
            if heads < 1 or keep.numel() % heads:
                raise PlanError(f"{name}: {keep.numel()} kept channels cannot form {heads} equal heads")
            if g.whole_heads and not _whole_heads_kept(keep, g.head_dim, heads):
                raise whole_heads_error(g)
        elif name in plan.heads:
            raise PlanError(f"plan.heads[{name!r}]: only attn groups have heads")
        if keep.numel() == g.size and heads in (None, g.num_heads):
            continue
        changes.append(_GroupChange(g, keep, heads))
    if physical:
        _check_ties(space, {ch.group.name: ch for ch in changes})
    return changes


def _check_ties(space: PruningSpace, changes: dict[str, _GroupChange]) -> None:
    """A tied attention keeps its partner's count, in equal heads of the original head count (or whole heads); a
    residual with ``multiple_of`` keeps a multiple of it."""
    for g in space.groups.values():
        if g.multiple_of > 1 and g.name in changes and changes[g.name].keep.numel() % g.multiple_of:
            raise PlanError(f"{g.name}: this model keeps its residual width a multiple of {g.multiple_of} (the "
                            f"rotary embedding's head size); the plan keeps {changes[g.name].keep.numel()}")
        if g.tied_to is None:
            continue
        partner = changes[g.tied_to].keep.numel() if g.tied_to in changes else space.groups[g.tied_to].size
        ch = changes.get(g.name)
        mine, heads = (ch.keep.numel(), ch.heads) if ch is not None else (g.size, g.num_heads)
        if g.whole_heads:  # whole heads are checked by resolve_plan; only the count is tied
            ok, rule = mine == partner, "in whole heads"
        else:
            per_head = torch.bincount(ch.keep // g.head_dim, minlength=g.num_heads) if ch is not None else None
            ok = mine == partner and heads == g.num_heads and (per_head is None or (per_head == mine // heads).all())
            rule = f"the same number in each of its {g.num_heads} heads"
        if not ok:
            raise PlanError(f"{g.name}: its attention width is tied to {g.tied_to} ({g.module} takes its width "
                            f"from its input): it must keep {partner} channels, {rule}; the plan keeps "
                            f"{mine} in {heads} heads (make_plan plans it so)")


def _whole_heads_kept(keep: torch.Tensor, head_dim: int, heads: int) -> bool:
    """Whether ``keep`` is ``heads`` complete original heads (each new head one old head, its dims in order)."""
    if keep.numel() != heads * head_dim:
        return False
    rows = keep.view(heads, head_dim)
    return bool((rows == rows[:, :1] + torch.arange(head_dim)).all() and (rows[:, 0] % head_dim == 0).all())


def removed_entries(changes: list[_GroupChange]) -> dict[tuple[str, int], list[torch.Tensor]]:
    """``(tensor name, dim)`` -> the indices along that dim the changes remove (one tensor per group that slices it;
    per-head tensors apart)."""
    removed: dict[tuple[str, int], list[torch.Tensor]] = defaultdict(list)
    for ch in changes:
        gone = torch.ones(ch.group.size, dtype=torch.bool)
        gone[ch.keep] = False
        gone = gone.nonzero().flatten()
        if gone.numel():
            for sl in ch.group.slices:
                if not sl.per_head:
                    removed[(sl.name, sl.dim)].append(sl.indices(gone))
    return removed


def kept_entries(space: PruningSpace, plan: Plan, name: str, dim: int, size: int) -> torch.Tensor:
    """The indices along ``dim`` of tensor ``name`` (``size`` entries there before pruning) that ``plan`` keeps."""
    keep = torch.ones(size, dtype=torch.bool)
    for idx in removed_entries(resolve_plan(space, plan, physical=False)).get((name, dim), []):
        keep[idx] = False
    return keep.nonzero().flatten()


def _companions(p: torch.Tensor, optimizer: torch.optim.Optimizer | None) -> list[tuple[str, torch.Tensor]]:
    """Tensors that must be sliced like ``p``: its .grad and its per-element optimizer state."""
    out = []
    if isinstance(p, nn.Parameter) and p.grad is not None:
        out.append(("grad", p.grad))
    if optimizer is not None and p in optimizer.state:
        for key, v in optimizer.state[p].items():
            if not isinstance(v, torch.Tensor) or v.dim() == 0:
                continue  # e.g. Adam's step counter
            if v.shape != p.shape:
                raise PlanError(f"optimizer state {key!r} has shape {tuple(v.shape)} != parameter "
                                f"{tuple(p.shape)}; only per-element state (Adam/AdamW/SGD...) can be sliced")
            out.append((key, v))
    return out


def head_columns(table: torch.Tensor, keep: torch.Tensor, old_hd: int, heads: int,
                 dim: int = 1) -> torch.Tensor | list[int]:
    """A per-head tensor (Swin relative-position bias ``[rows, heads]``, XCiT temperature ``[heads, 1, 1]``) for a
    new head layout.

    Args:
        table: the tensor, indexed by old head along ``dim``.
        keep: sorted kept attention channels, in ``heads`` equal consecutive chunks (chunk g = new head g).
        old_hd: head_dim before the change.
        heads: new head count.
        dim: the head dimension of ``table``.

    Returns:
        The kept old head indices (a list) when every new head comes from one old head, else the new tensor with
        ``heads`` entries along ``dim``: the mean of the merged heads' entries (documented choice; no exact one exists).
    """
    spans = [torch.unique(chunk // old_hd) for chunk in keep.view(heads, -1)]
    if all(s.numel() == 1 for s in spans):
        return [int(s) for s in spans]
    # Merged heads have no exact bias: use the mean of the merged heads' entries (documented choice).
    return torch.stack([table.index_select(dim, s.to(table.device)).mean(dim) for s in spans], dim)


def prune_(model: nn.Module, plan: Plan, optimizer: torch.optim.Optimizer | None = None) -> nn.Module:
    """Prune ``model`` in place according to ``plan``.

    Parameters keep their identity (an optimizer built before keeps working); ``.grad`` and the optimizer's
    per-element state (Adam/AdamW ``exp_avg``/``exp_avg_sq``, SGD ``momentum_buffer``) are sliced the same
    way. Module attributes (head counts and sizes, scales, Linear / norm sizes, Swin's ``dim``...) are updated by
    the model's adapter. When a head's dim shrinks, ``sqrt(new/old)`` is folded into the rows that make q (the
    adapter's :meth:`~vitprune_fast.arch.Adapter.q_rows`) so that both of timm's attention paths compute the same
    function as before.

    Everything is validated before any tensor is touched: a failed call leaves the model unchanged.

    Args:
        model: a timm VisionTransformer or SwinTransformer.
        plan: from ``make_plan(describe(model), ...)``.
        optimizer: optional optimizer whose state must follow the parameters.

    Returns:
        The same model object.
    """
    adapter = adapter_for(model)
    space = adapter.describe()
    changes = resolve_plan(space, plan)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise PlanError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    # attentions whose head_dim changes get the scale fold: their q rows must be declared (raises here if not)
    folds = [ch for ch in changes if ch.group.kind == "attn" and ch.keep.numel() // ch.heads != ch.group.head_dim]
    for ch in folds:
        adapter.q_rows(ch.group)

    # 1. Everything each tensor must lose, checked before anything moves. A tensor keeps every entry no group
    # removes (two groups may share one tensor along one dim: a parallel block's in_proj rows).
    removed = removed_entries(changes)
    head_tables = [(sl.name, sl.dim, ch.keep, ch.group.head_dim, ch.heads)
                   for ch in changes for sl in ch.group.slices if sl.per_head]
    items = []
    for (name, dim), parts in removed.items():
        t = tensor_of(model, name)
        idx = torch.cat(parts)
        if idx.max() >= t.shape[dim]:
            raise PlanError(f"{name}: index {int(idx.max())} out of range for dim {dim} of {tuple(t.shape)}")
        keep = torch.ones(t.shape[dim], dtype=torch.bool)
        keep[idx] = False
        targets = [t] + [v for _, v in _companions(t, optimizer)]
        items += [(x, dim, keep.nonzero().flatten()) for x in targets]
    new_tables = []
    for name, dim, keep, old_hd, heads in head_tables:
        table = tensor_of(model, name)
        companions = [v for _, v in _companions(table, optimizer)]  # validated before anything moves
        new_tables.append((table, companions, dim, head_columns(table.detach(), keep, old_hd, heads, dim)))

    # 2. Move data (in place; C++ extension when available).
    compact_many_(items)
    with torch.no_grad():
        for table, companions, dim, cols in new_tables:
            if isinstance(cols, list):
                if len(cols) < table.shape[dim] or cols != sorted(cols):
                    compact_many_([(x, dim, torch.tensor(cols)) for x in [table] + companions])
            else:  # merged heads: new values; gradient/state of the table restart from zero
                table.set_(cols.to(table.dtype).contiguous())
                if table.grad is not None:
                    table.grad = None
                if optimizer is not None:
                    optimizer.state.pop(table, None)

    # 3. Attributes, then fold the attention-scale change into q (its rows as they are after slicing).
    for ch in changes:
        if ch.group.kind == "attn":
            adapter.set_heads(ch.group, ch.heads)
    adapter.sync_attributes()
    for ch in folds:
        new_hd = ch.keep.numel() // ch.heads
        _fold_scale(adapter.q_rows(ch.group), math.sqrt(new_hd / ch.group.head_dim), optimizer)
    return model


def _fold_scale(tensors: list[tuple[torch.Tensor, slice]], factor: float, optimizer) -> None:
    """q' = factor * q so that q'·k / sqrt(new_hd) == q·k / sqrt(old_hd); gradients/state follow the reparam."""
    if factor == 1.0:
        return
    with torch.no_grad():
        for p, rows in tensors:
            p[rows].mul_(factor)
            if p.grad is not None:
                p.grad[rows].div_(factor)
            state = optimizer.state.get(p, {}) if optimizer is not None else {}
            for key, v in state.items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape:
                    v[rows].div_(factor ** 2 if key in _SQUARED_STATE else factor)
