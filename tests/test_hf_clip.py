"""transformers CLIP vision towers (``CLIPVisionModelWithProjection`` with SDPA, ``CLIPVisionModel`` eager) beyond
the per-family suite of test_families.py (removal == masking for every group kind, save / load, UP-ViTs fast ==
reference with the features objective, DIMAP, DAP), the head merge (test_hf_vit.py), in-place slicing with optimizer
state (test_inplace.py) and ONNX (test_io.py): the parts around the layers, the attributes transformers reads, the
``from_pretrained`` round trip and its refusal, the group names."""
import json

import pytest
import torch
import transformers

import vitprune_fast as vpf
from tests.models import assert_not_written_for_pretrained, assert_pretrained_round_trip, make_input, random_scores
from vitprune_fast.arch import adapter_for, model_output
from vitprune_fast.testing import CATALOGUE

pytestmark = pytest.mark.usefixtures("one_thread")
KEYS = ["hf_clip", "hf_clip_eager"]


def _base(model) -> str:
    return "vision_model." if hasattr(model, "vision_model") else ""


@pytest.mark.parametrize("key", KEYS)
def test_group_names_are_the_library_module_paths(key):
    model = CATALOGUE[key].build()
    names = set(vpf.describe(model).groups)
    layers = {f"{_base(model)}encoder.layers.{i}.{p}" for i in range(2) for p in ("self_attn", "mlp")}
    assert names == {"residual"} | layers
    assert all(model.get_submodule(n) is not None for n in layers)


@pytest.mark.parametrize("key", KEYS)
def test_the_parts_around_the_layers_follow_the_residual(key):
    """class_embedding (1-D), the position Embedding's weight (dim 1), pre_layrnorm, post_layernorm and the
    projection's input columns; the projection's output width (the features) stays."""
    model = CATALOGUE[key].build()
    b = _base(model)
    space = vpf.describe(model)
    names = {s.name for s in space.groups["residual"].slices}
    want = {f"{b}embeddings.class_embedding", f"{b}embeddings.position_embedding.weight", f"{b}pre_layrnorm.weight",
            f"{b}post_layernorm.bias", f"{b}embeddings.patch_embedding.weight"}
    assert want <= names
    assert ("visual_projection.weight" in names) == hasattr(model, "visual_projection")
    adapter = adapter_for(model)
    assert adapter.output_group() == (None if hasattr(model, "visual_projection") else "residual")
    vpf.prune_(model, vpf.make_plan(space, random_scores(space), keep={"residual": 0.5, "mlp": 0.5}))
    enc = adapter._enc
    assert enc.embeddings.class_embedding.shape == (16,) and enc.embeddings.position_embedding.weight.shape == (17, 16)
    assert enc.embeddings.position_embedding.embedding_dim == 16 and enc.embeddings.embed_dim == 16
    assert enc.pre_layrnorm.normalized_shape == (16,) and enc.post_layernorm.normalized_shape == (16,)
    if hasattr(model, "visual_projection"):
        assert tuple(model.visual_projection.weight.shape) == (24, 16)
    x = make_input(model, 2)
    with torch.no_grad():
        assert model_output(model, x).shape == (2, 24 if hasattr(model, "visual_projection") else 16)


@pytest.mark.parametrize("key", KEYS)
def test_uniform_pruned_model_loads_with_from_pretrained(key, tmp_path):
    """keep=0.5 everywhere: attention width == hidden_size, which CLIPVisionConfig expresses; the attributes
    transformers reads follow the tensors and the library's own directory loads with equal outputs."""
    model = CATALOGUE[key].build()
    space = vpf.describe(model)
    vpf.prune_(model, vpf.make_plan(space, random_scores(space), keep=0.5))
    att = adapter_for(model)._layers()[0].self_attn
    assert (att.num_heads, att.head_dim, att.scale, att.embed_dim) == (4, 4, 0.5, 16)
    assert model.config.hidden_size == 16 and model.config.intermediate_size == 32
    assert_pretrained_round_trip(model, tmp_path / "m")


def test_attention_narrower_than_hidden_size_is_not_written_for_from_pretrained(tmp_path):
    """CLIPVisionConfig has no head_dim (head size = hidden_size / heads): architecture.json says why, and the
    vitprune_fast files round-trip."""
    model = CATALOGUE["hf_clip"].build()
    space = vpf.describe(model)
    vpf.prune_(model, vpf.make_plan(space, random_scores(space), keep={"attn": 0.5}))
    assert_not_written_for_pretrained(model, tmp_path / "m", "ties them")


def test_a_model_saved_with_the_other_nesting_is_refused_naming_it(tmp_path):
    """transformers 5 changed which class holds the tower's layers: a recipe of the other one is a CheckpointError
    naming both, not a tensor-name mismatch."""
    model = CATALOGUE["hf_clip_eager"].build()
    vpf.save_pruned(model, tmp_path / "m")
    path = tmp_path / "m" / "architecture.json"
    arch = json.loads(path.read_text())
    saved = arch["model_kwargs"]["layout"]
    assert saved == type(adapter_for(model)._enc).__name__
    other = "CLIPVisionTransformer" if saved == "CLIPVisionModel" else "CLIPVisionModel"
    arch["model_kwargs"]["layout"] = other
    path.write_text(json.dumps(arch))
    with pytest.raises(vpf.CheckpointError, match=f"the {other} layout.*the {saved} one.*nesting"):
        vpf.load_pruned(tmp_path / "m")


def test_cli_scores_a_clip_tower_by_its_features_and_prunes_it(tmp_path, capsys):
    from vitprune_fast import cli

    args = json.dumps({"patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "intermediate_size": 64, "projection_dim": 24})
    out = tmp_path / "p"
    assert cli.main(["prune", "--model", "hf:CLIPVisionModelWithProjection", "--model-args", args, "--data", "digits",
                     "--method", "upvits", "--proxy", "4", "--keep", "0.5", "--quiet", "--out", str(out)]) == 0
    assert "has no classifier" in capsys.readouterr().err
    pruned = vpf.load_pruned(out)
    assert type(pruned) is transformers.CLIPVisionModelWithProjection and pruned.config.hidden_size == 16
    assert pruned.visual_projection.out_features == 24
    back = transformers.CLIPVisionModelWithProjection.from_pretrained(str(out / "native"))
    assert back.config.hidden_size == 16 and back.config.intermediate_size == 32
