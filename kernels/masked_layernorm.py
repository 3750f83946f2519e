"""Masked LayerNorm: LayerNorm over a per-sample subset of channels (UP-ViTs C1 / residual candidates).

A model whose residual channels ``R`` were physically removed normalises every token over the kept channels
only. With a keep-mask ``m`` (1 = kept) this is, per row ``x`` of ``D`` channels::

    cnt  = sum_c m_c
    mean = sum_c m_c x_c / cnt
    var  = sum_c m_c (x_c - mean)^2 / cnt                       (biased, as torch.nn.LayerNorm)
    y_c  = m_c ? (x_c - mean) / sqrt(var + eps) * w_c + b_c : 0

so the kept columns of ``y`` equal ``F.layer_norm(x[..., keep], (cnt,), w[keep], b[keep], eps)`` and the removed
columns are exactly 0. Zeroing the channel instead would change ``mean`` and ``var``.

Rows are grouped by sample: with ``x`` flattened to ``[M, D]`` and ``mask`` of shape ``[S, D]``, row ``r`` uses
mask row ``r // (M // S)`` (for the KL engine: ``S = K`` candidates, ``M // S = n * T`` token rows each).
Each program normalises a ``[BLOCK_M, BLOCK_D]`` tile holding whole rows, statistics in fp32 (fp64 for fp64 x).
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

__all__ = ["masked_layer_norm", "masked_layer_norm_ref"]


@triton.jit
def _masked_layer_norm_kernel(
    x_ptr,  # [M, D] input rows, unit stride along D
    y_ptr,  # [M, D] output, contiguous, same dtype as x
    mask_ptr,  # [S, D] uint8 keep-mask (non-zero = kept), contiguous
    w_ptr,  # [D] LayerNorm weight (unused when HAS_WEIGHT is False)
    b_ptr,  # [D] LayerNorm bias (unused when HAS_BIAS is False)
    n_rows,  # M
    n_cols,  # D
    stride_x,  # row stride of x, in elements
    rows_per_sample,  # M // S: row r uses mask row r // rows_per_sample
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    # rows: [BLOCK_M] int64, cols: [BLOCK_D], inb: [BLOCK_M, BLOCK_D]
    rows, cols, row_ok, col_ok, inb = row_tile(n_rows, n_cols, BLOCK_M, BLOCK_D)

    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=inb, other=0.0).to(acc_ty)
    sample = rows // rows_per_sample  # [BLOCK_M] mask row of each x row
    m = tl.load(mask_ptr + sample[:, None] * n_cols + cols[None, :], mask=inb, other=0)
    keep = (m != 0) & inb

    # Statistics over the kept channels only. A row with no kept channel (or a padding row) has every term
    # masked to 0; cnt is clamped to 1 so it divides 0 by 1 and the row comes out all zeros.
    cnt = tl.maximum(tl.sum(keep.to(acc_ty), axis=1), 1.0)  # [BLOCK_M]
    x = tl.where(keep, x, 0.0)  # layer_norm_rows sums x as is
    y = layer_norm_rows(x, keep, cnt, w_ptr, b_ptr, cols, col_ok, eps, HAS_WEIGHT, HAS_BIAS)
    y = tl.where(keep, y, 0.0)  # removed channels are exactly 0
    tl.store(y_ptr + rows[:, None] * n_cols + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=inb)


def _check_inputs(
    x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> tuple[int, int, int]:
    """Validate the arguments; return ``(M, D, S)``."""
    if x.dim() < 1 or not x.is_floating_point():
        raise InputError(f"x must be a floating-point tensor [..., D], got {x.dtype} {tuple(x.shape)}")
    d = x.shape[-1]
    if d < 1:
        raise InputError("x has no channels (D = 0)")
    if mask.dim() not in (1, 2) or mask.shape[-1] != d:
        raise InputError(f"mask must be [D] or [S, D] with D = {d}, got {tuple(mask.shape)}")
    if mask.is_floating_point() or mask.is_complex():
        raise InputError(f"mask must be bool or an integer dtype (non-zero = kept), got {mask.dtype}")
    s = 1 if mask.dim() == 1 else mask.shape[0]
    m = x.numel() // d
    if s < 1 or m % s != 0:
        raise InputError(f"x has {m} rows, not a multiple of the {s} mask rows (rows are grouped by sample)")
    check_affine_and_devices(x, weight, bias, mask)
    return m, d, s


def masked_layer_norm(
    x: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    backend: str = "auto",
) -> torch.Tensor:
    """LayerNorm over the kept channels of each sample; removed channels come out exactly 0.

    Reproduces the LayerNorm of a model whose masked-out residual channels were physically removed:
    ``y[r, keep] == F.layer_norm(x[r, keep], (cnt,), weight[keep], bias[keep], eps)`` and ``y[r, ~keep] == 0``,
    where ``keep = mask[r // rows_per_sample]``. A mask row with no kept channel gives all-zero rows.

    Args:
        x: ``[..., D]`` input (fp32 / bf16 / fp16 / fp64); leading dims are flattened to ``M`` rows.
        mask: ``[S, D]`` (or ``[D]``, meaning ``S = 1``) bool / integer keep-mask, non-zero = kept. ``M`` must be
            a multiple of ``S``; the ``M // S`` consecutive rows of sample ``s`` use ``mask[s]`` (e.g. ``x`` as
            ``[K * n * T, D]`` with one mask row per candidate).
        weight: optional ``[D]`` affine weight (LayerNorm ``weight``), applied to kept channels.
        bias: optional ``[D]`` affine bias.
        eps: added to the variance, as in ``torch.nn.LayerNorm`` (timm ViTs use 1e-6; pass ``norm.eps``).
        backend: ``"auto"`` (the Triton kernel on CUDA tensors, or anywhere under ``TRITON_INTERPRET=1``; else
            the reference), ``"triton"`` or ``"torch"`` (:func:`masked_layer_norm_ref` in the accumulation dtype).

    Returns:
        Tensor with the shape and dtype of ``x``. Statistics are accumulated in fp32 (fp64 for fp64 ``x``).

    Raises:
        KernelUnavailableError: ``backend="triton"`` where the kernel cannot run.
        InputError: on a mask / weight / bias shape that does not match ``x``, a float mask, a row count that is
            not a multiple of the mask rows, tensors on different devices, or ``D`` above 16384.
    """
    m_rows, d, s = _check_inputs(x, mask, weight, bias)
    acc = acc_dtype(x)
    if resolve_backend(backend, x, mask) == "torch":
        return masked_layer_norm_ref(x, mask, weight, bias, eps, compute_dtype=acc).to(x.dtype)
    block_d = block_d_for(d)
    x2 = x.reshape(m_rows, d)
    if m_rows > 0 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    y = torch.empty((m_rows, d), dtype=x.dtype, device=x.device)
    if m_rows == 0:
        return y.view(x.shape)
    # Non-zero = kept; bool is reinterpreted in place, other integer masks are compared (no wrap-around at 256).
    mask_u8 = mask.view(torch.uint8) if mask.dtype == torch.bool else (mask != 0).to(torch.uint8)
    mask_u8 = mask_u8.reshape(s, d).contiguous()
    weight, bias = contiguous_affine(weight, bias)
    grid, meta = launch_config(m_rows, block_d, weight, bias, acc)
    with device_guard(x):
        _masked_layer_norm_kernel[grid](
            x2,
            y,
            mask_u8,
            weight if weight is not None else x2,
            bias if bias is not None else x2,
            m_rows,
            d,
            x2.stride(0),
            m_rows // s,
            eps,
            **meta,
        )
    return y.view(x.shape)


def masked_layer_norm_ref(
    x: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Plain-torch reference for :func:`masked_layer_norm` (same arguments and semantics).

    Args:
        x: ``[..., D]`` input.
        mask: ``[S, D]`` or ``[D]`` keep-mask.
        weight: optional ``[D]`` weight.
        bias: optional ``[D]`` bias.
        eps: variance epsilon.
        compute_dtype: dtype of the computation and of the result; ``None`` keeps ``x.dtype`` (what a user gets in
            plain torch at that dtype), ``torch.float64`` gives the high-precision reference.

    Returns:
        Tensor of the shape of ``x`` in ``compute_dtype``.
    """
    m_rows, d, s = _check_inputs(x, mask, weight, bias)
    dtype = compute_dtype or x.dtype
    xs = x.to(dtype).reshape(s, m_rows // s, d)  # [S, rows_per_sample, D]
    keep = (mask.reshape(s, 1, d) != 0).to(dtype)
    cnt = keep.sum(dim=-1, keepdim=True)
    mean = (xs * keep).sum(dim=-1, keepdim=True) / cnt
    xc = (xs - mean) * keep
    var = (xc * xc).sum(dim=-1, keepdim=True) / cnt
    y = xc * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(dtype)
    if bias is not None:
        y = y + bias.to(dtype)
    y = torch.where(keep.bool(), y, torch.zeros((), dtype=dtype, device=x.device))
    return y.reshape(x.shape)
