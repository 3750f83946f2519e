"""Baselines: first-order Taylor equals a brute-force directional derivative; magnitude equals a per-channel sum."""
import pytest
import torch
import torch.nn.functional as F
from models import make_model

import vitprune_fast as vpf
from vitprune_fast.score import magnitude_scores, taylor_scores
from vitprune_fast.space import tensor_of

pytestmark = pytest.mark.usefixtures("one_thread")


def _batches(model, n_batches=2, batch=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    num_classes = model.num_classes
    return [(torch.randn(batch, 3, 32, 32, generator=g, dtype=torch.float64),
             torch.randint(0, num_classes, (batch,), generator=g)) for _ in range(n_batches)]


def _channel_entries(model, group, c):
    """(tensor, dim, indices) of every non-per-head entry channel c of the group owns."""
    params = dict(model.named_parameters())
    return [(params[sl.name], sl.dim, sl.indices(torch.tensor([c]))) for sl in group.slices
            if not sl.per_head and sl.name in params]


@torch.no_grad()
def _directional_derivative(model, group, c, x, y, h=1e-5):
    """d/dt L(w + t·w_c) at t = 0 by central differences in float64, w_c = the weights channel c owns."""
    entries = _channel_entries(model, group, c)
    saved = [t.index_select(d, i).clone() for t, d, i in entries]
    losses = []
    for s in (h, -h):
        for (t, d, i), v in zip(entries, saved, strict=True):
            t.index_copy_(d, i, v * (1 + s))
        losses.append(F.cross_entropy(model(x), y).item())
        for (t, d, i), v in zip(entries, saved, strict=True):
            t.index_copy_(d, i, v)
    return (losses[0] - losses[1]) / (2 * h)


@pytest.mark.parametrize("key", ["deit", "swin3"])
def test_taylor_equals_brute_force(key, per_group=4):
    model = make_model(key)
    batches = _batches(model)
    space = vpf.describe(model)
    scores = taylor_scores(model, batches)
    g = torch.Generator().manual_seed(0)
    checked = 0
    for name, group in space.groups.items():
        chans = [0, group.size - 1] + torch.randperm(group.size, generator=g)[:per_group].tolist()  # ends + random
        for c in chans:
            brute = sum(abs(_directional_derivative(model, group, c, x, y)) for x, y in batches)
            assert scores[name][c].item() == pytest.approx(brute, rel=1e-6, abs=1e-10), (name, c)
            checked += 1
    assert checked == (per_group + 2) * len(space.groups)
    assert all((s > 0).any() for s in scores.values())


def test_taylor_leaves_model_untouched_and_feeds_make_plan():
    model = make_model("deit")
    for p in model.parameters():
        p.requires_grad_(False)
    model.blocks[0].mlp.fc1.weight.requires_grad_(True)
    model.blocks[0].mlp.fc1.weight.grad = torch.ones_like(model.blocks[0].mlp.fc1.weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = taylor_scores(model, _batches(model), num_batches=1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["blocks.0.mlp.fc1.weight"]
    assert torch.equal(model.blocks[0].mlp.fc1.weight.grad, torch.ones_like(model.blocks[0].mlp.fc1.weight))
    space = vpf.describe(model)
    plan = vpf.make_plan(space, scores, keep=0.5)
    kept = plan.keep["blocks.1.mlp"]
    top = torch.argsort(scores["blocks.1.mlp"], descending=True)[: len(kept)].sort().values
    assert torch.equal(kept, top)


def test_taylor_needs_batches():
    with pytest.raises(vpf.VitPruneError, match="no batches"):
        taylor_scores(make_model("deit"), [])


@pytest.mark.parametrize("key", ["deit", "swin"])
@pytest.mark.parametrize("p", [1, 2])
def test_magnitude_equals_per_channel_sum(key, p):
    model = make_model(key)
    space = vpf.describe(model)
    scores = magnitude_scores(model, p=p)
    for name, group in space.groups.items():
        for c in (0, group.size // 2, group.size - 1):
            total = 0.0
            for sl in group.slices:
                if sl.per_head:
                    continue
                t = tensor_of(model, sl.name).detach()
                part = t.index_select(sl.dim, sl.indices(torch.tensor([c])))
                total += part.abs().sum().item() if p == 1 else part.square().sum().item()
            want = total if p == 1 else total ** 0.5
            assert scores[name][c].item() == pytest.approx(want, rel=1e-9), (name, c)
