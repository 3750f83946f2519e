"""In-place compaction of tensors along one dim: the tensor object survives, the removed memory is released.

``compact_(t, dim, index)`` leaves ``t`` equal to ``t.index_select(dim, index)`` while keeping the same Python
object (an ``nn.Parameter`` stays the parameter an optimizer holds) and shrinking its storage.

Two paths, same results:

* **extension** (``csrc/compact.cpp``): the kept slices are moved to the front of the tensor's own storage
  (memmove on CPU, bounded chunks on CUDA), then the storage is shrunk and the shape set. Used for contiguous
  CPU/CUDA tensors that own their whole storage (offset 0, storage exactly the tensor, resizable, not shared
  with a view or any other tensor). Many tensors go to C++ in one call and run in parallel on CPU.
* **torch fallback**: ``t.set_(t.index_select(dim, index))``. Used without the extension
  (``VITPRUNE_FAST_NO_EXT=1`` or no compiler) and for every tensor the extension refuses (meta, non-contiguous,
  views, shared storage...). Also keeps the object's identity.

Either way nothing holds a second full copy of the model: the extra memory at any moment is about one
tensor's kept part (shrinking a storage reallocates it), unlike slicing into new Parameters while the
optimizer still holds the old ones.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._ext import get_ext
from .errors import InputError

_counts = {"ext": 0, "torch": 0, "noop": 0}  # tensors handled per path since import
_last: str | None = None


def last_backend() -> str | None:
    """Path taken by the last ``compact_``/``compact_many_`` call.

    Returns:
        ``"ext"`` (C++ extension), ``"torch"`` (index_select fallback), ``"mixed"`` (both, in one batch),
        ``"noop"`` (every index kept everything) or None before the first call.
    """
    return _last


def backend_counts() -> dict[str, int]:
    """Number of tensors compacted by each path (``ext``, ``torch``, ``noop``) since import."""
    return dict(_counts)


def compact_(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """Keep only ``index`` along ``dim`` of ``tensor``, in place.

    Args:
        tensor: any tensor or ``nn.Parameter`` (CPU, CUDA, meta...). Its Python object, and so the
            parameter's identity in modules and optimizers, is preserved; ``requires_grad`` is unchanged.
        dim: dimension to compact; negative values count from the end.
        index: 1-D int64 tensor of the slices to keep, strictly increasing (sorted, unique), within
            ``[0, tensor.shape[dim])``, non-empty. Any device; it is read on the CPU.

    Returns:
        ``tensor`` itself, now equal to the old ``tensor.index_select(dim, index)``; its storage holds exactly
        the new elements.

    Raises:
        InputError: bad dim or index (a ValueError); the tensor is then untouched.
    """
    compact_many_([(tensor, dim, index)])
    return tensor


def compact_many_(items: Sequence[tuple[torch.Tensor, int, torch.Tensor]]) -> None:
    """``compact_`` for many ``(tensor, dim, index)`` items in one go (one C++ call, parallel over tensors).

    A tensor listed several times is compacted step by step in list order, each index referring to the
    shape left by the previous step (e.g. rows then columns of a weight). Every item is validated before
    anything moves, so an InputError leaves all tensors untouched.

    Args:
        items: ``(tensor, dim, index)`` triples with the same meaning as in ``compact_``.

    Raises:
        InputError: a bad tensor, dim or index (the message names the item).
    """
    _run(items)


def _run(items: Sequence[tuple[torch.Tensor, int, torch.Tensor]], *, force_chunked: bool = False,
         chunk_bytes: int = 0) -> None:
    """Validate, then compact. ``force_chunked``/``chunk_bytes`` drive the C++ device algorithm on CPU (tests)."""
    global _last
    plans = _validate(items)  # id(tensor) -> (tensor, steps [(dim, index)], final shape)

    ext = get_ext()
    native, fallback = [], []
    noop = 0
    for tensor, steps, shape in plans.values():
        if not steps:
            noop += 1
        elif ext is not None and ext.unsupported_reason(tensor) == "":
            native.append((tensor, steps, shape))
        else:
            fallback.append((tensor, steps, shape))

    if native:
        flat = [(t, d, i) for t, steps, _ in native for d, i in steps]
        try:
            ext.compact_many_([f[0] for f in flat], [f[1] for f in flat], [f[2] for f in flat],
                              force_chunked, chunk_bytes)
        except ext.NotCompactableError:
            # A tensor stopped qualifying after our check. C++ validates everything before moving any byte, so
            # nothing was touched: take the torch path for the whole batch. (Any other error happened while
            # moving, e.g. CUDA out of memory for a chunk: nothing safe to fall back to, so it propagates.)
            fallback += native
            native = []
        for tensor, _, shape in native:
            _shrink(tensor, shape)
    for tensor, steps, _ in fallback:
        with torch.no_grad():
            for d, idx in steps:
                tensor.set_(tensor.index_select(d, idx.to(tensor.device)))

    _counts["ext"] += len(native)
    _counts["torch"] += len(fallback)
    _counts["noop"] += noop
    used = [name for name, n in (("ext", len(native)), ("torch", len(fallback))) if n]
    _last = used[0] if len(used) == 1 else "mixed" if used else "noop"


def _shrink(tensor: torch.Tensor, shape: list[int]) -> None:
    """After the C++ move: cut the storage to the kept elements and give the tensor its new shape."""
    nbytes = math.prod(shape) * tensor.element_size()
    with torch.no_grad():
        storage = tensor.untyped_storage()
        try:
            storage.resize_(nbytes)  # reallocates: transient extra memory = this tensor's kept bytes
        except RuntimeError:
            pass  # out of memory for the smaller copy: the data is already in place, keep the larger storage
        tensor.set_(storage, 0, shape)


def _validate(items) -> dict[int, tuple[torch.Tensor, list[tuple[int, torch.Tensor]], list[int]]]:
    """Check every item; group steps per tensor object; drop steps that keep everything."""
    if isinstance(items, tuple) and len(items) == 3 and isinstance(items[0], torch.Tensor):
        raise InputError("compact_many_ takes a list of (tensor, dim, index) items, got a single item")
    plans: dict[int, tuple[torch.Tensor, list[tuple[int, torch.Tensor]], list[int]]] = {}
    for k, item in enumerate(items):
        if not isinstance(item, (tuple, list)) or len(item) != 3:
            raise InputError(f"item {k}: expected a (tensor, dim, index) triple, got {type(item).__name__}")
        tensor, dim, index = item
        if not isinstance(tensor, torch.Tensor):
            raise InputError(f"item {k}: expected a torch.Tensor, got {type(tensor).__name__}")
        if tensor.layout != torch.strided:
            raise InputError(f"item {k}: only strided (dense) tensors can be compacted, got {tensor.layout}")
        tensor_plan = plans.setdefault(id(tensor), (tensor, [], list(tensor.shape)))
        shape = tensor_plan[2]
        ndim = len(shape)
        if ndim == 0:
            raise InputError(f"item {k}: cannot compact a 0-d tensor")
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise InputError(f"item {k}: dim must be an int, got {type(dim).__name__}")
        if not -ndim <= dim < ndim:
            raise InputError(f"item {k}: dim {dim} out of range for a {ndim}-D tensor of shape {tuple(shape)}")
        dim %= ndim
        idx = _check_index(index, shape[dim], f"item {k} (dim {dim} of shape {tuple(shape)})")
        if idx.numel() < shape[dim]:  # a strictly increasing in-range index of full length is arange: no-op
            tensor_plan[1].append((dim, idx))
            shape[dim] = idx.numel()
    return plans


def _check_index(index, n: int, where: str) -> torch.Tensor:
    """The index as a contiguous int64 CPU tensor, after checking it is 1-D, non-empty, sorted, unique, < n."""
    if not isinstance(index, torch.Tensor):
        raise InputError(f"{where}: index must be a torch.Tensor, got {type(index).__name__}")
    if index.dtype != torch.int64:
        raise InputError(f"{where}: index must be int64 (torch.long), got {index.dtype}")
    if index.dim() != 1:
        raise InputError(f"{where}: index must be 1-D, got shape {tuple(index.shape)}")
    if index.numel() == 0:
        raise InputError(f"{where}: index is empty (cannot remove every slice)")
    if index.device.type == "meta":
        raise InputError(f"{where}: index is on the meta device (its values are unknown)")
    idx = index.detach().to("cpu").contiguous()
    if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise InputError(f"{where}: index must be strictly increasing (sorted, no duplicates)")
    lo, hi = int(idx[0]), int(idx[-1])
    if lo < 0 or hi >= n:
        raise InputError(f"{where}: index values must lie in [0, {n}), got range [{lo}, {hi}]")
    return idx
