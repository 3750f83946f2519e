"""DAP's schedule: warm-up, sparsify (κ ramps to its goal), sharpen (soft masks harden), hard."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


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
            raise ConfigError(f"schedule needs 0 <= start < sparse <= final, got {self.start}, {self.sparse}, "
                             f"{self.final}")
        if self.update_every < 1 or self.tau_max < 0:
            raise ConfigError(f"update_every must be >= 1 and tau_max >= 0, got {self.update_every}, {self.tau_max}")

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
            raise ConfigError(f"a DAP schedule needs at least {sp} steps, got {total}")
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
