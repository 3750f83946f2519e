"""DIMAP: data-independent module-aware pruning (He & Zhou, ICLR 2024), faithful and structured.

**Faithful (unstructured) mode, as published.** Every prunable weight ``w`` of a layer (the ``qkv``, ``proj``,
``fc1`` and ``fc2`` weights of every transformer block) gets the LAMP score (paper Eq. 10)::

    Imp(w) = w**2 / sum of v**2 over the layer's weights v with |v| >= |w|    (sorted descending, inclusive)

so the largest weight of each layer scores 1, scores rank like ``|w|`` inside a layer and do not change when a layer
is scaled. Layers are pooled into modules -- QKV-M (every ``attn.qkv``), PRJ-M (every ``attn.proj``) and MLP-M
(every ``mlp.fc1`` and ``mlp.fc2``) -- and each module gets ONE threshold: the ``floor(rho * |M|)`` lowest-scoring
weights of the module are pruned, wherever they sit (ties at the threshold are broken in pool order so the count is
exact). Per-layer sparsity is emergent. Biases, norms, the patch embedding, patch merging, relative-position tables
and the classifier stay dense. Ablations: ``mode="model"`` (one pool, i.e. global LAMP) and ``mode="layer"`` (the
same ratio of smallest ``|w|`` removed in every layer).

**Structured adaptation (ours, not in the paper).** The same module-aware, scale-invariant cumulative normalisation
applied to channel groups: MLP hidden unit ``j`` has ``norm² = |fc1 row j|² + |fc2 column j|²``; attention channel
``d`` has ``norm² = |q row d|² + |k row d|² + |v row d|² + |proj column d|²`` (a whole head sums its channels). Inside
each block's attention (or MLP) the norms² are sorted descending and ``score = norm² / inclusive cumsum``, so the
block's strongest group scores 1. Thresholds are per module across the network (QKV and PRJ form one ``attn`` module
because a channel removes rows of one and columns of the other; MLP is the other module), so per-block widths are
emergent. The numbers are NOT comparable with the paper's Table 1, which counts unstructured non-zeros.

The per-layer metric runs in the Triton kernel :mod:`vitprune_fast.kernels.dimap_metric` on CUDA (all same-size
layers in one launch) and in plain torch on CPU. Thresholds use a histogram select (:func:`kth_smallest`), not a sort
of the module pool.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import PlanError, UnsupportedModelError
from ..kernels.dimap_metric import dimap_metric

__all__ = [
    "DimapBlock",
    "FlopProfile",
    "MaskHandle",
    "apply_masks_",
    "dimap_masks",
    "dimap_ratio_for_flops",
    "dimap_scores",
    "dimap_structured_plan",
    "find_blocks",
    "flop_profile",
    "kth_smallest",
    "lamp_scores",
    "prunable_weights",
    "sparsity_report",
    "structured_plan_flops",
]

MODULES = ("qkv", "proj", "mlp")  # QKV-M, PRJ-M, MLP-M
MODES = ("module", "model", "layer")
HEAD_MODES = ("dims", "whole")
_ROW_BATCH_ELEMS = {"cpu": 1 << 24, "cuda": 1 << 27}  # elements per metric call (bounds the sort's scratch memory)


# ------------------------------------------------------------------------------------------------ model structure
@dataclass(frozen=True)
class DimapBlock:
    """The prunable parts of one transformer block.

    Attributes:
        attn: module path of the timm ``Attention`` / ``WindowAttention`` (also its structured group name).
        mlp: module path of the timm ``Mlp`` (also its structured group name).
        num_heads: attention heads.
        head_dim: channels per head (attention channel ``d`` belongs to head ``d // head_dim``).
        hidden: MLP hidden units.
    """

    attn: str
    mlp: str
    num_heads: int
    head_dim: int
    hidden: int

    @property
    def attn_dim(self) -> int:
        return self.num_heads * self.head_dim


def _attn_types() -> tuple[type, ...]:
    from timm.layers import Attention
    from timm.models.swin_transformer import WindowAttention

    return Attention, WindowAttention


def _check_linear(model: nn.Module, path: str) -> nn.Linear:
    m = model.get_submodule(path)
    if not isinstance(m, nn.Linear):
        raise UnsupportedModelError(f"{path}: expected nn.Linear, found {type(m).__name__}")
    return m


def find_blocks(model: nn.Module) -> list[DimapBlock]:
    """Every transformer block's attention and MLP, found by module type (not by index).

    A block is any module with an ``attn`` child of type timm ``Attention`` / ``WindowAttention`` and an ``mlp``
    child of type timm ``Mlp`` (ViT/DeiT ``Block``, Swin ``SwinTransformerBlock``). Attention-pooling heads and
    other MLPs outside blocks are not matched.

    Raises:
        UnsupportedModelError: no such block, or a block whose projections are not ``nn.Linear``.
    """
    from timm.layers import Mlp

    attn_types = _attn_types()
    blocks = []
    for path, m in model.named_modules():
        attn, mlp = getattr(m, "attn", None), getattr(m, "mlp", None)
        if not isinstance(attn, attn_types) or not isinstance(mlp, Mlp):
            continue
        prefix = f"{path}." if path else ""
        qkv = _check_linear(model, f"{prefix}attn.qkv")
        _check_linear(model, f"{prefix}attn.proj")
        fc1 = _check_linear(model, f"{prefix}mlp.fc1")
        _check_linear(model, f"{prefix}mlp.fc2")
        attn_dim = qkv.out_features // 3
        head_dim = attn_dim // attn.num_heads
        blocks.append(DimapBlock(f"{prefix}attn", f"{prefix}mlp", attn.num_heads, head_dim, fc1.out_features))
    if not blocks:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no transformer block (a module with a timm Attention/WindowAttention "
            "`attn` and a timm Mlp `mlp`); DIMAP prunes timm VisionTransformer and SwinTransformer models"
        )
    return blocks


def prunable_weights(model: nn.Module) -> dict[str, list[str]]:
    """DIMAP's modules: ``{"qkv": [...], "proj": [...], "mlp": [...]}`` -> weight parameter names (MLP-M holds
    fc1 and fc2 of every block, in block order)."""
    out: dict[str, list[str]] = {m: [] for m in MODULES}
    for b in find_blocks(model):
        out["qkv"].append(f"{b.attn}.qkv.weight")
        out["proj"].append(f"{b.attn}.proj.weight")
        out["mlp"] += [f"{b.mlp}.fc1.weight", f"{b.mlp}.fc2.weight"]
    return out


# ------------------------------------------------------------------------------------------------ the metric
def _acc_dtype(t: torch.Tensor) -> torch.dtype:
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


def _check_mode(mode: str, allowed: tuple[str, ...] = MODES) -> None:
    if mode not in allowed:
        raise PlanError(f"mode must be one of {allowed}, got {mode!r}")


def _check_heads(heads: str) -> None:
    if heads not in HEAD_MODES:
        raise PlanError(f"heads must be one of {HEAD_MODES}, got {heads!r}")


def _faithful_scores(model: nn.Module, mode: str, dtype, backend: str) -> dict[str, torch.Tensor]:
    names = [n for names in prunable_weights(model).values() for n in names]
    weights = [model.get_parameter(n).detach() for n in names]
    if mode == "layer":  # uniform magnitude pruning: the ranking inside a layer is |w|
        scores = [w.abs().to(dtype or _acc_dtype(w)) for w in weights]
    else:
        scores = lamp_scores(weights, dtype=dtype, backend=backend)
    return dict(zip(names, scores, strict=True))


def _group_norms2(model: nn.Module, block: DimapBlock, heads: str, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Structured group norms² of one block: attention ``[A]`` (``[H]`` for whole heads) and MLP ``[hidden]``."""
    qkv = model.get_submodule(f"{block.attn}.qkv").weight.detach()  # [3A, C]
    proj = model.get_submodule(f"{block.attn}.proj").weight.detach()  # [C, A]
    fc1 = model.get_submodule(f"{block.mlp}.fc1").weight.detach()  # [hidden, C]
    fc2 = model.get_submodule(f"{block.mlp}.fc2").weight.detach()  # [C, hidden]
    acc = dtype or _acc_dtype(qkv)
    a = block.attn_dim
    attn = qkv.to(acc).square().sum(1).view(3, a).sum(0) + proj.to(acc).square().sum(0)  # [A] q,k,v rows + proj col
    if heads == "whole":
        attn = attn.view(block.num_heads, block.head_dim).sum(1)  # [H]
    mlp = fc1.to(acc).square().sum(1) + fc2.to(acc).square().sum(0)  # [hidden]: fc1 row j + fc2 column j
    return attn, mlp


def _structured_unit_scores(
        model: nn.Module, blocks: list[DimapBlock], heads: str, mode: str, dtype, backend: str,
) -> dict[str, torch.Tensor]:
    """Group name -> per-unit scores: attention units are channels (``heads="dims"``) or heads (``"whole"``)."""
    names, norms = [], []
    for b in blocks:
        attn, mlp = _group_norms2(model, b, heads, dtype)
        names += [b.attn, b.mlp]
        norms += [attn, mlp]
    scores = norms if mode == "layer" else lamp_scores(norms, squared=True, dtype=dtype, backend=backend)
    return dict(zip(names, scores, strict=True))


def dimap_scores(
        model: nn.Module,
        structured: bool = False,
        mode: str = "module",
        *,
        heads: str = "dims",
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
        heads: structured attention unit: ``"dims"`` scores channels; ``"whole"`` scores heads (normalised over
            the block's heads) and repeats each head's score over its channels.
        dtype: computation dtype; default float32 (float64 for float64 weights).
        backend: metric backend, ``"auto"`` (Triton on CUDA, torch on CPU), ``"triton"`` or ``"torch"``.

    Returns:
        Name -> score tensor on the weights' device.
    """
    _check_mode(mode)
    if not structured:
        return _faithful_scores(model, mode, dtype, backend)
    _check_heads(heads)
    blocks = find_blocks(model)
    scores = _structured_unit_scores(model, blocks, heads, mode, dtype, backend)
    if heads == "whole":
        for b in blocks:
            scores[b.attn] = scores[b.attn].repeat_interleave(b.head_dim)  # [H] -> [A]
    return scores


# ------------------------------------------------------------------------------------------------ thresholds
def _check_ratio(rho: float, what: str = "ratio") -> float:
    try:
        rho = float(rho)
    except (TypeError, ValueError) as e:
        raise PlanError(f"{what} must be a number in [0, 1], got {rho!r}") from e
    if not 0.0 <= rho <= 1.0 or math.isnan(rho):
        raise PlanError(f"{what} must be in [0, 1], got {rho}")
    return rho


_SELECT_VIEW = {torch.float32: (torch.int32, 16), torch.float64: (torch.int64, 48)}  # int view, shift to 15 bits


def _select(tensors: list[torch.Tensor], k: int) -> tuple[torch.Tensor, int, int]:
    """``(value, n_less, n_equal)``: the ``k``-th smallest value (1-based) over ``tensors`` and how many values are
    strictly smaller than / equal to it. Histogram select, see :func:`kth_smallest`."""
    pool = torch.cat([t.reshape(-1) for t in tensors])  # [n]; a handful of large ops beats many per-layer ones
    before = 0
    if pool.dtype in _SELECT_VIEW:
        as_int, shift = _SELECT_VIEW[pool.dtype]
        # bucket = top 15 bits below the sign of the IEEE pattern: ordered value ranges for non-negative floats;
        # negatives (and -0.0) fall into bucket 0, below every positive bucket, so the ranges stay ordered
        bucket = (pool.view(as_int) >> shift).clamp_min_(0)  # [n]
        cum = torch.cumsum(torch.bincount(bucket, minlength=1 << 15), 0)  # [2**15]
        b = int(torch.searchsorted(cum, torch.tensor([k], device=cum.device)))  # first bucket with cum >= k
        before = int(cum[b - 1]) if b > 0 else 0
        pool = pool[bucket == b]  # the candidates: values of bucket b only
    value = torch.kthvalue(pool, k - before).values
    return value, before + int(torch.count_nonzero(pool < value)), int(torch.count_nonzero(pool == value))


def kth_smallest(tensors: list[torch.Tensor], k: int) -> torch.Tensor:
    """The ``k``-th smallest value (1-based) over several tensors, without sorting them.

    Histogram select: one pass counts values per bucket of the float bit pattern (``torch.bincount`` over
    2**15 ordered buckets), the bucket holding rank ``k`` is found from the cumulative counts, and only that
    bucket's values go to a final ``torch.kthvalue``. Several times faster than ``kthvalue`` of the whole pool on
    CPU. Dtypes other than float32/64 use ``kthvalue`` of the whole pool.
    """
    return _select(tensors, k)[0]


def _threshold_masks(scores: list[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """Keep-masks pruning exactly ``floor(rho * n)`` of the ``n`` pooled scores: the lowest ones.

    Everything below the k-th smallest score goes; ties at it are pruned in pool order (layer by layer, then
    flat index) until exactly ``k`` are gone, so the count does not depend on how float ties fall.
    """
    k = math.floor(rho * sum(t.numel() for t in scores))
    if k <= 0:
        return [torch.ones_like(t, dtype=torch.bool) for t in scores]
    tau, n_less, n_equal = _select(scores, k)
    masks = [t > tau for t in scores]
    spare = n_less + n_equal - k  # tied values at tau that must stay
    if spare > 0:
        budget = k - n_less  # tied values to prune, first in pool order
        for t, m in zip(scores, masks, strict=True):
            tied = torch.nonzero((t == tau).reshape(-1)).squeeze(1)
            m.reshape(-1)[tied[budget:]] = True
            budget = max(0, budget - tied.numel())
    return masks


def _pools(names_by_module: Mapping[str, list[str]], mode: str) -> dict[str, list[str]]:
    """Threshold pools: DIMAP's modules, one network-wide pool, or one pool per layer."""
    if mode == "module":
        return {m: list(v) for m, v in names_by_module.items() if v}
    flat = [n for v in names_by_module.values() for n in v]
    if mode == "model":
        return {"model": flat}
    return {n: [n] for n in flat}


def _ratio_per_pool(ratio: float | Mapping[str, float], pools: Mapping[str, list[str]], mode: str) -> dict[str, float]:
    if isinstance(ratio, Mapping):
        if mode != "module":
            raise PlanError("a per-module ratio dict is only meaningful with mode='module'")
        unknown = set(ratio) - set(pools)
        missing = set(pools) - set(ratio)
        if unknown or missing:
            raise PlanError(f"ratio dict needs exactly the keys {sorted(pools)}; unknown {unknown}, missing {missing}")
        return {p: _check_ratio(ratio[p], f"ratio[{p!r}]") for p in pools}
    rho = _check_ratio(ratio)
    return dict.fromkeys(pools, rho)


def _masks_at(scores: Mapping[str, torch.Tensor], pools: Mapping[str, list[str]], rho: Mapping[str, float]):
    masks: dict[str, torch.Tensor] = {}
    for p, names in pools.items():
        masks.update(zip(names, _threshold_masks([scores[n] for n in names], rho[p]), strict=True))
    return masks


def _check_scores(scores: Mapping[str, torch.Tensor], model: nn.Module, names: Iterable[str]) -> None:
    for n in names:
        if n not in scores:
            raise PlanError(f"scores has no entry for {n!r}; pass dimap_scores(model, mode=...) output")
        if scores[n].shape != model.get_parameter(n).shape:
            raise PlanError(f"scores[{n!r}] has shape {tuple(scores[n].shape)}, the weight has "
                            f"{tuple(model.get_parameter(n).shape)}")


def dimap_masks(
        model: nn.Module,
        ratio: float | Mapping[str, float] | None = None,
        mode: str = "module",
        *,
        flops: float | None = None,
        scores: Mapping[str, torch.Tensor] | None = None,
        img_size: int | tuple[int, int] | None = None,
        backend: str = "auto",
) -> dict[str, torch.Tensor]:
    """Faithful DIMAP masks (True = keep) for every prunable weight.

    Args:
        model: the model to prune (not modified).
        ratio: ``rho``, the fraction of each pool's weights to remove: ``floor(rho * |pool|)`` lowest scores go.
            DIMAP1/2/3 are 0.15 / 0.35 / 0.55. With ``mode="module"`` it may be a dict ``{"qkv", "proj", "mlp"}``.
        mode: ``"module"`` (DIMAP: one threshold per QKV-M / PRJ-M / MLP-M), ``"model"`` (ablation: one pool,
            global LAMP) or ``"layer"`` (ablation: uniform magnitude pruning, ``rho`` of every layer).
        flops: instead of ``ratio``: the target fraction of the dense FLOPs to KEEP (e.g. 0.7 removes 30%),
            counted per layer as in :func:`sparsity_report`. A shared ``rho`` is bisected to the smallest value that
            reaches it (see :func:`dimap_ratio_for_flops`).
        scores: precomputed ``dimap_scores(model, mode=mode)`` (to try several ratios without re-scoring).
        img_size: input size for the FLOPs target (default: the model's).
        backend: metric backend (see :func:`dimap_scores`).

    Returns:
        Weight name -> bool mask shaped like the weight, on its device.

    Raises:
        PlanError: bad ratio / mode / scores, both or neither of ``ratio`` and ``flops``, or an unreachable target.
    """
    _check_mode(mode)
    if (ratio is None) == (flops is None):
        raise PlanError("pass exactly one of ratio= or flops=")
    names_by_module = prunable_weights(model)
    pools = _pools(names_by_module, mode)
    if scores is None:
        scores = dimap_scores(model, mode=mode, backend=backend)
    _check_scores(scores, model, [n for v in pools.values() for n in v])
    if flops is not None:
        ratio = dimap_ratio_for_flops(model, flops, mode, scores=scores, img_size=img_size)
    return _masks_at(scores, pools, _ratio_per_pool(ratio, pools, mode))


# ------------------------------------------------------------------------------------------------ FLOPs
@dataclass
class FlopProfile:
    """Dense FLOPs of one forward (batch 1), measured once with ``torch.utils.flop_counter.FlopCounterMode``.

    FLOPs follow FlopCounterMode's convention (2 per multiply-add; MACs = FLOPs / 2). Measured on a meta-device
    copy of the model, so no real compute and no second copy of the weights.

    Attributes:
        total: FLOPs of the whole forward.
        tokens: ``nn.Linear`` module path -> rows (tokens) it processes, recorded by a forward hook.
        linear: ``nn.Linear`` module path -> its FLOPs (``2 * tokens * in * out``).
        attn_matmul: attention module path -> FLOPs of its token-mixing matmuls (q k^T and attn v), i.e. the
            module's FLOPs minus its qkv and proj layers. Linear in the attention width.
        img_size: the input ``(H, W)`` used.
    """

    total: int
    tokens: dict[str, int]
    linear: dict[str, int]
    attn_matmul: dict[str, int]
    img_size: tuple[int, int]


def _meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers live on the meta device (no storage)."""
    memo: dict[int, torch.Tensor] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def _resolve_img_size(model: nn.Module, img_size) -> tuple[int, int]:
    if img_size is None:
        img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is None:
        img_size = getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))[1:]
    if isinstance(img_size, int):
        return img_size, img_size
    return int(img_size[0]), int(img_size[1])


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _in_chans(model: nn.Module) -> int:
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    return proj.in_channels if isinstance(proj, nn.Conv2d) else 3


def flop_profile(model: nn.Module, img_size: int | tuple[int, int] | None = None) -> FlopProfile:
    """Measure dense FLOPs, per-Linear token counts and per-attention matmul FLOPs (see :class:`FlopProfile`).

    Args:
        model: a timm model (not modified; a meta-device copy runs in eval mode).
        img_size: input size; default the model's ``patch_embed.img_size``.
    """
    from torch.utils.flop_counter import FlopCounterMode

    size = _resolve_img_size(model, img_size)
    meta = _meta_copy(model).eval()
    tokens: dict[str, int] = {}
    handles = []
    for path, m in meta.named_modules():
        if isinstance(m, nn.Linear):
            def _hook(mod, inp, out, path=path):
                tokens[path] = tokens.get(path, 0) + inp[0].numel() // mod.in_features
            handles.append(m.register_forward_hook(_hook))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        meta(torch.empty(1, _in_chans(model), *size, device="meta", dtype=_float_dtype(model)))
    for h in handles:
        h.remove()
    per_module = {_strip_root(k): sum(v.values()) for k, v in counter.get_flop_counts().items()}
    linear = {p: per_module.get(p, 0) for p in tokens}
    attn_mm = {}
    for b in find_blocks(model):
        attn_mm[b.attn] = per_module.get(b.attn, 0) - linear.get(f"{b.attn}.qkv", 0) - linear.get(f"{b.attn}.proj", 0)
    return FlopProfile(counter.get_total_flops(), tokens, linear, attn_mm, size)


def _strip_root(fqn: str) -> str:
    """FlopCounterMode names modules ``<RootClass>.<path>``; return ``<path>``."""
    return fqn.split(".", 1)[1] if "." in fqn else ""


def _linear_of(weight_name: str) -> str:
    return weight_name.rsplit(".", 1)[0]


def _unstructured_flops(profile: FlopProfile, kept: Mapping[str, int], numel: Mapping[str, int]) -> int:
    """FLOPs with each prunable Linear costing ``2 * kept_nonzeros * tokens``; everything else dense."""
    saved = 0
    for n, k in kept.items():
        lin = _linear_of(n)
        saved += profile.linear[lin] - 2 * k * profile.tokens[lin]
    return profile.total - saved


class _SortedPools:
    """Sorted scores per pool and per layer, so ``rho -> kept count per layer`` is O(layers * log n).

    Used only by the FLOPs bisection, which evaluates many ratios; a single ratio uses the histogram select.
    """

    def __init__(self, scores: Mapping[str, torch.Tensor], pools: Mapping[str, list[str]]):
        self.pools = pools
        self.layer = {n: torch.sort(scores[n].reshape(-1)).values for names in pools.values() for n in names}
        self.pool = {p: (self.layer[v[0]] if len(v) == 1 else torch.sort(torch.cat([self.layer[n] for n in v])).values)
                     for p, v in pools.items()}

    def kept(self, rho: float) -> dict[str, int]:
        """Kept weights per layer at ratio ``rho``, tie-breaking exactly as :func:`_threshold_masks`."""
        out = {}
        for p, names in self.pools.items():
            pool = self.pool[p]
            k = math.floor(rho * pool.numel())
            if k <= 0:
                out.update({n: self.layer[n].numel() for n in names})
                continue
            tau = pool[k - 1:k]
            less = {n: int(torch.searchsorted(self.layer[n], tau)) for n in names}
            budget = k - sum(less.values())  # ties at tau to prune, first in pool order
            for n in names:
                tied = int(torch.searchsorted(self.layer[n], tau, right=True)) - less[n]
                take = min(budget, tied)
                budget -= take
                out[n] = self.layer[n].numel() - less[n] - take
        return out


def _bisect_ratio(frac_at: Callable[[float], float], target: float, iters: int = 48) -> float:
    """Smallest ``rho`` in [0, 1] (to 2**-iters) with ``frac_at(rho) <= target``; ``frac_at`` is non-increasing."""
    if frac_at(0.0) <= target:
        return 0.0
    floor = frac_at(1.0)
    if floor > target:
        raise PlanError(f"FLOPs target {target:.4f} is unreachable: pruning everything prunable keeps {floor:.4f}")
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if frac_at(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def _check_flops_target(flops: float) -> float:
    try:
        flops = float(flops)
    except (TypeError, ValueError) as e:
        raise PlanError(f"flops must be a fraction in (0, 1], got {flops!r}") from e
    if not 0.0 < flops <= 1.0:
        raise PlanError(f"flops must be the fraction of dense FLOPs to keep, in (0, 1]; got {flops}")
    return flops


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
    _check_mode(mode)
    target = _check_flops_target(flops)
    pools = _pools(prunable_weights(model), mode)
    scores = dimap_scores(model, mode=mode) if scores is None else scores
    profile = profile or flop_profile(model, img_size)
    numel = {n: scores[n].numel() for v in pools.values() for n in v}
    sorted_pools = _SortedPools(scores, pools)
    return _bisect_ratio(lambda r: _unstructured_flops(profile, sorted_pools.kept(r), numel) / profile.total, target)


# ------------------------------------------------------------------------------------------------ report
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
    flops_pruned = _unstructured_flops(profile, kept, numel)
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


# ------------------------------------------------------------------------------------------------ masks in training
class MaskHandle:
    """Keeps masked weights at zero through training; returned by :func:`apply_masks_`.

    Pruned entries of each weight, of its ``.grad`` (post-accumulate-grad hook) and -- when an optimizer is given --
    of every optimizer state tensor shaped like it (AdamW ``exp_avg`` / ``exp_avg_sq`` / ``max_exp_avg_sq``, SGD
    ``momentum_buffer``) are re-zeroed after every ``optimizer.step()`` (step post-hook), so momentum and weight
    decay cannot revive them. ``remove()`` (or leaving the ``with`` block) drops the hooks; the weights stay as
    they are.
    """

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor], optimizer=None):
        self.optimizer = optimizer
        self.params: list[tuple[nn.Parameter, torch.Tensor]] = []  # (weight, bool "pruned" mask)
        for n, keep in masks.items():
            p = model.get_parameter(n)
            self.params.append((p, (~keep.to(torch.bool)).to(p.device)))
        self._handles = []
        for p, pruned in self.params:
            if p.requires_grad:
                self._handles.append(p.register_post_accumulate_grad_hook(_zero_grad_hook(pruned)))
        if optimizer is not None:
            self._handles.append(optimizer.register_step_post_hook(lambda opt, args, kwargs: self.reapply()))
        self.reapply()

    @torch.no_grad()
    def reapply(self) -> None:
        """Zero the pruned entries of the weights, their gradients and the optimizer state."""
        state = self.optimizer.state if self.optimizer is not None else {}
        for p, pruned in self.params:
            p.masked_fill_(pruned, 0)
            if p.grad is not None:
                p.grad.masked_fill_(pruned, 0)
            for v in state.get(p, {}).values():
                if isinstance(v, torch.Tensor) and v.shape == p.shape:
                    v.masked_fill_(pruned, 0)

    def remove(self) -> None:
        """Drop the gradient and optimizer hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> MaskHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _zero_grad_hook(pruned: torch.Tensor):
    def hook(p: torch.Tensor) -> None:
        p.grad.masked_fill_(pruned, 0)

    return hook


def apply_masks_(model: nn.Module, masks: Mapping[str, torch.Tensor], optimizer=None) -> MaskHandle:
    """Zero masked weights in place and keep them zero through fine-tuning.

    Args:
        model: the model (modified in place).
        masks: parameter name -> bool keep-mask shaped like the parameter (True = keep), e.g. from
            :func:`dimap_masks`.
        optimizer: the fine-tuning optimizer. Without it only weights and gradients are masked, and momentum
            accumulated before masking could revive pruned weights.

    Returns:
        A :class:`MaskHandle`; call ``.remove()`` to drop the hooks.

    Raises:
        PlanError: an unknown parameter name, or a mask of the wrong shape or dtype.
    """
    params = dict(model.named_parameters())
    for n, m in masks.items():
        if n not in params:
            raise PlanError(f"mask for unknown parameter {n!r}")
        if m.shape != params[n].shape:
            raise PlanError(f"masks[{n!r}] has shape {tuple(m.shape)}, the parameter has {tuple(params[n].shape)}")
        if m.dtype != torch.bool:
            raise PlanError(f"masks[{n!r}] must be a bool tensor (True = keep), got {m.dtype}")
    return MaskHandle(model, masks, optimizer)


# ------------------------------------------------------------------------------------------------ structured plans
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
    heads: str


def _structured_state(model: nn.Module, heads: str, mode: str, dtype, backend: str) -> _StructuredState:
    blocks = find_blocks(model)
    unit = {k: v.detach().to("cpu", torch.float64) for k, v in
            _structured_unit_scores(model, blocks, heads, "module", dtype, backend).items()}
    channel = dict(unit)
    if heads == "whole":
        for b in blocks:
            channel[b.attn] = unit[b.attn].repeat_interleave(b.head_dim)
    if mode == "module":
        pools = {"attn": [b.attn for b in blocks], "mlp": [b.mlp for b in blocks]}
    else:
        pools = {"model": [n for b in blocks for n in (b.attn, b.mlp)]}
    sorted_pool = {p: torch.sort(torch.cat([unit[n] for n in names])).values for p, names in pools.items()}
    return _StructuredState(blocks, channel, unit, pools, sorted_pool, heads)


def _tau(sorted_pool: torch.Tensor, rho: float) -> float:
    k = math.floor(rho * sorted_pool.numel())
    return -math.inf if k <= 0 else float(sorted_pool[k - 1])


def _keep_attn(b: DimapBlock, unit: torch.Tensor, channel: torch.Tensor, tau: float, heads: str):
    """Kept channels and head count of one attention; the emergent count is forced to a uniform head_dim."""
    if heads == "whole":
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
        keep[b.attn], heads[b.attn] = _keep_attn(b, state.unit[b.attn], state.channel[b.attn], tau[b.attn],
                                                 state.heads)
        s = state.unit[b.mlp]
        keep[b.mlp] = _top_ascending(s, max(1, int((s > tau[b.mlp]).sum())))
    return keep, heads


def _structured_flops(profile: FlopProfile, blocks: list[DimapBlock], keep: Mapping[str, torch.Tensor]) -> int:
    """FLOPs of the physically pruned model: every Linear and attention matmul scales with its kept width."""
    saved = 0
    for b in blocks:
        attn = profile.linear[f"{b.attn}.qkv"] + profile.linear[f"{b.attn}.proj"] + profile.attn_matmul[b.attn]
        mlp = profile.linear[f"{b.mlp}.fc1"] + profile.linear[f"{b.mlp}.fc2"]
        # integers: each term is a multiple of its width (every FLOP count is linear in it)
        saved += attn * (b.attn_dim - len(keep[b.attn])) // b.attn_dim + mlp * (b.hidden - len(keep[b.mlp])) // b.hidden
    return profile.total - saved


def dimap_structured_plan(
        model: nn.Module,
        ratio: float | None = None,
        flops: float | None = None,
        heads: str = "dims",
        mode: str = "module",
        *,
        img_size: int | tuple[int, int] | None = None,
        dtype: torch.dtype | None = None,
        backend: str = "auto",
):
    """Structured DIMAP plan (our adaptation): one threshold per module across the network.

    Units are scored as in ``dimap_scores(model, structured=True, heads=heads)``. Within each module -- ``attn``
    (QKV and PRJ together: a channel removes q/k/v rows and a proj column) and ``mlp`` -- the ``floor(rho * n)``
    lowest-scoring units of the whole network are removed, so per-block widths are emergent (unlike ``make_plan``,
    which keeps the same ratio in every block). Attention keeps a uniform head_dim: with ``heads="dims"`` each
    block's emergent channel count is rounded to the nearest multiple of ``num_heads`` and every head keeps its top
    channels by score; with ``heads="whole"`` heads are the units and the kept heads keep all their channels.
    Every block keeps at least one MLP unit and one channel (or head) per attention. Residual widths are untouched.

    Args:
        model: a timm VisionTransformer / SwinTransformer (not modified).
        ratio: ``rho``, the fraction of each module's units (attention channels or heads; MLP hidden units) to
            remove network-wide.
        flops: instead of ``ratio``: target fraction of the dense FLOPs to KEEP. ``rho`` is bisected to the smallest
            value whose pruned model reaches it; FLOPs of the pruned shapes are the ``FlopCounterMode`` measurements
            of the dense model (:func:`flop_profile`) scaled per Linear and per attention by the kept width, which
            is exact for channel pruning (the tests check it against ``FlopCounterMode`` on the pruned model).
        heads: ``"dims"`` or ``"whole"``.
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
    from ..arch import describe
    from ..plan import Plan

    _check_mode(mode, ("module", "model"))
    _check_heads(heads)
    if (ratio is None) == (flops is None):
        raise PlanError("pass exactly one of ratio= or flops=")
    space = describe(model)
    state = _structured_state(model, heads, mode, dtype, backend)
    missing = [n for n in state.unit if n not in space.groups]
    if missing:
        raise PlanError(f"groups {missing[:3]} are not in describe(model); cannot build a plan")
    if flops is not None:
        profile = flop_profile(model, img_size)
        target = _check_flops_target(flops)

        def frac_at(r: float) -> float:
            return _structured_flops(profile, state.blocks, _structured_keep(state, r)[0]) / profile.total

        ratio = _bisect_ratio(frac_at, target, iters=40)
    keep, new_heads = _structured_keep(state, _check_ratio(ratio))
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
