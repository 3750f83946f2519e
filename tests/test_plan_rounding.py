"""make_plan(round_to=m): GPU-friendly widths (multiples of m), still the top-scored channels, still exact."""
import pytest
import torch
from models import make_input, make_model, random_scores, rel_err

import vitprune_fast as vpf
from vitprune_fast import cli
from vitprune_fast.masked import masked_copy

pytestmark = pytest.mark.usefixtures("one_thread")

KEEP = {"residual": 0.4, "attn": 0.4, "mlp": 0.4}


def _widths(space, plan):
    """group -> (kept count, kept head_dim for attn groups)."""
    out = {}
    for name, k in plan.keep.items():
        g = space.groups[name]
        out[name] = (len(k), len(k) // plan.heads.get(name, g.num_heads) if g.kind == "attn" else None)
    return out


@pytest.mark.parametrize("key,kw", [("deit", {}), ("deit", {"heads": 1}), ("swin", {}), ("vit_no_cls", {})])
def test_rounded_widths_are_multiples_and_top_scored(key, kw):
    model = make_model(key)
    space = vpf.describe(model)
    scores = random_scores(space)
    plan = vpf.make_plan(space, scores, keep=KEEP, round_to=8, **kw)
    for name, (n, hd) in _widths(space, plan).items():
        g = space.groups[name]
        width = hd if g.kind == "attn" else n
        full = g.size // (kw.get("heads") or g.num_heads) if g.kind == "attn" else g.size
        if full > 8:
            assert width % 8 == 0 and 8 <= width <= full, (name, width)
            assert abs(width - 0.4 * full) <= 4, (name, width)  # the nearest multiple
        if g.kind != "attn":  # the kept channels are the top-scored ones
            top = torch.argsort(-scores[name].double(), stable=True)[:n].sort().values
            assert torch.equal(plan.keep[name], top)


def test_round_to_one_is_the_default_plan():
    model = make_model("swin")
    space = vpf.describe(model)
    scores = random_scores(space)
    a, b = vpf.make_plan(space, scores, keep=KEEP), vpf.make_plan(space, scores, keep=KEEP, round_to=1)
    assert a.keep.keys() == b.keep.keys() and all(torch.equal(a.keep[k], b.keep[k]) for k in a.keep)
    assert a.heads == b.heads


def test_rounding_changes_the_plan_and_removal_still_equals_masking():
    model = make_model("deit")
    space = vpf.describe(model)
    scores = random_scores(space)
    plain = vpf.make_plan(space, scores, keep=KEEP)
    plan = vpf.make_plan(space, scores, keep=KEEP, round_to=8)
    assert _widths(space, plan) != _widths(space, plain)  # 0.4 x 48 = 19.2: 19 plain, 16 rounded
    x = make_input(model)
    ref = masked_copy(model, plan)(x)
    vpf.prune_(model, plan)
    assert model.embed_dim == 16 and model.blocks[0].attn.head_dim == 8 and model.blocks[0].mlp.fc1.out_features == 80
    assert rel_err(model(x), ref) < 1e-9


@pytest.mark.parametrize("bad", [0, -8, 2.5, True, "8"])
def test_bad_round_to_raises(bad):
    model = make_model("deit")
    space = vpf.describe(model)
    with pytest.raises(vpf.PlanError, match="round_to must be an int >= 1"):
        vpf.make_plan(space, random_scores(space), keep=KEEP, round_to=bad)


def test_keep_for_flops_with_rounding_reaches_a_rounded_plan():
    model = make_model("deit", dtype=torch.float32)
    r, achieved = vpf.keep_for_flops(model, 0.5, round_to=8)
    space = vpf.describe(model)
    plan = vpf.make_plan(space, random_scores(space), keep=dict.fromkeys(("residual", "attn", "mlp"), r), round_to=8)
    pruned = vpf.prune_(make_model("deit", dtype=torch.float32), plan)
    assert vpf.metrics.count_flops(pruned) / vpf.metrics.count_flops(model) == pytest.approx(achieved)
    assert pruned.embed_dim % 8 == 0 and pruned.blocks[0].mlp.fc1.out_features % 8 == 0


def test_cli_round_to(tmp_path, capsys):
    out = tmp_path / "p"
    args = ["prune", "--model", "deit_tiny_patch16_224", "--model-args",
            '{"depth": 2, "embed_dim": 48, "num_heads": 3, "patch_size": 8}', "--data", "digits",
            "--method", "magnitude", "--keep", "0.4", "--round-to", "8", "--quiet", "--out", str(out)]
    assert cli.main(args) == 0
    model = vpf.load_pruned(out)
    assert model.embed_dim == 16 and model.blocks[0].attn.head_dim == 8 and model.blocks[1].mlp.fc1.out_features == 80
