"""transformers DINOv2 (``Dinov2Model``, ``Dinov2WithRegistersForImageClassification``) beyond the per-family suite
of test_families.py (removal == masking with SDPA and eager attention, SwiGLU, layer scale and registers, save /
load, UP-ViTs fast == reference -- the features objective on ``Dinov2Model`` --, DIMAP, DAP) and the head merge
(test_hf_vit.py): the ``from_pretrained`` round trip, the group names and the refusals."""
import json

import pytest
import torch
import transformers

import vitprune_fast as vpf
from tests.models import assert_pretrained_round_trip, make_input, random_scores, rel_err
from vitprune_fast.arch import model_output
from vitprune_fast.arch.hf_dinov2 import _config_takes
from vitprune_fast.errors import UnsupportedModelError
from vitprune_fast.testing import CATALOGUE

pytestmark = pytest.mark.usefixtures("one_thread")
KEYS = ["hf_dinov2", "hf_dinov2_reg"]



@pytest.mark.parametrize("key", KEYS)
def test_uniform_pruned_model_loads_with_from_pretrained(key, tmp_path):
    """keep=0.5 everywhere: the config's sizes (mlp_ratio an int where the config types it so; SwiGLU's rounding
    to 8) rebuild the model, whose own directory loads with equal outputs."""
    model = CATALOGUE[key].build()
    space = vpf.describe(model)
    vpf.prune_(model, vpf.make_plan(space, random_scores(space), keep=0.5))
    assert_pretrained_round_trip(model, tmp_path / "m")


def test_an_mlp_width_that_is_not_a_multiple_of_hidden_size_needs_a_float_mlp_ratio(tmp_path):
    """64 -> 19 MLP units per layer: a config that takes a float mlp_ratio (5.0) gets a from_pretrained directory
    that loads with equal outputs; one that types it int (5.9 on) gets the reason; the vitprune_fast files
    round-trip either way."""
    model = CATALOGUE["hf_dinov2"].build()
    space = vpf.describe(model)
    vpf.prune_(model, vpf.make_plan(space, random_scores(space), keep={"mlp": 0.3}))
    assert {g.size for g in vpf.describe(model).of_kind("mlp")} == {19}
    vpf.save_pruned(model, tmp_path / "m")
    native = json.loads((tmp_path / "m" / "architecture.json").read_text())["native"]
    x = make_input(model, 2)
    if _config_takes(model.config, "mlp_ratio", 0.5):
        back = transformers.Dinov2Model.from_pretrained(str(tmp_path / "m" / "native"), dtype="auto",
                                                        attn_implementation="sdpa").eval()
        with torch.no_grad():
            assert rel_err(model_output(back, x), model_output(model, x)) < 1e-12
    else:
        assert "no mlp_ratio the config takes gives the MLP width 19" in native["reason"]
        assert not (tmp_path / "m" / "native").exists()
    with torch.no_grad():
        assert torch.equal(model_output(vpf.load_pruned(tmp_path / "m"), x), model_output(model, x))


def test_group_names_are_the_library_module_paths():
    for key, base in (("hf_dinov2", ""), ("hf_dinov2_reg", "dinov2_with_registers.")):
        model = CATALOGUE[key].build()
        names = set(vpf.describe(model).groups)
        assert names == {"residual"} | {f"{base}encoder.layer.{i}.{p}" for i in range(2) for p in ("attention", "mlp")}
        assert all(model.get_submodule(n) is not None for n in names - {"residual"})


def test_registers_and_layer_scales_follow_the_residual():
    model = CATALOGUE["hf_dinov2_reg"].build()
    space = vpf.describe(model)
    names = {s.name for s in space.groups["residual"].slices}
    base = "dinov2_with_registers."
    assert {f"{base}embeddings.register_tokens", f"{base}encoder.layer.1.layer_scale2.lambda1"} <= names
    vpf.prune_(model, vpf.make_plan(space, random_scores(space), keep={"residual": 0.5}))
    assert model.dinov2_with_registers.embeddings.register_tokens.shape == (1, 2, 16)
    assert model.classifier.in_features == 32  # [class token | patch mean] of 16 channels


def test_the_backbone_class_is_refused_naming_it():
    cfg = transformers.Dinov2Config(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, mlp_ratio=2)
    with pytest.raises(UnsupportedModelError, match="Dinov2Backbone"):
        vpf.describe(transformers.Dinov2Backbone(cfg))
