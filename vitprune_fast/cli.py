"""``vitprune-fast`` command line."""
from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    """Prune a random-init DeiT-S to the DeiT-Ti shape and compare params / FLOPs / CPU latency."""
    import timm
    import torch

    from . import describe, make_plan, prune_
    from .metrics import count_flops, count_params, measure_latency
    from .score import magnitude_scores

    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    before = (count_params(model), count_flops(model), measure_latency(model, repeats=args.repeats))
    space = describe(model)
    plan = make_plan(space, magnitude_scores(model), keep=0.5, heads=3)  # 384->192 wide, 6->3 heads, 1536->768
    prune_(model, plan)
    after = (count_params(model), count_flops(model), measure_latency(model, repeats=args.repeats))
    ref = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    stock = (count_params(ref), count_flops(ref), measure_latency(ref, repeats=args.repeats))
    print(f"{'model':<28}{'params':>14}{'GFLOPs':>10}{'CPU latency (ms, bs 1)':>26}")
    for label, (n, f, t) in zip(["deit_small (dense)", "deit_small pruned to Ti", "timm deit_tiny (stock)"],
                                [before, after, stock], strict=True):
        print(f"{label:<28}{n:>14,}{f / 1e9:>10.2f}{t * 1e3:>26.2f}")
    print(f"params x{before[0] / after[0]:.2f} smaller, FLOPs x{before[1] / after[1]:.2f} fewer, "
          f"latency x{before[2] / after[2]:.2f} faster; same params as stock deit_tiny: {after[0] == stock[0]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vitprune-fast", description="Structured pruning for timm ViT/DeiT/Swin.")
    sub = ap.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="prune a random-init DeiT-S to the DeiT-Ti shape; print params/FLOPs/latency")
    demo.add_argument("--repeats", type=int, default=10, help="timed forward passes per model (median reported)")
    demo.set_defaults(func=_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
