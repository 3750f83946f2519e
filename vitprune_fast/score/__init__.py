"""Importance scorers. Each returns ``dict[group name, 1-D tensor]`` (higher = more important)."""
from .baselines import magnitude_scores, random_scores, taylor_scores

__all__ = ["magnitude_scores", "random_scores", "taylor_scores"]
