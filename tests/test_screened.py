"""Screened UP-ViTs selection: the exact engine's plan (up to ties at the cut) for a share of its cost.

Exactness of the selection is asserted on random-init models (every weight, bias and norm randomised) and on the
demo's digits models after a short training, in float64; the second-order screen's own accuracy is measured against
the exact scores and bounded; a deliberately wrong screen must still give the exact selection.
"""
import math
from pathlib import Path

import pytest
import torch
from models import make_input, make_model

import vitprune_fast as vpf
from vitprune_fast.errors import ConfigError, VitPruneError
from vitprune_fast.plan import selections
from vitprune_fast.score import screened
from vitprune_fast.score.second_order import fisher_cotangents, second_order_screen
from vitprune_fast.score.upvits import FastEngine

RANDOM = ("deit", "deit_distilled", "vit_layerscale", "vit_no_cls", "swin")
TRAINED = ("digits-deit", "digits-swin")
KEEPS = (0.25, 0.5, 0.75)
RULES = {"dims": {}, "heads": {"attn_mode": "heads"}, "merge": {"heads": 1}}  # merge: the UP-ViTs head merge
TRAIN_STEPS = 300  # the demo's recipe, shortened: ~75-85 % top-1 on the digits, peaked softmaxes


def _trained(key: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """The demo's model after TRAIN_STEPS of its recipe, from ``tests/data`` (``make_digits_fixtures.py`` trains them
    on one thread: another thread count or CPU would end at another model, and the bounds below are measured on
    these), in float64, with 32 class-balanced proxy images."""
    from vitprune_fast.data import digits
    from vitprune_fast.demo import proxy_subset

    model = vpf.load_pruned(Path(__file__).parent / "data" / f"digits-{key}-{TRAIN_STEPS}")
    x, y = digits().train.tensors
    return model.double().eval(), proxy_subset(x, y, 32, seed=1).double()


@pytest.fixture(scope="module")
def case(request):
    """model key -> (model, images, exact float64 scores of every group), built once per module."""
    cache = {}

    def get(key):
        if key not in cache:
            if key.startswith("digits-"):
                model, x = _trained(key.removeprefix("digits-"))
            else:
                model = make_model(key)
                x = make_input(model, 6)
            cache[key] = model, x, vpf.upvits_scores(model, x, progress=False)
        return cache[key]

    return get


# every keep on the random-init models; the trained ones (peaked softmaxes, the hard case for the screen) at 0.5 with
# every rule (their 0.25 / 0.75 rows took 3 of CI's 15 minutes; the random-init models cover those cuts)
@pytest.mark.parametrize("key,keep", [(k, r) for k in RANDOM for r in KEEPS] + [(k, 0.5) for k in TRAINED])
def test_screened_plan_is_the_exact_plan(case, key, keep):
    model, x, exact = case(key)
    space = vpf.describe(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for rule, kw in RULES.items():
        plan, report = vpf.upvits_select(model, x, vpf.PlanSpec(keep, **kw), progress=False)
        ref = vpf.make_plan(space, exact, keep, **kw)
        diff = screened.selection_differences(space, exact, plan, ref, vpf.PlanSpec(keep, **kw))
        assert not diff, (rule, diff)
        assert report["flips"] == 0 or report["audit_rounds"] > 1, (rule, report)  # a flip forces another round
        groups = report["groups"]
        assert set(groups) == {s.group for s in selections(space, vpf.PlanSpec(keep, **kw)) if s.keep < len(s.items)}
        for g in groups.values():
            assert 0 < g["scored_exactly"] <= g["candidates"]
            if g["kind"] in ("attn", "mlp"):
                assert g["scored_exactly"] == g["calibration"] + g["band"] + g["audit"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _near_cut_errors(space, exact, estimates, keep=0.5):
    """|log(estimate / exact)| of the items within +-10 % of their ranking's cut (the dims rule at ``keep``)."""
    out = []
    for sel in selections(space, vpf.PlanSpec(keep)):
        if sel.group not in estimates:
            continue
        s, e = exact[sel.group][sel.items].sum(1), estimates[sel.group][sel.items].sum(1)
        order = torch.argsort(-s, stable=True)
        tau = math.sqrt(float(s[order[sel.keep - 1]] * s[order[sel.keep]]))
        near = (s / tau).log().abs() <= math.log(1.1)
        out.append((e[near] / s[near]).log().abs())
    return torch.cat(out)


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = (t.argsort().argsort().double() for t in (a, b))
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


# Bounds: the values measured on these fixtures (README table) with a margin of ~2x in the error quantiles. The
# random-init models are the hard case: their LayerNorm weights are random in sign and +-0.25..1.75 in size and
# their softmaxes nearly flat, so removing one unit moves the logits far enough for third-order terms to matter
# (measured: Spearman >= 0.991, p99 <= 0.36, p99.9 <= 0.38, worst on Swin); the trained models are in the regime
# the expansion is for (measured on the fixtures in tests/data: Spearman >= 0.978, p99 <= 0.131, p99.9 <= 0.134, worst
# on the digits Swin; the worst Spearman is its first attention's, 32 dims). Errors of this size cost band width (2x
# the worst error seen), never the selection: the band covers them.
SCREEN_BOUNDS = {"random": (0.95, 0.6, 0.75), "trained": (0.96, 0.25, 0.3)}  # (min Spearman, p99, p99.9)


@pytest.mark.parametrize("key", RANDOM + TRAINED)
def test_second_order_screen_accuracy(case, key):
    model, x, exact = case(key)
    space = vpf.describe(model)
    groups = [g for g in space.groups.values() if g.kind in ("attn", "mlp")]
    est = {k: v.double() for k, v in second_order_screen(model, x, groups).items()}
    rho_min, p99_max, p999_max = SCREEN_BOUNDS["trained" if key in TRAINED else "random"]
    for g in groups:
        assert (est[g.name] >= 0).all()  # a sum of squares
        assert _spearman(est[g.name], exact[g.name]) >= rho_min, g.name
    err = _near_cut_errors(space, exact, est)
    assert len(err) >= 10
    assert float(err.quantile(0.99)) <= p99_max
    assert float(err.quantile(0.999)) <= p999_max


def test_screen_is_the_second_order_term_of_the_exact_kl():
    """The estimate must be 1/2 dz^T (diag q - q q^T) dz with dz the derivative of the logits along the candidate's
    exact local change (central differences; the KL itself is too small for float64 differences at tiny steps).
    Its second-order Taylor term is exactly this form (the first-order term vanishes at q = p)."""
    model = make_model("deit")
    x = make_input(model, 4)
    space = vpf.describe(model)
    b = 1
    groups = [space.groups[f"blocks.{b}.attn"], space.groups[f"blocks.{b}.mlp"]]
    est = second_order_screen(model, x, groups, eps=0.0)
    with torch.no_grad():
        q = model(x).softmax(-1)
    fisher = torch.diag_embed(q) - q[:, :, None] * q[:, None, :]
    blk = model.blocks[b]

    def second_order(module, change, h=1e-4):
        z = []
        for step in (h, -h):
            hook = module.register_forward_pre_hook(lambda _m, a, step=step: (a[0] + step * change(a[0]),))
            try:
                with torch.no_grad():
                    z.append(model(x))
            finally:
                hook.remove()
        dz = (z[0] - z[1]) / (2 * h)
        return float(0.5 * torch.einsum("ni,nij,nj->", dz, fisher, dz))

    for j in (0, 5, 17):  # MLP unit j: its fc2 input channel removed
        def unit(a, j=j):
            d = torch.zeros_like(a)
            d[..., j] = -a[..., j]
            return d
        assert second_order(blk.mlp.fc2, unit) == pytest.approx(float(est[groups[1].name][j]), rel=1e-6)
    h, hd = blk.attn.num_heads, blk.attn.head_dim
    for c in (0, hd + 3, 2 * hd + hd - 1):  # attention dim c: its head's exact output change (softmax recomputed)
        def without_dim(qkv, c=c):
            d = torch.zeros_like(qkv)
            for part in range(3):
                d[..., part * h * hd + c] = -qkv[..., part * h * hd + c]
            return d
        delta = _proj_input(model, x, blk, without_dim) - _proj_input(model, x, blk)
        got = second_order(blk.attn.proj, lambda o, delta=delta: delta)
        assert got == pytest.approx(float(est[groups[0].name][c]), rel=1e-6)
    with torch.no_grad():  # and the estimate is the limit of the exact KL at a step where float64 still resolves it
        p = q.log()
        hook = blk.mlp.fc2.register_forward_pre_hook(lambda _m, a: (a[0] * (1 - 1e-3 * (torch.arange(
            a[0].shape[-1]) == 0)),))
        try:
            kl = float((q * (p - model(x).log_softmax(-1))).sum())
        finally:
            hook.remove()
    assert kl / 1e-6 == pytest.approx(float(est[groups[1].name][0]), rel=1e-4)


def _proj_input(model, x, blk, qkv_change=None) -> torch.Tensor:
    """The heads' outputs (the input of ``proj``), optionally with ``qkv_change(out)`` added to the qkv output."""
    cap = {}
    hooks = [blk.attn.proj.register_forward_pre_hook(lambda _m, a: cap.setdefault("o", a[0]))]
    if qkv_change is not None:
        hooks.append(blk.attn.qkv.register_forward_hook(lambda _m, _a, out: out + qkv_change(out)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return cap["o"]


def test_fisher_cotangents_factor_the_fisher_on_the_classifier_span():
    g = torch.Generator().manual_seed(0)
    n, c, f = 5, 12, 4
    logits = torch.randn(n, c, generator=g, dtype=torch.float64) * 3
    w = torch.randn(c, f, generator=g, dtype=torch.float64)
    u = fisher_cotangents(logits, [w], eps=0.0)  # [R, n, C]
    assert u.shape[0] <= f
    q = logits.softmax(-1)
    fisher = torch.diag_embed(q) - q[:, :, None] * q[:, None, :]
    dz = torch.randn(7, n, f, generator=g, dtype=torch.float64) @ w.T  # [7, n, C] moves the classifier can make
    want = torch.einsum("kni,nij,knj->kn", dz, fisher, dz)
    got = torch.einsum("rnc,knc->krn", u, dz).square().sum(1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    assert fisher_cotangents(logits, [w], eps=0.0, max_rank=2).shape[0] == 2


def _shuffled_screen(monkeypatch, seed=0):
    """Replace the screen's estimates by a random permutation within each group (a useless screen)."""
    real = screened._screen
    g = torch.Generator().manual_seed(seed)

    def bad(*args, **kw):
        return {k: v[torch.randperm(len(v), generator=g)] for k, v in real(*args, **kw).items()}

    monkeypatch.setattr(screened, "_screen", bad)


@pytest.mark.parametrize("key", ["deit", "swin", "digits-deit"])
def test_a_wrong_screen_still_gives_the_exact_selection(case, key, monkeypatch):
    model, x, exact = case(key)
    space = vpf.describe(model)
    _, good = vpf.upvits_select(model, x, 0.5, progress=False)
    _shuffled_screen(monkeypatch)
    plan, report = vpf.upvits_select(model, x, 0.5, progress=False)
    assert not screened.selection_differences(space, exact, plan, vpf.make_plan(space, exact, 0.5), 0.5)
    # calibration sees the errors and the band grows to cover them: more candidates scored exactly
    assert max(report["band_half_width"].values()) > 2 * max(good["band_half_width"].values())
    assert report["scored_exactly"] > good["scored_exactly"]


def test_checkpoint_resumes_without_rescoring(tmp_path, monkeypatch):
    model = make_model("deit")
    x = make_input(model, 6)
    calls = {"exact": 0, "screen": 0}
    real_exact, real_screen = FastEngine.score_candidates, screened.second_order_screen

    def counted_exact(self, *a, **kw):
        calls["exact"] += 1
        if calls["exact"] == fail_at[0]:
            raise KeyboardInterrupt
        return real_exact(self, *a, **kw)

    def counted_screen(*a, **kw):
        calls["screen"] += 1
        return real_screen(*a, **kw)

    monkeypatch.setattr(FastEngine, "score_candidates", counted_exact)
    monkeypatch.setattr(screened, "second_order_screen", counted_screen)
    fail_at = [0]
    ref, ref_report = vpf.upvits_select(model, x, 0.5, batch_size=3, progress=False)
    full = dict(calls)
    fail_at[0] = full["exact"] // 2 + 1  # interrupted half-way through the exact evaluations
    calls.update(exact=0, screen=0)
    with pytest.raises(KeyboardInterrupt):
        vpf.upvits_select(model, x, 0.5, batch_size=3, progress=False, checkpoint=tmp_path / "ck")
    fail_at[0] = 0
    calls.update(exact=0, screen=0)
    plan, report = vpf.upvits_select(model, x, 0.5, batch_size=3, progress=False, checkpoint=tmp_path / "ck")
    assert plan.keep.keys() == ref.keep.keys() and all(torch.equal(plan.keep[k], ref.keep[k]) for k in ref.keep)
    assert report["scored_exactly"] == ref_report["scored_exactly"]
    assert calls["screen"] == 0 and 0 < calls["exact"] < full["exact"]
    calls.update(exact=0, screen=0)
    vpf.upvits_select(model, x, 0.5, batch_size=3, progress=False, checkpoint=tmp_path / "ck")
    assert calls == {"exact": 0, "screen": 0}  # everything from the checkpoint
    with pytest.raises(VitPruneError, match="different job"):
        vpf.upvits_select(model, x, 0.25, batch_size=3, progress=False, checkpoint=tmp_path / "ck")


def test_bad_settings_are_refused_and_the_model_is_untouched():
    model = make_model("deit").train()
    x = make_input(model, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for kw in ({"safety": 0.5}, {"min_width": 0}, {"calibration": -1}, {"audit": -2}):
        with pytest.raises(ConfigError):
            vpf.upvits_select(model, x, 0.5, progress=False, **kw)
    with pytest.raises(vpf.PlanError):
        vpf.upvits_select(model, x, 1.5, progress=False)
    with pytest.raises(vpf.InputError):
        vpf.upvits_select(model, x[0], 0.5, progress=False)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
