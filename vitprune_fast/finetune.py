"""Soft-distillation fine-tuning of a pruned model against its unpruned teacher, and top-1 evaluation.

The loss is UP-ViTs' ``L = CE(y, p) + α·KL(q ‖ p)`` at temperature 1, with ``p`` the student's and ``q`` the
teacher's softmax, CE averaged over the batch and the KL summed over classes and averaged over the batch
("batchmean", the mathematically correct per-sample KL).

**Default α = 6.4.** UP-ViTs' released ``main_distill.py`` weighs ``0.2 · Σ_batch KL`` against a batch-mean CE
on 32 images per GPU, i.e. ``α ≈ 0.2 × 32 = 6.4`` per sample once the KL is mean-reduced. We keep that weight:
after pruning, the teacher's full output distribution is a much richer per-image signal than the one-hot label
(it says how the unpruned function ranks every class), and the short recovery fine-tunes this library targets
mostly need to pull the student back onto that function, so the KL term should dominate while CE still anchors
the labels. Pass ``alpha=0`` for plain cross-entropy training.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import ConfigError, InputError

DEFAULT_ALPHA = 6.4


def distillation_loss(logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                      alpha: float = DEFAULT_ALPHA, temperature: float = 1.0) -> torch.Tensor:
    """``CE(y, p) + α·KL(q ‖ p)`` (KL batch-mean; ``T²``-scaled when ``temperature != 1``).

    Args:
        logits: student logits [B, K].
        targets: labels [B] (int64).
        teacher_logits: teacher logits [B, K] (treated as constants); ``None`` gives plain CE.
        alpha: KL weight α (see module docstring for the default).
        temperature: softmax temperature of both distributions in the KL term.

    Returns:
        Scalar loss.
    """
    ce = F.cross_entropy(logits, targets)
    if teacher_logits is None or alpha == 0:
        return ce
    t = temperature
    log_p = F.log_softmax(logits / t, dim=-1)  # [B, K] student
    log_q = F.log_softmax(teacher_logits.detach() / t, dim=-1)  # [B, K] teacher
    kl = F.kl_div(log_p, log_q, reduction="batchmean", log_target=True)  # Σ_k q (log q − log p), mean over B
    return ce + alpha * (t * t) * kl


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, progress: bool = False, desc: str = "eval") -> float:
    """Top-1 accuracy (a fraction in [0, 1]) of ``model`` over ``loader``'s ``(images, labels)`` batches."""
    p = next(model.parameters())
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for x, y in tqdm(loader, desc=desc, disable=not progress, leave=False):
            pred = model(x.to(p.device, p.dtype)).argmax(-1).cpu()
            correct += int((pred == y).sum())
            total += len(y)
    finally:
        model.train(was_training)
    if total == 0:
        raise InputError("evaluation loader yielded no images")
    return correct / total


def _lr_at(step: int, steps: int, warmup: int, lr: float) -> float:
    """Linear warm-up then cosine decay to zero."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * frac))


def train(model: nn.Module, loader: Iterable, steps: int, lr: float = 1e-3, weight_decay: float = 0.05,
          teacher: nn.Module | None = None, alpha: float = DEFAULT_ALPHA, temperature: float = 1.0,
          warmup: int | None = None, grad_clip: float | None = 1.0, optimizer: torch.optim.Optimizer | None = None,
          augment: Callable[[torch.Tensor], torch.Tensor] | None = None, progress: bool = True,
          desc: str = "train") -> list[float]:
    """Train ``model`` for ``steps`` optimizer steps (cycling ``loader``), with distillation when ``teacher`` is given.

    Args:
        model: the student (trained in place; left in eval mode).
        loader: re-iterable ``(images, labels)`` batches, or ``(images, labels, teacher logits)`` when the teacher's
            outputs were computed once beforehand (no augmentation: they are the same at every epoch).
        steps: optimizer steps.
        lr: peak AdamW learning rate (linear warm-up, then cosine to 0).
        weight_decay: AdamW weight decay.
        teacher: unpruned model giving the soft targets (eval mode, no grad); ``None``: plain CE.
        alpha: KL weight (:data:`DEFAULT_ALPHA`).
        temperature: distillation temperature.
        warmup: warm-up steps (default 10 % of ``steps``).
        grad_clip: max gradient norm (``None``: no clipping).
        optimizer: an existing optimizer to keep using (its lr is driven by the schedule); default a new AdamW.
        augment: batch transform applied to the images (not with precomputed teacher logits).
        progress: tqdm bar.
        desc: bar label.

    Returns:
        The loss of every step.
    """
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    p0 = next(model.parameters())
    opt = optimizer or torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 10) if warmup is None else warmup
    if teacher is not None:
        teacher.eval()
    batches = itertools.chain.from_iterable(itertools.repeat(loader))  # cycle without caching a whole epoch
    losses = []
    model.train()
    with tqdm(total=steps, desc=desc, disable=not progress, leave=False) as bar:
        for step, batch in zip(range(steps), batches, strict=False):  # stops after `steps`
            x, y = batch[0].to(p0.device, p0.dtype), batch[1].to(p0.device)
            t_logits = batch[2].to(p0.device, p0.dtype) if len(batch) > 2 else None
            if augment is not None:
                if t_logits is not None:
                    raise ConfigError("augment cannot be combined with precomputed teacher logits")
                x = augment(x)
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, steps, warmup, lr)
            if teacher is not None and t_logits is None:
                with torch.no_grad():
                    t_logits = teacher(x)
            loss = distillation_loss(model(x), y, t_logits, alpha, temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
            bar.update()
    model.eval()
    return losses
