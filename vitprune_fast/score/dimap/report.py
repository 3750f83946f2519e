"""Parameters and per-layer FLOPs of DIMAP-masked models, and the ratio that reaches a FLOPs target."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ...errors import PlanError
from ...flops import FlopProfile, flop_profile
from .blocks import prunable_weights
from .metric import check_mode, dimap_scores
from .thresholds import SortedPools, bisect_ratio, check_flops_target, pools_for


def _linear_of(weight_name: str) -> str:
    return weight_name.rsplit(".", 1)[0]


def unstructured_flops(profile: FlopProfile, kept: Mapping[str, int], numel: Mapping[str, int]) -> int:
    """FLOPs with each prunable Linear costing ``2 * kept_nonzeros * tokens``; everything else dense."""
    saved = 0
    for n, k in kept.items():
        lin = _linear_of(n)
        saved += profile.linear[lin] - 2 * k * profile.tokens[lin]
    return profile.total - saved



def dimap_ratio_for_flops(
        model: nn.Module,
        flops: float,
        mode: str = "module",
        *,
        scores: Mapping[str, torch.Tensor] | None = None,
        img_size: int | tuple[int, int] | None = None,
        profile: FlopProfile | None = None,
) -> float:
    """The smallest shared ``rho`` whose faithful masks keep at most ``flops`` of the dense FLOPs.

    FLOPs are counted per layer (``2 * kept weights * tokens`` for each prunable Linear, everything else dense) on
    top of a :func:`flop_profile`. Bisection on ``rho``; each step counts kept weights per layer from sorted scores.

    Args:
        model: the model.
        flops: target fraction of the dense FLOPs to keep, in (0, 1].
        mode: threshold pooling, as in :func:`dimap_masks`.
        scores: precomputed ``dimap_scores(model, mode=mode)``.
        img_size: input size (default the model's).
        profile: precomputed :func:`flop_profile`.
    """
    check_mode(mode)
    target = check_flops_target(flops)
    pools = pools_for(prunable_weights(model), mode)
    scores = dimap_scores(model, mode=mode) if scores is None else scores
    profile = profile or flop_profile(model, img_size)
    numel = {n: scores[n].numel() for v in pools.values() for n in v}
    sorted_pools = SortedPools(scores, pools)
    return bisect_ratio(lambda r: unstructured_flops(profile, sorted_pools.kept(r), numel) / profile.total, target)



def _module_of(names_by_module: Mapping[str, list[str]]) -> dict[str, str]:
    return {n: m for m, names in names_by_module.items() for n in names}


def sparsity_report(
        model: nn.Module,
        masks: Mapping[str, torch.Tensor] | None = None,
        img_size: int | tuple[int, int] | None = None,
        *,
        profile: FlopProfile | None = None,
) -> dict:
    """Parameters and FLOPs of the masked model next to the dense ones.

    Parameters: every parameter of the model counts (dense ones included); ``kept`` = all entries minus the masked
    ones, ``nonzero`` = entries that are literally non-zero after masking (differs from ``kept`` only where a kept
    weight happens to be 0, e.g. timm's zero-initialised biases). FLOPs are counted per layer: a prunable Linear costs
    ``2 * kept * tokens`` (MACs = kept weights x its tokens); attention matmuls and all other ops stay dense. Dense
    FLOPs and per-Linear tokens come from ``FlopCounterMode`` (:func:`flop_profile`). ``flops_module_density`` is
    the convention that reproduces the paper's FLOPs column (each module's dense Linear FLOPs times the module's
    density); it is reported for comparison only.

    Args:
        model: the model (weights read, not modified).
        masks: weight name -> bool keep-mask; default: the prunable weights' non-zero pattern.
        img_size: input size (default the model's).
        profile: precomputed :func:`flop_profile`.

    Returns:
        ``{"params": {...}, "flops": {...}, "macs": {...}, "modules": {...}, "layers": {...}, "img_size": (H, W)}``;
        FLOPs in FlopCounterMode units (2 per multiply-add).
    """
    names_by_module = prunable_weights(model)
    module_of = _module_of(names_by_module)
    if masks is None:
        masks = {n: model.get_parameter(n).detach() != 0 for n in module_of}
    for n, m in masks.items():
        if n not in module_of:
            raise PlanError(f"mask for {n!r}, which is not a prunable DIMAP weight")
        if m.shape != model.get_parameter(n).shape:
            raise PlanError(f"masks[{n!r}] has shape {tuple(m.shape)}, the weight has "
                            f"{tuple(model.get_parameter(n).shape)}")
    profile = profile or flop_profile(model, img_size)
    dense_params = sum(p.numel() for p in model.parameters())
    nonzero = 0
    for n, p in model.named_parameters():
        w = p.detach()
        nz = w != 0
        if n in masks:
            nz.logical_and_(masks[n].to(w.device))
        nonzero += int(torch.count_nonzero(nz))
    kept = {n: int(torch.count_nonzero(masks[n])) if n in masks else model.get_parameter(n).numel() for n in module_of}
    numel = {n: model.get_parameter(n).numel() for n in module_of}
    layers = {n: _layer_row(profile, n, numel[n], kept[n]) for n in module_of}
    modules = {m: _module_row(layers, names) for m, names in names_by_module.items()}
    pruned_params = sum(numel[n] - kept[n] for n in module_of)
    flops_pruned = unstructured_flops(profile, kept, numel)
    flops_paper = round(profile.total - sum(r["flops_dense"] * (1 - r["density"]) for r in modules.values()))
    return {
        "params": {"dense": dense_params, "kept": dense_params - pruned_params, "nonzero": nonzero,
                   "removed_frac": pruned_params / dense_params},
        "flops": {"dense": profile.total, "pruned": flops_pruned, "removed_frac": 1 - flops_pruned / profile.total,
                  "module_density": flops_paper, "removed_frac_module_density": 1 - flops_paper / profile.total},
        "macs": {"dense": profile.total // 2, "pruned": flops_pruned // 2},
        "modules": modules,
        "layers": layers,
        "img_size": profile.img_size,
    }


def _layer_row(profile: FlopProfile, name: str, numel: int, kept: int) -> dict:
    lin = _linear_of(name)
    tokens = profile.tokens[lin]
    return {"numel": numel, "kept": kept, "density": kept / numel, "tokens": tokens,
            "flops_dense": profile.linear[lin], "flops": 2 * kept * tokens}


def _module_row(layers: Mapping[str, dict], names: list[str]) -> dict:
    numel = sum(layers[n]["numel"] for n in names)
    kept = sum(layers[n]["kept"] for n in names)
    return {"numel": numel, "kept": kept, "density": kept / numel if numel else 1.0,
            "flops_dense": sum(layers[n]["flops_dense"] for n in names),
            "flops": sum(layers[n]["flops"] for n in names)}
