"""The DAP pruner: gates and feature capture hooked into the model, ΔΨ and Taylor scores, mask updates, the Plan.

See the package docstring (:mod:`vitprune_fast.dap`) for the method and the choices made.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..arch import BlockRef, adapter_for
from ..errors import CallOrderError, CheckpointError, ConfigError, InputError
from ..plan import Plan, check_whole_heads
from ..prune import prune_
from .budget import keep_ratio_goal, round_to_budget, soft_mask
from .config import DAPConfig
from .probes import BatchedProbes, LoopedProbes, probe_ce
from .schedule import Schedule
from .state import (
    STATE_KEYS,
    STATE_VERSION,
    contiguous,
    module_state_problems,
    optimizer_state_problems,
    signature_diff,
    tensor_problems,
)


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
    frozen: bool = False  # never pruned (an attention tied to the residual): gate fixed at 1, no parameters

    @property
    def sl(self) -> slice:
        return slice(self.offset, self.offset + self.n)


@dataclass
class _Stage:
    """Consecutive transformer blocks with one width and token grid: one stack of probes."""

    blocks: list[BlockRef]
    first: int  # index of its first DAP block
    prefix: int
    has_cls: bool
    grid: tuple[int, int]
    dim: int
    # probe pair of each of its DAP blocks, in order: block li's attentions read pair 2 li, its MLPs 2 li + 1 (a block
    # running several attentions / MLPs side by side gives each the ΔΨ of its kind)
    slots: torch.Tensor | None = None


class DAP:
    """Depth-aware pruning during fine-tuning (see the package docstring for the choices).

    DAP works through forward hooks on the model (feature capture, gates); nothing else of the model changes
    until :meth:`finalize`. Copy a teacher *before* creating the DAP: ``copy.deepcopy`` copies hooks along.

    Args:
        model: a model a registered adapter supports (timm ViT/DeiT/DeiT-distilled, Swin), in training.
        target: fraction of the model's parameters to remove (the reference's prune rate p).
        schedule: when to score / ramp / sharpen (:class:`Schedule`); default ``Schedule.for_steps(1000)``.
        num_classes: probe classes (default ``model.num_classes``).
        channels_last: probe convolutions in channels-last layout (a memory layout: same results).
        process_group: the ranks to agree with under ``torch.distributed`` (default: every rank when a process group
            is initialized). Every rank then makes the same decisions from global statistics: the gates' gradient
            (Taylor scores, and training with ``train_gates``), the probes' gradients and ΔΨ are averaged over the
            ranks, so the DAP state is identical on every rank. See the package docstring for DDP.
        **settings: any other :class:`DAPConfig` field (``attn_mode``, ``batched``, ``probe_every``,
            ``**FAITHFUL``, ...).

    Attributes:
        config: the resolved :class:`DAPConfig` (also the saved ``config``).
    """

    def __init__(self, model: nn.Module, target: float = 0.5, schedule: Schedule | None = None, *,
                 num_classes: int | None = None, channels_last: bool = True, process_group=None, **settings):
        p0 = next(model.parameters())
        cfg = self.config = DAPConfig.from_settings(target, schedule, settings).resolved(p0.device, p0.dtype)
        adapter = adapter_for(model)
        self.model = model
        self.space = adapter.describe()  # validates the model (clear error if unsupported)
        check_whole_heads(self.space, cfg.attn_mode)
        k = num_classes if num_classes is not None else adapter.num_classes()
        if not k:
            raise ConfigError("the model has no classifier: pass num_classes for the probes")
        self.num_classes = k

        self.blocks: list[_Block] = []
        self.stages: list[_Stage] = []
        self._gate_modules: list[list[nn.Module]] = []  # per gated block: the Linears its gate multiplies
        for st in adapter.stages():
            if not st.blocks:
                continue
            stage = _Stage(list(st.blocks), len(self.blocks), st.prefix_tokens, st.has_cls, st.grid, st.width)
            slots = []
            for li, ref in enumerate(st.blocks):
                for br in ref.branches():
                    self._add_blocks(adapter, br)
                    slots += [2 * li, 2 * li + 1]
            stage.slots = torch.tensor(slots, device=p0.device)
            self.stages.append(stage)
        nb = len(self.blocks)
        self.sizes = torch.tensor([b.n for b in self.blocks])  # [nb] gate elements
        self.ppm = torch.tensor([b.ppm for b in self.blocks])  # [nb] params per element
        self.full = (self.sizes * self.ppm).double()  # [nb] W_i
        self.total_params = sum(p.numel() for p in model.parameters())
        self.nonblock_params = self.total_params - int(self.full.sum())
        if cfg.block_params_only:
            self.budget = (1 - cfg.target) * float(self.full.sum())
        else:
            self.budget = (1 - cfg.target) * self.total_params - self.nonblock_params
        self.target_params = round(self.nonblock_params + self.budget)
        self.tolerance = int(self.ppm.max()) / 2  # documented rounding tolerance of the final count
        if self.budget < float(self.ppm.sum()):
            raise ConfigError(f"target={cfg.target} leaves {self.budget:.0f} block parameters, fewer than one unit "
                              f"per block ({int(self.ppm.sum())}); DAP does not remove whole blocks")

        # Gates: one flat vector, each block a view (one op for all Taylor scores).
        gate = torch.ones(int(self.sizes.sum()), device=p0.device, dtype=p0.dtype)
        self.gate = nn.Parameter(gate, requires_grad=cfg.train_gates) if cfg.train_gates else gate
        self._gates_on = cfg.train_gates  # default: no gate multiply while all gates are 1 (warm-up)
        self.units = self.sizes.clone()  # [nb] kept units per block (hard masks)
        self._keep = [torch.ones(b.n, dtype=torch.bool) for b in self.blocks]  # hard masks of the last update
        self.goal = torch.ones(nb, dtype=torch.float64)  # κ goal of the last update

        probe_cls = BatchedProbes if cfg.batched else LoopedProbes
        self.probes = nn.ModuleList(
            probe_cls(2 * len(s.blocks), s.dim, k, s.has_cls, s.prefix, s.grid, channels_last=channels_last,
                      device=p0.device, dtype=cfg.probe_dtype) for s in self.stages)
        decay, no_decay = [], []
        for pr in self.probes:
            d, nd = pr.weight_decay_params()
            decay += d
            no_decay += nd
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.probe_weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=cfg.probe_lr)

        self.t = 0  # dap.step() calls so far
        self.history: list[dict] = []
        self._ema: tuple[torch.Tensor, torch.Tensor] | None = None
        self._reset_accumulators()
        self._feats: list[list[torch.Tensor | None]] = [[None] * (2 * len(s.blocks) + 1) for s in self.stages]
        self._probe_pending = False
        self._step_dpsi = torch.zeros(2, nb, device=p0.device, dtype=torch.float32)  # ΔΨ^c, ΔΨ^p of this step
        self._probe_params = [p for pr in self.probes for p in pr.parameters()]
        self._group = _process_group(process_group)
        if self._group is not None:  # the probes start from rank 0's initialisation, as DDP does for the model
            import torch.distributed as dist

            src = dist.get_global_rank(self._group, 0)
            for t in [*self.probes.parameters(), *self.probes.buffers()]:
                dist.broadcast(t.data, src=src, group=self._group)
        if self._group is not None and cfg.train_gates:  # trained gates: averaged before the optimizer sees them
            self.gate.register_post_accumulate_grad_hook(lambda g: self._average_over_ranks([g.grad]))
        self._hooks = []
        self._install_hooks()
        self._set_gate_grad()

    # -------------------------------------------------------------------------------------- settings
    @property
    def schedule(self) -> Schedule:
        return self.config.schedule

    @property
    def target(self) -> float:
        return self.config.target

    @property
    def attn_mode(self) -> str:
        return self.config.attn_mode

    @property
    def train_gates(self) -> bool:
        return self.config.train_gates

    @property
    def batched(self) -> bool:
        return self.config.batched

    # ------------------------------------------------------------------------------------------ setup
    def _add_blocks(self, adapter, ref: BlockRef) -> None:
        attn, mlp = self.space.groups[ref.attn], self.space.groups[ref.mlp]
        # an attention tied to the residual (its count follows the residual's) or without a called fused qkv
        # Linear to gate is left whole: its gate is frozen at 1 and its parameters count as non-block ones
        frozen = attn.tied_to is not None or ref.taps is not None or ref.qkv_functional
        h, hd = attn.num_heads, attn.head_dim
        per_channel, per_head = adapter.unit_params(attn)  # qkv rows + proj column; Swin bias-table column
        if self.attn_mode == "dims":
            n, ppm = hd, h * per_channel
        else:
            n, ppm = h, hd * per_channel + per_head
        off = int(sum(b.n for b in self.blocks))
        self.blocks.append(_Block(ref.attn, "attn", n, 0 if frozen else ppm, off, h, hd, frozen))
        self.blocks.append(_Block(ref.mlp, "mlp", mlp.size, adapter.unit_params(mlp)[0], off + n))
        self._gate_modules += [[] if frozen else self._qkv_linears(attn), [self.model.get_submodule(ref.fc2)]]

    def _qkv_linears(self, attn) -> list[nn.Module]:
        """The Linears whose output rows make q, k and v of attention group ``attn``: a fused qkv, or one per
        projection (transformers' query / key / value); the gate multiplies each of them."""
        out = []
        for sl in attn.slices:
            path, _, pname = sl.name.rpartition(".")
            mod = self.model.get_submodule(path)
            if pname == "weight" and sl.dim == 0 and isinstance(mod, nn.Linear) and mod not in out:
                out.append(mod)
        return out

    def _install_hooks(self) -> None:
        model = self.model
        for si, stage in enumerate(self.stages):
            feats = self._feats[si]
            for li, ref in enumerate(stage.blocks):
                # the branch inputs: norm1 / norm2 read them in a pre-norm block; a post-norm block's attention
                # reads the block input and its MLP the stream after the attention
                first, second = (ref.path, ref.mlp) if ref.post_norm else (ref.norm1, ref.norm2)
                if li == 0:
                    self._hooks.append(model.get_submodule(first).register_forward_pre_hook(_capture(feats, 0)))
                self._hooks.append(model.get_submodule(second).register_forward_pre_hook(
                    _capture(feats, 2 * li + 1)))
                self._hooks.append(model.get_submodule(ref.path).register_forward_hook(
                    _capture(feats, 2 * li + 2, output=True)))
        for b, mods in zip(self.blocks, self._gate_modules, strict=True):
            for mod in mods:  # none: frozen
                if b.kind == "attn":
                    self._hooks.append(mod.register_forward_hook(self._attn_gate_hook(b)))
                else:
                    self._hooks.append(mod.register_forward_pre_hook(self._mlp_gate_hook(b)))

    def _attn_gate_hook(self, b: _Block):
        def hook(_mod, _args, out):  # out: [..., r * H * hd] laid out as (q|k|v, head, dim): r = 3 fused, 1 separate
            if not self._gates_on:
                return None
            g = self.gate[b.sl]
            r = out.shape[-1] // (b.num_heads * b.head_dim)
            full = g.repeat(r * b.num_heads) if self.attn_mode == "dims" else g.repeat_interleave(b.head_dim).repeat(r)
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
        active = t < self.schedule.final and t % self.config.probe_every == 0
        feats = [list(f) for f in self._feats]
        for f in self._feats:
            f[:] = [None] * len(f)
        dev = self.gate.device
        if not active:
            return torch.zeros((), device=dev)
        if any(m is None for f in feats for m in f):
            raise CallOrderError("DAP.loss needs the features of a forward pass of the model: call it after model(x)")
        target = target.to(dev)
        if self.config.probe_batch is not None:
            feats = [[m[: self.config.probe_batch] for m in f] for f in feats]
            target = target[: self.config.probe_batch]
        total = torch.zeros((), device=dev)
        scoring = self.schedule.scoring(t)
        for stage, probes, maps in zip(self.stages, self.probes, feats, strict=True):
            _check_tokens(maps[0], stage)
            probes.train(self.model.training)
            cls, patch = probes(maps)  # [2, B, nb_s, K] each
            lc = probe_ce(cls, target, self.config.label_smoothing).mean(1)  # [2, nb_s]
            lp = probe_ce(patch, target, self.config.label_smoothing).mean(1)
            total = total + lc.sum() + lp.sum()
            if scoring:  # ΔΨ = L(Ψ(x_in)) − L(Ψ(x_out)); over several ranks: averaged first, in step()
                sl = slice(stage.first, stage.first + len(stage.slots))
                acc = self._step_dpsi if self._group is not None else (self._dcls, self._dpatch)
                acc[0][sl] += (lc[0] - lc[1]).detach()[stage.slots]
                acc[1][sl] += (lp[0] - lp[1]).detach()[stage.slots]
        self._bpi_n += int(scoring)
        self._probe_pending = True
        return total

    def step(self, scaler: torch.amp.GradScaler | None = None) -> None:
        """Call once per optimizer step, after ``optimizer.step()`` and before the next ``zero_grad``.

        Steps the probes' optimizer, accumulates the Taylor scores (m · ∂L/∂m)² of the gates, and runs the mask
        update when the schedule says so. With a GradScaler, call it before ``scaler.update()``.
        """
        t = self.t
        if self._group is not None:  # one collective: probe gradients, this step's ΔΨ and the gates' gradient
            gate_grad = [self.gate.grad] if self.gate.grad is not None and not self.config.train_gates else []
            probe_grads = [p.grad for p in self._probe_params if p.grad is not None] if self._probe_pending else []
            self._average_over_ranks(probe_grads + gate_grad + ([self._step_dpsi] if self._probe_pending else []))
            self._dcls += self._step_dpsi[0]
            self._dpatch += self._step_dpsi[1]
            self._step_dpsi.zero_()
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
            d_cls, d_patch, kept, self.full, self.budget, self._ema, imp_scale=self.config.imp_scale,
            gamma=self.config.gamma, alpha=self.config.alpha, per_param=self.config.per_param_norm,
            max_iter=self.config.projection_iters)
        frozen = torch.tensor([b.frozen for b in self.blocks])
        self.goal[frozen] = 1.0
        rho = self.schedule.ramp(t)
        kappa = 1 - (1 - self.goal) * rho  # [nb] applied keep ratio
        self.units = round_to_budget(kappa * self.sizes, self.sizes, self.ppm, float((kappa * self.full).sum()))
        self.units[frozen] = self.sizes[frozen]
        tau = self.schedule.tau(t + 1)
        taylor = (self._taylor / max(self._taylor_n, 1)).double().cpu()
        masks = [soft_mask(taylor[b.sl], int(k), tau, self.config.mask_center)
                 for b, k in zip(self.blocks, self.units, strict=True)]
        self._keep = [soft_mask(taylor[b.sl], int(k), 0.0) > 0.5 for b, k in zip(self.blocks, self.units, strict=True)]
        with torch.no_grad():
            self.gate.copy_(torch.cat(masks).to(self.gate.dtype))
        self._gates_on = True
        self.history.append(dict(
            step=t, phase=self.schedule.phase(t), rho=rho, tau=tau, dpsi_cls=d_cls.tolist(),
            dpsi_patch=d_patch.tolist(), goal=self.goal.tolist(), units=self.units.tolist(),
            kept_params=self.kept_params()))
        self._reset_accumulators()

    def _average_over_ranks(self, tensors: list[torch.Tensor]) -> None:
        """Replace each tensor by its mean over the ranks, in one all-reduce of a flat buffer."""
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        world = dist.get_world_size(self._group)
        for dtype in dict.fromkeys(t.dtype for t in tensors):  # one flat buffer per dtype (grads, float64 ΔΨ)
            same = [t for t in tensors if t.dtype == dtype]
            flat = _flatten_dense_tensors(same)
            dist.all_reduce(flat, group=self._group)
            flat /= world
            for t, avg in zip(same, _unflatten_dense_tensors(flat, same), strict=True):
                t.copy_(avg)

    # ------------------------------------------------------------------------------------- checkpointing
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
            raise CallOrderError("DAP.state_dict() was called between dap.loss() and dap.step(): save after "
                                 "dap.step()")
        return dict(
            version=STATE_VERSION, config=self.config.to_dict(), model=self._signature(), t=self.t,
            gates_on=self._gates_on,
            gate=self.gate.detach(), keep=torch.cat(self._keep), units=self.units, goal=self.goal,
            ema=None if self._ema is None else torch.stack(self._ema),
            dpsi_cls=self._dcls, dpsi_patch=self._dpatch, bpi_n=self._bpi_n, taylor=self._taylor,
            taylor_n=self._taylor_n, history=copy.deepcopy(self.history),
            probes=contiguous(self.probes.state_dict()), probe_optimizer=contiguous(self.optimizer.state_dict()))

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
        missing, extra = sorted(set(STATE_KEYS) - set(state)), sorted(set(state) - set(STATE_KEYS))
        if missing or extra:
            return [f"missing keys {missing}, unexpected keys {extra}"]
        sig = self._signature()
        if state["model"] != sig:
            return [signature_diff(state["model"], sig)]
        cfg, saved = self.config.to_dict(), state["config"]
        if not isinstance(saved, dict):
            return [f"config: expected a dict, got {type(saved).__name__}"]
        problems = [f"config {k}: saved {saved.get(k, '<missing>')!r}, this DAP has {v!r}" for k, v in cfg.items()
                    if k not in saved or saved[k] != v]
        problems += [f"config {k}: unknown setting" for k in saved if k not in cfg]
        g, nb = self.gate.numel(), len(self.blocks)
        for name, shape, kind in (("gate", (g,), "float"), ("keep", (g,), "bool"), ("units", (nb,), "int"),
                                  ("goal", (nb,), "float"), ("dpsi_cls", (nb,), "float"),
                                  ("dpsi_patch", (nb,), "float"), ("taylor", (g,), "float")):
            problems += tensor_problems(name, state[name], shape, kind)
        if state["ema"] is not None:
            problems += tensor_problems("ema", state["ema"], (2, nb), "float")
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
        problems += module_state_problems("probes", state["probes"], self.probes.state_dict())
        problems += optimizer_state_problems(state["probe_optimizer"], self.optimizer)
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


def _process_group(group):
    """The process group DAP averages over: ``group``, or the default one when initialized with > 1 rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = group if group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _capture(store: list, slot: int, output: bool = False):
    """Hook storing a detached [B, T, C] view of a residual-stream map (Swin [B, H, W, C] is flattened)."""
    def hook(_mod, args, out=None):
        x = out if output else args[0]
        x = x[0] if isinstance(x, tuple) else x  # a transformers Swin layer returns (hidden states, attention)
        store[slot] = x.detach().reshape(x.shape[0], -1, x.shape[-1])

    if output:
        return hook
    return lambda mod, args: hook(mod, args)


def _check_tokens(x: torch.Tensor, stage: _Stage) -> None:
    want = stage.prefix + stage.grid[0] * stage.grid[1]
    if x.shape[1] != want:
        raise InputError(f"DAP probes were built for {stage.grid} patch tokens (+{stage.prefix}), the model "
                         f"produced {x.shape[1]} tokens; run at the model's img_size")
