"""Retraining-free repair after pruning: a ridge least-squares refit of every Linear that lost inputs.

:func:`reconstruct_` walks the pruned model in forward order (the stages' entries, the blocks, the head, as its
adapter gives them). For every Linear whose input width shrank, it accumulates, over the calibration images,
``X^T X`` and ``X^T Y`` in float64 -- ``X`` the Linear's inputs in the *pruned* model (so every refit sees the errors
of the layers before it, already refit), ``Y`` the teacher's output of the same Linear on the output features the
pruned one keeps -- and replaces its weight and bias by the ridge solution. One layer's statistics are held at a
time (memory ~ d_in x (d_in + d_out)); the two models' inputs to the region being refit are cached per image chunk.

What is refit (every family; a Linear that only lost outputs keeps its weights):

- ``attn.proj`` after attention dims go, ``fc2`` after MLP units go (a parallel block's output projections too);
- every Linear reading the residual after residual channels go, on the masked norm's output: the fused ``qkv`` (or
  ``q`` / ``kv``, ``in_proj``, a SwiGLU's two ``fc1``), ``fc1``, Swin's PatchMerging ``reduction``, an attention
  pool's ``q`` / ``kv`` / ``proj`` / MLP, CaiT's and XCiT's class attention, and the classifier ``head``. For the q
  rows of an attention whose head size changed, the target is the teacher's q times the scale fold ``prune_``
  applied (``sqrt(new / old head_dim)``), so the attention logits are the teacher's.

Left alone: convolutions (the patch embedding, PVT's spatial reduction, XCiT's LPI: they are not Linears), per-head
tables (relative-position biases, logit scales: no least-squares target), norms, and the biases that a family
assembles outside the Linear (EVA / BEiT / Swin V2 q / v biases concatenated with a zero k bias: there only the weight
is refit, on the target minus that bias).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from tqdm.auto import tqdm

from .arch import adapter_for
from .distributed import dist_info
from .errors import ConfigError, InputError, PlanError
from .files import apply_umask
from .inputs import check_images
from .plan import Plan
from .prune import kept_entries, resolve_plan

DAMPING = 1e-4  # ridge damping relative to the mean diagonal of X^T X (GPTQ-style)


# ------------------------------------------------------------------------------------------------------ solving
def ridge_fit(gram: torch.Tensor, cross: torch.Tensor, damping: float = DAMPING,
              intercept: bool = True) -> tuple[torch.Tensor, dict]:
    """The ridge solution of ``[X 1] B = Y`` from ``gram = [X 1]^T [X 1]`` and ``cross = [X 1]^T Y`` (float64).

    The damping ``lambda = damping * mean(diag(X^T X))`` is added to the inputs' diagonal, not to the intercept's (the
    last row / column; with ``intercept=False`` there is none: ``gram = X^T X``). A Cholesky solve; if it fails (a
    singular system), the damping grows tenfold up to six times, then ``torch.linalg.lstsq`` (a pseudo-inverse
    solution) takes over. As ``damping -> 0`` the solution is the least-squares one.

    Returns:
        ``(B [d_in (+ 1), d_out], info)``: ``info`` holds the damping used and the solver (``cholesky`` / ``lstsq``).
    """
    d = gram.shape[0] - int(intercept)
    scale = float(gram.diagonal()[:d].mean()) if d else 0.0
    lam = damping * scale
    for _ in range(7):
        a = gram.clone()
        a.diagonal()[:d] += lam
        chol, bad = torch.linalg.cholesky_ex(a)
        if not bad:
            return torch.cholesky_solve(cross, chol), {"damping": lam, "relative_damping": damping,
                                                       "solver": "cholesky"}
        lam = max(lam * 10, 1e-12 * max(scale, 1.0))
        damping = lam / max(scale, 1e-300)
    sol = torch.linalg.lstsq(gram, cross, driver="gelsd").solution
    return sol, {"damping": lam, "relative_damping": damping, "solver": "lstsq"}


# ------------------------------------------------------------------------------------------------------ capture
class _Stop(Exception):
    """Raised from a tap once it has what it needs: the rest of the region need not run."""


class _LinearTap(TorchFunctionMode):
    """Call ``fn(input, bias)`` for the ``F.linear`` call with this weight (a module call or a functional one), then
    stop the forward."""

    def __init__(self, weight: torch.Tensor, fn: Callable):
        super().__init__()
        self.weight, self.fn = weight, fn

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and (args[1] if len(args) > 1 else kwargs.get("weight")) is self.weight:
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            self.fn(args[0], bias)
            raise _Stop
        return func(*args, **kwargs)


def _tap(region: Callable, x, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(input [rows, d_in], bias)`` of the linear with ``weight`` when ``region(x)`` runs (None: not called)."""
    got = []
    with contextlib.suppress(_Stop), _LinearTap(weight, lambda inp, b: got.append((inp, b))):
        region(x)
    if not got:
        return None
    inp, b = got[0]
    return inp.reshape(-1, inp.shape[-1]), b


# ------------------------------------------------------------------------------------------------------ regions
@dataclass
class _Region:
    """A piece of the forward run as one call: a stage entry, a block, or the head."""

    name: str
    prefix: str  # module path the Linears inside it start with ("" for the head: everything not in a block)
    pruned: Callable
    teacher: Callable


def _regions(model: nn.Module, pt, tt) -> list[_Region]:
    """The regions of the pruned and the teacher trunks (the trunks that embedded the images: PVTv2's blocks read
    the token grid its embedding found)."""
    out = []
    for i, name in enumerate(pt.names):
        if i in pt.stage_start:  # a module of the model (Swin's PatchMerging), or the adapter's own step (PVTv2's)
            runs = getattr(pt.stage_start[i], "wraps", pt.stage_start[i])  # a wrapper calling a module of the model
            entry = next((p for p, m in model.named_modules() if m is runs), None)
            out.append(_Region(entry or f"stage entry before {name}", entry or "\0", pt.stage_start[i],
                               tt.stage_start[i]))
        out.append(_Region(name, name, (lambda x, i=i: pt.block(i, x)), (lambda x, i=i: tt.block(i, x))))
    out.append(_Region("head", "", pt.head, tt.head))
    return out


def _linears(model: nn.Module, teacher: nn.Module, region: _Region, taken: set[str]) -> list[str]:
    """The Linears of ``region`` whose input width shrank, in module order (every Linear of the head that no block
    or entry owns)."""
    t_mods = dict(teacher.named_modules())
    out = []
    for path, m in model.named_modules():
        if not isinstance(m, nn.Linear) or path in taken:
            continue
        if region.prefix and not (path == region.prefix or path.startswith(region.prefix + ".")):
            continue
        t = t_mods.get(path)
        if isinstance(t, nn.Linear) and m.in_features < t.in_features:
            out.append(path)
    return out


# ------------------------------------------------------------------------------------------------------ public
def reconstruct_(model: nn.Module, teacher: nn.Module, images, plan: Plan, *, damping: float = DAMPING,
                 batch_size: int = 64, optimizer: torch.optim.Optimizer | None = None,
                 checkpoint: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """Refit, in place, every Linear of the pruned ``model`` that lost inputs, to reproduce ``teacher`` (see the
    module docstring for what is refit and why).

    Args:
        model: the pruned model (``prune_(copy_of_teacher, plan)``); its Parameters keep their identity.
        teacher: the unpruned model it was pruned from (not modified).
        images: calibration images: a float tensor ``[N, C, H, W]`` (split into ``batch_size`` chunks) or an
            iterable of batches (tensors or ``(images, labels)``), on the models' device, in the teacher's dtype.
            Under torch.distributed give every rank its own share: the statistics are all-reduced, so every rank gets
            the same weights.
        plan: the Plan ``model`` was pruned with (it maps the pruned features to the teacher's).
        damping: ridge damping relative to the mean diagonal of ``X^T X`` (:func:`ridge_fit`).
        batch_size: images per chunk when ``images`` is a tensor.
        optimizer: an optimizer over ``model``'s parameters: the state of every refit tensor is dropped (its moments
            described the old weights).
        checkpoint: directory; every refit layer is saved there when it is done, and a rerun with the same plan
            loads the layers already done instead of fitting them again.
        progress: a tqdm bar over the layers.

    Returns:
        A JSON-able report: per layer the relative output error ``||X W^T + b - Y|| / ||Y||`` before and after, the
        damping and solver, the rows it was fit on and the seconds; in total the layers, the seconds, the images.

    Raises:
        InputError: no images, or images the teacher cannot take.
        PlanError: a teacher of another model, or a model that is not ``teacher`` pruned by ``plan``.
    """
    t_start = time.perf_counter()
    t_space, space = adapter_for(teacher).describe(), adapter_for(model).describe()
    changes = resolve_plan(t_space, plan)  # the plan was made for the teacher
    kept = plan.kept_sizes(t_space)
    if set(space.groups) != set(t_space.groups) or any(space.groups[n].size != kept[n] for n in kept):
        raise PlanError("model is not the teacher pruned by this plan (group sizes differ: prune a copy of the teacher "
                        "with the plan first)")
    chunks = _chunks(images, batch_size, teacher)
    p = next(model.parameters())
    heads_fold = {ch.group.name: math.sqrt((ch.keep.numel() // ch.heads) / ch.group.head_dim) for ch in changes
                  if ch.group.kind == "attn" and ch.keep.numel() // ch.heads != ch.group.head_dim}
    store = Path(checkpoint) if checkpoint is not None else None
    done = _load_done(store, plan) if store is not None else {}
    was = model.training, teacher.training
    model.eval()
    teacher.eval()
    layers: list[dict] = []
    try:
        # scoring_context: torchvision's attention then calls its out_proj as a module, which the refit captures
        with torch.no_grad(), adapter_for(model).scoring_context(), adapter_for(teacher).scoring_context():
            pt, tt = adapter_for(model).trunk(), adapter_for(teacher).trunk()
            x_p = [pt.prefix(x.to(p.device, p.dtype)) for x in chunks]
            x_t = [tt.prefix(x) for x in chunks]
            regions = _regions(model, pt, tt)
            taken: set[str] = set()
            todo = []
            for r in regions:  # the head comes last and takes every Linear no block or stage entry owns
                todo.append((r, _linears(model, teacher, r, taken)))
                taken |= {p for p, m in model.named_modules() if r.prefix and (p == r.prefix or
                                                                              p.startswith(r.prefix + "."))}
            total = sum(len(n) for _, n in todo)
            with tqdm(total=total, desc="reconstruct", unit="layer", disable=not progress) as bar:
                for region, names in todo:
                    for name in names:
                        layer, sol = _refit(model, teacher, region, name, x_p, x_t, t_space, plan, heads_fold,
                                            damping, done.get(name), optimizer)
                        layers.append(layer)
                        if store is not None and name not in done:
                            _save_done(store, plan, name, sol, layer)
                        bar.update()
                    x_p = [region.pruned(x) for x in x_p]
                    x_t = [region.teacher(x) for x in x_t]
    finally:
        model.train(was[0])
        teacher.train(was[1])
    n_images = sum(len(c) for c in chunks)
    return {"layers": layers, "images": n_images, "damping": damping, "seconds": time.perf_counter() - t_start,
            "ranks": dist_info()[1]}


def reconstruct_summary(report: dict) -> str:
    """One line for a person: layers refit, the median output error before and after, seconds."""
    import statistics

    if not report["layers"]:
        return "reconstruction: no Linear lost inputs; nothing refit"
    before = statistics.median(r["rel_error_before"] for r in report["layers"])
    after = statistics.median(r["rel_error_after"] for r in report["layers"])
    return (f"reconstruction: {len(report['layers'])} Linears refit on {report['images']} images, median relative "
            f"output error {before:.3g} -> {after:.3g}, {report['seconds']:.1f} s")


# ------------------------------------------------------------------------------------------------------ internals
def _chunks(images, batch_size: int, teacher: nn.Module) -> list[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        return list(check_images(teacher, images, "calibration images").split(batch_size))
    if images is None:
        raise InputError("no calibration images")
    out = []
    for batch in images:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        out.append(check_images(teacher, x, "calibration images"))
    if not out:
        raise InputError("no calibration images: the loader yielded no batches")
    return out


class _Sum:
    """A float64 sum with Neumaier compensation: the result is the exact sum, rounded once (to ~1e-32 of the
    terms), whatever order the terms come in -- so ranks summing their shares, then each other's, get what one
    process summing every chunk gets."""

    def __init__(self, like: torch.Tensor):
        self.s, self.c = torch.zeros_like(like), torch.zeros_like(like)

    def add(self, x: torch.Tensor) -> None:
        t = self.s + x
        big = self.s.abs() >= x.abs()
        self.c += torch.where(big, (self.s - t) + x, (x - t) + self.s)
        self.s = t

    def total(self) -> torch.Tensor:
        """The sum over this process's terms, then over every rank's (gathered, added in rank order)."""
        if dist_info()[1] > 1:
            import torch.distributed as dist

            parts = [torch.zeros_like(self.s) for _ in range(dist_info()[1])]
            comps = [torch.zeros_like(self.c) for _ in range(dist_info()[1])]
            dist.all_gather(parts, self.s)
            dist.all_gather(comps, self.c)
            out = _Sum(self.s)
            for s, c in zip(parts, comps, strict=True):
                out.add(s)
                out.add(c)
            return out.s + out.c
        return self.s + self.c


def _refit(model, teacher, region: _Region, name: str, x_p, x_t, t_space, plan, heads_fold, damping, done,
           optimizer) -> dict:
    """Fit one Linear; write its weight (and bias) in place."""
    t0 = time.perf_counter()
    lin, t_lin = model.get_submodule(name), teacher.get_submodule(name)
    out_rows = kept_entries(t_space, plan, f"{name}.weight", 0, t_lin.out_features).to(t_lin.weight.device)
    fold = _fold(model, name, t_space, plan, heads_fold, out_rows)
    own_bias = lin.bias is not None
    d_in, d_out = lin.in_features, lin.out_features
    dev = lin.weight.device
    gram = _Sum(torch.zeros(d_in + 1, d_in + 1, dtype=torch.float64, device=dev))
    cross = _Sum(torch.zeros(d_in + 1, d_out, dtype=torch.float64, device=dev))
    y_sq = _Sum(torch.zeros((), dtype=torch.float64, device=dev))
    ext_bias = None
    for xp, xt in zip(x_p, x_t, strict=True):
        got_p, got_t = _tap(region.pruned, xp, lin.weight), _tap(region.teacher, xt, t_lin.weight)
        if got_p is None or got_t is None:
            raise PlanError(f"{name}: the Linear is not called in its region; cannot refit it")
        x, b_used = got_p
        xt_in, tb = got_t
        y = F.linear(xt_in, t_lin.weight, tb)[:, out_rows].double() * fold  # the teacher's output, kept features
        if not own_bias and b_used is not None:  # a bias assembled outside the Linear: fit the weight on y - b
            ext_bias = b_used.double()
            y = y - ext_bias
        xa = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64, device=x.device)], 1)
        gram.add(xa.T @ xa)
        cross.add(xa.T @ y)
        y_sq.add(y.square().sum())
    gram, cross, y_sq = gram.total(), cross.total(), y_sq.total()
    zero = torch.zeros(d_out, dtype=torch.float64, device=cross.device)
    w_old = torch.cat([lin.weight.double().T, (lin.bias.double() if own_bias else zero)[None]])
    if done is not None:
        sol, info = done["solution"].to(cross), done["info"]
    else:
        if not own_bias:  # no bias to fit: solve without the ones column
            sol_w, info = ridge_fit(gram[:-1, :-1], cross[:-1], damping, intercept=False)
            sol = torch.cat([sol_w, torch.zeros(1, d_out, dtype=torch.float64, device=cross.device)])
        else:
            sol, info = ridge_fit(gram, cross, damping)
    err = {k: _rel_error(gram, cross, y_sq, w) for k, w in (("rel_error_before", w_old), ("rel_error_after", sol))}
    del done
    lin.weight.copy_(sol[:-1].T.to(lin.weight.dtype))
    if own_bias:
        lin.bias.copy_(sol[-1].to(lin.bias.dtype))
    if optimizer is not None:
        for t in (lin.weight, lin.bias):
            if t is not None:
                optimizer.state.pop(t, None)
    rows = int(gram[-1, -1])
    return {"layer": name, "region": region.name, "d_in": d_in, "d_out": d_out, "rows": rows, **err, **info,
            "bias": "own" if own_bias else ("assembled outside (kept)" if ext_bias is not None else "none"),
            "seconds": time.perf_counter() - t0}, sol


def _rel_error(gram, cross, y_sq, sol) -> float:
    """``||[X 1] B - Y|| / ||Y||`` from the statistics: ``B^T G B - 2 B^T C + ||Y||^2``."""
    if sol.shape[0] != gram.shape[0]:
        return math.nan
    sq = float((sol * (gram @ sol)).sum() - 2 * (sol * cross).sum() + y_sq)
    return math.sqrt(max(sq, 0.0) / max(float(y_sq), 1e-300))


def _fold(model, name: str, t_space, plan, heads_fold: dict[str, float], out_rows: torch.Tensor) -> torch.Tensor:
    """Per kept output row, the factor ``prune_`` folded into it (the q rows of an attention whose head size
    changed: ``sqrt(new / old head_dim)``; 1 elsewhere)."""
    fold = torch.ones(len(out_rows), dtype=torch.float64, device=out_rows.device)
    adapter = adapter_for(model)
    lin = model.get_submodule(name)
    for group, factor in heads_fold.items():
        g = adapter.describe().groups[group]
        for t, rows in adapter.q_rows(g):
            if t is lin.weight:
                fold[rows] = factor
    return fold


def _key(plan: Plan) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(plan.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def _save_done(store: Path, plan: Plan, name: str, sol: torch.Tensor, layer: dict) -> None:
    """Save one refit layer's solution (a rank writes its own temporary, then renames it)."""
    from safetensors.torch import save_file

    store.mkdir(parents=True, exist_ok=True)
    tmp = store / f".{name}.{os.getpid()}.tmp"
    save_file({"solution": sol.detach().cpu().contiguous()}, str(tmp),
              metadata={"plan": _key(plan), "info": json.dumps({k: layer[k] for k in ("damping", "relative_damping",
                                                                                       "solver")})})
    apply_umask(tmp)
    os.replace(tmp, store / f"{name}.safetensors")


def _load_done(store: Path, plan: Plan) -> dict:
    """The layers a checkpoint holds for ``plan`` (a checkpoint of another plan is refused)."""
    from safetensors import safe_open

    out = {}
    if not store.is_dir():
        return out
    for f in store.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            meta = h.metadata()
            if meta.get("plan") != _key(plan):
                raise ConfigError(f"{store} holds a reconstruction of another plan; use another checkpoint directory")
            out[f.stem] = {"solution": h.get_tensor("solution"), "info": json.loads(meta["info"])}
    return out


__all__ = ["DAMPING", "reconstruct_", "reconstruct_summary", "ridge_fit"]
