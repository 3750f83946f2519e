"""torch.distributed helpers for scoring and training under ``torchrun`` (any backend; a no-op in one process)."""
from __future__ import annotations

import os

import torch
from torch import nn


def dist_info() -> tuple[int, int]:
    """``(rank, world size)``: ``(0, 1)`` without an initialized process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that logs and writes files."""
    return dist_info()[0] == 0


def init_from_env(device: str | None = None) -> torch.device:
    """Initialise the default process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1); the local device.

    NCCL on CUDA, gloo on CPU. Without torchrun nothing is initialised and the device is CUDA when present.
    """
    import torch.distributed as dist

    cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    local = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if cuda else "gloo")
    return dev


def wrap(model: nn.Module) -> nn.Module:
    """``model`` in DistributedDataParallel when several ranks train it, else ``model`` itself."""
    if dist_info()[1] == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    dev = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[dev] if dev.type == "cuda" else None)


def mean_over_ranks(value: torch.Tensor | float, device: torch.device | str = "cpu") -> float:
    """The mean of a scalar over the ranks (the value itself in one process)."""
    import torch.distributed as dist

    _, world = dist_info()
    if world == 1:
        return float(value)
    t = torch.as_tensor(value, dtype=torch.float64, device=device).reshape(1).clone()
    dist.all_reduce(t)
    return float(t) / world


def gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in one process)."""
    import torch.distributed as dist

    _, world = dist_info()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    import torch.distributed as dist

    if dist_info()[1] > 1:
        dist.barrier()


__all__ = ["barrier", "dist_info", "gather_objects", "init_from_env", "is_main", "mean_over_ranks", "wrap"]
