"""DAP / P3B (Glandorf & Rosenhahn): depth-aware pruning during fine-tuning.

Each attention and each MLP residual branch is a *block*. Detached probes (``dap_probes``) measure how much a
block makes the residual stream more discriminative (ΔΨ, the Block Performance Indicator); on a schedule the
mean ΔΨ is turned into per-block keep ratios κ_i under a global parameter budget, and inside each block gates
ranked by first-order Taylor scores decide which units go. At the end :meth:`DAP.plan` is a :class:`Plan` that
:func:`prune_` applies, giving a physically smaller stock timm model. See ``research/dap.md`` for the reference.

Usage in any training loop::

    dap = DAP(model, target=0.5, schedule=Schedule.for_steps(steps))
    for x, y in loader:
        loss = criterion(model(x), y) + dap.loss(y)   # probe losses on the features of this forward
        opt.zero_grad(); loss.backward(); opt.step()
        dap.step()                                   # probes' optimizer, Taylor scores, κ / mask updates
    plan = dap.finalize(opt)                         # = dap.plan(); dap.remove(); prune_(model, plan, opt)

To resume a long run, save ``dap.state_dict()`` (after ``dap.step()``) with the model's and the optimizer's state
dicts; a new ``DAP`` built with the same arguments on the same architecture continues exactly after
``dap.load_state_dict(state)`` (``finetune_dap(checkpoint=...)`` does this for its own loop).

Choices (defaults; ``FAITHFUL`` holds the reference's values for the flagged quirks):

- **Gates.** One gate per block, inside what a stock timm block can express after slicing: attention gates
  scale q, k and v of a head-dim index in *every* head (``attn_mode="dims"``, the reference's ``attn_qkv``
  gate: each block keeps a uniform head_dim and all its heads) or whole heads (``attn_mode="heads"``); MLP
  gates scale hidden units (fc2 input). The reference's per-block residual in/out gates (``attn_in``,
  ``attn_out``, ``mlp_in``, ``mlp_out``) stay out, so the residual width is not pruned and the reference's
  LayerNorm-after-gather quirk does not arise. With one gate per block the reference's percentile-rank × gate
  scale and coupled threshold search reduce to keeping the top-k Taylor scores.
- **Parameter accounting.** W_i is the prunable part of block i (what its gate removes: qkv rows + proj
  columns per attention channel, Swin bias-table rows per removed head; fc1 row + bias + fc2 column per MLP
  unit). LayerNorms and output biases stay and count as non-block parameters, so κ_i is exactly the kept
  fraction of block i's gate units. ``target`` is the fraction of *all* model parameters to remove (the
  reference's prune rate p); ``block_params_only`` is the reference flag that takes it over W only.
- **Budget tolerance.** Kept units are integers; per-block counts are rounded jointly to the budget, so the
  final count is within half of the largest unit's cost (``DAP.tolerance``) of the target, unless the one-unit
  minimum per block binds.
- **κ allocation** follows the reference exactly (per-parameter normalisation by the kept count R_i, EMA on the
  normalised z, α-mix, projection with clipping). Fixed point for equal ΔΨ: κ_i ∝ 1/R_i = 1/(κ_i W_i), i.e.
  κ_i ∝ W_i^(-1/2). If no block has positive mean ΔΨ the reference would divide by a non-positive maximum; we
  divide by max|ΔΨ| instead. The projection iterates until no block newly saturates (the reference stops after
  20 rounds: ``projection_iters=20``).
- **Masks are frozen between updates** (``train_gates=False``). Reference quirk: they are Parameters that
  AdamW trains with the main LR (no weight decay) between updates (``train_gates=True``: add
  :meth:`DAP.gate_parameters` to your optimizer without weight decay).
- **Soft-mask centre** between the last pruned and the first kept unit (symmetric). Reference: on the first
  kept unit, which then sits at exactly 0.5 (``mask_center="reference"``). The hard masks are the same.
- **Probe mode** follows ``model.training`` (BatchNorm batch statistics in training). The reference trains in eval
  mode (no drop-path, probe BatchNorms on their initial running statistics): ``finetune_dap(eval_mode=True)``.
- **Swin** (our choices, not in the reference): two blocks per Swin block (W-MSA/SW-MSA attention, MLP);
  class probe on the mean-pooled token; patch probe on each stage's H×W map at that stage's width (one probe
  stack per stage); PatchMerging and the relative-position tables (in ``dims`` mode) count as non-block.
- **Probes** are stacked per stage on CUDA (one grouped conv + batched matmuls instead of 2 × blocks modules)
  and run one at a time on CPU, where oneDNN's dense convolutions are faster than its grouped ones (measured
  in ``bench/dap.py``); both compute the same numbers (tested). ``batched=True/False`` forces either.
- **Speed-ups** that deviate from the reference, off by default: ``probe_every=k`` (probes on every k-th step)
  and ``probe_batch=n`` (probes on the first n images of the batch).
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .arch import describe
from .dap_probes import BatchedProbes, LoopedProbes, probe_ce
from .errors import CheckpointError
from .plan import Plan
from .prune import prune_

ATTN_MODES = ("dims", "heads")
MASK_CENTERS = ("midpoint", "reference")
#: Reference behaviour for the quirks of ``research/dap.md`` §5 (pass as ``DAP(model, **FAITHFUL)``).
FAITHFUL = dict(train_gates=True, mask_center="reference", projection_iters=20)
#: Layout version of :meth:`DAP.state_dict`, and its keys.
STATE_VERSION = 1
_STATE_KEYS = ("version", "config", "model", "t", "gates_on", "gate", "keep", "units", "goal", "ema", "dpsi_cls",
               "dpsi_patch", "bpi_n", "taylor", "taylor_n", "history", "probes", "probe_optimizer")


# ----------------------------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class Schedule:
    """When DAP scores, ramps and sharpens, in ``dap.step()`` calls (optimizer steps), 0-based.

    Phases: warm-up ``[0, start)``: dense training, probes learn, nothing is scored. Sparsify
    ``[start, sparse)``: ΔΨ and Taylor scores accumulate; κ ramps from 1 to its goal, reached at step
    ``sparse - 1``; τ = τ_max. Sharpen ``[sparse, final)``: κ = goal (which still follows ΔΨ); τ falls linearly
    to 0. Hard ``[final, ∞)``: masks are 0/1 and frozen.

    Masks are updated after step t when ``start <= t < final`` and ``(t + 1 - start) % update_every == 0``, and
    after step ``final - 1`` (the final update, hard masks). An update after step t builds the masks used from
    step t + 1: ramp ρ(t) = clamp((t + 1 - start) / (sparse - start), 0, 1) and temperature τ(t + 1).

    Attributes:
        start, sparse, final: phase boundaries, ``0 <= start < sparse <= final``.
        update_every: steps between mask updates (the reference: ≈ a third of an epoch).
        tau_max: soft-mask temperature before sharpening.
    """

    start: int
    sparse: int
    final: int
    update_every: int = 100
    tau_max: float = 0.1

    def __post_init__(self):
        if not (0 <= self.start < self.sparse <= self.final):
            raise ValueError(f"schedule needs 0 <= start < sparse <= final, got {self.start}, {self.sparse}, "
                             f"{self.final}")
        if self.update_every < 1 or self.tau_max < 0:
            raise ValueError(f"update_every must be >= 1 and tau_max >= 0, got {self.update_every}, {self.tau_max}")

    @classmethod
    def for_steps(cls, total: int, start: float = 0.2, sparse: float = 0.5, update_every: int | None = None,
                  tau_max: float = 0.1) -> Schedule:
        """The reference's proportions (warm-up 10/50, ramp to 25/50 of the run) over ``total`` steps.

        ``update_every`` defaults to ``total // 150`` (the reference's ≈3 updates per epoch over 50 epochs), at
        least 1.
        """
        s = max(0, round(start * total))
        sp = max(s + 1, round(sparse * total))
        if total < sp:
            raise ValueError(f"a DAP schedule needs at least {sp} steps, got {total}")
        return cls(s, sp, total, update_every or max(1, total // 150), tau_max)

    @classmethod
    def from_epochs(cls, steps_per_epoch: int, start: int = 10, sparse: int = 25, final: int = 50,
                    updates_per_epoch: int = 3, tau_max: float = 0.1) -> Schedule:
        """The reference schedule in epochs (README run: 10 / 25 / 50, ≈3 mask updates per epoch)."""
        return cls(start * steps_per_epoch, sparse * steps_per_epoch, final * steps_per_epoch,
                   max(1, steps_per_epoch // updates_per_epoch), tau_max)

    def phase(self, t: int) -> str:
        """``warmup`` | ``sparsify`` | ``sharpen`` | ``hard``."""
        if t < self.start:
            return "warmup"
        if t < self.sparse:
            return "sparsify"
        return "sharpen" if t < self.final else "hard"

    def scoring(self, t: int) -> bool:
        """ΔΨ and Taylor scores accumulate at step t."""
        return self.start <= t < self.final

    def ramp(self, t: int) -> float:
        """ρ(t) ∈ [0, 1]: how far κ has moved from 1 to its goal."""
        return min(1.0, max(0.0, (t + 1 - self.start) / (self.sparse - self.start)))

    def tau(self, t: int) -> float:
        """Soft-mask temperature of the masks used at step t (0: hard)."""
        if t < self.sparse:
            return self.tau_max
        if t >= self.final:
            return 0.0
        return self.tau_max * (self.final - t) / (self.final - self.sparse)

    def is_update(self, t: int) -> bool:
        """Masks are recomputed after step t."""
        return self.scoring(t) and ((t + 1 - self.start) % self.update_every == 0 or t == self.final - 1)


# --------------------------------------------------------------------------------- κ allocation (pure math)
def soft_clamp(z: torch.Tensor, upper: float) -> torch.Tensor:
    """Smooth clamp into (0, upper): softplus(1.4 z) − softplus(1.4 z − upper)."""
    return F.softplus(1.4 * z) - F.softplus(1.4 * z - upper)


def normalise_bpi(d: torch.Tensor, kept: torch.Tensor, imp_scale: float = 10.0, per_param: bool = True
                  ) -> torch.Tensor:
    """Steps 2–4 of the reference's block budget: scale by the best block, soft clamp, per kept parameter, mean 1.

    Args:
        d: [nb] mean ΔΨ per block.
        kept: [nb] currently kept (prunable) parameters R_i of every block.
        imp_scale: S_imp.
        per_param: divide by R_i (the reference does).

    Returns:
        [nb] positive scores with mean 1.
    """
    top = d.max()
    if top <= 0:  # the reference divides by max(d) even when it is not positive; use max|d| (or 1 if all zero)
        top = d.abs().max()
    z = soft_clamp(d * imp_scale / top if top > 0 else d, imp_scale)  # [nb] in (0, S_imp)
    if per_param:
        z = z / kept.clamp_min(1)
    return z / z.mean()


def project_to_budget(kappa: torch.Tensor, sizes: torch.Tensor, budget: float, max_iter: int | None = None
                      ) -> torch.Tensor:
    """Scale the free blocks so that Σ κ_i W_i = budget; blocks reaching 1 (or ≤ 0) are frozen there.

    Args:
        kappa: [nb] relative keep scores (any scale).
        sizes: [nb] block sizes W_i.
        budget: parameters to keep in the blocks.
        max_iter: rounds of freezing (default: until no block newly saturates, at most nb + 1).

    Returns:
        [nb] keep ratios in [0, 1]; Σ κ W equals ``budget`` whenever 0 <= budget <= Σ W.
    """
    k = kappa.to(torch.float64).clone()
    w = sizes.to(torch.float64)
    one = torch.zeros_like(k, dtype=torch.bool)
    zero = k <= 0
    k[zero] = 0
    for _ in range(max_iter if max_iter is not None else len(k) + 1):
        free = ~(one | zero)
        denom = (k * w)[free].sum()
        if denom <= 0:
            break
        k[free] *= (budget - w[one].sum()) / denom
        new_one, new_zero = free & (k >= 1), free & (k <= 0)
        if not (new_one.any() or new_zero.any()):
            break
        k[new_one], k[new_zero] = 1.0, 0.0
        one |= new_one
        zero |= new_zero
    return k.clamp(0, 1)


def keep_ratio_goal(d_cls: torch.Tensor, d_patch: torch.Tensor, kept: torch.Tensor, sizes: torch.Tensor,
                    budget: float, prev: tuple[torch.Tensor, torch.Tensor] | None = None, *, imp_scale: float = 10.0,
                    gamma: float = 0.2, alpha: float = 0.5, per_param: bool = True, max_iter: int | None = None
                    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One κ-goal update of the reference (``research/dap.md`` §2a, steps 1–7).

    Args:
        d_cls, d_patch: [nb] mean ΔΨ of the class-token and patch-token probes.
        kept: [nb] kept prunable parameters R_i now.
        sizes: [nb] unpruned prunable parameters W_i.
        budget: Σ κ_i W_i to reach.
        prev: the normalised (z_cls, z_patch) of the previous update (EMA state), or None for the first one.
        imp_scale, gamma, alpha: S_imp, EMA weight of the new value, class/patch mix.
        per_param: divide by R_i.
        max_iter: see :func:`project_to_budget`.

    Returns:
        (κ goal [nb] in [0, 1], new EMA state).
    """
    zc = normalise_bpi(d_cls.double(), kept.double(), imp_scale, per_param)
    zp = normalise_bpi(d_patch.double(), kept.double(), imp_scale, per_param)
    if prev is not None:
        zc, zp = gamma * zc + (1 - gamma) * prev[0], gamma * zp + (1 - gamma) * prev[1]
    goal = project_to_budget(alpha * zc + (1 - alpha) * zp, sizes, budget, max_iter)
    return goal, (zc, zp)


def round_to_budget(units: torch.Tensor, size: torch.Tensor, ppm: torch.Tensor, budget: float) -> torch.Tensor:
    """Integer kept units per block (at least 1, at most ``size``) whose parameters are closest to ``budget``.

    Floors (clamped to [1, size]) first; then adds units in order of the largest fractional part, or, when the
    one-unit minimum overshot, removes units in order of the smallest, whenever that brings the count closer.
    The result is within ``max(ppm) / 2`` of the budget unless every block sits at one unit.
    """
    k = units.floor().clamp(min=1).minimum(size.double()).long()
    rest = budget - float((k * ppm).sum())
    frac = units - units.floor()
    if rest >= 0:
        for i in torch.argsort(-frac, stable=True).tolist():  # largest fractional part first
            if k[i] < size[i] and 2 * rest >= ppm[i]:
                k[i] += 1
                rest -= float(ppm[i])
    else:
        for i in torch.argsort(frac, stable=True).tolist():
            if k[i] > 1 and -2 * rest >= ppm[i]:
                k[i] -= 1
                rest += float(ppm[i])
    return k


def soft_mask(scores: torch.Tensor, keep: int, tau: float, center: str = "midpoint") -> torch.Tensor:
    """Sigmoid mask over units ranked by score: the ``n - keep`` lowest get < 0.5, the others ≥ 0.5.

    m_j = σ(ln 9 · (pos_j − c) / (n τ)), pos_j ∈ 1..n the ascending rank (ties: lower index first); c = r + 0.5
    (``midpoint``) or r + 1 (``reference``) with r = n − keep pruned units. τ = 0 gives the hard 0/1 mask.
    """
    n = scores.numel()
    pos = torch.empty(n, dtype=torch.float64)
    pos[torch.argsort(scores, stable=True)] = torch.arange(1, n + 1, dtype=torch.float64)
    r = n - keep
    if tau == 0:
        return (pos > r).double()
    c = r + (1.0 if center == "reference" else 0.5)
    return torch.sigmoid(math.log(9.0) * (pos - c) / (n * tau))


# -------------------------------------------------------------------------------------------- the pruner
@dataclass
class _Block:
    """One DAP block (an attention or MLP branch) and its gate."""

    name: str  # group name in describe(model): blocks.3.attn, layers.1.blocks.0.mlp
    kind: str  # attn | mlp
    n: int  # gate elements (head dims, heads or hidden units)
    ppm: int  # parameters removed per gate element
    offset: int  # into the flat gate vector
    num_heads: int = 1
    head_dim: int = 1

    @property
    def sl(self) -> slice:
        return slice(self.offset, self.offset + self.n)


@dataclass
class _Stage:
    """Consecutive transformer blocks with one width and token grid: one stack of probes."""

    blocks: list[nn.Module]
    first: int  # index of its first DAP block
    prefix: int
    has_cls: bool
    grid: tuple[int, int]
    dim: int


class DAP:
    """Depth-aware pruning during fine-tuning (see the module docstring for the choices).

    DAP works through forward hooks on the model (feature capture, gates); nothing else of the model changes
    until :meth:`finalize`. Copy a teacher *before* creating the DAP: ``copy.deepcopy`` copies hooks along.

    Args:
        model: a timm VisionTransformer (ViT/DeiT/DeiT-distilled) or SwinTransformer, in training.
        target: fraction of the model's parameters to remove (the reference's prune rate p).
        schedule: when to score / ramp / sharpen (:class:`Schedule`); default ``Schedule.for_steps(1000)``.
        num_classes: probe classes (default ``model.num_classes``).
        attn_mode: ``"dims"`` (uniform head_dim per block, all heads kept; the reference) or ``"heads"``.
        batched: stacked probes (one grouped conv + batched matmuls per stage) or the one-at-a-time reference
            (same numbers). Default (None): stacked on CUDA, one at a time elsewhere: on CPU oneDNN's dense
            convolutions beat its grouped ones and there is no launch overhead to save (``bench/dap.py``).
        label_smoothing: of the probe cross-entropy for index targets (soft targets are used as given).
        probe_lr, probe_weight_decay: the probes' own AdamW (the reference: 5e-4, 0.05 on weights only).
        imp_scale, gamma, alpha: S_imp, EMA weight, class/patch mix (reference 10, 0.2, 0.5).
        per_param_norm: divide ΔΨ scores by the kept parameter count (the reference does).
        block_params_only: the budget is over block parameters only (reference flag).
        probe_every, probe_batch: speed-ups (off by default; deviations from the reference).
        channels_last: probe convolutions in channels-last layout.
        train_gates, mask_center, projection_iters: see ``FAITHFUL``.
        probe_dtype: probe parameter dtype (default the model's).
    """

    def __init__(self, model: nn.Module, target: float = 0.5, schedule: Schedule | None = None, *,
                 num_classes: int | None = None, attn_mode: str = "dims", batched: bool | None = None,
                 label_smoothing: float = 0.0, probe_lr: float = 5e-4, probe_weight_decay: float = 0.05,
                 imp_scale: float = 10.0, gamma: float = 0.2, alpha: float = 0.5, per_param_norm: bool = True,
                 block_params_only: bool = False, probe_every: int = 1, probe_batch: int | None = None,
                 channels_last: bool = True, train_gates: bool = False, mask_center: str = "midpoint",
                 projection_iters: int | None = None, probe_dtype: torch.dtype | None = None):
        if attn_mode not in ATTN_MODES:
            raise ValueError(f"attn_mode must be one of {ATTN_MODES}, got {attn_mode!r}")
        if mask_center not in MASK_CENTERS:
            raise ValueError(f"mask_center must be one of {MASK_CENTERS}, got {mask_center!r}")
        if not 0.0 <= target < 1.0:
            raise ValueError(f"target (fraction of parameters to remove) must be in [0, 1), got {target}")
        if probe_every < 1 or (probe_batch is not None and probe_batch < 1):
            raise ValueError("probe_every and probe_batch must be >= 1")
        self.model, self.target = model, float(target)
        self.schedule = schedule or Schedule.for_steps(1000)
        self.space = describe(model)  # validates the model (clear error if unsupported)
        self.attn_mode, self.mask_center = attn_mode, mask_center
        self.label_smoothing, self.probe_every, self.probe_batch = label_smoothing, probe_every, probe_batch
        self.imp_scale, self.gamma, self.alpha, self.per_param_norm = imp_scale, gamma, alpha, per_param_norm
        self.train_gates, self.projection_iters = train_gates, projection_iters
        self.block_params_only, self.probe_lr, self.probe_weight_decay = block_params_only, probe_lr, probe_weight_decay
        p0 = next(model.parameters())
        k = num_classes if num_classes is not None else getattr(model, "num_classes", 0)
        if not k:
            raise ValueError("the model has no classifier: pass num_classes for the probes")
        self.num_classes = k

        self.blocks: list[_Block] = []
        self.stages: list[_Stage] = []
        self._gate_modules: list[nn.Module] = []
        for blocks, prefix, has_cls, grid in _stages_of(model):
            stage = _Stage(blocks, len(self.blocks), prefix, has_cls, grid, blocks[0].norm1.weight.shape[0])
            for path, blk in zip(_block_paths(model, blocks), blocks, strict=True):
                self._add_blocks(path, blk)
            self.stages.append(stage)
        nb = len(self.blocks)
        self.sizes = torch.tensor([b.n for b in self.blocks])  # [nb] gate elements
        self.ppm = torch.tensor([b.ppm for b in self.blocks])  # [nb] params per element
        self.full = (self.sizes * self.ppm).double()  # [nb] W_i
        self.total_params = sum(p.numel() for p in model.parameters())
        self.nonblock_params = self.total_params - int(self.full.sum())
        if block_params_only:
            self.budget = (1 - self.target) * float(self.full.sum())
        else:
            self.budget = (1 - self.target) * self.total_params - self.nonblock_params
        self.target_params = round(self.nonblock_params + self.budget)
        self.tolerance = int(self.ppm.max()) / 2  # documented rounding tolerance of the final count
        if self.budget < float(self.ppm.sum()):
            raise ValueError(f"target={target} leaves {self.budget:.0f} block parameters, fewer than one unit per "
                             f"block ({int(self.ppm.sum())}); DAP does not remove whole blocks")

        # Gates: one flat vector, each block a view (one op for all Taylor scores).
        gate = torch.ones(int(self.sizes.sum()), device=p0.device, dtype=p0.dtype)
        self.gate = nn.Parameter(gate, requires_grad=train_gates) if train_gates else gate
        self._gates_on = train_gates  # default: no gate multiply while all gates are 1 (warm-up)
        self.units = self.sizes.clone()  # [nb] kept units per block (hard masks)
        self._keep = [torch.ones(b.n, dtype=torch.bool) for b in self.blocks]  # hard masks of the last update
        self.goal = torch.ones(nb, dtype=torch.float64)  # κ goal of the last update

        self.batched = p0.device.type == "cuda" if batched is None else bool(batched)
        probe_cls = BatchedProbes if self.batched else LoopedProbes
        dtype = self.probe_dtype = probe_dtype or p0.dtype
        self.probes = nn.ModuleList(
            probe_cls(2 * len(s.blocks), s.dim, k, s.has_cls, s.prefix, s.grid, channels_last=channels_last,
                      device=p0.device, dtype=dtype) for s in self.stages)
        decay, no_decay = [], []
        for pr in self.probes:
            d, nd = pr.weight_decay_params()
            decay += d
            no_decay += nd
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": probe_weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=probe_lr)

        self.t = 0  # dap.step() calls so far
        self.history: list[dict] = []
        self._ema: tuple[torch.Tensor, torch.Tensor] | None = None
        self._reset_accumulators()
        self._feats: list[list[torch.Tensor | None]] = [[None] * (2 * len(s.blocks) + 1) for s in self.stages]
        self._probe_pending = False
        self._hooks = []
        self._install_hooks()
        self._set_gate_grad()

    # ------------------------------------------------------------------------------------------ setup
    def _add_blocks(self, path: str, blk: nn.Module) -> None:
        attn, mlp = blk.attn, blk.mlp
        c = attn.qkv.in_features
        h = attn.num_heads
        hd = attn.qkv.out_features // 3 // h
        per_channel = 3 * (c + (attn.qkv.bias is not None)) + attn.proj.out_features  # qkv rows + proj column
        if self.attn_mode == "dims":
            n, ppm = hd, h * per_channel
        else:
            table = getattr(attn, "relative_position_bias_table", None)
            n, ppm = h, hd * per_channel + (table.shape[0] if table is not None else 0)
        off = int(sum(b.n for b in self.blocks))
        self.blocks.append(_Block(f"{path}.attn", "attn", n, ppm, off, h, hd))
        fc1, fc2 = mlp.fc1, mlp.fc2
        self.blocks.append(_Block(f"{path}.mlp", "mlp", fc1.out_features,
                                  fc1.in_features + (fc1.bias is not None) + fc2.out_features, off + n))
        self._gate_modules += [attn.qkv, fc2]
        for b in self.blocks[-2:]:
            if b.name not in self.space.groups:
                raise ValueError(f"{b.name}: not a prunable group of this model")

    def _install_hooks(self) -> None:
        for si, stage in enumerate(self.stages):
            feats = self._feats[si]
            for li, blk in enumerate(stage.blocks):
                if li == 0:
                    self._hooks.append(blk.norm1.register_forward_pre_hook(_capture(feats, 0)))
                self._hooks.append(blk.norm2.register_forward_pre_hook(_capture(feats, 2 * li + 1)))
                self._hooks.append(blk.register_forward_hook(_capture(feats, 2 * li + 2, output=True)))
        for b, mod in zip(self.blocks, self._gate_modules, strict=True):
            if b.kind == "attn":
                self._hooks.append(mod.register_forward_hook(self._attn_gate_hook(b)))
            else:
                self._hooks.append(mod.register_forward_pre_hook(self._mlp_gate_hook(b)))

    def _attn_gate_hook(self, b: _Block):
        def hook(_mod, _args, out):  # out: [..., 3 * H * hd] laid out as (q|k|v, head, dim)
            if not self._gates_on:
                return None
            g = self.gate[b.sl]
            full = g.repeat(3 * b.num_heads) if self.attn_mode == "dims" else g.repeat_interleave(b.head_dim).repeat(3)
            return out * full.to(out.dtype)

        return hook

    def _mlp_gate_hook(self, b: _Block):
        def hook(_mod, args):  # args[0]: [..., hidden] activations entering fc2
            if not self._gates_on:
                return None
            return (args[0] * self.gate[b.sl].to(args[0].dtype),) + tuple(args[1:])

        return hook

    def _reset_accumulators(self) -> None:
        dev = self.gate.device
        nb = len(self.blocks)
        self._dcls = torch.zeros(nb, device=dev, dtype=torch.float32)  # Σ ΔΨ^c over the window
        self._dpatch = torch.zeros(nb, device=dev, dtype=torch.float32)
        self._bpi_n = 0
        self._taylor = torch.zeros(self.gate.numel(), device=dev, dtype=torch.float32)  # Σ (m · dL/dm)²
        self._taylor_n = 0

    def _set_gate_grad(self) -> None:
        """Gates take part (and need a gradient) while scoring and, with train_gates, until the final update."""
        scoring = self.schedule.scoring(self.t)
        self._gates_on = self._gates_on or scoring
        self.gate.requires_grad_(scoring or (self.train_gates and self.t < self.schedule.final))

    # ----------------------------------------------------------------------------------- training loop
    def loss(self, target: torch.Tensor) -> torch.Tensor:
        """Probe losses on the features of the model's last forward pass; accumulates ΔΨ while scoring.

        Args:
            target: the batch's labels ``[B]`` or soft targets ``[B, K]`` (mixup).

        Returns:
            Scalar to add to the training loss (all 4 × nb probe cross-entropies, weight 1; zero on steps
            without probes). Its gradient reaches only the probes: their inputs are detached.
        """
        t = self.t
        active = t < self.schedule.final and t % self.probe_every == 0
        feats = [list(f) for f in self._feats]
        for f in self._feats:
            f[:] = [None] * len(f)
        dev = self.gate.device
        if not active:
            return torch.zeros((), device=dev)
        if any(m is None for f in feats for m in f):
            raise RuntimeError("DAP.loss needs the features of a forward pass of the model: call it after model(x)")
        target = target.to(dev)
        if self.probe_batch is not None:
            feats = [[m[: self.probe_batch] for m in f] for f in feats]
            target = target[: self.probe_batch]
        total = torch.zeros((), device=dev)
        scoring = self.schedule.scoring(t)
        for stage, probes, maps in zip(self.stages, self.probes, feats, strict=True):
            _check_tokens(maps[0], stage)
            probes.train(self.model.training)
            cls, patch = probes(maps)  # [2, B, nb_s, K] each
            lc = probe_ce(cls, target, self.label_smoothing).mean(1)  # [2, nb_s]
            lp = probe_ce(patch, target, self.label_smoothing).mean(1)
            total = total + lc.sum() + lp.sum()
            if scoring:
                sl = slice(stage.first, stage.first + probes.nb)
                self._dcls[sl] += (lc[0] - lc[1]).detach()  # ΔΨ = L(Ψ(x_in)) − L(Ψ(x_out))
                self._dpatch[sl] += (lp[0] - lp[1]).detach()
        self._bpi_n += int(scoring)
        self._probe_pending = True
        return total

    def step(self, scaler: torch.amp.GradScaler | None = None) -> None:
        """Call once per optimizer step, after ``optimizer.step()`` and before the next ``zero_grad``.

        Steps the probes' optimizer, accumulates the Taylor scores (m · ∂L/∂m)² of the gates, and runs the mask
        update when the schedule says so. With a GradScaler, call it before ``scaler.update()``.
        """
        t = self.t
        if self._probe_pending:
            if scaler is not None:
                scaler.step(self.optimizer)
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self._probe_pending = False
        g = self.gate.grad
        if g is not None:
            if self.schedule.scoring(t):
                if scaler is not None and scaler.is_enabled():
                    g = g / scaler.get_scale()
                self._taylor += (self.gate.detach() * g).float().square()
                self._taylor_n += 1
            self.gate.grad = None
        if self.schedule.is_update(t):
            self._update(t)
        self.t += 1
        self._set_gate_grad()

    def _update(self, t: int) -> None:
        """Recompute κ goals from the window's ΔΨ, ramp, round to the budget, and rebuild the masks."""
        n = max(self._bpi_n, 1)
        d_cls = (self._dcls / n).double().cpu()
        d_patch = (self._dpatch / n).double().cpu()
        kept = (self.units * self.ppm).double()  # R_i from the current hard masks
        self.goal, self._ema = keep_ratio_goal(
            d_cls, d_patch, kept, self.full, self.budget, self._ema, imp_scale=self.imp_scale, gamma=self.gamma,
            alpha=self.alpha, per_param=self.per_param_norm, max_iter=self.projection_iters)
        rho = self.schedule.ramp(t)
        kappa = 1 - (1 - self.goal) * rho  # [nb] applied keep ratio
        self.units = round_to_budget(kappa * self.sizes, self.sizes, self.ppm, float((kappa * self.full).sum()))
        tau = self.schedule.tau(t + 1)
        taylor = (self._taylor / max(self._taylor_n, 1)).double().cpu()
        masks = [soft_mask(taylor[b.sl], int(k), tau, self.mask_center) for b, k in zip(self.blocks, self.units,
                                                                                          strict=True)]
        self._keep = [soft_mask(taylor[b.sl], int(k), 0.0) > 0.5 for b, k in zip(self.blocks, self.units, strict=True)]
        with torch.no_grad():
            self.gate.copy_(torch.cat(masks).to(self.gate.dtype))
        self._gates_on = True
        self.history.append(dict(
            step=t, phase=self.schedule.phase(t), rho=rho, tau=tau, dpsi_cls=d_cls.tolist(),
            dpsi_patch=d_patch.tolist(), goal=self.goal.tolist(), units=self.units.tolist(),
            kept_params=self.kept_params()))
        self._reset_accumulators()

    # ------------------------------------------------------------------------------------- checkpointing
    def _config(self) -> dict:
        """The arguments that change what DAP computes; a state only loads into a DAP built with the same."""
        return dict(target=self.target, schedule=dataclasses.asdict(self.schedule), attn_mode=self.attn_mode,
                    mask_center=self.mask_center, batched=self.batched, probe_dtype=str(self.probe_dtype),
                    label_smoothing=self.label_smoothing, probe_lr=self.probe_lr,
                    probe_weight_decay=self.probe_weight_decay, imp_scale=self.imp_scale, gamma=self.gamma,
                    alpha=self.alpha, per_param_norm=self.per_param_norm, block_params_only=self.block_params_only,
                    probe_every=self.probe_every, probe_batch=self.probe_batch, train_gates=self.train_gates,
                    projection_iters=self.projection_iters)

    def _signature(self) -> dict:
        """What DAP saw of the model: its blocks, probe stages, parameter count and classes."""
        return dict(blocks=[[b.name, b.kind, b.n, b.ppm, b.num_heads, b.head_dim] for b in self.blocks],
                    stages=[[s.first, s.prefix, s.has_cls, list(s.grid), s.dim] for s in self.stages],
                    total_params=self.total_params, num_classes=self.num_classes)

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue exactly where this one stands (save after ``dap.step()``).

        Save it next to the model's and the optimizer's state dicts; a fresh ``DAP(model, ...)`` with the same
        arguments on the same architecture continues identically after :meth:`load_state_dict`. DAP draws no
        random numbers after construction (only the probe initialisation, which the state overwrites), so no
        RNG state is part of it. Layout (version 1):

        - ``version`` (int), ``config`` (the DAP arguments, plain values), ``model`` (the model's DAP blocks
          ``[name, kind, units, params per unit, heads, head_dim]``, probe stages, parameter count, classes);
        - ``t`` (int: ``dap.step()`` calls so far, the schedule position), ``gates_on`` (bool);
        - ``gate`` [G] (the gate values, soft masks included), ``keep`` [G] bool (hard masks of the last update),
          ``units`` [nb] int64, ``goal`` [nb] float64 (κ goal), ``ema`` [2, nb] float64 or None (κ EMA state);
        - accumulators of the current window: ``dpsi_cls``, ``dpsi_patch`` [nb] and ``taylor`` [G] sums,
          ``bpi_n`` and ``taylor_n`` (ints);
        - ``history`` (list of dicts of plain values: one per mask update);
        - ``probes`` (the probe modules' ``state_dict``: weights and BatchNorm statistics) and
          ``probe_optimizer`` (the probes' AdamW ``state_dict``).

        Only tensors and plain Python values: ``torch.save`` / ``torch.load(weights_only=True)`` round-trip it,
        and every tensor is contiguous with its own storage (safetensors can hold the tensor part). As with
        ``nn.Module.state_dict``, tensors may share memory with the live DAP: save (or deep-copy) it to keep a
        snapshot.
        """
        if self._probe_pending:
            raise RuntimeError("DAP.state_dict() was called between dap.loss() and dap.step(): save after dap.step()")
        return dict(
            version=STATE_VERSION, config=self._config(), model=self._signature(), t=self.t, gates_on=self._gates_on,
            gate=self.gate.detach(), keep=torch.cat(self._keep), units=self.units, goal=self.goal,
            ema=None if self._ema is None else torch.stack(self._ema),
            dpsi_cls=self._dcls, dpsi_patch=self._dpatch, bpi_n=self._bpi_n, taylor=self._taylor,
            taylor_n=self._taylor_n, history=copy.deepcopy(self.history),
            probes=_contiguous(self.probes.state_dict()), probe_optimizer=_contiguous(self.optimizer.state_dict()))

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` (also the probes and their optimizer): training continues from there.

        Everything is checked first (version, keys, that the model and the DAP arguments are the ones the state
        was saved with, every tensor's shape and kind, the probe optimizer's layout); on any mismatch a
        :class:`CheckpointError` lists the problems and this DAP is left unchanged. Tensors are copied (the dict
        is not kept) and moved to this DAP's device; the gate is updated in place, so an optimizer holding
        :meth:`gate_parameters` keeps working.
        """
        problems = self._state_problems(state)
        if problems:
            raise CheckpointError("DAP state does not fit this DAP (nothing was loaded):\n  - "
                                  + "\n  - ".join(problems))
        dev, cpu = self.gate.device, torch.device("cpu")
        with torch.no_grad():
            self.gate.copy_(state["gate"])
        self.gate.grad = None
        keep = state["keep"].to(cpu)
        self._keep = [keep[b.sl].clone() for b in self.blocks]
        self.units = state["units"].to(cpu, torch.long, copy=True)
        self.goal = state["goal"].to(cpu, torch.float64, copy=True)
        ema = state["ema"]
        self._ema = None if ema is None else tuple(e.to(cpu, torch.float64, copy=True) for e in ema)
        self._dcls = state["dpsi_cls"].to(dev, torch.float32, copy=True)
        self._dpatch = state["dpsi_patch"].to(dev, torch.float32, copy=True)
        self._taylor = state["taylor"].to(dev, torch.float32, copy=True)
        self._bpi_n, self._taylor_n = state["bpi_n"], state["taylor_n"]
        self.history = copy.deepcopy(state["history"])
        self.probes.load_state_dict(state["probes"])
        self.optimizer.load_state_dict(state["probe_optimizer"])
        for group in self.optimizer.param_groups:  # Adam moments back in their parameter's layout (channels-last)
            for p in group["params"]:
                st = self.optimizer.state.get(p, {})
                for k, v in st.items():
                    if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                        st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)
        self.t, self._gates_on, self._probe_pending = state["t"], state["gates_on"], False
        for f in self._feats:  # in place: the capture hooks hold these lists
            f[:] = [None] * len(f)
        self._set_gate_grad()

    def _state_problems(self, state) -> list[str]:
        """Why ``state`` cannot be loaded into this DAP (empty if it can)."""
        if not isinstance(state, dict):
            return [f"expected a dict from DAP.state_dict(), got {type(state).__name__}"]
        if state.get("version") != STATE_VERSION:
            return [f"unsupported DAP state version {state.get('version')!r} (this code reads {STATE_VERSION})"]
        missing, extra = sorted(set(_STATE_KEYS) - set(state)), sorted(set(state) - set(_STATE_KEYS))
        if missing or extra:
            return [f"missing keys {missing}, unexpected keys {extra}"]
        sig = self._signature()
        if state["model"] != sig:
            return [_signature_diff(state["model"], sig)]
        cfg, saved = self._config(), state["config"]
        if not isinstance(saved, dict):
            return [f"config: expected a dict, got {type(saved).__name__}"]
        problems = [f"config {k}: saved {saved.get(k, '<missing>')!r}, this DAP has {v!r}" for k, v in cfg.items()
                    if k not in saved or saved[k] != v]
        problems += [f"config {k}: unknown setting" for k in saved if k not in cfg]
        g, nb = self.gate.numel(), len(self.blocks)
        for name, shape, kind in (("gate", (g,), "float"), ("keep", (g,), "bool"), ("units", (nb,), "int"),
                                  ("goal", (nb,), "float"), ("dpsi_cls", (nb,), "float"),
                                  ("dpsi_patch", (nb,), "float"), ("taylor", (g,), "float")):
            problems += _tensor_problems(name, state[name], shape, kind)
        if state["ema"] is not None:
            problems += _tensor_problems("ema", state["ema"], (2, nb), "float")
        for name in ("t", "bpi_n", "taylor_n"):
            v = state[name]
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                problems.append(f"{name}: expected an int >= 0, got {v!r}")
        if not isinstance(state["gates_on"], bool):
            problems.append(f"gates_on: expected a bool, got {state['gates_on']!r}")
        if not isinstance(state["history"], list) or not all(isinstance(h, dict) for h in state["history"]):
            problems.append("history: expected a list of dicts")
        if not problems:  # hard masks and kept units must agree
            counts = [int(state["keep"][b.sl].sum()) for b in self.blocks]
            if counts != state["units"].tolist() or min(counts) < 1:
                problems.append(f"keep / units disagree: the hard masks keep {counts}, units says "
                                f"{state['units'].tolist()}")
        problems += _module_state_problems("probes", state["probes"], self.probes.state_dict())
        problems += _optimizer_state_problems(state["probe_optimizer"], self.optimizer)
        return problems

    # ---------------------------------------------------------------------------------------- results
    def hard_masks(self) -> list[torch.Tensor]:
        """Per block, the bool mask of gate elements kept by the last mask update (all True before the first).

        These are the units with soft mask ≥ 0.5 at that update, and exactly the gates after the final update.
        """
        return [m.clone() for m in self._keep]

    def kept_params(self) -> int:
        """Parameters of the model after :meth:`plan` (excluding the probes)."""
        units = torch.tensor([int(m.sum()) for m in self.hard_masks()])
        return self.nonblock_params + int((units * self.ppm).sum())

    def keep_ratios(self) -> dict[str, float]:
        """Group name -> fraction of its gate units kept by the current hard masks (κ realised)."""
        return {b.name: float(m.double().mean()) for b, m in zip(self.blocks, self.hard_masks(), strict=True)}

    def plan(self) -> Plan:
        """The current hard masks as a :class:`Plan` for :func:`prune_` (non-uniform per-block keep counts)."""
        keep, heads = {}, {}
        for b, m in zip(self.blocks, self.hard_masks(), strict=True):
            if m.all():
                continue
            idx = m.nonzero().flatten()
            if b.kind == "mlp":
                keep[b.name] = idx
            elif self.attn_mode == "dims":  # the same head-dim indices in every head: uniform head_dim
                keep[b.name] = (torch.arange(b.num_heads)[:, None] * b.head_dim + idx).flatten()
            else:  # whole heads
                keep[b.name] = (idx[:, None] * b.head_dim + torch.arange(b.head_dim)).flatten()
                heads[b.name] = len(idx)
        return Plan.from_space(self.space, keep, heads)

    def gate_parameters(self) -> list[torch.Tensor]:
        """The gate vector (an ``nn.Parameter`` with ``train_gates=True``): add it with weight decay 0."""
        return [self.gate]

    def remove(self) -> None:
        """Detach every hook from the model (gates and feature capture)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._gates_on = False
        self._feats = [[None] * len(f) for f in self._feats]

    def finalize(self, optimizer: torch.optim.Optimizer | None = None) -> Plan:
        """``plan()``, ``remove()`` and ``prune_(model, plan, optimizer)``: the model becomes physically smaller."""
        plan = self.plan()
        self.remove()
        prune_(self.model, plan, optimizer=optimizer)
        return plan


def _capture(store: list, slot: int, output: bool = False):
    """Hook storing a detached [B, T, C] view of a residual-stream map (Swin [B, H, W, C] is flattened)."""
    def hook(_mod, args, out=None):
        x = out if output else args[0]
        store[slot] = x.detach().reshape(x.shape[0], -1, x.shape[-1])

    if output:
        return hook
    return lambda mod, args: hook(mod, args)


def _check_tokens(x: torch.Tensor, stage: _Stage) -> None:
    want = stage.prefix + stage.grid[0] * stage.grid[1]
    if x.shape[1] != want:
        raise RuntimeError(f"DAP probes were built for {stage.grid} patch tokens (+{stage.prefix}), the model "
                           f"produced {x.shape[1]} tokens; run at the model's img_size")


def _stages_of(model: nn.Module) -> list[tuple[list[nn.Module], int, bool, tuple[int, int]]]:
    """(blocks, prefix tokens, has class token, patch grid) for every probe stack."""
    from timm.models.swin_transformer import SwinTransformer

    if isinstance(model, SwinTransformer):
        return [(list(st.blocks), 0, False, tuple(st.blocks[0].input_resolution))
                for st in model.layers if len(st.blocks)]
    return [(list(model.blocks), model.num_prefix_tokens, model.cls_token is not None,
             tuple(model.patch_embed.grid_size))]


def _block_paths(model: nn.Module, blocks: list[nn.Module]) -> list[str]:
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(b)] for b in blocks]


# ------------------------------------------------------------------------------------- state validation
def _contiguous(obj):
    """A copy of nested dicts/lists/tuples with every tensor detached and contiguous (safetensors-ready)."""
    if torch.is_tensor(obj):
        return obj.detach().contiguous()
    if isinstance(obj, dict):
        return {k: _contiguous(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_contiguous(v) for v in obj)
    return obj


def _signature_diff(saved, mine: dict) -> str:
    """Where a saved model signature differs from this model's (first difference)."""
    head = "the state was saved for a different model: "
    if not isinstance(saved, dict):
        return head + f"its model entry is a {type(saved).__name__}, not a dict"
    sb, mb = saved.get("blocks"), mine["blocks"]
    if not isinstance(sb, list) or len(sb) != len(mb):
        return head + f"{len(sb) if isinstance(sb, list) else sb!r} DAP blocks saved, this model has {len(mb)}"
    for i, (a, b) in enumerate(zip(sb, mb, strict=True)):
        if a != b:
            return head + f"block {i} is {a} in the state, {b} here ([name, kind, units, params/unit, heads, head_dim])"
    for k, v in mine.items():
        if saved.get(k) != v:
            return head + f"{k}: saved {saved.get(k)!r}, this model {v!r}"
    return head + f"unknown entries {sorted(set(saved) - set(mine))}"


def _tensor_problems(name: str, v, shape: tuple[int, ...], kind: str) -> list[str]:
    """[] if ``v`` is a tensor of ``shape`` and kind ``float`` | ``int`` | ``bool``, else why not."""
    if not torch.is_tensor(v):
        return [f"{name}: expected a tensor, got {type(v).__name__}"]
    if tuple(v.shape) != tuple(shape):
        return [f"{name}: shape {tuple(v.shape)}, expected {tuple(shape)}"]
    got = "bool" if v.dtype == torch.bool else "float" if v.is_floating_point() else "complex" if v.is_complex() \
        else "int"
    return [] if got == kind else [f"{name}: dtype {v.dtype}, expected a {kind} tensor"]


def _module_state_problems(name: str, saved, mine: dict[str, torch.Tensor]) -> list[str]:
    """Keys, shapes and kinds of a saved module state dict against the live one."""
    if not isinstance(saved, dict):
        return [f"{name}: expected a state dict, got {type(saved).__name__}"]
    missing, extra = sorted(set(mine) - set(saved)), sorted(set(saved) - set(mine))
    if missing or extra:
        return [f"{name}: missing keys {missing}, unexpected keys {extra}"]
    problems = []
    for k, v in mine.items():
        kind = "bool" if v.dtype == torch.bool else "float" if v.is_floating_point() else "int"
        problems += _tensor_problems(f"{name}.{k}", saved[k], tuple(v.shape), kind)
    return problems


def _optimizer_state_problems(saved, opt: torch.optim.Optimizer) -> list[str]:
    """Groups, parameter counts and state tensor shapes of a saved optimizer state dict against ``opt``."""
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict) \
            or not isinstance(saved.get("param_groups"), list):
        return ["probe_optimizer: expected an optimizer state dict (state, param_groups)"]
    groups = saved["param_groups"]
    sizes = [len(g["params"]) if isinstance(g, dict) and isinstance(g.get("params"), list) else None for g in groups]
    mine = [len(g["params"]) for g in opt.param_groups]
    if sizes != mine:
        return [f"probe_optimizer: parameter groups of sizes {sizes}, expected {mine}"]
    params = dict(zip((i for g in groups for i in g["params"]), (p for g in opt.param_groups for p in g["params"]),
                      strict=True))
    problems = []
    for i, st in saved["state"].items():
        if i not in params or not isinstance(st, dict):
            problems.append(f"probe_optimizer: state for unknown parameter {i!r}")
            continue
        p = params[i]
        for k, v in st.items():
            if k == "step":
                if not (isinstance(v, int | float) or torch.is_tensor(v) and v.numel() == 1):
                    problems.append(f"probe_optimizer.state[{i}].step: expected a number, got {v!r}")
            else:
                problems += _tensor_problems(f"probe_optimizer.state[{i}].{k}", v, tuple(p.shape), "float")
    return problems


# ---------------------------------------------------------------------------------------- fine-tune entry
def finetune_dap(model: nn.Module, train_loader: Iterable, target: float = 0.5, steps: int = 1000,
                 lr: float = 5e-4, *, schedule: Schedule | None = None, weight_decay: float = 0.05,
                 teacher: nn.Module | None = None, distill_alpha: float | None = None,
                 amp_dtype: torch.dtype | None = None, eval_mode: bool = False, log_every: int = 1,
                 dap_kwargs: dict | None = None, progress: bool = False, checkpoint: str | os.PathLike | None = None,
                 checkpoint_every: int = 0) -> tuple[nn.Module, Plan, dict]:
    """A short DAP fine-tune that ends with the physically pruned model.

    AdamW at a constant learning rate (the reference uses no LR schedule while pruning), task loss =
    cross-entropy, plus soft distillation from ``teacher`` (``finetune.distillation_loss``) when given; the probe
    losses are added with weight 1. After ``steps`` steps (the schedule's final update must fall inside them)
    the model is pruned in place by :meth:`DAP.finalize` (AdamW state sliced along).

    Args:
        model: timm ViT/DeiT/Swin (on its target device).
        train_loader: re-iterable ``(images, labels)`` batches; cycled.
        target: fraction of the parameters to remove.
        steps: optimizer steps.
        lr: AdamW learning rate of the model.
        schedule: default ``Schedule.for_steps(steps)``.
        weight_decay: on weights (not on biases, norms, tokens, position embeddings).
        teacher: optional unpruned model for soft distillation.
        distill_alpha: KL weight (default ``finetune.DEFAULT_ALPHA``).
        amp_dtype: autocast dtype (e.g. ``torch.bfloat16``) or None.
        eval_mode: train in eval mode like the reference (no drop-path; probe BatchNorms on running stats).
        log_every: record the losses every this many steps.
        dap_kwargs: more :class:`DAP` arguments (``attn_mode``, ``batched``, ``**FAITHFUL``, ...).
        progress: tqdm bar.
        checkpoint: resume file. If it exists, the model, the AdamW state, the DAP state
            (:meth:`DAP.state_dict`), the logged losses and the global RNG state (CPU, and the model's CUDA
            device) are loaded from it (checked against this run's model and DAP arguments first) and the run
            goes on from its step. Written every ``checkpoint_every`` steps (a temporary file, then a rename).
            A resumed run starts a fresh pass over ``train_loader``: it repeats the uninterrupted run exactly
            when the checkpoint falls on a pass boundary of a loader whose order does not depend on the RNG.
        checkpoint_every: steps between checkpoint writes (0: never write).

    Returns:
        ``(model, plan, history)``: the same model object, pruned; the applied Plan; a dict with ``step``,
        ``loss``, ``probe_loss`` lists, ``updates`` (every mask update: ΔΨ, κ goal, units, kept params),
        ``params_before``, ``params_after``, ``target_params``, ``tolerance``, ``keep_ratios``.
    """
    from tqdm.auto import tqdm

    from .finetune import DEFAULT_ALPHA, distillation_loss

    schedule = schedule or Schedule.for_steps(steps)
    if checkpoint_every < 0 or (checkpoint_every and checkpoint is None):
        raise ValueError(f"checkpoint_every must be >= 0 and needs a checkpoint path, got {checkpoint_every}")
    if schedule.final > steps:
        raise ValueError(f"the schedule's final update is after step {schedule.final}, but only {steps} steps run")
    dap = DAP(model, target, schedule, **(dap_kwargs or {}))
    p0 = next(model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() > 1 and "token" not in n and "pos_embed" not in n]
    ids = {id(p) for p in decay}
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": [p for p in model.parameters() if id(p) not in ids], "weight_decay": 0.0}]
    if dap.train_gates:
        groups.append({"params": dap.gate_parameters(), "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=lr)
    alpha = DEFAULT_ALPHA if distill_alpha is None else distill_alpha
    if teacher is not None:
        teacher.eval()
    history = dict(step=[], loss=[], probe_loss=[], params_before=dap.total_params, target_params=dap.target_params,
                   tolerance=dap.tolerance)
    start = _load_checkpoint(checkpoint, model, opt, dap, history) if checkpoint and os.path.exists(checkpoint) else 0
    model.train(not eval_mode)
    batches = itertools.chain.from_iterable(itertools.repeat(train_loader))
    for step, (x, y) in tqdm(zip(range(start, steps), batches, strict=False), initial=start, total=steps,
                             disable=not progress, desc="dap"):
        x, y = x.to(p0.device, p0.dtype), y.to(p0.device)
        with torch.autocast(p0.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            with torch.no_grad():
                t_logits = teacher(x) if teacher is not None else None
            loss = distillation_loss(model(x).float(), y, t_logits, alpha)
            probe_loss = dap.loss(y)
        opt.zero_grad(set_to_none=True)
        (loss + probe_loss).backward()
        opt.step()
        dap.step()
        if step % log_every == 0 or step == steps - 1:
            history["step"].append(step)
            history["loss"].append(loss.item())
            history["probe_loss"].append(probe_loss.item())
        if checkpoint_every and (step + 1) % checkpoint_every == 0:
            tmp = f"{os.fspath(checkpoint)}.tmp"
            cuda = p0.device.type == "cuda"
            torch.save(dict(step=step + 1, model=model.state_dict(), optimizer=opt.state_dict(), dap=dap.state_dict(),
                            log={k: history[k] for k in _LOGGED}, rng=torch.get_rng_state(),
                            cuda_rng=torch.cuda.get_rng_state(p0.device) if cuda else None), tmp)
            os.replace(tmp, checkpoint)
    history["keep_ratios"] = dap.keep_ratios()
    plan = dap.finalize(opt)
    history["updates"] = dap.history
    history["params_after"] = sum(p.numel() for p in model.parameters())
    model.eval()
    return model, plan, history


_LOGGED = ("step", "loss", "probe_loss")


def _load_checkpoint(path, model: nn.Module, opt: torch.optim.Optimizer, dap: DAP, history: dict) -> int:
    """Restore a ``finetune_dap`` checkpoint into the run's objects; returns the step to continue from."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling / zip errors of a damaged or foreign file
        raise CheckpointError(f"cannot read DAP checkpoint {path}: {e}") from e
    if not isinstance(ck, dict) or set(ck) != {"step", "model", "optimizer", "dap", "log", "rng", "cuda_rng"}:
        raise CheckpointError(f"{path} is not a finetune_dap checkpoint")
    dap.load_state_dict(ck["dap"])  # first: checks the architecture and the DAP arguments
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    history.update({k: list(ck["log"][k]) for k in _LOGGED})
    torch.set_rng_state(ck["rng"])
    dev = dap.gate.device
    if ck["cuda_rng"] is not None and dev.type == "cuda":
        torch.cuda.set_rng_state(ck["cuda_rng"], dev)
    return ck["step"]


__all__ = ["DAP", "FAITHFUL", "STATE_VERSION", "Schedule", "finetune_dap", "keep_ratio_goal", "normalise_bpi",
           "project_to_budget", "round_to_budget", "soft_clamp", "soft_mask"]
