"""The method interface: each method owns its way from (model, data, :class:`~vitprune_fast.PlanSpec`) to a Plan.

A :class:`Method` says what it needs (``needs``: images, labels, a training loop), which group kinds it scores,
whether its scores compare across groups (``comparable``: what a global allocation of widths needs), and which
options it takes (its dataclass fields). :meth:`Method.plan` returns a :class:`MethodResult`: the Plan in the
model's numbering, the scores when the method has them, reports and lines for a person, and -- for a method that
trains while it plans (DAP) -- the trained, pruned model.

The registry (:func:`register_method`, :func:`get_method`, :func:`method_names`) is the one list the CLI, the demo
and the benchmarks read; a method registered by a user is a peer of the built-in ones.
"""
from __future__ import annotations

import dataclasses
from abc import ABC
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..errors import ConfigError, PlanError
from ..plan import Plan, PlanSpec, as_spec, plan_from_scores
from ..progress import Progress
from ..space import KINDS

NEEDS = ("images", "labels", "training")
COMPARABLE = ("global", "mean")


@dataclass(frozen=True)
class MethodData:
    """What a method may read; a method says in :attr:`Method.needs` which of it must be there.

    Attributes:
        loader: labelled training batches ``(images, labels)`` (Taylor, DAP); the source of the proxy images when
            ``images`` is None.
        images: proxy images ``[N, C, H, W]`` (UP-ViTs), already transformed.
        proxy: how many proxy images to take from ``loader`` when ``images`` is None.
        chunk: images per chunk of the UP-ViTs engines (bounds the cached block inputs).
        batches: Taylor: training batches to accumulate.
        seed: the method's random draws (random scores, DAP's probes).
        progress: ``True`` (bars), ``"lines"`` (one line per stage of a long engine), ``False``, or a listener
            (see :mod:`vitprune_fast.progress`).
        teacher: the unpruned model a training method distils from (DAP).
        steps: training steps of a method that trains while it plans (DAP).
        lr: its learning rate.
        cache: results shared by calls on the same model and data, e.g. scores reused by a second spec (methods
            write to it; the caller makes one per model and data).
        log: where a method says something a person should know before a long run (the CLI: stderr); None: quiet.
        latency: a :class:`~vitprune_fast.latency.LatencyModel` of the model on the device it will run on (a latency
            budget needs it).
    """

    loader: Iterable | None = None
    images: torch.Tensor | None = None
    proxy: int = 64
    chunk: int = 64
    batches: int = 4
    seed: int = 0
    progress: Progress = True
    teacher: nn.Module | None = None
    steps: int = 100
    lr: float = 5e-4
    cache: dict = field(default_factory=dict, compare=False)
    log: Callable[[str], None] | None = None
    latency: object | None = None


@dataclass
class MethodResult:
    """What :meth:`Method.plan` returns.

    Attributes:
        plan: the Plan, for the model the method was given (its numbering).
        scores: group name -> scores (higher = more important), when the method computed a full table.
        report: JSON-able reports by name (the CLI writes each as ``OUT/<name>.json``).
        notes: lines for a person (how a budget became widths, what an engine did).
        model: a method that trains while it plans (``"training"`` in ``needs``): the trained model, already pruned
            by ``plan``; None otherwise (apply ``plan`` with ``prune_``).
    """

    plan: Plan
    scores: dict[str, torch.Tensor] | None = None
    report: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    model: nn.Module | None = None


class Method(ABC):
    """One pruning method. Subclass it (a frozen dataclass whose fields are its options) and register an instance.

    A subclass implements :meth:`scores` (then the default :meth:`plan` turns the spec's budget into keep ratios by
    its ``allocation`` rule and keeps the top-scored channels) or :meth:`plan` itself (a method with its own way of
    choosing channels).

    Class attributes:
        name: the method's name (``--method`` in the CLI).
        summary: one line for help texts.
        needs: what it reads from :class:`MethodData`: ``"images"`` (proxy images, or a loader to take them from),
            ``"labels"`` (labelled training batches), ``"training"`` (it trains the model while it plans; the result
            carries the trained model).
        kinds: the group kinds it scores; one keep ratio applies to these only (the others stay whole).
        comparable: how its scores enter a global allocation of widths (``PlanSpec(allocation="global")``, which
            ranks every group's items against each other): ``"global"`` when they are in one unit across groups and
            blocks (UP-ViTs' KL of the model's output) and are used as they are; ``"mean"`` when each group's scores
            are divided by their mean first (Torch-Pruning's default normaliser: a group's scale says nothing about
            its importance, e.g. a weight norm); None when a global allocation is refused.
        has_scores: whether :meth:`scores` gives a table (``vitprune-fast score``); False for a method that only
            plans (DAP).
        draws: whether its result depends on a random draw (its data, ``MethodData.seed``); False for a method
            that is deterministic given the weights (magnitude, DIMAP), so a study over draws runs it once.
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    kinds: ClassVar[tuple[str, ...]] = KINDS
    comparable: ClassVar[str | None] = None
    has_scores: ClassVar[bool] = True
    draws: ClassVar[bool] = True

    # ------------------------------------------------------------------------------------------------ options
    def option_names(self) -> tuple[str, ...]:
        """The options :meth:`with_options` takes (the dataclass fields)."""
        return tuple(f.name for f in dataclasses.fields(self)) if dataclasses.is_dataclass(self) else ()

    def with_options(self, **options) -> Method:
        """This method with other option values (a new object; the registered one is unchanged).

        Raises:
            ConfigError: an option it does not have.
        """
        unknown = sorted(set(options) - set(self.option_names()))
        if unknown:
            have = ", ".join(self.option_names()) or "none"
            raise ConfigError(f"method {self.name!r} has no option {unknown[0]!r} (its options: {have})")
        return dataclasses.replace(self, **options) if options else self

    # ------------------------------------------------------------------------------------------------ running
    def check_data(self, data: MethodData) -> None:
        """Raise a clear ConfigError when ``data`` lacks what :attr:`needs` names."""
        if ("images" in self.needs and data.images is None and data.loader is None
                or ({"labels", "training"} & self.needs) and data.loader is None):
            raise ConfigError(f"method {self.name!r} needs data (a loader of training images)")

    def scores(self, model: nn.Module, data: MethodData) -> dict[str, torch.Tensor] | None:
        """Group name -> ``[group.size]`` scores, higher = more important (the model is not modified); None for a
        method without a score table."""
        return None

    def cached_scores(self, model: nn.Module, data: MethodData) -> dict[str, torch.Tensor] | None:
        """:meth:`scores`, computed once per ``data.cache`` (a second spec on the same model and data reuses them)."""
        key = ("scores", self.score_key())
        if key not in data.cache:
            self.check_data(data)
            data.cache[key] = self.scores(model, data)
        return data.cache[key]

    def score_key(self) -> str:
        """What the scores depend on besides the model and data: the name and the options (override when some
        options only change how the scores are used)."""
        return repr(self)

    def plan(self, model: nn.Module, data: MethodData, spec: PlanSpec) -> MethodResult:
        """The Plan for ``spec`` (not applied; the model is not modified).

        The default: the spec's budget becomes keep ratios for :attr:`kinds` by its allocation rule
        (:func:`vitprune_fast.targets.resolve_spec`), and every ranking keeps its top-scored items
        (:func:`vitprune_fast.plan.plan_from_scores`).
        """
        from ..arch import describe

        spec = as_spec(spec)
        if spec.allocation == "global":
            return self.allocate(model, data, spec)
        spec, notes = self.resolve(model, data, spec)
        scores = self.cached_scores(model, data)
        if scores is None:
            raise ConfigError(f"method {self.name!r} has no scores to plan from")
        return MethodResult(plan_from_scores(describe(model), scores, spec), scores=scores, notes=notes)

    def comparable_scores(self, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``scores`` as a global allocation ranks them (see :attr:`comparable`).

        Raises:
            PlanError: a method whose scores do not compare across groups.
        """
        if self.comparable == "global":
            return scores
        if self.comparable == "mean":
            return {n: s.double() / s.double().mean().clamp_min(1e-300) for n, s in scores.items()}
        raise PlanError(f"method {self.name!r}: its scores do not compare across groups, so it cannot allocate widths "
                        "globally (use allocation='uniform')")

    def allocate(self, model: nn.Module, data: MethodData, spec: PlanSpec) -> MethodResult:
        """The global allocation of ``spec``'s budget by this method's (comparable) scores
        (:func:`vitprune_fast.allocate.allocate`; the cost model is built once per ``data.cache``)."""
        from ..allocate import allocate, allocation_summary

        if self.comparable is None:
            self.comparable_scores({})  # the clear refusal, before anything is scored
        scores = self.cached_scores(model, data)
        if scores is None:
            raise ConfigError(f"method {self.name!r} has no scores to plan from")
        plan, report = allocate(model, self.comparable_scores(scores), spec, **cost_models(model, data, spec))
        return MethodResult(plan, scores=scores, report={"allocation": report}, notes=[allocation_summary(report)])

    def resolve(self, model: nn.Module, data: MethodData, spec: PlanSpec) -> tuple[PlanSpec, list[str]]:
        """``spec`` with keep ratios for :attr:`kinds` (:func:`vitprune_fast.targets.resolve_spec`), computed once per
        ``data.cache``: methods planning for the same budget on the same model share the search."""
        from ..targets import resolve_spec

        spec = self.own_kinds(as_spec(spec))
        key = ("resolved", repr(spec), self.kinds)
        if key not in data.cache:
            data.cache[key] = resolve_spec(model, spec, kinds=self.kinds)
        spec, notes = data.cache[key]
        return spec, list(notes)

    def own_kinds(self, spec: PlanSpec) -> PlanSpec:
        """``spec`` with one keep ratio given for :attr:`kinds` only (the kinds this method does not score stay
        whole)."""
        if isinstance(spec.keep, (int, float)) and set(self.kinds) != set(KINDS):
            return dataclasses.replace(spec, keep=dict.fromkeys(self.kinds, spec.keep))
        return spec


def cost_models(model: nn.Module, data: MethodData, spec: PlanSpec) -> dict:
    """``allocate``'s cost model for ``spec``'s budget (``cost_model`` or ``latency_model``), built once per
    ``data.cache`` (a latency model comes with the data: ``MethodData.latency``)."""
    from ..cost import CostModel

    if spec.budget == "latency":
        if data.latency is None:
            raise PlanError("a latency budget needs a latency model of the device (MethodData.latency, CLI: built "
                            "and cached by `prune --latency`)")
        return {"latency_model": data.latency}
    key = ("cost_model", spec.budget)
    if key not in data.cache:
        data.cache[key] = CostModel(model, spec.budget)
    return {"cost_model": data.cache[key]}


# ----------------------------------------------------------------------------------------------------- registry
_METHODS: dict[str, Method] = {}


def register_method(method: Method, replace: bool = False) -> Method:
    """Add ``method`` to the registry (the CLI's ``--method``, the demo's and the fidelity study's method lists).

    Args:
        method: a :class:`Method` instance with a ``name``.
        replace: allow replacing a method of the same name.

    Raises:
        ConfigError: not a Method, no name, bad ``needs`` / ``comparable``, or the name is taken.
    """
    if not isinstance(method, Method):
        raise ConfigError(f"expected a vitprune_fast.methods.Method instance, got {type(method).__name__}")
    name = getattr(method, "name", None)
    if not isinstance(name, str) or not name or "," in name or name.startswith("-"):
        raise ConfigError(f"a method needs a name without commas, not starting with '-', got {name!r}")
    if not set(method.needs) <= set(NEEDS) or method.comparable not in (None, *COMPARABLE):
        raise ConfigError(f"method {name!r}: needs must be a subset of {NEEDS}, comparable one of {COMPARABLE} or None")
    if name in _METHODS and not replace:
        raise ConfigError(f"a method called {name!r} is already registered (pass replace=True)")
    _METHODS[name] = method
    return method


def unregister_method(name: str) -> None:
    """Remove the method called ``name`` (no-op when there is none)."""
    _METHODS.pop(name, None)


def method_names() -> tuple[str, ...]:
    """The registered methods' names, built-in ones first, in registration order."""
    return tuple(_METHODS)


def get_method(name: str, **options) -> Method:
    """The registered method called ``name``, with ``options`` (see :meth:`Method.with_options`).

    Raises:
        ConfigError: an unknown method or option.
    """
    if name not in _METHODS:
        raise ConfigError(f"unknown method {name!r}; choose from {method_names()}")
    return _METHODS[name].with_options(**options)


def proxy_images(model: nn.Module, data: MethodData) -> torch.Tensor:
    """Proxy images: ``data.images``, else the loader's first ``data.proxy``; on the model's device and dtype."""
    from ..data import take_images

    if data.images is None and data.loader is None:
        raise ConfigError("UP-ViTs needs proxy images (a loader of training images)")
    images = data.images if data.images is not None else take_images(data.loader, data.proxy)[0]
    p = next(model.parameters())
    return images.to(p.device, p.dtype)
