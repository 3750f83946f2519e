"""Every architecture name in timm's ViT-family modules: a PruningSpace or a clear UnsupportedModelError.

Built on the meta device (no memory, no weights): ``describe`` only reads module types and shapes.
"""
from __future__ import annotations

import functools

import pytest
import timm
import torch

import vitprune_fast as vpf
from vitprune_fast.errors import UnsupportedModelError
from vitprune_fast.meta import create_on_meta
from vitprune_fast.testing import census_modules

ZOO_MODULES = census_modules()  # the timm modules of every adapter in the catalogue
# Families the README's table says are supported: every name matching is described (a regression fails here).
SUPPORTED = {
    "DeiT / DeiT-III": lambda n: n.startswith("deit"),
    "Swin V1": lambda n: n.startswith("swin_") and "v2" not in n,
    "SigLIP / SigLIP 2 (attention pool)": lambda n: "siglip" in n and "gap" not in n,
    "AIMv2 (RMSNorm, SwiGLU)": lambda n: n.startswith("aimv2"),
    "BEiT-3 (scale-norms)": lambda n: n.startswith("beit3"),
    "DINOv2 (incl. SwiGLU giant)": lambda n: n.startswith("vit_") and "dinov2" in n,
    "EVA-02": lambda n: n.startswith("eva02"),
    "relative-position ViT": lambda n: n.startswith("vit_relpos") or n.startswith("vit_srelpos"),
    "BEiT / BEiT v2": lambda n: n.startswith("beit_") or n.startswith("beitv2"),
    "CaiT": lambda n: n.startswith("cait"),
    "Swin V2 / V2-CR": lambda n: n.startswith("swinv2"),
    "PVTv2": lambda n: n.startswith("pvt_v2"),
    "XCiT": lambda n: n.startswith("xcit"),
    "parallel ViT-22B blocks": lambda n: n.endswith("_xp_224") or n.startswith("vit_pwee"),
    "parallel attention / MLP branches": lambda n: "18x2" in n,
    "differential attention": lambda n: n.startswith(("vit_dwee", "vit_dlittle")),
}


@functools.cache
def _meta_model(name: str) -> torch.nn.Module:
    return create_on_meta(name)


def _names(module: str) -> list[str]:
    return timm.list_models(module=module)


@pytest.mark.parametrize("module", ZOO_MODULES)
def test_every_zoo_model_is_described_or_refused_clearly(module):
    names = _names(module)
    assert names, f"timm lists no model in {module}"
    crashed, refused = [], {}
    for name in names:
        model = _meta_model(name)
        try:
            space = vpf.describe(model)
        except UnsupportedModelError as e:
            msg = str(e)
            assert msg and len(msg) > 20, f"{name}: an unclear refusal {msg!r}"
            refused[name] = msg
            continue
        except Exception as e:  # noqa: BLE001 -- any other exception is the failure this test looks for
            crashed.append(f"{name}: {type(e).__name__}: {e}")
            continue
        assert space.groups and space.of_kind("residual"), name
    assert not crashed, "\n".join(crashed)


def test_the_readme_families_are_supported():
    names = [n for m in ZOO_MODULES for n in _names(m)]
    for family, match in SUPPORTED.items():
        members = [n for n in names if match(n)]
        assert members, family
        for name in members:
            vpf.describe(_meta_model(name))  # raises if a claimed family is refused
