"""Depth pruning (UP-ViTs §4): remove whole blocks or hybrid units FFN_i + MSA_{i+1}, leaving stock timm blocks.

A hybrid unit straddles two blocks; removing it re-packs block i's attention half with block i+1's MLP half
into one timm Block (pre-LN residual branches are independent, so this is exact removal).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .arch import adapter_for
from .errors import PlanError

DEPTH_KINDS = ("block", "hybrid")


def lowest_units(scores: dict[str, torch.Tensor], n: int, kinds: Sequence[str] = DEPTH_KINDS) -> list[tuple[str, int]]:
    """The ``n`` lowest-KL units that can be removed together (no two touch the same block half).

    Args:
        scores: from ``upvits_scores(..., components=("blocks",))`` (keys ``units.block``, ``units.hybrid``).
        n: how many units to remove.
        kinds: unit kinds to consider.

    Returns:
        ``[(kind, index)]`` in ascending score order.
    """
    cands = []
    for kind in kinds:
        if kind not in DEPTH_KINDS:
            raise PlanError(f"depth kinds must be in {DEPTH_KINDS}; attention-/MLP-only units leave a non-stock block")
        key = f"units.{kind}"
        if key not in scores:
            raise PlanError(f"no scores for {key!r}; score with components=('blocks',)")
        cands += [(float(s), kind, i) for i, s in enumerate(scores[key].tolist())]
    chosen, used = [], set()
    for _, kind, i in sorted(cands):
        halves = {(i, "attn"), (i, "mlp")} if kind == "block" else {(i, "mlp"), (i + 1, "attn")}
        if halves & used:
            continue
        chosen.append((kind, i))
        used |= halves
        if len(chosen) == n:
            break
    if len(chosen) < n:
        raise PlanError(f"only {len(chosen)} non-overlapping units available, asked for {n}")
    return chosen


def remove_units_(model: nn.Module, units: Sequence[tuple[str, int]]) -> nn.Module:
    """Physically remove block units (indices refer to the model as it is before this call)."""
    adapter = adapter_for(model)
    trunk = adapter.trunk()
    n = len(trunk.blocks)
    drop = set()
    for kind, i in units:
        if kind not in DEPTH_KINDS or not 0 <= i < n - (kind == "hybrid"):
            raise PlanError(f"unit ({kind!r}, {i}) does not exist in a model with {n} blocks")
        if kind == "hybrid" and trunk.stage_of[i] != trunk.stage_of[i + 1]:
            raise PlanError(f"hybrid unit {i} crosses a stage boundary (Swin: a PatchMerging)")
        if kind == "hybrid" and adapter.hybrid_refusal():
            raise PlanError(f"hybrid unit {i}: {adapter.hybrid_refusal()}; remove whole blocks")
        if kind == "hybrid" and not isinstance(getattr(trunk.blocks[i], "norm3", nn.Identity()), nn.Identity):
            raise PlanError(f"hybrid unit {i}: block {i} ends in a main-branch norm (Swin V2-CR norm3) between its "
                            "MLP and the next attention; remove whole blocks there")
        drop.add(i if kind == "block" else i + 1)
    for s in set(trunk.stage_of):
        if all(i in drop for i, st in enumerate(trunk.stage_of) if st == s):
            raise PlanError(f"removing these units would empty stage {s}")
    if len(drop) != len(units):
        raise PlanError("units overlap")
    for kind, i in units:  # re-pack hybrids first: block i keeps its attention, takes block i+1's MLP half
        if kind == "hybrid":
            a, b = trunk.blocks[i], trunk.blocks[i + 1]
            # gamma_2: EVA's layer scale; norm3: Swin V2-CR's main-branch norm after the MLP; ffns: the MLPs of a
            # ParallelThingsBlock
            for part in ("norm2", "mlp", "ls2", "gamma_2", "drop_path2", "norm3", "ffns"):
                if hasattr(b, part):
                    setattr(a, part, getattr(b, part))
    kept: dict[int, list[nn.Module]] = {}  # stage -> kept block modules, in order
    for i, blk in enumerate(trunk.blocks):
        kept.setdefault(trunk.stage_of[i], [])
        if i not in drop:
            kept[trunk.stage_of[i]].append(blk)
    for stage, blocks in kept.items():
        adapter.set_stage_blocks(stage, blocks)
    return model


def prune_depth_(model: nn.Module, images, n_units: int, kinds: Sequence[str] | None = None,
                 progressive: bool = True, **score_kwargs) -> list[tuple[str, int]]:
    """Remove ``n_units`` lowest-KL units; ``progressive`` re-scores after each removal (UP-ViTs).

    Args:
        kinds: unit kinds to consider; default both, or whole blocks only where the model's hybrid units cannot be
            removed (XCiT, parallel ViT blocks).

    Returns:
        The removed units, each indexed in the model as it was when that unit was removed.
    """
    from .score.upvits import upvits_scores

    if kinds is None:
        kinds = ("block",) if adapter_for(model).hybrid_refusal() else DEPTH_KINDS
    removed = []
    steps = [1] * n_units if progressive else [n_units]
    for k in steps:
        scores = upvits_scores(model, images, components=("blocks",), **score_kwargs)
        units = lowest_units(scores, k, kinds)
        remove_units_(model, units)
        removed += units
    return removed
