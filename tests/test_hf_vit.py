"""transformers ViT (``ViTModel`` / ``ViTForImageClassification``) beyond the per-family suite of test_families.py
(removal == masking for every group kind with eager and SDPA attention, save / load, UP-ViTs fast == reference, DIMAP,
DAP): the ``from_pretrained`` round trip, the head merge, the screened selection, clear refusals and the optional
import."""
import copy
import json
import subprocess
import sys

import pytest
import torch
import transformers

import vitprune_fast as vpf
from tests.models import make_input, rel_err
from vitprune_fast.arch import adapter_for, model_output
from vitprune_fast.errors import UnsupportedModelError
from vitprune_fast.masked import masked_copy
from vitprune_fast.score.screened import selection_differences
from vitprune_fast.testing import CATALOGUE

pytestmark = pytest.mark.usefixtures("one_thread")


def _scores(space, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(gr.size, generator=g, dtype=torch.float64) for n, gr in space.groups.items()}


@pytest.mark.parametrize("key", ["hf_vit", "hf_vit_sdpa"])
def test_uniform_pruned_model_loads_with_from_pretrained(key, tmp_path):
    """A uniform plan keeps attention width == hidden_size: the library's own directory loads with equal outputs,
    and the attributes transformers reads follow the tensors."""
    model = CATALOGUE[key].build()
    space = vpf.describe(model)
    vpf.prune_(model, vpf.make_plan(space, _scores(space), keep=0.5))
    att = adapter_for(model)._layers()[0].attention.attention
    assert (att.num_attention_heads, att.attention_head_size, att.all_head_size) == (4, 4, 16)
    assert model.config.hidden_size == 16 and model.config.intermediate_size == 32
    vpf.save_pruned(model, tmp_path / "m")
    arch = json.loads((tmp_path / "m" / "architecture.json").read_text())
    assert arch["native"]["directory"] == "native" and "from_pretrained" in arch["native"]["load"]
    klass = getattr(transformers, type(model).__name__)
    back = klass.from_pretrained(str(tmp_path / "m" / "native")).double().eval()
    x = make_input(model, 2)
    with torch.no_grad():
        assert rel_err(model_output(back, x), model_output(model, x)) < 1e-12
    loaded = vpf.load_pruned(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(model_output(loaded, x), model_output(model, x))
    assert loaded.config._attn_implementation == model.config._attn_implementation


def test_non_uniform_shapes_save_without_a_from_pretrained_directory(tmp_path):
    """Attention narrower than hidden_size is not expressible in ViTConfig: said in architecture.json, and the
    vitprune_fast files still round-trip."""
    model = CATALOGUE["hf_vit"].build()
    space = vpf.describe(model)
    vpf.prune_(model, vpf.make_plan(space, _scores(space), keep={"attn": 0.5}))
    vpf.save_pruned(model, tmp_path / "m")
    arch = json.loads((tmp_path / "m" / "architecture.json").read_text())
    assert "ties them" in arch["native"]["reason"] and not (tmp_path / "m" / "native").exists()
    x = make_input(model, 2)
    with torch.no_grad():
        assert torch.equal(model_output(vpf.load_pruned(tmp_path / "m"), x), model_output(model, x))


@pytest.mark.parametrize("key", ["hf_vit", "hf_vit_sdpa"])
def test_head_merge_and_whole_heads_equal_masking(key):
    model = CATALOGUE[key].build()
    space = vpf.describe(model)
    x = make_input(model, 2)
    for kw in (dict(keep=0.5, heads=2), dict(keep={"attn": 0.5}, attn_mode="heads")):
        plan = vpf.make_plan(space, _scores(space), **kw)
        pruned = vpf.prune_(copy.deepcopy(model), plan)
        with torch.no_grad():
            assert rel_err(model_output(pruned, x), model_output(masked_copy(model, plan), x)) < 1e-9, kw
            assert rel_err(model_output(pruned, x), model_output(model, x)) > 1e-4, kw
        heads = {m.num_attention_heads for m in pruned.modules() if hasattr(m, "attention_head_size")}
        assert heads == {2}, kw


def test_screened_selection_equals_exact_on_hf_vit():
    model = CATALOGUE["hf_vit"].build()
    x = make_input(model, 6)
    spec = vpf.PlanSpec(keep=0.5)
    plan, report = vpf.upvits_select(model, x, spec, progress=False, calibration=4, audit=8)
    exact = vpf.upvits_scores(model, x, progress=False)
    space = vpf.describe(model)
    assert not selection_differences(space, exact, plan, vpf.plan_from_scores(space, exact, spec), spec)
    assert report["scored_exactly"] < report["candidates"]


def test_group_names_are_the_library_module_paths():
    model = CATALOGUE["hf_vit"].build()
    names = set(vpf.describe(model).groups)
    layers = {f"vit.encoder.layer.{i}.{p}" for i in range(2) for p in ("attention", "intermediate")}
    assert names == {"residual"} | layers
    assert all(model.get_submodule(n) is not None for n in names - {"residual"})


def test_unsupported_transformers_models_are_refused_naming_the_class():
    text = transformers.BertModel(transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                          intermediate_size=32, vocab_size=50))
    conv = transformers.ConvNextModel(transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2))
    for model in (text, conv):
        with pytest.raises(UnsupportedModelError, match=type(model).__name__):
            vpf.describe(model)


def test_timm_models_do_not_import_transformers():
    code = ("import sys, timm, vitprune_fast as v; m = timm.create_model('deit_tiny_patch16_224', img_size=32, "
            "patch_size=8, depth=1); v.describe(m); print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
