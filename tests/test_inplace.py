"""In place (README, 'Python API', prune_) — same Parameters, sliced .grad and optimizer state, no rebuild needed."""
import copy
import math

import pytest
import torch
from models import make_input, make_model, random_scores

import vitprune_fast as vpf
from vitprune_fast.arch import model_output
from vitprune_fast.testing import representatives

OTHER_LIBRARIES = [r.key for r in representatives(core=False) if r.library != "timm"]  # transformers, torchvision
PLAN_KW = dict(keep={"residual": 0.5, "attn": 0.5, "mlp": 0.5}, attn_mode="heads")  # head_dim kept unless tied


def _reference_slice(state: dict[str, torch.Tensor], space, plan) -> dict[str, torch.Tensor]:
    """Plain index_select of every tensor a plan touches (the copy-based way)."""
    out = {k: v.clone() for k, v in state.items()}
    for name, keep in plan.keep.items():
        g = space.groups[name]
        for sl in g.slices:
            if sl.name not in out:  # a tensor the caller has nothing for (a parameter without a grad)
                continue
            if sl.per_head:
                heads = torch.unique(keep // g.head_dim)
                out[sl.name] = out[sl.name].index_select(1, heads)
            else:
                out[sl.name] = out[sl.name].index_select(sl.dim, sl.indices(keep))
    return out


def _folded(tensors: dict[str, torch.Tensor], space, plan, power: int) -> dict[str, torch.Tensor]:
    """An attention whose head size shrinks (tied to the residual: torchvision's MultiheadAttention) gets q scaled by
    f = sqrt(new / old head size): its rows times f ** power (weights 1; gradients and Adam's first moment -1, its
    second moment -2). q's rows are the first third of a packed q|k|v tensor, or a separate q Linear's (transformers
    5.0's SigLIP layers are tied too)."""
    for name, keep in plan.keep.items():
        g = space.groups[name]
        if g.kind != "attn" or len(keep) // plan.heads[name] == g.head_dim:
            continue
        f = math.sqrt(len(keep) // plan.heads[name] / g.head_dim)
        for sl in g.slices:
            separate_q = sl.name.rsplit(".", 2)[-2] in ("q_proj", "query")
            if sl.dim == 0 and (sl.repeats == 3 or separate_q):
                rows = tensors[sl.name][: len(keep)]
                if power > 0:
                    rows.mul_(f ** power)
                else:  # a division, as prune_ does it: bit for bit
                    rows.div_(f ** -power)
    return tensors


def _loss(model, x):
    return model_output(model, x).square().mean()


def _train_steps(model, opt, x, n):
    for _ in range(n):
        opt.zero_grad()
        _loss(model, x).backward()
        opt.step()


@pytest.mark.parametrize("key", ["deit_distilled", "vit_layerscale", "swin", *OTHER_LIBRARIES])
def test_parameters_keep_identity_and_grads_are_sliced(key):
    model = make_model(key)
    x = make_input(model)
    _loss(model, x).backward()
    params = dict(model.named_parameters())
    ids = {n: id(p) for n, p in params.items()}
    space = vpf.describe(model)
    plan = vpf.make_plan(space, random_scores(space), **PLAN_KW)
    grads = {n: p.grad for n, p in params.items() if p.grad is not None}  # DINOv2's mask_token has none
    assert len(grads) >= len(params) - 1
    want = _folded(_reference_slice(grads, space, plan), space, plan, -1)
    vpf.prune_(model, plan)
    after = dict(model.named_parameters())
    assert {n: id(p) for n, p in after.items()} == ids
    for n, p in after.items():
        if n not in grads:
            assert p.grad is None, n
            continue
        assert p.grad.shape == p.shape
        assert torch.equal(p.grad, want[n]), n


@pytest.mark.parametrize("key", ["deit", "swin", *OTHER_LIBRARIES])
def test_adamw_step_after_prune_equals_fresh_optimizer_on_sliced_copy(key):
    model = make_model(key)
    x = make_input(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    _train_steps(model, opt, x, 2)
    space = vpf.describe(model)
    plan = vpf.make_plan(space, random_scores(space), **PLAN_KW)
    names = {p: n for n, p in model.named_parameters() if opt.state[p]}  # DINOv2's unused mask_token: no state
    weights = _folded(_reference_slice({n: p.detach() for n, p in model.named_parameters()}, space, plan), space,
                      plan, 1)
    states = {k: _folded(_reference_slice({names[p]: opt.state[p][k] for p in names}, space, plan), space, plan, power)
              for k, power in (("exp_avg", -1), ("exp_avg_sq", -2))}
    step = {names[p]: opt.state[p]["step"].clone() for p in names}

    vpf.prune_(model, plan, optimizer=opt)
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in fresh.named_parameters():
            p.copy_(weights[n])
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2, weight_decay=0.05)
    for n, p in fresh.named_parameters():
        if n in step:
            fresh_opt.state[p] = {"step": step[n].clone(), "exp_avg": states["exp_avg"][n].clone(),
                                  "exp_avg_sq": states["exp_avg_sq"][n].clone()}
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), weights[n]), n
        assert n not in step or torch.equal(opt.state[p]["exp_avg"], states["exp_avg"][n]), n

    _train_steps(model, opt, x, 1)
    _train_steps(fresh, fresh_opt, x, 1)
    for (n, p), q in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p.detach(), q.detach()), n
        assert n not in step or torch.equal(opt.state[p]["exp_avg_sq"], fresh_opt.state[q]["exp_avg_sq"]), n


def test_sgd_momentum_is_sliced():
    model = make_model("deit")
    x = make_input(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    _train_steps(model, opt, x, 2)
    space = vpf.describe(model)
    plan = vpf.make_plan(space, random_scores(space), **PLAN_KW)
    names = {p: n for n, p in model.named_parameters()}
    want = _reference_slice({names[p]: opt.state[p]["momentum_buffer"] for p in names}, space, plan)
    vpf.prune_(model, plan, optimizer=opt)
    for n, p in model.named_parameters():
        assert torch.equal(opt.state[p]["momentum_buffer"], want[n]), n
    _train_steps(model, opt, x, 1)  # keeps training without rebuilding the optimizer


def test_head_dim_fold_rescales_grad_and_adam_state():
    """q' = f·q (f = sqrt(new_hd/old_hd)): the q rows' grad scales by 1/f, exp_avg by 1/f, exp_avg_sq by 1/f²."""
    model = make_model("deit")
    x = make_input(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    _train_steps(model, opt, x, 1)
    _loss(model, x).backward()
    space = vpf.describe(model)
    plan = vpf.make_plan(space, random_scores(space), keep={"attn": 0.5})  # head_dim 16 -> 8
    qkv = model.blocks[0].attn.qkv
    sl = [s for s in space.groups["blocks.0.attn"].slices if s.name == "blocks.0.attn.qkv.weight"][0]
    idx = sl.indices(plan.keep["blocks.0.attn"])
    before = {"w": qkv.weight.detach()[idx], "grad": qkv.weight.grad[idx],
              "exp_avg": opt.state[qkv.weight]["exp_avg"][idx], "exp_avg_sq": opt.state[qkv.weight]["exp_avg_sq"][idx]}
    vpf.prune_(model, plan, optimizer=opt)
    f = (8 / 16) ** 0.5
    q = slice(0, 24)  # the q rows: 3 heads x 8 dims
    kv = slice(24, None)
    st = opt.state[qkv.weight]
    for got, want, power in [(qkv.weight.detach(), before["w"], -1), (qkv.weight.grad, before["grad"], 1),
                             (st["exp_avg"], before["exp_avg"], 1), (st["exp_avg_sq"], before["exp_avg_sq"], 2)]:
        assert torch.allclose(got[q], want[q] / f ** power, rtol=1e-12)
        assert torch.equal(got[kv], want[kv])
    _train_steps(model, opt, x, 1)


def test_storage_really_shrinks():
    model = make_model("deit", dtype=torch.float32)
    fc1 = model.blocks[0].mlp.fc1.weight
    before = fc1.untyped_storage().nbytes()
    space = vpf.describe(model)
    vpf.prune_(model, vpf.make_plan(space, random_scores(space), keep={"mlp": 0.25}))
    assert fc1.untyped_storage().nbytes() == fc1.numel() * 4 < before
