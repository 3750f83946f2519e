"""UP-ViTs scores: the fast engine equals the literal reference scorer (float64), resume, planner, depth."""
import copy

import pytest
import timm
import torch
from devices import TRITON_DEVICE
from models import randomize_

import vitprune_fast as vpf
from vitprune_fast.arch import adapter_for
from vitprune_fast.depth import lowest_units, prune_depth_, remove_units_
from vitprune_fast.overrides import replaced_output
from vitprune_fast.score import upvits as up

SMALL = {  # tiny configs: the reference loop runs one full forward per candidate
    "deit": ("deit_tiny_patch16_224", dict(img_size=16, patch_size=8, depth=2, embed_dim=12, num_heads=2,
                                           mlp_ratio=2, num_classes=5)),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=16, patch_size=8, depth=2, embed_dim=12,
                                                               num_heads=3, mlp_ratio=2, num_classes=5)),
    "vit_layerscale_avg": ("vit_small_patch16_224", dict(img_size=16, patch_size=8, depth=2, embed_dim=8, num_heads=2,
                                                         mlp_ratio=2, num_classes=4, init_values=0.1,
                                                         class_token=False, global_pool="avg")),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=16, patch_size=2, window_size=2, embed_dim=6,
                                                  depths=(2, 2), num_heads=(2, 3), mlp_ratio=2, num_classes=5)),
}
ALL = ("residual", "attn", "mlp", "blocks")


def _trunk(model):
    return adapter_for(model).trunk()


def small(key, seed=0):
    name, kw = SMALL[key]
    torch.manual_seed(seed)
    return randomize_(timm.create_model(name, **kw).double(), seed).eval()


def images(n=5, seed=3):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture(scope="module", params=list(SMALL))
def both_engines(request):
    model, x = small(request.param), images()
    fast = vpf.upvits_scores(model, x, ALL, engine="fast", batch_size=3, max_rows=7, progress=False)
    ref = vpf.upvits_scores(model, x, ALL, engine="reference", batch_size=5, progress=False)
    return model, fast, ref


def test_fast_equals_reference(both_engines):
    model, fast, ref = both_engines
    space = vpf.describe(model)
    assert set(fast) == set(ref) == set(space.groups) | {f"units.{k}" for k in up.UNIT_KINDS}
    for name in ref:
        assert fast[name].dtype == torch.float64
        assert (ref[name] >= -1e-12).all(), name  # a KL divergence
        rel = ((fast[name] - ref[name]).abs().max() / ref[name].abs().max()).item()
        assert rel < 1e-6, (name, rel)


def test_identical_selections(both_engines):
    model, fast, ref = both_engines
    space = vpf.describe(model)
    for kw in [dict(keep=0.5), dict(keep=0.5, attn_mode="heads"), dict(keep={"mlp": 0.25, "residual": 0.75})]:
        a, b = vpf.make_plan(space, fast, **kw), vpf.make_plan(space, ref, **kw)
        assert a.keep.keys() == b.keep.keys()
        for k in a.keep:
            assert torch.equal(a.keep[k], b.keep[k]), k
    assert lowest_units(fast, 1) == lowest_units(ref, 1)
    for kind in up.UNIT_KINDS:
        assert torch.equal(fast[f"units.{kind}"].argsort(), ref[f"units.{kind}"].argsort())


def test_dead_channel_scores_zero():
    """A hidden unit whose fc2 column is zero changes nothing: its KL is exactly 0 (and others are not)."""
    model = small("deit")
    with torch.no_grad():
        model.blocks[1].mlp.fc2.weight[:, 3] = 0
    s = vpf.upvits_scores(model, images(), ("mlp",), progress=False)["blocks.1.mlp"]
    assert s[3] == 0 and (s[torch.arange(len(s)) != 3] > 0).all()


def test_loader_input_and_model_untouched():
    model = small("swin")
    x = images(6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = [(x[:4], torch.zeros(4)), (x[4:], torch.zeros(2))]
    a = vpf.upvits_scores(model.train(), loader, ("attn", "residual"), progress=False)
    b = vpf.upvits_scores(model, x, ("attn", "residual"), batch_size=4, progress=False)
    assert model.training  # mode restored
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-12), k
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


class _Interrupt(Exception):
    pass


def test_resume_continues_and_recomputes_nothing(tmp_path, monkeypatch):
    model, x = small("deit"), images(6)
    full = vpf.upvits_scores(model, x, ALL, batch_size=2, progress=False)
    calls, armed = [], [True]
    original = up.FastEngine.score

    def flaky(self, work, chunk, key, progress):
        calls.append((key, work.name))
        if armed[0] and len(calls) == 5:
            armed[0] = False
            raise _Interrupt
        return original(self, work, chunk, key, progress)

    monkeypatch.setattr(up.FastEngine, "score", flaky)
    with pytest.raises(_Interrupt):
        vpf.upvits_scores(model, x, ALL, batch_size=2, checkpoint=tmp_path, progress=False)
    saved = {p.stem for p in tmp_path.glob("*.safetensors")}
    assert len(saved) == 4
    calls.clear()
    resumed = vpf.upvits_scores(model, x, ALL, batch_size=2, checkpoint=tmp_path, progress=False)
    recomputed = {f"{k:05d}.{n}" for k, n in calls}
    assert not recomputed & saved
    assert len(recomputed) == 3 * len(resumed) - len(saved)  # 3 chunks x every group, minus the saved
    for k in full:
        assert torch.equal(resumed[k], full[k]), k
    calls.clear()
    again = vpf.upvits_scores(model, x, ALL, batch_size=2, checkpoint=tmp_path, progress=False)
    assert calls == [] and all(torch.equal(again[k], full[k]) for k in full)


def test_resume_refuses_another_job(tmp_path):
    model, x = small("deit"), images(4)
    vpf.upvits_scores(model, x, ("mlp",), checkpoint=tmp_path, progress=False)
    with pytest.raises(vpf.VitPruneError, match="different job"):
        vpf.upvits_scores(model, images(4, seed=9), ("mlp",), checkpoint=tmp_path, progress=False)
    other = small("deit", seed=1)
    with pytest.raises(vpf.VitPruneError, match="different job"):
        vpf.upvits_scores(other, x, ("mlp",), checkpoint=tmp_path, progress=False)


def test_store_writers_racing_on_one_file_both_finish(tmp_path, monkeypatch):
    """Ranks sharing a checkpoint write job.json (and a unit) at the same moment: neither loses its temporary."""
    import threading

    from safetensors.torch import save_file

    from vitprune_fast.score import store

    both_written = threading.Barrier(2)

    def slow_save(tensors, path):  # both writers hold a finished temporary before either renames
        save_file(tensors, path)
        both_written.wait(timeout=30)

    monkeypatch.setattr("safetensors.torch.save_file", slow_save)
    errors = []

    def rank(i):
        try:
            s = store.ScoreStore(tmp_path, "job", {"rank": 0})
            s.save("00000.mlp", torch.arange(3.0))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.mlp.safetensors", "job.json"]
    assert torch.equal(store.ScoreStore(tmp_path, "job", {}).load("00000.mlp"), torch.arange(3.0))


def test_bad_arguments():
    model = small("deit")
    with pytest.raises(vpf.VitPruneError, match="components"):
        vpf.upvits_scores(model, images(), ("ffn",), progress=False)
    with pytest.raises(vpf.VitPruneError, match="engine"):
        vpf.upvits_scores(model, images(), engine="slow", progress=False)
    with pytest.raises(vpf.VitPruneError, match="images"):
        vpf.upvits_scores(model, torch.randn(3, 16, 16), progress=False)
    with pytest.raises(vpf.UnsupportedModelError):
        vpf.upvits_scores(torch.nn.Linear(2, 2), images(), progress=False)


def test_published_style_teacher_recompute_matches_cached():
    model, x = small("deit"), images(3)
    a = vpf.upvits_scores(model, x, ("attn",), engine="reference", teacher="recompute", progress=False)
    b = vpf.upvits_scores(model, x, ("attn",), engine="reference", progress=False)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_uniform_width_plan_from_scores_prunes_to_smaller_model():
    model, x = small("deit_distilled"), images()
    scores = vpf.upvits_scores(model, x, ("residual", "attn", "mlp"), progress=False)
    space = vpf.describe(model)
    plan = vpf.make_plan(space, scores, keep={"residual": 0.5, "attn": 1 / 3, "mlp": 0.5}, heads=1)
    vpf.prune_(model, plan)
    sizes = {g.kind: g.size for g in vpf.describe(model).groups.values()}
    assert sizes == {"residual": 6, "attn": 4, "mlp": 12}
    assert all(b.attn.num_heads == 1 for b in model.blocks)
    model(x)


@pytest.mark.parametrize("key", ["deit", "swin"])
@pytest.mark.parametrize("kind", ["block", "hybrid"])
def test_depth_removal_equals_skipping_the_unit(key, kind):
    model, x = small(key), images()
    trunk = _trunk(model)
    refs = adapter_for(model).blocks()
    with torch.no_grad(), replaced_output([(m, up._zero) for m in up._unit_branches(model, refs, kind, 0)]):
        want = model(x)
    pruned = remove_units_(copy.deepcopy(model), [(kind, 0)])
    assert len(_trunk(pruned).blocks) == len(trunk.blocks) - 1
    assert torch.allclose(pruned(x), want, rtol=1e-12, atol=1e-12)


def test_progressive_depth_pruning_rescores():
    model, x = small("deit"), images()
    model2 = copy.deepcopy(model)
    with pytest.raises(vpf.PlanError):
        remove_units_(copy.deepcopy(model), [("block", 0), ("block", 1)])  # would leave no block
    removed = prune_depth_(model, x, 1, progress=False)
    assert len(removed) == 1 and len(model.blocks) == 1
    first = lowest_units(vpf.upvits_scores(model2, x, ("blocks",), progress=False), 1)
    assert removed == first


def test_depth_errors():
    model = small("swin")
    with pytest.raises(vpf.PlanError, match="crosses"):
        remove_units_(model, [("hybrid", 1)])
    with pytest.raises(vpf.PlanError, match="non-stock"):
        lowest_units({"units.attn": torch.rand(4)}, 1, kinds=("attn",))


@pytest.mark.parametrize("key", ["deit", "vit_layerscale_avg", "swin"])
@pytest.mark.usefixtures("no_tf32")
def test_fast_engine_with_triton_kernels_equals_reference(key):
    """The CUDA code path (fused KL, masked LayerNorm, expansion + LayerNorm): the Triton interpreter on CPU."""
    model, x = small(key).to(TRITON_DEVICE), images().to(TRITON_DEVICE)
    ref = vpf.upvits_scores(model, x, ("residual", "attn", "mlp"), engine="reference", batch_size=5, progress=False)
    fast = vpf.upvits_scores(model, x, ("residual", "attn", "mlp"), batch_size=5, max_rows=50, use_kernels=True,
                             progress=False)
    for name in ref:
        rel = ((fast[name] - ref[name]).abs().max() / ref[name].abs().max()).item()
        assert rel < 1e-6, (name, rel)


@pytest.mark.gpu
@pytest.mark.parametrize("key", ["deit", "swin"])
@pytest.mark.usefixtures("no_tf32")
def test_cuda_engine_matches_float64_reference(key):
    model, x = small(key), images()
    ref = vpf.upvits_scores(model, x, ("residual", "attn", "mlp"), engine="reference", progress=False)
    cuda = model.float().cuda()
    fast = vpf.upvits_scores(cuda, x.float().cuda(), ("residual", "attn", "mlp"), progress=False)
    for name in ref:
        assert torch.allclose(fast[name].double(), ref[name], rtol=1e-3, atol=1e-5), name
