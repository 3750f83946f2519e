"""vitprune_fast: structured pruning for timm vision transformers (UP-ViTs, DIMAP, DAP)."""
from . import score
from .arch import describe
from .dap import DAP, finetune_dap
from .dap import Schedule as DAPSchedule
from .errors import CheckpointError, PlanError, UnsupportedModelError, VitPruneError
from .io import load_pruned, save_pruned
from .plan import Plan, make_plan
from .prune import prune_
from .score.dimap import apply_masks_, dimap_masks, dimap_scores, dimap_structured_plan, sparsity_report
from .score.upvits import upvits_scores
from .space import Group, PruningSpace, TensorSlice
from .targets import keep_for_flops, plan_for_shape, plan_with_heads, shape_targets

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "Group", "Plan", "PlanError", "PruningSpace", "TensorSlice", "UnsupportedModelError",
    "VitPruneError", "describe", "keep_for_flops", "load_pruned", "make_plan", "plan_for_shape", "plan_with_heads",
    "prune_", "save_pruned", "score", "shape_targets",
    "upvits_scores", "DAP", "DAPSchedule", "finetune_dap", "apply_masks_", "dimap_masks", "dimap_scores",
    "dimap_structured_plan", "sparsity_report",
]
