"""Latency budgets: plans for a measured-latency target, predicted against measured, and against a uniform plan of
the same FLOPs.

Stock DeiT-S and Swin-T widths and depths (random init, magnitude scores normalised per group; CPU: 96 / 64 px, one
thread), at batch 1 and 64: the latency model is built on this machine (:class:`vitprune_fast.latency.LatencyModel`),
a global allocation meets 60 % of the predicted dense latency, the pruned model is timed, and so is the uniform plan
with the same FLOPs (every latency the fastest of its runs, the tables' statistic). Target: predicted within 10 %
of measured.

    python bench/latency_budget.py [--quick]
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import quick_main  # noqa: E402

import vitprune_fast as vpf  # noqa: E402

CONFIGS = {"cpu": [("deit_small_patch16_224", dict(img_size=96)), ("swin_tiny_patch4_window7_224",
                                                                    dict(img_size=64, window_size=4))],
           "quick": [("deit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2))],
           "cuda": [("deit_small_patch16_224", {}), ("swin_tiny_patch4_window7_224", {})]}
BATCHES = {"cpu": (1, 64), "quick": (1, 4), "cuda": (1, 64, 256)}


def run(configs, batches, device, target: float = 0.6, repeats: int = 10) -> list[dict]:
    from vitprune_fast.allocate import allocate
    from vitprune_fast.latency import LatencyModel, forward_seconds
    from vitprune_fast.metrics import count_flops

    rows = []
    for name, kw in configs:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, **kw).to(device).eval()
        space = vpf.describe(model)
        raw = vpf.score.magnitude_scores(model)
        scores = {n: s / s.mean() for n, s in raw.items()}  # the magnitude method's normalisation
        dense_flops = count_flops(model)
        for batch in batches:
            lm = LatencyModel.build(model, batch, repeats=repeats)
            plan, rep = allocate(model, scores, vpf.PlanSpec(latency=target, allocation="global"), latency_model=lm)
            pruned = vpf.prune_(copy.deepcopy(model), plan)
            flops = count_flops(pruned) / dense_flops
            r, _ = vpf.keep_for_flops(model, flops)
            uniform = vpf.prune_(copy.deepcopy(model), vpf.make_plan(space, scores, keep=r))
            # the three models in turn, the fastest of three rounds each: the VM's speed drifts between rounds
            rounds = [[forward_seconds(m, batch, repeats) for m in (pruned, uniform, model)] for _ in range(3)]
            measured, uniform_ms, dense = (min(col) for col in zip(*rounds, strict=True))
            rows.append({"model": name, "kwargs": kw, "batch": batch, "target": target,
                         "dense_measured_s": dense, "dense_predicted_s": lm.dense,
                         "predicted_s": rep["achieved"], "measured_s": measured,
                         "predicted_over_measured": rep["achieved"] / measured, "flops_frac": flops,
                         "uniform_same_flops_measured_s": uniform_ms,
                         "global_over_uniform_latency": measured / uniform_ms})
            print(f"{name} bs {batch}: predicted {1e3 * rep['achieved']:.2f} ms, measured {1e3 * measured:.2f} ms "
                  f"(dense {1e3 * dense:.2f}); FLOPs {100 * flops:.1f} %, uniform plan of the same FLOPs "
                  f"{1e3 * uniform_ms:.2f} ms", flush=True)
    return rows


if __name__ == "__main__":
    quick_main("latency_budget", __doc__, lambda size, device: {
        "rows": run(CONFIGS[size], BATCHES[size], device, repeats=3 if size == "quick" else 10),
        "target_predicted_within": 0.10})
