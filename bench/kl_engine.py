"""UP-ViTs scoring throughput: published-style loop vs teacher-cached loop vs the fast engine.

Same model, proxy images, dtype and candidate set in every row. Reports candidates·images/s, ratios against
the published-style loop, whether the fast engine selects exactly the same channels (keep 0.5 plans), and the
fast engine's achieved TFLOP/s (torch.utils.flop_counter) against a matmul peak measured in the same run
(CUDA: bf16; CPU: float64, the dtype the CPU rows run in).

    python bench/kl_engine.py            # residual + a middle block's attn and mlp groups
    python bench/kl_engine.py --quick    # smaller models (32 px, also on CUDA), every candidate
    python bench/kl_engine.py --check    # the GPU check: DeiT-S only, 32 images, whole model extrapolated

Without --quick the rows run on a subset of groups (the published loop over every DeiT-S candidate takes
hours): the residual width plus a middle block's attn and mlp. CPU: small DeiT and Swin configs at 32 px,
float64. CUDA: DeiT-S and Swin-T at 224 px, fp32 weights under bf16 autocast, 64 images. Then the fast engine
scores every candidate of the model, next to the published loop's time extrapolated from its subset rate (its
cost per candidate is one student and one teacher forward, whatever the group). With --check the fast engine's
whole-model time is extrapolated as well, from its cost per candidate of each group kind.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_device, device_name, matmul_peak_tflops, timed, write_json  # noqa: E402

import vitprune_fast as vpf  # noqa: E402
from vitprune_fast.metrics import input_size  # noqa: E402


def _configs(cuda: bool, quick: bool, check: bool = False):
    if cuda and check:  # the GPU check: one model, fewer images, the whole model extrapolated
        return [("deit_small_patch16_224", {}, None, 32)]
    if cuda and not quick:
        return [("deit_small_patch16_224", {}, None, 64),
                ("swin_tiny_patch4_window7_224", {}, (), 64)]
    vit = dict(img_size=32, patch_size=8, depth=2 if quick else 4, embed_dim=32 if quick else 64, num_heads=2,
               num_classes=1000)
    swin = dict(img_size=16 if quick else 32, patch_size=2, window_size=4, embed_dim=12 if quick else 24,
                depths=(2, 2), num_heads=(2, 4), num_classes=1000)
    n = 4 if quick else 16
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


def _published_loop_estimate(entry: dict, model_candidates: int) -> float:
    """Seconds the published loop would take on every candidate of the model (its cost per candidate is one
    full forward of student and teacher, whatever the group)."""
    published = entry["rows"][0]
    return published["seconds"] / entry["candidates"] * model_candidates


def _fast_engine_estimate(space, groups: list[str], model, x, common: dict, device) -> float:
    """Seconds the fast engine would take on every candidate: each kind's measured cost per candidate (on the
    scored groups) times that kind's candidates in the model."""
    per_cand = {}
    for g in groups:
        t, _ = timed(lambda g=g: vpf.upvits_scores(model, x, groups=[g], **common), repeats=1, device=device)
        per_cand[space.groups[g].kind] = t / space.groups[g].size
    return sum(per_cand[g.kind] * g.size for g in space.groups.values() if g.kind in per_cand)


def run(quick: bool, device: torch.device | None = None, configs=None, full_model: bool | None = None,
        on_config=None, check: bool = False) -> dict:
    """Every config scored by the three methods on the same candidates; FLOP/s of the fast engine vs a measured
    matmul peak of the compute dtype (CUDA: bf16; CPU: float64); unless quick, also the fast engine on every
    candidate of the model, against the published loop's time extrapolated from its per-candidate cost.
    ``check`` (the GPU check): the whole-model row is extrapolated for the fast engine too, from its cost per
    candidate of each group kind (a middle block's groups: the average suffix length), instead of run.
    ``on_config(result)`` is called with the results so far after every config (main writes them, so that a
    run stopped by a time limit keeps the configs it finished)."""
    device = device or default_device()
    cuda = device.type == "cuda"
    dtype = torch.float32 if cuda else torch.float64  # CPU: float64, the engine's exactness claim
    full_model = (not quick) if full_model is None else full_model
    peak_dtype = torch.bfloat16 if cuda else torch.float64
    peak = matmul_peak_tflops(device, peak_dtype)
    rows = []
    for name, kw, _, n in configs or _configs(cuda, quick, check):
        torch.manual_seed(0)
        model = _randomize(timm.create_model(name, **kw)).to(device, dtype).eval()
        x = torch.randn(n, *input_size(model), device=device, dtype=dtype)
        space = vpf.describe(model)
        groups = _subset(space, quick)
        comps = ("residual", "attn", "mlp")
        common = dict(components=comps, batch_size=n, progress=False,
                      autocast_dtype=torch.bfloat16 if cuda else None)
        n_cand = sum(g.size for g in space.groups.values() if groups is None or g.name in groups)
        results = {}
        for label, kw_eng in [("published loop (teacher per candidate)", dict(engine="reference", teacher="recompute")),
                              ("loop, teacher cached", dict(engine="reference")),
                              ("fast engine", dict(engine="fast"))]:
            def score(kw_eng=kw_eng, model=model, x=x, common=common, groups=groups):
                return vpf.upvits_scores(model, x, groups=groups, **common, **kw_eng)

            t, scores = timed(score, repeats=1 if "loop" in label else 3, device=device)
            results[label] = (t, scores)
        ref = results["loop, teacher cached"][1]
        fast = results["fast engine"][1]
        plan_a = vpf.make_plan(space, dict(ref), keep={k: 0.5 for k in ref})
        plan_b = vpf.make_plan(space, dict(fast), keep={k: 0.5 for k in fast})
        same = all(torch.equal(plan_a.keep[k], plan_b.keep[k]) for k in plan_a.keep)
        rel = max(((fast[k] - ref[k]).abs().max() / ref[k].abs().max()).item() for k in ref)
        base = results["published loop (teacher per candidate)"][0]
        entry = {"model": name, "kwargs": kw, "images": n, "candidates": n_cand, "groups": groups or "all",
                 "dtype": "fp32 weights, bf16 autocast" if cuda else str(x.dtype), "identical_selection": same,
                 "max_rel_diff_fast_vs_loop": rel, "rows": []}
        for label, (t, _) in results.items():
            entry["rows"].append({"method": label, "seconds": t, "cand_img_per_s": n_cand * n / t,
                                  "speedup_vs_published": base / t})
        with FlopCounterMode(display=False) as fc:
            vpf.upvits_scores(model, x, groups=groups, **common, engine="fast")
        entry["fast_engine_tflops"] = fc.get_total_flops() / results["fast engine"][0] / 1e12
        entry["matmul_peak_tflops"] = peak
        entry["matmul_peak_dtype"] = str(peak_dtype).removeprefix("torch.")
        entry["fraction_of_peak"] = entry["fast_engine_tflops"] / peak
        if full_model:
            every = sum(g.size for g in space.groups.values() if g.kind in comps)
            if check and groups:
                t_all = _fast_engine_estimate(space, groups, model, x, common, device)
            else:
                t_all, _ = timed(lambda model=model, x=x, common=common: vpf.upvits_scores(model, x, **common),
                                 repeats=1, device=device)
            est = _published_loop_estimate(entry, every)
            entry["full_model"] = {"candidates": every, "fast_engine_seconds": t_all,
                                   "fast_engine_extrapolated": bool(check and groups),
                                   "published_loop_seconds_extrapolated": est, "speedup_vs_published": est / t_all}
        rows.append(entry)
        if on_config is not None:
            on_config({"quick": quick, "configs": rows})
    return {"quick": quick, "configs": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--check", action="store_true", help="the GPU check: DeiT-S 224 px, 32 images, whole model "
                                                         "extrapolated (CUDA; elsewhere the default configs)")
    args = ap.parse_args()
    dev = default_device()
    res = run(args.quick, dev, on_config=lambda partial: write_json("kl_engine", dev, partial, quick=args.quick),
              check=args.check)
    print(f"UP-ViTs KL scoring on {device_name(dev)}")
    for c in res["configs"]:
        print(f"\n{c['model']}  {c['candidates']} candidates x {c['images']} images ({c['dtype']}); "
              f"identical selection: {c['identical_selection']}; max rel diff {c['max_rel_diff_fast_vs_loop']:.1e}")
        print(f"  {'method':<42}{'seconds':>10}{'cand*img/s':>14}{'vs published':>14}")
        for r in c["rows"]:
            print(f"  {r['method']:<42}{r['seconds']:>10.2f}{r['cand_img_per_s']:>14.0f}"
                  f"{r['speedup_vs_published']:>13.1f}x")
        print(f"  fast engine {c['fast_engine_tflops']:.3g} TFLOP/s = {100 * c['fraction_of_peak']:.0f}% of the "
              f"measured {c['matmul_peak_dtype']} matmul peak {c['matmul_peak_tflops']:.3g} TFLOP/s")
        if "full_model" in c:
            f = c["full_model"]
            print(f"  every candidate ({f['candidates']}): fast engine {f['fast_engine_seconds']:.1f} s vs published "
                  f"loop ~{f['published_loop_seconds_extrapolated'] / 3600:.2f} h (extrapolated), "
                  f"x{f['speedup_vs_published']:.0f}")
    print("\nwrote", write_json("kl_engine", dev, res, quick=args.quick))


if __name__ == "__main__":
    main()
