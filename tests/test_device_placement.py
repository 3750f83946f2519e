"""Device placement of the CUDA code paths, checked on a CPU-only machine.

The model lives on the ``meta`` device as a stand-in for CUDA and every aten op runs under a dispatch mode that
fails when the non-scalar tensors of one op sit on different devices, except for the ops that accept CPU
indices or copy across devices. This is what a CUDA run would raise ("Expected all tensors to be on the same
device"), e.g. ``index_select`` / ``index_fill_`` / ``index_copy_`` of a CUDA tensor with a CPU index.
"""
import pytest
import torch
from models import make_input, make_model, random_scores
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import vitprune_fast as vpf
from vitprune_fast.dap import DAP, Schedule
from vitprune_fast.masked import MaskedNorm, masked_copy
from vitprune_fast.score.upvits import FastEngine, ReferenceEngine, _Work

aten = torch.ops.aten
# Ops that take CPU indices for a tensor on another device (advanced indexing), or copy between devices.
MIXED_OK = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_, aten.copy_, aten._to_copy,
            aten.set_}


class SameDevice(TorchDispatchMode):
    """Raise on an op whose non-scalar tensor arguments are on more than one device."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devices = {t.device for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0}
        if len(devices) > 1 and func.overloadpacket not in MIXED_OK:
            raise AssertionError(f"{func} mixes devices {sorted(map(str, devices))}")
        return func(*args, **kwargs)


def test_checker_catches_a_cpu_index_on_another_device():
    t = torch.zeros(4, 4, device="meta")
    with SameDevice(), pytest.raises(AssertionError, match="index_select"):
        t.index_select(0, torch.tensor([1]))
    with SameDevice():
        t[:, torch.tensor([1])] = 1.0  # advanced indexing takes CPU indices


@pytest.mark.parametrize("key", ["deit", "swin"])
def test_prune_with_optimizer_state_keeps_everything_on_the_model_device(key):
    model = make_model(key, dtype=torch.float32).to("meta")
    opt = torch.optim.AdamW(model.parameters())
    space = vpf.describe(model)
    plan = vpf.make_plan(space, random_scores(space), keep={"residual": 0.6, "attn": 0.5, "mlp": 0.4})
    with SameDevice():
        model(make_input(model, 2).to("meta")).sum().backward()
        opt.step()
        vpf.prune_(model, plan, optimizer=opt)
        model(make_input(model, 2).to("meta"))
    assert all(p.is_meta and opt.state[p]["exp_avg"].is_meta for p in model.parameters())


@pytest.mark.parametrize("key", ["deit", "swin"])
def test_masked_copy_keeps_everything_on_the_model_device(key):
    model = make_model(key, dtype=torch.float32)
    space = vpf.describe(model)
    plan = vpf.make_plan(space, random_scores(space), keep={"residual": 0.6, "attn": 0.5, "mlp": 0.4})
    with SameDevice():
        out = masked_copy(model.to("meta"), plan)
        out(make_input(model).to("meta"))
    norms = [m for m in out.modules() if isinstance(m, MaskedNorm)]
    assert norms and all(m.mask.is_meta for m in norms)


@pytest.mark.parametrize("key", ["deit", "swin"])
@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_upvits_engines_keep_everything_on_the_model_device(key, engine):
    model = make_model(key, dtype=torch.float32).to("meta")
    space = vpf.describe(model)
    x = make_input(model, 2).to("meta")
    eng = ReferenceEngine(model, space) if engine == "reference" else FastEngine(model, space, max_rows=4)
    with SameDevice(), torch.no_grad():
        for kind in ("residual", "attn", "mlp"):
            g = space.of_kind(kind)[-1]
            work = _Work(g.name, kind, g.size)
            if engine == "reference":  # two candidates are enough: every candidate runs the same code
                work = _Work(g.name, kind, 2)
            scores = eng.score(work, x, 0, lambda n: None)
            assert scores.is_meta and scores.shape == (work.size,)


@pytest.mark.parametrize("batched", [True, False])
def test_dap_training_step_keeps_everything_on_the_model_device(batched, monkeypatch):
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *a: False)  # autocast knows no meta device
    model = make_model("deit", dtype=torch.float32).to("meta").train()
    dap = DAP(model, 0.5, Schedule(0, 10, 20, update_every=10), batched=batched)
    x = make_input(model, 2).to("meta")
    y = torch.zeros(2, dtype=torch.long, device="meta")
    with SameDevice():
        loss = torch.nn.functional.cross_entropy(model(x), y) + dap.loss(y)
        loss.backward()
        dap.step()
    assert dap.gate.is_meta and dap.t == 1


class CountMixed(TorchDispatchMode):
    """Count the aten ops that touch tensors on more than one device (host -> device traffic on a GPU)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devices = {t.device for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        self.count += len(devices) > 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("key", ["deit", "swin"])
@pytest.mark.parametrize("kind", ["residual", "attn", "mlp"])
def test_engine_host_device_traffic_does_not_grow_with_the_candidates(key, kind):
    """Candidate masks are built on the host and moved once per pass: the number of ops that mix host and device
    tensors in a pass is the same for 2 candidates as for 8 (the engine once wrote each candidate's mask entries
    into a device tensor with a host index, a blocking copy per candidate on a GPU)."""
    model = make_model(key, dtype=torch.float32).to("meta")
    space = vpf.describe(model)
    x = make_input(model, 2).to("meta")
    g = space.of_kind(kind)[0]
    counts = []
    for k in (2, 8):
        eng = FastEngine(model, space, max_rows=2 * k)  # one pass of k candidates (2 images)
        eng.teacher(x, 0)  # the teacher pass is shared by all candidates; count the candidate pass only
        with CountMixed() as mode, torch.no_grad():
            eng.score(_Work(g.name, kind, k), x, 0, lambda n: None)
        counts.append(mode.count)
    assert counts[0] == counts[1], counts


def test_engine_keeps_the_activation_dtype_under_autocast():
    """An attention-dim candidate zeroes q/k/v in the activation's dtype: under bf16 autocast q stays bf16, as in a
    plain forward (a float32 mask used to promote the whole attention input to float32)."""
    model = make_model("deit", dtype=torch.float32)
    x = make_input(model, 2)
    seen = []
    model.blocks[1].attn.q_norm.register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
    space = vpf.describe(model)
    g = space.groups["blocks.1.attn"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
        FastEngine(model, space, max_rows=8).score(_Work(g.name, "attn", 4), x, 0, lambda n: None)
    assert len(seen) >= 2 and set(seen) == {torch.bfloat16}, seen  # plain forward, teacher pass, candidates
