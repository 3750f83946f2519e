"""The DIMAP / LAMP metric: per-weight scores (faithful) and per-group scores (structured)."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import nn

from ...errors import PlanError
from ...kernels.dimap_metric import dimap_metric
from ...space import tensor_of
from .blocks import DimapBlock, find_blocks, prunable_weights

MODES = ("module", "model", "layer")
ATTN_MODES = ("dims", "heads")  # structured attention units: channels, or whole heads
_ROW_BATCH_ELEMS = {"cpu": 1 << 24, "cuda": 1 << 27}  # elements per metric call (bounds the sort's scratch memory)


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _row_batches(ids: list[int], numel: int, device: torch.device) -> Iterable[list[int]]:
    cap = _ROW_BATCH_ELEMS["cuda" if device.type == "cuda" else "cpu"]
    rows = max(1, cap // max(numel, 1))
    for i in range(0, len(ids), rows):
        yield ids[i:i + rows]


def lamp_scores(
        tensors: list[torch.Tensor], squared: bool = False, dtype: torch.dtype | None = None, backend: str = "auto",
) -> list[torch.Tensor]:
    """LAMP/DIMAP score of every entry of every tensor, each tensor normalised on its own.

    Same-size tensors are stacked as rows ``[L, N]`` and scored in one call of
    :func:`~vitprune_fast.kernels.dimap_metric.dimap_metric` (Triton on CUDA, torch on CPU).

    Args:
        tensors: one tensor per layer (any shape).
        squared: the tensors already hold non-negative squares (structured group norms²).
        dtype: computation dtype (default float32, float64 for float64 tensors).
        backend: ``"auto"`` | ``"triton"`` | ``"torch"``, passed to ``dimap_metric``.

    Returns:
        Scores shaped like each input, in ``dtype``.
    """
    by_size: dict[tuple[int, torch.device], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        by_size[(t.numel(), t.device)].append(i)
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for (numel, device), ids in by_size.items():
        for batch in _row_batches(ids, numel, device):
            rows = torch.stack([tensors[i].detach().reshape(-1) for i in batch])  # [L, N]
            if dtype is not None:
                rows = rows.to(dtype)
            scores = dimap_metric(rows, squared=squared, backend=backend)  # [L, N]
            for row, i in zip(scores, batch, strict=True):
                out[i] = row.view(tensors[i].shape)
    return out  # type: ignore[return-value]


def check_mode(mode: str, allowed: tuple[str, ...] = MODES) -> None:
    if mode not in allowed:
        raise PlanError(f"mode must be one of {allowed}, got {mode!r}")


def check_attn_mode(attn_mode: str) -> None:
    if attn_mode not in ATTN_MODES:
        raise PlanError(f"attn_mode must be one of {ATTN_MODES}, got {attn_mode!r}")


def _faithful_scores(model: nn.Module, mode: str, dtype, backend: str) -> dict[str, torch.Tensor]:
    names = [n for names in prunable_weights(model).values() for n in names]
    weights = [model.get_parameter(n).detach() for n in names]
    if mode == "layer":  # uniform magnitude pruning: the ranking inside a layer is |w|
        scores = [w.abs().to(dtype or acc_dtype(w)) for w in weights]
    else:
        scores = lamp_scores(weights, dtype=dtype, backend=backend)
    return dict(zip(names, scores, strict=True))


def _unit_norms2(model: nn.Module, linears, size: int, acc) -> torch.Tensor:
    """``[size]``: per unit, the squared norm of every Linear weight row / column it owns (see ``DimapBlock``)."""
    out = None
    for name, dim, repeats, stride, offset, _ in linears:
        w = model.get_parameter(name).detach()
        per_index = w.to(acc).square().sum(1 - dim)  # [w.shape[dim]]: a row's (dim 0) or a column's (dim 1) norm²
        for r in range(repeats):
            start = offset + r * stride
            part = per_index[start:start + size]
            out = part if out is None else out + part
    return out


def _group_norms2(model: nn.Module, block: DimapBlock, attn_mode: str, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Structured group norms² of one block: attention ``[A]`` (``[H]`` for whole heads) and MLP ``[hidden]``.

    An attention channel owns its q, k, v rows and proj column; an MLP unit its fc1 row(s) and fc2 column.
    """
    acc = dtype or acc_dtype(tensor_of(model, (block.attn_linears or block.mlp_linears)[0][0]))
    attn = _unit_norms2(model, block.attn_linears, block.attn_dim, acc)
    if attn_mode == "heads":
        attn = attn.view(block.num_heads, block.head_dim).sum(1)  # [H]
    return attn, _unit_norms2(model, block.mlp_linears, block.hidden, acc)


def structured_unit_scores(
        model: nn.Module, blocks: list[DimapBlock], attn_mode: str, mode: str, dtype, backend: str,
) -> dict[str, torch.Tensor]:
    """Group name -> per-unit scores: attention units are channels (``attn_mode="dims"``) or heads (``"heads"``)."""
    names, norms = [], []
    for b in blocks:
        attn, mlp = _group_norms2(model, b, attn_mode, dtype)
        names += [b.attn, b.mlp]
        norms += [attn, mlp]
    scores = norms if mode == "layer" else lamp_scores(norms, squared=True, dtype=dtype, backend=backend)
    return dict(zip(names, scores, strict=True))


def dimap_scores(
        model: nn.Module,
        structured: bool = False,
        mode: str = "module",
        *,
        attn_mode: str = "dims",
        dtype: torch.dtype | None = None,
        backend: str = "auto",
) -> dict[str, torch.Tensor]:
    """DIMAP importance scores (higher = more important).

    Args:
        model: a timm VisionTransformer / SwinTransformer (any model whose blocks :func:`find_blocks` finds).
        structured: ``False``: the paper's per-weight LAMP scores, keyed by weight name (``blocks.3.attn.qkv.weight``)
            and shaped like the weight. ``True`` (our structured adaptation): one 1-D tensor per group, keyed by the
            pruning core's group names (``blocks.3.attn``, ``layers.1.blocks.0.mlp``); attention entry ``d`` is
            channel ``d`` of the attention width (head ``d // head_dim``), ready for ``make_plan``.
        mode: ``"module"`` / ``"model"``: LAMP scores (the modes differ only in how thresholds pool them);
            ``"layer"``: plain magnitudes (``|w|``, or group norms² when structured) for uniform per-layer pruning.
        attn_mode: structured attention unit: ``"dims"`` scores channels; ``"heads"`` scores whole heads
            (normalised over the block's heads) and repeats each head's score over its channels.
        dtype: computation dtype; default float32 (float64 for float64 weights).
        backend: metric backend, ``"auto"`` (Triton on CUDA, torch on CPU), ``"triton"`` or ``"torch"``.

    Returns:
        Name -> score tensor on the weights' device.
    """
    check_mode(mode)
    if not structured:
        return _faithful_scores(model, mode, dtype, backend)
    check_attn_mode(attn_mode)
    blocks = find_blocks(model)
    scores = structured_unit_scores(model, blocks, attn_mode, mode, dtype, backend)
    if attn_mode == "heads":
        for b in blocks:
            scores[b.attn] = scores[b.attn].repeat_interleave(b.head_dim)  # [H] -> [A]
    return scores

