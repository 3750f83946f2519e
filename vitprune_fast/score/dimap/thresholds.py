"""Module-wise thresholds: remove exactly the ``floor(rho * n)`` lowest scores of each pool, and ratio searches."""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from ...errors import PlanError


def check_ratio(rho: float, what: str = "ratio") -> float:
    try:
        rho = float(rho)
    except (TypeError, ValueError) as e:
        raise PlanError(f"{what} must be a number in [0, 1], got {rho!r}") from e
    if not 0.0 <= rho <= 1.0 or math.isnan(rho):
        raise PlanError(f"{what} must be in [0, 1], got {rho}")
    return rho


_SELECT_VIEW = {torch.float32: (torch.int32, 16), torch.float64: (torch.int64, 48)}  # int view, shift to 15 bits


def _select(tensors: list[torch.Tensor], k: int) -> tuple[torch.Tensor, int, int]:
    """``(value, n_less, n_equal)``: the ``k``-th smallest value (1-based) over ``tensors`` and how many values are
    strictly smaller than / equal to it. Histogram select, see :func:`kth_smallest`."""
    pool = torch.cat([t.reshape(-1) for t in tensors])  # [n]; a handful of large ops beats many per-layer ones
    before = 0
    if pool.dtype in _SELECT_VIEW:
        as_int, shift = _SELECT_VIEW[pool.dtype]
        # bucket = top 15 bits below the sign of the IEEE pattern: ordered value ranges for non-negative floats;
        # negatives (and -0.0) fall into bucket 0, below every positive bucket, so the ranges stay ordered
        bucket = (pool.view(as_int) >> shift).clamp_min_(0)  # [n]
        cum = torch.cumsum(torch.bincount(bucket, minlength=1 << 15), 0)  # [2**15]
        b = int(torch.searchsorted(cum, torch.tensor([k], device=cum.device)))  # first bucket with cum >= k
        before = int(cum[b - 1]) if b > 0 else 0
        pool = pool[bucket == b]  # the candidates: values of bucket b only
    value = torch.kthvalue(pool, k - before).values
    return value, before + int(torch.count_nonzero(pool < value)), int(torch.count_nonzero(pool == value))


def kth_smallest(tensors: list[torch.Tensor], k: int) -> torch.Tensor:
    """The ``k``-th smallest value (1-based) over several tensors, without sorting them.

    Histogram select: one pass counts values per bucket of the float bit pattern (``torch.bincount`` over
    2**15 ordered buckets), the bucket holding rank ``k`` is found from the cumulative counts, and only that
    bucket's values go to a final ``torch.kthvalue``. Several times faster than ``kthvalue`` of the whole pool on
    CPU. Dtypes other than float32/64 use ``kthvalue`` of the whole pool.
    """
    return _select(tensors, k)[0]


def threshold_masks(scores: list[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """Keep-masks pruning exactly ``floor(rho * n)`` of the ``n`` pooled scores: the lowest ones.

    Everything below the k-th smallest score goes; ties at it are pruned in pool order (layer by layer, then
    flat index) until exactly ``k`` are gone, so the count does not depend on how float ties fall.
    """
    k = math.floor(rho * sum(t.numel() for t in scores))
    if k <= 0:
        return [torch.ones_like(t, dtype=torch.bool) for t in scores]
    tau, n_less, n_equal = _select(scores, k)
    masks = [t > tau for t in scores]
    spare = n_less + n_equal - k  # tied values at tau that must stay
    if spare > 0:
        budget = k - n_less  # tied values to prune, first in pool order
        for t, m in zip(scores, masks, strict=True):
            tied = torch.nonzero((t == tau).reshape(-1)).squeeze(1)
            m.reshape(-1)[tied[budget:]] = True
            budget = max(0, budget - tied.numel())
    return masks


def pools_for(names_by_module: Mapping[str, list[str]], mode: str) -> dict[str, list[str]]:
    """Threshold pools: DIMAP's modules, one network-wide pool, or one pool per layer."""
    if mode == "module":
        return {m: list(v) for m, v in names_by_module.items() if v}
    flat = [n for v in names_by_module.values() for n in v]
    if mode == "model":
        return {"model": flat}
    return {n: [n] for n in flat}


def ratio_per_pool(ratio: float | Mapping[str, float], pools: Mapping[str, list[str]], mode: str) -> dict[str, float]:
    if isinstance(ratio, Mapping):
        if mode != "module":
            raise PlanError("a per-module ratio dict is only meaningful with mode='module'")
        unknown = set(ratio) - set(pools)
        missing = set(pools) - set(ratio)
        if unknown or missing:
            raise PlanError(f"ratio dict needs exactly the keys {sorted(pools)}; unknown {unknown}, "
                            f"missing {missing}")
        return {p: check_ratio(ratio[p], f"ratio[{p!r}]") for p in pools}
    rho = check_ratio(ratio)
    return dict.fromkeys(pools, rho)


def masks_at(scores: Mapping[str, torch.Tensor], pools: Mapping[str, list[str]], rho: Mapping[str, float]):
    masks: dict[str, torch.Tensor] = {}
    for p, names in pools.items():
        masks.update(zip(names, threshold_masks([scores[n] for n in names], rho[p]), strict=True))
    return masks



class SortedPools:
    """Sorted scores per pool and per layer, so ``rho -> kept count per layer`` is O(layers * log n).

    Used only by the FLOPs bisection, which evaluates many ratios; a single ratio uses the histogram select.
    """

    def __init__(self, scores: Mapping[str, torch.Tensor], pools: Mapping[str, list[str]]):
        self.pools = pools
        self.layer = {n: torch.sort(scores[n].reshape(-1)).values for names in pools.values() for n in names}
        self.pool = {p: (self.layer[v[0]] if len(v) == 1 else torch.sort(torch.cat([self.layer[n] for n in v])).values)
                     for p, v in pools.items()}

    def kept(self, rho: float) -> dict[str, int]:
        """Kept weights per layer at ratio ``rho``, tie-breaking exactly as :func:`_threshold_masks`."""
        out = {}
        for p, names in self.pools.items():
            pool = self.pool[p]
            k = math.floor(rho * pool.numel())
            if k <= 0:
                out.update({n: self.layer[n].numel() for n in names})
                continue
            tau = pool[k - 1:k]
            less = {n: int(torch.searchsorted(self.layer[n], tau)) for n in names}
            budget = k - sum(less.values())  # ties at tau to prune, first in pool order
            for n in names:
                tied = int(torch.searchsorted(self.layer[n], tau, right=True)) - less[n]
                take = min(budget, tied)
                budget -= take
                out[n] = self.layer[n].numel() - less[n] - take
        return out


def bisect_ratio(frac_at: Callable[[float], float], target: float, iters: int = 48) -> float:
    """Smallest ``rho`` in [0, 1] (to 2**-iters) with ``frac_at(rho) <= target``; ``frac_at`` is non-increasing."""
    if frac_at(0.0) <= target:
        return 0.0
    floor = frac_at(1.0)
    if floor > target:
        raise PlanError(f"FLOPs target {target:.4f} is unreachable: pruning everything prunable keeps {floor:.4f}")
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if frac_at(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def check_flops_target(flops: float) -> float:
    try:
        flops = float(flops)
    except (TypeError, ValueError) as e:
        raise PlanError(f"flops must be a fraction in (0, 1], got {flops!r}") from e
    if not 0.0 < flops <= 1.0:
        raise PlanError(f"flops must be the fraction of dense FLOPs to keep, in (0, 1]; got {flops}")
    return flops


