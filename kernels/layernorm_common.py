"""LayerNorm pieces shared by the row-tiled LayerNorm kernels (``expand_ln``, ``masked_layernorm``).

Not an op: the device-side tile indexing and LayerNorm math (``@triton.jit`` helpers, inlined into the calling
kernel) and the host-side checks and launch sizing that both launchers apply. Each kernel holds whole rows in a
``[BLOCK_M, BLOCK_D]`` tile, so every row's statistics are reduced inside one program.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from .utils import interpreting, tl, triton

# Whole rows live in registers; wider rows than this are rejected (ViTs use D <= 2048).
MAX_BLOCK_D = 16384
# Target elements per program tile (BLOCK_M rows of BLOCK_D columns). The CPU interpreter pays per program, not
# per element, so it gets much larger tiles (same kernel, fewer programs).
_TILE_ELEMS = 4096
_TILE_ELEMS_INTERPRET = 65536


@triton.jit
def row_tile(n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Indices and bounds masks of this program's ``[BLOCK_M, BLOCK_D]`` tile of whole rows.

    Args:
        n_rows: number of rows ``M`` of the launch.
        n_cols: row length ``D`` (``<= BLOCK_D``).
        BLOCK_M: rows per program.
        BLOCK_D: padded row length (power of two).

    Returns:
        ``(rows, cols, row_ok, col_ok, inb)``: ``rows`` ``[BLOCK_M]`` int64 row indices (int64 so that
        ``rows * D`` cannot overflow), ``cols`` ``[BLOCK_D]``, their in-bounds masks, and ``inb``
        ``[BLOCK_M, BLOCK_D]`` = ``row_ok (outer and) col_ok``.
    """
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] int64
    cols = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    inb = row_ok[:, None] & col_ok[None, :]  # [BLOCK_M, BLOCK_D]
    return rows, cols, row_ok, col_ok, inb


@triton.jit
def layer_norm_rows(
    x,  # [BLOCK_M, BLOCK_D] rows in the accumulation dtype, already 0 outside keep
    keep,  # [BLOCK_M, BLOCK_D] lanes that take part (False on padding)
    cnt,  # [BLOCK_M] (or scalar) number of kept lanes per row, >= 1
    w_ptr,  # [D] LayerNorm weight (unused when HAS_WEIGHT is False)
    b_ptr,  # [D] LayerNorm bias (unused when HAS_BIAS is False)
    cols,  # [BLOCK_D] column indices
    col_ok,  # [BLOCK_D] cols < D
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """LayerNorm of each row over its ``keep`` lanes (biased variance, as ``torch.nn.LayerNorm``), then affine.

    ``x`` must already be 0 outside ``keep`` (so the row sum needs no extra select; padding loads with
    ``other=0`` give that for free). Lanes outside ``keep`` are left out of the statistics and come out as
    ``bias`` (0 without bias); callers that need them zero mask the result. Weight and bias are loaded in
    ``x``'s dtype.

    Returns:
        ``[BLOCK_M, BLOCK_D]`` normalised rows in ``x``'s dtype.
    """
    mean = tl.sum(x, axis=1) / cnt  # [BLOCK_M]
    xc = tl.where(keep, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / cnt
    rstd = 1.0 / tl.sqrt(var + eps)
    y = xc * rstd[:, None]
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(x.dtype)
        y = y * w[None, :]
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(x.dtype)
        y = y + b[None, :]
    return y


def check_affine_and_devices(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *others: torch.Tensor | None,
) -> None:
    """Check the LayerNorm ``weight`` / ``bias`` against ``x``'s last dim and that all tensors share its device.

    Args:
        x: the input whose last dim ``D`` is normalised; its device is the reference.
        weight: optional ``[D]`` float weight.
        bias: optional ``[D]`` float bias.
        *others: further inputs that must be on ``x``'s device (``None`` entries are skipped).

    Raises:
        InputError: on a weight / bias that is not a float ``[D]`` tensor, or a tensor on another device.
    """
    d = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and (p.shape != (d,) or not p.is_floating_point()):
            raise InputError(f"{name} must be a float tensor of shape ({d},), got {p.dtype} {tuple(p.shape)}")
    for p in (*others, weight, bias):
        if p is not None and p.device != x.device:
            raise InputError(f"all tensors must be on {x.device}, got one on {p.device}")


def block_d_for(d: int) -> int:
    """``BLOCK_D`` for rows of ``d`` channels: the next power of two.

    Raises:
        InputError: if that is above :data:`MAX_BLOCK_D`.
    """
    block_d = triton.next_power_of_2(d)
    if block_d > MAX_BLOCK_D:
        raise InputError(f"D = {d} is above the supported maximum of {MAX_BLOCK_D} channels")
    return block_d


def num_warps_for(tile: int) -> int:
    """Warps for a ``[BLOCK_M, BLOCK_D]`` tile of ``tile`` elements held in registers.

    4 warps on a 4096-element tile leave ~32 fp32 values per thread for each live tensor (bf16 at D = 768 compiled
    to 120 registers/thread, ~25 % occupancy on sm_90) and spill at 16384: more warps share the tile.
    """
    return 4 if tile < 4096 else 8 if tile < 8192 else 16


def contiguous_affine(weight: torch.Tensor | None, bias: torch.Tensor | None):
    """``(weight, bias)`` with unit stride: the kernels read them as dense ``[D]`` arrays from their first element."""
    return (None if weight is None else weight.contiguous()), (None if bias is None else bias.contiguous())


def launch_config(
    n_rows: int,
    block_d: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    acc: torch.dtype,
) -> tuple[tuple[int], dict]:
    """Grid and launch keywords for a whole-row LayerNorm kernel over ``n_rows`` rows of ``block_d`` lanes.

    Args:
        n_rows: number of rows ``M`` (``>= 1``).
        block_d: padded row length from :func:`block_d_for`.
        weight: the optional LayerNorm weight (only whether it is given matters).
        bias: the optional LayerNorm bias (likewise).
        acc: accumulation dtype, ``torch.float32`` or ``torch.float64``.

    Returns:
        ``(grid, meta)``: ``meta`` holds the kernels' shared constexprs ``HAS_WEIGHT``, ``HAS_BIAS``,
        ``ACC_FP64``, ``BLOCK_M``, ``BLOCK_D`` and ``num_warps``, to pass as ``kernel[grid](..., **meta)``.
    """
    tile = _TILE_ELEMS_INTERPRET if interpreting() else _TILE_ELEMS
    block_m = max(1, min(tile // block_d, triton.next_power_of_2(n_rows)))
    meta = {
        "HAS_WEIGHT": weight is not None,
        "HAS_BIAS": bias is not None,
        "ACC_FP64": acc == torch.float64,
        "BLOCK_M": block_m,
        "BLOCK_D": block_d,
        "num_warps": num_warps_for(block_m * block_d),
    }
    return (triton.cdiv(n_rows, block_m),), meta
