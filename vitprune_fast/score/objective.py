"""What a UP-ViTs score measures: the distortion of the model's output when one candidate is removed.

* ``kl`` (the default for a classifier): ``KL(softmax(teacher) || softmax(student))`` of the logits, temperature 1,
  summed over images -- UP-ViTs' own score.
* ``features`` (the default for a model without a classifier: a timm ``num_classes=0`` backbone, a feature
  extractor): the squared error of the model's output features, each normalised by the teacher's variance of that
  feature over the proxy images, summed over features and images::

      s_c = sum_i sum_f (student_if - teacher_if)^2 / var_f

  UP-ViTs scores a channel by "the information loss of the last layer"; for a classifier that layer is the logits
  and the loss their KL; for a backbone it is the features a downstream head reads, and the variance normalisation
  makes every feature count in units of its own spread (a feature that barely varies is not drowned by one with a
  large scale, and rescaling the model's output leaves the scores unchanged). Features the teacher does not vary at
  all get the floor ``VAR_FLOOR x`` the mean variance instead of 0.
* ``tokens``: the same measure on the model's final tokens instead of its pooled output (a dense head, a decoder
  reading every token): ``s_c = sum_i sum_t sum_f (student_itf - teacher_itf)^2 / var_f``, the variance of feature f
  over every image and token. The tokens are what the library calls them (timm's ``forward_features``,
  transformers' ``last_hidden_state``, torchvision's encoder output: :meth:`~vitprune_fast.arch.Adapter.final_tokens`).

Both engines and the screen ask the objective, never a metric of their own: ``objective(teacher, student, k)`` gives
the K candidates' scores, :meth:`Objective.cotangents` the factors of its second-order term for the screen.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ConfigError
from ..kernels.kl_div import kl_per_candidate
from .second_order import fisher_cotangents

OBJECTIVES = ("kl", "features", "tokens")
VAR_FLOOR = 1e-6  # share of the mean feature variance given to features the teacher holds constant
# Scores are second-order differences of first-order terms: summed in float64 whatever the model's dtype (in
# float32 the KL's rounding noise was 8 % of the median score of an untrained DeiT-T's late blocks, 60 % at worst).
_ACC = torch.float64


class Objective:
    """A distortion measure of the model's output, summed over images (higher: the candidate matters more).

    Attributes:
        name: ``"kl"`` or ``"features"``.
    """

    name: str

    def fit(self, outputs: Sequence[torch.Tensor]) -> Objective:
        """Learn what the measure needs from the teacher's outputs on every proxy image (nothing by default)."""
        return self

    def __call__(self, teacher: torch.Tensor, student: torch.Tensor, k: int, backend: str = "torch"
                 ) -> torch.Tensor:
        """Scores ``[K]`` (float64) of K candidates: ``student`` ``[K * n, F]`` stacked candidate-major against
        ``teacher`` ``[n, F]``."""
        raise NotImplementedError

    def cotangents(self, teacher: torch.Tensor, classifier: Sequence[torch.Tensor], eps: float,
                   max_rank: int | None) -> torch.Tensor:
        """``u`` ``[R, n, F]`` with ``1/2 sum_r (u_r^T dz)^2`` the measure's second-order term for an output
        change ``dz`` of one image (the screen's estimate; see :mod:`.second_order`)."""
        raise NotImplementedError

    def settings(self) -> dict:
        """What a checkpoint's fingerprint must hold for scores of this objective to be reused."""
        return {"objective": self.name}


class KLObjective(Objective):
    """UP-ViTs' KL of the logits (:func:`vitprune_fast.kernels.kl_div.kl_per_candidate`, accumulated in float64)."""

    name = "kl"

    def __call__(self, teacher, student, k, backend="torch"):
        return kl_per_candidate(teacher, student, k, backend=backend, accumulate=_ACC)

    def cotangents(self, teacher, classifier, eps, max_rank):
        return fisher_cotangents(teacher, classifier, eps, max_rank)

    def settings(self):
        return {}  # the default objective: checkpoints fingerprint as they did before there was a choice


class FeatureObjective(Objective):
    """Squared error of the output features over the teacher's per-feature variance (module docstring).

    Fit it on the teacher's outputs of every proxy image before scoring (:meth:`fit`): the variance is over all of
    them, so a score does not depend on how the images are chunked.

    Attributes:
        var: ``[F]`` float64 per-feature variance of the teacher's outputs (floored), after :meth:`fit`.
        tokens: the outputs are the model's final tokens (``"tokens"``), not its pooled output.
    """

    def __init__(self, var: torch.Tensor | None = None, tokens: bool = False):
        self.var, self.tokens = var, tokens

    @property
    def name(self) -> str:
        return "tokens" if self.tokens else "features"

    def fit(self, outputs):
        feats = torch.cat([o.detach().reshape(-1, o.shape[-1]).to(_ACC) for o in outputs])  # [N, F]
        if feats.shape[0] < 2:
            raise ConfigError("the features objective needs at least 2 proxy images (it normalises every feature by "
                              "its variance over them)")
        var = feats.var(0, correction=0)
        floor = VAR_FLOOR * var.mean().clamp_min(torch.finfo(_ACC).tiny)
        self.var = var.clamp_min(floor)
        return self

    def _inv_var(self, like: torch.Tensor) -> torch.Tensor:
        if self.var is None:
            raise ConfigError("FeatureObjective.fit(teacher outputs) must run before it scores")
        if self.var.shape[0] != like.shape[-1]:
            raise ConfigError(f"the features objective was fitted on {self.var.shape[0]} features, the model gives "
                              f"{like.shape[-1]}")
        return self.var.to(like.device).reciprocal()

    def __call__(self, teacher, student, k, backend="torch"):
        n = teacher.shape[0]
        if student.shape[0] != k * n or student.shape[1:] != teacher.shape[1:]:
            raise ConfigError(f"student outputs {list(student.shape)} are not {k} candidates of teacher outputs "
                              f"{list(teacher.shape)}")
        diff = student.to(_ACC).reshape(k, n, -1, teacher.shape[-1]) - teacher.to(_ACC).reshape(1, n, -1,
                                                                                                teacher.shape[-1])
        return (diff.square() * self._inv_var(teacher)).sum((1, 2, 3))  # [K]

    def cotangents(self, teacher, classifier, eps, max_rank):
        """``1/2 (u_f^T dz)^2`` summed over f is ``sum_f dz_f^2 / var_f`` exactly: one cotangent per feature,
        ``u_f = e_f * sqrt(2 / var_f)`` (the measure is quadratic; ``eps`` and ``max_rank`` do not apply)."""
        if teacher.dim() != 2:
            raise ConfigError("the screen takes pooled features [n, F]; score the final tokens with the exact engines "
                              "(engine='fast' or 'reference')")
        n, f = teacher.shape
        scale = (2 * self._inv_var(teacher)).sqrt().to(teacher.dtype)  # [F]
        u = torch.diag(scale)[:, None, :].expand(f, n, f)  # [R = F, n, F]
        return u.contiguous()


def objective_for(name: str | Objective | None, classifier: Sequence[torch.Tensor]) -> Objective:
    """The objective called ``name`` (an :class:`Objective` is returned as it is); ``None`` picks KL for a model
    with a classifier (``classifier``: its weights, :meth:`~vitprune_fast.arch.Adapter.classifier_weights`) and the
    features objective for one without.

    Raises:
        ConfigError: an unknown name, or KL asked of a model without a classifier (its outputs are not logits).
    """
    if isinstance(name, Objective):
        return name
    if name is None:
        name = "kl" if classifier else "features"
    if name not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {OBJECTIVES} (or None: chosen by the model), got {name!r}")
    if name == "kl" and not classifier:
        raise ConfigError("objective='kl' needs a classifier: this model has none (num_classes=0 or a feature "
                          "head), its outputs are features; use objective='features'")
    return KLObjective() if name == "kl" else FeatureObjective(tokens=name == "tokens")


__all__ = ["FeatureObjective", "KLObjective", "OBJECTIVES", "Objective", "VAR_FLOOR", "objective_for"]
