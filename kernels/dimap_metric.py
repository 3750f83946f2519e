"""DIMAP / LAMP per-layer metric for many same-size layers in one launch.

Every row of ``x`` (``[L, N]``) is one layer, flattened. With the row's squares sorted in descending order,
``a_1 >= a_2 >= ... >= a_N``, the score of the weight at sorted position ``j`` is (DIMAP Eq. 10, the LAMP score)::

    score_j = a_j / (a_1 + ... + a_j)        (inclusive prefix sum; 0 / 0 := 0 for an all-zero prefix)

and it is written back at the weight's original position. The largest entry of every non-zero row scores 1 and
the scores are invariant to scaling a row.

Pipeline (one launch of each kernel for all ``L`` rows):

1. ``torch.sort`` of ``|x|`` per row, descending. Triton only sorts inside one block held in registers
   (``tl.sort`` is a bitonic network over a power-of-two tile); a row here has up to millions of entries, so a
   global segmented sort would mean re-implementing the multi-pass radix sort that ``torch.sort`` already
   dispatches to on CUDA (CUB segmented radix sort). Sorting ``|x|`` instead of ``x**2`` gives the same order and
   lets the kernels fuse the square. The sort runs on the integer view of the non-negative floats (same order,
   and integer keys sort faster than float keys in torch, notably on CPU).
2. ``_chunk_sums_kernel``: grid ``(L, C)``, program ``(r, c)`` squares and sums chunk ``c`` of sorted row ``r``.
3. Host: exclusive prefix sum of the ``[L, C]`` chunk sums (tiny), the carry each chunk starts from.
4. ``_scan_scatter_kernel``: grid ``(L, C)``, program ``(r, c)`` walks its chunk block by block: square,
   ``tl.cumsum`` inside the block plus the running carry, divide, and scatter to ``out[r, idx]``.

Splitting rows into chunks keeps the GPU busy when a module has few but long rows (Swin-B's stage-3 MLP has 36
rows of 1M weights); on short rows there is one chunk per row and step 3 is a no-op.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from .utils import device_guard, resolve_backend, tl, triton

__all__ = ["dimap_metric", "dimap_metric_ref", "sort_desc"]

_BLOCK = 1024  # elements per tl.cumsum step
_CHUNK_BLOCKS = 16  # blocks per program on GPU (chunk = 16K elements)


@triton.jit
def _chunk_sums_kernel(
    v_ptr,  # [L, N] sorted |x| (or sorted squares when SQUARED), descending per row, contiguous
    sums_ptr,  # [L, C] out: sum of squares of each chunk of CHUNK sorted entries
    n_cols,  # N
    n_chunks,  # C = cdiv(N, CHUNK)
    SQUARED: tl.constexpr,  # True: v already holds squares (group norms²)
    CHUNK: tl.constexpr,  # entries per program, a multiple of BLOCK
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    v_row = v_ptr + row * n_cols
    acc = tl.zeros([BLOCK], dtype=sums_ptr.dtype.element_ty)
    for start in range(0, CHUNK, BLOCK):
        cols = chunk * CHUNK + start + offs
        v = tl.load(v_row + cols, mask=cols < n_cols, other=0.0).to(acc.dtype)
        if not SQUARED:
            v = v * v
        acc += v
    tl.store(sums_ptr + row * n_chunks + chunk, tl.sum(acc, axis=0))


@triton.jit
def _scan_scatter_kernel(
    v_ptr,  # [L, N] sorted |x| (or squares), descending per row, contiguous
    idx_ptr,  # [L, N] int64 original column of each sorted entry (the sort permutation)
    carry_ptr,  # [L, C] sum of squares of all entries before each chunk (exclusive prefix of chunk sums)
    out_ptr,  # [L, N] out: score at the original positions; its dtype is the accumulation dtype
    n_cols,  # N
    n_chunks,  # C
    SQUARED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    v_row = v_ptr + row * n_cols
    idx_row = idx_ptr + row * n_cols
    out_row = out_ptr + row * n_cols
    carry = tl.load(carry_ptr + row * n_chunks + chunk)
    for start in range(0, CHUNK, BLOCK):
        cols = chunk * CHUNK + start + offs
        mask = cols < n_cols
        a = tl.load(v_row + cols, mask=mask, other=0.0).to(carry.dtype)
        if not SQUARED:
            a = a * a
        # score_j = a_j / (sum of a over sorted positions <= j); the prefix of an all-zero head is 0 -> score 0
        denom = tl.cumsum(a, axis=0) + carry
        score = tl.where(denom > 0, a / tl.where(denom > 0, denom, 1.0), 0.0)
        dst = tl.load(idx_row + cols, mask=mask, other=0)
        tl.store(out_row + dst, score, mask=mask)
        carry += tl.sum(a, axis=0)


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check(x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise InputError(f"expected x of shape [L, N] (one flattened layer per row), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InputError(f"x must be floating point, got {x.dtype}")


def dimap_metric_ref(x: torch.Tensor, squared: bool = False) -> torch.Tensor:
    """Plain-torch DIMAP/LAMP metric: square, sort descending, inclusive cumsum, divide, scatter back.

    Args:
        x: ``[L, N]`` one flattened layer per row (fp16/bf16/fp32/fp64).
        squared: ``x`` already holds the non-negative squares (e.g. group norms²); skip the square.

    Returns:
        ``[L, N]`` scores in float32 (float64 for float64 input); 0 where the inclusive prefix sum is 0.
    """
    _check(x)
    a = x.to(_acc_dtype(x))
    a = a if squared else a * a  # [L, N]
    vals, idx = torch.sort(a, dim=1, descending=True, stable=True)  # [L, N] each
    denom = torch.cumsum(vals, dim=1)  # inclusive prefix sums of the sorted squares
    score = torch.where(denom > 0, vals / torch.where(denom > 0, denom, 1), 0)
    return torch.empty_like(score).scatter_(1, idx, score)


def sort_desc(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable descending sort of each row of a non-negative float tensor ``[L, N]``: ``(values, indices)``.

    Sorts the bit patterns as integers: for non-negative IEEE floats the integer order is the value order, and
    torch sorts integer keys faster than float keys. Equal to ``torch.sort(a, 1, descending=True, stable=True)``.
    """
    as_int = {torch.float32: torch.int32, torch.float64: torch.int64}.get(a.dtype)
    if as_int is None:
        return torch.sort(a, dim=1, descending=True, stable=True)
    keys, idx = torch.sort(a.view(as_int), dim=1, descending=True, stable=True)  # [L, N], [L, N] int64
    return keys.view(a.dtype), idx


def _dimap_metric_torch(x: torch.Tensor, squared: bool) -> torch.Tensor:
    """The reference computation with the faster sort and in-place arithmetic (the CPU path of the scorer)."""
    a = x.to(_acc_dtype(x))
    a = a.clamp_min(0) if squared else a.abs()  # [L, N] non-negative sort keys; |x| orders like x**2
    vals, idx = sort_desc(a)
    del a
    if not squared:
        vals.square_()
    denom = torch.cumsum(vals, dim=1)  # inclusive prefix sums of the sorted squares
    denom.masked_fill_(denom == 0, 1)  # all-zero prefix: vals are 0 there, so 0 / 1 = 0 (no 0/0)
    vals.div_(denom)
    del denom
    return torch.empty_like(vals).scatter_(1, idx, vals)


def _pick_chunk(x: torch.Tensor) -> int:
    """Entries per program: one block in the interpreter (cheap programs), 16 blocks on a GPU."""
    return _BLOCK * (_CHUNK_BLOCKS if x.is_cuda else 1)


def _dimap_metric_triton(x: torch.Tensor, squared: bool) -> torch.Tensor:
    acc = _acc_dtype(x)
    key = x.to(acc)
    key = key.clamp_min(0) if squared else key.abs()  # non-negative keys (also maps -0.0 to +0.0)
    vals, idx = sort_desc(key)  # [L, N], [L, N] int64
    n_rows, n_cols = vals.shape
    out = torch.empty((n_rows, n_cols), dtype=acc, device=x.device)
    if n_rows == 0 or n_cols == 0:
        return out
    chunk = _pick_chunk(x)
    n_chunks = triton.cdiv(n_cols, chunk)
    grid = (n_rows, n_chunks)
    sums = torch.empty((n_rows, n_chunks), dtype=acc, device=x.device)
    with device_guard(x):
        if n_chunks > 1:
            _chunk_sums_kernel[grid](vals, sums, n_cols, n_chunks, SQUARED=squared, CHUNK=chunk, BLOCK=_BLOCK)
            carry = torch.zeros_like(sums)
            carry[:, 1:] = torch.cumsum(sums[:, :-1], dim=1)  # exclusive prefix: start value of each chunk's scan
        else:
            carry = sums.zero_()
        _scan_scatter_kernel[grid](vals, idx, carry, out, n_cols, n_chunks, SQUARED=squared, CHUNK=chunk,
                                   BLOCK=_BLOCK)
    return out


def dimap_metric(x: torch.Tensor, squared: bool = False, backend: str = "auto") -> torch.Tensor:
    """DIMAP/LAMP scores of every row of ``x`` (one layer per row), all rows in one launch.

    ``score = a_j / sum_{k <= j} a_k`` with ``a`` the row's squares sorted in descending order, scattered back to
    the original positions; an all-zero prefix gives 0 (no 0/0).

    Args:
        x: ``[L, N]`` flattened same-size layers (fp16/bf16/fp32/fp64). Layers of different sizes need separate
            calls (the DIMAP scorer groups them by size).
        squared: ``x`` already holds non-negative squares (structured group norms²).
        backend: ``"triton"`` (CUDA tensors, or any tensor under ``TRITON_INTERPRET=1``), ``"torch"``
            (the reference computation with a faster sort and in-place arithmetic; equal to
            :func:`dimap_metric_ref`), or ``"auto"``: Triton on CUDA tensors, torch otherwise.

    Returns:
        ``[L, N]`` scores in float32 (float64 for float64 input), on ``x``'s device.

    Raises:
        InputError: ``x`` is not a 2-D float tensor.
        ConfigError: an unknown backend.
        KernelUnavailableError: ``"triton"`` where it cannot run (no triton; a CPU tensor without the interpreter).
    """
    _check(x)
    if resolve_backend(backend, x, interpret_auto=False) == "torch":
        return _dimap_metric_torch(x, squared)
    return _dimap_metric_triton(x.contiguous(), squared)
