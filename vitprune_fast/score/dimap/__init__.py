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

Modules, one job each: ``blocks`` (which weights, asked of the model's adapter), ``metric`` (scores), ``thresholds``
(module-wise selection), ``masks`` (faithful masks, kept through fine-tuning), ``report`` (parameters and per-layer
FLOPs of masked models), ``structured`` (structured plans). Dense FLOPs come from :mod:`vitprune_fast.flops`.
"""
from .blocks import MODULES, DimapBlock, find_blocks, prunable_weights
from .masks import MaskHandle, apply_masks_, dimap_masks
from .metric import ATTN_MODES, MODES, dimap_scores, lamp_scores
from .report import dimap_ratio_for_flops, sparsity_report
from .structured import dimap_structured_plan, structured_plan_flops
from .thresholds import kth_smallest

__all__ = ["ATTN_MODES", "MODES", "MODULES", "DimapBlock", "MaskHandle", "apply_masks_", "dimap_masks",
           "dimap_ratio_for_flops", "dimap_scores", "dimap_structured_plan", "find_blocks", "kth_smallest",
           "lamp_scores", "prunable_weights", "sparsity_report", "structured_plan_flops"]
