"""Exceptions raised on bad input. All derive from ValueError so callers can catch broadly."""


class VitPruneError(ValueError):
    """Base class for every vitprune_fast input error."""


class UnsupportedModelError(VitPruneError):
    """The model (or one of its modules) is not something the adapters can prune exactly."""


class PlanError(VitPruneError):
    """A plan (or the scores/ratios used to build one) does not fit the model."""


class CheckpointError(VitPruneError):
    """A saved pruned model or training state (``DAP.state_dict``) is missing, corrupt, or does not match."""
