"""PNG plots (matplotlib, Agg backend): kept width per block, score distributions, demo accuracies.

matplotlib is optional (it comes with the ``demo`` and ``test`` extras): without it every function warns once and
returns ``None`` instead of a path.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from .space import KINDS, PruningSpace

_WARNED = False


def _pyplot(stacklevel: int = 3):
    """matplotlib.pyplot on the Agg backend, or None (warned once) when matplotlib is missing.

    ``stacklevel`` is the warning's: 3 points at the caller of the public plot function that called this.
    """
    global _WARNED
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
    except ImportError:
        if not _WARNED:
            warnings.warn("matplotlib is not installed; plots are skipped (pip install 'vitprune_fast[demo]')",
                          stacklevel=stacklevel)
            _WARNED = True
        return None
    return plt


def _color(i: int) -> str:
    """The i-th label's colour, the same in every panel (matplotlib's cycle would skip labels without data)."""
    return f"C{i % 10}"


def _kind_panels(space: PruningSpace, height: float):
    """One row of panels, one per kind present in ``space``.

    Returns:
        ``(figure, axes, kinds)`` with ``axes[i]`` the panel of ``kinds[i]``, or None without matplotlib.
    """
    plt = _pyplot(stacklevel=4)  # warn at the caller of the public plot function, one frame further up
    if plt is None:
        return None
    kinds = [k for k in KINDS if space.of_kind(k)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.5 * len(kinds), height), squeeze=False)
    return fig, axes[0], kinds


def _save(fig, path: str | os.PathLike, title: str = "") -> Path:
    """Give ``fig`` its title (if any), write it as a PNG at ``path`` and close it."""
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_kept_widths(space: PruningSpace, widths: Mapping[str, Mapping[str, int]], path: str | os.PathLike,
                     title: str = "") -> Path | None:
    """Grouped bars of the kept width of every group, one panel per kind, one bar colour per label.

    Args:
        space: the unpruned model's PruningSpace (gives the original widths, drawn as outlines).
        widths: label (e.g. method) -> group name -> kept channels (groups not listed are kept whole).
        path: PNG path.
        title: figure title.
    """
    panels = _kind_panels(space, 3.6)
    if panels is None:
        return None
    fig, axes, kinds = panels
    labels = list(widths)
    for ax, kind in zip(axes, kinds, strict=True):
        groups = space.of_kind(kind)
        x = torch.arange(len(groups)).float()
        bw = 0.8 / max(1, len(labels))
        ax.bar(x, [g.size for g in groups], 0.85, fill=False, edgecolor="grey", label="original")
        for i, lab in enumerate(labels):
            kept = [widths[lab].get(g.name, g.size) for g in groups]
            ax.bar(x - 0.4 + bw * (i + 0.5), kept, bw, label=lab, color=_color(i))
        short = [g.name.replace(".attn", "").replace(".mlp", "").replace(".residual", "") or "model"
                 for g in groups]
        ax.set_xticks(x.tolist(), short, rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{kind} width per block" if kind != "residual" else "residual width")
        ax.set_ylabel("channels")
    axes[-1].legend(fontsize=7)
    return _save(fig, path, title)


def plot_score_distributions(space: PruningSpace, scores: Mapping[str, Mapping[str, torch.Tensor]],
                             path: str | os.PathLike, title: str = "") -> Path | None:
    """Histograms of scores per kind and method, each group's scores divided by the group's largest |score|.

    Scores of different methods live on unrelated scales; normalising per group shows their shape (how many
    channels look unimportant) on a common [0, 1] axis.

    Args:
        space: the PruningSpace the scores belong to.
        scores: label -> group name -> 1-D scores (groups missing from a method are skipped).
        path: PNG path.
        title: figure title.
    """
    panels = _kind_panels(space, 3.4)
    if panels is None:
        return None
    fig, axes, kinds = panels
    for ax, kind in zip(axes, kinds, strict=True):
        for i, (lab, sc) in enumerate(scores.items()):
            vals = []
            for g in space.of_kind(kind):
                if g.name in sc:
                    s = torch.as_tensor(sc[g.name]).detach().double().cpu().flatten()
                    vals.append(s / s.abs().max().clamp_min(1e-300))
            if vals:
                ax.hist(torch.cat(vals).numpy(), bins=40, range=(min(0.0, float(torch.cat(vals).min())), 1.0),
                        histtype="step", label=lab, density=True, color=_color(i))
        ax.set_title(f"{kind} scores (÷ group max)")
        ax.set_xlabel("normalised score")
        if ax.has_data():
            ax.legend(fontsize=7)
    return _save(fig, path, title)


def plot_accuracies(results: Mapping[str, Mapping[str, Mapping[str, float]]], path: str | os.PathLike,
                    title: str = "") -> Path | None:
    """Accuracy before / after fine-tuning per method, one panel per model.

    Args:
        results: model label -> method -> ``{"dense": acc, "before": acc, "after": acc}`` (accuracies in %;
            optional ``before_std`` / ``after_std`` draw error bars).
        path: PNG path.
        title: figure title.
    """
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), squeeze=False)
    for ax, (model, per_method) in zip(axes[0], results.items(), strict=True):
        methods = list(per_method)
        x = torch.arange(len(methods)).float()
        for dx, phase, label in ((-0.2, "before", "pruned"), (0.2, "after", "pruned + fine-tuned")):
            ax.bar(x + dx, [per_method[m][phase] for m in methods], 0.4, label=label,
                   yerr=[per_method[m].get(f"{phase}_std", 0.0) for m in methods])
        dense = next(iter(per_method.values()))["dense"]
        ax.axhline(dense, color="black", ls="--", lw=1, label=f"unpruned {dense:.1f}%")
        ax.set_xticks(x.tolist(), methods, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("top-1 (%)")
        ax.set_title(model)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    return _save(fig, path, title)
