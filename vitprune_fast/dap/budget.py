"""κ allocation, pure maths (README, 'DAP', "κ allocation"): ΔΨ -> per-block keep ratios under a parameter budget."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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
    """One κ-goal update of the reference (README, 'DAP', "κ allocation").

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
