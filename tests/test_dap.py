"""DAP: budget projection, κ fixed point, schedule, hard gates == sliced model, short run, batched == looped probes."""
import math

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import CONFIGS, SWIN_KEYS, VIT_KEYS, make_input, make_model, rel_err

import vitprune_fast as vpf
from vitprune_fast import dap as D
from vitprune_fast.dap import DAP, FAITHFUL, Schedule, finetune_dap
from vitprune_fast.dap.probes import BatchedProbes, LoopedProbes, probe_ce
from vitprune_fast.errors import UnsupportedModelError


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is as fast and does not stall on a loaded machine (OpenMP barriers)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------ κ allocation math
@settings(max_examples=200, deadline=None)
@given(st.integers(1, 48), st.integers(0, 2**31 - 1), st.floats(0.01, 0.99), st.booleans())
def test_projection_hits_budget_with_kappa_in_unit_interval(nb, seed, frac, with_ema):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(10, 10**6, (nb,), generator=g).double()
    kept = (sizes * torch.rand(nb, generator=g, dtype=torch.float64)).clamp_min(1)
    d_cls, d_patch = torch.randn(2, nb, generator=g, dtype=torch.float64) * torch.rand(2, 1, generator=g) * 5
    budget = frac * float(sizes.sum())
    prev = tuple(torch.rand(2, nb, generator=g, dtype=torch.float64) * 3) if with_ema else None
    goal, _ = D.keep_ratio_goal(d_cls, d_patch, kept, sizes, budget, prev)
    assert ((goal >= 0) & (goal <= 1)).all()
    assert abs(float((goal * sizes).sum()) - budget) <= 1e-3 * budget


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 30), st.integers(0, 2**31 - 1), st.floats(0.0, 1.0))
def test_projection_of_arbitrary_scores(nb, seed, frac):
    """Also with zero/negative entries (frozen at 0) and budgets at the ends of the feasible range."""
    g = torch.Generator().manual_seed(seed)
    kappa = torch.randn(nb, generator=g, dtype=torch.float64)
    kappa[0] = abs(kappa[0]) + 0.1  # at least one positive block
    sizes = torch.randint(1, 1000, (nb,), generator=g).double()
    reachable = float(sizes[kappa > 0].sum())
    budget = frac * reachable
    k = D.project_to_budget(kappa, sizes, budget)
    assert ((k >= 0) & (k <= 1)).all()
    assert (k[kappa <= 0] == 0).all()
    assert abs(float((k * sizes).sum()) - budget) <= 1e-3 * max(budget, 1.0)


def test_equal_dpsi_gives_kappa_proportional_to_one_over_kept_params():
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(1000, 50000, (12,), generator=g).double()
    kept = sizes * (0.3 + 0.7 * torch.rand(12, generator=g, dtype=torch.float64))
    d = torch.full((12,), 0.37, dtype=torch.float64)
    budget = 0.2 * float(sizes.sum())
    goal, _ = D.keep_ratio_goal(d, d, kept, sizes, budget)
    free = goal < 1
    assert free.sum() >= 6
    prod = (goal * kept)[free]  # κ ∝ 1/R among the blocks the projection did not clip at 1
    assert (prod.max() - prod.min()) / prod.mean() < 1e-12
    assert (kept[~free] <= kept[free].min()).all()  # the clipped ones are the smallest R (largest 1/R)


def test_equal_dpsi_fixed_point_kappa_proportional_to_inverse_sqrt_size():
    """Documented fixed point: R_i = κ_i W_i and κ ∝ 1/R_i give κ_i ∝ W_i^(-1/2) (reached through the EMA)."""
    g = torch.Generator().manual_seed(1)
    sizes = torch.randint(1000, 50000, (10,), generator=g).double()
    d = torch.full((10,), -0.2, dtype=torch.float64)  # also covers the all-non-positive ΔΨ fallback
    budget = 0.25 * float(sizes.sum())
    kept, prev = sizes.clone(), None
    for _ in range(200):
        goal, prev = D.keep_ratio_goal(d, d, kept, sizes, budget, prev)
        kept = goal * sizes
    assert goal.max() < 1
    prod = goal * sizes.sqrt()
    assert (prod.max() - prod.min()) / prod.mean() < 1e-6
    assert abs(float(kept.sum()) - budget) < 1e-6 * budget


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 30), st.integers(0, 2**31 - 1), st.floats(0.05, 0.95))
def test_round_to_budget_within_half_a_unit(nb, seed, frac):
    g = torch.Generator().manual_seed(seed)
    size = torch.randint(1, 200, (nb,), generator=g)
    ppm = torch.randint(1, 5000, (nb,), generator=g)
    kappa = D.project_to_budget(torch.rand(nb, generator=g, dtype=torch.float64) + 0.01, (size * ppm).double(),
                              frac * float((size * ppm).sum()))
    budget = float((kappa * size * ppm).sum())
    k = D.round_to_budget(kappa * size, size, ppm, budget)
    assert ((k >= 1) & (k <= size)).all()
    if (kappa * size >= 1).all():  # the one-unit minimum does not bind
        assert abs(float((k * ppm).sum()) - budget) <= ppm.max() / 2


def test_soft_mask_hard_threshold_and_centres():
    scores = torch.tensor([0.3, 0.1, 0.9, 0.5, 0.2, 0.7])
    hard = D.soft_mask(scores, keep=3, tau=0.0)
    assert hard.tolist() == [0, 0, 1, 1, 0, 1]
    for center in ("midpoint", "reference"):
        soft = D.soft_mask(scores, keep=3, tau=0.1, center=center)
        assert ((soft >= 0.5) == hard.bool()).all()
    ref = D.soft_mask(scores, keep=3, tau=0.1, center="reference")
    assert ref[3] == 0.5  # the first kept unit (score 0.5) sits on the threshold (reference off-by-one)
    mid = D.soft_mask(scores, keep=3, tau=0.1)
    assert torch.allclose(mid[0] + mid[3], torch.tensor(1.0, dtype=mid.dtype))  # last pruned / first kept: symmetric


# ----------------------------------------------------------------------------------------------- schedule
def test_schedule_phase_boundaries():
    s = Schedule(start=3, sparse=7, final=12, update_every=2, tau_max=0.1)
    assert [s.phase(t) for t in (0, 2, 3, 6, 7, 11, 12, 50)] == [
        "warmup", "warmup", "sparsify", "sparsify", "sharpen", "sharpen", "hard", "hard"]
    assert [s.ramp(t) for t in (2, 3, 4, 5, 6, 7)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert s.tau(6) == s.tau(7) == 0.1 and s.tau(12) == 0.0
    assert math.isclose(s.tau(11), 0.1 / 5) and s.tau(8) < s.tau(7)
    assert [t for t in range(20) if s.is_update(t)] == [4, 6, 8, 10, 11]
    with pytest.raises(ValueError):
        Schedule(5, 5, 10)
    r = Schedule.for_steps(100)
    assert (r.start, r.sparse, r.final) == (20, 50, 100)


def _run(dap, model, steps, batch=6, seed=0, opt=None):
    g = torch.Generator().manual_seed(seed)
    p = next(model.parameters())
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.02)
    gates = []
    for _ in range(steps):
        x = torch.randn(batch, 3, 32, 32, generator=g, dtype=p.dtype)
        y = torch.randint(0, model.num_classes, (batch,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x), y) + dap.loss(y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        dap.step()
        gates.append(dap.gate.detach().clone())
    return gates


def test_dap_follows_the_schedule():
    model = make_model("deit", dtype=torch.float32).train()
    s = Schedule(start=3, sparse=7, final=12, update_every=2)
    dap = DAP(model, 0.5, s, batched=True)
    gates = _run(dap, model, 14)
    assert [h["step"] for h in dap.history] == [4, 6, 8, 10, 11]
    assert all((g == 1).all() for g in gates[:4])  # warm-up and the first window: dense
    soft = gates[4]
    assert ((soft > 0) & (soft < 1)).any()  # soft masks during the ramp
    assert set(gates[11].unique().tolist()) <= {0.0, 1.0}  # hard after the final update
    assert torch.equal(gates[11], gates[13])  # frozen afterwards
    first = dap.history[0]
    assert first["rho"] == 0.5 and first["tau"] == 0.1 and dap.history[-1]["tau"] == 0.0
    kappa = 1 - (1 - torch.tensor(first["goal"])) * 0.5
    ramp_budget = float((kappa * dap.full).sum()) + dap.nonblock_params
    assert abs(first["kept_params"] - ramp_budget) <= dap.tolerance  # halfway down the ramp
    assert abs(dap.history[-1]["kept_params"] - dap.target_params) <= dap.tolerance
    x = make_input(model, 4)
    model(x)
    assert dap.loss(torch.zeros(4, dtype=torch.long)).item() == 0.0  # no probes once the masks are final


def test_probe_every_and_probe_batch():
    model = make_model("swin", dtype=torch.float32).train()
    dap = DAP(model, 0.5, Schedule(0, 10, 20, update_every=100), probe_every=3, probe_batch=2)
    x, y = make_input(model, 5), torch.randint(0, 10, (5,))
    losses = []
    for _ in range(6):
        task = torch.nn.functional.cross_entropy(model(x), y)
        loss = dap.loss(y)
        losses.append(loss.item())
        (task + loss).backward()
        dap.step()
    assert [v > 0 for v in losses] == [True, False, False, True, False, False]
    assert dap._bpi_n == 2 and dap._taylor_n == 6  # ΔΨ on probe steps only, Taylor scores on every step


# ------------------------------------------------------------------------ removal == masking: gates == slicing
@pytest.mark.parametrize("key", VIT_KEYS + SWIN_KEYS)
@pytest.mark.parametrize("attn_mode", ["dims", "heads"])
def test_hard_gates_equal_sliced_model(key, attn_mode):
    model = make_model(key).train()  # float64, random biases / norm weights
    dense_params = sum(p.numel() for p in model.parameters())
    dap = DAP(model, 0.5 if attn_mode == "dims" else 0.3, Schedule(1, 3, 5, update_every=1), attn_mode=attn_mode,
              batched=attn_mode == "dims", probe_dtype=torch.float32)  # float64 gates; float32 probes (fast convs)
    _run(dap, model, 5)
    model.eval()
    x = make_input(model, 4, seed=7)
    with torch.no_grad():
        gated = model(x)
        plan = dap.plan()
        dap.remove()
        dense = model(x)
        vpf.prune_(model, plan)
        pruned = model(x)
    assert rel_err(pruned, gated) < 1e-9
    assert rel_err(dense, gated) > 1e-6  # the gates did change the function
    n = sum(p.numel() for p in model.parameters())
    assert n == dap.kept_params() < dense_params
    assert abs(n - dap.target_params) <= dap.tolerance
    for g in vpf.describe(model).of_kind("attn"):  # equal heads: a stock timm attention
        attn = model.get_submodule(g.module)
        assert attn.qkv.out_features == 3 * attn.num_heads * g.head_dim


def test_keep_counts_are_non_uniform_across_blocks():
    model = make_model("deit", dtype=torch.float32).train()
    dap = DAP(model, 0.5, Schedule(1, 3, 5, update_every=1))
    _run(dap, model, 5)
    ratios = dap.keep_ratios()
    assert len({round(v, 6) for k, v in ratios.items() if k.endswith("mlp")}) > 1
    plan = dap.plan()
    sizes = plan.kept_sizes(vpf.describe(model))
    assert len({sizes[f"blocks.{i}.mlp"] for i in range(3)}) > 1


def test_faithful_flags_train_gates_and_stay_exact():
    model = make_model("deit").train()
    dap = DAP(model, 0.5, Schedule(1, 4, 6, update_every=2), probe_dtype=torch.float32, **FAITHFUL)
    assert isinstance(dap.gate, torch.nn.Parameter)
    opt = torch.optim.SGD(list(model.parameters()) + dap.gate_parameters(), lr=0.5)
    gates = _run(dap, model, 7, opt=opt)
    assert not torch.equal(gates[0], torch.ones_like(gates[0]))  # trained by the main optimizer in warm-up
    assert set(gates[5].unique().tolist()) <= {0.0, 1.0} and torch.equal(gates[5], gates[6])
    model.eval()
    x = make_input(model, 3)
    with torch.no_grad():
        gated = model(x)
        dap.finalize()
        assert rel_err(model(x), gated) < 1e-9


# ------------------------------------------------------------------------------------------- short run
@pytest.mark.parametrize("key", ["deit", "swin"])
def test_short_run_on_digits_reaches_target(key):
    from vitprune_fast.data import digits

    torch.manual_seed(0)
    name, kw = CONFIGS[key]
    model = timm.create_model(name, pretrained=False, **kw)
    train, _ = digits().loaders(batch_size=32)
    before = {n: p.shape for n, p in model.named_parameters()}
    model, plan, hist = finetune_dap(model, train, target=0.5, steps=24, lr=1e-3, dap_kwargs=dict(batched=True))
    n = sum(p.numel() for p in model.parameters())
    assert n == hist["params_after"] == hist["updates"][-1]["kept_params"]
    assert abs(n - hist["target_params"]) <= hist["tolerance"]
    assert hist["target_params"] == round(0.5 * hist["params_before"])
    assert any(p.shape != before[k] for k, p in model.named_parameters())  # physically smaller tensors
    assert type(model).__module__.startswith("timm.") and plan.keep
    assert all(math.isfinite(v) for v in hist["loss"] + hist["probe_loss"])
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


# ------------------------------------------------------------------------------------- probes: fast == ref
@pytest.mark.parametrize("prefix,has_cls,grid", [(1, True, (4, 4)), (2, True, (3, 5)), (0, False, (4, 4))])
@pytest.mark.parametrize("training", [True, False])
def test_batched_probes_equal_looped(prefix, has_cls, grid, training):
    torch.manual_seed(3)
    nb, c, k, b = 5, 6, 7, 3
    fast = BatchedProbes(nb, c, k, has_cls, prefix, grid, dtype=torch.float64)
    with torch.no_grad():  # non-trivial BatchNorm state and affine parameters
        for bn in (fast.bn1, fast.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2)
    ref = fast.to_looped()
    assert isinstance(ref, LoopedProbes)
    fast.train(training)
    ref.train(training)
    maps = [torch.randn(b, prefix + grid[0] * grid[1], c, dtype=torch.float64) for _ in range(nb + 1)]
    y = torch.randint(0, k, (b,))
    outs = []
    for m in (fast, ref):
        cls, patch = m(maps)
        (probe_ce(cls, y, 0.1).sum() + probe_ce(patch, y, 0.1).sum()).backward()
        outs.append((cls, patch))
    for a, r in zip(outs[0], outs[1], strict=True):
        assert a.shape == (2, b, nb, k)
        assert rel_err(a, r) < 1e-12
    for i, head in enumerate(ref.heads):
        sl = slice(i * c, (i + 1) * c)
        pairs = [(fast.cls_w.grad[i].T, head.cls.weight.grad), (fast.fc_b.grad[i], head.fc.bias.grad),
                 (fast.conv1.grad[sl], head.patch[0].weight.grad), (fast.conv2.grad[sl], head.patch[3].weight.grad),
                 (fast.bn1.weight.grad[sl], head.patch[1].weight.grad)]
        for a, r in pairs:
            assert rel_err(a, r) < 1e-10
    if training:
        assert rel_err(fast.bn2.running_mean[c:2 * c], ref.heads[1].patch[4].running_mean) < 1e-12


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("key", ["deit_distilled", "swin3"])
@pytest.mark.usefixtures("no_tf32")  # on CUDA, TF32 convolutions / matmuls would be the difference measured
def test_dap_bpi_same_with_batched_and_looped_probes(key, device):
    """DAP(batched=False) is wired like the default: same probe losses and ΔΨ from the same weights."""
    model = make_model(key, dtype=torch.float32).to(device).train()
    fast = DAP(model, 0.5, Schedule(0, 5, 10), batched=True)  # the default on CUDA
    ref = DAP(model, 0.5, Schedule(0, 5, 10), batched=False)
    ref.probes = torch.nn.ModuleList(p.to_looped() for p in fast.probes)
    x, y = make_input(model, 4).to(device), torch.randint(0, model.num_classes, (4,), device=device)
    model(x)
    a, b = fast.loss(y), ref.loss(y)
    tol = 1e-5 if device == "cpu" else 1e-4
    assert abs(a.item() - b.item()) < tol * abs(b.item())
    for da, db in ((fast._dcls, ref._dcls), (fast._dpatch, ref._dpatch)):
        assert torch.allclose(da, db, atol=tol)
    assert fast._dcls.abs().sum() > 0


def test_batched_probes_under_autocast():
    torch.manual_seed(0)
    fast = BatchedProbes(4, 16, 5, True, 1, (4, 4))
    maps = [torch.randn(8, 17, 16) for _ in range(5)]
    y = torch.randint(0, 5, (8,))
    ref_cls, ref_patch = fast(maps)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cls, patch = fast(maps)
        loss = probe_ce(cls, y).mean() + probe_ce(patch, y).mean()
    assert cls.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(fast.conv1.grad).all()
    assert rel_err(patch.float(), ref_patch) < 0.05 and rel_err(cls.float(), ref_cls) < 0.05


# ---------------------------------------------------------------------------------------------- errors
def test_errors():
    model = make_model("deit", dtype=torch.float32)
    with pytest.raises(ValueError, match="fewer than one unit"):
        DAP(model, 0.99)
    with pytest.raises(ValueError):
        DAP(model, 0.5, attn_mode="merge")
    with pytest.raises(UnsupportedModelError):
        DAP(torch.nn.Linear(3, 3))
    dap = DAP(model, 0.5)
    with pytest.raises(RuntimeError, match="forward pass"):
        dap.loss(torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="final update"):
        finetune_dap(model, [], target=0.5, steps=10, schedule=Schedule(2, 5, 20))
