"""Every error the library raises on bad input or misuse: one hierarchy under :class:`VitPruneError`.

All derive from ``ValueError`` so callers can catch broadly; the two raised for a call at the wrong moment or a
missing optional component also derive from ``RuntimeError``. Code that needs to tell errors apart checks their
type, never their message.
"""


class VitPruneError(ValueError):
    """Base class for every vitprune_fast error."""


class UnsupportedModelError(VitPruneError):
    """The model (or one of its modules) is not something the adapters can prune exactly."""


class PlanError(VitPruneError):
    """A plan (or the scores/ratios used to build one) does not fit the model."""


class CheckpointError(VitPruneError):
    """A saved pruned model or training state (``DAP.state_dict``) is missing, corrupt, or does not match."""


class ConfigError(VitPruneError):
    """A setting is invalid: an unknown option name, a value out of range, settings that contradict each other."""


class InputError(VitPruneError):
    """Input data (images, batches, tensors handed to a kernel) has the wrong shape, dtype, device or length."""


class CallOrderError(VitPruneError, RuntimeError):
    """A method was called at the wrong moment (e.g. ``DAP.loss`` before a forward pass)."""


class KernelUnavailableError(VitPruneError, RuntimeError):
    """A Triton kernel was asked for explicitly where it cannot run (triton not installed, or not a CUDA tensor)."""


__all__ = ["CallOrderError", "CheckpointError", "ConfigError", "InputError", "KernelUnavailableError", "PlanError",
           "UnsupportedModelError", "VitPruneError"]
