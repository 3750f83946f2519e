"""DAP.state_dict / load_state_dict: a resumed run equals the uninterrupted one; bad states are refused untouched."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from models import make_input, make_model

from vitprune_fast.dap import DAP, FAITHFUL, Schedule, finetune_dap
from vitprune_fast.errors import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEDULE = Schedule(start=2, sparse=5, final=8, update_every=2)  # updates after steps 3, 5, 7 (final)
STEPS = 9  # one step in the hard phase
CASES = {"deit": dict(batched=False), "swin_faithful": dict(batched=True, **FAITHFUL)}


def _batch(t, model, n=4):
    """The data of step t (the same in every run)."""
    g = torch.Generator().manual_seed(1000 + t)
    p = next(model.parameters())
    return torch.randn(n, 3, 32, 32, generator=g, dtype=p.dtype), torch.randint(0, model.num_classes, (n,), generator=g)


def _build(case, seed, target=0.5, schedule=SCHEDULE, **over):
    """Model (float64, random biases / norm weights), DAP (its probes drawn from ``seed``), AdamW."""
    torch.manual_seed(seed)
    model = make_model("swin" if case.startswith("swin") else case, seed=seed).train()
    dap = DAP(model, target, schedule, **{**CASES[case], **over})
    groups = [{"params": list(model.parameters())}]
    if dap.train_gates:
        groups.append({"params": dap.gate_parameters(), "weight_decay": 0.0})
    return model, torch.optim.AdamW(groups, lr=2e-3), dap


def _train(model, opt, dap, steps):
    for t in steps:
        x, y = _batch(t, model)
        loss = F.cross_entropy(model(x), y) + dap.loss(y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        dap.step()


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _outcome(model, opt, dap):
    model.eval()
    with torch.no_grad():
        out = model(make_input(model, 3, seed=5))
    model.train()
    plan = dap.plan()
    return dict(out=out, dap=copy.deepcopy(dap.state_dict()), model=copy.deepcopy(model.state_dict()),
                opt=copy.deepcopy(opt.state_dict()), plan=dict(plan.keep), heads=plan.heads,
                kept=dap.kept_params(), ratios=dap.keep_ratios(), requires_grad=dap.gate.requires_grad)


def assert_same(a, b, path="state"):
    """Exact equality of nested dicts / lists / tensors (dtype included)."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path}: max diff {(a.double() - b.double()).abs().max().item():.3g}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


_REFERENCE = {}


def _uninterrupted(case):
    if case not in _REFERENCE:
        model, opt, dap = _build(case, seed=0)
        _train(model, opt, dap, range(STEPS))
        _REFERENCE[case] = _outcome(model, opt, dap)
    return _REFERENCE[case]


# After n steps: 2: saved in warm-up, resumed right at `start` (the first scoring step); 3: mid-window in sparsify
# (non-zero ΔΨ and Taylor sums), then mask updates, crossing `sparse`; 5: mid-window, resumed right at `sparse`
# (sparsify -> sharpen); 7: mid-window in sharpen, resumed for the final update and a step in the hard phase.
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("n", [2, 3, 5, 7])
def test_resume_equals_uninterrupted(case, n):
    model, opt, dap = _build(case, seed=0)
    _train(model, opt, dap, range(n))
    assert dap.schedule.phase(n - 1) != dap.schedule.phase(STEPS - 1)
    # the loop's own RNG (Swin's drop-path) is the loop's to save; DAP draws none after construction
    saved = _roundtrip(dict(model=model.state_dict(), opt=opt.state_dict(), dap=dap.state_dict(),
                            rng=torch.get_rng_state()))
    if n != 2:
        assert saved["dap"]["bpi_n"] > 0 and saved["dap"]["taylor"].abs().sum() > 0
    del model, opt, dap

    model, opt, dap = _build(case, seed=7)  # "new process": other weights, other probe init
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    dap.load_state_dict(saved["dap"])
    torch.set_rng_state(saved["rng"])
    assert dap.t == n
    _train(model, opt, dap, range(n, STEPS))
    assert_same(_outcome(model, opt, dap), _uninterrupted(case))


def test_state_roundtrips_through_torch_save_and_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    model, opt, dap = _build("swin_faithful", seed=0)
    _train(model, opt, dap, range(4))
    state = dap.state_dict()
    path = tmp_path / "dap.pt"
    torch.save(state, path)
    loaded = torch.load(path, weights_only=True)
    assert_same(loaded, state)
    flat = {}

    def walk(obj, key):
        if torch.is_tensor(obj):
            flat[key] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{key}.{k}" if key else str(k))

    walk(state, "")
    assert any(v.dim() == 4 for v in flat.values())  # the channels-last probe convolutions are in it
    save_file(flat, tmp_path / "dap.safetensors")  # contiguous, no shared storage
    assert_same(load_file(tmp_path / "dap.safetensors"), flat)

    _, _, fresh = _build("swin_faithful", seed=3)
    fresh.load_state_dict(loaded)
    assert_same(fresh.state_dict(), state)
    conv = fresh.probes[0].conv1
    assert conv.is_contiguous(memory_format=torch.channels_last)  # layouts kept: parameters and Adam moments
    assert fresh.optimizer.state[conv]["exp_avg"].stride() == conv.stride()


def test_state_dict_between_loss_and_step_is_refused():
    model, _, dap = _build("deit", seed=0)
    x, y = _batch(0, model)
    model(x)
    dap.loss(y)
    with pytest.raises(RuntimeError, match="after dap.step"):
        dap.state_dict()


def _bad_states(good):
    """(name, corrupted copy of ``good``, expected message)."""
    def edit(fn):
        s = copy.deepcopy(good)
        fn(s)
        return s

    pw = next(k for k in good["probes"] if k.endswith("weight"))
    first = next(iter(good["probe_optimizer"]["state"]))
    yield "not a dict", [1, 2], "expected a dict"
    yield "version", edit(lambda s: s.update(version=99)), "version 99"
    yield "missing", edit(lambda s: s.pop("taylor")), r"missing keys \['taylor'\]"
    yield "unexpected", edit(lambda s: s.update(extra=1)), r"unexpected keys \['extra'\]"
    yield "target", edit(lambda s: s["config"].update(target=0.3)), "config target: saved 0.3"
    yield "schedule", edit(lambda s: s["config"]["schedule"].update(final=20)), "config schedule"
    yield "config type", edit(lambda s: s.update(config=None)), "config: expected a dict"
    yield "config key", edit(lambda s: s["config"].pop("gamma")), "config gamma: saved '<missing>'"
    yield "gate shape", edit(lambda s: s.update(gate=s["gate"][:-1])), r"gate: shape"
    yield "taylor shape", edit(lambda s: s.update(taylor=torch.zeros(3))), r"taylor: shape \(3,\)"
    yield "ema shape", edit(lambda s: s.update(ema=torch.zeros(3, 2))), r"ema: shape"
    yield "keep dtype", edit(lambda s: s.update(keep=s["keep"].double())), "keep: dtype torch.float64"
    yield "step", edit(lambda s: s.update(t=-1)), "t: expected an int"
    yield "masks", edit(lambda s: s["keep"].__setitem__(0, not s["keep"][0])), "keep / units disagree"
    yield "probe shape", edit(lambda s: s["probes"].update({pw: s["probes"][pw][:1]})), f"probes.{pw}: shape"
    yield "probe key", edit(lambda s: s["probes"].pop(pw)), "probes: missing keys"
    yield "adam shape", edit(lambda s: s["probe_optimizer"]["state"][first].update(exp_avg=torch.zeros(2))), \
        r"probe_optimizer.state\[\d+\].exp_avg: shape"
    yield "adam groups", edit(lambda s: s["probe_optimizer"]["param_groups"].pop()), "parameter groups of sizes"


def test_bad_state_raises_and_leaves_dap_untouched():
    model, opt, dap = _build("deit", seed=0)
    _train(model, opt, dap, range(4))  # mid-window: every piece of state is non-trivial
    _, _, other = _build("deit", seed=1)
    _train(other.model, torch.optim.SGD(other.model.parameters(), lr=0.01), other, range(6))
    good = _roundtrip(other.state_dict())
    before = _outcome(model, opt, dap)
    wrong = {"other model": (_build("swin_faithful", seed=0)[2], "model: 8 DAP blocks saved, this model has 6"),
             "other width": (DAP(make_model("deit_distilled"), 0.5, SCHEDULE, batched=False), "different model"),
             "other attn_mode": (_build("deit", seed=0, attn_mode="heads")[2], "block 0 is"),
             "other probe_every": (_build("deit", seed=0, probe_every=2)[2], "config probe_every: saved 2"),
             "other target": (_build("deit", seed=0, target=0.4)[2], "config target: saved 0.4, this DAP has 0.5")}
    cases = list(_bad_states(good)) + [(k, _roundtrip(d.state_dict()), m) for k, (d, m) in wrong.items()]
    for name, bad, msg in cases:
        with pytest.raises(CheckpointError, match=msg):
            dap.load_state_dict(bad)
        assert_same(_outcome(model, opt, dap), before, name)
    dap.load_state_dict(good)  # and the good one loads
    assert dap.t == 6
    assert_same(dap.state_dict(), good)


class _Interrupted(Exception):
    pass


class _Loader:
    """Two fixed batches per pass; raises after ``stop_after`` batches in total (a killed job)."""

    def __init__(self, model, stop_after=None):
        self.batches, self.stop_after, self.n = [_batch(t, model) for t in range(2)], stop_after, 0

    def __iter__(self):
        for b in self.batches:
            if self.n == self.stop_after:
                raise _Interrupted
            self.n += 1
            yield b


def test_finetune_dap_resumes_from_its_checkpoint(tmp_path):
    ck = tmp_path / "run.pt"
    kw = dict(target=0.5, steps=STEPS, lr=1e-3, schedule=SCHEDULE, dap_kwargs=dict(batched=False))

    def run(seed, stop_after=None, **more):
        torch.manual_seed(0)  # probe init of the original run
        model = make_model("deit", seed=seed)
        return finetune_dap(model, _Loader(model, stop_after), **kw, **more)

    model, plan, hist = run(0)
    with pytest.raises(_Interrupted):
        run(0, stop_after=7, checkpoint=ck, checkpoint_every=2)  # steps 0..6 ran; saved after steps 1, 3, 5
    assert torch.load(ck, weights_only=True)["step"] == 6
    with pytest.raises(CheckpointError, match="config target"):
        finetune_dap(make_model("deit"), [], **{**kw, "target": 0.4}, checkpoint=ck)
    model2, plan2, hist2 = run(3, checkpoint=ck)  # other weights: all of it comes from the checkpoint
    assert_same(plan2.keep, plan.keep)
    assert_same(hist2["loss"], hist["loss"])
    assert_same(hist2["updates"], hist["updates"])
    x = make_input(model, 3)
    with torch.no_grad():
        assert torch.equal(model2(x), model(x))
