"""One row of a comparison (the demo, the fidelity study): a registered method, how it allocates, and whether its
pruned model is reconstructed.

A row is named ``<method>[-global][-progressive][+rec]``: the method's registry name; ``-global`` plans with
``allocation="global"`` (the method's scores must compare across groups); ``-progressive`` sets its ``steps``
option (re-scoring between steps; the method must have that option); ``+rec`` refits the pruned model's Linears by
least squares (:func:`vitprune_fast.reconstruct_`) on the calibration images before anything is measured. Rows are
driven through the method interface only.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .errors import ConfigError
from .methods import Method, get_method, method_names
from .plan import PlanSpec


@dataclass(frozen=True)
class Variant:
    """A parsed row name (see the module docstring)."""

    label: str
    method: str
    allocation: str = "uniform"
    progressive: bool = False
    reconstruct: bool = False

    def build(self, steps: int = 3, **options) -> Method:
        """The method with its options (``steps`` for a progressive row; ``options`` where the method has them)."""
        m = get_method(self.method)
        opts = {k: v for k, v in options.items() if k in m.option_names()}
        if self.progressive:
            if "steps" not in m.option_names():
                raise ConfigError(f"{self.label}: method {self.method!r} has no 'steps' option to be progressive")
            opts["steps"] = steps
        return m.with_options(**opts)

    def spec(self, spec: PlanSpec) -> PlanSpec:
        """``spec`` under this row's allocation rule."""
        return replace(spec, allocation=self.allocation) if self.allocation != spec.allocation else spec


def parse(label: str) -> Variant:
    """The :class:`Variant` a row name stands for.

    Raises:
        ConfigError: an unknown method or suffix.
    """
    name, rec = (label[:-4], True) if label.endswith("+rec") else (label, False)
    progressive = name.endswith("-progressive")
    name = name.removesuffix("-progressive")
    allocation = "global" if name.endswith("-global") else "uniform"
    name = name.removesuffix("-global")
    if name not in method_names():
        raise ConfigError(f"row {label!r}: {name!r} is not a registered method ({', '.join(method_names())}); rows "
                          "are <method>[-global][-progressive][+rec]")
    return Variant(label, name, allocation, progressive, rec)


__all__ = ["Variant", "parse"]
