"""Pruning methods behind one interface, and their registry.

Each :class:`Method` owns its path from (model, :class:`MethodData`, :class:`~vitprune_fast.PlanSpec`) to a Plan;
the CLI, the demo and ``bench/fidelity.py`` drive every method through it, never by name. Built in: ``upvits``
(options ``engine`` = exact / screened, ``steps`` for progressive re-scoring), ``dimap``, ``magnitude``,
``random``, ``taylor`` and ``dap`` (which plans while it fine-tunes). :func:`register_method` adds a user's method
as their peer.
"""
from .base import (
    COMPARABLE,
    NEEDS,
    Method,
    MethodData,
    MethodResult,
    get_method,
    method_names,
    proxy_images,
    register_method,
    unregister_method,
)
from .baselines import MagnitudeMethod, RandomMethod, TaylorMethod
from .dap import DapMethod
from .dimap import DimapMethod
from .upvits import UpvitsMethod

for _m in (UpvitsMethod(), DimapMethod(), MagnitudeMethod(), RandomMethod(), TaylorMethod(), DapMethod()):
    register_method(_m)

__all__ = ["COMPARABLE", "DapMethod", "DimapMethod", "MagnitudeMethod", "Method", "MethodData", "MethodResult",
           "NEEDS", "RandomMethod", "TaylorMethod", "UpvitsMethod", "get_method", "method_names", "proxy_images",
           "register_method", "unregister_method"]
