"""Method comparison that holds up across seeds: the demo's comparison over training seeds and proxy draws.

For DeiT and Swin on the embedded digits (the demo's models and recipe), for every training seed: train the model
(cached like the demo's), then at each FLOPs target (~50 % and ~30 %) prune a copy by every method and fine-tune it
with the same budget (the demo's distillation recipe, same batches for every method); top-1 before and after.
Every method runs through the method interface (``vitprune_fast.methods``): a label of the study is a registered
method, or a variant (a registered method with options, e.g. progressive UP-ViTs). Methods that draw something
(``Method.draws``: UP-ViTs' proxy images, random scores, Taylor's batches, DAP's probes) run once per draw; magnitude
and DIMAP are deterministic and run once per seed. A method that trains while it plans (DAP) gets the parameter
fraction of the uniform plan at the same FLOPs and the fine-tuning steps, so it has no "before" number.

The summary (mean ± standard deviation over runs, and per run the win / tie / loss of each method against
magnitude on the same trained model and target) is computed from the runs in the results file only.

    python bench/fidelity.py                # 2 seeds x 2 draws, DeiT + Swin, FLOPs 0.5 / 0.3 (README: its minutes)
    python bench/fidelity.py --readme       # re-render the README table and plot from the results file
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import result_path, write_json  # noqa: E402

from vitprune_fast.demo import DemoConfig  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- fidelity:start -->", "<!-- fidelity:end -->"
METHODS = ("upvits", "upvits-progressive", "upvits-global", "upvits-global-progressive", "dimap", "magnitude",
           "magnitude-global", "random", "taylor", "dap")  # rows: vitprune_fast.variants (-global, -progressive)
REC_FINETUNE = ("upvits", "upvits-global", "magnitude")  # rows fine-tuned after reconstruction too
BASELINE = "magnitude"
TIE = 1e-9  # accuracies are multiples of 1/450; equal means equal


@dataclass(frozen=True)
class Study:
    """Every knob of the study (recorded in the results)."""

    models: tuple[str, ...] = ("deit", "swin")
    seeds: tuple[int, ...] = (0, 1, 2)  # training seeds of the unpruned models
    draws: tuple[int, ...] = (0, 1)  # proxy-set / random-score / Taylor-batch draws
    targets: tuple[float, ...] = (0.5, 0.3)  # FLOPs fractions kept
    methods: tuple[str, ...] = METHODS  # rows: registered methods with -global / -progressive (variants.parse)
    progressive_steps: int = 3
    progressive_engine: str = "screened"  # the re-scoring steps (the one-shot scores come from the exact engine)
    reconstruct: bool = True  # every row also measured after least-squares reconstruction (its "+rec" row)
    rec_finetune: tuple[str, ...] = REC_FINETUNE  # rows whose reconstructed model is fine-tuned too
    demo: DemoConfig = DemoConfig(proxy_images=256)  # training, fine-tuning budget: the demo's; proxy: see README

    def method(self, label: str):
        """The method (with its options) a study label runs: one-shot UP-ViTs by the exact engine (its scores serve
        the uniform and the global plans and the progressive rows' first step), progressive rows' later steps by
        ``progressive_engine``."""
        from vitprune_fast.variants import parse

        row = parse(label)
        return row.build(steps=self.progressive_steps,
                         engine=self.progressive_engine if row.progressive else "exact")


TINY = Study(models=("deit",), seeds=(0,), draws=(0, 1), targets=(0.5,), progressive_steps=2,  # CI's size
             demo=replace(DemoConfig(), train_steps=20, proxy_images=6, taylor_batches=1, finetune_steps=3))
STUDY = Study(seeds=(0, 1))  # the committed study: 2 seeds x 2 draws (30 minutes on 2 cores, README)
DRAWN = frozenset(m for m in METHODS if TINY.method(m).draws)  # the default labels that run once per draw


# ------------------------------------------------------------------------------------------------------- runs
def run_seed(key: str, seed: int, study: Study, cache_dir: Path | None) -> list[dict]:
    """Every (draw, target, method) run of one trained model."""
    from torch.utils.data import DataLoader, TensorDataset

    from vitprune_fast.data import digits
    from vitprune_fast.demo import base_model, proxy_subset
    from vitprune_fast.finetune import DEFAULT_ALPHA, evaluate, train
    from vitprune_fast.methods import MethodData
    from vitprune_fast.metrics import count_flops, count_params, fidelity
    from vitprune_fast.plan import PlanSpec
    from vitprune_fast.prune import prune_
    from vitprune_fast.reconstruct import reconstruct_
    from vitprune_fast.targets import keep_for_flops, uniform_fraction
    from vitprune_fast.variants import parse

    cfg = replace(study.demo, seed=seed)
    data = digits()
    xtr, ytr = data.train.tensors
    train_loader, test_loader = data.loaders(cfg.batch_size, seed=seed)
    base, _, _ = base_model(key, cfg, data.train, cache_dir, lambda *a: None)
    dense_acc, dense_flops, dense_params = 100 * evaluate(base, test_loader), count_flops(base), count_params(base)
    with torch.no_grad():
        t_logits = torch.cat([base(x) for x in xtr.split(256)])
    g = torch.Generator()
    ft_loader = DataLoader(TensorDataset(xtr, ytr, t_logits), batch_size=cfg.batch_size, shuffle=True, generator=g)
    runs = []
    for draw in study.draws:
        proxy = proxy_subset(xtr, ytr, cfg.proxy_images, seed=1000 * seed + draw)
        mdata = MethodData(loader=train_loader, images=proxy, chunk=len(proxy), batches=cfg.taylor_batches,
                           seed=1000 * seed + draw, progress=False, teacher=base, steps=cfg.finetune_steps,
                           lr=cfg.finetune_lr)  # one per draw: scores are reused across targets
        for target in study.targets:
            ratio, frac = keep_for_flops(base, target)
            for label in study.methods:
                method = study.method(label)
                if not method.draws and draw != study.draws[0]:
                    continue  # deterministic given the trained model: once per seed
                trains = "training" in method.needs  # it gets the uniform plan's parameters and the steps
                spec = PlanSpec(params=uniform_fraction(base, ratio, "params")) if trains else PlanSpec(flops=frac)
                t0 = time.perf_counter()
                g.manual_seed(seed)  # every method fine-tunes on the same batches
                result = method.plan(base, mdata, parse(label).spec(spec))
                students = {}  # row -> (model, held-out fidelity before fine-tuning)
                if result.model is not None:  # pruned while fine-tuning
                    students[label] = (result.model, None)
                else:
                    student = prune_(copy.deepcopy(base), result.plan)
                    students[label] = (student, fidelity(base, student, test_loader))
                    if study.reconstruct:
                        rec = copy.deepcopy(student)
                        reconstruct_(rec, base, proxy, result.plan, batch_size=len(proxy), progress=False)
                        students[f"{label}+rec"] = (rec, fidelity(base, rec, test_loader))
                seconds = time.perf_counter() - t0
                for row, (student, fid) in students.items():
                    tuned = result.model is not None
                    if not tuned and (row == label or label in study.rec_finetune):
                        g.manual_seed(seed)
                        train(student, ft_loader, cfg.finetune_steps, lr=cfg.finetune_lr, alpha=DEFAULT_ALPHA,
                              progress=False)
                        tuned = True
                    runs.append({"model": key, "seed": seed, "draw": draw if method.draws else None,
                                 "target": target, "method": row, "dense_acc": dense_acc,
                                 "flops_frac": count_flops(student) / dense_flops,
                                 "params_frac": count_params(student) / dense_params,
                                 "acc_pruned": None if fid is None else 100 * fid["top1"],
                                 "kl_pruned": None if fid is None else fid["kl"],
                                 "agree_pruned": None if fid is None else 100 * fid["agreement"],
                                 "acc_finetuned": 100 * evaluate(student, test_loader) if tuned else None,
                                 "seconds": seconds if row == label else None})
    return runs


def _task(args) -> list[dict]:
    torch.set_num_threads(1)  # tiny models: two single-threaded processes beat one two-threaded
    return run_seed(*args)


def run(study: Study, cache_dir: Path | None, jobs: int = 2) -> list[dict]:
    """Every run of the study, (model, seed) tasks spread over ``jobs`` processes."""
    tasks = [(key, seed, study, cache_dir) for seed in study.seeds for key in study.models]
    if jobs <= 1:
        return [r for t in tasks for r in _task(t)]
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(jobs) as pool:
        return [r for rs in pool.imap(_task, tasks) for r in rs]


# ---------------------------------------------------------------------------------------------------- summary
def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict]) -> list[dict]:
    """Per (model, target, method): mean ± std of top-1 before / after over its runs, and its wins / ties / losses
    against magnitude on the same trained model and target (each of its runs vs magnitude's run)."""
    base = {(r["model"], r["seed"], r["target"]): r for r in runs if r["method"] == BASELINE}
    cells: dict[tuple, list[dict]] = {}
    for r in runs:
        cells.setdefault((r["model"], r["target"], r["method"]), []).append(r)
    out = []
    for (model, target, method), rs in cells.items():
        row = {"model": model, "target": target, "method": method, "runs": len(rs),
               "seeds": len({r["seed"] for r in rs}),
               "flops_frac": statistics.fmean(r["flops_frac"] for r in rs),
               "dense_acc": _mean_std([r["dense_acc"] for r in rs])}
        for measure in ("kl_pruned", "agree_pruned"):
            vals = [r[measure] for r in rs if r.get(measure) is not None]
            row[measure] = _mean_std(vals) if vals else None
        for phase in ("acc_pruned", "acc_finetuned"):
            vals = [r[phase] for r in rs if r[phase] is not None]
            row[phase] = _mean_std(vals) if vals else None
            if method != BASELINE and vals:
                diffs = [r[phase] - base[(model, r["seed"], target)][phase] for r in rs
                         if (model, r["seed"], target) in base and r[phase] is not None
                         and base[(model, r["seed"], target)][phase] is not None]
                row[f"{phase}_vs_{BASELINE}"] = {"wins": sum(d > TIE for d in diffs),
                                                  "ties": sum(abs(d) <= TIE for d in diffs),
                                                  "losses": sum(d < -TIE for d in diffs)}
        out.append(row)
    return out


def _cell(ms, wtl=None, digits: int = 1) -> str:
    if ms is None:
        return "—"
    s = f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"
    return s + (f" ({wtl['wins']}/{wtl['ties']}/{wtl['losses']})" if wtl else "")


def render(doc: dict) -> str:
    """The README block: one table per FLOPs target, from the results document."""
    st = doc["study"]
    lines = [START, "", f"Generated by `python bench/fidelity.py --readme` from `{doc['file']}` ({doc['device']}, "
             f"{doc['date']}, one study run, {doc.get('seconds', 0) / 60:.0f} min): {len(st['seeds'])} training "
             f"seed(s) × {len(st['draws'])} draw(s), {st['demo']['finetune_steps']} fine-tuning steps, progressive "
             f"rows in {st['progressive_steps']} steps (later steps by the {st.get('progressive_engine', 'exact')} "
             f"engine); proxy and calibration images: {st['demo']['proxy_images']} class-balanced training images "
             "per draw, no augmentation; `+rec`: after least-squares reconstruction on them. Before fine-tuning, on "
             "the held-out test split: top-1 %, mean KL(unpruned ‖ pruned) and top-1 agreement with the unpruned "
             "model; mean ± std over the runs; in brackets the runs that win / tie / lose against magnitude on the "
             "same trained model.", ""]
    rows = doc["summary"]
    for target in st["targets"]:
        lines += [f"**~{100 * target:.0f} % FLOPs**", "",
                  "| model | method | runs | FLOPs % | top-1 pruned (W/T/L vs magnitude) | KL pruned | agreement % | "
                  "top-1 fine-tuned (W/T/L) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["target"] != target:
                continue
            lines.append(f"| {r['model']} | {r['method']} | {r['runs']} | {100 * r['flops_frac']:.1f} | "
                         f"{_cell(r['acc_pruned'], r.get(f'acc_pruned_vs_{BASELINE}'))} | "
                         f"{_cell(r.get('kl_pruned'), digits=3)} | {_cell(r.get('agree_pruned'))} | "
                         f"{_cell(r['acc_finetuned'], r.get(f'acc_finetuned_vs_{BASELINE}'))} |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def plot(summary: list[dict], path: Path) -> Path | None:
    """Mean ± std before / after per method, one panel per model and target."""
    from vitprune_fast.plots import plot_accuracies

    panels: dict[str, dict] = {}
    for r in summary:
        before, after = r["acc_pruned"] or (math.nan, 0.0), r["acc_finetuned"] or (math.nan, 0.0)
        panels.setdefault(f"{r['model']} ~{100 * r['target']:.0f} % FLOPs", {})[r["method"]] = {
            "dense": r["dense_acc"][0], "before": before[0], "after": after[0], "before_std": before[1],
            "after_std": after[1]}
    return plot_accuracies(panels, path, "digits: top-1 mean ± std over seeds and draws")


def update_readme(doc: dict, readme: Path = README) -> None:
    text = readme.read_text()
    if START not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} block")
    readme.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: render(doc), text, flags=re.S))


def main() -> None:
    from vitprune_fast.demo import CACHE_ENV, DEFAULT_CACHE

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the CI size: DeiT only, 1 seed, a few steps")
    ap.add_argument("--readme", action="store_true", help="only re-render the README table from the results file")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--no-cache", action="store_true", help="retrain the unpruned models")
    args = ap.parse_args()
    name = "fidelity-tiny" if args.tiny else "fidelity"
    path = result_path(name, "cpu")
    if args.readme:  # and the plot
        doc = {**json.loads(path.read_text()), "file": f"bench/results/{path.name}"}
        update_readme(doc)
        plot(doc["summary"], path.with_suffix(".png"))
        return
    import os

    study = TINY if args.tiny else STUDY
    cache = None if args.no_cache else Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)
    t0 = time.perf_counter()
    runs = run(study, cache, args.jobs)
    summary = summarize(runs)
    out = write_json(name, "cpu", {"study": asdict(study), "seconds": time.perf_counter() - t0, "runs": runs,
                                   "summary": summary})
    png = plot(summary, out.with_suffix(".png"))
    doc = {**json.loads(out.read_text()), "file": f"bench/results/{out.name}"}
    print(render(doc))
    print(f"\n{len(runs)} runs in {doc['seconds']:.0f} s -> {out}" + (f", {png}" if png else ""))
    if not args.tiny:
        update_readme(doc)


if __name__ == "__main__":
    main()
