"""DAP's settings: one frozen dataclass, validated once, saved as the ``config`` of ``DAP.state_dict``."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from .schedule import Schedule

ATTN_MODES = ("dims", "heads")
MASK_CENTERS = ("midpoint", "reference")
#: Reference behaviour for the quirks the README lists (section 'DAP', "Reference quirks"); pass as
#: ``DAP(model, **FAITHFUL)``.
FAITHFUL = dict(train_gates=True, mask_center="reference", projection_iters=20)


@dataclass(frozen=True)
class DAPConfig:
    """Every setting that changes what DAP computes (a saved state only loads into a DAP with the same ones).

    Attributes:
        target: fraction of the model's parameters to remove (the reference's prune rate p), in [0, 1).
        schedule: when to score / ramp / sharpen (:class:`Schedule`).
        attn_mode: ``"dims"`` (uniform head_dim per block, all heads kept; the reference) or ``"heads"``.
        mask_center: soft-mask centre, ``"midpoint"`` or ``"reference"`` (see the package docstring).
        batched: stacked probes (one grouped conv + batched matmuls per stage) or the one-at-a-time reference
            (same numbers). None: stacked on CUDA, one at a time elsewhere (on CPU oneDNN's dense convolutions
            beat its grouped ones; ``bench/dap.py``). Resolved by ``DAP`` for its device.
        probe_dtype: probe parameter dtype; None: the model's (resolved by ``DAP``).
        label_smoothing: of the probe cross-entropy for index targets (soft targets are used as given).
        probe_lr, probe_weight_decay: the probes' own AdamW (the reference: 5e-4, 0.05 on weights only).
        imp_scale, gamma, alpha: S_imp, EMA weight, class/patch mix (reference 10, 0.2, 0.5).
        per_param_norm: divide ΔΨ scores by the kept parameter count (the reference does).
        block_params_only: the budget is over block parameters only (reference flag).
        probe_every, probe_batch: speed-ups (off by default; deviations from the reference).
        train_gates, projection_iters: see ``FAITHFUL``.
    """

    target: float = 0.5
    schedule: Schedule = field(default_factory=lambda: Schedule.for_steps(1000))
    attn_mode: str = "dims"
    mask_center: str = "midpoint"
    batched: bool | None = None
    probe_dtype: torch.dtype | None = None
    label_smoothing: float = 0.0
    probe_lr: float = 5e-4
    probe_weight_decay: float = 0.05
    imp_scale: float = 10.0
    gamma: float = 0.2
    alpha: float = 0.5
    per_param_norm: bool = True
    block_params_only: bool = False
    probe_every: int = 1
    probe_batch: int | None = None
    train_gates: bool = False
    projection_iters: int | None = None

    def __post_init__(self):
        if self.attn_mode not in ATTN_MODES:
            raise ConfigError(f"attn_mode must be one of {ATTN_MODES}, got {self.attn_mode!r}")
        if self.mask_center not in MASK_CENTERS:
            raise ConfigError(f"mask_center must be one of {MASK_CENTERS}, got {self.mask_center!r}")
        if not 0.0 <= self.target < 1.0:
            raise ConfigError(f"target (fraction of parameters to remove) must be in [0, 1), got {self.target}")
        if self.probe_every < 1 or (self.probe_batch is not None and self.probe_batch < 1):
            raise ConfigError("probe_every and probe_batch must be >= 1")
        if not isinstance(self.schedule, Schedule):
            raise ConfigError(f"schedule must be a vitprune_fast.dap.Schedule, got {type(self.schedule).__name__}")
        object.__setattr__(self, "target", float(self.target))

    @classmethod
    def from_settings(cls, target: float, schedule: Schedule | None, settings: dict) -> DAPConfig:
        """``DAPConfig(target, schedule, **settings)`` with a clear error for an unknown setting name."""
        names = {f.name for f in dataclasses.fields(cls)} - {"target", "schedule"}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise ConfigError(f"unknown DAP settings {unknown}; valid: {sorted(names)}")
        return cls(target=target, schedule=schedule or Schedule.for_steps(1000), **settings)

    def resolved(self, device: torch.device, dtype: torch.dtype) -> DAPConfig:
        """This config with ``batched`` and ``probe_dtype`` decided for a model on ``device`` in ``dtype``."""
        return dataclasses.replace(self, batched=device.type == "cuda" if self.batched is None else bool(self.batched),
                                   probe_dtype=self.probe_dtype or dtype)

    def to_dict(self) -> dict:
        """Plain values (the ``config`` entry of ``DAP.state_dict``)."""
        d = dataclasses.asdict(self)  # the schedule becomes a dict too
        d["probe_dtype"] = str(self.probe_dtype)
        return d
