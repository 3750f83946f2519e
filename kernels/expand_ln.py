"""Candidate expansion fused with the next LayerNorm (UP-ViTs C3 / FFN hidden-unit candidates).

Removing FFN hidden unit ``j`` of block ``b`` changes that block's output by a rank-1 term: the unit's
contribution ``act_j[i, t] * (gamma * W2[:, j])`` disappears. With the full block output ``y`` (shared by all
candidates), ``a[k] = act_{j_k}`` (post-GELU activation of the removed unit, per image and token) and
``w[k] = gamma * W2[:, j_k]`` (the fc2 column times the LayerScale gamma, or just the fc2 column without
LayerScale), candidate ``k``'s residual stream is::

    x[k, i, t, :] = y[i, t, :] - a[k, i, t] * w[k, :]            (sign: removing a unit SUBTRACTS its term)

and the next block needs both ``x`` (the residual) and ``LayerNorm(x)`` (its norm1 input). This kernel writes
both in one pass, candidates stacked candidate-major along the batch: output row ``k * n + i`` is candidate ``k``,
image ``i``. Each program handles a ``[BLOCK_M, BLOCK_D]`` tile of whole rows; ``x`` is formed in fp32 (fp64 for
fp64 inputs), the LayerNorm statistics come from that unrounded ``x``, and both results are rounded once to the
output dtype.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from .layernorm_common import (
    block_d_for,
    check_affine_and_devices,
    contiguous_affine,
    launch_config,
    layer_norm_rows,
    row_tile,
)
from .utils import acc_dtype, device_guard, resolve_backend, tl, triton

__all__ = ["expand_ln", "expand_ln_ref"]


@triton.jit
def _expand_ln_kernel(
    y_ptr,  # [N, D] shared block output rows (N = n * T), unit stride along D
    a_ptr,  # [K * N] coefficient of each output row (a[k, i, t] flattened), contiguous
    w_ptr,  # [K, D] per-candidate direction (gamma * fc2 column), contiguous
    ln_w_ptr,  # [D] LayerNorm weight (unused when HAS_WEIGHT is False)
    ln_b_ptr,  # [D] LayerNorm bias (unused when HAS_BIAS is False)
    x_ptr,  # [K * N, D] out: residual x = y - a * w, contiguous
    z_ptr,  # [K * N, D] out: LayerNorm(x), contiguous
    n_rows_out,  # K * N
    n_rows_shared,  # N: output row r is candidate r // N, shared row r % N
    n_cols,  # D
    stride_y,  # row stride of y, in elements
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    # rows: [BLOCK_M] output rows (int64), cols: [BLOCK_D], inb: [BLOCK_M, BLOCK_D]
    rows, cols, row_ok, col_ok, inb = row_tile(n_rows_out, n_cols, BLOCK_M, BLOCK_D)
    cand = rows // n_rows_shared  # [BLOCK_M] candidate k
    src = rows - cand * n_rows_shared  # [BLOCK_M] row of y

    y = tl.load(y_ptr + src[:, None] * stride_y + cols[None, :], mask=inb, other=0.0).to(acc_ty)
    a = tl.load(a_ptr + rows, mask=row_ok, other=0.0).to(acc_ty)  # [BLOCK_M]
    w = tl.load(w_ptr + cand[:, None] * n_cols + cols[None, :], mask=inb, other=0.0).to(acc_ty)
    # Candidate k drops its unit's contribution: x_k = y - a_k (outer) w_k.
    x = y - a[:, None] * w  # padding lanes: 0 - 0 * 0 = 0
    out_off = rows[:, None] * n_cols + cols[None, :]
    tl.store(x_ptr + out_off, x.to(x_ptr.dtype.element_ty), mask=inb)

    # LayerNorm over all D channels, from the unrounded x.
    z = layer_norm_rows(x, inb, n_cols, ln_w_ptr, ln_b_ptr, cols, col_ok, eps, HAS_WEIGHT, HAS_BIAS)
    tl.store(z_ptr + out_off, z.to(z_ptr.dtype.element_ty), mask=inb)


def _check_inputs(
    y: torch.Tensor,
    a: torch.Tensor,
    w: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> tuple[int, int, int]:
    """Validate the arguments; return ``(K, N, D)`` with ``N`` the number of shared rows of ``y``."""
    for name, t in (("y", y), ("a", a), ("w", w)):
        if not t.is_floating_point():
            raise InputError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if y.dim() < 2:
        raise InputError(f"y must be [n, T, D] (or [n, D]), got {tuple(y.shape)}")
    d = y.shape[-1]
    if d < 1:
        raise InputError("y has no channels (D = 0)")
    if w.dim() != 2 or w.shape[1] != d:
        raise InputError(f"w must be [K, D] with D = {d}, got {tuple(w.shape)}")
    k = w.shape[0]
    if k < 1:
        raise InputError("need at least one candidate (K >= 1)")
    if tuple(a.shape) != (k, *y.shape[:-1]):
        raise InputError(f"a must be [K, *y.shape[:-1]] = {(k, *y.shape[:-1])}, got {tuple(a.shape)}")
    check_affine_and_devices(y, weight, bias, a, w)
    return k, y.numel() // d, d


def _out_shape(y: torch.Tensor, k: int) -> tuple[int, ...]:
    return (k * y.shape[0], *y.shape[1:])


def expand_ln(
    y: torch.Tensor,
    a: torch.Tensor,
    w: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expand a shared block output into ``K`` rank-1-perturbed candidates and LayerNorm them, in one pass.

    ``x[k * n + i, t] = y[i, t] - a[k, i, t] * w[k]`` (removing a unit subtracts its contribution) and
    ``z = F.layer_norm(x, (D,), weight, bias, eps)``.

    Args:
        y: ``[n, T, D]`` block output of the unpruned model (any ``[n, *, D]`` works), shared by all candidates.
        a: ``[K, n, T]`` per-candidate coefficients: the post-activation value of the removed hidden unit.
        w: ``[K, D]`` per-candidate directions: ``gamma * fc2.weight[:, j_k]`` (gamma = LayerScale, or 1).
        weight: optional ``[D]`` weight of the next LayerNorm (the next block's ``norm1``).
        bias: optional ``[D]`` bias of that LayerNorm.
        eps: that LayerNorm's eps (timm ViTs use 1e-6; pass ``norm.eps``).
        backend: ``"auto"`` (the Triton kernel on CUDA tensors, or anywhere under ``TRITON_INTERPRET=1``; else
            the reference), ``"triton"`` or ``"torch"`` (:func:`expand_ln_ref` in the accumulation dtype).

    Returns:
        ``(x, z)``, both ``[K * n, T, D]`` in ``y``'s dtype, candidate-major (rows ``k * n .. k * n + n - 1`` are
        candidate ``k``): the residual stream and its LayerNorm. Computed in fp32 (fp64 for fp64 ``y``).

    Raises:
        KernelUnavailableError: ``backend="triton"`` where the kernel cannot run.
        InputError: on shapes that do not fit (``a`` not ``[K, *y.shape[:-1]]``, ``w`` not ``[K, D]``, LayerNorm
            parameters not ``[D]``), non-float inputs, tensors on different devices, or ``D`` above 16384.
    """
    k, n_shared, d = _check_inputs(y, a, w, weight, bias)
    acc = acc_dtype(y)
    if resolve_backend(backend, y, a, w) == "torch":
        x, z = expand_ln_ref(y, a, w, weight, bias, eps, compute_dtype=acc)
        return x.to(y.dtype), z.to(y.dtype)
    block_d = block_d_for(d)
    out_shape = _out_shape(y, k)
    n_out = k * n_shared
    x = torch.empty((n_out, d), dtype=y.dtype, device=y.device)
    z = torch.empty((n_out, d), dtype=y.dtype, device=y.device)
    if n_out == 0:
        return x.view(out_shape), z.view(out_shape)
    y2 = y.reshape(n_shared, d)
    if y2.stride(1) != 1:
        y2 = y2.contiguous()
    a1 = a.reshape(n_out).contiguous()
    w2 = w.contiguous()
    weight, bias = contiguous_affine(weight, bias)
    grid, meta = launch_config(n_out, block_d, weight, bias, acc)
    with device_guard(y):
        _expand_ln_kernel[grid](
            y2,
            a1,
            w2,
            weight if weight is not None else w2,
            bias if bias is not None else w2,
            x,
            z,
            n_out,
            n_shared,
            d,
            y2.stride(0),
            eps,
            **meta,
        )
    return x.view(out_shape), z.view(out_shape)


def expand_ln_ref(
    y: torch.Tensor,
    a: torch.Tensor,
    w: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch reference for :func:`expand_ln` (broadcast, reshape, ``F.layer_norm``).

    Args:
        y: ``[n, T, D]`` shared block output.
        a: ``[K, n, T]`` coefficients.
        w: ``[K, D]`` directions.
        weight: optional ``[D]`` LayerNorm weight.
        bias: optional ``[D]`` LayerNorm bias.
        eps: LayerNorm eps.
        compute_dtype: dtype of the computation and of the results; ``None`` keeps ``y``'s dtype (what a user
            gets in plain torch at that dtype), ``torch.float64`` gives the high-precision reference.

    Returns:
        ``(x, z)``, both ``[K * n, T, D]`` in ``compute_dtype``.
    """
    k, _, d = _check_inputs(y, a, w, weight, bias)
    dtype = compute_dtype or y.dtype
    w_b = w.to(dtype).view(k, *([1] * (y.dim() - 1)), d)  # [K, 1, 1, D]
    # contiguous like the kernel's output: later reductions (token pooling) then sum in the same order
    x = (y.to(dtype).unsqueeze(0) - a.to(dtype).unsqueeze(-1) * w_b).reshape(_out_shape(y, k)).contiguous()
    wt = weight.to(dtype) if weight is not None else None
    bs = bias.to(dtype) if bias is not None else None
    z = torch.nn.functional.layer_norm(x, (d,), wt, bs, eps)
    return x, z
