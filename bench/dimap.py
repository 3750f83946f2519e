"""Benchmark: DIMAP scoring + module thresholds on Swin-T/S/B (random init, float32).

Run: ``python bench/dimap.py [--models swin_tiny_patch4_window7_224,...] [--repeats N] [--ratio 0.55]``.

Methods (all compute the same faithful DIMAP masks: LAMP score per weight of every qkv / proj / fc1 / fc2 layer,
then one threshold per module QKV-M / PRJ-M / MLP-M removing ``floor(ratio * |M|)`` weights):

* ``loop``    the straightforward implementation of the paper's algorithm: a Python loop over layers, each scored
              by ``dimap_metric_ref`` (square, sort, cumsum, divide, scatter) on its own, then per module
              ``torch.kthvalue`` of the concatenated scores and ``score > threshold``.
* ``torch``   the library on the plain-torch path: ``dimap_scores(model, backend="torch")`` (same-size layers
              stacked into one ``[L, N]`` call, integer-key sort, in-place arithmetic) and
              ``dimap_masks(model, ratio, scores=...)`` (histogram select, no sort of the module pool).
* ``triton``  the same with ``backend="triton"``: the fused square / scan / divide / scatter Triton kernel.
              **CUDA only**: on a machine without CUDA this column is absent (the Triton interpreter used by
              the tests is a correctness tool, not something to time).

Each repeat times scoring and thresholding separately (``time.perf_counter``, CUDA-synchronised on GPU); the JSON
keeps every run, the medians and the machine's load average before and after (CPU timings are only meaningful on
an otherwise idle machine). On CPU every model runs with 1 intra-op thread and with torch's default count: on a
busy machine the many small ops of the threshold step pay an OpenMP synchronisation cost with more than 1 thread.
One untimed warm-up per model and method on GPU (Triton compilation, CUDA context). The masks of every method are
compared with ``loop``'s (``mask_disagreements_vs_loop``; expected 0, or a handful of weights exactly at a
threshold where float32 scores tie or differ in the last bit).

Results: a table on stdout and ``bench/results/dimap-<device>.json`` (``cpu`` or the GPU name; device included).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
import triton
from vitprune_fast.kernels.dimap_metric import dimap_metric_ref

from vitprune_fast.score.dimap import dimap_masks, dimap_scores, prunable_weights

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224", "swin_base_patch4_window7_224")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------- methods
def _loop_scores(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for names in prunable_weights(model).values():
        for n in names:
            w = model.get_parameter(n).detach()
            out[n] = dimap_metric_ref(w.reshape(1, -1)).view(w.shape)
    return out


def _loop_masks(model: torch.nn.Module, scores: dict[str, torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
    masks = {}
    for names in prunable_weights(model).values():
        pool = torch.cat([scores[n].reshape(-1) for n in names])
        k = math.floor(ratio * pool.numel())
        tau = torch.kthvalue(pool, k).values if k > 0 else -math.inf
        masks.update({n: scores[n] > tau for n in names})
    return masks


def _method(name: str):
    """(score_fn, mask_fn) for a method name."""
    if name == "loop":
        return _loop_scores, _loop_masks
    backend = name

    def score(model):
        return dimap_scores(model, backend=backend)

    def masks(model, scores, ratio):
        return dimap_masks(model, ratio, scores=scores)

    return score, masks


def _time_once(model, method: str, ratio: float, device: torch.device):
    score_fn, mask_fn = _method(method)
    _sync(device)
    t0 = time.perf_counter()
    scores = score_fn(model)
    _sync(device)
    t1 = time.perf_counter()
    masks = mask_fn(model, scores, ratio)
    _sync(device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, masks


def _disagreements(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> int:
    return sum(int(torch.count_nonzero(a[n] != b[n])) for n in a)


def bench_model(name: str, methods: list[str], repeats: int, ratio: float, device: torch.device) -> list[dict]:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).to(device).eval()
    n_prunable = sum(model.get_parameter(n).numel() for v in prunable_weights(model).values() for n in v)
    rows, ref_masks = [], None
    for method in methods:
        if device.type == "cuda":
            _time_once(model, method, ratio, device)  # warm-up: compilation, allocator, CUDA context
        runs = [_time_once(model, method, ratio, device) for _ in range(repeats)]
        masks = runs[-1][2]
        if ref_masks is None:
            ref_masks = masks
        score_s = [r[0] for r in runs]
        thr_s = [r[1] for r in runs]
        total_s = [a + b for a, b in zip(score_s, thr_s, strict=True)]
        row = {
            "model": name,
            "method": method,
            "prunable_weights": n_prunable,
            "score_s": statistics.median(score_s),
            "threshold_s": statistics.median(thr_s),
            "total_s": statistics.median(total_s),
            "runs": {"score_s": score_s, "threshold_s": thr_s},
            "mask_disagreements_vs_loop": _disagreements(masks, ref_masks),
            "removed": sum(int(torch.count_nonzero(~m)) for m in masks.values()),
        }
        rows.append(row)
        print(f"{name:32s} {method:7s} threads {torch.get_num_threads()}  score {row['score_s']:8.3f} s  "
              f"threshold {row['threshold_s']:7.3f} s  total {row['total_s']:8.3f} s  "
              f"mask diff {row['mask_disagreements_vs_loop']}", flush=True)
        del runs, masks
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated timm model names")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per method (default 3 CPU, 10 GPU)")
    parser.add_argument("--ratio", type=float, default=0.55, help="rho (DIMAP3 = 0.55)")
    parser.add_argument("--threads", default=None,
                        help="CPU only: comma-separated intra-op thread counts to run (default: 1 and torch's default)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    repeats = args.repeats or (10 if cuda else 3)
    methods = ["loop", "torch"] + (["triton"] if cuda else [])
    device_name = torch.cuda.get_device_name() if cuda else _cpu_name()
    meta = {
        "device": device_name,
        "backend": device.type,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "timm": timm.__version__,
        "cpu_threads_default": torch.get_num_threads(),
        "ratio": args.ratio,
        "repeats": repeats,
        "dtype": "float32",
        "methods": methods,
        "note": None if cuda else "no CUDA: the Triton column needs a GPU and is absent; loop vs torch only",
        "loadavg_start": os.getloadavg(),
        "results": [],
    }
    if args.threads:
        thread_counts = [int(t) for t in args.threads.split(",")]
    else:
        thread_counts = sorted({1, torch.get_num_threads()})
    if cuda:
        thread_counts = [torch.get_num_threads()]
    print(f"device: {device_name} ({device.type}), repeats {repeats}, ratio {args.ratio}, threads {thread_counts}")
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for name in args.models.split(","):
            rows = bench_model(name, methods, repeats, args.ratio, device)
            meta["results"] += [dict(row, threads=threads) for row in rows]
            if cuda:
                torch.cuda.empty_cache()
    meta["loadavg_end"] = os.getloadavg()  # other processes on the machine make CPU timings noisy
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") if cuda else "cpu"
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"dimap-{slug}.json"
    path.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
