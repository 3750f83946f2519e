"""UP-ViTs scoring throughput: published-style loop vs teacher-cached loop vs the fast engine.

Same model, proxy images, dtype and candidate set in every row. Reports candidates·images/s, ratios against
the published-style loop, whether the fast engine selects exactly the same channels (keep 0.5 plans), and the
fast engine's achieved TFLOP/s (torch.utils.flop_counter) against a matmul peak measured in the same run
(CUDA: bf16; CPU: float64, the dtype the CPU rows run in).

    python bench/kl_engine.py            # residual + a middle block's attn and mlp groups
    python bench/kl_engine.py --quick    # smaller models (32 px, also on CUDA), every candidate
    python bench/kl_engine.py --check    # the GPU check: DeiT-S only, 32 images, whole model extrapolated
    python bench/kl_engine.py --screened # stock DeiT-T / Swin-T widths and depths (CPU: 96 / 64 px, 8 images)
    python bench/kl_engine.py --screened --model swin   # one config; the file keeps the others' earlier results

Without --quick the rows run on a subset of groups (the published loop over every DeiT-S candidate takes
hours): the residual width plus a middle block's attn and mlp. CPU: small DeiT and Swin configs at 32 px,
float64. CUDA: DeiT-S and Swin-T at 224 px, fp32 weights under bf16 autocast, 64 images. Then the fast engine
scores every candidate of the model, next to the published loop's time extrapolated from its subset rate (its
cost per candidate is one student and one teacher forward, whatever the group). With --check the fast engine's
whole-model time is extrapolated as well, from its cost per candidate of each group kind.

Wherever the fast engine scores every candidate, the screened engine (``upvits_select``: the same selection,
scoring exactly only the candidates near each cut) runs next to it at keep 0.5 for residual, attn and mlp: its
seconds, effective candidates·images/s, the share of candidates it scored exactly, its speedup over the fast engine
and whether its plan equals the fast engine's (up to ties within 1e-6 of a cut). ``--screened`` runs the stock
DeiT-T and Swin-T architectures (12 blocks / 4 stages, 1000 classes, random init) at reduced resolution and image
count on CPU (the 224 px, 32-image exact runs take hours on 2 cores); on CUDA DeiT-B at 224 px, bf16 autocast,
32 images, without the loops, the screened time also extrapolated to 2,000 images.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_device, device_name, matmul_peak_tflops, result_path, timed, write_json  # noqa: E402

import vitprune_fast as vpf  # noqa: E402
from vitprune_fast.metrics import input_size  # noqa: E402


def _configs(cuda: bool, quick: bool, check: bool = False, screened: bool = False):
    if screened:  # stock architectures: the screened engine's real use
        if cuda:
            return [("deit_base_patch16_224", {}, None, 32)]
        return [("deit_tiny_patch16_224", dict(img_size=96), None, 8),
                ("swin_tiny_patch4_window7_224", dict(img_size=64, window_size=4), None, 8)]
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


def _screened_row(model, x, space, exact: dict, exact_seconds: float, common: dict, device, keep: float = 0.5
                  ) -> dict:
    """The screened engine next to the fast engine's scores of every candidate (``exact``, ``exact_seconds``)."""
    from vitprune_fast.score.screened import selection_differences

    def select():
        return vpf.upvits_select(model, x, keep, batch_size=common["batch_size"], progress=False,
                                 autocast_dtype=common["autocast_dtype"])

    t, (plan, report) = timed(select, repeats=1, device=device)
    ref = vpf.make_plan(space, exact, keep)
    diff = selection_differences(space, exact, plan, ref, keep)
    widths = list(report["band_half_width"].values()) or [0.0]
    return {"keep": keep, "seconds": t, "cand_img_per_s": report["candidates"] * len(x) / t,
            "candidates": report["candidates"], "scored_exactly": report["scored_exactly"],
            "share_scored_exactly": report["share_scored_exactly"], "identical_selection": not diff,
            "differences": diff[:5], "speedup_vs_fast_engine": exact_seconds / t, "flips": report["flips"],
            "band_half_width_min": min(widths), "band_half_width_max": max(widths), "stage_seconds": report["seconds"]}


def run(quick: bool, device: torch.device | None = None, configs=None, full_model: bool | None = None,
        on_config=None, check: bool = False, screened: bool = False, loops: bool | None = None) -> dict:
    """Every config scored by the three methods on the same candidates; FLOP/s of the fast engine vs a measured
    matmul peak of the compute dtype (CUDA: bf16; CPU: float64); unless quick, also the fast engine on every
    candidate of the model, against the published loop's time extrapolated from its per-candidate cost.
    ``check`` (the GPU check): the whole-model row is extrapolated for the fast engine too, from its cost per
    candidate of each group kind (a middle block's groups: the average suffix length), instead of run.
    ``on_config(result)`` is called with the results so far after every config (main writes them, so that a
    run stopped by a time limit keeps the configs it finished). ``screened``: the stock-architecture configs;
    ``loops=False`` (default with ``screened`` on CUDA) leaves out the two loop rows."""
    device = device or default_device()
    cuda = device.type == "cuda"
    dtype = torch.float32 if cuda else torch.float64  # CPU: float64, the engine's exactness claim
    full_model = (not quick) if full_model is None else full_model
    peak_dtype = torch.bfloat16 if cuda else torch.float64
    peak = matmul_peak_tflops(device, peak_dtype)
    rows = []
    for name, kw, _, n in configs or _configs(cuda, quick, check, screened):
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
        methods = [("published loop (teacher per candidate)", dict(engine="reference", teacher="recompute")),
                   ("loop, teacher cached", dict(engine="reference")), ("fast engine", dict(engine="fast"))]
        if loops is None:
            loops = not (screened and cuda)  # DeiT-B: the loops would take the whole GPU lease
        for label, kw_eng in methods if loops else methods[2:]:
            def score(kw_eng=kw_eng, model=model, x=x, common=common, groups=groups):
                return vpf.upvits_scores(model, x, groups=groups, **common, **kw_eng)

            t, scores = timed(score, repeats=1 if "loop" in label else 3, device=device)
            results[label] = (t, scores)
        fast = results["fast engine"][1]
        entry = {"model": name, "kwargs": kw, "images": n, "candidates": n_cand, "groups": groups or "all",
                 "dtype": "fp32 weights, bf16 autocast" if cuda else str(x.dtype), "rows": []}
        if loops:
            ref = results["loop, teacher cached"][1]
            plan_a = vpf.make_plan(space, dict(ref), keep={k: 0.5 for k in ref})
            plan_b = vpf.make_plan(space, dict(fast), keep={k: 0.5 for k in fast})
            entry["identical_selection"] = all(torch.equal(plan_a.keep[k], plan_b.keep[k]) for k in plan_a.keep)
            entry["max_rel_diff_fast_vs_loop"] = max(((fast[k] - ref[k]).abs().max() / ref[k].abs().max()).item()
                                                     for k in ref)
        base = results.get("published loop (teacher per candidate)", results["fast engine"])[0]
        for label, (t, _) in results.items():
            entry["rows"].append({"method": label, "seconds": t, "cand_img_per_s": n_cand * n / t,
                                  "speedup_vs_published": base / t if loops else None})
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
                def score_all(model=model, x=x, common=common):
                    return vpf.upvits_scores(model, x, **common)

                t_all, every_score = timed(score_all, repeats=1, device=device)
            est = _published_loop_estimate(entry, every) if loops else None
            entry["full_model"] = {"candidates": every, "fast_engine_seconds": t_all,
                                   "fast_engine_extrapolated": bool(check and groups),
                                   "published_loop_seconds_extrapolated": est,
                                   "speedup_vs_published": est / t_all if loops else None}
            if not (check and groups):
                row = _screened_row(model, x, space, every_score, t_all, common, device)
                row["speedup_vs_published"] = est / row["seconds"] if loops else None
                row["seconds_2000_images_extrapolated"] = row["seconds"] * 2000 / n  # every stage is per image
                entry["full_model"]["screened"] = row
        rows.append(entry)
        if on_config is not None:
            on_config({"quick": quick, "configs": rows})
    return {"quick": quick, "configs": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--check", action="store_true", help="the GPU check: DeiT-S 224 px, 32 images, whole model "
                                                         "extrapolated (CUDA; elsewhere the default configs)")
    ap.add_argument("--screened", action="store_true", help="stock DeiT-T / Swin-T (CPU) or DeiT-B (CUDA): the "
                                                            "screened engine vs the fast engine on every candidate")
    ap.add_argument("--model", help="only the configs whose model name contains this; the results file keeps "
                                    "the other configs of an earlier run on this device")
    args = ap.parse_args()
    dev = default_device()
    name = "kl_engine_screened" if args.screened else "kl_engine"
    configs = _configs(dev.type == "cuda", args.quick, args.check, args.screened)
    earlier = []
    if args.model:
        configs = [c for c in configs if args.model in c[0]]
        if not configs:
            ap.error(f"--model {args.model!r} matches no config of this mode")
        path = result_path(name, dev, args.quick)
        if path.exists():
            earlier = [c for c in json.loads(path.read_text())["configs"] if args.model not in c["model"]]

    def save(partial: dict) -> None:
        write_json(name, dev, {**partial, "configs": earlier + partial["configs"]}, quick=args.quick)

    res = run(args.quick, dev, configs=configs, on_config=save, check=args.check, screened=args.screened,
              full_model=True if args.screened else None)
    print(f"UP-ViTs KL scoring on {device_name(dev)}")
    for c in res["configs"]:
        same = (f"identical selection: {c['identical_selection']}; max rel diff {c['max_rel_diff_fast_vs_loop']:.1e}"
                if "identical_selection" in c else "loops not run")
        print(f"\n{c['model']}  {c['candidates']} candidates x {c['images']} images ({c['dtype']}); {same}")
        print(f"  {'method':<42}{'seconds':>10}{'cand*img/s':>14}{'vs published':>14}")
        for r in c["rows"]:
            vs = f"{r['speedup_vs_published']:>13.1f}x" if r["speedup_vs_published"] is not None else ""
            print(f"  {r['method']:<42}{r['seconds']:>10.2f}{r['cand_img_per_s']:>14.0f}{vs}")
        print(f"  fast engine {c['fast_engine_tflops']:.3g} TFLOP/s = {100 * c['fraction_of_peak']:.0f}% of the "
              f"measured {c['matmul_peak_dtype']} matmul peak {c['matmul_peak_tflops']:.3g} TFLOP/s")
        if "full_model" in c:
            f = c["full_model"]
            est = f["published_loop_seconds_extrapolated"]
            vs = (f" vs published loop ~{est / 3600:.2f} h (extrapolated), x{f['speedup_vs_published']:.0f}"
                  if est is not None else "")
            print(f"  every candidate ({f['candidates']}): fast engine {f['fast_engine_seconds']:.1f} s{vs}")
            if "screened" in f:
                r = f["screened"]
                print(f"  screened engine (keep {r['keep']}): {r['seconds']:.1f} s, "
                      f"{100 * r['share_scored_exactly']:.1f} % of candidates scored exactly, "
                      f"x{r['speedup_vs_fast_engine']:.1f} vs the fast engine, "
                      f"identical selection: {r['identical_selection']}; 2,000 images: "
                      f"~{r['seconds_2000_images_extrapolated'] / 60:.1f} min (extrapolated)")
    save(res)
    print("\nwrote", result_path(name, dev, args.quick))


if __name__ == "__main__":
    main()
