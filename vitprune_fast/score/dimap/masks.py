"""Faithful DIMAP masks (one threshold per module) and keeping masked weights at zero through fine-tuning."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ...errors import PlanError
from .blocks import prunable_weights
from .metric import check_mode, dimap_scores
from .report import dimap_ratio_for_flops
from .thresholds import masks_at, pools_for, ratio_per_pool


def check_scores(scores: Mapping[str, torch.Tensor], model: nn.Module, names: Iterable[str]) -> None:
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
    check_mode(mode)
    if (ratio is None) == (flops is None):
        raise PlanError("pass exactly one of ratio= or flops=")
    names_by_module = prunable_weights(model)
    pools = pools_for(names_by_module, mode)
    if scores is None:
        scores = dimap_scores(model, mode=mode, backend=backend)
    check_scores(scores, model, [n for v in pools.values() for n in v])
    if flops is not None:
        ratio = dimap_ratio_for_flops(model, flops, mode, scores=scores, img_size=img_size)
    return masks_at(scores, pools, ratio_per_pool(ratio, pools, mode))



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
