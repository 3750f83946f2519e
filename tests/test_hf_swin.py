"""transformers Swin (``SwinForImageClassification`` eager, ``SwinModel`` with SDPA) beyond the per-family suite of
test_families.py (removal == masking for every group kind, save / load, UP-ViTs fast == reference, DIMAP, DAP),
in-place slicing with optimizer state (test_inplace.py) and ONNX (test_io.py): the parts around the blocks (patch
merging, embeddings, tokens), the attributes transformers reads, the ``from_pretrained`` round trip and its refusal,
depth pruning's shift layout, the head merge, the group names, the CLI."""
import copy
import json

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
from vitprune_fast.arch.hf_common import layer_parts
from vitprune_fast.depth import remove_units_
from vitprune_fast.errors import UnsupportedModelError
from vitprune_fast.masked import masked_copy
from vitprune_fast.overrides import replaced_forward
from vitprune_fast.testing import CATALOGUE, randomize_

pytestmark = pytest.mark.usefixtures("one_thread")
KEYS = ["hf_swin", "hf_swin_sdpa"]


def _base(model) -> str:
    return "swin." if hasattr(model, "swin") else ""


def _attention(model, s: int, b: int):
    blk = adapter_for(model)._stages()[s].blocks[b]
    lp = layer_parts(blk)
    return blk.get_submodule(lp.attn), lp


@pytest.mark.parametrize("key", KEYS)
def test_group_names_are_the_library_module_paths(key):
    model = CATALOGUE[key].build()
    b = _base(model)
    names = set(vpf.describe(model).groups)
    mlp = "mlp" if hasattr(model.get_submodule(f"{b}encoder.layers.0.blocks.0"), "mlp") else "intermediate"
    blocks = {f"{b}encoder.layers.{s}.blocks.{i}.{p}" for s in range(2) for i in range(2) for p in ("attention", mlp)}
    assert names == {f"{b}encoder.layers.{s}.residual" for s in range(2)} | blocks
    assert all(model.get_submodule(n.removesuffix(".residual")) is not None for n in names)


def test_merging_embeddings_and_tokens_follow_their_stage_residual(tmp_path):
    """Stage 0's residual: the patch conv, embeddings.norm, the absolute position embeddings and the mask token, and
    the merging's 4C norm and reduction columns (four times); stage 1's: the reduction's rows and the final layernorm
    (a SwinModel). The pruned model equals masking, its attributes follow the tensors, and it is
    rebuilt with its mask token. (5.0 makes
    the position embeddings one token longer than the patches and cannot run them: there they are left out.)"""
    kw = dict(CATALOGUE["hf_swin"].kwargs)
    model = transformers.SwinModel(transformers.SwinConfig(**kw, use_absolute_embeddings=True), use_mask_token=True)
    absolute = model.embeddings.position_embeddings.shape[1] == 64
    if not absolute:
        model = transformers.SwinModel(transformers.SwinConfig(**kw), use_mask_token=True)
    model = randomize_(model.to(torch.float64), 0).eval()
    space = vpf.describe(model)
    res0 = {(s.name, s.repeats) for s in space.groups["encoder.layers.0.residual"].slices}
    assert {("embeddings.patch_embeddings.projection.weight", 1), ("embeddings.norm.weight", 1),
            ("embeddings.mask_token", 1), ("encoder.layers.0.downsample.norm.weight", 4),
            ("encoder.layers.0.downsample.reduction.weight", 4)} <= res0
    assert (("embeddings.position_embeddings", 1) in res0) == absolute
    res1 = {s.name for s in space.groups["encoder.layers.1.residual"].slices}
    assert {"encoder.layers.0.downsample.reduction.weight", "layernorm.weight"} <= res1
    plan = vpf.make_plan(space, random_scores(space), keep={"residual": 0.5, "attn": 0.5})
    x = make_input(model, 2)
    pruned = vpf.prune_(copy.deepcopy(model), plan)
    with torch.no_grad():
        want = kept_features(model, plan, model_output(masked_copy(model, plan), x))
        assert rel_err(model_output(pruned, x), want) < 1e-9
    down = pruned.encoder.layers[0].downsample
    assert down.norm.normalized_shape == (32,) and tuple(down.reduction.weight.shape) == (16, 32)
    assert pruned.embeddings.mask_token.shape[-1] == 8
    assert not absolute or pruned.embeddings.position_embeddings.shape[-1] == 8
    assert pruned.layernorm.normalized_shape == (16,) and pruned.num_features == 16
    att, lp = _attention(pruned, 1, 0)
    assert getattr(att, lp.projs[0]).out_features == 16 and getattr(att, lp.head_size) == 4
    table = [t for n, t in att.named_parameters() if n.endswith("relative_position_bias_table")]
    assert len(table) == 1 and table[0].shape[1] == getattr(att, lp.num_heads) == 4
    back = vpf.load_pruned(vpf.save_pruned(pruned, tmp_path / "m"))  # SwinModel(config, use_mask_token=True) again
    assert back.embeddings.mask_token.shape == (1, 1, 8)
    with torch.no_grad():
        assert torch.equal(model_output(back, x), model_output(pruned, x))


@pytest.mark.parametrize("key", KEYS)
def test_uniform_pruned_model_loads_with_from_pretrained(key, tmp_path):
    """keep=0.5 everywhere: stage widths embed_dim * 2**s, each attention as wide as its stage, one mlp_ratio --
    SwinConfig expresses it; the library's own directory loads with equal outputs."""
    model = CATALOGUE[key].build()
    space = vpf.describe(model)
    vpf.prune_(model, vpf.make_plan(space, random_scores(space), keep=0.5))
    cfg = model.config
    assert (cfg.embed_dim, cfg.hidden_size, list(cfg.num_heads), cfg.mlp_ratio) == (8, 16, [2, 4], 2.0)
    att, lp = _attention(model, 1, 1)
    assert getattr(att, lp.head_size) == 4 and getattr(att, lp.num_heads) == 4
    assert_pretrained_round_trip(model, tmp_path / "m")


def test_attention_narrower_than_its_stage_is_not_written_for_from_pretrained(tmp_path):
    model = CATALOGUE["hf_swin"].build()
    space = vpf.describe(model)
    vpf.prune_(model, vpf.make_plan(space, random_scores(space), keep={"attn": 0.5}))
    assert_not_written_for_pretrained(model, tmp_path / "m", "ties them")


def test_depth_pruning_keeps_each_blocks_shift_through_save_and_load(tmp_path):
    """Removing stage 0's first block leaves its shifted block first: the model equals the unpruned one with that
    block skipped, config.depths follows, and the rebuilt model (whose config would shift by index) keeps the
    shift."""
    model = CATALOGUE["hf_swin"].build()
    x = make_input(model, 2)
    first = model.swin.encoder.layers[0].blocks[0]
    with torch.no_grad(), replaced_forward([(first, adapter_for(model).skipped_block)]):
        want = model_output(model, x)
    remove_units_(model, [("block", 0)])
    assert model.config.depths == [1, 2] and model.swin.encoder.layers[0].blocks[0].shift_size == 2
    with torch.no_grad():
        assert rel_err(model_output(model, x), want) < 1e-12
    vpf.save_pruned(model, tmp_path / "m")
    back = vpf.load_pruned(tmp_path / "m")
    assert back.swin.encoder.layers[0].blocks[0].shift_size == 2
    with torch.no_grad():
        assert torch.equal(model_output(back, x), model_output(model, x))


@pytest.mark.parametrize("key", KEYS)
def test_head_merge_equals_masking_where_the_attention_has_a_scale(key):
    """The later attention passes ``scaling`` on: a merge (stage 1: 4 heads -> 2) equals the masked copy regrouped
    at the original per-dim scale. 5.0's divides by sqrt(attention_head_size) itself: the masked copy cannot say
    that, and masked_copy refuses it by name, while prune_ merges (the scale folded into q) all the same."""
    model = CATALOGUE[key].build()
    space = vpf.describe(model)
    x = make_input(model, 2)
    plan = vpf.make_plan(space, random_scores(space), keep=0.5, heads=2)
    pruned = vpf.prune_(copy.deepcopy(model), plan)
    att, lp = _attention(pruned, 1, 0)
    assert getattr(att, lp.num_heads) == 2 and getattr(att, lp.head_size) == 8  # 16 of 32 dims kept
    if lp.scale is None:
        with pytest.raises(UnsupportedModelError, match="computes its scale from its head size"):
            masked_copy(model, plan)
        return
    with torch.no_grad():
        got = model_output(pruned, x)
        assert rel_err(got, kept_features(model, plan, model_output(masked_copy(model, plan), x))) < 1e-9
        assert rel_err(got, kept_features(model, plan, model_output(model, x))) > 1e-4


def test_cli_scores_a_headless_swin_by_its_features_and_prunes_it(tmp_path, capsys):
    from vitprune_fast import cli

    args = json.dumps({"patch_size": 4, "embed_dim": 16, "depths": [2, 2], "num_heads": [2, 4], "window_size": 4,
                       "mlp_ratio": 2.0})
    out = tmp_path / "p"
    assert cli.main(["prune", "--model", "hf:SwinModel", "--model-args", args, "--data", "digits", "--method",
                     "upvits", "--proxy", "4", "--keep", "0.5", "--quiet", "--out", str(out)]) == 0
    assert "has no classifier" in capsys.readouterr().err
    pruned = vpf.load_pruned(out)
    assert type(pruned) is transformers.SwinModel and pruned.config.embed_dim == 8
    back = transformers.SwinModel.from_pretrained(str(out / "native"))
    assert back.config.hidden_size == 16 and back.config.embed_dim == 8


def test_load_builds_on_the_meta_device_and_computes_the_position_index(tmp_path, monkeypatch):
    """The later layout's relative_position_index is a non-persistent buffer (not in the file): the adapter computes
    it after the meta build, so load_pruned never builds (and randomly initialises) the model on the CPU."""
    from vitprune_fast import io

    model = CATALOGUE["hf_swin_sdpa"].build()
    space = vpf.describe(model)
    vpf.prune_(model, vpf.make_plan(space, random_scores(space), keep={"residual": 0.5, "mlp": 0.5}))
    vpf.save_pruned(model, tmp_path / "m")
    devices = []
    build = io._build
    monkeypatch.setattr(io, "_build", lambda arch, device="meta": devices.append(str(device)) or build(arch, device))
    back = vpf.load_pruned(tmp_path / "m")
    assert devices == ["meta"]
    for (n, b), (_, b2) in zip(model.named_buffers(), back.named_buffers(), strict=True):
        assert torch.equal(b, b2), n
    x = make_input(model, 2)
    with torch.no_grad():
        assert torch.equal(model_output(back, x), model_output(model, x))
