"""Fused log-softmax + KL(q || p) per pruning candidate (UP-ViTs channel score).

For candidate ``k`` with student logits ``s_k`` (``n`` rows) and teacher logits ``t`` (the same ``n`` rows), the
UP-ViTs score is summed over images, temperature 1, no mean::

    score[k] = sum_i sum_c softmax(t_i)_c * (log_softmax(t_i)_c - log_softmax(s_{k,i})_c)

One program handles one student row. It streams the class dimension in blocks and keeps three online
(rescaled) accumulators per row, so teacher and student are read exactly once::

    m_t, Z_t = running max and sum of exp(t - m_t)          ->  lse(t) = m_t + log Z_t
    m_s, Z_s = the same for s                               ->  lse(s) = m_s + log Z_s
    A        = sum exp(t - m_t) * (t - s), rescaled with Z_t ->  KL = A / Z_t + (m_s - m_t) + log(Z_s / Z_t)

(``sum_c q_c = 1`` turns ``sum_c q_c ((t_c - lse t) - (s_c - lse s))`` into the last line.) The per-row values are
written in the accumulation dtype and summed per candidate by a deterministic ``view(K, n).sum(1)``; no atomics.

Because ``log_softmax`` is idempotent, precomputed teacher *log-probabilities* can be passed in place of the
teacher logits with the same result.
"""

from __future__ import annotations

import operator

import torch

from ..errors import ConfigError, InputError
from .utils import acc_dtype, device_guard, resolve_backend, tl, triton

__all__ = ["kl_per_candidate", "kl_div_ref"]

# Largest class block held in registers per program; longer rows are streamed in blocks of this size.
_MAX_BLOCK_C = 4096


@triton.jit
def _kl_div_rows_kernel(
    t_ptr,  # [n, C] teacher logits (or log-probs), any float dtype, unit stride along C
    s_ptr,  # [K * n, C] student logits, candidate-major (row k * n + i is candidate k, image i)
    out_ptr,  # [K * n] per-row KL(q || p); its dtype (fp32 / fp64) is the accumulation dtype
    n_images,  # n: rows per candidate (student row r reads teacher row r % n)
    n_classes,  # C
    stride_t,  # row stride of t, in elements
    stride_s,  # row stride of s, in elements
    BLOCK_C: tl.constexpr,
    NUM_BLOCKS: tl.constexpr,  # cdiv(C, BLOCK_C); a compile-time trip count (1 for C <= 4096)
):
    pid = tl.program_id(0).to(tl.int64)  # student row
    acc_ty = out_ptr.dtype.element_ty
    t_row = t_ptr + (pid % n_images) * stride_t
    s_row = s_ptr + pid * stride_s
    offs = tl.arange(0, BLOCK_C)

    # First block peeled off so the loop-carried scalars start with the accumulation dtype and a finite max.
    # Masked lanes load 0 (so t - s = 0 there, never -inf - -inf) and are set to -inf for max / exp.
    mask = offs < n_classes
    t = tl.load(t_row + offs, mask=mask, other=0.0).to(acc_ty)
    s = tl.load(s_row + offs, mask=mask, other=0.0).to(acc_ty)
    t_inf = tl.where(mask, t, float("-inf"))
    s_inf = tl.where(mask, s, float("-inf"))
    m_t = tl.max(t_inf, axis=0)
    m_s = tl.max(s_inf, axis=0)
    e_t = tl.exp(t_inf - m_t)  # masked lanes: exp(-inf) = 0
    z_t = tl.sum(e_t, axis=0)
    z_s = tl.sum(tl.exp(s_inf - m_s), axis=0)
    a = tl.sum(e_t * (t - s), axis=0)  # A = sum_c exp(t_c - m_t) * (t_c - s_c)

    for start in range(BLOCK_C, NUM_BLOCKS * BLOCK_C, BLOCK_C):
        cols = start + offs
        mask = cols < n_classes
        t = tl.load(t_row + cols, mask=mask, other=0.0).to(acc_ty)
        s = tl.load(s_row + cols, mask=mask, other=0.0).to(acc_ty)
        t_inf = tl.where(mask, t, float("-inf"))
        s_inf = tl.where(mask, s, float("-inf"))
        # Online log-sum-exp: rescale the running sums to the new maximum.
        m_t_new = tl.maximum(m_t, tl.max(t_inf, axis=0))
        m_s_new = tl.maximum(m_s, tl.max(s_inf, axis=0))
        alpha_t = tl.exp(m_t - m_t_new)
        e_t = tl.exp(t_inf - m_t_new)
        z_t = z_t * alpha_t + tl.sum(e_t, axis=0)
        a = a * alpha_t + tl.sum(e_t * (t - s), axis=0)
        z_s = z_s * tl.exp(m_s - m_s_new) + tl.sum(tl.exp(s_inf - m_s_new), axis=0)
        m_t = m_t_new
        m_s = m_s_new

    # KL(q || p) = sum_c q_c (t_c - s_c) - lse(t) + lse(s),  q = softmax(t),  lse(x) = m_x + log Z_x.
    # Grouped as (m_s - m_t) + log(Z_s / Z_t) so no large lse is formed and then cancelled.
    kl = a / z_t + (m_s - m_t) + tl.log(z_s / z_t)
    tl.store(out_ptr + pid, kl)


def _check_inputs(teacher_logits: torch.Tensor, student_logits: torch.Tensor, num_candidates: int) -> tuple[int, int]:
    """Validate shapes, dtypes and devices; return ``(K, n)`` (candidates, images per candidate)."""
    try:
        k = operator.index(num_candidates)  # int, numpy int, 0-d integer tensor
    except TypeError:
        k = None
    if k is None or isinstance(num_candidates, bool) or k < 1:
        raise ConfigError(f"num_candidates must be a positive int, got {num_candidates!r}")
    if teacher_logits.dim() != 2 or student_logits.dim() != 2:
        raise InputError(
            "expected teacher_logits [n, C] and student_logits [K*n, C], got "
            f"{tuple(teacher_logits.shape)} and {tuple(student_logits.shape)}"
        )
    n, n_classes = teacher_logits.shape
    if n_classes < 1:
        raise InputError("need at least one class (C >= 1)")
    if student_logits.shape[1] != n_classes:
        raise InputError(f"class counts differ: teacher C={n_classes}, student C={student_logits.shape[1]}")
    if student_logits.shape[0] != k * n:
        raise InputError(
            f"student_logits has {student_logits.shape[0]} rows; expected num_candidates * n = "
            f"{k} * {n} = {k * n} (candidate-major stacking)"
        )
    for name, x in (("teacher_logits", teacher_logits), ("student_logits", student_logits)):
        if not x.is_floating_point():
            raise InputError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if teacher_logits.device != student_logits.device:
        raise InputError(f"tensors on different devices: {teacher_logits.device} vs {student_logits.device}")
    return k, n


def kl_per_candidate(teacher_logits: torch.Tensor, student_logits: torch.Tensor, num_candidates: int,
                     backend: str = "auto", accumulate: torch.dtype | None = None) -> torch.Tensor:
    """Per-candidate KL(q || p) summed over images, fused with both log-softmaxes.

    ``score[k] = sum_i sum_c softmax(t_i)_c * (log_softmax(t_i)_c - log_softmax(s_{k*n+i})_c)``: temperature 1,
    summed (not averaged) over the ``n`` images, as in UP-ViTs. Larger means the candidate matters more.

    Args:
        teacher_logits: ``[n, C]`` logits of the unpruned model (teacher log-probabilities work too, since
            log-softmax is idempotent). fp32 / bf16 / fp16 / fp64.
        student_logits: ``[K * n, C]`` logits of the ``K`` pruned candidates stacked candidate-major: rows
            ``k * n .. k * n + n - 1`` belong to candidate ``k`` and row ``k * n + i`` pairs with teacher row ``i``.
            May have a different float dtype than the teacher.
        num_candidates: ``K`` (>= 1).
        backend: ``"auto"`` (the Triton kernel on CUDA tensors, or anywhere under ``TRITON_INTERPRET=1``; else
            the reference), ``"triton"`` or ``"torch"`` (:func:`kl_div_ref` in the accumulation dtype).
        accumulate: the accumulation (and result) dtype; default float32, float64 when either input is float64.
            A removed channel's KL is a second-order difference of first-order terms: accumulated in float32 from
            float32 logits over ~1000 classes its rounding noise reaches tens of percent of the small KLs of an
            untrained model (``torch.float64`` removes it; the UP-ViTs engines pass it).

    Returns:
        ``[K]`` scores in the accumulation dtype.

    Raises:
        InputError: on mismatched shapes (``student_logits.shape[0] != K * n`` or different ``C``), non-float
            inputs or tensors on different devices.
        ConfigError: ``num_candidates < 1`` or an unknown backend.
        KernelUnavailableError: ``backend="triton"`` where the kernel cannot run.
    """
    k, n = _check_inputs(teacher_logits, student_logits, num_candidates)
    acc = accumulate or acc_dtype(teacher_logits, student_logits)
    if n == 0:
        return torch.zeros(k, dtype=acc, device=student_logits.device)
    if resolve_backend(backend, teacher_logits, student_logits) == "torch":
        return kl_div_ref(teacher_logits, student_logits, k, compute_dtype=acc)

    t = teacher_logits if teacher_logits.stride(1) == 1 else teacher_logits.contiguous()
    s = student_logits if student_logits.stride(1) == 1 else student_logits.contiguous()
    n_classes = t.shape[1]
    rows = s.shape[0]
    per_row = torch.empty(rows, dtype=acc, device=s.device)
    block_c = min(triton.next_power_of_2(n_classes), _MAX_BLOCK_C)
    num_warps = 4 if block_c <= 1024 else 8
    with device_guard(s):
        _kl_div_rows_kernel[(rows,)](
            t,
            s,
            per_row,
            n,
            n_classes,
            t.stride(0),
            s.stride(0),
            BLOCK_C=block_c,
            NUM_BLOCKS=triton.cdiv(n_classes, block_c),
            num_warps=num_warps,
        )
    return per_row.view(k, n).sum(dim=1)


def kl_div_ref(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    num_candidates: int,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Plain-torch reference for :func:`kl_per_candidate`, written the way the UP-ViTs scripts write it.

    Args:
        teacher_logits: ``[n, C]`` teacher logits (or log-probs).
        student_logits: ``[K * n, C]`` student logits, candidate-major.
        num_candidates: ``K``.
        compute_dtype: dtype for the whole computation. ``None`` keeps the (promoted) input dtype, i.e. what a
            user would get in plain torch at that dtype; ``torch.float64`` gives the high-precision reference.

    Returns:
        ``[K]`` scores in ``compute_dtype``.
    """
    k, n = _check_inputs(teacher_logits, student_logits, num_candidates)
    dtype = compute_dtype or torch.promote_types(teacher_logits.dtype, student_logits.dtype)
    t = teacher_logits.to(dtype)
    s = student_logits.to(dtype).reshape(k, n, -1)
    log_q = torch.log_softmax(t, dim=-1)  # [n, C]
    return (log_q.exp() * (log_q - torch.log_softmax(s, dim=-1))).sum(dim=(1, 2))  # [K]
