"""Baseline scores through the same group / Plan path: group magnitude, random and first-order Taylor."""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..arch import describe, model_output
from ..errors import ConfigError, InputError
from ..space import Group, tensor_of


def _per_channel(g: Group, values: Callable[[str], torch.Tensor | None]) -> torch.Tensor:
    """Sum ``values(tensor name)`` over every tensor slice of ``g``, per group channel.

    ``values`` returns a tensor shaped like the named tensor (or ``None`` to skip it). Entry ``i`` along a slice's
    ``dim`` belongs to channel ``c`` when ``i`` is in the slice's index map ``{r * stride + c}``. Per-head slices
    (Swin relative-position bias columns) are left out: they belong to whole heads, not channels.

    Returns:
        float64 [g.size] on the CPU.
    """
    acc = torch.zeros(g.size, dtype=torch.float64)
    every = torch.arange(g.size)
    for sl in g.slices:
        if sl.per_head:
            continue
        v = values(sl.name)
        if v is None:
            continue
        v = v.detach().double()
        dims = [d for d in range(v.dim()) if d != sl.dim]
        per_index = (v.sum(dims) if dims else v).cpu()  # [v.shape[sl.dim]]
        acc += per_index[sl.indices(every)].view(sl.repeats, g.size).sum(0)  # fold the r * stride + c copies
    return acc


def magnitude_scores(model: nn.Module, p: int = 2) -> dict[str, torch.Tensor]:
    """Group magnitude: the L``p`` norm of every weight a channel owns, over all tensors of its group.

    Per-head tensors (Swin relative-position bias) are left out: they belong to whole heads.
    """
    if p not in (1, 2):
        raise ConfigError(f"p must be 1 or 2, got {p}")
    space = describe(model)
    out = {}
    with torch.no_grad():
        for name, g in space.groups.items():
            def values(t_name):
                t = tensor_of(model, t_name).detach()
                return t.abs() if p == 1 else t.double().square()

            acc = _per_channel(g, values)
            out[name] = acc if p == 1 else acc.sqrt()
    return out


def random_scores(model: nn.Module, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Uniform random scores (the random-pruning baseline)."""
    return {n: torch.rand(g.size, generator=generator, dtype=torch.float64) for n, g in describe(model).groups.items()}


def taylor_scores(
        model: nn.Module,
        batches: Iterable,
        num_batches: int | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        progress: bool = False,
) -> dict[str, torch.Tensor]:
    """First-order Taylor importance of every channel group (Molchanov et al. 2019, group form).

    Removing channel ``c`` sets the weights ``w_c`` it owns (over every tensor of its group) to zero; to first
    order that changes the loss by ``-Σ w_c · ∂L/∂w_c``. The score is the magnitude of that estimate per batch,
    summed over batches::

        s_c = Σ_batches | Σ_{tensors t of the group} Σ_{entries i of c in t} t_i · ∂L_batch/∂t_i |

    (absolute value per batch, because a trained model's batch-averaged gradient is near zero and its signs
    cancel across batches). ``L_batch`` is the mean task loss of the batch. The model runs in eval mode (no
    dropout) and is not modified; its ``.grad`` fields are left untouched.

    Args:
        model: a timm ViT / Swin.
        batches: ``(images, labels)`` batches (e.g. a DataLoader).
        num_batches: use at most this many batches (default: all).
        loss_fn: ``loss_fn(logits, labels)``; default cross-entropy.
        progress: tqdm bar.

    Returns:
        ``{group name: float64 [size] scores}`` (higher = more important).
    """
    space = describe(model)
    loss_fn = loss_fn or F.cross_entropy
    params = dict(model.named_parameters())
    names = sorted({sl.name for g in space.groups.values() for sl in g.slices if sl.name in params})
    tensors = [params[n] for n in names]
    flags = [t.requires_grad for t in tensors]
    device, dtype = tensors[0].device, tensors[0].dtype
    scores = {n: torch.zeros(g.size, dtype=torch.float64) for n, g in space.groups.items()}
    seen = 0
    was_training = model.training
    model.eval()
    try:
        for t in tensors:
            t.requires_grad_(True)
        it = batches if num_batches is None else itertools.islice(batches, num_batches)
        for x, y in tqdm(it, desc="Taylor", total=num_batches, disable=not progress, leave=False):
            loss = loss_fn(model_output(model, x.to(device, dtype)), y.to(device))
            # allow_unused: a parameter the forward does not read (transformers DINOv2's mask_token) scores nothing
            grads = dict(zip(names, torch.autograd.grad(loss, tensors, allow_unused=True), strict=True))
            with torch.no_grad():
                w_grad = {k: params[k] * gr for k, gr in grads.items() if gr is not None}  # w ⊙ ∂L/∂w per tensor
                for n, g in space.groups.items():
                    scores[n] += _per_channel(g, w_grad.get).abs()
            seen += 1
    finally:
        for t, f in zip(tensors, flags, strict=True):
            t.requires_grad_(f)
        model.train(was_training)
    if seen == 0:
        raise InputError("taylor_scores: the data yielded no batches")
    return scores
