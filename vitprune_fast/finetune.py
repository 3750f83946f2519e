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

import contextlib
import itertools
import os
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from tqdm.auto import tqdm

from . import distributed
from .arch import model_output
from .distributed import dist_info
from .errors import CheckpointError, ConfigError, InputError

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
    """Top-1 accuracy (a fraction in [0, 1]) of ``model`` over ``loader``'s ``(images, labels)`` batches.

    Under torch.distributed every rank passes the same loader and evaluates every world-th batch; the counts are
    summed over the ranks, so each image counts once and every rank returns the same accuracy.
    """
    rank, world = dist_info()
    p = next(model.parameters())
    was_training = model.training
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64, device=p.device)  # correct, total
    try:
        for i, (x, y) in enumerate(tqdm(loader, desc=desc, disable=not progress or rank > 0, leave=False)):
            if i % world != rank:
                continue
            pred = model_output(model, x.to(p.device, p.dtype)).argmax(-1).cpu()
            counts += torch.tensor([int((pred == y).sum()), len(y)], dtype=torch.float64, device=p.device)
    finally:
        model.train(was_training)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(counts)
    if counts[1] == 0:
        raise InputError("evaluation loader yielded no images")
    return float(counts[0] / counts[1])


def lr_scheduler(optimizer: torch.optim.Optimizer, steps: int, warmup: int) -> LRScheduler:
    """Linear warm-up then cosine decay to zero, from ``torch.optim.lr_scheduler``; one ``step()`` per update.

    The learning rate of update k (0-based) is ``lr * (k + 1) / warmup`` for ``k < warmup``, then
    ``lr * (1 + cos(pi * (k - warmup) / (steps - warmup))) / 2``, where ``lr`` is each group's ``initial_lr``.
    """
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    warmup = min(max(0, warmup), steps - 1)
    cosine = CosineAnnealingLR(optimizer, T_max=max(1, steps - warmup), eta_min=0.0)
    if warmup < 1:
        return cosine
    ramp = LinearLR(optimizer, start_factor=1 / warmup, end_factor=1.0, total_iters=max(1, warmup - 1))
    return SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])


def _batches(loader: Iterable) -> Iterator:
    """``loader`` cycled; a sampler with ``set_epoch`` (DistributedSampler) gets the pass number first."""
    for epoch in itertools.count():
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        yield from loader


CHECKPOINT_KIND = "vitprune_fast.finetune/1"


def train(model: nn.Module, loader: Iterable, steps: int, lr: float = 1e-3, weight_decay: float = 0.05,
          teacher: nn.Module | None = None, alpha: float = DEFAULT_ALPHA, temperature: float = 1.0,
          warmup: int | None = None, grad_clip: float | None = 1.0, optimizer: torch.optim.Optimizer | None = None,
          augment: Callable[[torch.Tensor], torch.Tensor] | None = None, progress: bool = True,
          desc: str = "train", *, amp_dtype: torch.dtype | None = None, accum_steps: int = 1,
          checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 0) -> list[float]:
    """Train ``model`` for ``steps`` optimizer steps (cycling ``loader``), with distillation when ``teacher`` is given.

    Under torch.distributed (torchrun) the model trains in DistributedDataParallel: give every rank its own shard
    of the data (e.g. a DistributedSampler, whose ``set_epoch`` is called at every pass); rank 0 writes the
    checkpoint; the returned losses are averaged over the ranks.

    Args:
        model: the student (trained in place; left in eval mode).
        loader: re-iterable ``(images, labels)`` batches, or ``(images, labels, teacher logits)`` when the teacher's
            outputs were computed once beforehand (no augmentation: they are the same at every epoch).
        steps: optimizer steps.
        lr: peak AdamW learning rate (linear warm-up, then cosine to 0: :func:`lr_scheduler`).
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
        amp_dtype: autocast dtype, e.g. ``torch.bfloat16`` (on CUDA); None: full precision.
        accum_steps: batches per optimizer step (gradients accumulated; under DDP synchronised once per step).
        checkpoint: resume file: loaded when it exists (model, optimizer, schedule, global RNG of every rank,
            step, losses; checked first), written every ``checkpoint_every`` steps (temporary file, then a rename).
            The resumed run replays the loader up to its position, so with a loader whose order depends only on
            its own seeded generator (or a DistributedSampler's seed) it continues exactly where it stopped.
        checkpoint_every: steps between checkpoint writes (0: never write).

    Returns:
        The loss of every step (averaged over the accumulated batches and the ranks).
    """
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    if accum_steps < 1:
        raise ConfigError(f"accum_steps must be >= 1, got {accum_steps}")
    if checkpoint_every < 0 or (checkpoint_every and checkpoint is None):
        raise ConfigError(f"checkpoint_every must be >= 0 and needs a checkpoint path, got {checkpoint_every}")
    p0 = next(model.parameters())
    opt = optimizer or torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    for group in opt.param_groups:  # the schedule's peak is `lr`, whatever the optimizer held before
        group["lr"] = group["initial_lr"] = lr
    sched = lr_scheduler(opt, steps, max(1, steps // 10) if warmup is None else warmup)
    if teacher is not None:
        teacher.eval()
    losses: list[float] = []
    start = 0
    if checkpoint is not None and os.path.exists(checkpoint):
        start = _load_train_checkpoint(checkpoint, model, opt, sched, losses)
    net = distributed.wrap(model)
    batches = _batches(loader)
    for _ in range(start * accum_steps):  # replay the data order up to the checkpoint
        next(batches)
    model.train()
    amp = dict(device_type=p0.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None)
    with tqdm(total=steps, initial=start, desc=desc, disable=not progress or not distributed.is_main(),
              leave=False) as bar:
        for step in range(start, steps):
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for micro in range(accum_steps):
                batch = next(batches)
                x, y = batch[0].to(p0.device, p0.dtype), batch[1].to(p0.device)
                t_logits = batch[2].to(p0.device, p0.dtype) if len(batch) > 2 else None
                if augment is not None:
                    if t_logits is not None:
                        raise ConfigError("augment cannot be combined with precomputed teacher logits")
                    x = augment(x)
                sync = micro == accum_steps - 1 or net is model  # DDP: all-reduce on the last batch of the step
                with contextlib.nullcontext() if sync else net.no_sync(), torch.autocast(**amp):
                    if teacher is not None and t_logits is None:
                        with torch.no_grad():
                            t_logits = model_output(teacher, x)
                    logits = model_output(net, x)
                    logits = logits.float() if amp_dtype is not None else logits  # loss in fp32 under autocast
                    loss = distillation_loss(logits, y, t_logits, alpha, temperature) / accum_steps
                loss.backward()
                total += loss.item()
            if grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            sched.step()
            losses.append(distributed.mean_over_ranks(total, p0.device))
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
            bar.update()
            if checkpoint_every and (step + 1) % checkpoint_every == 0:
                _save_train_checkpoint(checkpoint, step + 1, model, opt, sched, losses)
    model.eval()
    return losses


def rng_states(device: torch.device) -> dict:
    """The global RNG states of every rank (CPU, and ``device``'s CUDA generator), gathered on every rank."""
    mine = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    return {"per_rank": distributed.gather_objects(mine)}


def set_rng_states(states: dict, device: torch.device) -> None:
    """Restore this rank's entry of :func:`rng_states` (a run resumed on another world size gets rank 0's)."""
    rank, _ = distributed.dist_info()
    per_rank = states["per_rank"]
    mine = per_rank[rank] if rank < len(per_rank) else per_rank[0]
    torch.set_rng_state(mine["cpu"])
    if mine["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda"], device)


def _save_train_checkpoint(path, step: int, model: nn.Module, opt, sched, losses: list[float]) -> None:
    rng = rng_states(next(model.parameters()).device)  # collective: every rank takes part
    if distributed.is_main():
        tmp = f"{os.fspath(path)}.tmp"
        torch.save(dict(kind=CHECKPOINT_KIND, step=step, model=model.state_dict(), optimizer=opt.state_dict(),
                        scheduler=sched.state_dict(), losses=losses, rng=rng), tmp)
        os.replace(tmp, path)
    distributed.barrier()  # nobody reads (or resumes from) a half-written file


def _load_train_checkpoint(path, model: nn.Module, opt, sched, losses: list[float]) -> int:
    """Restore a :func:`train` checkpoint into the run's objects; returns the step to continue from."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling / zip errors of a damaged or foreign file
        raise CheckpointError(f"cannot read training checkpoint {path}: {e}") from e
    keys = {"kind", "step", "model", "optimizer", "scheduler", "losses", "rng"}
    if not isinstance(ck, dict) or ck.get("kind") != CHECKPOINT_KIND or set(ck) != keys:
        raise CheckpointError(f"{path} is not a vitprune_fast.finetune.train checkpoint")
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:  # missing / unexpected keys or shapes: another model
        raise CheckpointError(f"{path} was saved for another model: {e}") from e
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    losses[:] = ck["losses"]
    set_rng_states(ck["rng"], next(model.parameters()).device)
    return ck["step"]
