"""``vitprune-fast`` command line: score, prune, finetune, eval, export, bench, demo.

Every bad argument (unknown model, missing data, ratio out of range, bad option values) ends with ONE line on
stderr and exit code 2, never a traceback. Methods come from the registry of :mod:`vitprune_fast.methods` (shared
with the demo and the benchmarks) and are driven through their interface only: ``--keep / --flops / --params /
--target`` and the plan rules make a :class:`~vitprune_fast.PlanSpec`, the method turns it into a Plan.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from .errors import VitPruneError
from .files import apply_umask
from .methods import Method, MethodData, MethodResult, get_method, method_names
from .score.objective import OBJECTIVES
from .table import table

FAMILIES = ("ViT/DeiT", "SigLIP", "AIMv2", "EVA/EVA-02", "BEiT", "CaiT", "Swin V1/V2", "PVTv2", "XCiT")
# UP-ViTs proxy images by default: where the held-out KL of the uniform plan stops falling on the digits DeiT and Swin
# (bench/proxy_size.py; bench/results/proxy_size-amd-epyc.json: mean KL 0.60 at 16 images, 0.47 at 512, 0.36 at 1024)
PROXY_KNEE = 1024


class UsageError(VitPruneError):
    """A bad command-line argument discovered after parsing (reported like an argparse error)."""


# ------------------------------------------------------------------------------------------------------ models
def load_model(spec: str, model_args: Mapping | None = None, pretrained: bool = False,
               defaults: Mapping | None = None, seed: int = 0) -> nn.Module:
    """A timm model by name (random init unless ``pretrained``), a directory written by ``save_pruned``, or a
    transformers model: ``hf:<directory>`` (a ``save_pretrained`` / hub snapshot directory, loaded with its weights)
    or ``hf:<class>`` (e.g. ``hf:ViTForImageClassification``, random init from a config of ``model_args``), or a
    torchvision one: ``tv:<builder>`` (``tv:vit_b_16``, ``tv:swin_t``) or ``tv:VisionTransformer`` /
    ``tv:SwinTransformer``.

    Args:
        spec: timm model name, directory, ``hf:<directory or class>`` or ``tv:<builder or class>``.
        model_args: extra keyword arguments for timm ``create_model`` (the config's for ``hf:<class>``, the
            builder's or constructor's for ``tv:``).
        pretrained: load timm's pretrained weights (must be available locally: no download is attempted
            beyond what timm/huggingface_hub do, and a failure is a clear error).
        defaults: kwargs used unless ``model_args`` sets them (e.g. ``num_classes`` from the data).
        seed: random-init seed, so that every command builds the same random model from the same name.

    Raises:
        UsageError: unknown model, bad kwargs, unavailable weights.
        CheckpointError: a directory that is not a valid saved model.
    """
    import timm

    from .io import load_pruned

    if spec.startswith(HF_PREFIX):
        return _load_transformers(spec.removeprefix(HF_PREFIX), model_args, pretrained, defaults, seed)
    if spec.startswith(TV_PREFIX):
        return _load_torchvision(spec.removeprefix(TV_PREFIX), model_args, pretrained, defaults, seed)
    if Path(spec).is_dir():
        if model_args or pretrained:
            raise UsageError(f"--model-args/--pretrained do not apply to a saved model directory ({spec})")
        return load_pruned(spec)
    if not timm.is_model(spec):
        raise UsageError(f"unknown model {spec!r}: not a timm model name nor a directory saved by save_pruned")
    kwargs = {**(defaults or {}), **(model_args or {})}
    torch.manual_seed(seed)
    try:
        return timm.create_model(spec, pretrained=pretrained, **kwargs).eval()
    except Exception as e:  # timm/huggingface_hub raise many types (TypeError for kwargs, OSError offline, ...)
        what = "pretrained weights are not available locally" if pretrained else "bad model arguments"
        raise UsageError(f"cannot create {spec!r} ({what}): {type(e).__name__}: {e}") from e


HF_PREFIX = "hf:"
TV_PREFIX = "tv:"


def _renamed(defaults: Mapping | None, names: Mapping[str, str]) -> dict:
    """The data's ``create_model`` defaults under another library's argument names."""
    return {names.get(k, k): v for k, v in (defaults or {}).items()}


def _load_transformers(target: str, model_args: Mapping | None, pretrained: bool, defaults: Mapping | None,
                       seed: int) -> nn.Module:
    """``hf:<directory>``: the class its config names (``architectures``), loaded with the directory's weights
    (local files only); ``hf:<class>``: that class from a config of ``model_args`` (the data's class count and image
    size unless they set them), random init seeded by ``seed``."""
    try:
        import transformers
    except ImportError as e:
        raise UsageError(f"hf:{target} needs transformers: pip install -e '.[hf]'") from e
    torch.manual_seed(seed)
    if Path(target).is_dir():
        if model_args or pretrained:
            raise UsageError(f"--model-args/--pretrained do not apply to hf:<directory> ({target}): its config and "
                             "weights are the directory's")
        try:
            config = transformers.AutoConfig.from_pretrained(target, local_files_only=True)
            name = (config.architectures or [None])[0]
            klass = getattr(transformers, name or "", None)
            if klass is None:
                raise UsageError(f"hf:{target}: its config.json names no transformers class ({name!r})")
            return klass.from_pretrained(target, local_files_only=True).eval()
        except UsageError:
            raise
        except Exception as e:  # transformers raises OSError / ValueError / its own types
            raise UsageError(f"cannot load hf:{target}: {type(e).__name__}: {e}") from e
    klass = getattr(transformers, target, None)
    if klass is None or not hasattr(klass, "config_class"):
        raise UsageError(f"hf:{target}: neither a directory nor a transformers model class")
    if pretrained:
        raise UsageError(f"--pretrained does not apply to hf:{target}: pass hf:<directory> of a local snapshot")
    kwargs = _renamed(defaults, {"num_classes": "num_labels", "img_size": "image_size"}) | dict(model_args or {})
    try:
        return klass(klass.config_class(**kwargs)).eval()
    except Exception as e:
        raise UsageError(f"cannot create hf:{target} with {kwargs}: {type(e).__name__}: {e}") from e


def _load_torchvision(name: str, model_args: Mapping | None, pretrained: bool, defaults: Mapping | None,
                      seed: int) -> nn.Module:
    """``tv:<builder>`` (``tv:vit_b_16``, ``tv:swin_t``: ``torchvision.models.get_model``, its weights with
    ``--pretrained``) or ``tv:VisionTransformer`` / ``tv:SwinTransformer`` (the class, from ``model_args``); the
    data's class count and image size unless ``model_args`` sets them (a Swin takes any size: it becomes the model's
    ``image_size`` attribute, the size the adapter scores at); random init seeded by ``seed``."""
    import torchvision

    kwargs = _renamed(defaults, {"img_size": "image_size"}) | dict(model_args or {})
    swin = name.lower().startswith("swin")
    size = kwargs.pop("image_size", None) if swin else None
    torch.manual_seed(seed)
    try:
        if name in ("VisionTransformer", "SwinTransformer"):
            if pretrained:
                raise UsageError("--pretrained needs a builder name (tv:vit_b_16), not the class")
            model = getattr(torchvision.models, name)(**kwargs).eval()
        elif name not in torchvision.models.list_models():
            raise UsageError(f"tv:{name}: not a torchvision model builder nor VisionTransformer / SwinTransformer")
        else:
            weights = "DEFAULT" if pretrained else None
            if pretrained:  # the weights define the classes and the size
                kwargs, size = dict(model_args or {}), None
            model = torchvision.models.get_model(name, weights=weights, **kwargs).eval()
        if size is not None:
            model.image_size = size
        return model
    except UsageError:
        raise
    except Exception as e:  # torchvision raises TypeError / ValueError for kwargs, URLError offline, ...
        what = "pretrained weights are not available locally" if pretrained else "bad model arguments"
        raise UsageError(f"cannot create tv:{name} ({what}): {type(e).__name__}: {e}") from e


def _data_defaults(data: str | None, model_spec: str) -> dict:
    """create_model defaults implied by the data: its class count, and 32-px inputs for ``digits``."""
    if data is None or Path(model_spec).is_dir() or Path(model_spec.removeprefix(HF_PREFIX)).is_dir():
        return {}
    from .data import DIGITS, DIGITS_CLASSES, DIGITS_SIZE

    if data == DIGITS:
        return {"num_classes": DIGITS_CLASSES, "img_size": DIGITS_SIZE}
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"data path {data!r} does not exist (use an ImageFolder directory or 'digits')")
    from torchvision.datasets.folder import find_classes

    folder = root / "train" if (root / "train").is_dir() else root
    try:
        return {"num_classes": len(find_classes(str(folder))[0])}
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{data}: no class folders found ({e})") from e


def _model_and_data(args, need_data: bool = True):
    """(model, DataBundle or None) from ``--model/--model-args/--pretrained/--data``, after seeding every generator
    (Python's ``random``, numpy, torch) from ``--seed``: the same command gives the same result."""
    from .data import load_data
    from .seeding import seed_everything

    data = getattr(args, "data", None)
    if need_data and data is None:
        raise UsageError("--data is required (an ImageFolder directory or 'digits')")
    seed_everything(getattr(args, "seed", 0))
    model = load_model(args.model, args.model_args, args.pretrained, _data_defaults(data, args.model),
                       getattr(args, "seed", 0))
    bundle = load_data(data, model) if data is not None else None
    return model, bundle


# ------------------------------------------------------------------------------------------------------ scores
def save_scores(scores: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str]) -> Path:
    """Scores as safetensors (one 1-D float64 tensor per group name)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.as_tensor(v).detach().double().cpu().contiguous() for k, v in scores.items()}, str(path),
              metadata={k: str(v) for k, v in metadata.items()})
    apply_umask(path)  # safetensors writes 0600
    return path


def load_scores(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Scores written by :func:`save_scores` (``vitprune-fast score``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"scores file {str(path)!r} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UsageError(f"{path} is not a safetensors scores file: {e}") from e


# ---------------------------------------------------------------------------------------------------- printing
def _model_row(label: str, model: nn.Module, acc: float | None = None) -> dict:
    from .metrics import count_flops, count_params

    return {"model": label, "params": count_params(model), "mflops": count_flops(model) / 1e6,
            "acc": None if acc is None else 100 * acc}


MODEL_COLUMNS = [("model", "model", ""), ("params", "params", ",d"), ("mflops", "MFLOPs", ".1f"),
                 ("acc", "top-1 %", ".2f")]


# ---------------------------------------------------------------------------------------------------- commands
def cmd_score(args) -> int:
    """Compute scores and write them as safetensors (+ a score-distribution PNG)."""
    from .arch import describe
    from .plots import plot_score_distributions

    method = _method(args)
    if not method.has_scores:
        raise UsageError(f"method {args.method!r} plans without a score table; use it with `vitprune-fast prune`")
    model, data = _model_and_data(args, need_data=bool(method.needs))
    t0 = time.perf_counter()
    method.check_data(mdata := _method_data(args, model, data, method))
    scores = method.scores(model, mdata)
    dt = time.perf_counter() - t0
    out = save_scores(scores, args.out, {"method": args.method, "model": args.model})
    png = plot_score_distributions(describe(model), {args.method: scores}, out.with_suffix(".png"),
                                   f"{args.method} scores, {args.model}")
    rows = [{"group": n, "size": len(s), "min": float(s.min()), "median": float(s.median()), "max": float(s.max())}
            for n, s in scores.items()]
    print(table(rows, [("group", "group", ""), ("size", "size", "d"), ("min", "min", ".4g"),
                       ("median", "median", ".4g"), ("max", "max", ".4g")]))
    print(f"{args.method} scores of {len(scores)} groups in {dt:.1f} s -> {out}" + (f", {png}" if png else ""))
    return 0


def _method_data(args, model: nn.Module, data, method: Method) -> MethodData:
    """What a method reads, from the command's data and settings: the training split's loader, ``--proxy`` training
    images through the evaluation transform (a draw seeded by ``--seed``; for methods that need images), the seed,
    and for a method that trains, the unpruned model as its teacher."""
    from .arch import adapter_for

    loader = images = None
    if getattr(method, "objective", "") is None and not adapter_for(model).classifier_weights():
        _log(f"{type(model).__name__} has no classifier: {method.name} scores the distortion of its output features "
             "(--objective features: squared error over each feature's variance on the proxy images)")
    if data is not None:
        loader = data.loaders(args.batch_size, seed=args.seed, num_workers=args.workers)[0]
        if "images" in method.needs:
            p = next(model.parameters())
            n = _n_proxy(args, data)
            _log(f"proxy: {n} training images (a --seed {args.seed} draw through the evaluation transform)"
                 + (f"; below the {PROXY_KNEE} the held-out KL measured best with (bench/proxy_size.py): scores "
                    "are noisier" if n < PROXY_KNEE else ""))
            images = data.proxy(n, args.seed)[0].to(p.device, p.dtype)
    return MethodData(loader=loader, images=images, proxy=args.proxy, chunk=args.batch_size, batches=args.batches,
                      seed=args.seed, progress="lines" if args.quiet else True, teacher=model,
                      steps=getattr(args, "steps", None) or 100, lr=getattr(args, "lr", 5e-4), log=_log)


def _n_proxy(args, data) -> int:
    """``--proxy``, or the whole training split when it is smaller."""
    return min(args.proxy, len(data.train_eval if data.train_eval is not None else data.train))


def _log(line: str) -> None:
    """A line for the person at the terminal, also under ``--quiet`` (stderr: stdout carries the results)."""
    print(line, file=sys.stderr, flush=True)


# CLI flags that set a method option: (flag, option, the option's value from the arguments or None, what it is)
_OPTION_FLAGS = (
    ("--screened", "engine", lambda a: "screened" if getattr(a, "screened", False) else None,
     "--screened is the UP-ViTs selection engine"),
    ("--exact", "engine", lambda a: "exact" if getattr(a, "exact", False) else None,
     "--exact is the UP-ViTs engine that scores every candidate"),
    ("--progressive", "steps", lambda a: getattr(a, "progressive", None),
     "--progressive re-scores the model between steps"),
    ("--objective", "objective", lambda a: a.objective, "--objective is what UP-ViTs scores measure"),
)
DEFAULT_ENGINE = "screened"  # the CLI's engine for a method with an `engine` option: the exact selection for less


def _method(args) -> Method:
    """The ``--method`` with the options its flags set; a flag for an option the method lacks is a usage error. A
    method with an ``engine`` option runs the screened engine unless ``--exact`` says otherwise."""
    if getattr(args, "screened", False) and getattr(args, "exact", False):
        raise UsageError("give --screened or --exact, not both")
    options = {}
    for _flag, option, value, what in _OPTION_FLAGS:
        v = value(args)
        if v is None:
            continue
        owners = [n for n in method_names() if option in get_method(n).option_names()]
        if option not in get_method(args.method).option_names() or getattr(args, "scores", None):
            raise UsageError(f"{what}: use it with --method {' / '.join(owners)}, without --scores")
        options[option] = v
    if "engine" in get_method(args.method).option_names():
        options.setdefault("engine", DEFAULT_ENGINE)
    return get_method(args.method, **options)


def _spec(args):
    """The PlanSpec of ``--keep / --flops / --params / --target`` and the plan rules."""
    from .plan import PlanSpec

    budgets = {"keep": args.keep, "flops": args.flops, "params": args.params, "latency": args.latency,
               "target": args.target}
    if sum(v is not None for v in budgets.values()) != 1:
        raise UsageError("give exactly one of --keep, --flops, --params, --latency, --target")
    if args.allocation == "global" and args.keep is not None or args.allocation == "global" and args.target:
        raise UsageError("--allocation global spends one budget: give --flops, --params or --latency")
    if args.latency is not None and args.allocation != "global":
        raise UsageError("--latency needs --allocation global (a latency table prices each block's widths)")
    if args.min_keep and args.allocation != "global":
        raise UsageError("--min-keep bounds a global allocation: add --allocation global")
    return PlanSpec(**budgets, heads=args.heads, attn_mode=args.attn_mode, round_to=args.round_to,
                    allocation=args.allocation, min_keep=args.min_keep)


def cmd_prune(args) -> int:
    """Prune by keep ratio, FLOPs or parameter fraction, or target timm shape; save with save_pruned."""
    from .arch import describe
    from .io import ARCH_FILE, WEIGHTS, save_pruned, stock_call
    from .plan import plan_from_scores
    from .plots import plot_kept_widths
    from .prune import prune_
    from .targets import resolve_spec

    spec = _spec(args)
    method = _method(args)
    model, data = _model_and_data(args, need_data=bool(method.needs) and not args.scores)
    space = describe(model)
    before = _model_row("unpruned", model)
    mdata = _method_data(args, model, data, method)
    if spec.budget == "latency":  # measured on this machine at --latency-batch (cached per device and batch)
        from .latency import LatencyModel

        mdata = replace(mdata, latency=LatencyModel.build(model, args.latency_batch, spec, _latency_cache()))
    if args.scores:
        scores = load_scores(args.scores)
        if spec.allocation == "global":
            from .allocate import allocate, allocation_summary
            from .methods.base import cost_models

            plan, rep = allocate(model, scores, spec, **cost_models(model, mdata, spec))
            result = MethodResult(plan, report={"allocation": rep}, notes=[allocation_summary(rep)])
        else:
            resolved, notes = resolve_spec(model, spec)
            result = MethodResult(plan_from_scores(space, scores, resolved), notes=notes)
    else:
        result = method.plan(model, mdata, spec)
        if "engine" in method.option_names():
            result.notes.append(f"{method.name} engine: {method.engine}"
                                + (" (--exact scores every candidate)" if method.engine != "exact" else ""))
    plan = result.plan
    teacher = copy.deepcopy(model) if args.reconstruct else None
    model = result.model if result.model is not None else prune_(model, plan)  # a training method pruned its own
    if args.reconstruct:
        from .reconstruct import reconstruct_, reconstruct_summary

        if data is None:
            raise UsageError("--reconstruct fits on training images: give --data")
        p = next(teacher.parameters())
        if args.calib is None:  # the proxy images (drawn here for a method that needs none)
            calib = data.proxy(_n_proxy(args, data), args.seed)[0]
        else:  # others: a draw that leaves the proxy images out
            calib = data.proxy(args.calib, args.seed, exclude=data.proxy(_n_proxy(args, data), args.seed)[2])[0]
        calib = calib.to(p.device, p.dtype)
        rec = reconstruct_(model, teacher, calib, plan, batch_size=args.batch_size, progress=not args.quiet)
        result.report["reconstruct"] = {k: v for k, v in rec.items()}
        result.notes.append(reconstruct_summary(rec) + (" (on the proxy images)" if args.calib is None else
                                                        f" (on {len(calib)} other training images)"))
    after = _model_row("pruned", model)
    out = save_pruned(model, args.out)
    (out / "plan.json").write_text(json.dumps(plan.to_dict()))
    for name, rep in result.report.items():
        (out / f"{name}.json").write_text(json.dumps(rep, indent=1))
    stock = json.loads((out / ARCH_FILE).read_text())["timm_stock"]
    kept = plan.kept_sizes(space)
    png = plot_kept_widths(space, {"kept": kept}, out / "widths.png", f"kept widths, {args.model}")
    for n in result.notes:
        print(f"note: {n}")
    if result.report:
        print("reports: " + ", ".join(str(out / f"{name}.json") for name in result.report))
    print(table([before, after], MODEL_COLUMNS[:3]))
    kinds: dict[str, list[int]] = {}  # kind -> [channels before, channels kept], summed over groups
    for n, g in space.groups.items():
        tot = kinds.setdefault(g.kind, [0, 0])
        tot[0] += g.size
        tot[1] += kept[n]
    print("kept channels: " + ", ".join(f"{k} {b}/{a}" for k, (a, b) in kinds.items()))
    pct = 100 * after["mflops"] / before["mflops"]
    print(f"FLOPs {pct:.1f} % of dense -> {out}" + (f" (plot {png})" if png else ""))
    if mdata.latency is not None:
        from .latency import forward_seconds

        measured = forward_seconds(model, args.latency_batch, repeats=20)  # the tables' statistic
        predicted = mdata.latency.predict_plan(plan)
        share = 100 * predicted / mdata.latency.dense
        print(f"latency (batch {args.latency_batch}, {mdata.latency.table['device']}): predicted "
              f"{1e3 * predicted:.3f} ms, measured {1e3 * measured:.3f} ms ({share:.1f} % of the unpruned model's "
              "prediction)")
    print(f"stock timm: {stock_call(stock, out / WEIGHTS)}")
    return 0


def _latency_cache() -> Path:
    """Where latency tables are cached: ``$VITPRUNE_FAST_CACHE/latency`` or ``~/.cache/vitprune_fast/latency``."""
    root = os.environ.get("VITPRUNE_FAST_CACHE")
    return Path(root) / "latency" if root else Path.home() / ".cache" / "vitprune_fast" / "latency"


def cmd_finetune(args) -> int:
    """Distillation fine-tune (or DAP) of a pruned model against the unpruned teacher; save the result.

    Under ``torchrun`` every process trains a DDP replica on its shard of the data (``--batch-size`` per process);
    rank 0 prints and writes.
    """
    from . import distributed
    from .finetune import evaluate, train
    from .io import save_pruned

    device = distributed.init_from_env()
    model, data = _model_and_data(args)
    model.to(device)
    train_loader, test_loader = data.loaders(args.batch_size, seed=args.seed, num_workers=args.workers)
    steps = args.steps or max(1, math.ceil(args.epochs * len(train_loader) / args.accum_steps))
    teacher = None
    if args.teacher is not None:
        if not Path(args.teacher).is_dir() and not args.pretrained_teacher and not args.random_teacher:
            raise UsageError(f"--teacher {args.teacher} is a timm name without weights: distilling from a random-init "
                             "model teaches nothing. Pass --pretrained-teacher (or a saved model directory); "
                             "--random-teacher allows it on purpose (tests, demos)")
        teacher = load_model(args.teacher, args.teacher_args, args.pretrained_teacher,
                             _data_defaults(args.data, args.teacher), args.seed).to(device)
    elif args.alpha != 0 and args.method == "distill":
        raise UsageError("--teacher is required for distillation (or pass --alpha 0 for plain cross-entropy)")
    if args.method == "dap" and args.accum_steps != 1:
        raise UsageError("--accum-steps applies to --method distill (DAP takes one batch per step)")
    amp_name = args.amp or ("bf16" if device.type == "cuda" else "none")
    amp = {"bf16": torch.bfloat16, "none": None}[amp_name]
    progress = not args.quiet and distributed.is_main()
    before = _model_row("before", model, evaluate(model, test_loader, progress=progress))
    t0 = time.perf_counter()
    if args.method == "dap":
        _run_dap(model, teacher, train_loader, steps, args, amp)
    else:
        train(model, train_loader, steps, lr=args.lr, teacher=teacher, alpha=args.alpha,
              temperature=args.temperature, progress=progress, desc="finetune", amp_dtype=amp,
              accum_steps=args.accum_steps, checkpoint=args.checkpoint,
              checkpoint_every=args.checkpoint_every if args.checkpoint else 0)
    dt = time.perf_counter() - t0
    after = _model_row("after", model, evaluate(model, test_loader, progress=progress))
    if distributed.is_main():
        out = save_pruned(model.cpu(), args.out)
        print(table([before, after], MODEL_COLUMNS))
        kd = f"alpha {args.alpha}" if teacher is not None else "no teacher"
        ranks = distributed.dist_info()[1]
        print(f"{args.method}: {steps} steps in {dt:.1f} s ({kd}, lr {args.lr}, {ranks} process"
              f"{'es' if ranks > 1 else ''}, amp {amp_name}) -> {out}")
    distributed.barrier()
    return 0


def _run_dap(model, teacher, loader, steps, args, amp_dtype) -> None:
    """Delegate to :func:`vitprune_fast.dap.finetune_dap` (prunes ``model`` in place while fine-tuning)."""
    from .dap import finetune_dap
    from .distributed import is_main

    try:
        _, _, hist = finetune_dap(model, loader, target=args.dap_target, steps=steps, lr=args.lr, teacher=teacher,
                                  distill_alpha=args.alpha, amp_dtype=amp_dtype, progress=not args.quiet,
                                  checkpoint=args.checkpoint,
                                  checkpoint_every=args.checkpoint_every if args.checkpoint else 0)
    except ValueError as e:  # e.g. too few steps for the DAP schedule
        raise UsageError(f"DAP: {e}") from e
    if is_main():
        print(f"DAP: params {hist['params_before']:,} -> {hist['params_after']:,} "
              f"(target {hist['target_params']:,})")


def cmd_eval(args) -> int:
    """Top-1 accuracy on the test split (ImageFolder: val/ or test/ when present); sharded under torchrun."""
    from . import distributed
    from .finetune import evaluate

    device = distributed.init_from_env()
    model, data = _model_and_data(args)
    model.to(device)
    train_loader, test_loader = data.loaders(args.batch_size, seed=args.seed, num_workers=args.workers)
    if args.split == "train":  # the whole train split, unshuffled (evaluate shards it by batch)
        train_loader = torch.utils.data.DataLoader(data.train, batch_size=args.batch_size)
    loader = train_loader if args.split == "train" else test_loader
    t0 = time.perf_counter()
    acc = evaluate(model, loader, progress=not args.quiet and distributed.is_main())
    dt = time.perf_counter() - t0
    if distributed.is_main():
        print(table([_model_row(args.model, model.cpu(), acc)], MODEL_COLUMNS))
        print(f"top-1 {100 * acc:.2f} % on {len(loader.dataset)} {args.split} images of {data.name} in {dt:.1f} s")
    return 0


def cmd_export(args) -> int:
    """ONNX export (torch.onnx.export, dynamo=True), checked against the torch model with onnxruntime."""
    from .metrics import input_size

    try:
        import onnxruntime as ort
    except ImportError as e:
        raise UsageError("export needs onnx, onnxscript and onnxruntime (pip install them)") from e
    model = load_model(args.model, args.model_args, args.pretrained).eval()
    x = torch.randn(args.batch, *input_size(model), generator=torch.Generator().manual_seed(0))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    torch.onnx.export(model, (x,), str(out), dynamo=True, external_data=False)
    dt = time.perf_counter() - t0
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        want = model(x)
    err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
    if not err < args.tol:
        raise VitPruneError(f"onnxruntime output differs from torch: max rel error {err:.2e} >= {args.tol}")
    print(f"exported {args.model} to {out} ({out.stat().st_size / 1e6:.1f} MB) in {dt:.1f} s; onnxruntime "
          f"matches torch (max rel error {err:.1e})")
    return 0


def _bench_scripts(repo: str | os.PathLike) -> tuple[Path, list[str]]:
    """``(bench dir, benchmark names)``: the scripts in ``repo/bench`` other than helpers (``common``, ``report``,
    ``_*``) and the GPU check. The benchmarks come with the source repository, not with the installed package."""
    bench = Path(repo) / "bench"
    if not (bench / "__main__.py").is_file():
        raise UsageError(f"no benchmark runner at {bench}: the benchmarks come with the source repository (bench/ "
                         "of a vitprune_fast checkout); run this from the checkout's root or pass --repo DIR")
    return bench, [p.stem for p in sorted(bench.glob("*.py")) if not p.stem.startswith("_")
                   and p.stem not in ("common", "report", "gpu_check")]


def cmd_bench(args) -> int:
    """Thin dispatcher to ``python -m bench [--quick] [--only ...]`` in a source checkout (the runner skips what
    needs a GPU)."""
    bench, names = _bench_scripts(args.repo)
    if args.list:
        print("\n".join(names))
        return 0
    unknown = [n for n in args.names if n not in names]
    if unknown:
        raise UsageError(f"unknown benchmark(s) {unknown}; available: {', '.join(names)}")
    cmd = [sys.executable, "-m", "bench"] + ([] if args.full else ["--quick"])
    if args.names:
        cmd += ["--only", ",".join(args.names)]
    print(f"$ {' '.join(cmd)}", flush=True)
    return subprocess.run(cmd, cwd=bench.parent).returncode


def cmd_demo(args) -> int:
    """Train (or load cached) small DeiT/Swin on digits, prune to ~50 % FLOPs by every method, fine-tune, compare."""
    if args.shape:
        return _demo_shape(args)
    from .demo import run_demo

    methods = tuple(args.methods.split(",")) if args.methods else None
    run_demo(out=args.out, fast=args.fast, cache_dir=args.cache, jobs=args.jobs, methods=methods,
             use_cache=not args.no_cache, progress=not args.quiet, screened=args.screened)
    return 0


def _demo_shape(args: argparse.Namespace) -> int:
    """Prune a random-init DeiT-S to the DeiT-Ti shape and compare params / FLOPs / CPU latency (seconds)."""
    import timm

    from . import describe, make_plan, prune_
    from .metrics import count_flops, count_params, measure_latency
    from .score import magnitude_scores

    torch.manual_seed(0)
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


# ------------------------------------------------------------------------------------------------------ parser
class _Parser(argparse.ArgumentParser):
    """argparse, but errors are ONE line on stderr (no usage block) and exit code 2, and ``--help`` shows every
    default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {_one_line(message)}\n")


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def _ratio(s: str) -> float:
    try:
        r = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not 0 < r <= 1 or math.isnan(r):
        raise argparse.ArgumentTypeError(f"ratio must be in (0, 1], got {s}")
    return r


def _fraction(s: str) -> float:
    """A fraction in [0, 1] (0 allowed: ``--min-keep``)."""
    try:
        r = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not 0 <= r <= 1 or math.isnan(r):
        raise argparse.ArgumentTypeError(f"fraction must be in [0, 1], got {s}")
    return r


def _keep(s: str) -> float | dict[str, float]:
    """``0.5`` or ``residual=0.75,attn=0.5,mlp=0.5`` (kinds and/or group names)."""
    if "=" not in s:
        return _ratio(s)
    out = {}
    for part in s.split(","):
        key, sep, val = part.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"expected KIND=RATIO pairs, got {part!r}")
        out[key.strip()] = _ratio(val)
    return out


def _positive_int(s: str) -> int:
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _json_dict(s: str) -> dict:
    try:
        d = json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg})") from None
    if not isinstance(d, dict):
        raise argparse.ArgumentTypeError("expected a JSON object of create_model kwargs")
    return d


def _add_model(p: argparse.ArgumentParser, data: bool = True) -> None:
    p.add_argument("--model", required=True, help="timm model name, a directory written by save_pruned / prune, "
                   "hf:<save_pretrained directory> / hf:<transformers class> (config from --model-args), or "
                   "tv:<torchvision builder> / tv:VisionTransformer / tv:SwinTransformer")
    p.add_argument("--model-args", type=_json_dict, default=None, metavar="JSON",
                   help='timm create_model kwargs, e.g. \'{"depth": 4, "embed_dim": 96}\'')
    p.add_argument("--pretrained", action="store_true", help="timm pretrained weights (must be available locally)")
    if data:
        p.add_argument("--data", default=None, help="ImageFolder dir (train/ + val/ used when present) or 'digits'")
        p.add_argument("--batch-size", type=_positive_int, default=64, help="images per batch (and per UP-ViTs chunk)")
        p.add_argument("--seed", type=int, default=0, help="seeds every random draw: Python's random, numpy, torch, "
                                                           "the data order and the loader workers")
        p.add_argument("--workers", type=int, default=0, metavar="N", help="data-loading worker processes")
    p.add_argument("--quiet", action="store_true", help="no progress bars (a long engine still prints one line per "
                                                        "stage)")


def _add_scoring(p: argparse.ArgumentParser, default: str | None, scores_only: bool = False) -> None:
    names = [n for n in method_names() if get_method(n).has_scores or not scores_only]
    p.add_argument("--method", choices=names, default=default, required=default is None,
                   help=" | ".join(f"{n}: {get_method(n).summary}" + (" (needs --data)" if get_method(n).needs else "")
                                   for n in names))
    p.add_argument("--proxy", type=_positive_int, default=PROXY_KNEE,
                   help="UP-ViTs proxy images: a --seed draw from the train split, through the evaluation transform "
                        "(all of it when smaller); the default is where the held-out KL stopped falling "
                        "(bench/proxy_size.py)")
    p.add_argument("--batches", type=_positive_int, default=4, help="Taylor: training batches to accumulate")
    p.add_argument("--objective", choices=OBJECTIVES, default=None,
                   help="--method upvits: what a score measures: kl (the logits' KL, the default for a classifier) or "
                        "features (the output features' squared error over each feature's proxy variance, the default "
                        "for a model without a classifier, e.g. num_classes=0) or tokens (the same over the final "
                        "tokens: forward_features, last_hidden_state; exact engines only)")


def build_parser() -> argparse.ArgumentParser:
    from .finetune import DEFAULT_ALPHA

    ap = _Parser(prog="vitprune-fast", description="Structured pruning for timm vision transformers "
                                                   f"({', '.join(FAMILIES)}, ...), and transformers ViT / "
                                                   "DeiT / DINOv2 (hf:) and torchvision ViT (tv:) models.")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("score", help="channel scores of a model, written as safetensors")
    _add_model(p)
    _add_scoring(p, None, scores_only=True)
    p.add_argument("--out", required=True, help="scores file (.safetensors); a .png histogram is written beside it")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("prune", help="prune by keep ratio, FLOPs or parameter fraction, or target timm shape; save "
                                     "the model")
    _add_model(p)
    _add_scoring(p, "magnitude")
    p.add_argument("--scores", default=None, help="scores file from `vitprune-fast score` (instead of --method)")
    p.add_argument("--keep", type=_keep, default=None, help="keep ratio: 0.5, or residual=0.75,attn=0.5,mlp=0.5")
    p.add_argument("--flops", type=_ratio, default=None, help="target fraction of the dense FLOPs, e.g. 0.5")
    p.add_argument("--params", type=_ratio, default=None, help="target fraction of the parameters, e.g. 0.5")
    p.add_argument("--latency", type=_ratio, default=None,
                   help="target fraction of the latency on this machine (with --allocation global; measured at "
                        "--latency-batch, cached per device, model and batch)")
    p.add_argument("--latency-batch", type=_positive_int, default=1, metavar="B", help="batch size latency is for")
    p.add_argument("--allocation", choices=("uniform", "global"), default="uniform",
                   help="uniform: one keep ratio for every block (UP-ViTs' rule); global: every group's width chosen "
                        "to keep the most score under the budget (needs scores comparable across groups)")
    p.add_argument("--min-keep", type=_fraction, default=0.0, metavar="F",
                   help="with --allocation global: the smallest fraction of any group kept (Torch-Pruning's "
                        "max_pruning_ratio is 1 - F); per-group normalised scores (magnitude, taylor, random) can "
                        "otherwise cut a costly group to one unit")
    p.add_argument("--target", default=None, help="timm model whose widths to reach, e.g. deit_tiny_patch16_224")
    p.add_argument("--heads", type=_positive_int, default=None, help="UP-ViTs head merge: heads per attention")
    p.add_argument("--attn-mode", choices=("dims", "heads"), default="dims",
                   help="without --heads: keep every head (dims) or remove whole heads (heads)")
    p.add_argument("--round-to", type=_positive_int, default=1, metavar="M",
                   help="round narrowed widths (residual, MLP, head_dim) to multiples of M (8 suits GPU kernels)")
    p.add_argument("--screened", action="store_true",
                   help="--method upvits (the default engine): the exact engine's selection, scoring exactly only the "
                        "candidates near each cut (a second-order screen ranks the rest); report in OUT/screened.json")
    p.add_argument("--exact", action="store_true", help="--method upvits: the exact engine, every candidate scored")
    p.add_argument("--progressive", type=_positive_int, default=None, metavar="T",
                   help="--method upvits: reach the widths in T steps, re-scoring the partly pruned model between "
                        "steps (with --screened: each step by the screened engine); report in OUT/progressive.json")
    p.add_argument("--reconstruct", action="store_true",
                   help="after pruning, refit every Linear that lost inputs by ridge least squares to the unpruned "
                        "model's outputs (report in OUT/reconstruct.json)")
    p.add_argument("--calib", type=_positive_int, default=None, metavar="N",
                   help="--reconstruct on N training images other than the proxy draw (default: the proxy images)")
    p.add_argument("--steps", type=_positive_int, default=100,
                   help="methods that train while they plan (dap): training steps")
    p.add_argument("--lr", type=float, default=5e-4, help="methods that train while they plan (dap): learning rate")
    p.add_argument("--out", required=True, help="output directory (model.safetensors + architecture.json)")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("finetune", help=f"distill CE + alpha*KL (alpha {DEFAULT_ALPHA}) from the unpruned teacher")
    _add_model(p)
    p.add_argument("--teacher", default=None, help="unpruned teacher: timm name or saved directory")
    p.add_argument("--teacher-args", type=_json_dict, default=None, metavar="JSON", help="teacher create_model kwargs")
    p.add_argument("--pretrained-teacher", action="store_true", help="timm pretrained weights for a timm-name teacher")
    p.add_argument("--method", choices=("distill", "dap"), default="distill",
                   help="distill: the distillation fine-tune; dap: prune while fine-tuning (vitprune_fast.dap)")
    p.add_argument("--steps", type=_positive_int, default=None, help="optimizer steps (default: --epochs)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the training split (without --steps)")
    p.add_argument("--lr", type=float, default=5e-4, help="peak AdamW learning rate")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="KL weight (batch-mean KL, temperature 1)")
    p.add_argument("--temperature", type=float, default=1.0, help="distillation temperature")
    p.add_argument("--dap-target", type=_ratio, default=0.5, help="DAP: fraction of the parameters to remove")
    p.add_argument("--random-teacher", action="store_true",
                   help="allow a timm-name teacher without --pretrained-teacher (random init: tests and demos only)")
    p.add_argument("--amp", choices=("bf16", "none"), default=None,
                   help="autocast dtype (default: bf16 on CUDA, none on CPU)")
    p.add_argument("--accum-steps", type=_positive_int, default=1, metavar="K",
                   help="batches per optimizer step (gradient accumulation; --method distill)")
    p.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="resume file (written every --checkpoint-every steps; resumed from when it exists)")
    p.add_argument("--checkpoint-every", type=_positive_int, default=100, metavar="N", help="steps between writes")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("eval", help="top-1 accuracy")
    _add_model(p)
    p.add_argument("--split", choices=("test", "train"), default="test", help="which split to evaluate")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="ONNX export (dynamo) checked with onnxruntime")
    _add_model(p, data=False)
    p.add_argument("--out", required=True, help="output .onnx file")
    p.add_argument("--batch", type=_positive_int, default=1, help="batch size of the exported graph's input")
    p.add_argument("--tol", type=float, default=1e-4, help="max relative error vs torch")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="run the benchmarks in bench/ (python -m bench --quick); results in "
                                     "bench/results/")
    p.add_argument("names", nargs="*", help="benchmarks to run (default: all; each skips what this machine lacks)")
    p.add_argument("--full", action="store_true", help="full sizes instead of --quick")
    p.add_argument("--list", action="store_true", help="list the benchmarks")
    p.add_argument("--repo", default=".", help="the source checkout whose bench/ to run (the benchmarks come with "
                                               "the repository, not with the installed package)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="digits: train small DeiT + Swin, prune to ~50%% FLOPs by every method, compare")
    p.add_argument("--fast", action="store_true", help="few steps and images (seconds; for tests)")
    p.add_argument("--out", default="demo_out", help="output directory (JSON, PNGs, pruned models), created under the "
                                                     "current directory unless absolute")
    p.add_argument("--cache", default=None, help="trained-model cache (default $VITPRUNE_FAST_CACHE or "
                                                 "~/.cache/vitprune_fast/demo)")
    p.add_argument("--no-cache", action="store_true", help="retrain the unpruned models")
    p.add_argument("--jobs", type=_positive_int, default=None, help="worker processes (default: 2 if >= 2 cores)")
    p.add_argument("--methods", default=None,
                   help=f"comma list of rows: registered methods ({','.join(method_names())}), each may end in "
                        "-global (global allocation), -progressive (re-scoring in steps), +rec (least-squares "
                        "reconstruction); default upvits,upvits-global,upvits+rec,dimap,magnitude,magnitude+rec,random")
    p.add_argument("--screened", action="store_true", help="UP-ViTs with the screened selection engine")
    p.add_argument("--shape", action="store_true", help="instead: random-init DeiT-S pruned to the DeiT-Ti shape; "
                                                        "params / FLOPs / latency only")
    p.add_argument("--repeats", type=_positive_int, default=10, help="--shape: timed forward passes per model")
    p.add_argument("--quiet", action="store_true", help="no progress bars (a long engine still prints one line per "
                                                        "stage)")
    p.set_defaults(func=cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point; bad input ends with one stderr line and exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (VitPruneError, FileNotFoundError, NotADirectoryError, ImportError) as e:
        parser.error(_one_line(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
