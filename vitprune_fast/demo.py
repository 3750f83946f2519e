"""``vitprune-fast demo``: prune a small DeiT and a small Swin trained on the embedded digits, every method at once.

For each model: train it (or load it from the cache), find ONE keep ratio for the residual, attention and MLP
groups that gives ~50 % of the dense FLOPs, prune a copy by every method at that ratio (DIMAP uses its own
module-wise thresholds at the same FLOPs fraction), then fine-tune each copy briefly with the distillation loss
against the unpruned model. Params, FLOPs, batch-1 CPU latency and top-1 before / after fine-tuning are printed
and written to ``<out>/demo.json`` with PNG plots.

The two models run in two worker processes (one intra-op thread each) when the machine has two cores: these
models are far too small for intra-op threads to pay off, and two single-threaded processes use both cores.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import queue
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from .errors import ConfigError
from .methods import MethodData, MethodResult, get_method, method_names
from .table import table
from .variants import parse

CACHE_ENV = "VITPRUNE_FAST_CACHE"
DEFAULT_CACHE = Path.home() / ".cache" / "vitprune_fast" / "demo"
# the default rows: registered methods, optionally -global (global allocation), -progressive, +rec (reconstruction);
# see vitprune_fast.variants
METHODS = ("upvits", "upvits-global", "upvits+rec", "dimap", "magnitude", "magnitude+rec", "random")
DATA_VERSION = "digits-32px-v1"  # bump when data.digits changes: invalidates cached models

# timm names + kwargs: 32-px inputs, 10 classes, ~7 MFLOPs each.
MODELS = {
    "deit": ("deit_tiny_patch16_224",
             dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=10)),
    "swin": ("swin_tiny_patch4_window7_224",
             dict(img_size=32, patch_size=4, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
                  num_classes=10)),
}


@dataclass(frozen=True)
class DemoConfig:
    """Every knob of one demo run (recorded in demo.json)."""

    train_steps: int = 1500  # from-scratch training of the unpruned models (cached)
    train_lr: float = 4e-3
    augment: tuple[float, float, float] = (5.0, 0.05, 0.05)  # random_affine: degrees, scale, shift
    batch_size: int = 64
    flops: float = 0.5  # target FLOPs fraction of the pruned models
    proxy_images: int = 300  # UP-ViTs proxy: class-balanced subset of the train split (30 per class)
    taylor_batches: int = 4
    finetune_steps: int = 200
    finetune_lr: float = 5e-4
    alpha: float | None = None  # None: finetune.DEFAULT_ALPHA
    latency_repeats: int = 20  # per round (5 rounds, best median kept)
    methods: tuple[str, ...] = METHODS
    upvits_engine: str = "exact"  # the `engine` option of every method that has one (UP-ViTs: "screened" is the same
    # selection for fewer exact evaluations)
    seed: int = 0


FULL = DemoConfig()
FAST = DemoConfig(train_steps=30, proxy_images=4, taylor_batches=1, finetune_steps=4, latency_repeats=2)


# ------------------------------------------------------------------------------------------------- unpruned models
def _cache_key(key: str, cfg: DemoConfig) -> str:
    name, kw = MODELS[key]
    recipe = {"name": name, "kwargs": kw, "steps": cfg.train_steps, "lr": cfg.train_lr, "batch": cfg.batch_size,
              "augment": list(cfg.augment), "seed": cfg.seed, "data": DATA_VERSION}
    return f"{key}-{hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]}"


def _train_base(key: str, cfg: DemoConfig, train_ds: TensorDataset) -> torch.nn.Module:
    """A random-init model trained from scratch on the digits (seeded; deterministic for a given thread count)."""
    import timm

    from .data import random_affine
    from .finetune import train

    name, kw = MODELS[key]
    torch.manual_seed(cfg.seed)
    model = timm.create_model(name, pretrained=False, **kw)
    g = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, generator=g)
    aug_g = torch.Generator().manual_seed(cfg.seed + 1)
    deg, scale, shift = cfg.augment
    train(model, loader, cfg.train_steps, lr=cfg.train_lr, weight_decay=0.05, alpha=0.0,
          augment=lambda x: random_affine(x, aug_g, deg, scale, shift), progress=False)
    return model.eval()


def base_model(key: str, cfg: DemoConfig, train_ds: TensorDataset, cache: Path | None,
               report: Callable) -> tuple[torch.nn.Module, bool, float]:
    """The trained unpruned model: from ``cache`` when present, else trained (and cached).

    Returns:
        ``(model, loaded from cache, seconds spent)``.
    """
    from .errors import CheckpointError
    from .io import load_pruned, save_pruned

    t0 = time.perf_counter()
    where = cache / _cache_key(key, cfg) if cache is not None else None
    if where is not None and where.is_dir():
        try:
            return load_pruned(where), True, time.perf_counter() - t0
        except CheckpointError as e:
            report("log", f"cache entry {where} unusable ({e}); retraining")
    model = _train_base(key, cfg, train_ds)
    if where is not None:  # write to a temp dir, then rename: a concurrent or killed run never leaves half a model
        where.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=where.parent, prefix=".tmp-"))
        save_pruned(model, tmp, model_name=MODELS[key][0])
        try:
            tmp.rename(where)
        except OSError:  # someone else cached it first
            shutil.rmtree(tmp, ignore_errors=True)
    return model, False, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------------- pruning
def proxy_subset(x: torch.Tensor, y: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` images, as class-balanced as possible (UP-ViTs' proxy set takes the same number per class)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g)
    classes = y.unique()
    per_class = [order[y[order] == c] for c in classes]  # each class's images in random order
    picked = [pc[i] for i in range(max(len(pc) for pc in per_class)) for pc in per_class if i < len(pc)]
    return x[torch.stack(picked[:n])]


def _prune_by(label: str, base, cfg: DemoConfig, spec, data: MethodData
              ) -> tuple[torch.nn.Module, float, MethodResult]:
    """(pruned model, seconds, the method's result) for one row at the shared spec.

    Every method plans through :meth:`~vitprune_fast.methods.Method.plan` (UP-ViTs' screened engine gives a plan
    without a full set of scores: None; a method that trains while it plans returns its fine-tuned model); a
    ``+rec`` row is then reconstructed on the proxy images."""
    from .prune import prune_
    from .reconstruct import reconstruct_, reconstruct_summary

    t0 = time.perf_counter()
    row = parse(label)
    result = row.build(engine=cfg.upvits_engine).plan(base, data, row.spec(spec))
    model = result.model if result.model is not None else prune_(copy.deepcopy(base), result.plan)
    if row.reconstruct:
        rec = reconstruct_(model, base, data.images, result.plan, batch_size=data.chunk, progress=False)
        result.report["reconstruct"] = {k: v for k, v in rec.items() if k != "layers"}
        result.notes.append(reconstruct_summary(rec))
    return model, time.perf_counter() - t0, result


def run_model(key: str, cfg: DemoConfig, cache: Path | None, out: Path, report: Callable) -> dict:
    """The whole demo for one model. ``report(kind, message)``: ``"step"`` advances the progress, ``"log"`` prints.

    Returns:
        A JSON-friendly record (unpruned and per-method rows, keep ratio, timings).
    """
    from .arch import describe
    from .data import digits
    from .finetune import DEFAULT_ALPHA, evaluate, train
    from .io import save_pruned
    from .metrics import count_flops, count_params, fidelity
    from .plan import PlanSpec
    from .plots import plot_kept_widths, plot_score_distributions
    from .targets import keep_for_flops, uniform_fraction

    t_start, cpu_start = time.perf_counter(), time.process_time()
    name, kw = MODELS[key]
    data = digits()
    xtr, ytr = data.train.tensors
    train_loader, test_loader = data.loaders(cfg.batch_size, seed=cfg.seed)
    base, cached, t_base = base_model(key, cfg, data.train, cache, report)
    dense_acc = evaluate(base, test_loader)
    report("step", f"{'loaded' if cached else 'trained'} in {t_base:.0f} s, top-1 {100 * dense_acc:.1f} %")
    space = describe(base)
    dense_flops = count_flops(base)
    ratio, frac = keep_for_flops(base, cfg.flops)
    with torch.no_grad():  # no augmentation while fine-tuning: the teacher's logits are computed once
        t_logits = torch.cat([base(x) for x in xtr.split(256)])
    g = torch.Generator().manual_seed(cfg.seed)
    ft_loader = DataLoader(TensorDataset(xtr, ytr, t_logits), batch_size=cfg.batch_size, shuffle=True, generator=g)
    proxy = proxy_subset(xtr, ytr, cfg.proxy_images, cfg.seed)
    alpha = DEFAULT_ALPHA if cfg.alpha is None else cfg.alpha
    rows = [{"method": "unpruned", "params": count_params(base), "flops": dense_flops, "flops_frac": 1.0,
             "acc_pruned": 100 * dense_acc, "acc_finetuned": None, "score_s": None}]
    save_pruned(base, out / "models" / f"{key}-unpruned", model_name=name)
    # every method plans for the same FLOPs fraction (the one the shared keep ratio reaches); a method that trains
    # while it plans gets the parameter fraction of that ratio's uniform plan, and the fine-tuning budget
    spec = PlanSpec(flops=frac)
    mdata = MethodData(loader=train_loader, images=proxy, chunk=len(proxy), batches=cfg.taylor_batches, seed=cfg.seed,
                       progress=False, teacher=base, steps=cfg.finetune_steps, lr=cfg.finetune_lr)
    all_scores, widths = {}, {}
    for method in cfg.methods:
        trains = "training" in get_method(parse(method).method).needs
        method_spec = PlanSpec(params=uniform_fraction(base, ratio, "params")) if trains else spec
        student, t_score, result = _prune_by(method, base, cfg, method_spec, mdata)
        tuned, reports = result.model is not None, result.report
        if result.scores is not None:
            all_scores[method] = result.scores
        widths[method] = {n: gr.size for n, gr in describe(student).groups.items()}
        fid = None if tuned else fidelity(base, student, test_loader)  # held out: KL to the unpruned, agreement
        before = None if tuned else fid["top1"]
        report("step", f"{method}: planned in {t_score:.1f} s, top-1 pruned "
                       + ("- (pruned while fine-tuning)" if tuned else f"{100 * before:.1f} %"))
        for note in result.notes if reports else ():  # what an engine with a report did (e.g. screened UP-ViTs)
            report("log", f"{key}: {note}")
        g.manual_seed(cfg.seed)  # every method fine-tunes on the same batches
        t0 = time.perf_counter()
        if not tuned:
            train(student, ft_loader, cfg.finetune_steps, lr=cfg.finetune_lr, alpha=alpha, progress=False)
        t_ft = time.perf_counter() - t0
        after = evaluate(student, test_loader)
        report("step", f"{method}: fine-tuned in {t_ft:.0f} s, top-1 {100 * after:.1f} %")
        flops = count_flops(student)
        rows.append({"method": method, "params": count_params(student), "flops": flops,
                     "flops_frac": flops / dense_flops, "acc_pruned": None if tuned else 100 * before,
                     "kl_pruned": None if tuned else fid["kl"],
                     "agree_pruned": None if tuned else 100 * fid["agreement"],
                     "acc_finetuned": 100 * after, "score_s": t_score, "finetune_s": t_ft, **reports})
        save_pruned(student, out / "models" / f"{key}-{method}", model_name=name)
    plots = [plot_kept_widths(space, widths, out / f"{key}-widths.png", f"{key}: kept width per block (~50 % FLOPs)"),
             plot_score_distributions(space, all_scores, out / f"{key}-scores.png", f"{key}: score distributions")]
    return {"model": key, "timm_name": name, "kwargs": kw, "keep_ratio": ratio, "flops_target": cfg.flops,
            "flops_reached": frac, "alpha": alpha, "base_cached": cached, "base_s": t_base, "rows": rows,
            "widths": widths, "plots": [p.name for p in plots if p is not None],
            "seconds": time.perf_counter() - t_start, "cpu_s": time.process_time() - cpu_start}


# ------------------------------------------------------------------------------------------------------ workers
def _worker(key: str, cfg: DemoConfig, cache, out, events) -> None:
    """Process entry point: one thread, results and progress through ``events``."""
    torch.set_num_threads(1)
    try:
        res = run_model(key, cfg, cache, out, lambda kind, msg: events.put((kind, key, msg)))
        events.put(("result", key, res))
    except BaseException as e:  # report every failure to the parent; it re-raises
        events.put(("error", key, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def _steps(cfg: DemoConfig) -> int:
    return 1 + 2 * len(cfg.methods)


def _run_all(keys, cfg: DemoConfig, cache, out: Path, jobs: int, progress: bool) -> dict[str, dict]:
    bar = tqdm(total=_steps(cfg) * len(keys), desc="demo", disable=not progress, unit="step", dynamic_ncols=True)
    results: dict[str, dict] = {}

    def on_event(kind, key, msg):
        if kind == "step":
            bar.update()
            bar.set_postfix_str(f"{key} {msg}", refresh=False)
            if progress:
                tqdm.write(f"[{key}] {msg}")
        elif kind == "log":
            tqdm.write(f"[{key}] {msg}")

    try:
        if jobs == 1:
            for k in keys:
                results[k] = run_model(k, cfg, cache, out, lambda kind, msg, k=k: on_event(kind, k, msg))
            return results
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # fork after torch started threads can deadlock
        events = ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(k, cfg, cache, out, events), daemon=True) for k in keys]
        for p in procs:
            p.start()
        while len(results) < len(keys):
            try:
                kind, key, payload = events.get(timeout=5)
            except queue.Empty:
                dead = [p for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
                if dead:
                    raise RuntimeError(f"demo worker died (exit code {dead[0].exitcode})") from None
                continue
            if kind == "result":
                results[key] = payload
            elif kind == "error":
                raise RuntimeError(f"demo worker for {key} failed: {payload}")
            else:
                on_event(kind, key, payload)
        for p in procs:
            p.join()
        return {k: results[k] for k in keys}
    finally:
        bar.close()


# ----------------------------------------------------------------------------------------------------- latency
def _latencies(results: dict[str, dict], out: Path, repeats: int, rounds: int = 5) -> None:
    """CPU latency at batch 1 and 64 of every saved model, one thread, after the workers have finished.

    Models are timed round-robin and each keeps its best round's median, so a burst of load from elsewhere on the
    machine does not land on one model only.
    """
    from .io import load_pruned
    from .metrics import measure_latency

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = [row for res in results.values() for row in res["rows"]]
        models = [load_pruned(out / "models" / f"{key}-{row['method']}")
                  for key, res in results.items() for row in res["rows"]]
        for row in rows:
            row["latency_ms"] = row["latency64_ms"] = math.inf
        for _ in range(rounds):
            for row, model in zip(rows, models, strict=True):
                t1 = measure_latency(model, batch=1, warmup=3, repeats=repeats)
                t64 = measure_latency(model, batch=64, warmup=1, repeats=max(1, repeats // 5))
                row["latency_ms"] = min(row["latency_ms"], 1e3 * t1)
                row["latency64_ms"] = min(row["latency64_ms"], 1e3 * t64)
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------------- main
COLUMNS = [("model", "model", ""), ("method", "method", ""), ("params", "params", ",d"), ("mflops", "MFLOPs", ".2f"),
           ("flops_pct", "FLOPs %", ".1f"), ("latency_ms", "ms bs1", ".3f"), ("latency64_ms", "ms bs64", ".2f"),
           ("score_s", "score s", ".1f"), ("kl_pruned", "KL pruned", ".3f"), ("agree_pruned", "agree %", ".1f"),
           ("acc_pruned", "top-1 pruned", ".2f"), ("acc_finetuned", "top-1 fine-tuned", ".2f")]


def summary_rows(results: dict[str, dict]) -> list[dict]:
    """Flat table rows (one per model and method)."""
    rows = []
    for key, res in results.items():
        for r in res["rows"]:
            rows.append({**r, "model": key, "mflops": r["flops"] / 1e6, "flops_pct": 100 * r["flops_frac"]})
    return rows


def run_demo(out: str | os.PathLike = "demo_out", fast: bool = False, cache_dir: str | os.PathLike | None = None,
             jobs: int | None = None, methods: tuple[str, ...] | None = None, use_cache: bool = True,
             progress: bool = True, config: DemoConfig | None = None, screened: bool = False) -> dict:
    """Run the demo; print its table; write ``demo.json`` and PNGs to ``out``.

    Args:
        out: output directory (JSON, PNGs, every pruned model as safetensors + JSON under ``models/``).
        fast: tiny step counts (seconds; the test suite runs it).
        cache_dir: trained-model cache (default ``$VITPRUNE_FAST_CACHE`` or ``~/.cache/vitprune_fast/demo``).
        jobs: worker processes (default 2 on a machine with >= 2 cores, 1 with ``fast``).
        methods: the rows, in order (default :data:`METHODS`): registered method names, each optionally with
            ``-global``, ``-progressive`` or ``+rec`` (:mod:`vitprune_fast.variants`).
        use_cache: ``False`` retrains (and does not write the cache).
        progress: progress bar and per-step lines.
        config: override every setting (default ``FAST`` or ``FULL``).
        screened: UP-ViTs selects with the screened engine (``upvits_select``: the exact engine's plan for fewer
            exact evaluations); its report is in each upvits row of ``demo.json``.

    Returns:
        The record written to ``demo.json``.
    """
    from .plots import plot_accuracies

    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]  # other work on the machine inflates every timing below
    cfg = config or (FAST if fast else FULL)
    if methods:
        bad = []
        for m in methods:
            try:
                parse(m)
            except ConfigError:
                bad.append(m)
        if bad or len(set(methods)) != len(methods):
            raise ConfigError(f"--methods must be distinct names from {method_names()} (each may end in -global, "
                              f"-progressive, +rec), got {list(methods)}")
        cfg = replace(cfg, methods=tuple(methods))
    if screened:
        cfg = replace(cfg, upvits_engine="screened")
    from .data import require_sklearn

    require_sklearn()  # fail here with one clear line, not inside a worker process
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE) if use_cache else None
    cores = os.cpu_count() or 1
    jobs = jobs or (1 if fast or cores < 2 else 2)
    threads = torch.get_num_threads()
    if jobs == 1:
        torch.set_num_threads(1 if fast else max(1, min(cores, 2)))
    try:
        results = _run_all(list(MODELS), cfg, cache, out, min(jobs, len(MODELS)), progress)
        _latencies(results, out, cfg.latency_repeats)
    finally:
        torch.set_num_threads(threads)
    wall = time.perf_counter() - t0
    rows = summary_rows(results)
    acc_plot = plot_accuracies(
        {k: {r["method"]: {"dense": res["rows"][0]["acc_pruned"], "before": r["acc_pruned"],
                           "after": r["acc_finetuned"]} for r in res["rows"][1:]} for k, res in results.items()},
        out / "accuracy.png", f"digits, ~{100 * cfg.flops:.0f} % FLOPs: top-1 before / after fine-tuning")
    record = {"config": {**asdict(cfg), "fast": fast, "jobs": jobs}, "results": results, "table": rows,
              "wall_s": wall, "machine": {"cpu_count": cores, "platform": platform.platform(),
                                          "processor": platform.processor(), "torch": torch.__version__,
                                          "loadavg_1min_start": load_start, "loadavg_1min_end": os.getloadavg()[0]},
              "plots": [acc_plot.name] if acc_plot else []}
    (out / "demo.json").write_text(json.dumps(record, indent=1))
    print()
    print(table(rows, COLUMNS))
    for key, res in results.items():
        print(f"{key}: keep ratio {res['keep_ratio']:.3f} for residual/attn/mlp -> {100 * res['flops_reached']:.1f} % "
              f"FLOPs (dimap: its own module thresholds at that fraction); distillation alpha {res['alpha']}")
    print(f"proxy images (UP-ViTs): {cfg.proxy_images} class-balanced training images (seed {cfg.seed}), no "
          "augmentation (the digits tensors are not augmented)")
    print(f"latency: CPU, 1 thread, forward time at batch 1 and 64 (best of 5 round-robin medians); outputs in {out}/")
    print("one run: the ranking of the methods before fine-tuning changes with the training seed and the proxy draw; "
          "bench/fidelity.py measures it over seeds (README, 'Across seeds: the fidelity study')")
    cpu = ", ".join(f"{k} {res['cpu_s']:.0f} s" for k, res in results.items())
    print(f"total wall time {wall:.1f} s ({jobs} worker process{'es' if jobs > 1 else ''}, {cores} cores, "
          f"load average {load_start:.1f} at start; CPU time per model: {cpu})")
    return record
