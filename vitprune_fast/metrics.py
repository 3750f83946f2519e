"""Model measurements: parameters, FLOPs (torch.utils.flop_counter) and CPU/GPU latency."""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Number of parameters (each shared tensor counted once)."""
    return sum(p.numel() for p in model.parameters())


def input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the timm model expects."""
    pe = model.patch_embed
    h, w = pe.img_size
    return pe.proj.in_channels, h, w


def count_flops(model: nn.Module, batch: int = 1, x: torch.Tensor | None = None) -> int:
    """FLOPs of one forward pass (multiply-add = 2 FLOPs), counted by torch.utils.flop_counter.

    Args:
        model: the model (its own device and dtype are used).
        batch: batch size when ``x`` is not given.
        x: optional input.

    Returns:
        Total FLOPs per forward of the given batch.
    """
    p = next(model.parameters())
    if x is None:
        x = torch.randn(batch, *input_size(model), device=p.device, dtype=p.dtype)
    was_training = model.training
    model.eval()
    # The flop counter has no formula for CPU fused SDPA; timm's explicit path does the same matmuls.
    fused = {m: m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")}
    try:
        for m in fused:
            m.fused_attn = False
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(x)
    finally:
        for m, f in fused.items():
            m.fused_attn = f
        model.train(was_training)
    return int(fc.get_total_flops())


def measure_latency(model: nn.Module, batch: int = 1, warmup: int = 3, repeats: int = 10) -> float:
    """Median wall-clock seconds of one forward pass (CUDA-synchronised on GPU)."""
    p = next(model.parameters())
    x = torch.randn(batch, *input_size(model), device=p.device, dtype=p.dtype)
    model.eval()
    sync = torch.cuda.synchronize if p.is_cuda else (lambda: None)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            sync()
            t0 = time.perf_counter()
            model(x)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)
