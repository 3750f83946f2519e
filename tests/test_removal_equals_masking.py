"""Removal == masking in float64, and the pruned model is still a consistent stock timm model (README, 'What is
exact, and the choices we made')."""
import copy

import pytest
import torch
from models import SWIN_KEYS, VIT_KEYS, make_input, make_model, random_scores, rel_err

import vitprune_fast as vpf
from vitprune_fast.masked import masked_copy

KEEPS = {
    "residual": {"residual": 0.5},
    "attn": {"attn": 0.5},
    "mlp": {"mlp": 0.3},
    "all": {"residual": 0.6, "attn": 0.5, "mlp": 0.4},
}


def _check(key, keep, **plan_kw):
    model = make_model(key)
    x = make_input(model)
    space = vpf.describe(model)
    plan = vpf.make_plan(space, random_scores(space), keep=keep, **plan_kw)
    ref = masked_copy(model, plan)(x)
    dense = model(x)
    vpf.prune_(model, plan)
    out = model(x)
    assert out.dtype == torch.float64
    assert rel_err(out, ref) < 1e-9
    assert rel_err(out, dense) > 1e-6  # the plan did change the function: the check is not vacuous
    return model, x


@pytest.mark.parametrize("key", VIT_KEYS + SWIN_KEYS)
@pytest.mark.parametrize("kind", list(KEEPS))
def test_dims_removal_equals_masking(key, kind):
    _check(key, KEEPS[kind], attn_mode="dims")


@pytest.mark.parametrize("key", VIT_KEYS + SWIN_KEYS)
@pytest.mark.parametrize("kind", ["attn", "all"])
def test_whole_head_removal_equals_masking(key, kind):
    before = vpf.describe(make_model(key)).groups
    model, _ = _check(key, KEEPS[kind], attn_mode="heads")
    for g in vpf.describe(model).of_kind("attn"):
        old = before[g.name]
        assert g.head_dim == old.head_dim and g.num_heads == max(1, round(old.num_heads * 0.5))
        attn = model.get_submodule(g.module)
        if hasattr(attn, "relative_position_bias_table"):
            assert attn.relative_position_bias_table.shape[1] == attn.num_heads


@pytest.mark.parametrize("key", VIT_KEYS + SWIN_KEYS)
def test_head_merge_equals_regrouped_masked_model(key):
    """UP-ViTs merge: equal to the original with heads re-grouped and removed dims zeroed (same per-dim scale)."""
    heads = 1
    _check(key, {"attn": 0.5, "mlp": 0.5}, heads=heads)


@pytest.mark.parametrize("key", VIT_KEYS + SWIN_KEYS)
def test_stock_timm_model_with_consistent_attributes(key):
    model = make_model(key)
    classes = {n: type(m) for n, m in model.named_modules()}
    space = vpf.describe(model)
    vpf.prune_(model, vpf.make_plan(space, random_scores(space), keep=KEEPS["all"]))
    assert {n: type(m) for n, m in model.named_modules()} == classes
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            assert (m.out_features, m.in_features) == tuple(m.weight.shape), name
        if isinstance(m, torch.nn.LayerNorm):
            assert m.normalized_shape == tuple(m.weight.shape), name
        if hasattr(m, "qkv") and hasattr(m, "num_heads"):
            attn_dim = m.qkv.out_features // 3
            hd = attn_dim // m.num_heads
            assert attn_dim % m.num_heads == 0
            assert m.scale == pytest.approx(hd ** -0.5)
            assert m.proj.in_features == attn_dim
            if hasattr(m, "attn_dim"):
                assert (m.attn_dim, m.head_dim) == (attn_dim, hd)
    fresh = vpf.describe(model)  # the pruned model is describable again (prunable again)
    assert all(g.size > 0 for g in fresh.groups.values())


@pytest.mark.parametrize("key", VIT_KEYS + SWIN_KEYS)
def test_fused_and_explicit_attention_agree_after_head_dim_change(key):
    """SDPA uses 1/sqrt(head_dim) implicitly; the scale fold makes both timm paths compute the same."""
    model = make_model(key)
    x = make_input(model)
    space = vpf.describe(model)
    vpf.prune_(model, vpf.make_plan(space, random_scores(space), keep={"attn": 0.5}))
    outs = []
    for fused in (True, False):
        for m in model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = fused
        outs.append(model(x))
    assert rel_err(outs[0], outs[1]) < 1e-10


def test_swin_patch_merging_layout():
    """Stage-0 channel c lives at {k*C + c} of the next PatchMerging's 4C input."""
    model = make_model("swin")
    space = vpf.describe(model)
    g = space.groups["layers.0.residual"]
    merge = [s for s in g.slices if s.name == "layers.1.downsample.reduction.weight"][0]
    assert (merge.repeats, merge.stride, merge.dim) == (4, 16, 1)
    plan = vpf.make_plan(space, random_scores(space), keep={"layers.0.residual": 0.25})
    before = copy.deepcopy(model.layers[1].downsample.reduction.weight)
    vpf.prune_(model, plan)
    kept = plan.keep["layers.0.residual"]
    want = before[:, torch.cat([kept + 16 * k for k in range(4)])]
    assert torch.equal(model.layers[1].downsample.reduction.weight, want)
    assert model.layers[1].downsample.dim == 4 and model.layers[0].dim == 4
