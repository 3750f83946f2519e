"""Importance scorers. Each returns ``dict[group name, 1-D tensor]`` (higher = more important).

The registry (:mod:`.registry`) lists them for the CLI, the demo and the benchmarks.
"""
from .baselines import magnitude_scores, random_scores, taylor_scores
from .registry import METHODS, SCORERS, compute_scores

__all__ = ["METHODS", "SCORERS", "compute_scores", "magnitude_scores", "random_scores", "taylor_scores"]
