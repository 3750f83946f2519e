"""``finetune_dap``: a short DAP fine-tune that ends with the physically pruned model, resumable."""
from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import nn

from .. import distributed
from ..arch import model_output
from ..errors import CheckpointError, ConfigError, InputError
from ..inputs import check_images
from ..plan import Plan
from .pruner import DAP
from .schedule import Schedule


def finetune_dap(model: nn.Module, train_loader: Iterable, target: float = 0.5, steps: int = 1000,
                 lr: float = 5e-4, *, schedule: Schedule | None = None, weight_decay: float = 0.05,
                 teacher: nn.Module | None = None, distill_alpha: float | None = None,
                 amp_dtype: torch.dtype | None = None, eval_mode: bool = False, log_every: int = 1,
                 dap_kwargs: dict | None = None, progress: bool = False, checkpoint: str | os.PathLike | None = None,
                 checkpoint_every: int = 0) -> tuple[nn.Module, Plan, dict]:
    """A short DAP fine-tune that ends with the physically pruned model.

    AdamW at a constant learning rate (the reference uses no LR schedule while pruning), task loss =
    cross-entropy, plus soft distillation from ``teacher`` (``finetune.distillation_loss``) when given; the probe
    losses are added with weight 1. After ``steps`` steps (the schedule's final update must fall inside them)
    the model is pruned in place by :meth:`DAP.finalize` (AdamW state sliced along).

    Args:
        model: timm ViT/DeiT/Swin (on its target device).
        train_loader: re-iterable ``(images, labels)`` batches; cycled.
        target: fraction of the parameters to remove.
        steps: optimizer steps.
        lr: AdamW learning rate of the model.
        schedule: default ``Schedule.for_steps(steps)``.
        weight_decay: on weights (not on biases, norms, tokens, position embeddings).
        teacher: optional unpruned model for soft distillation.
        distill_alpha: KL weight (default ``finetune.DEFAULT_ALPHA``).
        amp_dtype: autocast dtype (e.g. ``torch.bfloat16``) or None.
        eval_mode: train in eval mode like the reference (no drop-path; probe BatchNorms on running stats).
        log_every: record the losses every this many steps.
        dap_kwargs: more :class:`DAP` arguments (``attn_mode``, ``batched``, ``**FAITHFUL``, ...).
        progress: tqdm bar.
        checkpoint: resume file. If it exists, the model, the AdamW state, the DAP state
            (:meth:`DAP.state_dict`), the logged losses and the global RNG state of every rank (CPU, and the model's
            CUDA device) are loaded from it (checked against this run's model and DAP arguments first) and the run
            goes on from its step, after replaying the loader up to that position: with a loader whose order depends
            only on its own seeded generator (or a DistributedSampler's seed), it continues exactly. Written by rank
            0 every ``checkpoint_every`` steps (a temporary file, then a rename).
        checkpoint_every: steps between checkpoint writes (0: never write).

    Under torch.distributed (torchrun) the model trains in DistributedDataParallel and DAP averages its statistics
    over the ranks (every rank makes the same decisions); give every rank its own shard of the data. The pruned
    model is the same on every rank.

    Raises:
        InputError: a batch the model cannot take (checked before its forward; on the first batch the model is left
            as it came).

    Returns:
        ``(model, plan, history)``: the same model object, pruned; the applied Plan; a dict with ``step``,
        ``loss``, ``probe_loss`` lists, ``updates`` (every mask update: ΔΨ, κ goal, units, kept params),
        ``params_before``, ``params_after``, ``target_params``, ``tolerance``, ``keep_ratios``.
    """
    from tqdm.auto import tqdm

    from ..finetune import DEFAULT_ALPHA, _batches, distillation_loss, rng_states

    schedule = schedule or Schedule.for_steps(steps)
    if checkpoint_every < 0 or (checkpoint_every and checkpoint is None):
        raise ConfigError(f"checkpoint_every must be >= 0 and needs a checkpoint path, got {checkpoint_every}")
    if schedule.final > steps:
        raise ConfigError(f"the schedule's final update is after step {schedule.final}, but only {steps} steps run")
    was_training = model.training
    dap = DAP(model, target, schedule, **(dap_kwargs or {}))
    p0 = next(model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() > 1 and "token" not in n and "pos_embed" not in n]
    ids = {id(p) for p in decay}
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": [p for p in model.parameters() if id(p) not in ids], "weight_decay": 0.0}]
    if dap.train_gates:
        groups.append({"params": dap.gate_parameters(), "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=lr)
    alpha = DEFAULT_ALPHA if distill_alpha is None else distill_alpha
    if teacher is not None:
        teacher.eval()
    history = dict(step=[], loss=[], probe_loss=[], params_before=dap.total_params, target_params=dap.target_params,
                   tolerance=dap.tolerance)
    start = 0
    if checkpoint and os.path.exists(checkpoint):
        ck = _read_checkpoint(checkpoint)
        start = _restore(ck, model, opt, dap, history)
    net = distributed.wrap(model)  # DDP over the ranks (DAP's hooks sit on the unwrapped model's modules)
    model.train(not eval_mode)
    batches = _batches(train_loader)
    for _ in range(start):  # replay the data order up to the checkpoint
        next(batches)
    amp = dict(device_type=p0.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None)
    for step in tqdm(range(start, steps), initial=start, total=steps, disable=not progress or not distributed.is_main(),
                     desc="dap"):
        x, y = next(batches)
        try:
            check_images(model, x, "training images", cast=True)
        except InputError:
            if step == start:  # nothing trained by this call yet: the model leaves as it came
                dap.remove()
                model.train(was_training)
            raise
        x, y = x.to(p0.device, p0.dtype), y.to(p0.device)
        with torch.autocast(**amp):
            with torch.no_grad():
                t_logits = model_output(teacher, x) if teacher is not None else None
            logits = model_output(net, x)
            logits = logits.float() if amp_dtype is not None else logits  # loss in fp32 under autocast
            loss = distillation_loss(logits, y, t_logits, alpha)
            probe_loss = dap.loss(y)
        opt.zero_grad(set_to_none=True)
        (loss + probe_loss).backward()
        opt.step()
        dap.step()
        if step % log_every == 0 or step == steps - 1:
            history["step"].append(step)
            history["loss"].append(distributed.mean_over_ranks(loss.item(), p0.device))
            history["probe_loss"].append(distributed.mean_over_ranks(probe_loss.item(), p0.device))
        if checkpoint_every and (step + 1) % checkpoint_every == 0:
            rng = rng_states(p0.device)  # collective: every rank takes part
            if distributed.is_main():  # the DAP state is the same on every rank
                tmp = f"{os.fspath(checkpoint)}.tmp"
                torch.save(dict(step=step + 1, model=model.state_dict(), optimizer=opt.state_dict(),
                                dap=dap.state_dict(), log={k: history[k] for k in _LOGGED}, rng=rng), tmp)
                os.replace(tmp, checkpoint)
            distributed.barrier()
    del net  # prune the model itself: a DDP wrapper holds buckets of the old shapes
    history["keep_ratios"] = dap.keep_ratios()
    plan = dap.finalize(opt)
    history["updates"] = dap.history
    history["params_after"] = sum(p.numel() for p in model.parameters())
    model.eval()
    return model, plan, history


_LOGGED = ("step", "loss", "probe_loss")
_KEYS = {"step", "model", "optimizer", "dap", "log", "rng"}


def _read_checkpoint(path) -> dict:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling / zip errors of a damaged or foreign file
        raise CheckpointError(f"cannot read DAP checkpoint {path}: {e}") from e
    if not isinstance(ck, dict) or set(ck) != _KEYS:
        raise CheckpointError(f"{path} is not a finetune_dap checkpoint")
    return ck


def _restore(ck: dict, model: nn.Module, opt: torch.optim.Optimizer, dap: DAP, history: dict) -> int:
    """Restore a ``finetune_dap`` checkpoint into the run's objects; returns the step to continue from."""
    from ..finetune import set_rng_states

    dap.load_state_dict(ck["dap"])  # first: checks the architecture and the DAP arguments
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    history.update({k: list(ck["log"][k]) for k in _LOGGED})
    set_rng_states(ck["rng"], dap.gate.device)
    return ck["step"]
