"""torchvision ``SwinTransformer`` (V1: ``swin_t``'s class; V2: ``swin_v2_t``'s blocks and merging) beyond the
per-family suite of test_families.py (removal == masking for every group kind, layout, save / load, UP-ViTs fast ==
reference, DIMAP, DAP) and in-place slicing with optimizer state (test_inplace.py): the merging's norm on either
side, the tied attention, depth pruning's shift layout, a headless backbone, the image-size attribute, the CLI."""
import copy
import json

import pytest
import torch
import torchvision

import vitprune_fast as vpf
from tests.models import kept_features, make_input, random_scores, rel_err
from vitprune_fast import cli
from vitprune_fast.arch import adapter_for, model_output
from vitprune_fast.depth import remove_units_
from vitprune_fast.errors import PlanError, UnsupportedModelError
from vitprune_fast.masked import masked_copy
from vitprune_fast.overrides import replaced_forward
from vitprune_fast.testing import CATALOGUE

pytestmark = pytest.mark.usefixtures("one_thread")
KEYS = ["tv_swin", "tv_swin_v2"]


@pytest.mark.parametrize("key", KEYS)
def test_group_names_are_module_paths_and_each_attention_is_tied_to_its_stage(key):
    model = CATALOGUE[key].build()
    space = vpf.describe(model)
    blocks = {f"features.{p}.{b}.{k}" for p in (1, 3) for b in range(2) for k in ("attn", "mlp")}
    assert set(space.groups) == {"features.1.residual", "features.3.residual"} | blocks
    assert all(model.get_submodule(n.removesuffix(".residual")) is not None for n in space.groups)
    assert {g.tied_to for g in space.groups.values() if g.kind == "attn"} == {"features.1.residual",
                                                                             "features.3.residual"}


@pytest.mark.parametrize("key", KEYS)
def test_the_merging_norm_follows_the_stage_it_normalises(key):
    """V1's merging normalises its 4C input (this stage's residual, four times); V2's its 2C output (the next
    stage's). After pruning: the shapes, the merging's ``dim``, the final norm and the head follow; every head keeps
    the same number of dims (the attention's width is its stage's), and the model equals masking."""
    model = CATALOGUE[key].build()
    v2 = key.endswith("v2")
    space = vpf.describe(model)
    res0 = {(s.name, s.repeats) for s in space.groups["features.1.residual"].slices}
    res1 = {(s.name, s.repeats) for s in space.groups["features.3.residual"].slices}
    assert ("features.2.reduction.weight", 4) in res0 and ("features.2.reduction.weight", 1) in res1
    assert (("features.2.norm.weight", 1) in res1) == v2 and (("features.2.norm.weight", 4) in res0) != v2
    plan = vpf.make_plan(space, random_scores(space), keep={"residual": 0.5, "mlp": 0.5})
    x = make_input(model, 2)
    pruned = vpf.prune_(copy.deepcopy(model), plan)
    with torch.no_grad():
        assert rel_err(model_output(pruned, x), model_output(masked_copy(model, plan), x)) < 1e-9
    down = pruned.features[2]
    assert tuple(down.reduction.weight.shape) == (16, 32) and down.dim == 8
    assert down.norm.normalized_shape == ((16,) if v2 else (32,))
    assert pruned.norm.normalized_shape == (16,) and pruned.head.in_features == 16
    attn = pruned.features[3][0].attn
    assert attn.qkv.out_features == 3 * 16 and attn.num_heads == 4
    assert attn.relative_position_bias_table.shape[-1] == 4 if not v2 else attn.cpb_mlp[2].out_features == 4


def test_a_plan_splitting_heads_unevenly_and_a_head_merge_are_refused():
    model = CATALOGUE["tv_swin"].build()
    space = vpf.describe(model)
    g = space.groups["features.1.0.attn"]  # 2 heads x 8 dims, tied to features.1.residual
    uneven = torch.cat([torch.arange(0, 6), torch.arange(8, 10)])  # 6 + 2 dims
    with pytest.raises(PlanError):
        vpf.prune_(copy.deepcopy(model), vpf.Plan.from_space(
            space, {"features.1.residual": torch.arange(8), g.name: uneven}))
    with pytest.raises(UnsupportedModelError, match="head merge"):
        adapter_for(model).regroup_heads_masked(g, 1)


@pytest.mark.parametrize("key", KEYS)
def test_depth_pruning_keeps_each_blocks_shift_through_save_and_load(key, tmp_path):
    model = CATALOGUE[key].build()
    x = make_input(model, 2)
    with torch.no_grad(), replaced_forward([(model.features[1][0], adapter_for(model).skipped_block)]):
        want = model_output(model, x)
    remove_units_(model, [("block", 0)])
    assert len(model.features[1]) == 1 and model.features[1][0].attn.shift_size == [2, 2]
    with torch.no_grad():
        assert rel_err(model_output(model, x), want) < 1e-12
    vpf.save_pruned(model, tmp_path / "m")
    back = vpf.load_pruned(tmp_path / "m")
    assert back.features[1][0].attn.shift_size == [2, 2] and back.image_size == 32
    with torch.no_grad():
        assert torch.equal(model_output(back, x), model_output(model, x))


def test_a_headless_backbone_scores_its_features_and_round_trips(tmp_path):
    """``head = nn.Identity()``: the output is the last stage's channels (the features objective, a removed channel
    a removed feature), fast == reference, and the saved model rebuilds without a head."""
    model = CATALOGUE["tv_swin"].build()
    model.head = torch.nn.Identity()
    adapter = adapter_for(model)
    assert adapter.output_group() == "features.3.residual" and adapter.num_classes() == 0
    x = make_input(model, 3)
    comps = ("residual", "attn", "mlp")
    fast = vpf.upvits_scores(model, x, components=comps, progress=False)
    ref = vpf.upvits_scores(model, x, components=comps, engine="reference", progress=False)
    for name in fast:
        assert (fast[name] - ref[name]).abs().max() <= 1e-9 * ref[name].abs().max(), name
    space = vpf.describe(model)
    plan = vpf.make_plan(space, fast, keep=0.5)
    pruned = vpf.prune_(copy.deepcopy(model), plan)
    vpf.save_pruned(pruned, tmp_path / "m")
    back = vpf.load_pruned(tmp_path / "m")
    assert isinstance(back.head, torch.nn.Identity)
    with torch.no_grad():
        got = model_output(back, x)
        assert torch.equal(got, model_output(pruned, x))
        assert rel_err(got, kept_features(model, plan, model_output(masked_copy(model, plan), x))) < 1e-9


def test_cli_prunes_the_class_and_builds_a_builder_at_the_datas_size(tmp_path):
    """``tv:SwinTransformer`` from --model-args at the data's class count, the image size becoming the model's
    ``image_size`` (a Swin takes any size), pruned by UP-ViTs and reloaded; ``tv:swin_v2_t`` builds with it too."""
    out = tmp_path / "p"
    args = {"patch_size": [4, 4], "embed_dim": 16, "depths": [2, 2], "num_heads": [2, 4], "window_size": [4, 4]}
    assert cli.main(["prune", "--model", "tv:SwinTransformer", "--model-args", json.dumps(args), "--data", "digits",
                     "--method", "upvits", "--proxy", "4", "--keep", "0.5", "--quiet", "--out", str(out)]) == 0
    pruned = vpf.load_pruned(out)
    assert type(pruned) is torchvision.models.SwinTransformer and pruned.features[0][0].out_channels == 8
    assert pruned.head.out_features == 10 and pruned.image_size == 32
    v2 = cli.load_model("tv:swin_v2_t", defaults={"num_classes": 10, "img_size": 32})
    assert v2.image_size == 32 and adapter_for(v2).input_size() == (3, 32, 32) and v2.head.out_features == 10
    assert adapter_for(torchvision.models.swin_t()).input_size() == (3, 224, 224)
