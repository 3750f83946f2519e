"""The ViT families beyond plain ViT / DeiT / Swin V1 (issue 13): attention-pooling heads (SigLIP), RMSNorm and
SwiGLU / GLU MLPs (AIMv2, DINOv2-g), scale-norms (BEiT-3), qk-norm, EVA / EVA-02 / DINOv3 / PE / RoPE-ViT, rel-pos
ViT, BEiT, Swin V2 / V2-CR, CaiT, post-norm blocks, PVTv2, parallel blocks, differential attention and XCiT.

One small representative of each (``FAMILIES``: the family representatives of the catalogue in
:mod:`vitprune_fast.testing`), every weight, bias and norm randomised, float64.
"""
from __future__ import annotations

import copy

import pytest
import timm
import torch

import vitprune_fast as vpf
from tests.models import kept_features, make_input, rel_err
from vitprune_fast.arch import adapter_for, model_output
from vitprune_fast.dap import DAP, Schedule
from vitprune_fast.depth import remove_units_
from vitprune_fast.errors import PlanError
from vitprune_fast.masked import masked_copy
from vitprune_fast.score.screened import selection_differences
from vitprune_fast.testing import representatives

FAMILIES = {r.key: r for r in representatives(core=False)}


def _model(key: str, dtype=torch.float64, seed: int = 0) -> torch.nn.Module:
    return FAMILIES[key].build(dtype, seed)


def _attn_mode(space) -> str:
    return "heads" if any(g.whole_heads for g in space.of_kind("attn")) else "dims"


def _plans(space, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    scores = {n: torch.rand(gr.size, generator=g, dtype=torch.float64) for n, gr in space.groups.items()}
    mode = _attn_mode(space)
    yield vpf.make_plan(space, scores, keep={"residual": 0.75}, attn_mode=mode)
    yield vpf.make_plan(space, scores, keep={"attn": 0.5}, attn_mode=mode)
    yield vpf.make_plan(space, scores, keep={"mlp": 0.4}, attn_mode=mode)
    yield vpf.make_plan(space, scores, keep=0.5, attn_mode=mode)
    yield vpf.make_plan(space, scores, keep=0.5, attn_mode="heads")


def _layout(model):
    return [(n, type(m)) for n, m in model.named_modules()]


@pytest.mark.parametrize("key", list(FAMILIES))
def test_removal_equals_masking_every_group_kind(key):
    model = _model(key)
    space = vpf.describe(model)
    x = make_input(model, 3)
    for plan in _plans(space):
        pruned = copy.deepcopy(model)
        vpf.prune_(pruned, plan)
        with torch.no_grad():
            want = kept_features(model, plan, model_output(masked_copy(model, plan), x))
            assert rel_err(model_output(pruned, x), want) < 1e-9
        assert _layout(pruned) == _layout(model)  # still timm's own classes, module for module
        assert vpf.describe(pruned).groups.keys() == space.groups.keys()
        for name, size in plan.kept_sizes(space).items():
            assert vpf.describe(pruned).groups[name].size == size


@pytest.mark.parametrize("key", list(FAMILIES))
def test_masking_changes_the_function(key):
    """The check above is not vacuous: every kind's plan changes the logits, and a residual norm unmasked is wrong."""
    model = _model(key)
    space = vpf.describe(model)
    x = make_input(model, 2)
    with torch.no_grad():
        dense = model_output(model, x)
        for plan in _plans(space):
            if plan.keep:  # a tied attention (EVA) is not narrowed by keep={"attn": r}
                assert rel_err(model_output(masked_copy(model, plan), x), dense) > 1e-4


@pytest.mark.parametrize("key", list(FAMILIES))
def test_save_load_round_trip(key, tmp_path):
    model = _model(key)
    space = vpf.describe(model)
    plan = list(_plans(space))[3]
    vpf.prune_(model, plan)
    vpf.save_pruned(model, tmp_path / key)
    back = vpf.load_pruned(tmp_path / key)
    assert _layout(back) == _layout(model)
    sd, sd_back = model.state_dict(), back.state_dict()
    assert sd.keys() == sd_back.keys() and all(torch.equal(sd[k], sd_back[k]) for k in sd)
    x = make_input(model, 2)
    with torch.no_grad():
        assert torch.equal(model_output(back, x), model_output(model, x))


@pytest.mark.parametrize("key", list(FAMILIES))
def test_upvits_fast_equals_reference(key):
    model = _model(key)
    x = make_input(model, 2)
    comps = ("residual", "attn", "mlp", "blocks")
    fast = vpf.upvits_scores(model, x, components=comps, max_rows=16, progress=False)
    ref = vpf.upvits_scores(model, x, components=comps, engine="reference", progress=False)
    assert fast.keys() == ref.keys()
    for name in fast:
        assert rel_err(fast[name], ref[name]) < 1e-6, name
        assert ref[name].max() > 0 and ref[name].min() > -1e-12, name  # KLs: non-negative, not all zero


@pytest.mark.parametrize("key", list(FAMILIES))
def test_dimap_structured_plan(key):
    model = _model(key)
    mode = _attn_mode(vpf.describe(model))
    plan = vpf.dimap_structured_plan(model, ratio=0.3, attn_mode=mode)
    assert plan.keep
    x = make_input(model, 2)
    with torch.no_grad():
        want = model_output(masked_copy(model, plan), x)
        assert rel_err(model_output(vpf.prune_(copy.deepcopy(model), plan), x), want) < 1e-9
    scores = vpf.dimap_scores(model, structured=True, attn_mode=mode)
    groups = vpf.describe(model).groups  # DIMAP's modules are the blocks' (a pool's, CaiT's class attention stay whole)
    assert set(scores) == {n for b in adapter_for(model).blocks() for br in b.branches() for n in (br.attn, br.mlp)}
    for name, s in scores.items():
        assert s.shape == (groups[name].size,)


@pytest.mark.parametrize("key", list(FAMILIES))
def test_dap_steps_and_finalize(key):
    model = _model(key, torch.float32).train()
    # the budget over the gated (block) parameters: with frozen attentions (tied widths), CaiT's class attention and
    # PVT's embeddings, 40 % of ALL parameters is more than the gated ones hold
    headless = not adapter_for(model).classifier_weights()  # a feature model: the probes' classes are the labels'
    dap = DAP(model, target=0.4, schedule=Schedule(0, 2, 3, update_every=1),
              attn_mode=_attn_mode(vpf.describe(model)), block_params_only=True, num_classes=10 if headless else None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(4, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (4,), generator=g)
        loss = torch.nn.functional.cross_entropy(model_output(model, x), y) + dap.loss(y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        dap.step()
    kept = dap.kept_params()
    dap.finalize(opt)
    assert sum(p.numel() for p in model.parameters()) == kept < sum(p.numel() for p in _model(key).parameters())
    model_output(model, torch.randn(2, 3, 32, 32))


def test_screened_selection_equals_exact_on_rmsnorm_swiglu():
    model = _model("aimv2")
    x = make_input(model, 4)
    keep = {"residual": 0.75, "attn": 0.5, "mlp": 0.5}
    plan, report = vpf.upvits_select(model, x, keep, progress=False)
    space = vpf.describe(model)
    scores = vpf.upvits_scores(model, x, progress=False)
    exact = vpf.make_plan(space, scores, keep=keep)
    assert not selection_differences(space, scores, plan, exact, keep)
    assert report["share_scored_exactly"] < 1.0  # the screen did the attention and MLP groups


def test_rms_norm_masking_is_the_rms_over_kept_channels():
    """The masked RMSNorm is the norm of the physically sliced input (the reference the engines rely on)."""
    from vitprune_fast.norms import masked_norm

    g = torch.Generator().manual_seed(0)
    norm = timm.layers.RmsNorm(12, eps=1e-5).double()
    norm.weight.data = torch.randn(12, generator=g, dtype=torch.float64)
    x = torch.randn(5, 12, generator=g, dtype=torch.float64)
    keep = torch.tensor([0, 2, 3, 7, 8, 11])
    mask = torch.zeros(12, dtype=torch.bool)
    mask[keep] = True
    sliced = timm.layers.RmsNorm(6, eps=1e-5).double()
    sliced.weight.data = norm.weight.data[keep]
    y = masked_norm(norm, x, mask)
    torch.testing.assert_close(y[:, keep], sliced(x[:, keep]), rtol=1e-12, atol=1e-12)
    assert (y[:, ~mask] == 0).all()


def test_qk_norm_attention_is_pruned_by_whole_heads_only():
    model = _model("qk_norm")
    space = vpf.describe(model)
    g = space.groups["blocks.0.attn"]
    assert g.whole_heads and "whole heads" in repr(g)
    scores = {n: torch.rand(gr.size) for n, gr in space.groups.items()}
    for kwargs in (dict(keep={"attn": 0.5}), dict(keep={"attn": 0.5}, heads=2)):
        with pytest.raises(PlanError, match="attn_mode='heads'"):
            vpf.make_plan(space, scores, **kwargs)
    with pytest.raises(PlanError, match="attn_mode='heads'"):
        vpf.dimap_structured_plan(model, ratio=0.3)
    with pytest.raises(PlanError, match="attn_mode='heads'"):
        DAP(model, target=0.5, schedule=Schedule(0, 2, 3))
    # a hand-made plan that splits heads is refused before anything moves
    before = copy.deepcopy(model.state_dict())
    split = vpf.Plan.from_space(space, {"blocks.0.attn": torch.arange(0, 48, 2)}, {"blocks.0.attn": 4})
    with pytest.raises(PlanError, match="whole heads"):
        vpf.prune_(model, split)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    plan = vpf.make_plan(space, scores, keep={"attn": 0.5}, attn_mode="heads")
    vpf.prune_(model, plan)
    assert model.blocks[0].attn.num_heads == 2 and model.blocks[0].attn.head_dim == 12


def test_save_refuses_a_recipe_that_rebuilds_another_function(tmp_path):
    """A model whose norms differ from what its timm name builds must not be saved as that name."""
    model = _model("aimv2")
    model.blocks[0].norm1.eps = 1e-3
    with pytest.raises(vpf.CheckpointError, match="blocks.0.norm1"):
        vpf.save_pruned(model, tmp_path / "x")


def test_attention_pool_width_is_tied_to_the_residual():
    model = _model("siglip")
    space = vpf.describe(model)
    g = space.groups["attn_pool.attn"]
    assert g.tied_to == "residual" and space.groups["attn_pool.mlp"].kind == "mlp"
    scores = {n: torch.rand(gr.size, dtype=torch.float64) for n, gr in space.groups.items()}
    plan = vpf.make_plan(space, scores, keep={"residual": 0.6})  # 28.8 channels -> 28: a multiple of 4 pool heads
    assert len(plan.keep["residual"]) == len(plan.keep["attn_pool.attn"]) == 28
    assert torch.bincount(plan.keep["attn_pool.attn"] // g.head_dim).tolist() == [7] * 4
    # a plan that narrows the residual alone cannot be removed (timm's pool reshapes to its input width) ...
    alone = vpf.Plan.from_space(space, {"residual": plan.keep["residual"]})
    with pytest.raises(PlanError, match="tied to residual"):
        vpf.prune_(copy.deepcopy(model), alone)
    # ... and one that narrows the pool alone neither
    with pytest.raises(PlanError, match="tied to residual"):
        vpf.prune_(copy.deepcopy(model), vpf.Plan.from_space(space, {"attn_pool.attn": plan.keep["attn_pool.attn"]}))
    pruned = vpf.prune_(copy.deepcopy(model), plan)
    assert pruned.attn_pool.head_dim == 7 and pruned.attn_pool.kv.in_features == pruned.embed_dim == 28


def test_xcit_keeps_whole_heads_and_whole_blocks():
    """XCA's softmax runs over a head's channels, so its attention (and the residual it is tied to) keeps whole heads;
    a plan keeping every head with fewer dims is refused before anything moves, as is a hybrid depth unit (block
    i+1's LPI sits between the two halves it would re-pack)."""
    model = _model("xcit")
    space = vpf.describe(model)
    g = space.groups["blocks.0.attn"]
    assert g.whole_heads and g.tied_to == "residual" and space.groups["residual"].multiple_of == g.head_dim == 12
    scores = {n: torch.rand(gr.size, dtype=torch.float64) for n, gr in space.groups.items()}
    plan = vpf.make_plan(space, scores, keep={"residual": 0.6})  # 28.8 channels -> 24: two heads of 12
    assert len(plan.keep["residual"]) == 24
    for name in ("blocks.0.attn", "blocks.1.attn", "cls_attn_blocks.0.attn"):
        assert torch.bincount(plan.keep[name] // 12, minlength=4).tolist().count(12) == 2, name
    before = copy.deepcopy(model.state_dict())
    per_head = torch.cat([torch.arange(6) + 12 * h for h in range(4)])  # every head, 6 dims each
    split = vpf.Plan.from_space(space, {"residual": plan.keep["residual"]}
                                | {n: per_head for n in space.groups if n.endswith(".attn")})
    with pytest.raises(PlanError, match="whole heads"):
        vpf.prune_(model, split)
    with pytest.raises(PlanError, match="LPI"):
        remove_units_(model, [("hybrid", 0)])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert len(model.blocks) == 2
    pruned = vpf.prune_(copy.deepcopy(model), plan)
    assert [b.attn.num_heads for b in pruned.blocks] == [2, 2] and pruned.blocks[0].attn.temperature.shape[0] == 2
    assert pruned.blocks[0].local_mp.conv1.groups == pruned.embed_dim == 24


def test_parallel_block_groups_share_in_proj():
    """in_proj rows [MLP | q | k | v] belong to two groups: each removes only its own rows, together or alone; DIMAP's
    FLOPs prediction splits the shared Linear by rows; what cannot be split is refused before anything moves."""
    from vitprune_fast.flops import flop_profile
    from vitprune_fast.score.dimap import structured_plan_flops

    model = _model("parallel_pwee")
    space = vpf.describe(model)
    hidden, a = model.blocks[0].in_split[:2]
    attn_rows = {sl.offset for sl in space.groups["blocks.0.attn"].slices if sl.name.endswith("in_proj.weight")}
    assert attn_rows == {hidden}
    scores = {n: torch.rand(gr.size, dtype=torch.float64) for n, gr in space.groups.items()}
    x = make_input(model, 2)
    for keep in ({"mlp": 0.5}, {"residual": 0.5}, 0.5):
        plan = vpf.make_plan(space, scores, keep=keep)
        pruned = vpf.prune_(copy.deepcopy(model), plan)
        kept_hidden = len(plan.keep.get("blocks.0.mlp", torch.arange(hidden)))
        kept_a = len(plan.keep.get("blocks.0.attn", torch.arange(a)))
        assert pruned.blocks[0].in_split == [kept_hidden, kept_a, kept_a, kept_a]
        rows = torch.cat([plan.keep.get("blocks.0.mlp", torch.arange(hidden))]
                         + [hidden + r * a + plan.keep.get("blocks.0.attn", torch.arange(a)) for r in range(3)])
        cols = plan.keep.get("residual", torch.arange(model.embed_dim))
        want = model.blocks[0].in_proj.weight[rows][:, cols].detach().clone()
        want[kept_hidden:kept_hidden + kept_a] *= (kept_a / a) ** 0.5  # q rows carry the attention-scale fold
        assert torch.allclose(pruned.blocks[0].in_proj.weight, want, rtol=1e-15, atol=0)
    plan = vpf.dimap_structured_plan(model, ratio=0.3)
    assert structured_plan_flops(model, plan) == flop_profile(vpf.prune_(copy.deepcopy(model), plan)).total
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(vpf.UnsupportedModelError, match="in_proj"):
        vpf.dimap_scores(model)  # per-weight (unstructured) DIMAP: in_proj would sit in two weight pools
    with pytest.raises(PlanError, match="in_norm and in_proj"):
        remove_units_(model, [("hybrid", 0)])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    units = vpf.upvits_scores(model, x, components=("blocks",), progress=False)  # every unit kind scores
    assert set(units) == {"units.block", "units.attn", "units.mlp", "units.hybrid"}


def test_parallel_things_units_remove_every_branch_of_their_kind():
    """A block running two attentions and two MLPs side by side: a hybrid unit (MLPs of block 0 + attentions of block
    1) removed physically computes what scoring it computes -- those four branch outputs zeroed."""
    from vitprune_fast.overrides import replaced_output

    model = _model("parallel_things")
    x = make_input(model, 2)
    refs = adapter_for(model).blocks()
    assert [br.mlp for br in refs[0].branches()] == ["blocks.0.ffns.0.mlp", "blocks.0.ffns.1.mlp"]
    zeroed = [model.get_submodule(br.branch_output(part)) for ref, part in ((refs[0], "mlp"), (refs[1], "attn"))
              for br in ref.branches()]
    with torch.no_grad(), replaced_output([(m, torch.zeros_like) for m in zeroed]):
        want = model(x)
    pruned = remove_units_(copy.deepcopy(model), [("hybrid", 0)])
    assert len(pruned.blocks) == 1
    with torch.no_grad():
        assert rel_err(pruned(x), want) < 1e-12
        assert rel_err(model(x), want) > 1e-4


def test_parallel_things_dap_gates_every_branch():
    """DAP gates both attentions and both MLPs of a ParallelThingsBlock; each takes the ΔΨ of its kind in its block
    (the probes see the block's input, its stream after the attentions and its output)."""
    model = _model("parallel_things", torch.float32).train()
    dap = DAP(model, target=0.4, schedule=Schedule(0, 2, 3, update_every=1), block_params_only=True)
    assert [b.name for b in dap.blocks][:4] == ["blocks.0.attns.0.attn", "blocks.0.ffns.0.mlp",
                                                "blocks.0.attns.1.attn", "blocks.0.ffns.1.mlp"]
    assert not any(b.frozen for b in dap.blocks)
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (4,), generator=g)
    (torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32, generator=g)), y) + dap.loss(y)).backward()
    d = dap._dcls  # [DAP blocks] ΔΨ of the class-token probes
    assert d[0] == d[2] and d[1] == d[3] and d[4] == d[6] and d[0] != d[1]


OTHER_LIBRARIES = [r.key for r in representatives(core=False) if r.library != "timm"]


@pytest.mark.parametrize("key", OTHER_LIBRARIES)
def test_every_method_plans_through_the_interface(key):
    """transformers and torchvision models through the method interface: the baselines (Taylor by the loss of its
    labels, on the output features of a model without a classifier), progressive UP-ViTs, and a FLOPs budget
    allocated globally; each plan prunes to a model that runs and meets its budget."""
    from vitprune_fast import PlanSpec
    from vitprune_fast.flops import count_flops, plan_flops
    from vitprune_fast.methods import MethodData, get_method

    model = _model(key, torch.float32)
    x = make_input(model, 4)
    space = vpf.describe(model)
    mode = _attn_mode(space)
    data = MethodData(loader=[(x, torch.arange(4) % 10)], images=x, chunk=4, batches=1, progress=False)
    spec = PlanSpec(keep={"residual": 0.75, "attn": 0.5, "mlp": 0.5}, attn_mode=mode)
    methods = [get_method(n) for n in ("magnitude", "random")] + [get_method("upvits", steps=2)]
    if adapter_for(model).classifier_weights():
        methods.append(get_method("taylor"))
    for method in methods:
        plan = method.plan(model, data, spec).plan
        pruned = vpf.prune_(copy.deepcopy(model), plan)
        with torch.no_grad():
            assert torch.isfinite(model_output(pruned, x)).all(), method.name
    spec = PlanSpec(flops=0.6, attn_mode=mode, allocation="global")
    budget = get_method("upvits").plan(model, data, spec).plan
    assert plan_flops(model, budget) <= 0.6 * count_flops(model)
