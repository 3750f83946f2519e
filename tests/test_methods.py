"""The method interface: every built-in method behind one call, the registry, and a user's method as a peer of them
in the CLI, the demo and the fidelity study (with no other file changed)."""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import vitprune_fast as vpf
from tests.models import make_input, make_model
from vitprune_fast import cli
from vitprune_fast.methods import Method, MethodData, MethodResult, get_method, method_names, unregister_method
from vitprune_fast.plan import PlanSpec, selections
from vitprune_fast.targets import resolve_spec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import fidelity  # noqa: E402

TINY = json.dumps({"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8})
MODEL = "deit_tiny_patch16_224"

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class LowestIndexMethod(Method):
    """A test-local method with its own plan rule: every ranking keeps its lowest-numbered items (no scores)."""

    name = "lowest_index_test"
    summary = "keeps the lowest-numbered channels of every ranking (a test method)"
    draws = False

    def plan(self, model, data, spec):
        spec, notes = resolve_spec(model, spec)
        space = vpf.describe(model)
        keep, heads = {}, {}
        for sel in selections(space, spec):
            keep.setdefault(sel.group, []).append(sel.items[: sel.keep].flatten())
            if sel.heads is not None:
                heads[sel.group] = sel.heads
        keep = {g: torch.cat(parts).sort().values for g, parts in keep.items()}
        plan = vpf.Plan.from_space(space, keep, heads)
        return MethodResult(plan, report={"lowest_index": {"groups": len(keep)}}, notes=[*notes, "lowest-index rule"])


@pytest.fixture
def user_method():
    vpf.register_method(LowestIndexMethod())
    yield LowestIndexMethod.name
    unregister_method(LowestIndexMethod.name)


def _lowest(plan, space):
    """Whether every narrowed group of ``plan`` keeps a prefix of each of its rankings (the test method's rule)."""
    for sel in selections(space, PlanSpec(keep={k: len(v) / space.groups[k].size for k, v in plan.keep.items()})):
        if not torch.isin(sel.items[: sel.keep], plan.keep[sel.group]).all():
            return False
    return True


def test_a_user_method_runs_through_the_cli(user_method, tmp_path, capsys):
    assert user_method in method_names()
    out = tmp_path / "p"
    assert cli.main(["prune", "--model", MODEL, "--model-args", TINY, "--data", "digits", "--method", user_method,
                     "--flops", "0.5", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "note: lowest-index rule" in printed and "reaches" in printed
    plan = vpf.Plan.from_dict(json.loads((out / "plan.json").read_text()))
    teacher = cli.load_model(MODEL, json.loads(TINY), defaults={"num_classes": 10, "img_size": 32})
    assert plan.keep and _lowest(plan, vpf.describe(teacher))
    assert json.loads((out / "lowest_index.json").read_text()) == {"groups": len(plan.keep)}
    assert vpf.load_pruned(out).embed_dim == len(plan.keep["residual"])


def test_a_user_method_runs_in_the_demo(user_method, tmp_path, monkeypatch):
    from vitprune_fast.demo import run_demo

    monkeypatch.setenv("VITPRUNE_FAST_CACHE", str(tmp_path / "cache"))
    rec = run_demo(out=tmp_path / "out", fast=True, methods=(user_method,), jobs=1, progress=False)
    for res in rec["results"].values():
        assert [r["method"] for r in res["rows"]] == ["unpruned", user_method]
        row = res["rows"][1]
        assert 0.45 <= row["flops_frac"] <= 0.55 and row["lowest_index"]["groups"] > 0


def test_a_user_method_runs_in_the_fidelity_study(user_method):
    study = dataclasses.replace(fidelity.TINY, models=("deit",), methods=("magnitude", user_method))
    runs = fidelity.run(study, None, jobs=1)
    mine = [r for r in runs if r["method"] == user_method]
    assert len(mine) == len(study.targets)  # deterministic: once per seed, not per draw
    assert all(abs(r["flops_frac"] - r["target"]) < 0.05 and r["acc_pruned"] is not None for r in mine)
    assert any(s["method"] == user_method for s in fidelity.summarize(runs))


def test_registry_refuses_bad_registrations():
    with pytest.raises(vpf.ConfigError, match="already registered"):
        vpf.register_method(get_method("magnitude"))
    with pytest.raises(vpf.ConfigError, match="expected a vitprune_fast.methods.Method"):
        vpf.register_method("magnitude")

    @dataclass(frozen=True)
    class Nameless(Method):
        name = ""

    with pytest.raises(vpf.ConfigError, match="needs a name"):
        vpf.register_method(Nameless())
    with pytest.raises(vpf.ConfigError, match="unknown method 'nope'"):
        get_method("nope")


def test_options_are_the_methods_own():
    up = get_method("upvits", engine="screened", steps=3)
    assert (up.engine, up.steps) == ("screened", 3) and get_method("upvits").engine == "exact"  # registry unchanged
    with pytest.raises(vpf.ConfigError, match="method 'magnitude' has no option 'engine'"):
        get_method("magnitude", engine="screened")
    with pytest.raises(vpf.ConfigError, match="engine must be one of"):
        get_method("upvits", engine="loop")


def test_built_in_methods_declare_needs_and_comparability():
    decl = {n: (set(get_method(n).needs), get_method(n).comparable) for n in method_names()}
    assert decl["upvits"] == ({"images"}, "global")  # the KL of the output: one unit across groups
    # baselines: a group's scale says nothing of its importance, so each group is divided by its mean
    assert decl["taylor"] == ({"labels"}, "mean") and decl["magnitude"] == decl["random"] == (set(), "mean")
    assert decl["dap"] == ({"labels", "training"}, None) and decl["dimap"] == (set(), None)  # refused


def test_each_method_plans_through_the_interface():
    """Every built-in method: the Plan of ``plan()`` is what its own API gives for the same spec."""
    model = make_model("deit")
    x = make_input(model, 4)
    space = vpf.describe(model)
    spec = PlanSpec(keep={"residual": 0.75, "attn": 0.5, "mlp": 0.5})
    loader = [(x, torch.arange(4) % 10)]
    data = MethodData(loader=loader, images=x, chunk=4, batches=1, progress=False)
    want = {
        "upvits": vpf.make_plan(space, vpf.upvits_scores(model, x, batch_size=4, progress=False), spec.keep),
        "magnitude": vpf.make_plan(space, vpf.score.magnitude_scores(model), spec.keep),
        "random": vpf.make_plan(space, vpf.score.random_scores(model, torch.Generator().manual_seed(0)), spec.keep),
        "taylor": vpf.make_plan(space, vpf.score.taylor_scores(model, loader, num_batches=1, progress=False),
                                spec.keep),
    }
    for name, ref in want.items():
        got = get_method(name).plan(model, data, spec).plan
        assert got.keep.keys() == ref.keep.keys() and all(torch.equal(got.keep[k], ref.keep[k]) for k in ref.keep), name
    screened = get_method("upvits", engine="screened").plan(model, data, spec)
    assert "screened" in screened.report and screened.scores is None
    assert all(torch.equal(screened.plan.keep[k], want["upvits"].keep[k]) for k in want["upvits"].keep)
    dimap = get_method("dimap").plan(model, data, PlanSpec(flops=0.6)).plan
    ref = vpf.dimap_structured_plan(model, flops=0.6)
    assert all(torch.equal(dimap.keep[k], ref.keep[k]) for k in ref.keep) and dimap.keep.keys() == ref.keep.keys()


def test_dap_plans_while_training_and_returns_its_model():
    model = make_model("deit", torch.float32)
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(3)]
    data = MethodData(loader=loader, progress=False, steps=3, teacher=model)
    result = get_method("dap").plan(model, data, PlanSpec(params=0.7))
    assert result.model is not None and result.model is not model  # a trained copy; the user's model is untouched
    assert sum(p.numel() for p in result.model.parameters()) < sum(p.numel() for p in model.parameters())
    assert result.report["dap"]["params_after"] == sum(p.numel() for p in result.model.parameters())
    with pytest.raises(vpf.PlanError, match="parameter budget"):
        get_method("dap").plan(model, data, PlanSpec(flops=0.5))


def test_a_method_without_its_data_is_refused():
    model = make_model("deit")
    for name in ("upvits", "taylor"):
        with pytest.raises(vpf.ConfigError, match=f"method '{name}' needs data"):
            get_method(name).plan(model, MethodData(), PlanSpec(keep=0.5))


def test_plan_spec_rules():
    assert PlanSpec().keep == 1.0 and PlanSpec(flops=0.5).budget == "flops"
    with pytest.raises(vpf.PlanError, match="give one of keep, flops, params, latency or target, not keep and flops"):
        PlanSpec(keep=0.5, flops=0.5)
    for bad in (0, 1.5, float("nan"), True, "half"):
        with pytest.raises(vpf.PlanError, match="budget must be a fraction"):
            PlanSpec(params=bad)
    with pytest.raises(vpf.PlanError, match="a target shape sets the widths"):
        PlanSpec(target="deit_tiny_patch16_224", round_to=8)
    with pytest.raises(vpf.PlanError, match="latency budget needs a global allocation"):
        resolve_spec(make_model("deit"), PlanSpec(latency=0.5))
    keep = {"attn": 0.5}
    spec = PlanSpec(keep=keep)
    keep["attn"] = 0.1  # the spec holds its own copy
    assert spec.keep == {"attn": 0.5}
    assert PlanSpec(**spec.to_dict()) == spec


def test_params_budget_is_met_like_a_flops_budget():
    model = make_model("deit")
    spec, notes = resolve_spec(model, PlanSpec(params=0.6))
    r = spec.keep["mlp"]
    assert spec.keep == {"residual": r, "attn": r, "mlp": r} and "% params" in notes[0]
    plan = vpf.make_plan(vpf.describe(model), vpf.score.magnitude_scores(model), spec.keep)
    frac = vpf.metrics.plan_params(model, plan) / vpf.metrics.count_params(model)
    assert frac == pytest.approx(float(notes[0].split("reaches ")[1].split(" %")[0]) / 100, abs=5e-4)
    assert abs(frac - 0.6) < 0.05
