"""Pruned-model speed: latency (batch 1) and throughput of pruned models vs dense and vs timm's stock model of
the same shape, plus ONNX Runtime CPU latency of a pruned export.

* DeiT-B pruned with the UP-ViTs head-merge rule to the DeiT-S and DeiT-T shapes, against dense DeiT-B and
  stock ``deit_small_patch16_224`` / ``deit_tiny_patch16_224`` (target: within 5 % of the stock model).
* Swin-S and Swin-B pruned to ~50 % FLOPs (keep 0.7 of every width; also with ``round_to=8``), against dense.
The speedup vs dense is printed next to the FLOPs ratio. Random weights (speed does not depend on values).
GPU: CUDA-event medians (triton.testing.do_bench) in bf16 at batch 1 / 64 / 256; CPU: medians of repeated runs
in fp32 at batch 1 / 8 with one intra-op thread, the models of a case timed round-robin and the ratios taken as
medians of per-round ratios (``--quick``: smaller models, fewer repeats).

* ``--families``: a SigLIP-style (attention-pool head) and an EVA-02-style (rotary, SwiGLU) ViT-B at keep 0.7.
* ``--libraries``: timm's ``vit_base_patch16_224``, a transformers ``ViTForImageClassification`` of its shape (SDPA
  attention) and torchvision's ``vit_b_16``, each pruned at keep 0.7 of every width (~50 % FLOPs), all six timed
  round-robin: each library's speedup vs its own dense model, and each one's over timm's (target: within 5 %).
  torchvision's attention keeps the residual's width, so its pruned shape differs a little from the others'.

    python bench/pruned_speed.py [--quick | --check | --families | --libraries]   # --check: the GPU check's rows
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_device, device_name, median_ratio, round_robin, seconds, write_json  # noqa: E402

import vitprune_fast as vpf  # noqa: E402
from vitprune_fast.metrics import count_flops, count_params, input_size  # noqa: E402
from vitprune_fast.score import magnitude_scores  # noqa: E402


def _speed(models: dict[str, torch.nn.Module], device, dtype, batches, repeats) -> dict[str, dict]:
    """Per model and batch: seconds per forward, plus every round's time for per-round ratios.

    CUDA: one ``do_bench`` median per model. CPU: round-robin, each round times every model once (after one
    warm-up each), so the bursts of other load on a shared machine hit all models of a round alike.
    """
    out = {name: {} for name in models}
    for b in batches:
        xs = {name: torch.randn(b, *input_size(m), device=device, dtype=dtype) for name, m in models.items()}
        fns = {name: (lambda m=m, x=xs[name]: m(x)) for name, m in models.items()}
        with torch.inference_mode():
            if device.type == "cuda":
                rounds = {name: [seconds(fn, device)] for name, fn in fns.items()}
            else:
                for fn in fns.values():  # warm-up
                    fn()
                rounds = round_robin(fns, repeats, device)[0]
        for name, ts in rounds.items():
            t = statistics.median(ts)
            out[name][f"bs{b}"] = {"seconds": t, "img_per_s": b / t, "rounds": ts}
    return out


def _ratio(num: dict, den: dict) -> dict[str, float]:
    """Median over rounds of num / den time, per batch size."""
    return {k: median_ratio(num[k]["rounds"], den[k]["rounds"]) for k in den}


def _pruned(name, kwargs, keep, heads=None, round_to=1):
    torch.manual_seed(0)
    return _pruned_model(timm.create_model(name, **kwargs).eval(), keep, heads, round_to)


def _pruned_model(model: torch.nn.Module, keep: float, heads=None, round_to=1) -> torch.nn.Module:
    """``model`` pruned in place by the magnitude rule (speed does not depend on which channels stay)."""
    space = vpf.describe(model)
    return vpf.prune_(model, vpf.make_plan(space, magnitude_scores(model), keep=keep, heads=heads, round_to=round_to))


def _onnx_latency(model, repeats) -> tuple[float | None, str | None]:
    """(ONNX Runtime CPU seconds at batch 1, None), or (None, why not): a missing package or a failed export
    (exporter / onnxscript versions differ between machines) must not lose the GPU timings that follow."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None, "onnxruntime not installed"
    model = model.float().cpu().eval()
    x = torch.randn(1, *input_size(model))
    try:
        with tempfile.TemporaryDirectory() as d:
            path = f"{d}/m.onnx"
            torch.onnx.export(model, (x,), path, input_names=["x"], dynamo=True)
            sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            feed = {"x": x.numpy()}
            return seconds(lambda: sess.run(None, feed), "cpu", repeats), None
    except Exception as e:  # any exporter / runtime failure
        return None, f"{type(e).__name__}: {str(e).strip()[:300]}"


# (dense timm name, timm kwargs, [(stock model of the target shape or None, keep ratio, heads[, round_to])]).
# Swin at keep 0.7 both as is (head_dim 32 -> 22) and with widths rounded to multiples of 8 (head_dim 24), the
# alignment fused GPU attention and GEMM kernels want.
FULL = [("deit_base_patch16_224", {}, [("deit_small_patch16_224", 0.5, 6), ("deit_tiny_patch16_224", 0.25, 3)]),
        ("swin_small_patch4_window7_224", {}, [(None, 0.7, None), (None, 0.7, None, 8)]),
        ("swin_base_patch4_window7_224", {}, [(None, 0.7, None), (None, 0.7, None, 8)])]
QUICK = [("deit_small_patch16_224", {}, [("deit_tiny_patch16_224", 0.5, 3)]),
         ("swin_tiny_patch4_window7_224", {}, [(None, 0.7, None)])]
CHECK = [FULL[0], FULL[2]]  # the GPU check: DeiT-B -> S / Ti shapes, Swin-B keep 0.7 with and without round_to 8
# The families of today: a SigLIP-style ViT (attention-pool head, the pool's attention tied to the residual) and an
# EVA-02-style ViT (rotary attention tied to the residual, whole heads; SwiGLU with sub-norm), keep 0.7 of every
# width: about half the FLOPs (EVA-02's residual rounds to whole 64-dim heads: 768 -> 512).
FAMILIES = [("vit_base_patch16_siglip_224", {}, [(None, 0.7, None)]),
            ("eva02_base_patch14_224.mim_in22k", {}, [(None, 0.7, None)])]


def run(quick: bool, device: torch.device | None = None, cases=None, batches=None, repeats=None,
        onnx: bool = True) -> dict:
    """Dense, pruned and stock same-shape models timed on ``device`` (defaults: see the module docstring)."""
    device = device or default_device()
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    batches = batches or ((1, 64, 256) if cuda else ((1, 4) if quick else (1, 8)))
    repeats = repeats or (3 if quick else 7)
    rows = []
    for dense_name, kwargs, targets in cases or (QUICK if quick else FULL):
        torch.manual_seed(0)
        models = {dense_name: timm.create_model(dense_name, **kwargs).eval()}
        entries = [{"model": dense_name, "kind": "dense", "params": count_params(models[dense_name]),
                    "flops": count_flops(models[dense_name])}]
        for stock_name, keep, heads, *opt in targets:
            round_to = opt[0] if opt else 1
            name = (f"{dense_name} pruned (keep {keep}{f', {heads} heads' if heads else ''}"
                    f"{f', round_to {round_to}' if round_to > 1 else ''})")
            models[name] = _pruned(dense_name, kwargs, keep, heads, round_to)
            entry = {"model": name, "kind": "pruned", "params": count_params(models[name]),
                     "flops": count_flops(models[name]), "stock": stock_name}
            entry["flops_ratio_vs_dense"] = entries[0]["flops"] / entry["flops"]
            if onnx and "deit" in dense_name:
                entry["onnxruntime_cpu_bs1_seconds"], err = _onnx_latency(models[name], repeats)
                if err:
                    entry["onnx_error"] = err
                    print(f"ONNX export / ONNX Runtime failed for {name}: {err}", flush=True)
            if stock_name:
                models[stock_name] = timm.create_model(stock_name, **kwargs).eval()
                entries.append({"model": stock_name, "kind": "stock", "params": count_params(models[stock_name]),
                                "flops": count_flops(models[stock_name])})
                entry["same_shape_as_stock"] = entry["params"] == entries[-1]["params"]
            entries.append(entry)
        for m in models.values():
            m.to(device, dtype)
        speed = _speed(models, device, dtype, batches, repeats)
        for e in entries:
            e.update(speed[e["model"]])
        for e in entries:
            if e["kind"] != "pruned":
                continue
            e["speedup_vs_dense"] = _ratio(speed[dense_name], speed[e["model"]])
            if e["stock"]:
                e["vs_stock_same_shape"] = _ratio(speed[e["model"]], speed[e["stock"]])
                e["within_5pct_of_stock"] = all(v <= 1.05 for v in e["vs_stock_same_shape"].values())
        rows += entries
        del models
    return {"dtype": str(dtype), "batches": list(batches), "rows": rows}


VIT_B = {"timm": ("vit_base_patch16_224", {}),
         "transformers": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                              image_size=224, patch_size=16, num_labels=1000),
         "torchvision": dict(image_size=224, patch_size=16, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072,
                             num_classes=1000),  # = torchvision.models.vit_b_16()
         "keep": 0.7}


def _library_builders(case: dict) -> tuple[dict, list[str]]:
    """Library name -> a function building its dense ViT of the case's shape (random init), for the libraries that
    are installed (the GPU image has no transformers); and the names of those that are not."""
    import importlib.util

    name, kwargs = case["timm"]
    builders = {"timm": lambda: timm.create_model(name, **kwargs).eval()}
    missing = [lib for lib in ("transformers", "torchvision") if importlib.util.find_spec(lib) is None]
    if "transformers" not in missing:
        import transformers

        builders["transformers"] = lambda: transformers.ViTForImageClassification(
            transformers.ViTConfig(**case["transformers"], attn_implementation="sdpa")).eval()
    if "torchvision" not in missing:
        import torchvision

        builders["torchvision"] = lambda: torchvision.models.VisionTransformer(**case["torchvision"]).eval()
    return builders, missing


def run_libraries(device: torch.device | None = None, case: dict = VIT_B, batches=None, repeats=None) -> dict:
    """timm, transformers and torchvision ViTs of one shape, dense and pruned at one keep ratio, all timed
    round-robin (module docstring)."""
    device = device or default_device()
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    batches = batches or ((1, 64, 256) if cuda else (1, 8))
    repeats = repeats or 7
    keep = case["keep"]
    torch.manual_seed(0)
    models, rows = {}, []
    builders, missing = _library_builders(case)
    for lib, make in builders.items():
        models[f"{lib} dense"] = make()
        models[f"{lib} pruned (keep {keep})"] = _pruned_model(make(), keep)
    for name, m in models.items():
        rows.append({"model": name, "library": name.split()[0], "kind": name.split()[1],
                     "params": count_params(m), "flops": count_flops(m)})
        m.to(device, dtype)
    speed = _speed(models, device, dtype, batches, repeats)
    pruned = {}
    for r in rows:
        r.update(speed[r["model"]])
        if r["kind"] == "pruned":
            dense = next(d for d in rows if d["library"] == r["library"] and d["kind"] == "dense")
            r["flops_ratio_vs_dense"] = dense["flops"] / r["flops"]
            r["speedup_vs_dense"] = _ratio(speed[dense["model"]], speed[r["model"]])
            pruned[r["library"]] = r
    tm = pruned["timm"]
    summary = {}
    for lib in [lib for lib in pruned if lib != "timm"]:
        r = pruned[lib]
        ratio = {b: r["speedup_vs_dense"][b] / tm["speedup_vs_dense"][b] for b in r["speedup_vs_dense"]}
        summary[lib] = {"same_shape_as_timm": r["params"] == tm["params"] and r["flops"] == tm["flops"],
                        "speedup_over_timm_speedup": ratio,
                        "within_5pct": all(abs(v - 1) <= 0.05 for v in ratio.values())}
    return {"dtype": str(dtype), "batches": list(batches), "keep": keep, "rows": rows, "summary": summary,
            "not_installed": missing}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--check", action="store_true", help="the GPU check's size: DeiT-B and Swin-B rows, 3 rounds, "
                                                         "no ONNX")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (default 1: on a shared box, multi-threaded OpenMP stalls dominate timings)")
    ap.add_argument("--families", action="store_true", help="SigLIP-style and EVA-02-style rows only")
    ap.add_argument("--libraries", action="store_true", help="timm vs transformers vs torchvision ViT-B rows only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = default_device()
    if args.libraries:
        res = run_libraries(dev)
        print(f"timm vs transformers vs torchvision ViT-B on {device_name(dev)} ({res['dtype']})"
              + (f"; not installed: {', '.join(res['not_installed'])}" if res["not_installed"] else ""))
        for r in res["rows"]:
            sp = (", speedup " + ", ".join(f"{k} x{v:.2f}" for k, v in r["speedup_vs_dense"].items())
                  if "speedup_vs_dense" in r else "")
            print(f"{r['model']:<34}{r['params']:>12,}{r['flops'] / 1e9:>8.2f} GFLOPs"
                  + "".join(f"{1e3 * r[f'bs{b}']['seconds']:>10.1f} ms" for b in res["batches"]) + sp)
        for lib, s in res["summary"].items():
            print(f"{lib} speedup / timm speedup:", {k: round(v, 3) for k, v in s["speedup_over_timm_speedup"].items()},
                  "within 5 %:", s["within_5pct"], "same shape:", s["same_shape_as_timm"])
        print("wrote", write_json("pruned_speed_libraries", dev, res))
        return
    if args.check:
        res = run(args.quick, dev, cases=CHECK, repeats=3, onnx=False)
    elif args.families:
        res = run(args.quick, dev, cases=FAMILIES, onnx=False)
    else:
        res = run(args.quick, dev)
    print(f"pruned-model speed on {device_name(dev)} ({res['dtype']})")
    bs = [f"bs{b}" for b in res["batches"]]
    print(f"{'model':<58}{'params':>12}{'GFLOPs':>8}" + "".join(f"{b + ' ms':>11}" for b in bs) + "  notes")
    for r in res["rows"]:
        notes = []
        if "flops_ratio_vs_dense" in r:
            sp = ", ".join(f"{k} x{v:.2f}" for k, v in r["speedup_vs_dense"].items())
            notes.append(f"FLOPs /{r['flops_ratio_vs_dense']:.2f}, speedup {sp}")
        if "vs_stock_same_shape" in r:
            notes.append("time vs stock " + ", ".join(f"{k} {v:.3f}" for k, v in r["vs_stock_same_shape"].items()))
        if r.get("onnxruntime_cpu_bs1_seconds"):
            notes.append(f"ORT CPU bs1 {1e3 * r['onnxruntime_cpu_bs1_seconds']:.1f} ms")
        print(f"{r['model'][:57]:<58}{r['params']:>12,}{r['flops'] / 1e9:>8.2f}"
              + "".join(f"{1e3 * r[b]['seconds']:>11.1f}" for b in bs) + "  " + "; ".join(notes))
    print("wrote", write_json("pruned_speed_families" if args.families else "pruned_speed", dev, res, quick=args.quick))


if __name__ == "__main__":
    main()
