"""UP-ViTs scoring throughput: published-style loop vs teacher-cached loop vs the fast engine.

Same model, proxy images, dtype and candidate set in every row. Reports candidates·images/s, ratios against
the published-style loop, and whether the fast engine selects exactly the same channels (keep 0.5 plans).
On GPU it also reports the engine's achieved TFLOP/s (torch.utils.flop_counter) against a measured bf16
matmul peak.

    python bench/kl_engine.py            # CPU: small DeiT and Swin configs (all candidates)
    python bench/kl_engine.py --quick    # smaller
Without --quick every row runs on the same subset of groups: residual + a middle block's attn and mlp (the
published loop over every DeiT-S candidate takes hours). On CUDA: DeiT-S and Swin-T at 224 px, bf16
autocast, 64 images.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, timed, write_json  # noqa: E402

import vitprune_fast as vpf  # noqa: E402
from vitprune_fast.metrics import input_size  # noqa: E402


def _configs(cuda: bool, quick: bool):
    if cuda:
        return [("deit_small_patch16_224", {}, None, 64),
                ("swin_tiny_patch4_window7_224", {}, (), 64)]
    vit = dict(img_size=32, patch_size=8, depth=4, embed_dim=32 if quick else 64, num_heads=2, num_classes=1000)
    swin = dict(img_size=32, patch_size=2, window_size=4, embed_dim=16 if quick else 24, depths=(2, 2),
                num_heads=(2, 4), num_classes=1000)
    n = 8 if quick else 16
    return [("deit_tiny_patch16_224", vit, None, n), ("swin_tiny_patch4_window7_224", swin, None, n)]


def _subset(space, quick: bool) -> list[str] | None:
    """Every candidate in --quick; otherwise residual + a middle block's attn and mlp (the loops are slow)."""
    if quick:
        return None
    attn = [g.name for g in space.of_kind("attn")]
    mid = attn[len(attn) // 2].rsplit(".", 1)[0]
    res = space.of_kind("residual")[0].name
    return [res, f"{mid}.attn", f"{mid}.mlp"]


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights with non-trivial biases/norms so that single channels measurably change the output."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() < 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + 1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p[0].numel() ** -0.5)
    return model


def _matmul_peak(device) -> float:
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    t, _ = timed(lambda: a @ b, repeats=10, device=device)
    return 2 * 8192 ** 3 / t / 1e12


def run(quick: bool) -> dict:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float32 if cuda else torch.float64  # CPU: float64, the engine's exactness claim
    rows = []
    for name, kw, _, n in _configs(cuda, quick):
        torch.manual_seed(0)
        model = _randomize(timm.create_model(name, **kw)).to(device, dtype).eval()
        x = torch.randn(n, *input_size(model), device=device, dtype=dtype)
        space = vpf.describe(model)
        groups = _subset(space, quick)
        comps = ("residual", "attn", "mlp")
        common = dict(components=comps, groups=groups, batch_size=n, progress=False,
                      autocast_dtype=torch.bfloat16 if cuda else None)
        n_cand = sum(g.size for g in space.groups.values() if groups is None or g.name in groups)
        results = {}
        for label, kw_eng in [("published loop (teacher per candidate)", dict(engine="reference", teacher="recompute")),
                              ("loop, teacher cached", dict(engine="reference")),
                              ("fast engine", dict(engine="fast"))]:
            def score(kw_eng=kw_eng, model=model, x=x, common=common):
                return vpf.upvits_scores(model, x, **common, **kw_eng)

            t, scores = timed(score, repeats=1 if "loop" in label else 3, device=device)
            results[label] = (t, scores)
        ref = results["loop, teacher cached"][1]
        fast = results["fast engine"][1]
        plan_a = vpf.make_plan(space, {k: v for k, v in ref.items()}, keep={k: 0.5 for k in ref})
        plan_b = vpf.make_plan(space, {k: v for k, v in fast.items()}, keep={k: 0.5 for k in fast})
        same = all(torch.equal(plan_a.keep[k], plan_b.keep[k]) for k in plan_a.keep)
        rel = max(((fast[k] - ref[k]).abs().max() / ref[k].abs().max()).item() for k in ref)
        base = results["published loop (teacher per candidate)"][0]
        entry = {"model": name, "kwargs": kw, "images": n, "candidates": n_cand, "groups": groups or "all",
                 "dtype": "fp32 weights, bf16 autocast" if cuda else str(x.dtype), "identical_selection": same,
                 "max_rel_diff_fast_vs_loop": rel, "rows": []}
        for label, (t, _) in results.items():
            entry["rows"].append({"method": label, "seconds": t, "cand_img_per_s": n_cand * n / t,
                                  "speedup_vs_published": base / t})
        if cuda:
            with FlopCounterMode(display=False) as fc:
                vpf.upvits_scores(model, x, **common, engine="fast")
            t_fast = results["fast engine"][0]
            peak = _matmul_peak(device)
            entry["fast_engine_tflops"] = fc.get_total_flops() / t_fast / 1e12
            entry["bf16_matmul_peak_tflops"] = peak
            entry["fraction_of_peak"] = entry["fast_engine_tflops"] / peak
        rows.append(entry)
    return {"quick": quick, "configs": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    res = run(args.quick)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"UP-ViTs KL scoring on {device_name(dev)}")
    for c in res["configs"]:
        print(f"\n{c['model']}  {c['candidates']} candidates x {c['images']} images ({c['dtype']}); "
              f"identical selection: {c['identical_selection']}; max rel diff {c['max_rel_diff_fast_vs_loop']:.1e}")
        print(f"  {'method':<42}{'seconds':>10}{'cand*img/s':>14}{'vs published':>14}")
        for r in c["rows"]:
            print(f"  {r['method']:<42}{r['seconds']:>10.2f}{r['cand_img_per_s']:>14.0f}"
                  f"{r['speedup_vs_published']:>13.1f}x")
        if "fast_engine_tflops" in c:
            print(f"  fast engine {c['fast_engine_tflops']:.1f} TFLOP/s = {100 * c['fraction_of_peak']:.0f}% of "
                  f"measured bf16 matmul peak {c['bf16_matmul_peak_tflops']:.0f} TFLOP/s")
    print("\nwrote", write_json("kl_engine" + ("-quick" if args.quick else ""), dev, res))


if __name__ == "__main__":
    main()
