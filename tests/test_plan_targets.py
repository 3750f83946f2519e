"""Plan targets (vitprune_fast.targets): stock timm shapes, FLOPs budgets, per-group head counts, bad input."""
import copy
import math

import pytest
import timm
import torch
from models import make_model, random_scores

import vitprune_fast as vpf
from vitprune_fast.metrics import count_flops, count_params

pytestmark = pytest.mark.usefixtures("one_thread")

VIT_KW = dict(img_size=32, num_classes=10)
SWIN_KW = dict(img_size=32, patch_size=2, window_size=4, depths=(1, 1, 2, 1), num_classes=10)


def _snapshot(model):
    """Everything a target function must leave alone: tensors, mode, fused-attention flags, repr."""
    return ({k: v.clone() for k, v in model.state_dict().items()}, model.training,
            [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")], repr(model))


def _assert_untouched(model, snap):
    state, training, fused, text = _snapshot(model)
    assert state.keys() == snap[0].keys() and all(torch.equal(state[k], snap[0][k]) for k in state)
    assert (training, fused, text) == snap[1:]


def _head_layouts(model):
    """(num_heads, head_dim) of every attention (timm's Swin WindowAttention has no head_dim attribute)."""
    return [(m.num_heads, m.qkv.out_features // (3 * m.num_heads)) for m in model.modules()
            if hasattr(m, "qkv") and hasattr(m, "num_heads")]


# ------------------------------------------------------------------------------------------------ stock shapes
@pytest.mark.parametrize("source,target,kw", [
    ("deit_small_patch16_224", "deit_tiny_patch16_224", dict(VIT_KW, depth=2)),  # 384 -> 192, 6 -> 3 heads
    ("deit_base_patch16_224", "deit_small_patch16_224", dict(VIT_KW, depth=1)),  # 768 -> 384, 12 -> 6 heads
    ("swin_large_patch4_window7_224", "swin_tiny_patch4_window7_224", SWIN_KW),  # 192 -> 96, (6..48) -> (3..24)
])
def test_pruned_to_stock_shape_has_stock_param_count(source, target, kw):
    torch.manual_seed(0)
    model = timm.create_model(source, **kw).eval()
    space = vpf.describe(model)
    plan, notes = vpf.plan_for_shape(model, target, random_scores(space))
    assert "depth differs" in notes[0]  # kw sets a smaller depth than the stock target's
    vpf.prune_(model, plan)
    stock = timm.create_model(target, **kw).eval()  # the same kwargs: only the widths differ from `source`
    assert count_params(model) == count_params(stock)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in stock.state_dict().items()}
    assert _head_layouts(model) == _head_layouts(stock)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_shape_targets_ratios_heads_and_notes():
    with torch.device("meta"):
        small = timm.create_model("deit_small_patch16_224")
        swin_t = timm.create_model("swin_tiny_patch4_window7_224")
    keep, heads, notes = vpf.shape_targets(small, "deit_tiny_patch16_224")
    assert set(keep) == set(vpf.describe(small).groups) and set(keep.values()) == {0.5}
    assert set(heads.values()) == {3} and len(heads) == 12 and notes == []
    keep, heads, notes = vpf.shape_targets(swin_t, "swin_small_patch4_window7_224")  # same widths, deeper
    assert set(keep.values()) == {1.0} and "depth differs" in notes[0]
    assert [heads[f"layers.{i}.blocks.0.attn"] for i in range(4)] == [3, 6, 12, 24]


FIVE_STAGES = dict(img_size=64, patch_size=2, depths=(1,) * 5, num_heads=(6, 12, 24, 48, 96))
THREE_STAGES = dict(img_size=64, patch_size=2, depths=(1,) * 3, num_heads=(6, 12, 24))


@pytest.mark.parametrize("source,kw,target,needle", [
    ("deit_small_patch16_224", {}, "deit_base_patch16_224", "would grow from 384 to 768"),  # bigger than the model
    ("swin_base_patch4_window7_224", {}, "swin_tiny_patch4_window7_224", "4 heads, which cannot be merged into 3"),
    ("swin_large_patch4_window7_224", FIVE_STAGES, "swin_tiny_patch4_window7_224", "different number of stages"),
    ("swin_large_patch4_window7_224", THREE_STAGES, "swin_tiny_patch4_window7_224", "different number of stages"),
    ("deit_small_patch16_224", {}, "swin_tiny_patch4_window7_224", "is a swin model"),
    ("deit_small_patch16_224", {}, "no_such_model_xyz", "unknown target model 'no_such_model_xyz'"),
    ("deit_small_patch16_224", {}, None, "unknown target model None"),
])
def test_shape_targets_bad_targets_raise(source, kw, target, needle):
    with torch.device("meta"):
        model = timm.create_model(source, **kw)
    with pytest.raises(vpf.PlanError, match=needle):
        vpf.shape_targets(model, target)


@pytest.mark.parametrize("key,target,needle", [
    ("deit", "deit_tiny_patch16_224", "would grow from 48 to 192"),
    ("swin", "swin_tiny_patch4_window7_224", "no counterpart in the model"),  # 2 stages vs 4
])
def test_plan_for_shape_bad_target_leaves_model_untouched(key, target, needle):
    model = make_model(key)
    snap = _snapshot(model)
    with pytest.raises(vpf.PlanError, match=needle):
        vpf.plan_for_shape(model, target, random_scores(vpf.describe(model)))
    _assert_untouched(model, snap)


def test_plan_for_shape_needs_scores_for_narrowed_groups():
    model = timm.create_model("deit_small_patch16_224", **dict(VIT_KW, depth=1))
    snap = _snapshot(model)
    with pytest.raises(vpf.PlanError, match="no scores for group"):
        vpf.plan_for_shape(model, "deit_tiny_patch16_224", {})
    _assert_untouched(model, snap)


# ----------------------------------------------------------------------------------------------- FLOPs budgets
def _step_widths(space, attn_mode):
    """Per group, the count that ``round(r * n)`` makes from the keep ratio r: the staircase's breakpoints."""
    ns = set()
    for g in space.groups.values():
        ns.add((g.num_heads if attn_mode == "heads" else g.head_dim) if g.kind == "attn" else g.size)
    return ns


def _flops_frac(model, space, r, attn_mode, dense):
    plan = vpf.make_plan(space, random_scores(space, seed=3), keep=r, attn_mode=attn_mode)
    return count_flops(vpf.prune_(copy.deepcopy(model), plan)) / dense


@pytest.mark.parametrize("target,attn_mode", [(0.5, "dims"), (0.4, "dims"), (0.35, "heads")])  # hi, lo, hi nearer
def test_keep_for_flops_is_nearest_reachable_fraction(target, attn_mode):
    model = make_model("deit", torch.float32)
    space = vpf.describe(model)
    dense = count_flops(model)
    snap = _snapshot(model)
    r, achieved = vpf.keep_for_flops(model, target, attn_mode=attn_mode)
    _assert_untouched(model, snap)
    # the ratio gives the stated fraction with any scores (the CLI plans with the real ones)
    assert _flops_frac(model, space, r, attn_mode, dense) == pytest.approx(achieved, abs=1e-12)
    # stated tolerance: no neighbouring step of the staircase is nearer, so the miss is at most half a step
    cuts = sorted({(k + 0.5) / n for n in _step_widths(space, attn_mode) for k in range(n)})
    below = max(c for c in cuts if c < r)
    above = min(c for c in cuts if c > r)
    lower = max([c for c in cuts if c < below] + [0.0])
    upper = min([c for c in cuts if c > above] + [1.0])
    f_prev = _flops_frac(model, space, (lower + below) / 2, attn_mode, dense)
    f_next = _flops_frac(model, space, (above + upper) / 2, attn_mode, dense)
    assert f_prev < achieved < f_next  # really the neighbouring steps
    assert abs(achieved - target) <= min(abs(f_prev - target), abs(f_next - target))
    assert abs(achieved - target) < 0.05  # one step of this 48-wide model is well under 10 % of its FLOPs


def test_keep_for_flops_full_budget_keeps_everything():
    model = make_model("deit", torch.float32)
    r, achieved = vpf.keep_for_flops(model, 1.0, iters=4)
    assert achieved == 1.0 and r > 0.98


def test_keep_for_flops_other_kinds_stay_whole():
    model = make_model("deit", torch.float32)
    r, achieved = vpf.keep_for_flops(model, 0.8, kinds="mlp", iters=8)
    space = vpf.describe(model)
    plan = vpf.make_plan(space, random_scores(space), keep={"mlp": r})
    assert set(plan.keep) == {f"blocks.{i}.mlp" for i in range(3)}
    assert count_flops(vpf.prune_(model, plan)) / count_flops(make_model("deit", torch.float32)) == achieved


@pytest.mark.parametrize("kwargs,needle", [
    (dict(target=0), r"FLOPs target must be in \(0, 1\], got 0"),
    (dict(target=1.5), r"must be in \(0, 1\]"),
    (dict(target=math.nan), r"must be in \(0, 1\]"),
    (dict(target="half"), "must be a fraction"),
    (dict(target=True), "must be a fraction"),
    (dict(target=1e-4), "below the smallest reachable fraction"),
    (dict(target=0.5, kinds=("mlp", "ffn")), "kinds must be distinct names"),
    (dict(target=0.5, kinds=()), "kinds must be distinct names"),
    (dict(target=0.5, iters=0), "iters must be an int >= 1"),
    (dict(target=0.5, heads=2), r"heads=2 must divide the number of heads \(3\)"),
    (dict(target=0.5, attn_mode="rows"), "attn_mode must be one of"),
])
def test_keep_for_flops_bad_input_raises_and_leaves_model_untouched(kwargs, needle):
    model = make_model("deit", torch.float32)
    snap = _snapshot(model)
    with pytest.raises(vpf.PlanError, match=needle):
        vpf.keep_for_flops(model, **kwargs)
    _assert_untouched(model, snap)


def test_keep_for_flops_unsupported_model():
    with pytest.raises(vpf.UnsupportedModelError):
        vpf.keep_for_flops(torch.nn.Linear(4, 4), 0.5)


# ---------------------------------------------------------------------------------------- per-group head counts
def test_plan_with_heads_per_stage_on_swin():
    model = make_model("swin")  # stages with 2 and 4 heads
    space = vpf.describe(model)
    scores = random_scores(space)
    heads = {n: (1 if n.startswith("layers.0") else 2) for n, g in space.groups.items() if g.kind == "attn"}
    plan = vpf.plan_with_heads(space, scores, {"attn": 0.5, "mlp": 0.75}, heads)
    for n, h in heads.items():  # each group planned with its own head count, as make_plan does with that count
        alone = vpf.make_plan(space, scores, keep={"attn": 0.5, "mlp": 0.75}, heads=h)
        assert torch.equal(plan.keep[n], alone.keep[n]) and plan.heads[n] == h
    assert set(plan.keep) == {n for n, g in space.groups.items() if g.kind != "residual"}
    vpf.prune_(model, plan)
    assert [b.attn.num_heads for s in model.layers for b in s.blocks] == [1, 1, 2, 2]
    assert _head_layouts(model) == [(1, 8), (1, 8), (2, 8), (2, 8)]


def test_plan_with_heads_one_count_equals_make_plan():
    space = vpf.describe(make_model("deit"))
    scores = random_scores(space)
    for heads in (None, 1, {n: 1 for n, g in space.groups.items() if g.kind == "attn"}):
        plan = vpf.plan_with_heads(space, scores, 0.5, heads)
        ref = vpf.make_plan(space, scores, keep=0.5, heads=1 if heads else None)
        assert plan.to_dict() == ref.to_dict()


@pytest.mark.parametrize("keep,heads,needle", [
    (0.5, {"blocks.0.mlp": 1}, "not attention groups"),
    (0.5, {"blocks.9.attn": 1}, "not attention groups"),
    ({"blocks.9.mlp": 0.5}, {"blocks.0.attn": 1}, "unknown keys"),  # must not be dropped when planning by parts
    (0.5, {"blocks.0.attn": 2}, "must divide the number of heads"),
    ({"mlp": 0}, {"blocks.0.attn": 1}, r"keep ratio must be in \(0, 1\]"),
])
def test_plan_with_heads_bad_input_raises(keep, heads, needle):
    space = vpf.describe(make_model("deit"))
    with pytest.raises(vpf.PlanError, match=needle):
        vpf.plan_with_heads(space, random_scores(space), keep, heads)


def test_plan_with_heads_needs_a_space():
    with pytest.raises(vpf.PlanError, match="needs the PruningSpace"):
        vpf.plan_with_heads(make_model("deit"), None, 0.5, {"blocks.0.attn": 1})
