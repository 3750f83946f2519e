"""Importance scorers. Each returns ``dict[group name, 1-D tensor]`` (higher = more important).

The methods that use them (:mod:`vitprune_fast.methods`) are what the CLI, the demo and the benchmarks call.
"""
from .baselines import magnitude_scores, random_scores, taylor_scores

__all__ = ["magnitude_scores", "random_scores", "taylor_scores"]
