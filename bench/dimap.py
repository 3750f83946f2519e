"""Benchmark: DIMAP scoring + module thresholds on Swin-T/S/B (random init, float32).

Run: ``python bench/dimap.py [--quick] [--models swin_tiny_patch4_window7_224,...] [--repeats N] [--ratio 0.55]``.

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

Results: a table on stdout and ``bench/results/dimap-<device>.json``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_device, device_name, sync, write_json  # noqa: E402
from vitprune_fast.kernels.dimap_metric import dimap_metric_ref  # noqa: E402

from vitprune_fast.score.dimap import dimap_masks, dimap_scores, prunable_weights  # noqa: E402

MODELS = ("swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224", "swin_base_patch4_window7_224")


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
    sync(device)
    t0 = time.perf_counter()
    scores = score_fn(model)
    sync(device)
    t1 = time.perf_counter()
    masks = mask_fn(model, scores, ratio)
    sync(device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, masks


def _disagreements(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> int:
    return sum(int(torch.count_nonzero(a[n] != b[n])) for n in a)


def bench_model(name: str, methods: list[str], repeats: int, ratio: float, device: torch.device,
                kwargs: dict | None = None) -> list[dict]:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **(kwargs or {})).to(device).eval()
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


def run(device: torch.device, models, methods: list[str], repeats: int, ratio: float,
        thread_counts: list[int]) -> dict:
    """Every model (a timm name or ``(name, kwargs)``) and method at every CPU thread count."""
    out = {"ratio": ratio, "repeats": repeats, "dtype": "float32", "methods": methods,
           "cpu_threads_default": torch.get_num_threads(), "loadavg_start": os.getloadavg(), "results": []}
    if "triton" not in methods:
        out["note"] = "no CUDA: the Triton column needs a GPU and is absent; loop vs torch only"
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for model in models:
            name, kwargs = (model, {}) if isinstance(model, str) else model
            rows = bench_model(name, methods, repeats, ratio, device, kwargs)
            out["results"] += [dict(row, threads=threads) for row in rows]
            if device.type == "cuda":
                torch.cuda.empty_cache()
    out["loadavg_end"] = os.getloadavg()  # other processes on the machine make CPU timings noisy
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated timm model names")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per method (default 3 CPU, 10 GPU)")
    parser.add_argument("--ratio", type=float, default=0.55, help="rho (DIMAP3 = 0.55)")
    parser.add_argument("--threads", default=None,
                        help="CPU only: comma-separated intra-op thread counts to run (default: 1 and torch's default)")
    parser.add_argument("--quick", action="store_true", help="Swin-T only, one repeat")
    args = parser.parse_args(argv)
    device = default_device()
    cuda = device.type == "cuda"
    repeats = 1 if args.quick else args.repeats or (10 if cuda else 3)
    models = MODELS[:1] if args.quick else args.models.split(",")
    methods = ["loop", "torch"] + (["triton"] if cuda else [])
    if cuda:
        thread_counts = [torch.get_num_threads()]
    elif args.threads:
        thread_counts = [int(t) for t in args.threads.split(",")]
    else:
        thread_counts = sorted({1, torch.get_num_threads()})
    print(f"device: {device_name(device)} ({device.type}), repeats {repeats}, ratio {args.ratio}, "
          f"threads {thread_counts}")
    res = run(device, models, methods, repeats, args.ratio, thread_counts)
    print("wrote", write_json("dimap", device, res, quick=args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
