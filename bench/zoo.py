"""Zoo census: every architecture name in timm's ViT-family modules, tried as a new user would.

For each name: built on the meta device and described -- a PruningSpace, or a clear ``UnsupportedModelError``
(anything else is a crash and is counted as one). Each supported one is then built for real at its published widths
with two blocks per stage and a 10-class head, every weight, bias and norm random, in float64; a plan from random
scores keeping half of every group (whole heads where the attention needs them) is removed from one copy and masked
in another, and the logits on one image at the model's input size are compared: exact when the relative error is
below 1e-9. Models whose two-block copy has more than ``--max-params`` parameters are listed as not run (memory).

    python bench/zoo.py [--describe-only] [--max-params 1.2e8] [--limit N] [--only NAME ... --max-params 1e9]
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402

import vitprune_fast as vpf  # noqa: E402
from vitprune_fast.arch import adapter_for  # noqa: E402
from vitprune_fast.errors import UnsupportedModelError  # noqa: E402
from vitprune_fast.masked import masked_copy  # noqa: E402
from vitprune_fast.meta import create_on_meta  # noqa: E402
from vitprune_fast.testing import census_modules, randomize_  # noqa: E402

MODULES = census_modules()  # the timm modules of every adapter in the catalogue


def _meta(name: str, **kwargs) -> torch.nn.Module:
    return create_on_meta(name, **kwargs)


def _two_blocks(model: torch.nn.Module) -> dict:
    """create_model kwargs giving two blocks per stage (the family's depth argument)."""
    if hasattr(model, "blocks_token_only"):  # CaiT: self-attention and class-attention blocks
        return {"depth": 2, "depth_token_only": 2}
    stages = getattr(model, "layers", None) or getattr(model, "stages", None)
    if stages is not None and all(hasattr(s, "blocks") for s in stages):  # Swin, Swin V2, PVTv2
        return {"depths": (2,) * len(stages)}
    return {"depth": 2}


def _exact(name: str, max_params: float) -> dict:
    kwargs = {**_two_blocks(_meta(name)), "num_classes": 10}  # a classifier: feature-only models end in Identity
    try:
        meta = _meta(name, **kwargs)
    except Exception:  # noqa: BLE001 -- e.g. per-block settings sized for the full depth: build it whole
        kwargs = {"num_classes": 10}
        meta = _meta(name, **kwargs)
    n_params = sum(p.numel() for p in meta.parameters())
    if n_params > max_params:
        return {"status": "not_run", "why": f"{n_params / 1e6:.0f} M parameters at two blocks per stage"}
    model = timm.create_model(name, pretrained=False, **kwargs).double().eval()
    randomize_(model)
    space = vpf.describe(model)
    whole = any(g.whole_heads and g.tied_to is None for g in space.of_kind("attn"))
    g = torch.Generator().manual_seed(1)
    scores = {n: torch.rand(gr.size, generator=g, dtype=torch.float64) for n, gr in space.groups.items()}
    plan = vpf.make_plan(space, scores, keep=0.5, attn_mode="heads" if whole else "dims")
    c, h, w = adapter_for(model).input_size()
    x = torch.randn(1, c, h, w, generator=g, dtype=torch.float64)
    with torch.no_grad():
        want = masked_copy(model, plan)(x)
        pruned = vpf.prune_(copy.deepcopy(model), plan)
        got = pruned(x)
    err = float((got - want).abs().max() / want.abs().max())
    return {"status": "exact" if err < 1e-9 else "wrong", "rel_err": err, "params_built": n_params,
            "built_with": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()},
            "kept_params": sum(p.numel() for p in pruned.parameters())}


def run(describe_only: bool, max_params: float, limit: int | None, only: list[str] | None = None) -> dict:
    rows = []
    names = [(m, n) for m in MODULES for n in timm.list_models(module=m) if not only or n in only][:limit]
    for module, name in names:
        t0 = time.perf_counter()
        row = {"module": module, "name": name}
        try:
            space = vpf.describe(_meta(name))
            row.update(status="described", arch=space.arch)
        except UnsupportedModelError as e:
            row.update(status="refused", why=str(e))
        except Exception as e:  # noqa: BLE001 -- a crash is what the census counts
            row.update(status="crashed", why=f"{type(e).__name__}: {e}")
        if row["status"] == "described" and not describe_only:
            try:
                row.update(_exact(name, max_params))
            except Exception as e:  # noqa: BLE001
                row.update(status="crashed", why=f"{type(e).__name__}: {e}")
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(f"{name:<60} {row['status']:<10} {row.get('why', '')[:100]}", flush=True)
    counts = collections.Counter(r["status"] for r in rows)
    by_module = {m: dict(collections.Counter(r["status"] for r in rows if r["module"] == m)) for m in MODULES}
    return {"timm": timm.__version__, "names": len(rows), "counts": dict(counts), "by_module": by_module,
            "describe_only": describe_only, "max_params": max_params, "rows": rows}


def _reruns(saved: dict) -> list[dict]:
    """The earlier ``--only`` reruns of a saved census (one dict in older files)."""
    old = saved.get("reruns", [])
    return [old] if isinstance(old, dict) else list(old)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--describe-only", action="store_true", help="meta-device describe only (seconds, no numerics)")
    ap.add_argument("--max-params", type=float, default=1.2e8)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--only", nargs="+", help="rerun these names and replace their rows in the saved census")
    args = ap.parse_args()
    torch.set_num_threads(1)
    res = run(args.describe_only, args.max_params, args.limit, args.only)
    if args.only:  # merge into the full census
        path = Path(__file__).resolve().parent / "results" / "zoo-amd-epyc.json"
        saved = json.loads(path.read_text()) if path.exists() else None
        if saved is not None:
            new = {r["name"]: r for r in res["rows"]}
            rows = [new.get(r["name"], r) for r in saved["rows"]]
            res = {**{k: saved[k] for k in ("timm", "names", "describe_only", "max_params")}, "rows": rows,
                   "counts": dict(collections.Counter(r["status"] for r in rows)),
                   "by_module": {m: dict(collections.Counter(r["status"] for r in rows if r["module"] == m))
                                 for m in MODULES},
                   "reruns": _reruns(saved) + [{"names": args.only, "max_params": args.max_params}],
                   "note": "rows rerun with --only NAMES --max-params N are listed under reruns (the largest models, "
                           "any timm cannot build with two blocks per stage, built at full depth, and families "
                           "supported after the first census)"}
    c = res["counts"]
    ok = c.get("exact", 0) + (c.get("described", 0) if args.describe_only else 0)
    print(f"{res['names']} names: {c}; supported {ok} = {100 * ok / res['names']:.1f} %")
    print("wrote", write_json("zoo" + ("_describe" if args.describe_only else ""), torch.device("cpu"), res,
                              quick=args.limit is not None))
    c = res["counts"]
    print(f"census now: {c}")


if __name__ == "__main__":
    main()
