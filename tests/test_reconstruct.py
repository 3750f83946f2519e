"""Least-squares reconstruction after pruning (vitprune_fast.reconstruct): the solver against torch.linalg.lstsq,
exact repair of what is repairable by construction, sequential inputs, ranks, every family, and the trained digits
models."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from models import kept_features, make_input, rel_err

import vitprune_fast as vpf
from vitprune_fast.arch import adapter_for, model_output
from vitprune_fast.reconstruct import reconstruct_, ridge_fit
from vitprune_fast.testing import CATALOGUE, Representative, representatives

pytestmark = pytest.mark.usefixtures("one_thread")


def _scores(space, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(gr.size, generator=g, dtype=torch.float64) for n, gr in space.groups.items()}


def _kl(teacher, student, x) -> float:
    with torch.no_grad():
        return float(F.kl_div(model_output(student, x).log_softmax(-1), model_output(teacher, x).log_softmax(-1),
                              log_target=True, reduction="batchmean"))


# ---------------------------------------------------------------------------------------------------- solver
def test_ridge_fit_is_lstsq_as_damping_vanishes_and_beats_the_alternatives():
    g = torch.Generator().manual_seed(0)
    n, d, d_out = 400, 12, 5
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    w, b = torch.randn(d_out, d, generator=g, dtype=torch.float64), torch.randn(d_out, generator=g, dtype=torch.float64)
    y = x @ w.T + b
    kept = torch.tensor([0, 1, 3, 4, 6, 7, 9, 10])  # inputs 2, 5, 8, 11 dropped
    xk = x[:, kept]
    xa = torch.cat([xk, torch.ones(n, 1, dtype=torch.float64)], 1)
    want = torch.linalg.lstsq(xa, y).solution
    for damping in (1e-6, 1e-10, 1e-14):
        got, info = ridge_fit(xa.T @ xa, xa.T @ y, damping)
        assert info["solver"] == "cholesky"
    assert rel_err(got, want) < 1e-8

    def err(wk, bk):
        return float((xk @ wk.T + bk - y).norm() / y.norm())

    refit = err(got[:-1].T, got[-1])
    unrefit = err(w[:, kept], b)
    dropped = torch.tensor([2, 5, 8, 11])
    bias_only = err(w[:, kept], b + x[:, dropped].mean(0) @ w[:, dropped].T)  # FLAP-style bias compensation
    assert refit <= bias_only <= unrefit and refit < 0.99 * bias_only
    singular, info = ridge_fit(torch.zeros(4, 4, dtype=torch.float64), torch.ones(4, 2, dtype=torch.float64), 0.0)
    assert info["solver"] in ("cholesky", "lstsq") and torch.isfinite(singular).all()  # a clear fallback


# ---------------------------------------------------------------------------------------------------- exactness
def test_nothing_pruned_changes_nothing():
    model = CATALOGUE["deit"].build()
    teacher = copy.deepcopy(model)
    plan = vpf.Plan.from_space(vpf.describe(model), {})
    report = reconstruct_(model, teacher, make_input(model, 8), plan, progress=False)
    assert report["layers"] == []
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), teacher.state_dict().values(),
                                                 strict=True))


def _repairable(kind: str):
    """A DeiT in which the channels a plan removes are exact linear combinations of kept ones (and the plan)."""
    rep = Representative("r", "vit", "deit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=12,
                                                                    num_heads=2, mlp_ratio=2.0, num_classes=5))
    model = rep.build()
    space = vpf.describe(model)
    keep = {}
    with torch.no_grad():
        for i, blk in enumerate(model.blocks):
            if kind == "mlp":  # hidden unit 3 duplicates unit 0: fc2 can take its column
                blk.mlp.fc1.weight[3] = blk.mlp.fc1.weight[0]
                blk.mlp.fc1.bias[3] = blk.mlp.fc1.bias[0]
                keep[f"blocks.{i}.mlp"] = torch.tensor([j for j in range(24) if j != 3])
            elif kind == "attn":  # dim 5 of every head: no q . k part, v a copy of dim 0 of its head
                a, hd = 12, 6
                for h in range(2):
                    d, src = h * hd + 5, h * hd
                    blk.attn.qkv.weight[d] = 0
                    blk.attn.qkv.bias[d] = 0
                    blk.attn.qkv.weight[2 * a + d] = blk.attn.qkv.weight[2 * a + src]
                    blk.attn.qkv.bias[2 * a + d] = blk.attn.qkv.bias[2 * a + src]
                keep[f"blocks.{i}.attn"] = torch.tensor([j for j in range(12) if j % 6 != 5])
        if kind == "residual":  # channel 11 is the mean of the others everywhere; LayerNorms without eps
            c = 11

            def mean_row(t, dim=0):
                idx = [slice(None)] * t.dim()
                idx[dim] = c
                t[tuple(idx)] = t.index_select(dim, torch.arange(c)).mean(dim)

            for t in (model.patch_embed.proj.weight, model.patch_embed.proj.bias):
                mean_row(t)
            mean_row(model.cls_token, 2)
            mean_row(model.pos_embed, 2)
            for blk in model.blocks:
                for lin in (blk.attn.proj, blk.mlp.fc2):
                    mean_row(lin.weight)
                    mean_row(lin.bias)
            for m in model.modules():
                if isinstance(m, torch.nn.LayerNorm):
                    m.eps = 0.0
            keep["residual"] = torch.arange(c)
    return model, vpf.Plan.from_space(space, keep, {n: 2 for n in keep if n.endswith(".attn")})


@pytest.mark.parametrize("kind", ["mlp", "attn", "residual"])
def test_a_repairable_removal_is_repaired_exactly(kind):
    teacher, plan = _repairable(kind)
    x = make_input(teacher, 40)
    held_out = make_input(teacher, 6, seed=9)
    pruned = vpf.prune_(copy.deepcopy(teacher), plan)
    with torch.no_grad():
        assert rel_err(pruned(held_out), teacher(held_out)) > 1e-3  # without reconstruction: not the teacher
    reconstruct_(pruned, teacher, x, plan, damping=1e-13, progress=False)
    with torch.no_grad():
        assert rel_err(pruned(held_out), teacher(held_out)) < 1e-8


def test_each_refit_sees_the_layers_before_it_already_refit():
    """Block 1's fc2 is the ridge fit of the inputs it has in the reconstructed model (so, after every refit before
    it) to the teacher's outputs: with the teacher's inputs instead the weights would differ."""
    teacher = CATALOGUE["deit"].build()
    space = vpf.describe(teacher)
    plan = vpf.make_plan(space, _scores(space), keep=0.6)
    pruned = vpf.prune_(copy.deepcopy(teacher), plan)
    x = make_input(teacher, 24)
    report = reconstruct_(pruned, teacher, x, plan, progress=False)
    name = "blocks.1.mlp.fc2"
    layer = next(r for r in report["layers"] if r["layer"] == name)
    got = {}

    def keep(k):
        def hook(mod, args, out):
            got.setdefault(k, (args[0], out))
        return hook

    hooks = [m.register_forward_hook(keep(k)) for k, m in (("p", pruned.get_submodule(name)),
                                                            ("t", teacher.get_submodule(name)))]
    with torch.no_grad():
        pruned(x)
        teacher(x)
    for h in hooks:
        h.remove()
    xp = got["p"][0].reshape(-1, pruned.get_submodule(name).in_features).double()
    rows = vpf.prune.kept_entries(space, plan, f"{name}.weight", 0, 48)
    y = got["t"][1].reshape(-1, 48)[:, rows].double()
    xa = torch.cat([xp, torch.ones(len(xp), 1, dtype=torch.float64)], 1)
    want, _ = ridge_fit(xa.T @ xa, xa.T @ y, report["damping"])
    lin = pruned.get_submodule(name)
    assert rel_err(torch.cat([lin.weight.T, lin.bias[None]]), want) < 1e-10 and layer["rel_error_after"] < 1
    t_in = teacher.get_submodule(name).in_features
    xt = got["t"][0].reshape(-1, t_in)[:, plan.keep["blocks.1.mlp"]].double()  # the teacher's inputs: another fit
    xta = torch.cat([xt, torch.ones(len(xt), 1, dtype=torch.float64)], 1)
    other, _ = ridge_fit(xta.T @ xta, xta.T @ y, report["damping"])
    assert rel_err(other, want) > 1e-3


# ---------------------------------------------------------------------------------------------------- ranks
def _rank(rank, world, init, images, plan_dict, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        teacher = CATALOGUE["swin"].build()
        plan = vpf.Plan.from_dict(plan_dict)
        pruned = vpf.prune_(copy.deepcopy(teacher), plan)
        reconstruct_(pruned, teacher, images[rank::world], plan, batch_size=3, progress=False)
        torch.save(pruned.state_dict(), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_weights_of_one_over_all_the_images(tmp_path):
    teacher = CATALOGUE["swin"].build()
    space = vpf.describe(teacher)
    plan = vpf.make_plan(space, _scores(space), keep=0.6)
    x = make_input(teacher, 12)
    chunks = list(x.split(3))  # rank r gets chunks r, r + 2, ...; one process all of them
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), chunks, plan.to_dict(), str(tmp_path / "w")), nprocs=2,
             join=True)
    one = vpf.prune_(copy.deepcopy(teacher), plan)
    reconstruct_(one, teacher, chunks, plan, progress=False)
    for r in range(2):
        got = torch.load(tmp_path / f"w.{r}", weights_only=True)
        assert max(rel_err(got[k], v) for k, v in one.state_dict().items() if v.is_floating_point()) < 1e-12


# ---------------------------------------------------------------------------------------------------- safety
def test_parameters_keep_identity_optimizer_state_is_dropped_and_a_checkpoint_resumes(tmp_path):
    teacher = CATALOGUE["deit"].build()
    space = vpf.describe(teacher)
    plan = vpf.make_plan(space, _scores(space), keep=0.5)
    pruned = vpf.prune_(copy.deepcopy(teacher), plan)
    ids = [id(p) for p in pruned.parameters()]
    opt = torch.optim.AdamW(pruned.parameters(), lr=0.0)  # state, and the weights unchanged
    pruned(make_input(pruned, 2)).sum().backward()
    opt.step()
    x = make_input(teacher, 8)
    report = reconstruct_(pruned, teacher, x, plan, optimizer=opt, checkpoint=tmp_path / "ck", progress=False)
    assert [id(p) for p in pruned.parameters()] == ids
    refit = {n for r in report["layers"] for n in (f"{r['layer']}.weight", f"{r['layer']}.bias")}
    params = dict(pruned.named_parameters())
    assert all(params[n] not in opt.state for n in refit if n in params)
    assert any(p in opt.state for n, p in params.items() if n not in refit)
    again = vpf.prune_(copy.deepcopy(teacher), plan)  # a rerun loads every layer from the checkpoint
    reconstruct_(again, teacher, x, plan, checkpoint=tmp_path / "ck", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), pruned.state_dict().values(),
                                                 strict=True))
    other = vpf.make_plan(space, _scores(space, 1), keep=0.5)
    with pytest.raises(vpf.ConfigError, match="another plan"):
        reconstruct_(vpf.prune_(copy.deepcopy(teacher), other), teacher, x, other, checkpoint=tmp_path / "ck",
                     progress=False)


def test_bad_inputs_are_refused_before_any_weight_changes():
    teacher = CATALOGUE["deit"].build()
    space = vpf.describe(teacher)
    plan = vpf.make_plan(space, _scores(space), keep=0.5)
    pruned = vpf.prune_(copy.deepcopy(teacher), plan)
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    x = make_input(teacher, 4)
    cases = [
        (CATALOGUE["deit_distilled"].build(), x, vpf.PlanError),  # a teacher of another model
        (teacher, x[:, :, :16, :16], vpf.InputError),  # images of the wrong size
        (teacher, x[:0], vpf.InputError),  # no images
        (teacher, [], vpf.InputError),
    ]
    for t, imgs, error in cases:
        with pytest.raises(error):
            reconstruct_(pruned, t, imgs, plan, progress=False)
        assert all(torch.equal(before[k], v) for k, v in pruned.state_dict().items())
    with pytest.raises(vpf.PlanError, match="not the teacher pruned by this plan"):
        reconstruct_(copy.deepcopy(teacher), teacher, x, plan, progress=False)


# ---------------------------------------------------------------------------------------------------- families
@pytest.mark.parametrize("key", [r.key for r in representatives(core=False)])
def test_every_family_reconstructs(key, tmp_path):
    teacher = CATALOGUE[key].build()
    space = vpf.describe(teacher)
    mode = "heads" if any(g.whole_heads for g in space.of_kind("attn")) else "dims"
    plan = vpf.make_plan(space, _scores(space), keep=0.6, attn_mode=mode)
    pruned = vpf.prune_(copy.deepcopy(teacher), plan)
    layout = [(n, type(m)) for n, m in pruned.named_modules()]
    x = make_input(teacher, 16)
    def distance():  # KL of a classifier's logits; squared error of the kept features of a model without one
        if adapter_for(teacher).output_group() is None:
            return _kl(teacher, pruned, x)
        with torch.no_grad():
            return float((model_output(pruned, x) - kept_features(teacher, plan, model_output(teacher, x))).square()
                         .mean())

    before = distance()
    report = reconstruct_(pruned, teacher, x, plan, progress=False)
    assert report["layers"] and [(n, type(m)) for n, m in pruned.named_modules()] == layout  # timm's classes
    assert distance() <= before  # on the calibration images, the distance to the teacher does not increase
    back = vpf.load_pruned(vpf.save_pruned(pruned, tmp_path / key))
    with torch.no_grad():
        assert torch.equal(model_output(back, x[:2]), model_output(pruned, x[:2]))


# ---------------------------------------------------------------------------------------------------- trained
@pytest.mark.parametrize("method", ["upvits", "magnitude"])
@pytest.mark.parametrize("key", ["deit", "swin"])
def test_reconstruction_brings_trained_digits_models_closer_on_held_out_images(key, method):
    """The committed digits fixtures (300 steps of the demo's recipe), ~50 % FLOPs by uniform UP-ViTs or magnitude:
    the held-out test split's KL to the unpruned model falls with reconstruction on 128 training images."""
    from vitprune_fast.data import digits
    from vitprune_fast.metrics import fidelity

    teacher = vpf.load_pruned(Path(__file__).parent / "data" / f"digits-{key}-300")
    data = digits()
    calib = data.proxy(128, seed=0)[0]
    ratio, _ = vpf.keep_for_flops(teacher, 0.5)
    space = vpf.describe(teacher)
    scores = (vpf.upvits_scores(teacher, calib[:32], progress=False) if method == "upvits"
              else vpf.score.magnitude_scores(teacher))
    plan = vpf.make_plan(space, scores, keep=ratio)
    pruned = vpf.prune_(copy.deepcopy(teacher), plan)
    test = data.loaders(256)[1]
    before = fidelity(teacher, pruned, test)
    reconstruct_(pruned, teacher, calib, plan, progress=False)
    after = fidelity(teacher, pruned, test)
    assert after["kl"] < before["kl"], (before, after)


def test_cli_prune_reconstruct(tmp_path, capsys):
    import json

    from vitprune_fast import cli

    args = ["prune", "--model", "deit_tiny_patch16_224", "--model-args",
            json.dumps({"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8}), "--data", "digits",
            "--method", "magnitude", "--keep", "0.5", "--proxy", "16", "--quiet", "--reconstruct"]
    assert cli.main([*args, "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "note: reconstruction: " in out and "(on the proxy images)" in out
    report = json.loads((tmp_path / "a" / "reconstruct.json").read_text())
    assert report["images"] == 16 and report["layers"]
    assert all(r["rel_error_after"] <= r["rel_error_before"] for r in report["layers"])
    assert cli.main([*args, "--calib", "24", "--out", str(tmp_path / "b")]) == 0
    assert "(on 24 other training images)" in capsys.readouterr().out
    from vitprune_fast.data import digits

    d = digits()
    proxy, others = d.proxy(16, 0)[2], d.proxy(24, 0, exclude=d.proxy(16, 0)[2])[2]
    assert not torch.isin(others, proxy).any() and len(others) == 24
