"""The features objective for models without a classifier: fast == reference (float64), its definition, its
screen, the choice by model, and the CLI choosing it by itself."""
import copy
import json

import pytest
import timm
import torch

import vitprune_fast as vpf
from vitprune_fast import cli
from vitprune_fast.arch import adapter_for
from vitprune_fast.errors import ConfigError
from vitprune_fast.score.objective import FeatureObjective, KLObjective, objective_for
from vitprune_fast.score.screened import selection_differences
from vitprune_fast.testing import CATALOGUE, randomize_

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = ("residual", "attn", "mlp", "blocks")
_VIT = dict(img_size=32, patch_size=8, num_classes=0, depth=2, embed_dim=24, num_heads=3, mlp_ratio=2)
HEADLESS = {
    "vit": ("deit_tiny_patch16_224", _VIT),
    "vit_avg_no_norm": ("vit_small_patch16_224", dict(_VIT, class_token=False, global_pool="avg", final_norm=False)),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, window_size=4, embed_dim=8, depths=(1, 1),
                                                  num_heads=(1, 2), num_classes=0)),
}


def _headless(key: str, seed: int = 0) -> torch.nn.Module:
    if key == "hf_dinov2":  # transformers Dinov2Model: its pooler_output (the final class token), SDPA attention
        return CATALOGUE[key].build(seed=seed)
    name, kwargs = HEADLESS[key]
    return randomize_(timm.create_model(name, pretrained=False, **kwargs).double(), seed).eval()


def _images(n: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("key", [*sorted(HEADLESS), "hf_dinov2"])
def test_features_fast_engine_equals_reference_in_float64(key):
    """Every component, on headless models: pooled cls token, average pool without a final norm (the removed
    residual channel still reaches the output: zeroed as removal leaves it), a two-stage Swin, transformers'
    Dinov2Model (layer scale on both branches)."""
    model, x = _headless(key), _images()
    fast = vpf.upvits_scores(model, x, components=ALL, progress=False, batch_size=3)
    ref = vpf.upvits_scores(model, x, components=ALL, engine="reference", progress=False, batch_size=3)
    assert fast.keys() == ref.keys()
    for name in fast:
        scale = ref[name].abs().max()
        assert scale > 0, name
        assert (fast[name] - ref[name]).abs().max() <= 1e-9 * scale, name


def test_features_objective_is_its_definition_and_chunking_does_not_change_it():
    """One MLP unit's score is sum_i sum_f (student - teacher)^2 / var_f of the model with the unit removed, the
    variance over all proxy images: the same whatever the chunk size."""
    model, x = _headless("vit"), _images(6)
    scores = vpf.upvits_scores(model, x, components=("mlp",), progress=False, batch_size=6)
    chunked = vpf.upvits_scores(model, x, components=("mlp",), progress=False, batch_size=4)
    assert torch.allclose(chunked["blocks.1.mlp"], scores["blocks.1.mlp"], rtol=1e-12, atol=0)
    space = vpf.describe(model)
    keep = torch.arange(1, space.groups["blocks.1.mlp"].size)  # unit 0 removed
    pruned = vpf.prune_(copy.deepcopy(model), vpf.Plan.from_space(space, {"blocks.1.mlp": keep}))
    with torch.no_grad():
        t, s = model(x), pruned(x)
    by_hand = ((s - t).square() / t.var(0, correction=0)).sum()
    assert torch.allclose(scores["blocks.1.mlp"][0], by_hand, rtol=1e-10)


def test_a_unit_whose_output_is_unused_scores_zero():
    """An MLP unit whose fc2 column is zero changes no feature: score 0 (the fast engine's rank-1 change is exactly
    zero; the reference's pruned copy sums fc2 over one input fewer, so it is 0 up to float64 rounding); one that is
    used does not."""
    model = _headless("vit")
    with torch.no_grad():
        model.blocks[0].mlp.fc2.weight[:, 3] = 0
    x = _images()
    for engine in ("fast", "reference"):
        s = vpf.upvits_scores(model, x, components=("mlp",), engine=engine, progress=False)["blocks.0.mlp"]
        used = s[torch.arange(len(s)) != 3]
        assert (used > 0).all(), engine
        assert s[3] == 0 if engine == "fast" else 0 <= s[3] < 1e-15 * used.min(), (engine, s[3], used.min())


def test_features_scores_do_not_change_when_the_output_is_rescaled():
    """Normalising by the teacher's variance: a model whose features are all 3x larger scores the same."""
    model, x = _headless("vit"), _images()
    before = vpf.upvits_scores(model, x, components=("residual", "mlp"), progress=False)
    with torch.no_grad():
        model.norm.weight.mul_(3)
        model.norm.bias.mul_(3)
    after = vpf.upvits_scores(model, x, components=("residual", "mlp"), progress=False)
    for name in before:
        assert torch.allclose(after[name], before[name], rtol=1e-9), name


def test_feature_cotangents_factor_the_objective_exactly():
    """The screen's factors: 1/2 sum_r (u_r^T dz)^2 is the objective itself for any output change dz (it is
    quadratic)."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(4, 7, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 7, dtype=torch.float64)
    obj = FeatureObjective().fit([t])
    dz = torch.randn(4, 7, generator=g, dtype=torch.float64)
    u = obj.cotangents(t, [], 1e-3, None)  # [R, n, F]
    second = 0.5 * (u * dz).sum(-1).square().sum()
    assert torch.allclose(second, obj(t, t + dz, 1), rtol=1e-12)


def test_screened_selection_equals_exact_with_the_features_objective():
    model, x = _headless("vit"), _images(6)
    spec = vpf.PlanSpec(keep=0.5)
    plan, report = vpf.upvits_select(model, x, spec, progress=False, calibration=4, audit=8)
    exact = vpf.upvits_scores(model, x, progress=False)
    want = vpf.plan_from_scores(vpf.describe(model), exact, spec)
    assert not selection_differences(vpf.describe(model), exact, plan, want, spec)
    assert report["scored_exactly"] < report["candidates"]


def test_the_objective_is_chosen_by_the_model_and_refused_where_it_makes_no_sense():
    headless = _headless("vit")
    classifier = randomize_(timm.create_model("deit_tiny_patch16_224", pretrained=False, **dict(_VIT, num_classes=5))
                            .double()).eval()
    assert isinstance(objective_for(None, adapter_for(headless).classifier_weights()), FeatureObjective)
    assert isinstance(objective_for(None, adapter_for(classifier).classifier_weights()), KLObjective)
    x = _images(4)
    auto = vpf.upvits_scores(classifier, x, components=("mlp",), progress=False)
    kl = vpf.upvits_scores(classifier, x, components=("mlp",), progress=False, objective="kl")
    assert all(torch.equal(auto[k], kl[k]) for k in auto)
    feats = vpf.upvits_scores(classifier, x, components=("mlp",), progress=False, objective="features")
    assert not torch.allclose(feats["blocks.0.mlp"], kl["blocks.0.mlp"])  # logits' distortion, not their KL
    with pytest.raises(ConfigError, match="needs a classifier"):
        vpf.upvits_scores(headless, x, components=("mlp",), progress=False, objective="kl")
    with pytest.raises(ConfigError, match="objective must be one of"):
        vpf.upvits_scores(headless, x, components=("mlp",), progress=False, objective="mse")
    with pytest.raises(ConfigError, match="at least 2 proxy images"):
        vpf.upvits_scores(headless, x[:1], components=("mlp",), progress=False)


def test_cli_scores_a_headless_model_by_its_features_and_says_so(tmp_path, capsys):
    args = json.dumps({"depth": 2, "embed_dim": 24, "num_heads": 3, "patch_size": 8, "num_classes": 0})
    out = tmp_path / "s.safetensors"
    assert cli.main(["score", "--model", "deit_tiny_patch16_224", "--model-args", args, "--data", "digits",
                     "--method", "upvits", "--proxy", "6", "--quiet", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "has no classifier" in err and "--objective features" in err
    auto = cli.load_scores(out)
    assert cli.main(["score", "--model", "deit_tiny_patch16_224", "--model-args", args, "--data", "digits",
                     "--method", "upvits", "--proxy", "6", "--quiet", "--objective", "features",
                     "--out", str(out)]) == 0
    assert "has no classifier" not in capsys.readouterr().err
    explicit = cli.load_scores(out)
    assert all(torch.equal(auto[k], explicit[k]) for k in auto) and (auto["blocks.1.mlp"] >= 0).all()
    for method, objective, says in (("upvits", "kl", "needs a classifier"), ("magnitude", "features", "--objective")):
        with pytest.raises(SystemExit) as e:
            cli.main(["score", "--model", "deit_tiny_patch16_224", "--model-args", args, "--data", "digits",
                      "--method", method, "--proxy", "6", "--quiet", "--objective", objective, "--out", str(out)])
        assert e.value.code == 2 and says in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ the final tokens
TOKEN_MODELS = ("vit", "swin", "hf_dinov2", "hf_clip_eager", "hf_swin_sdpa", "tv_vit", "tv_swin_v2")


def _token_model(key: str) -> torch.nn.Module:
    return _headless(key) if key in HEADLESS else CATALOGUE[key].build()


@pytest.mark.parametrize("key", TOKEN_MODELS)
def test_final_tokens_fast_engine_equals_reference_in_float64(key):
    """The tokens objective: the fast engine's trunk ending in the adapter's final tokens against the library's own
    call (forward_features, last_hidden_state -- CLIP's before post_layernorm --, torchvision's encoder output) per
    removed candidate; and it measures something else than the pooled output."""
    model, x = _token_model(key), _images(3)
    comps = ("residual", "attn", "mlp")
    fast = vpf.upvits_scores(model, x, components=comps, progress=False, objective="tokens")
    ref = vpf.upvits_scores(model, x, components=comps, engine="reference", progress=False, objective="tokens")
    pooled = vpf.upvits_scores(model, x, components=comps, progress=False,
                               objective="features" if not adapter_for(model).classifier_weights() else "kl")
    assert fast.keys() == ref.keys()
    for name in fast:
        scale = ref[name].abs().max()
        assert scale > 0, name
        assert (fast[name] - ref[name]).abs().max() <= 1e-9 * scale, name
        assert not torch.allclose(fast[name], pooled[name]), name


def test_final_tokens_objective_is_its_definition():
    """One MLP unit's score is sum_i sum_t sum_f (student - teacher)^2 / var_f of forward_features with the unit
    removed, var_f over every image and token."""
    model, x = _headless("vit"), _images(4)
    scores = vpf.upvits_scores(model, x, components=("mlp",), progress=False, objective="tokens")
    space = vpf.describe(model)
    keep = torch.arange(1, space.groups["blocks.0.mlp"].size)
    pruned = vpf.prune_(copy.deepcopy(model), vpf.Plan.from_space(space, {"blocks.0.mlp": keep}))
    with torch.no_grad():
        t, s = model.forward_features(x), pruned.forward_features(x)
    assert t.dim() == 3
    by_hand = ((s - t).square() / t.reshape(-1, t.shape[-1]).var(0, correction=0)).sum()
    assert torch.allclose(scores["blocks.0.mlp"][0], by_hand, rtol=1e-10)


def test_final_tokens_refusals():
    """A family whose adapter names no final tokens, and the screened engine, refuse clearly."""
    cait = CATALOGUE["cait"].build()
    with pytest.raises(vpf.UnsupportedModelError, match="final-tokens objective is not supported"):
        vpf.upvits_scores(cait, _images(2), components=("mlp",), progress=False, objective="tokens")
    with pytest.raises(ConfigError, match="exact engines"):
        vpf.upvits_select(_headless("vit"), _images(4), vpf.PlanSpec(keep=0.5), progress=False, objective="tokens")
