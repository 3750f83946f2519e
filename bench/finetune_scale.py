"""Benchmark: fine-tuning throughput of ``vitprune_fast.finetune.train`` in 1 vs 2 processes (DDP, gloo) with the same
global batch, and on a GPU bf16 autocast vs fp32.

Run: ``python bench/finetune_scale.py [--quick]``.

* CPU: ``deit_tiny_patch16_224`` at 96 px (``--quick``: 64 px), soft distillation from a teacher of the same
  shape, global batch 32: one process with one thread, then two processes with one thread each (16 images per
  rank, gradients all-reduced by DistributedDataParallel over gloo). Each configuration times ``--steps`` optimizer
  steps after two warm-up steps, in fresh processes; steps/s and the speed-up of 2 processes over 1. On a 2-core
  machine the ideal is 2x; the all-reduce of ~5.7M gradients per step and the shared memory bandwidth take their
  share.
* CUDA (when present): ``deit_small_patch16_224`` at 224 px, batch 128, one GPU: fp32 vs bf16 autocast step time.

Results: a table on stdout and ``bench/results/finetune_scale-<device>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_device, device_name, write_json  # noqa: E402

CPU_MODEL = ("deit_tiny_patch16_224", 10)  # name, classes
GLOBAL_BATCH = 32


def _loader(img: int, batch: int, steps: int, rank: int, world: int, device, seed: int = 0):
    """``steps`` batches of this rank's share of a seeded global batch (random images and labels)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = torch.randn(batch, 3, img, img, generator=g)
        y = torch.randint(0, CPU_MODEL[1], (batch,), generator=g)
        per = batch // world
        out.append((x[rank * per:(rank + 1) * per].to(device), y[rank * per:(rank + 1) * per].to(device)))
    return out


def _models(name: str, img: int, classes: int, device):
    import timm

    torch.manual_seed(0)
    student = timm.create_model(name, img_size=img, num_classes=classes).to(device)
    teacher = timm.create_model(name, img_size=img, num_classes=classes).to(device).eval()
    return student, teacher


def time_training(name: str, img: int, batch: int, steps: int, rank: int = 0, world: int = 1,
                  amp_dtype: torch.dtype | None = None, device=None) -> float:
    """Seconds per optimizer step of ``train`` (two untimed warm-up steps first; CUDA-synchronised)."""
    from vitprune_fast.finetune import train

    device = device or torch.device("cpu")
    student, teacher = _models(name, img, CPU_MODEL[1], device)
    kw = dict(lr=1e-4, teacher=teacher, progress=False, amp_dtype=amp_dtype)
    train(student, _loader(img, batch, 2, rank, world, device), 2, **kw)  # warm-up (also DDP's first buckets)
    data = _loader(img, batch, steps, rank, world, device, seed=1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    train(student, data, steps, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / steps


def _rank(rank: int, world: int, init: str, out: str, img: int, steps: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        dt = time_training(CPU_MODEL[0], img, GLOBAL_BATCH, steps, rank, world)
        if rank == 0:
            Path(out).write_text(json.dumps({"seconds_per_step": dt}))
    finally:
        dist.destroy_process_group()


def cpu_processes(world: int, img: int, steps: int) -> float:
    """Seconds per step with ``world`` single-threaded processes (1: no process group), in fresh processes."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        out = f"{d}/result.json"
        if world == 1:
            mp.spawn(_single, args=(out, img, steps), nprocs=1, join=True)
        else:
            mp.spawn(_rank, args=(world, f"{d}/init", out, img, steps), nprocs=world, join=True)
        return json.loads(Path(out).read_text())["seconds_per_step"]


def _single(_: int, out: str, img: int, steps: int) -> None:
    torch.set_num_threads(1)
    Path(out).write_text(json.dumps({"seconds_per_step": time_training(CPU_MODEL[0], img, GLOBAL_BATCH, steps)}))


def run(quick: bool, steps: int | None = None, img: int | None = None, gpu: bool = True) -> dict:
    """CPU rows (1 and 2 processes), then the GPU rows when CUDA is present (and ``gpu``)."""
    device = default_device()
    steps = steps or (3 if quick else 10)
    img = img or (64 if quick else 96)
    rows = []
    for world in (1, 2):
        dt = cpu_processes(world, img, steps)
        rows.append({"processes": world, "threads_per_process": 1, "global_batch": GLOBAL_BATCH,
                     "seconds_per_step": dt, "steps_per_s": 1 / dt, "images_per_s": GLOBAL_BATCH / dt})
        print(f"CPU, {world} process(es): {dt * 1e3:.0f} ms/step ({GLOBAL_BATCH / dt:.0f} img/s)", flush=True)
    res = {"model": CPU_MODEL[0], "img_size": img, "steps": steps, "cpu": rows,
           "speedup_2_vs_1_process": rows[0]["seconds_per_step"] / rows[1]["seconds_per_step"],
           "cpu_count": os.cpu_count()}
    if device.type == "cuda" and gpu:
        gpu = []
        for label, amp in (("fp32", None), ("bf16 autocast", torch.bfloat16)):
            torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means IEEE fp32 here
            dt = time_training("deit_small_patch16_224", 224, 32 if quick else 128, steps, amp_dtype=amp,
                               device=device)
            gpu.append({"precision": label, "batch": 32 if quick else 128, "seconds_per_step": dt})
            print(f"{device_name(device)}, {label}: {dt * 1e3:.1f} ms/step", flush=True)
        res["gpu"] = gpu
        res["bf16_speedup_vs_fp32"] = gpu[0]["seconds_per_step"] / gpu[1]["seconds_per_step"]
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="64 px, 3 timed steps")
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps per configuration")
    args = ap.parse_args(argv)
    res = run(args.quick, args.steps)
    print(f"2 processes vs 1: x{res['speedup_2_vs_1_process']:.2f} the steps/s (same global batch)")
    print("wrote", write_json("finetune_scale", default_device(), res, quick=args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
