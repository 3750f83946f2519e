"""The normalisation layers a pruned width may flow through (LayerNorm, RMSNorm) and their masked forms.

Removing channels from the input of a norm changes its statistics: the pruned model normalises over the kept
channels only. :func:`masked_norm` computes exactly that on the unpruned width (removed channels come out 0), which
is how masking reproduces removal (README, 'What is exact, and the choices we made') and how the UP-ViTs engines
score a removed channel.
"""
from __future__ import annotations

import torch
from torch import nn

from .kernels.masked_layernorm import masked_layer_norm
from .kernels.utils import acc_dtype


def is_rms_norm(m: nn.Module) -> bool:
    """timm ``RmsNorm`` (and subclasses) or torch ``nn.RMSNorm``: ``x / sqrt(mean(x²) + eps) * weight``."""
    from timm.layers import RmsNorm

    return isinstance(m, (RmsNorm, nn.RMSNorm))


def is_norm(m: nn.Module) -> bool:
    """A norm over the last dim whose width can be pruned: LayerNorm (timm's subclasses too) or RMSNorm."""
    return isinstance(m, nn.LayerNorm) or is_rms_norm(m)


def is_affine_norm(m: nn.Module) -> bool:
    """:func:`is_norm` with a per-channel weight (a width to slice)."""
    return is_norm(m) and getattr(m, "weight", None) is not None


def _eps(norm: nn.Module, x: torch.Tensor) -> float:
    eps = getattr(norm, "eps", None)
    return torch.finfo(x.dtype).eps if eps is None else eps  # nn.RMSNorm's default eps=None


def masked_rms_norm(x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None, eps: float,
                    compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """RMSNorm over the kept channels of each sample; removed channels come out exactly 0 (plain torch).

    ``y[r, keep] == x[r, keep] / sqrt(mean(x[r, keep]²) + eps) * weight[keep]`` with ``keep = mask[r // (M / S)]``,
    the layout of :func:`kernels.masked_layernorm.masked_layer_norm`.

    Args:
        x: ``[..., D]``; leading dims are flattened to ``M`` rows.
        mask: ``[S, D]`` or ``[D]`` keep-mask (non-zero = kept); ``M`` a multiple of ``S``.
        weight: optional ``[D]`` weight.
        eps: added to the mean square.
        compute_dtype: accumulation dtype (default: fp32, fp64 for fp64 ``x``); the result has ``x.dtype``.
    """
    d = x.shape[-1]
    s = 1 if mask.dim() == 1 else mask.shape[0]
    dtype = compute_dtype or acc_dtype(x)
    xs = x.to(dtype).reshape(s, -1, d)  # [S, rows per sample, D]
    keep = (mask.reshape(s, 1, d) != 0).to(dtype)
    xk = xs * keep
    ms = (xk * xk).sum(-1, keepdim=True) / keep.sum(-1, keepdim=True)
    y = xk * torch.rsqrt(ms + eps)
    if weight is not None:
        y = y * weight.to(dtype)
    return y.reshape(x.shape).to(x.dtype)


def masked_norm(norm: nn.Module, x: torch.Tensor, mask: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """``norm(x)`` of the model whose channels ``~mask`` were removed, at the unpruned width (removed -> 0).

    Args:
        norm: a LayerNorm or RMSNorm over ``x``'s last dim.
        x: ``[..., D]``.
        mask: ``[S, D]`` / ``[D]`` keep-mask (see :func:`masked_rms_norm` for the row layout).
        backend: LayerNorm kernel backend (``"torch"`` / ``"triton"`` / ``"auto"``); RMSNorm runs in plain torch.
    """
    if is_rms_norm(norm):
        return masked_rms_norm(x, mask, norm.weight, _eps(norm, x))
    return masked_layer_norm(x, mask, norm.weight, norm.bias, norm.eps, backend=backend)


def group_norms(model: nn.Module, group) -> list[tuple[nn.Module, object]]:
    """The norms over a :class:`~vitprune_fast.space.Group`'s channels, with the slice that maps them: a residual's
    LayerNorms / RMSNorms, an attention's scale-norm, an MLP's sub-norm."""
    out = []
    for sl in group.slices:
        path, _, pname = sl.name.rpartition(".")
        mod = model.get_submodule(path) if path else model
        if pname == "weight" and is_affine_norm(mod):
            out.append((mod, sl))
    return out


class MaskedNorm(nn.Module):
    """Drop-in replacement for a LayerNorm / RMSNorm whose input has removed channels (plain-torch path).

    Args:
        norm: the norm it replaces (its parameters are shared, not copied).
        mask: ``[D]`` bool keep-mask.
    """

    def __init__(self, norm: nn.Module, mask: torch.Tensor):
        super().__init__()
        self.norm = norm
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return masked_norm(self.norm, x, self.mask, backend="torch")


__all__ = ["MaskedNorm", "group_norms", "is_affine_norm", "is_norm", "is_rms_norm", "masked_norm", "masked_rms_norm"]
