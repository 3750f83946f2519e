"""Structured DIMAP (our adaptation): module-wise thresholds over channel groups, as a Plan for ``prune_``."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ...arch import describe
from ...errors import PlanError
from ...flops import FlopProfile, flop_profile
from ...plan import Plan, check_whole_heads
from .blocks import DimapBlock, find_blocks
from .metric import check_attn_mode, check_mode, structured_unit_scores
from .thresholds import bisect_ratio, check_flops_target, check_ratio


def _top_ascending(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the ``n`` highest scores (ties: lower index first), sorted ascending."""
    return torch.argsort(-scores, stable=True)[:n].sort().values


@dataclass
class _StructuredState:
    """Everything a structured plan at a given ratio needs, computed once."""

    blocks: list[DimapBlock]
    channel: dict[str, torch.Tensor]  # attn / mlp group -> per-channel scores (head score repeated for "whole")
    unit: dict[str, torch.Tensor]  # attn group -> per-unit scores (channels or heads); mlp group -> per-unit
    pools: dict[str, list[str]]  # pool -> group names
    sorted_pool: dict[str, torch.Tensor]  # pool -> ascending scores
    attn_mode: str


def _structured_state(model: nn.Module, attn_mode: str, mode: str, dtype, backend: str) -> _StructuredState:
    blocks = find_blocks(model)
    unit = {k: v.detach().to("cpu", torch.float64) for k, v in
            structured_unit_scores(model, blocks, attn_mode, "module", dtype, backend).items()}
    channel = dict(unit)
    if attn_mode == "heads":
        for b in blocks:
            channel[b.attn] = unit[b.attn].repeat_interleave(b.head_dim)
    attns = [b.attn for b in blocks if not b.attn_tied]  # a tied attention keeps the residual's width: left whole
    if mode == "module":
        pools = {"attn": attns, "mlp": [b.mlp for b in blocks]}
    else:
        pools = {"model": attns + [b.mlp for b in blocks]}
    pools = {p: names for p, names in pools.items() if names}
    sorted_pool = {p: torch.sort(torch.cat([unit[n] for n in names])).values for p, names in pools.items()}
    return _StructuredState(blocks, channel, unit, pools, sorted_pool, attn_mode)


def _tau(sorted_pool: torch.Tensor, rho: float) -> float:
    k = math.floor(rho * sorted_pool.numel())
    return -math.inf if k <= 0 else float(sorted_pool[k - 1])


def _keep_attn(b: DimapBlock, unit: torch.Tensor, channel: torch.Tensor, tau: float, attn_mode: str):
    """Kept channels and head count of one attention; the emergent count is forced to a uniform head_dim."""
    if attn_mode == "heads":
        n_heads = max(1, int((unit > tau).sum()))
        kept_heads = _top_ascending(unit, n_heads)
        return (kept_heads[:, None] * b.head_dim + torch.arange(b.head_dim)).flatten(), n_heads
    emergent = int((unit > tau).sum())
    hd = min(b.head_dim, max(1, math.floor(emergent / b.num_heads + 0.5)))  # nearest multiple of num_heads
    per_head = channel.view(b.num_heads, b.head_dim)
    keep = torch.cat([_top_ascending(per_head[h], hd) + h * b.head_dim for h in range(b.num_heads)])
    return keep, b.num_heads


def _structured_keep(state: _StructuredState, rho: float) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    tau = {}
    for p, names in state.pools.items():
        t = _tau(state.sorted_pool[p], rho)
        tau.update(dict.fromkeys(names, t))
    keep, heads = {}, {}
    for b in state.blocks:
        if not b.attn_tied:
            keep[b.attn], heads[b.attn] = _keep_attn(b, state.unit[b.attn], state.channel[b.attn], tau[b.attn],
                                                     state.attn_mode)
        s = state.unit[b.mlp]
        keep[b.mlp] = _top_ascending(s, max(1, int((s > tau[b.mlp]).sum())))
    return keep, heads


def _module(weight: str) -> str:
    return weight.rpartition(".")[0]


def _structured_flops(profile: FlopProfile, blocks: list[DimapBlock], keep: Mapping[str, torch.Tensor]) -> int:
    """FLOPs of the physically pruned model: every Linear and attention matmul scales with its kept width."""
    saved = 0
    for b in blocks:
        # integers: each Linear's FLOPs are linear in its width; a unit owns ``repeats`` of its ``extent`` entries (a
        # Linear shared by the attention and the MLP -- a parallel block's in_proj -- is split by rows)
        removed = b.hidden - len(keep[b.mlp])
        saved += sum(profile.linear[_module(n)] * repeats * removed // extent
                     for n, _, repeats, _, _, extent in b.mlp_linears)
        if b.attn in keep:  # (a tied attention is left whole)
            removed = b.attn_dim - len(keep[b.attn])
            saved += sum(profile.linear[_module(n)] * repeats * removed // extent
                         for n, _, repeats, _, _, extent in b.attn_linears)
            saved += profile.attn_matmul[b.attn] * removed // b.attn_dim
    return profile.total - saved


def dimap_structured_plan(
        model: nn.Module,
        ratio: float | None = None,
        flops: float | None = None,
        attn_mode: str = "dims",
        mode: str = "module",
        *,
        img_size: int | tuple[int, int] | None = None,
        dtype: torch.dtype | None = None,
        backend: str = "auto",
):
    """Structured DIMAP plan (our adaptation): one threshold per module across the network.

    Units are scored as in ``dimap_scores(model, structured=True, attn_mode=attn_mode)``. Within each module -- ``attn``
    (QKV and PRJ together: a channel removes q/k/v rows and a proj column) and ``mlp`` -- the ``floor(rho * n)``
    lowest-scoring units of the whole network are removed, so per-block widths are emergent (unlike ``make_plan``,
    which keeps the same ratio in every block). Attention keeps a uniform head_dim: with ``heads="dims"`` each
    block's emergent channel count is rounded to the nearest multiple of ``num_heads`` and every head keeps its top
    channels by score; with ``attn_mode="heads"`` heads are the units and the kept heads keep all their channels.
    Every block keeps at least one MLP unit and one channel (or head) per attention. Residual widths are untouched.

    Args:
        model: a timm VisionTransformer / SwinTransformer (not modified).
        ratio: ``rho``, the fraction of each module's units (attention channels or heads; MLP hidden units) to
            remove network-wide.
        flops: instead of ``ratio``: target fraction of the dense FLOPs to KEEP. ``rho`` is bisected to the smallest
            value whose pruned model reaches it; FLOPs of the pruned shapes are the ``FlopCounterMode`` measurements
            of the dense model (:func:`flop_profile`) scaled per Linear and per attention by the kept width, which
            is exact for channel pruning (the tests check it against ``FlopCounterMode`` on the pruned model).
        attn_mode: ``"dims"`` (channels) or ``"heads"`` (whole heads), as in ``make_plan``.
        mode: ``"module"`` (attn and mlp pools) or ``"model"`` (one pool).
        img_size: input size for ``flops`` (default the model's).
        dtype: scoring dtype (default float32).
        backend: metric backend (see :func:`dimap_scores`).

    Returns:
        A ``vitprune_fast.plan.Plan`` for ``describe(model)``: kept channel indices per attn / mlp group (groups
        with nothing removed are omitted) and the new head count of every listed attention.

    Raises:
        PlanError: bad arguments or an unreachable FLOPs target.
    """
    check_mode(mode, ("module", "model"))
    check_attn_mode(attn_mode)
    if (ratio is None) == (flops is None):
        raise PlanError("pass exactly one of ratio= or flops=")
    space = describe(model)
    check_whole_heads(space, attn_mode)
    state = _structured_state(model, attn_mode, mode, dtype, backend)
    missing = [n for n in state.unit if n not in space.groups]
    if missing:
        raise PlanError(f"groups {missing[:3]} are not in describe(model); cannot build a plan")
    if flops is not None:
        profile = flop_profile(model, img_size)
        target = check_flops_target(flops)

        def frac_at(r: float) -> float:
            return _structured_flops(profile, state.blocks, _structured_keep(state, r)[0]) / profile.total

        ratio = bisect_ratio(frac_at, target, iters=40)
    keep, new_heads = _structured_keep(state, check_ratio(ratio))
    kept = {n: k for n, k in keep.items() if len(k) < space.groups[n].size}
    return Plan.from_space(space, kept, {n: h for n, h in new_heads.items() if n in kept})


def structured_plan_flops(model: nn.Module, plan, img_size: int | tuple[int, int] | None = None,
                          profile: FlopProfile | None = None) -> int:
    """FLOPs (FlopCounterMode units) the model would have after the attn / mlp part of ``plan``."""
    profile = profile or flop_profile(model, img_size)
    blocks = find_blocks(model)
    keep = {}
    for b in blocks:
        keep[b.attn] = plan.keep.get(b.attn, torch.arange(b.attn_dim))
        keep[b.mlp] = plan.keep.get(b.mlp, torch.arange(b.hidden))
    return _structured_flops(profile, blocks, keep)
