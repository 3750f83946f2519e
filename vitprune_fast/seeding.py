"""One seed for every random draw: Python's ``random``, numpy, torch (CPU and CUDA) and DataLoader workers.

timm's training transforms draw from Python's ``random``, torch ops from torch's generator, user code may use numpy;
seeding torch alone (what most scripts do) leaves the first two free, so identical commands give different results.
"""
from __future__ import annotations

import random

import numpy as np
import torch


def rank_seed(seed: int, rank: int = 0) -> int:
    """The seed of process ``rank`` under torch.distributed: ``seed`` on rank 0, a distinct value derived from it
    on the others (their augmentation draws differ, every one of them repeats)."""
    return seed if rank == 0 else (seed + 1_000_003 * rank) % 2**63


def seed_everything(seed: int, rank: int | None = None) -> int:
    """Seed Python's ``random``, numpy's global generator and torch's (CPU and every CUDA device).

    Args:
        seed: the one seed the user gave.
        rank: the process rank (default: torch.distributed's, 0 outside it); see :func:`rank_seed`.

    Returns:
        The seed this process used.
    """
    if rank is None:
        from .distributed import dist_info

        rank = dist_info()[0]
    s = rank_seed(int(seed), rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)  # also seeds every CUDA device
    return s


def seed_worker(worker_id: int) -> None:
    """``DataLoader(worker_init_fn=...)``: seed a worker's Python ``random`` and numpy from the torch seed the loader
    gave it (derived from the loader's generator and the worker id), so augmentations drawn in workers repeat."""
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


__all__ = ["rank_seed", "seed_everything", "seed_worker"]
