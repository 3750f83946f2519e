"""Reconstruction cost: ``reconstruct_`` against the exact UP-ViTs scoring of the same model on the same images.

Stock DeiT-S and Swin-T widths and depths (random init, 1000 classes; CPU: 64 px, 16 images, float32), pruned to ~50 %
FLOPs by the uniform rule. The exact fast engine's time on every candidate is extrapolated from its measured cost per
candidate of each group kind (scoring all 23k / 28k candidates takes hours on 2 cores); reconstruction runs whole.
Target: reconstruction <= 10 % of the scoring time.

    python bench/reconstruct.py [--quick]
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import quick_main, timed  # noqa: E402

import vitprune_fast as vpf  # noqa: E402
from vitprune_fast.metrics import input_size  # noqa: E402

CONFIGS = {"cpu": [("deit_small_patch16_224", dict(img_size=64), 16),
                   ("swin_tiny_patch4_window7_224", dict(img_size=64, window_size=4), 16)],
           "quick": [("deit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2), 4)],
           "cuda": [("deit_small_patch16_224", {}, 64), ("swin_tiny_patch4_window7_224", {}, 64)]}


def run(configs, device) -> list[dict]:
    from vitprune_fast.reconstruct import reconstruct_

    rows = []
    for name, kw, n in configs:
        torch.manual_seed(0)
        teacher = timm.create_model(name, pretrained=False, **kw).to(device).eval()
        x = torch.randn(n, *input_size(teacher), device=device)
        space = vpf.describe(teacher)
        ratio, frac = vpf.keep_for_flops(teacher, 0.5)
        plan = vpf.make_plan(space, vpf.score.magnitude_scores(teacher), keep=ratio)
        common = dict(batch_size=n, progress=False)
        per_cand = {}
        middle = len(vpf.arch.adapter_for(teacher).blocks()) // 2
        block = vpf.arch.adapter_for(teacher).blocks()[middle]
        for g in (space.of_kind("residual")[0].name, block.attn, block.mlp):
            t, _ = timed(lambda g=g, m=teacher, x=x, c=common: vpf.upvits_scores(m, x, groups=[g], **c), repeats=1,
                         device=device)
            per_cand[space.groups[g].kind] = t / space.groups[g].size
        scoring = sum(per_cand[g.kind] * g.size for g in space.groups.values() if g.kind in per_cand)
        pruned = vpf.prune_(copy.deepcopy(teacher), plan)
        t_rec, report = timed(lambda m=pruned, t=teacher, x=x, p=plan, n=n: reconstruct_(m, t, x, p, batch_size=n,
                                                                                       progress=False),
                              repeats=1, device=device)
        rows.append({"model": name, "kwargs": kw, "images": n, "flops_frac": frac,
                     "candidates": sum(g.size for g in space.groups.values()),
                     "upvits_exact_seconds_extrapolated": scoring, "reconstruct_seconds": t_rec,
                     "reconstruct_share_of_scoring": t_rec / scoring, "layers_refit": len(report["layers"]),
                     "median_rel_error_before": sorted(r["rel_error_before"] for r in report["layers"])[
                         len(report["layers"]) // 2],
                     "median_rel_error_after": sorted(r["rel_error_after"] for r in report["layers"])[
                         len(report["layers"]) // 2]})
        print(f"{name}: reconstruction {t_rec:.1f} s = {100 * t_rec / scoring:.2f} % of the exact UP-ViTs scoring "
              f"({scoring:.0f} s, extrapolated), {len(report['layers'])} Linears", flush=True)
    return rows


if __name__ == "__main__":
    quick_main("reconstruct", __doc__, lambda size, device: {"rows": run(CONFIGS[size], device), "target_share": 0.10})
