"""The method-interface refactor changed no number: plans, scores, DAP runs and pruned logits of the core test configs
equal a float64 snapshot taken with the code before it (commit 420e0e3; ``tests/data/snapshot-420e0e3.safetensors``).

Integers (kept indices, head counts) must be equal; floats (scores, logits) equal to 1e-12 relative + 1e-14 absolute
(on the machine that took the snapshot they are bit-identical; another CPU, or another run of MKL, may round float64
sums in another order); DAP trains in float32, so its weights are compared through a fingerprint (their sum and sum
of squares) to 1e-5."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from models import CONFIGS, make_input, make_model
from safetensors.torch import load_file

import vitprune_fast as vpf
from vitprune_fast.dap import DAP, Schedule
from vitprune_fast.score import baselines

SNAPSHOT = Path(__file__).parent / "data" / "snapshot-420e0e3.safetensors"
pytestmark = pytest.mark.usefixtures("one_thread")


def _plan(out, key, plan):
    for g, idx in sorted(plan.keep.items()):
        out[f"{key}/keep/{g}"] = idx
    for g, h in sorted(plan.heads.items()):
        out[f"{key}/heads/{g}"] = torch.tensor([h])


def _scores(out, key, scores):
    for g, s in sorted(scores.items()):
        out[f"{key}/{g}"] = s.double()


def _compute(key: str) -> dict[str, torch.Tensor]:
    """What the snapshot holds for ``key``, computed now (the calls of the snapshot script, in the same order)."""
    out: dict[str, torch.Tensor] = {}
    model = make_model(key)
    space = vpf.describe(model)
    x = make_input(model, 3)
    g = torch.Generator().manual_seed(0)
    rs = {n: torch.rand(gr.size, generator=g, dtype=torch.float64) for n, gr in space.groups.items()}
    for i, keep in enumerate(({"residual": 0.75}, {"attn": 0.5}, {"mlp": 0.4}, 0.5)):
        plan = vpf.make_plan(space, rs, keep=keep)
        _plan(out, f"{key}/rand{i}", plan)
        with torch.no_grad():
            out[f"{key}/rand{i}/logits"] = vpf.prune_(copy.deepcopy(model), plan)(x)
    _scores(out, f"{key}/magnitude", baselines.magnitude_scores(model))
    _scores(out, f"{key}/random", baselines.random_scores(model, torch.Generator().manual_seed(3)))
    _scores(out, f"{key}/dimap", vpf.dimap_scores(model, structured=True, attn_mode="dims"))
    _plan(out, f"{key}/dimap_plan", vpf.dimap_structured_plan(model, ratio=0.3, attn_mode="dims"))
    ups = vpf.upvits_scores(model, x[:2], components=("residual", "attn", "mlp", "blocks"), max_rows=16,
                            progress=False)
    _scores(out, f"{key}/upvits", ups)
    plan = vpf.make_plan(space, ups, keep=0.5)
    _plan(out, f"{key}/upvits_plan", plan)
    with torch.no_grad():
        out[f"{key}/upvits_plan/logits"] = vpf.prune_(copy.deepcopy(model), plan)(x)
    m32 = copy.deepcopy(model).float().train()
    torch.manual_seed(0)
    dap = DAP(m32, target=0.4, schedule=Schedule(0, 2, 3, update_every=1), attn_mode="dims", block_params_only=True)
    opt = torch.optim.AdamW(m32.parameters(), lr=1e-3)
    gg = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    for _ in range(3):
        xb = torch.randn(4, *x.shape[1:], generator=gg)
        yb = torch.randint(0, 10, (4,), generator=gg) % model.num_classes
        loss = torch.nn.functional.cross_entropy(m32(xb), yb) + dap.loss(yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        dap.step()
    _plan(out, f"{key}/dap_plan", dap.finalize(opt))
    ts = [p for _, p in sorted(m32.state_dict().items()) if p.is_floating_point()]
    out[f"{key}/dap_state_fingerprint"] = torch.tensor([float(sum(t.double().sum() for t in ts)),
                                                       float(sum(t.double().square().sum() for t in ts))],
                                                      dtype=torch.float64)
    if key in ("deit", "swin"):
        x4 = make_input(model, 4)
        keep = {"residual": 0.75, "attn": 0.5, "mlp": 0.5}
        _plan(out, f"{key}/select", vpf.upvits_select(model, x4, keep, progress=False)[0])
        merge = vpf.PlanSpec(0.5, heads=1 if key == "deit" else None)
        _plan(out, f"{key}/select_merge", vpf.upvits_select(model, x4, merge, progress=False)[0])
        for engine in ("exact", "screened"):
            _plan(out, f"{key}/progressive_{engine}",
                  vpf.upvits_progressive(model, x4, keep, steps=2, engine=engine, progress=False)[0])
        r, frac = vpf.keep_for_flops(model, 0.5)
        out[f"{key}/keep_for_flops"] = torch.tensor([r, frac], dtype=torch.float64)
        loader = [(make_input(model, 4, seed=s), torch.arange(4) % 10) for s in range(2)]
        _scores(out, f"{key}/taylor", baselines.taylor_scores(model, loader, num_batches=2, progress=False))
    return out


@pytest.mark.parametrize("key", list(CONFIGS))
def test_numbers_equal_the_snapshot_taken_before_the_refactor(key):
    want = {k: v for k, v in load_file(str(SNAPSHOT)).items() if k.split("/")[0] == key}
    got = _compute(key)
    assert set(got) == set(want)
    for name, w in want.items():
        v = got[name]
        assert v.shape == w.shape and v.dtype == w.dtype, name
        if not w.is_floating_point():
            assert torch.equal(v, w), name
        else:
            # a KL score is a sum of O(1) log-probability terms that cancel: its float64 rounding is ~1e-16 absolute
            # whatever its size, hence the absolute floor
            rtol, atol = (1e-5, 0.0) if name.endswith("dap_state_fingerprint") else (1e-12, 1e-14)
            assert ((v - w).abs().max() - atol).item() <= rtol * w.abs().max().item(), name
