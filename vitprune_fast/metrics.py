"""Model measurements: parameters, FLOPs (from :mod:`vitprune_fast.flops`) and CPU/GPU latency."""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from .arch import adapter_for, model_output
from .flops import count_flops

__all__ = ["count_flops", "count_params", "fidelity", "input_size", "measure_latency", "plan_params", "time_call"]


def count_params(model: nn.Module) -> int:
    """Number of parameters (each shared tensor counted once)."""
    return sum(p.numel() for p in model.parameters())


def input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model expects (asks its adapter)."""
    return adapter_for(model).input_size()


def time_call(fn, device: torch.device, warmup: int = 3, repeats: int = 10, stat: str = "median") -> float:
    """Seconds per call of ``fn()`` (under inference mode, CUDA-synchronised on GPU): the ``"median"`` or the
    fastest (``"min"``) of ``repeats`` calls after ``warmup``."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return {"median": statistics.median, "min": min}[stat](times)


def measure_latency(model: nn.Module, batch: int = 1, warmup: int = 3, repeats: int = 10,
                    stat: str = "median") -> float:
    """Wall-clock seconds of one forward pass (:func:`time_call`'s ``stat`` of ``repeats``; CUDA-synchronised)."""
    p = next(model.parameters())
    x = torch.randn(batch, *input_size(model), device=p.device, dtype=p.dtype)
    model.eval()
    return time_call(lambda: model(x), p.device, warmup, repeats, stat)


def plan_params(model: nn.Module, plan) -> int:
    """Parameters of ``model`` after ``prune_(model, plan)``, counted on a pruned meta copy (``model`` is untouched)."""
    from .flops import meta_copy
    from .prune import prune_

    return count_params(prune_(meta_copy(model), plan))


def fidelity(teacher: nn.Module, student: nn.Module, loader) -> dict[str, float]:
    """How closely ``student`` (pruned) follows ``teacher`` (unpruned) on held-out images: finer than top-1, which
    saturates on small test sets.

    Args:
        teacher, student: models of the same task (eval mode inside; not modified).
        loader: ``(images, labels)`` batches (the test split, never the proxy or calibration images).

    Returns:
        ``{"kl": mean over images of KL(teacher || student), "agreement": share of images where the two predict the
        same class, "top1": the student's accuracy, "images": how many}``.
    """
    import torch.nn.functional as F

    p = next(student.parameters())
    was = teacher.training, student.training
    teacher.eval()
    student.eval()
    kl = agree = correct = n = 0.0
    try:
        with torch.inference_mode():
            for x, y in loader:
                x, y = x.to(p.device, p.dtype), y.to(p.device)
                t = model_output(teacher, x).double().log_softmax(-1)
                s = model_output(student, x).double().log_softmax(-1)
                kl += float(F.kl_div(s, t, log_target=True, reduction="sum"))
                agree += float((t.argmax(-1) == s.argmax(-1)).sum())
                correct += float((s.argmax(-1) == y).sum())
                n += len(x)
    finally:
        teacher.train(was[0])
        student.train(was[1])
    return {"kl": kl / n, "agreement": agree / n, "top1": correct / n, "images": int(n)}
