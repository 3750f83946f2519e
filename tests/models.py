"""Small random-init timm configs for tests (32-px images), with randomised biases and norm weights.

The models come from the one catalogue, :mod:`vitprune_fast.testing` (keyed by adapter); ``CONFIGS`` are its core
configs (ViT / DeiT / Swin), which most engine tests use.
"""
from __future__ import annotations

import torch

from vitprune_fast.testing import CATALOGUE, randomize_, representatives

CONFIGS = {r.key: (r.timm_name, r.kwargs) for r in representatives(core=True)}
VIT_KEYS = tuple(r.key for r in representatives("vit", core=True))
SWIN_KEYS = tuple(r.key for r in representatives("swin", core=True))


def make_model(key: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.nn.Module:
    return CATALOGUE[key].build(dtype, seed)


def make_input(model: torch.nn.Module, batch: int = 3, seed: int = 1) -> torch.Tensor:
    p = next(model.parameters())
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=g, dtype=p.dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def random_scores(space, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(gr.size, generator=g) for n, gr in space.groups.items()}


def kept_features(model: torch.nn.Module, plan, out: torch.Tensor) -> torch.Tensor:
    """``out`` (the unpruned or masked model's output) at the features the pruned model still outputs: a model whose
    outputs are a group's channels (no classifier; ``Adapter.output_group``) loses the removed ones."""
    from vitprune_fast.arch import adapter_for

    group = adapter_for(model).output_group()
    return out[:, plan.keep[group]] if group is not None and group in plan.keep else out


def assert_pretrained_round_trip(model: torch.nn.Module, directory) -> torch.nn.Module:
    """``save_pruned`` writes a ``native/`` directory that the class's ``from_pretrained`` loads with equal outputs
    (the model's attention implementation), and ``load_pruned`` gives the model back bit for bit; returns the
    ``load_pruned`` model."""
    import json

    import transformers

    import vitprune_fast as vpf
    from vitprune_fast.arch import model_output

    vpf.save_pruned(model, directory)
    native = json.loads((directory / "architecture.json").read_text())["native"]
    assert native.get("directory") == "native" and "from_pretrained" in native["load"], native
    back = getattr(transformers, type(model).__name__).from_pretrained(
        str(directory / "native"), dtype="auto", attn_implementation=model.config._attn_implementation).eval()
    loaded = vpf.load_pruned(directory)
    x = make_input(model, 2)
    with torch.no_grad():
        assert rel_err(model_output(back, x), model_output(model, x)) < 1e-12
        assert torch.equal(model_output(loaded, x), model_output(model, x))
    return loaded


def assert_not_written_for_pretrained(model: torch.nn.Module, directory, reason: str) -> None:
    """``save_pruned`` writes no ``native/`` directory and says why in ``architecture.json`` (``reason`` in it), and
    ``load_pruned`` gives the model back bit for bit."""
    import json

    import vitprune_fast as vpf
    from vitprune_fast.arch import model_output

    vpf.save_pruned(model, directory)
    native = json.loads((directory / "architecture.json").read_text())["native"]
    assert reason in native["reason"] and not (directory / "native").exists(), native
    x = make_input(model, 2)
    with torch.no_grad():
        assert torch.equal(model_output(vpf.load_pruned(directory), x), model_output(model, x))


__all__ = [
    "CONFIGS",
    "SWIN_KEYS",
    "VIT_KEYS",
    "assert_not_written_for_pretrained",
    "assert_pretrained_round_trip",
    "kept_features",
    "make_input",
    "make_model",
    "random_scores",
    "randomize_",
    "rel_err",
]
