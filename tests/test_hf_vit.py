"""transformers ViT (``ViTModel`` / ``ViTForImageClassification``; DeiT, whose layers are ViT's, where it says so)
beyond the per-family suite of test_families.py
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
from tests.models import (
    assert_not_written_for_pretrained,
    assert_pretrained_round_trip,
    kept_features,
    make_input,
    random_scores,
    rel_err,
)
from vitprune_fast.arch import adapter_for, model_output
from vitprune_fast.errors import CheckpointError, UnsupportedModelError
from vitprune_fast.masked import masked_copy
from vitprune_fast.score.screened import selection_differences
from vitprune_fast.testing import CATALOGUE

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.mark.parametrize("key", ["hf_vit", "hf_vit_sdpa", "hf_deit"])
def test_uniform_pruned_model_loads_with_from_pretrained(key, tmp_path):
    """A uniform plan keeps attention width == hidden_size: the library's own directory loads with equal outputs,
    and the attributes transformers reads follow the tensors."""
    model = CATALOGUE[key].build()
    space = vpf.describe(model)
    vpf.prune_(model, vpf.make_plan(space, random_scores(space), keep=0.5))
    adapter = adapter_for(model)
    parts = adapter._layer_parts(0)
    att = adapter._layers()[0].get_submodule(parts.attn)
    assert (att.num_attention_heads, getattr(att, parts.head_size), att.scaling) == (4, 4, 0.5)
    assert getattr(att, "all_head_size", 16) == 16
    assert model.config.hidden_size == 16 and model.config.intermediate_size == 32
    loaded = assert_pretrained_round_trip(model, tmp_path / "m")
    assert loaded.config._attn_implementation == model.config._attn_implementation


def test_non_uniform_shapes_save_without_a_from_pretrained_directory(tmp_path):
    """Layers of different widths are not expressible in ViTConfig: said in architecture.json, and the vitprune_fast
    files still round-trip."""
    model = CATALOGUE["hf_vit"].build()
    space = vpf.describe(model)
    mlps = [n for n, g in space.groups.items() if g.kind == "mlp"]
    vpf.prune_(model, vpf.make_plan(space, random_scores(space), keep={mlps[0]: 0.5, mlps[1]: 0.75}))
    assert_not_written_for_pretrained(model, tmp_path / "m", "layers differ")


def test_attention_narrower_than_hidden_size_loads_with_from_pretrained_where_the_config_has_head_dim(tmp_path):
    """transformers >= 5.9 reads ``head_dim`` from the config: the pruned model loads with equal outputs; before, the
    config ties the widths and architecture.json says so."""
    model = CATALOGUE["hf_vit"].build()
    space = vpf.describe(model)
    vpf.prune_(model, vpf.make_plan(space, random_scores(space), keep={"attn": 0.5}))
    vpf.save_pruned(model, tmp_path / "m")
    native = json.loads((tmp_path / "m" / "architecture.json").read_text())["native"]
    x = make_input(model, 2)
    if not adapter_for(model)._has_head_dim():
        assert "ties them" in native["reason"] and not (tmp_path / "m" / "native").exists()
        return
    assert native["directory"] == "native" and model.config.head_dim == 4
    back = transformers.ViTForImageClassification.from_pretrained(str(tmp_path / "m" / "native"), dtype="auto",
                                attn_implementation=model.config._attn_implementation).eval()
    with torch.no_grad():
        assert rel_err(model_output(back, x), model_output(model, x)) < 1e-12


def test_a_model_saved_with_the_other_layer_layout_is_refused_naming_both(tmp_path):
    """A recipe from a transformers that names the layers differently (5.9 renamed encoder.layer to layers) gets a
    CheckpointError naming the versions, not a tensor-name mismatch."""
    model = CATALOGUE["hf_vit"].build()
    vpf.save_pruned(model, tmp_path / "m")
    path = tmp_path / "m" / "architecture.json"
    arch = json.loads(path.read_text())
    other = "5.0" if arch["model_kwargs"]["layout"] == "5.9" else "5.9"
    arch["model_kwargs"]["layout"] = other
    path.write_text(json.dumps(arch))
    with pytest.raises(CheckpointError, match=f"the {other} layout.*renamed in 5\\.9"):
        vpf.load_pruned(tmp_path / "m")


@pytest.mark.parametrize("key", ["hf_vit", "hf_vit_sdpa", "hf_dinov2", "hf_dinov2_reg", "hf_clip", "hf_clip_eager"])
def test_head_merge_and_whole_heads_equal_masking(key):
    """ViT, DINOv2 and CLIP (a Dinov2Model or CLIPVisionModel outputs residual channels: compared at the kept
    ones)."""
    model = CATALOGUE[key].build()
    space = vpf.describe(model)
    x = make_input(model, 2)
    for kw in (dict(keep=0.5, heads=2), dict(keep={"attn": 0.5}, attn_mode="heads")):
        plan = vpf.make_plan(space, random_scores(space), **kw)
        pruned = vpf.prune_(copy.deepcopy(model), plan)
        with torch.no_grad():
            got = model_output(pruned, x)
            assert rel_err(got, kept_features(model, plan, model_output(masked_copy(model, plan), x))) < 1e-9, kw
            assert rel_err(got, kept_features(model, plan, model_output(model, x))) > 1e-4, kw
        layers = adapter_for(pruned)._layers_with_parts()
        heads = {getattr(ly.get_submodule(lp.attn), lp.num_heads) for ly, lp in layers}
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
    adapter = adapter_for(model)
    mlp = "mlp" if adapter._has_head_dim() else "intermediate"
    layers = {f"vit.{adapter._layers_path}.{i}.{p}" for i in range(2) for p in ("attention", mlp)}
    assert names == {"residual"} | layers
    assert all(model.get_submodule(n) is not None for n in names - {"residual"})


def test_unsupported_transformers_models_are_refused_naming_the_class():
    text = transformers.BertModel(transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                          intermediate_size=32, vocab_size=50))
    conv = transformers.ConvNextModel(transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2))
    clip_text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=50))
    swin_v2 = transformers.Swinv2Model(transformers.Swinv2Config(image_size=32, patch_size=4, embed_dim=16, depths=[1],
                                                                 num_heads=[2], window_size=4))
    for model in (text, conv, clip_text, swin_v2):
        with pytest.raises(UnsupportedModelError, match=type(model).__name__):
            vpf.describe(model)


def test_timm_models_do_not_import_transformers():
    code = ("import sys, timm, vitprune_fast as v; m = timm.create_model('deit_tiny_patch16_224', img_size=32, "
            "patch_size=8, depth=1); v.describe(m); print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_cli_prunes_a_transformers_class_and_a_save_pretrained_directory(tmp_path, capsys):
    """``--model hf:<class>`` (config from --model-args, classes and size from the data) and ``hf:<directory>``
    (its config and weights): the pruned directory loads with load_pruned and with from_pretrained."""
    from vitprune_fast import cli

    args = json.dumps({"patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "intermediate_size": 64})
    out = tmp_path / "p"
    assert cli.main(["prune", "--model", "hf:ViTForImageClassification", "--model-args", args, "--data", "digits",
                     "--method", "upvits", "--proxy", "6", "--keep", "0.5", "--quiet", "--out", str(out)]) == 0
    pruned = vpf.load_pruned(out)
    assert type(pruned) is transformers.ViTForImageClassification and pruned.config.hidden_size == 16
    assert pruned.config.num_labels == 10 and pruned.config.image_size == 32
    back = transformers.ViTForImageClassification.from_pretrained(str(out / "native"))
    assert back.config.hidden_size == 16
    snapshot = tmp_path / "snap"
    CATALOGUE["hf_vit"].build(torch.float32).save_pretrained(str(snapshot))
    assert cli.main(["score", "--model", f"hf:{snapshot}", "--data", "digits", "--method", "upvits", "--proxy", "6",
                     "--quiet", "--out", str(tmp_path / "s.safetensors")]) == 0
    assert set(cli.load_scores(tmp_path / "s.safetensors")) >= {"residual"}
    for spec, says in ((f"hf:{tmp_path / 'nothing'}", "neither a directory nor a transformers model class"),
                       ("hf:ViTForImageClassification", "cannot create hf:ViTForImageClassification")):
        with pytest.raises(SystemExit) as e:
            cli.main(["score", "--model", spec, "--model-args", json.dumps({"hidden_size": "wide"}), "--data",
                      "digits", "--method", "magnitude", "--quiet", "--out", str(tmp_path / "t.safetensors")])
        assert e.value.code == 2 and says in capsys.readouterr().err


def test_deit_teacher_heads_and_distillation_token_follow_the_residual():
    """Both classifiers read the residual; the logits are their mean, and the distillation token is sliced."""
    model = CATALOGUE["hf_deit"].build()
    space = vpf.describe(model)
    names = {sl.name for sl in space.groups["residual"].slices}
    assert {"cls_classifier.weight", "distillation_classifier.weight", "deit.embeddings.distillation_token"} <= names
    assert len(adapter_for(model).classifier_weights()) == 2
    vpf.prune_(model, vpf.make_plan(space, random_scores(space), keep={"residual": 0.5}))
    assert model.deit.embeddings.distillation_token.shape == (1, 1, 16)
    assert model.cls_classifier.in_features == model.distillation_classifier.in_features == 16
