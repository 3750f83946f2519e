"""A per-device latency model of a model's pruned shapes, for latency budgets (``PlanSpec(latency=...)``).

Measured on the device that will run the model, at the user's batch size and image size: for every stage (one
residual width), the first block is timed over a grid of widths -- the residual width, the attention's (heads x
head_dim, the plan rules' way of narrowing it), the MLP's hidden width -- and the rest of the model (embedding,
stage entries, head) at each residual level. A block's latency is taken as additive in its two branches
(``rest(C) + attention(C, A) + mlp(C, H)``: the branches run one after the other), each interpolated linearly
between grid points, every block of a stage priced like its first, scaled by the two blocks' measured times at full
width (Swin's shifted-window blocks cost more than the others). Where latency does not fall with FLOPs (small or
badly aligned widths), the measured table says so and the allocation sees it (it never picks an option that costs
more than a narrower one).

Tables are cached as JSON per device, model (its group sizes and class), batch size, image size, dtype, thread
count and plan rules; :meth:`LatencyModel.load` refuses a table measured under other conditions.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .arch import adapter_for
from .cost import _OptionCosts
from .errors import CheckpointError
from .files import apply_umask
from .plan import Plan, PlanSpec

FORMAT = "vitprune_fast.latency/2"
LEVELS = (1.0, 0.75, 0.5, 0.25)  # fractions of each width the grid measures (and the smallest allowed width)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _seconds(fn, device: torch.device, repeats: int) -> float:
    """The fastest of ``repeats`` calls of ``fn()``: the tables' statistic (see :func:`forward_seconds`)."""
    from . import metrics

    return metrics.time_call(fn, device, repeats=repeats, stat="min")


def forward_seconds(model: nn.Module, batch: int = 1, repeats: int = 10) -> float:
    """The fastest of ``repeats`` forward passes of ``model`` at ``batch`` (after warm-up; CUDA-synchronised): the
    statistic the tables are measured in. Other load on the machine only adds time, so on a shared machine the
    minimum is what repeats from one measurement to the next (a median moves with the neighbours' load)."""
    from . import metrics

    return metrics.measure_latency(model, batch, repeats=repeats, stat="min")


def _levels(n: int, step: int = 1) -> list[int]:
    """Distinct widths at :data:`LEVELS` of ``n``, multiples of ``step`` (at least one step), widest first."""
    out = []
    for f in LEVELS:
        w = max(step, int(round(f * n / step)) * step) if n > step else n
        if w not in out:
            out.append(min(w, n))
    return out


def _interp(points: Mapping[int, float], x: float) -> float:
    """Piecewise-linear interpolation (flat beyond the ends) of ``points`` {width: seconds}."""
    xs = sorted(points)
    if x <= xs[0]:
        return points[xs[0]]
    for a, b in zip(xs, xs[1:], strict=False):
        if x <= b:
            return points[a] + (points[b] - points[a]) * (x - a) / (b - a)
    return points[xs[-1]]


class LatencyModel:
    """Predicted latency (seconds) of ``model`` after a plan, from tables measured on its device.

    Build it with :meth:`build` (measures, or reuses a cached table); :meth:`predict` / :meth:`predict_plan` price a
    plan, :meth:`option_costs` feeds :func:`vitprune_fast.allocate.allocate`.

    Attributes:
        table: the measured tables (JSON-able).
        dense: the predicted latency of the unpruned model (what a latency budget is a fraction of).
        measured_dense: its measured latency.
    """

    def __init__(self, model: nn.Module, table: dict):
        adapter = adapter_for(model)
        self.space = adapter.describe()
        self.groups = self.space.groups
        self.table = table
        self.measured_dense = float(table["dense"])
        full = table["tables"]["blocks_full"]  # every block's measured seconds at full width
        self._stage_of = {}  # attn / mlp group of a block -> (stage index, its block's time over the stage's first)
        self._blocks = []  # (stage index, that ratio) of every block
        for st in adapter.stages():
            for b in st.blocks:
                at = (st.index, full[b.index] / full[st.blocks[0].index])
                self._blocks.append(at)
                for br in b.branches():
                    self._stage_of[br.attn] = self._stage_of[br.mlp] = at
        self._residual = {st.index: st.residual for st in adapter.stages()}
        self.dense = self.predict({})  # budgets are fractions of the model's own prediction (its errors cancel)

    # ------------------------------------------------------------------------------------------------ measuring
    @staticmethod
    def key(model: nn.Module, batch: int, rules: PlanSpec) -> dict:
        """What a table is valid for: device, model, batch and image size, dtype, threads, plan rules."""
        p = next(model.parameters())
        space = adapter_for(model).describe()
        sig = hashlib.sha256(json.dumps([type(model).__name__, space.arch, sorted(
            (n, g.size, g.num_heads) for n, g in space.groups.items())]).encode()).hexdigest()[:16]
        return {"format": FORMAT, "device": device_name(p.device), "device_type": p.device.type, "batch": int(batch),
                "input_size": list(adapter_for(model).input_size()), "dtype": str(p.dtype),
                "threads": torch.get_num_threads(), "model": sig, "attn_mode": rules.attn_mode,
                "heads": rules.heads if not isinstance(rules.heads, Mapping) else dict(rules.heads),
                "torch": torch.__version__}

    @classmethod
    def build(cls, model: nn.Module, batch: int = 1, rules: PlanSpec | None = None,
              cache_dir: str | os.PathLike | None = None, repeats: int = 5) -> LatencyModel:
        """Measure the tables of ``model`` on its device (or load them from ``cache_dir`` when a table with the
        same :meth:`key` is there), and cache them there.

        Args:
            model: a supported model on the device it will run on (not modified: pruned copies are timed).
            batch: the batch size it will run at.
            rules: the plan rules (``attn_mode``, ``heads``) the allocation will follow.
            cache_dir: where tables are cached (None: not cached).
            repeats: timed runs per measurement (the fastest is kept: :func:`forward_seconds`).
        """
        rules = rules or PlanSpec()
        key = cls.key(model, batch, rules)
        path = None
        if cache_dir is not None:
            name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
            path = Path(cache_dir) / f"latency-{name}.json"
            if path.is_file():
                return cls.load(model, path, batch, rules)
        table = {**key, "tables": _measure(model, batch, rules, repeats)}
        table["dense"] = table["tables"]["dense"]
        table = json.loads(json.dumps(table))  # what a cached one reads back (string keys)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(table, indent=1))
            apply_umask(tmp)
            os.replace(tmp, path)
        return cls(model, table)

    @classmethod
    def load(cls, model: nn.Module, path: str | os.PathLike, batch: int = 1,
             rules: PlanSpec | None = None) -> LatencyModel:
        """A cached table, after checking it was measured for this model, device, batch size, image size, dtype,
        thread count and plan rules.

        Raises:
            CheckpointError: a file that is not a latency table, or one measured under other conditions (named).
        """
        try:
            table = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path} is not a latency table: {e}") from e
        want = cls.key(model, batch, rules or PlanSpec())
        if not isinstance(table, dict) or table.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not a vitprune_fast latency table")
        differ = [k for k in want if k != "torch" and table.get(k) != want[k]]
        if differ:
            raise CheckpointError(f"{path} was measured for another {', '.join(differ)} "
                                  f"({', '.join(f'{k}={table.get(k)!r}, here {want[k]!r}' for k in differ)})")
        return cls(model, table)

    # ------------------------------------------------------------------------------------------------ predicting
    def _stage(self, stage: int) -> dict[int, dict]:
        return {int(c): row for c, row in self.table["tables"]["stages"][str(stage)].items()}

    def _at(self, stage: int, which: str, c: int, width: int | None = None) -> float:
        """``which`` ("block", "rest", or a branch "attn" / "mlp" at ``width``) of ``stage`` at residual ``c``,
        interpolated between the measured residual levels (and branch widths)."""
        rows = self._stage(stage)
        if which in ("block", "rest"):
            return _interp({k: v[which] for k, v in rows.items()}, c)
        return _interp({k: _interp({int(w): t for w, t in v[which].items()}, width) for k, v in rows.items()}, c)

    def predict(self, kept: Mapping[str, int], heads: Mapping[str, int] | None = None) -> float:
        """Predicted seconds with ``kept[g]`` channels of each named group (others whole)."""
        rest_full = self.table["tables"]["rest_full"]
        total = rest_full
        widths = {s: kept.get(r, self.groups[r].size) for s, r in self._residual.items()}
        for s in self._residual:
            total += self._at(s, "rest", widths[s]) - rest_full
        for s, ratio in self._blocks:
            total += ratio * self._at(s, "block", widths[s])
        for name, (s, ratio) in self._stage_of.items():  # a parallel block's extra branches: priced as its first
            g = self.groups[name]
            total += ratio * self._at(s, g.kind, widths[s], kept.get(name, g.size))
        return total

    def predict_plan(self, plan: Plan) -> float:
        """Predicted seconds after ``plan``."""
        return self.predict({n: len(v) for n, v in plan.keep.items()}, plan.heads)

    def plan_cost(self, plan: Plan) -> float:
        """The same as :meth:`predict_plan` (the cost-model interface ``allocate`` uses)."""
        return self.predict_plan(plan)

    def option_costs(self, fixed: Mapping[str, int], fixed_heads: Mapping[str, int], ladders) -> _OptionCosts:
        """Every ladder option's predicted latency with the residual widths ``fixed`` (the others whole)."""
        base = self.predict(fixed, fixed_heads)
        widths = {s: fixed.get(r, self.groups[r].size) for s, r in self._residual.items()}
        out = {}
        for name, lad in ladders.items():
            if name not in self._stage_of:  # a group outside the blocks (CaiT's class attention): not timed apart
                out[name] = [0.0] * len(lad.kept)
                continue
            g, (s, ratio) = self.groups[name], self._stage_of[name]
            full = self._at(s, g.kind, widths[s], g.size)
            out[name] = [ratio * (self._at(s, g.kind, widths[s], k) - full) for k in lad.kept]
        return _OptionCosts(base, out)


def _measure(model: nn.Module, batch: int, rules: PlanSpec, repeats: int) -> dict:
    """The tables: per stage and residual level, the stage's first block at full widths (``block``), its attention
    and MLP at each grid width (``attn`` / ``mlp``: seconds above ``block``), and the model outside its blocks with
    that stage's residual narrowed (``rest``); every block at full widths (``blocks_full``), ``rest_full``,
    ``dense``."""
    adapter = adapter_for(model)
    space = adapter.describe()
    mode = "heads" if any(g.whole_heads and g.tied_to is None for g in space.of_kind("attn")) else rules.attn_mode
    timer = _Timer(model, space, mode, batch, repeats)
    dense = forward_seconds(model, batch, repeats)
    per_block = timer.blocks(model)
    rest_full = dense - sum(per_block)
    out = {"dense": dense, "rest_full": rest_full, "blocks_full": per_block, "stages": {}}
    for st in adapter.stages():
        if not st.blocks:
            continue
        ref = st.blocks[0]
        attn, mlp, res = space.groups[ref.attn], space.groups[ref.mlp], space.groups[st.residual]
        rows = {}
        for c in _levels(res.size, res.multiple_of):
            if c == res.size:  # the unpruned model's own measurements
                block, rest = per_block[ref.index], rest_full
            else:
                whole = timer.pruned({st.residual: c})
                block = timer.block(whole, ref.index)
                rest = forward_seconds(whole, batch, repeats) - sum(timer.blocks(whole))
            row = {"block": block, "attn": {}, "mlp": {}, "rest": rest}
            row["attn"][attn.size] = row["mlp"][mlp.size] = 0.0  # both whole: the block itself
            if attn.tied_to is None:
                for a in _attn_levels(attn, mode)[1:]:
                    row["attn"][a] = timer.block(timer.pruned({st.residual: c, ref.attn: a}), ref.index) - block
            for h in _levels(mlp.size)[1:]:
                row["mlp"][h] = timer.block(timer.pruned({st.residual: c, ref.mlp: h}), ref.index) - block
            rows[c] = row
        out["stages"][str(st.index)] = rows
    return out


def _attn_levels(g, mode: str) -> list[int]:
    """The attention widths the grid times, narrowed the plan rules' way (dims of every head, or whole heads)."""
    if mode == "heads" or g.whole_heads:
        return [m * g.head_dim for m in _levels(g.num_heads)]
    return [d * g.num_heads for d in _levels(g.head_dim)]


class _Timer:
    """Times pruned copies of one model: a block of one (its input captured from a forward), or all its blocks."""

    def __init__(self, model: nn.Module, space, mode: str, batch: int, repeats: int):
        self.model, self.space, self.mode, self.batch, self.repeats = model, space, mode, batch, repeats
        self.device = next(model.parameters()).device
        self.zeros = {n: torch.zeros(g.size) for n, g in space.groups.items()}

    def pruned(self, kept: Mapping[str, int]) -> nn.Module:
        """A copy with ``kept[g]`` channels of each named group (tied attentions follow their residual)."""
        from .plan import make_plan
        from .prune import prune_

        keep = {n: k / self.space.groups[n].size for n, k in kept.items()}
        return prune_(copy.deepcopy(self.model), make_plan(self.space, self.zeros, keep=keep, attn_mode=self.mode))

    def _inputs(self, model: nn.Module) -> tuple[object, list]:
        from .metrics import input_size

        trunk = adapter_for(model).trunk()
        captured: dict[int, torch.Tensor] = {}

        def keep(i):
            def hook(module, args, kwargs):
                captured.setdefault(i, args[0])
            return hook

        handles = [b.register_forward_pre_hook(keep(i), with_kwargs=True) for i, b in enumerate(trunk.blocks)]
        try:
            p = next(model.parameters())
            with torch.inference_mode():
                model(torch.randn(self.batch, *input_size(model), device=p.device, dtype=p.dtype))
        finally:
            for h in handles:
                h.remove()
        return trunk, [captured[i] for i in range(len(trunk.blocks))]

    def block(self, model: nn.Module, i: int) -> float:
        trunk, xs = self._inputs(model)
        return _seconds(lambda: trunk.block(i, xs[i]), self.device, self.repeats)

    def blocks(self, model: nn.Module) -> list[float]:
        trunk, xs = self._inputs(model)
        return [_seconds(lambda i=i: trunk.block(i, xs[i]), self.device, self.repeats) for i in range(len(xs))]


__all__ = ["LatencyModel", "device_name", "forward_seconds"]
