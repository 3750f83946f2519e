"""The one catalogue of test models (vitprune_fast.testing): every registered adapter has a representative, and each
representative is handled by the adapter it is listed under."""
from __future__ import annotations

import warnings

import pytest
import timm
import torch

from vitprune_fast.arch import ViTAdapter, adapter_for, register_adapter, unregister_adapter
from vitprune_fast.testing import (
    CATALOGUE,
    TIMM_MODULES,
    missing_representatives,
    timm_representatives,
)


def test_every_registered_adapter_has_a_representative():
    assert missing_representatives() == []


def test_an_adapter_without_a_representative_is_reported():
    """The check above can fail: a newly registered adapter without a representative makes it fail."""

    class UnlistedAdapter(ViTAdapter):
        arch = "unlisted_test_family"

        @classmethod
        def matches(cls, model):
            return False

    register_adapter(UnlistedAdapter)
    try:
        assert missing_representatives() == ["unlisted_test_family"]
    finally:
        unregister_adapter(UnlistedAdapter)
    assert missing_representatives() == []


@pytest.mark.parametrize("key", list(CATALOGUE))
def test_each_representative_is_its_adapters(key):
    rep = CATALOGUE[key]
    with warnings.catch_warnings(), torch.device("meta"):  # module types and shapes only
        warnings.simplefilter("ignore")
        model = rep.create()
    assert adapter_for(model).arch == rep.adapter


def test_census_modules_cover_the_built_in_adapters():
    assert set(TIMM_MODULES) == {r.adapter for r in timm_representatives()}
    assert all(timm.list_models(module=m) for mods in TIMM_MODULES.values() for m in mods)
