"""DIMAP (``vitprune_fast.score.dimap``): the paper's properties, Table 1, masks through fine-tuning, the structured
adaptation (scores, plans, removal == masking) and FLOPs accounting.

Small random-init timm configs everywhere except the Table-1 test, which builds the full Swin-T/S/B once each.
"""

import copy
import math

import pytest
import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import vitprune_fast as vpf
from vitprune_fast.flops import flop_profile
from vitprune_fast.score.dimap import (
    apply_masks_,
    dimap_masks,
    dimap_ratio_for_flops,
    dimap_scores,
    dimap_structured_plan,
    find_blocks,
    prunable_weights,
    sparsity_report,
    structured_plan_flops,
)

VIT_KW = dict(img_size=32, patch_size=8, depth=3, embed_dim=48, num_heads=3, num_classes=10)
SWIN_KW = dict(img_size=32, patch_size=2, window_size=4, embed_dim=24, depths=(2, 2), num_heads=(2, 4), num_classes=10)
ARCHS = {"vit": ("deit_tiny_patch16_224", VIT_KW), "swin": ("swin_tiny_patch4_window7_224", SWIN_KW)}


@pytest.fixture(scope="module", autouse=True)
def _one_cpu_thread():
    """Run this module on one intra-op thread, then restore the setting.

    Most ops here are small, and with 2 OpenMP threads on a busy machine each op pays a synchronisation cost of
    several ms (measured: the module took 145 s on 2 threads vs 27 s on 1 at load 4 on 2 cores). The big sorts of the
    Table-1 test lose little.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random biases, LayerNorm weights and tokens (timm's 0/1 inits would hide slicing bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() < 2 or p.shape[0] == 1:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5 + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * p.shape[-1] ** -0.5)
    return model


def _make(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    name, kw = ARCHS[arch]
    return _randomize_(timm.create_model(name, pretrained=False, **kw).to(dtype), seed).eval()


def _lamp_loop(w: torch.Tensor) -> torch.Tensor:
    """Independent O(N^2) oracle: w^2 / sum of v^2 over all v with |v| >= |w| (no ties in random weights)."""
    a = w.double().reshape(-1) ** 2
    denom = (a[None, :] * (a[None, :] >= a[:, None])).sum(1)
    return (a / denom).view(w.shape)


def _group_norms2_from_space(model: nn.Module, group) -> torch.Tensor:
    """Group norms² from the pruning core's TensorSlices (an independent walk of the same tensors), weights only."""
    acc = torch.zeros(group.size, dtype=torch.float64)
    for sl in group.slices:
        if sl.per_head or not sl.name.endswith("weight"):
            continue
        t = model.get_parameter(sl.name).detach().double() ** 2
        per_index = t.sum(1 - sl.dim)  # [rows or cols]
        acc += per_index.view(sl.repeats, -1)[:, : group.size].sum(0)
    return acc


def _lamp_vector(a: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(a, descending=True, stable=True)
    s = a[order] / torch.cumsum(a[order], 0)
    return torch.empty_like(s).scatter_(0, order, s)


# ------------------------------------------------------------------------------------------------ structure
def test_finds_blocks_by_module_type():
    vit, swin = _make("vit"), _make("swin")
    assert [b.attn for b in find_blocks(vit)] == [f"blocks.{i}.attn" for i in range(3)]
    assert [b.mlp for b in find_blocks(swin)] == [f"layers.{s}.blocks.{b}.mlp" for s in range(2) for b in range(2)]
    w = prunable_weights(swin)
    assert w["qkv"][0] == "layers.0.blocks.0.attn.qkv.weight" and len(w["mlp"]) == 8
    everything = {n for v in w.values() for n in v}
    assert not any("head" in n or "relative_position" in n or "downsample" in n or "bias" in n for n in everything)


# ------------------------------------------------------------------------------------------------ faithful scores
@pytest.mark.parametrize("arch", ARCHS)
def test_largest_weight_scores_one_and_ranking_is_magnitude(arch):
    model = _make(arch)
    scores = dimap_scores(model, dtype=torch.float64)
    assert set(scores) == {n for v in prunable_weights(model).values() for n in v}
    for n, s in scores.items():
        w = model.get_parameter(n).detach()
        assert s.shape == w.shape
        assert s.max().item() == pytest.approx(1.0, abs=1e-15)
        assert s.view(-1).argmax() == w.abs().view(-1).argmax()
        by_magnitude = s.view(-1)[torch.argsort(w.abs().view(-1), descending=True, stable=True)]
        assert (by_magnitude.diff() < 0).all()  # strictly decreasing in |w| (equal |w|: in index order)
        assert ((s > 0) & (s <= 1)).all()


def test_scores_match_plain_loop():
    model = timm.create_model("deit_tiny_patch16_224", img_size=16, patch_size=8, depth=2, embed_dim=12,
                              num_heads=2, mlp_ratio=2, num_classes=3)
    scores = dimap_scores(model)  # float32
    for n, s in scores.items():
        torch.testing.assert_close(s.double(), _lamp_loop(model.get_parameter(n).detach()), rtol=2e-6, atol=1e-9)


@pytest.mark.parametrize("arch", ARCHS)
def test_scores_invariant_to_layer_scale(arch):
    model = _make(arch, torch.float64)
    before = dimap_scores(model)
    with torch.no_grad():
        for i, n in enumerate(before):
            model.get_parameter(n).mul_([-3.0, 0.01, 250.0, 1.7][i % 4])
    after = dimap_scores(model)
    for n in before:
        torch.testing.assert_close(after[n], before[n], rtol=1e-12, atol=1e-15)


def test_zero_weights_and_all_zero_layer():
    model = _make("vit")
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight[:5] = 0
        model.blocks[1].mlp.fc2.weight.zero_()
    s = dimap_scores(model)
    assert (s["blocks.0.attn.qkv.weight"][:5] == 0).all()
    assert (s["blocks.1.mlp.fc2.weight"] == 0).all()
    assert all(torch.isfinite(v).all() for v in s.values())


# ------------------------------------------------------------------------------------------------ masks
@pytest.mark.parametrize("rho", [0.0, 0.15, 0.55, 0.9])
def test_module_mode_one_threshold_per_module(rho):
    model = _make("swin")
    scores = dimap_scores(model)
    masks = dimap_masks(model, rho, scores=scores)
    for module, names in prunable_weights(model).items():
        total = sum(scores[n].numel() for n in names)
        pruned = [scores[n][~masks[n]] for n in names]
        kept = [scores[n][masks[n]] for n in names]
        assert sum(p.numel() for p in pruned) == math.floor(rho * total), module
        if rho > 0:
            assert torch.cat(pruned).max() < torch.cat(kept).min()  # one threshold across the module's layers
    if rho > 0:  # emergent per-layer sparsity: MLP layers of the two stages are pruned differently
        dens = {n: masks[n].float().mean().item() for n in prunable_weights(model)["mlp"]}
        assert max(dens.values()) - min(dens.values()) > 0.01


def test_module_mode_per_module_ratios():
    model = _make("vit")
    masks = dimap_masks(model, {"qkv": 0.1, "proj": 0.5, "mlp": 0.3})
    for module, rho in {"qkv": 0.1, "proj": 0.5, "mlp": 0.3}.items():
        names = prunable_weights(model)[module]
        total = sum(masks[n].numel() for n in names)
        assert sum(int((~masks[n]).sum()) for n in names) == math.floor(rho * total)


def test_model_mode_is_global_lamp():
    model = _make("swin")
    scores = dimap_scores(model, mode="model")
    masks = dimap_masks(model, 0.4, mode="model", scores=scores)
    pruned = torch.cat([scores[n][~m] for n, m in masks.items()])
    kept = torch.cat([scores[n][m] for n, m in masks.items()])
    assert pruned.numel() == math.floor(0.4 * (pruned.numel() + kept.numel()))
    assert pruned.max() < kept.min()
    per_module = {mod: sum(int((~masks[n]).sum()) for n in names) / sum(masks[n].numel() for n in names)
                  for mod, names in prunable_weights(model).items()}
    assert max(per_module.values()) - min(per_module.values()) > 0.01  # the modules are no longer pruned alike


def test_layer_mode_is_uniform_magnitude():
    model = _make("swin")
    masks = dimap_masks(model, 0.35, mode="layer")
    for n, m in masks.items():
        w = model.get_parameter(n).detach().abs().reshape(-1)
        k = math.floor(0.35 * w.numel())
        assert int((~m).sum()) == k
        assert w[~m.reshape(-1)].max() < w[m.reshape(-1)].min()


def test_mask_argument_errors():
    model = _make("vit")
    with pytest.raises(ValueError, match="exactly one"):
        dimap_masks(model)
    with pytest.raises(ValueError, match="exactly one"):
        dimap_masks(model, 0.2, flops=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        dimap_masks(model, 1.5)
    with pytest.raises(ValueError, match="mode"):
        dimap_masks(model, 0.2, mode="stage")
    with pytest.raises(ValueError, match="keys"):
        dimap_masks(model, {"qkv": 0.2})
    with pytest.raises(ValueError, match="unreachable"):
        dimap_masks(model, flops=0.01)


# ------------------------------------------------------------------------------------------------ FLOPs / report
def _dense_flops_real_forward(model: nn.Module) -> int:
    """FlopCounterMode on a real forward with timm's explicit attention path (CPU fused SDPA has no formula)."""
    fused = {m: m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")}
    for m in fused:
        m.fused_attn = False
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(torch.randn(1, 3, 32, 32, dtype=next(model.parameters()).dtype))
    finally:
        for m, f in fused.items():
            m.fused_attn = f
    return fc.get_total_flops()


@pytest.mark.parametrize("arch", ARCHS)
def test_flop_profile_matches_real_forward(arch):
    model = _make(arch)
    prof = flop_profile(model)
    assert prof.total == _dense_flops_real_forward(model)
    for path, t in prof.tokens.items():
        lin = model.get_submodule(path)
        assert prof.linear[path] == 2 * t * lin.in_features * lin.out_features
    if arch == "vit":
        assert prof.tokens["blocks.0.attn.qkv"] == 17  # 16 patches + class token
        assert prof.attn_matmul["blocks.0.attn"] == 2 * 2 * 17 * 17 * 48  # q k^T and attn v, all heads
    else:
        assert prof.tokens["layers.0.blocks.0.mlp.fc1"] == 256 and prof.tokens["layers.1.blocks.0.attn.qkv"] == 64


@pytest.mark.parametrize("mode", ["module", "model", "layer"])
def test_report_counts_non_zeros(mode):
    model = _make("swin")
    masks = dimap_masks(model, 0.5, mode=mode)
    rep = sparsity_report(model, masks)
    dense = sum(p.numel() for p in model.parameters())
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert rep["params"]["dense"] == dense and rep["params"]["kept"] == dense - pruned
    prof = flop_profile(model)
    expect = prof.total - sum(prof.linear[n[:-7]] - 2 * int(m.sum()) * prof.tokens[n[:-7]] for n, m in masks.items())
    assert rep["flops"]["dense"] == prof.total and rep["flops"]["pruned"] == expect
    layer = rep["layers"]["layers.1.blocks.0.mlp.fc1.weight"]
    assert layer["flops"] == 2 * layer["kept"] * layer["tokens"]
    assert rep["macs"]["dense"] == prof.total // 2
    # after masking in place, the default (non-zero pattern) gives the same counts
    m2 = copy.deepcopy(model)
    apply_masks_(m2, masks).remove()
    assert sparsity_report(m2)["params"] == rep["params"]


@pytest.mark.parametrize("mode", ["module", "model", "layer"])
def test_flops_target_bisects_shared_ratio(mode):
    model = _make("swin")
    scores = dimap_scores(model, mode=mode)
    masks = dimap_masks(model, mode=mode, flops=0.7, scores=scores)
    frac = sparsity_report(model, masks)["flops"]["pruned"] / flop_profile(model).total
    assert 0.695 < frac <= 0.7
    rho = dimap_ratio_for_flops(model, 0.7, mode, scores=scores)
    same = dimap_masks(model, rho, mode=mode, scores=scores)
    assert all(torch.equal(same[n], masks[n]) for n in masks)


# ------------------------------------------------------------------------------------------------ Table 1
TABLE1 = {  # Para↓ % at rho = 0.15 / 0.35 / 0.55 (DIMAP1/2/3), He & Zhou, ICLR 2024, Table 1
    "swin_tiny_patch4_window7_224": (13.7, 32.0, 50.3),
    "swin_small_patch4_window7_224": (14.2, 33.2, 52.2),
    "swin_base_patch4_window7_224": (14.3, 33.4, 52.5),
}
DENSE_GMACS = {"swin_tiny_patch4_window7_224": 4.49, "swin_base_patch4_window7_224": 15.43}


@pytest.fixture(scope="module", params=list(TABLE1), ids=["swin-T", "swin-S", "swin-B"])
def full_swin(request):
    torch.manual_seed(0)
    model = timm.create_model(request.param, pretrained=False).eval()  # float32, random init
    scores = dimap_scores(model)
    yield request.param, model, scores, flop_profile(model)
    del model, scores


@pytest.mark.slow
@pytest.mark.parametrize("level", [0, 1, 2], ids=["DIMAP1", "DIMAP2", "DIMAP3"])
def test_table1_params_removed(full_swin, level):
    name, model, scores, prof = full_swin
    rho = (0.15, 0.35, 0.55)[level]
    rep = sparsity_report(model, dimap_masks(model, rho, scores=scores), profile=prof)
    assert 100 * rep["params"]["removed_frac"] == pytest.approx(TABLE1[name][level], abs=0.1)
    if name in DENSE_GMACS:
        assert rep["macs"]["dense"] / 1e9 == pytest.approx(DENSE_GMACS[name], abs=0.005)


# ------------------------------------------------------------------------------------------------ fine-tuning
def _train_steps(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 4) -> None:
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(2, 3, 32, 32)).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("opt_name", ["adamw", "sgd"])
def test_masks_hold_through_optimizer_steps(opt_name):
    model = _make("vit").train()
    if opt_name == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=0.05)
    _train_steps(model, opt, 2)  # optimizer state exists and is non-zero everywhere before masking
    masks = dimap_masks(model, 0.5)
    before = {n: model.get_parameter(n).detach().clone() for n in masks}
    handle = apply_masks_(model, masks, optimizer=opt)
    _train_steps(model, opt, 4)
    for n, m in masks.items():
        p = model.get_parameter(n)
        assert (p[~m] == 0).all() and (p.grad[~m] == 0).all(), n
        for v in opt.state[p].values():
            if isinstance(v, torch.Tensor) and v.shape == p.shape:
                assert (v[~m] == 0).all(), n
        assert not torch.equal(p.detach()[m], before[n][m])  # kept weights do train
    handle.remove()
    _train_steps(model, opt, 1)
    p = model.get_parameter("blocks.0.mlp.fc1.weight")
    assert (p[~masks["blocks.0.mlp.fc1.weight"]] != 0).any()  # hooks removed: nothing re-zeroes any more


def test_gradient_hook_without_optimizer():
    model = _make("swin").train()
    masks = dimap_masks(model, 0.3)
    with apply_masks_(model, masks):
        model(torch.randn(1, 3, 32, 32)).sum().backward()
        for n, m in masks.items():
            p = model.get_parameter(n)
            assert (p[~m] == 0).all() and (p.grad[~m] == 0).all() and (p.grad[m] != 0).any()


def test_apply_masks_errors():
    model = _make("vit")
    with pytest.raises(ValueError, match="unknown parameter"):
        apply_masks_(model, {"nope.weight": torch.ones(1, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        apply_masks_(model, {"blocks.0.attn.qkv.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="bool"):
        apply_masks_(model, {"blocks.0.attn.qkv.weight": torch.ones(144, 48)})


# ------------------------------------------------------------------------------------------------ structured
@pytest.mark.parametrize("arch", ARCHS)
def test_structured_scores_per_group(arch):
    model = _make(arch, torch.float64)
    space = vpf.describe(model)
    scores = dimap_scores(model, structured=True)
    assert set(scores) == {g.name for g in space.groups.values() if g.kind in ("attn", "mlp")}
    for name, s in scores.items():
        group = space.groups[name]
        assert s.shape == (group.size,)
        torch.testing.assert_close(s, _lamp_vector(_group_norms2_from_space(model, group)), rtol=1e-12, atol=0)
        assert s.max().item() == pytest.approx(1.0, abs=1e-15)  # the block's strongest group scores 1
    magnitudes = dimap_scores(model, structured=True, mode="layer")  # uniform-per-block ablation: plain norms²
    for name, s in magnitudes.items():
        torch.testing.assert_close(s, _group_norms2_from_space(model, space.groups[name]), rtol=1e-12, atol=0)


def test_structured_scores_scale_invariant_and_whole_heads():
    model = _make("swin", torch.float64)
    before = dimap_scores(model, structured=True)
    heads_before = dimap_scores(model, structured=True, attn_mode="heads")
    with torch.no_grad():
        for b, c in zip(find_blocks(model), [4.0, -0.1, 30.0, 0.5], strict=True):
            for lin in ("attn.qkv", "attn.proj"):
                model.get_submodule(f"{b.attn[:-5]}.{lin}").weight.mul_(c)
            for lin in ("mlp.fc1", "mlp.fc2"):
                model.get_submodule(f"{b.mlp[:-4]}.{lin}").weight.mul_(1 / c)
    after = dimap_scores(model, structured=True)
    for n in before:
        torch.testing.assert_close(after[n], before[n], rtol=1e-12, atol=1e-15)
    for b in find_blocks(model):
        per_head = heads_before[b.attn].view(b.num_heads, b.head_dim)
        assert (per_head == per_head[:, :1]).all() and per_head.max() == 1.0


def test_structured_scores_feed_make_plan():
    model = _make("vit", torch.float64)
    space = vpf.describe(model)
    plan = vpf.make_plan(space, dimap_scores(model, structured=True), keep={"attn": 0.5, "mlp": 0.5})
    vpf.prune_(model, plan)
    assert model(torch.randn(2, 3, 32, 32, dtype=torch.float64)).shape == (2, 10)


def _masked_reference(model: nn.Module, plan) -> nn.Module:
    """The original model with the removed channels zeroed: q,k,v rows (+ bias) and fc1 rows (+ bias)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for b in find_blocks(ref):
            if b.attn in plan.keep:
                drop = torch.ones(b.attn_dim, dtype=torch.bool)
                drop[plan.keep[b.attn]] = False
                qkv = ref.get_submodule(f"{b.attn}.qkv")
                rows = drop.repeat(3)
                qkv.weight[rows] = 0
                if qkv.bias is not None:
                    qkv.bias[rows] = 0
            if b.mlp in plan.keep:
                drop = torch.ones(b.hidden, dtype=torch.bool)
                drop[plan.keep[b.mlp]] = False
                fc1 = ref.get_submodule(f"{b.mlp}.fc1")
                fc1.weight[drop] = 0
                fc1.bias[drop] = 0
    return ref


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("heads", ["dims", "heads"])
@pytest.mark.parametrize("target", [dict(ratio=0.4), dict(flops=0.6)], ids=["ratio", "flops"])
def test_structured_plan_removal_equals_masking(arch, heads, target):
    model = _make(arch, torch.float64)
    plan = dimap_structured_plan(model, attn_mode=heads, **target)
    assert isinstance(plan, vpf.Plan) and plan.keep
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    ref = _masked_reference(model, plan)(x)
    dense = model(x)
    pruned = vpf.prune_(copy.deepcopy(model), plan)
    out = pruned(x)
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-9
    assert ((out - dense).abs().max() / dense.abs().max()).item() > 1e-6  # the plan changed something
    blocks = find_blocks(model)
    for b in blocks:  # uniform head_dim inside every attention; at least one unit kept everywhere
        keep = plan.keep.get(b.attn, torch.arange(b.attn_dim))
        heads_now = plan.heads.get(b.attn, b.num_heads)
        assert len(keep) % heads_now == 0 and len(keep) >= 1
        if heads == "heads":
            assert len(keep) == heads_now * b.head_dim
        else:
            assert heads_now == b.num_heads
    # FLOPs of the pruned shapes: prediction == FlopCounterMode on the pruned model
    measured = flop_profile(pruned).total
    assert structured_plan_flops(model, plan) == measured
    if "flops" in target:
        assert measured / flop_profile(model).total <= 0.6


def test_structured_plan_thresholds_per_module():
    model = _make("swin", torch.float64)
    rho = 0.5
    plan = dimap_structured_plan(model, ratio=rho)
    scores = dimap_scores(model, structured=True)
    blocks = find_blocks(model)
    mlp_total = sum(b.hidden for b in blocks)
    mlp_kept = {b.mlp: len(plan.keep.get(b.mlp, range(b.hidden))) for b in blocks}
    assert mlp_total - sum(mlp_kept.values()) == math.floor(rho * mlp_total)
    pruned = torch.cat([scores[b.mlp][_dropped(plan, b.mlp, b.hidden)] for b in blocks])
    kept = torch.cat([scores[b.mlp][plan.keep.get(b.mlp, torch.arange(b.hidden))] for b in blocks])
    assert pruned.max() < kept.min()  # one MLP threshold across the network
    ratios = {b.mlp: mlp_kept[b.mlp] / b.hidden for b in blocks}
    assert max(ratios.values()) - min(ratios.values()) > 0.02  # per-block widths are emergent, not uniform
    attn_total = sum(b.attn_dim for b in blocks)
    attn_kept = sum(len(plan.keep.get(b.attn, range(b.attn_dim))) for b in blocks)
    assert abs(attn_kept - (attn_total - math.floor(rho * attn_total))) <= sum(b.num_heads for b in blocks) / 2
    # one pool: LAMP scores of the wide MLPs are smaller than the attentions', so the MLPs take more of the cut
    one_pool = dimap_structured_plan(model, ratio=rho, mode="model")
    assert sum(len(one_pool.keep.get(b.mlp, range(b.hidden))) for b in blocks) < sum(mlp_kept.values())


def _dropped(plan, name: str, size: int) -> torch.Tensor:
    drop = torch.ones(size, dtype=torch.bool)
    drop[plan.keep.get(name, torch.arange(size))] = False
    return drop


def test_structured_plan_errors():
    model = _make("vit")
    with pytest.raises(ValueError, match="exactly one"):
        dimap_structured_plan(model)
    with pytest.raises(ValueError, match="heads"):
        dimap_structured_plan(model, ratio=0.3, attn_mode="some")
    with pytest.raises(ValueError, match="mode"):
        dimap_structured_plan(model, ratio=0.3, mode="layer")
    with pytest.raises(ValueError, match="unreachable"):
        dimap_structured_plan(model, flops=0.05)
