"""vitprune_fast: structured pruning for timm vision transformers (UP-ViTs, DIMAP, DAP).

Data flows one way: ``model --arch adapter--> PruningSpace --scorer--> scores --planner--> Plan --prune_--> model``.

- :mod:`vitprune_fast.arch`: adapters, the one owner of model structure (groups, blocks, stages, trunk).
- :mod:`vitprune_fast.plan` / :mod:`vitprune_fast.targets`: Plans from scores, ratios, FLOPs or a timm shape.
- :mod:`vitprune_fast.prune` (+ :mod:`vitprune_fast.compact` and the C++ extension in ``csrc/``): in-place slicing.
- :mod:`vitprune_fast.score`: scorers (UP-ViTs engines, DIMAP, baselines).
- :mod:`vitprune_fast.methods`: every method behind one interface (model, data, :class:`PlanSpec`) -> Plan, and the
  registry the CLI, the demo and the benchmarks read (:func:`register_method` adds a user's method).
- :mod:`vitprune_fast.dap`: DAP, which prunes while fine-tuning.
- :mod:`vitprune_fast.kernels`: the Triton kernels. Their source is the top-level ``kernels/`` folder of the
  repository (the product's layout), installed as this subpackage; each op has one dispatch point (Triton on CUDA,
  its plain-torch reference elsewhere) and everything works without triton installed.
"""
from . import methods, metrics, score
from .allocate import allocate
from .arch import describe
from .dap import DAP, finetune_dap
from .dap import Schedule as DAPSchedule
from .errors import (
    CallOrderError,
    CheckpointError,
    ConfigError,
    InputError,
    KernelUnavailableError,
    PlanError,
    UnsupportedModelError,
    VitPruneError,
)
from .io import load_pruned, save_pruned
from .methods import Method, MethodData, MethodResult, get_method, register_method
from .plan import Plan, PlanSpec, make_plan, plan_from_scores
from .progressive import upvits_progressive
from .prune import prune_
from .reconstruct import reconstruct_
from .score.dimap import apply_masks_, dimap_masks, dimap_scores, dimap_structured_plan, sparsity_report
from .score.screened import upvits_select
from .score.upvits import upvits_scores
from .space import Group, PruningSpace, TensorSlice
from .targets import (
    keep_for_budget,
    keep_for_flops,
    plan_for_shape,
    plan_with_heads,
    resolve_spec,
    shape_plan_args,
    shape_targets,
)
from .version import __version__

__all__ = [
    "CallOrderError", "CheckpointError", "allocate", "ConfigError", "DAP", "DAPSchedule", "Group", "InputError",
    "KernelUnavailableError", "Method", "MethodData", "MethodResult", "Plan", "PlanError", "PlanSpec", "PruningSpace",
    "TensorSlice", "UnsupportedModelError", "VitPruneError", "__version__", "apply_masks_", "describe", "dimap_masks",
    "dimap_scores", "dimap_structured_plan", "finetune_dap", "get_method", "keep_for_budget", "keep_for_flops",
    "load_pruned", "make_plan", "methods", "metrics", "plan_for_shape", "plan_from_scores", "plan_with_heads", "prune_",
    "reconstruct_", "register_method", "resolve_spec", "save_pruned", "score", "shape_plan_args", "shape_targets",
    "sparsity_report", "upvits_progressive", "upvits_scores", "upvits_select",
]
