"""torchvision ``VisionTransformer`` beyond the per-family suite of test_families.py (removal == masking, layout,
save / load, UP-ViTs fast == reference, DIMAP, DAP): nn.MultiheadAttention's fused inference path and its explicit
path after pruning, the attributes both read, the written-out attention the engines score with, refusals and the
CLI."""
import copy
import json

import pytest
import torch
import torchvision

import vitprune_fast as vpf
from tests.models import make_input, random_scores, rel_err
from vitprune_fast import cli
from vitprune_fast.arch import adapter_for
from vitprune_fast.arch.tv_vit import explicit_attention
from vitprune_fast.errors import UnsupportedModelError
from vitprune_fast.masked import masked_copy
from vitprune_fast.testing import CATALOGUE

pytestmark = pytest.mark.usefixtures("one_thread")



def _forward(model, x, fastpath: bool):
    """The model's output with MultiheadAttention's fused path on or off, and how often the fused op ran."""
    calls = []
    native = torch._native_multi_head_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return native(*args, **kwargs)

    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(fastpath)
    torch._native_multi_head_attention = counted
    try:
        with torch.inference_mode():
            return model(x), len(calls)
    finally:
        torch._native_multi_head_attention = native
        torch.backends.mha.set_fastpath_enabled(before)


@pytest.mark.parametrize("fastpath", [True, False])
def test_pruned_model_equals_masking_on_the_fused_and_the_explicit_path(fastpath):
    """float32 on the fused path (torch's native op runs only in float32 / half), float64 on the explicit one."""
    dtype = torch.float32 if fastpath else torch.float64
    model = CATALOGUE["tv_vit"].build(dtype)
    space = vpf.describe(model)
    x = make_input(model, 3)
    plan = vpf.make_plan(space, random_scores(space), keep={"residual": 0.5, "mlp": 0.4})
    pruned = vpf.prune_(copy.deepcopy(model), plan)
    got, fused = _forward(pruned, x, fastpath)
    want, _ = _forward(masked_copy(model, plan), x, False)
    assert (fused == 2) == fastpath  # two layers: the fused op ran in each, or in none
    assert rel_err(got, want) < (1e-5 if fastpath else 1e-12)
    att = pruned.encoder.layers.encoder_layer_0.self_attention
    assert (att.embed_dim, att.kdim, att.vdim, att.num_heads, att.head_dim) == (16, 16, 16, 4, 4)
    assert pruned.hidden_dim == 16 and pruned.mlp_dim == 26 and pruned.encoder.layers.encoder_layer_1.num_heads == 4


def test_the_written_out_attention_equals_multihead_attention():
    att = CATALOGUE["tv_vit"].build().encoder.layers.encoder_layer_1.self_attention
    x = torch.randn(3, 5, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = att(x, x, x, need_weights=False)[0]
        assert rel_err(explicit_attention(att)(x, x, x, need_weights=False)[0], want) < 1e-12
    with pytest.raises(UnsupportedModelError, match="without a mask, its keys and values one tensor"):
        explicit_attention(att)(x, x.clone(), x)


def test_group_names_are_module_paths_and_the_attention_is_tied():
    model = CATALOGUE["tv_vit"].build()
    space = vpf.describe(model)
    layers = [f"encoder.layers.encoder_layer_{i}" for i in range(2)]
    assert set(space.groups) == {"residual"} | {f"{p}.{n}" for p in layers for n in ("self_attention", "mlp")}
    assert all(space.groups[f"{p}.self_attention"].tied_to == "residual" for p in layers)
    plan = vpf.make_plan(space, random_scores(space), keep=0.5, heads=2)  # tied: every head stays, narrower
    assert set(plan.heads.values()) == {4}
    with pytest.raises(UnsupportedModelError, match="head merge"):  # what a merge would need, refused
        adapter_for(model).regroup_heads_masked(space.groups[f"{layers[0]}.self_attention"], 2)


def test_a_convolutional_stem_is_refused_naming_it():
    from torchvision.models.vision_transformer import ConvStemConfig

    model = torchvision.models.VisionTransformer(32, 8, 1, 2, 16, 32, conv_stem_configs=[ConvStemConfig(8, 3, 2)])
    with pytest.raises(UnsupportedModelError, match="conv_stem_configs"):
        vpf.describe(model)


def test_cli_prunes_a_torchvision_builder(tmp_path):
    """``tv:VisionTransformer`` from --model-args at the data's size and class count, pruned by the screened UP-ViTs
    selection (torchvision initialises its head to zero: the screen has no second-order term and says 0), reloads;
    ``tv:vit_b_16`` builds at the data's size; bad names and arguments are clear errors."""
    out = tmp_path / "p"
    args = json.dumps({"num_layers": 2, "hidden_dim": 32, "mlp_dim": 64, "num_heads": 4})
    assert cli.main(["prune", "--model", "tv:VisionTransformer", "--model-args", json.dumps(
        {"patch_size": 8, **json.loads(args)}), "--data", "digits", "--method", "upvits", "--proxy", "6",
        "--keep", "0.5", "--quiet", "--out", str(out)]) == 0
    pruned = vpf.load_pruned(out)
    assert type(pruned) is torchvision.models.VisionTransformer and pruned.hidden_dim == 16
    assert pruned.num_classes == 10 and pruned.image_size == 32
    model = cli.load_model("tv:vit_b_16", defaults={"num_classes": 10, "img_size": 32})
    assert model.encoder.layers.encoder_layer_0.self_attention.embed_dim == 768 and model.num_classes == 10
    assert model.image_size == 32
    with pytest.raises(cli.UsageError, match="cannot create tv:vit_b_16 .bad model arguments.*num_layers"):
        cli.load_model("tv:vit_b_16", {"num_layers": 1})  # the builder fixes it
    with pytest.raises(cli.UsageError, match="not a torchvision model builder"):
        cli.load_model("tv:vit_b_99")
