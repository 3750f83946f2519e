"""Bad input gets a clear error, raised before any tensor is touched (the model stays unchanged)."""
import copy

import pytest
import timm
import torch
from models import make_model, random_scores

import vitprune_fast as vpf
from vitprune_fast.plan import Plan


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, snap):
    state = model.state_dict()
    assert state.keys() == snap.keys()
    for k, v in snap.items():
        assert state[k].shape == v.shape and torch.equal(state[k], v), k


@pytest.mark.parametrize("model", [torch.nn.Linear(3, 3), "resnet", "convnext"])
def test_unsupported_model(model):
    if model == "resnet":
        model = timm.create_model("resnet10t", num_classes=3)
    elif model == "convnext":
        model = timm.create_model("convnext_atto", num_classes=3)
    with pytest.raises(vpf.UnsupportedModelError, match="not supported"):
        vpf.describe(model)


def test_unsupported_module_named():
    model = timm.create_model("vit_small_patch16_224", img_size=32, patch_size=8, depth=2, qk_norm=True)
    model.blocks[1].attn.q_norm = torch.nn.BatchNorm1d(32)  # not a per-token norm: its statistics mix tokens
    with pytest.raises(vpf.UnsupportedModelError, match=r"blocks\.1\.attn\.q_norm"):
        vpf.describe(model)


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan"), "half"])
def test_ratio_out_of_range(ratio):
    space = vpf.describe(make_model("deit"))
    with pytest.raises(vpf.PlanError, match="keep ratio"):
        vpf.make_plan(space, random_scores(space), keep=ratio)
    with pytest.raises(vpf.PlanError, match="keep ratio"):
        vpf.make_plan(space, random_scores(space), keep={"mlp": ratio})


def test_make_plan_errors():
    space = vpf.describe(make_model("deit"))
    scores = random_scores(space)
    with pytest.raises(vpf.PlanError, match="must divide"):
        vpf.make_plan(space, scores, keep=0.5, heads=2)  # 3 heads
    with pytest.raises(vpf.PlanError, match="no scores"):
        vpf.make_plan(space, {}, keep=0.5)
    with pytest.raises(vpf.PlanError, match="shape"):
        vpf.make_plan(space, {**scores, "blocks.0.mlp": torch.rand(5)}, keep=0.5)
    with pytest.raises(vpf.PlanError, match="NaN"):
        vpf.make_plan(space, {**scores, "residual": torch.full((48,), float("nan"))}, keep=0.5)
    with pytest.raises(vpf.PlanError, match="unknown keys"):
        vpf.make_plan(space, scores, keep={"ffn": 0.5})
    with pytest.raises(vpf.PlanError, match="attn_mode"):
        vpf.make_plan(space, scores, keep=0.5, attn_mode="rows")


def _bad_plans(space):
    full = vpf.make_plan(space, random_scores(space), keep=0.5)
    yield "another model", vpf.make_plan(vpf.describe(make_model("swin")), random_scores(space), keep=1.0), "another"
    yield "unknown group", Plan(keep={"blocks.9.mlp": torch.arange(3)}), "does not have"
    yield "every channel", Plan(keep={**full.keep, "blocks.1.mlp": torch.tensor([], dtype=torch.long)}), "every"
    yield "unsorted", Plan(keep={**full.keep, "blocks.2.mlp": torch.tensor([5, 1, 7])}), "sorted"
    yield "duplicate", Plan(keep={**full.keep, "blocks.2.mlp": torch.tensor([1, 1, 7])}), "sorted"
    yield "out of range", Plan(keep={**full.keep, "residual": torch.tensor([0, 48])}), "outside"
    yield "float index", Plan(keep={**full.keep, "residual": torch.tensor([0.0, 2.0])}), "integer"
    yield "heads", Plan(keep={**full.keep}, heads={"blocks.2.attn": 5}), "equal heads"
    yield "mlp heads", Plan(keep={**full.keep}, heads={"blocks.2.mlp": 2}), "only attn"
    sizes = dict(full.sizes, residual=96)
    yield "sizes", Plan(keep=full.keep, heads=full.heads, sizes=sizes), "another model"
    yield "not a plan", {"residual": torch.arange(3)}, "Plan"


@pytest.mark.parametrize("case", range(11))
def test_bad_plan_leaves_model_unchanged(case):
    model = make_model("deit")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    opt = torch.optim.AdamW(model.parameters())
    model(x).sum().backward()
    opt.step()
    label, plan, match = list(_bad_plans(vpf.describe(model)))[case]
    snap, state = _snapshot(model), copy.deepcopy(opt.state_dict())
    out = model(x)
    with pytest.raises(vpf.PlanError, match=match):
        vpf.prune_(model, plan, optimizer=opt)
    _assert_unchanged(model, snap)
    assert torch.equal(model(x), out)
    assert str(opt.state_dict()) == str(state)


def test_unsliceable_optimizer_state_is_detected_first():
    model = make_model("deit")
    opt = torch.optim.AdamW(model.parameters())
    p = model.blocks[2].mlp.fc2.weight
    opt.state[p] = {"factored_row": torch.zeros(p.shape[0])}  # e.g. Adafactor-style state
    space = vpf.describe(model)
    snap = _snapshot(model)
    with pytest.raises(vpf.PlanError, match="optimizer state"):
        vpf.prune_(model, vpf.make_plan(space, random_scores(space), keep=0.5), optimizer=opt)
    _assert_unchanged(model, snap)
