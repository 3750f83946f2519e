"""How many proxy images UP-ViTs needs: held-out fidelity and selection overlap against the proxy-set size.

On the demo's trained digits DeiT and Swin (seed 0, cached like the demo's), for every proxy size and draw: the
uniform UP-ViTs plan at ~50 % FLOPs (the screened engine: the exact engine's selection), pruned, then measured on the
held-out test split against the unpruned model (mean KL(unpruned || pruned), top-1 agreement, top-1) before any
fine-tuning, and its selection compared with the plan of the largest proxy set (the share of kept channels in
common). The knee is the smallest size whose mean KL (over draws and both models) is within ``tolerance`` of the
largest size's; the CLI's default ``--proxy`` is read from the result.

    python bench/proxy_size.py                 # sizes 16 .. 1024, 2 draws (about 25 minutes on 2 cores)
    python bench/proxy_size.py --tiny          # the CI size
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import result_path, write_json  # noqa: E402

SIZES = (16, 32, 64, 128, 256, 512, 1024)
TOLERANCE = 0.10  # the knee: within 10 % of the largest proxy set's held-out KL


def overlap(a, b) -> float:
    """Share of the kept channels two plans of the same shapes have in common (1: the same selection)."""
    same = total = 0
    for name, kept in a.keep.items():
        same += int(torch.isin(kept, b.keep[name]).sum())
        total += len(kept)
    return same / max(total, 1)


def run(models=("deit", "swin"), sizes=SIZES, draws=(0, 1), flops: float = 0.5, cache_dir=None,
        train_steps: int | None = None) -> list[dict]:
    import vitprune_fast as vpf
    from vitprune_fast.data import digits
    from vitprune_fast.demo import DemoConfig, base_model, proxy_subset
    from vitprune_fast.metrics import fidelity

    data = digits()
    xtr, ytr = data.train.tensors
    _, test = data.loaders(256)
    rows = []
    for key in models:
        cfg = DemoConfig() if train_steps is None else DemoConfig(train_steps=train_steps)
        base, _, _ = base_model(key, cfg, data.train, cache_dir, lambda *a: None)
        spec = vpf.PlanSpec(flops=flops)
        for draw in draws:
            plans = {}
            for n in sizes:
                t0 = time.perf_counter()
                proxy = proxy_subset(xtr, ytr, n, seed=1000 + draw)
                plan, _ = vpf.upvits_select(base, proxy, spec, batch_size=64, progress=False)
                seconds = time.perf_counter() - t0
                plans[n] = plan
                fid = fidelity(base, vpf.prune_(copy.deepcopy(base), plan), test)
                rows.append({"model": key, "draw": draw, "proxy": n, **fid, "seconds": seconds})
                print(f"{key} draw {draw} proxy {n}: KL {fid['kl']:.4f} agreement {fid['agreement']:.4f} "
                      f"top-1 {fid['top1']:.4f} ({seconds:.0f} s)", flush=True)
            for r in rows:
                if r["model"] == key and r["draw"] == draw:
                    r["overlap_with_largest"] = overlap(plans[r["proxy"]], plans[max(sizes)])
    return rows


def knee(rows: list[dict], tolerance: float = TOLERANCE) -> dict:
    """The mean KL per size (over draws and models) and the smallest size within ``tolerance`` of the largest's."""
    sizes = sorted({r["proxy"] for r in rows})
    mean_kl = {n: statistics.fmean(r["kl"] for r in rows if r["proxy"] == n) for n in sizes}
    ref = mean_kl[sizes[-1]]
    chosen = next(n for n in sizes if mean_kl[n] <= (1 + tolerance) * ref)
    return {"mean_kl": mean_kl, "knee": chosen, "tolerance": tolerance,
            "mean_overlap": {n: statistics.fmean(r["overlap_with_largest"] for r in rows if r["proxy"] == n)
                             for n in sizes}}


def default_proxy(path: Path | None = None) -> int | None:
    """The knee from a saved result (None when there is none)."""
    path = path or result_path("proxy_size", "cpu")
    if not path.is_file():
        return None
    return json.loads(path.read_text())["summary"]["knee"]


def main() -> None:
    import os

    from vitprune_fast.demo import CACHE_ENV, DEFAULT_CACHE

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CI size: tiny training, three sizes, one draw")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cache = Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)
    t0 = time.perf_counter()
    if args.tiny:
        rows = run(models=("deit",), sizes=(4, 8, 16), draws=(0,), cache_dir=None, train_steps=20)
    else:
        rows = run(cache_dir=cache)
    summary = knee(rows)
    out = write_json("proxy_size", "cpu", {"rows": rows, "summary": summary, "seconds": time.perf_counter() - t0,
                                           "flops": 0.5, "engine": "screened"}, quick=args.tiny)
    print(json.dumps(summary, indent=1))
    print("->", out)


if __name__ == "__main__":
    main()
