"""Global allocation of widths (vitprune_fast.allocate) against enumeration of every feasible allocation, and the cost
model it runs on (vitprune_fast.cost) against FlopCounterMode and the pruned model's parameter count."""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json

import pytest
import torch
from models import make_input, rel_err

import vitprune_fast as vpf
from vitprune_fast.allocate import _ladders, _residuals, allocate, removed_score
from vitprune_fast.cost import CostModel, exact_cost
from vitprune_fast.masked import masked_copy
from vitprune_fast.testing import CATALOGUE, Representative

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {  # spaces small enough to enumerate every allocation
    "vit": Representative("t_vit", "vit", "deit_tiny_patch16_224",
                          dict(img_size=16, patch_size=8, depth=2, embed_dim=8, num_heads=2, mlp_ratio=1.0,
                               num_classes=5)),
    # one block for the merge rule (heads=1): its enumeration over two blocks took 100 s of CI
    "vit1": Representative("t_vit1", "vit", "deit_tiny_patch16_224",
                           dict(img_size=16, patch_size=8, depth=1, embed_dim=8, num_heads=2, mlp_ratio=1.0,
                                num_classes=5)),
    "swin": Representative("t_swin", "swin", "swin_tiny_patch4_window7_224",
                           dict(img_size=16, patch_size=4, window_size=2, embed_dim=4, depths=(1, 1), num_heads=(1, 2),
                                mlp_ratio=1.0, num_classes=5)),
    "siglip": Representative("t_siglip", "vit", "vit_base_patch16_siglip_224",  # attention pool tied to the residual
                             dict(img_size=16, patch_size=8, depth=1, embed_dim=8, num_heads=2, mlp_ratio=1.0,
                                  num_classes=5)),
    "eva_rope": Representative("t_eva", "eva", "eva02_small_patch14_224.mim_in22k",  # rope: multiple_of, tied, heads
                               dict(img_size=16, patch_size=8, depth=2, embed_dim=8, num_heads=2, mlp_ratio=1.0,
                                    num_classes=5)),
}
CASES = [  # (model, rules)
    ("vit", {}), ("vit", {"attn_mode": "heads"}), ("vit1", {"heads": 1}), ("vit", {"round_to": 2}),
    ("swin", {}), ("swin", {"attn_mode": "heads"}),
    ("siglip", {}), ("eva_rope", {"attn_mode": "heads"}),
]


def _scores(space, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(gr.size, generator=g, dtype=torch.float64) for n, gr in space.groups.items()}


def _every_allocation(model, space, scores, rules, cm):
    """(plan, residual widths, cost, removed score) of every allocation the rules allow."""
    spec = vpf.PlanSpec(**rules)
    lad = _ladders(space, scores, spec)
    res = _residuals(space, scores, spec)
    names = list(lad)
    for ri in itertools.product(*(range(len(r.kept)) for r in res)):
        for opts in itertools.product(*(range(len(lad[n].kept)) for n in names)):
            keep = {r.group: r.kept[i] / space.groups[r.group].size for r, i in zip(res, ri, strict=True)}
            for n, o in zip(names, opts, strict=True):
                if o or lad[n].heads[0] != space.groups[n].num_heads:
                    keep[n] = lad[n].ratio[o]
            plan = vpf.make_plan(space, scores, keep=keep, **{k: v for k, v in rules.items() if k != "round_to"})
            widths = tuple(r.kept[i] for r, i in zip(res, ri, strict=True))
            yield plan, widths, cm.plan_cost(plan), removed_score(space, scores, plan)


@pytest.mark.parametrize("measure", ["flops", "params"])
@pytest.mark.parametrize("key,rules", CASES, ids=[f"{k}-{'-'.join(f'{a}{b}' for a, b in r.items()) or 'dims'}"
                                                  for k, r in CASES])
def test_allocation_is_the_enumerated_optimum_within_its_bound(key, rules, measure):
    model = TINY[key].build()
    space = vpf.describe(model)
    scores = _scores(space)
    cm = CostModel(model, measure)
    every = list(_every_allocation(model, space, scores, rules, cm))
    assert len(every) > 20  # the enumeration is not trivial
    lowest = min(c for _, _, c, _ in every) / cm.dense
    for frac in (lowest + (1 - lowest) * t for t in (0.1, 0.45, 0.8)):  # budgets the rules can reach
        spec = vpf.PlanSpec(**{measure: frac}, allocation="global", **rules)
        plan, rep = allocate(model, scores, spec, cost_model=cm)
        budget = frac * cm.dense
        feasible = [e for e in every if e[2] <= budget]
        best = min(s for _, _, _, s in feasible)
        got = removed_score(space, scores, plan)
        assert got == pytest.approx(rep["removed_score"], abs=1e-9)
        assert rep["achieved"] == cm.plan_cost(plan) == exact_cost(model, plan, measure) <= budget  # exact cost
        assert budget - rep["achieved"] < rep["last_step_cost"] + 1e-9 or rep["achieved"] == max(
            e[2] for e in feasible)  # short of the budget by less than its last step
        assert best - 1e-12 <= got <= best + rep["gap_bound"] + 1e-12, (frac, got, best, rep["gap_bound"])
        widths = tuple(rep["residual_widths"].values())  # optimal at its own cost, for its residual widths
        assert got <= min(s for _, w, c, s in every if w == widths and c <= rep["achieved"]) + 1e-12
        vpf.prune_(copy.deepcopy(model), plan)  # the plan keeps every rule prune_ checks


@pytest.mark.parametrize("key,min_keep", [("vit", 0.5), ("swin", {"residual": 0.5, "mlp": 0.75})])
def test_min_keep_is_the_enumerated_optimum_over_the_allocations_it_allows(key, min_keep):
    """``min_keep`` removes the allocations that keep less of some group than it says, and no other."""
    model = TINY[key].build()
    space = vpf.describe(model)
    scores = _scores(space, seed=1)
    cm = CostModel(model, "flops")

    def floor(g):
        m = min_keep if isinstance(min_keep, float) else min_keep.get(g.kind, 0.0)
        return m * g.size

    every = [e for e in _every_allocation(model, space, scores, {}, cm)
             if all(k >= floor(space.groups[n]) for n, k in e[0].kept_sizes(space).items())]
    lowest = min(c for _, _, c, _ in every) / cm.dense
    for frac in (lowest + (1 - lowest) * t for t in (0.1, 0.5)):
        plan, rep = allocate(model, scores, vpf.PlanSpec(flops=frac, allocation="global", min_keep=min_keep),
                             cost_model=cm)
        feasible = [s for _, _, c, s in every if c <= frac * cm.dense]
        got = removed_score(space, scores, plan)
        assert min(feasible) - 1e-12 <= got <= min(feasible) + rep["gap_bound"] + 1e-12
        for n, k in plan.kept_sizes(space).items():
            assert k >= floor(space.groups[n]), (n, k)
    unbounded, _ = allocate(model, scores, vpf.PlanSpec(flops=lowest, allocation="global"), cost_model=cm)
    assert any(k < floor(space.groups[n]) for n, k in unbounded.kept_sizes(space).items())  # the floor binds


@pytest.mark.parametrize("key,rules", CASES[:6], ids=[f"{k}-{r}" for k, r in CASES[:6]])
def test_the_options_are_what_make_plan_can_keep(key, rules):
    """Every count make_plan gives for some keep ratio is one of the allocator's options (nothing is left out)."""
    model = TINY[key].build()
    space = vpf.describe(model)
    scores = _scores(space)
    spec = vpf.PlanSpec(**rules)
    options = {n: set(lad.kept) for n, lad in _ladders(space, scores, spec).items()}
    options |= {r.group: set(r.kept) for r in _residuals(space, scores, spec)}
    for r in torch.linspace(0.01, 1.0, 60).tolist():
        for kind in ("residual", "attn", "mlp"):
            kept = vpf.make_plan(space, scores, keep={kind: r}, **rules).kept_sizes(space)
            for n, k in kept.items():
                if n in options:
                    assert k in options[n], (n, r, k, sorted(options[n]))


def test_allocation_gives_blocks_different_widths():
    """Scores that make one block's MLP cheap to remove and another's costly: the allocation tells them apart."""
    model = CATALOGUE["deit"].build()
    space = vpf.describe(model)
    scores = _scores(space)
    scores["blocks.0.mlp"] = scores["blocks.0.mlp"] * 1e-3
    scores["blocks.2.mlp"] = scores["blocks.2.mlp"] * 1e3
    plan, rep = allocate(model, scores, vpf.PlanSpec(flops=0.6, allocation="global"))
    kept = plan.kept_sizes(space)
    assert kept["blocks.0.mlp"] < kept["blocks.1.mlp"] < kept["blocks.2.mlp"]
    assert rep["achieved_frac"] <= 0.6


@pytest.mark.parametrize("key", list(CATALOGUE))
def test_cost_model_equals_flop_counter_and_parameter_count(key):
    """Exact for every family and for non-uniform plans (random per-group ratios, head merges, whole heads)."""
    model = CATALOGUE[key].build()
    space = vpf.describe(model)
    whole = any(g.whole_heads and g.tied_to is None for g in space.of_kind("attn"))
    scores = _scores(space, 1)
    g = torch.Generator().manual_seed(2)
    models = {m: CostModel(model, m) for m in ("flops", "params")}
    plans = []
    for mode in ["heads"] if whole else ["dims", "heads"]:
        keep = {n: float(torch.rand(1, generator=g)) * 0.8 + 0.15 for n in space.groups}
        plans.append(vpf.make_plan(space, scores, keep=keep, attn_mode=mode))
    for measure, cm in models.items():
        assert cm.dense == exact_cost(model, vpf.Plan.from_space(space, {}), measure)
        for plan in plans:
            assert cm.plan_cost(plan) == exact_cost(model, plan, measure), (measure, plan)


def test_non_uniform_global_plans_save_load_and_remove_exactly(tmp_path):
    for key in ("deit", "swin", "eva02"):
        model = CATALOGUE[key].build()
        space = vpf.describe(model)
        mode = "heads" if any(g.whole_heads for g in space.of_kind("attn")) else "dims"
        scores = _scores(space, 3)
        first = next(n for n in scores if space.groups[n].kind == "mlp")
        scores[first] = scores[first] * 1e-3  # that MLP is cheap to cut: the widths differ
        plan, _ = allocate(model, scores, vpf.PlanSpec(flops=0.5, allocation="global", attn_mode=mode))
        sizes = {n: s for n, s in plan.kept_sizes(space).items() if space.groups[n].kind == "mlp"}
        assert len(set(sizes.values())) > 1, key  # non-uniform
        x = make_input(model, 2)
        pruned = vpf.prune_(copy.deepcopy(model), plan)
        with torch.no_grad():
            assert rel_err(pruned(x), masked_copy(model, plan)(x)) < 1e-9
            back = vpf.load_pruned(vpf.save_pruned(pruned, tmp_path / key))
            assert torch.equal(back(x), pruned(x))
        if key == "deit":  # ONNX parity of a model whose blocks differ in width
            import onnxruntime as ort

            small = pruned.float()
            xf = x.float()
            torch.onnx.export(small, (xf,), str(tmp_path / "m.onnx"), input_names=["x"], dynamo=True)
            got = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(
                None, {"x": xf.numpy()})[0]
            assert rel_err(torch.from_numpy(got), small(xf).detach()) < 1e-4


def test_bad_budgets_are_refused_before_anything_runs():
    model = CATALOGUE["deit"].build()
    scores = _scores(vpf.describe(model))
    with pytest.raises(vpf.PlanError, match="unreachable"):
        allocate(model, scores, vpf.PlanSpec(flops=0.001, allocation="global"))
    with pytest.raises(vpf.PlanError, match="a global allocation needs a flops, params or latency budget"):
        allocate(model, scores, vpf.PlanSpec(keep=0.5, allocation="global"))
    with pytest.raises(vpf.PlanError, match="LatencyModel"):
        allocate(model, scores, vpf.PlanSpec(latency=0.5, allocation="global"))
    with pytest.raises(vpf.PlanError, match="no scores for group"):
        allocate(model, {}, vpf.PlanSpec(flops=0.5, allocation="global"))
    for bad in (-0.1, 1.5, float("nan"), True, {"mlp": 2.0}):
        with pytest.raises(vpf.PlanError, match="min_keep must be a fraction"):
            vpf.PlanSpec(flops=0.5, allocation="global", min_keep=bad)
    with pytest.raises(vpf.PlanError, match="min_keep bounds a global allocation"):
        vpf.PlanSpec(flops=0.5, min_keep=0.2)
    with pytest.raises(vpf.PlanError, match="unreachable"):
        allocate(model, scores, vpf.PlanSpec(flops=0.5, allocation="global", min_keep=1.0))


# ------------------------------------------------------------------------------------------- through the engines
@pytest.mark.parametrize("key", ["deit", "swin"])
def test_screened_global_allocation_is_the_exact_engines(key):
    """The screened engine's global allocation equals the one made from every candidate's exact score (float64, up
    to items tied at a cut)."""
    from vitprune_fast.score.screened import selection_differences

    model = CATALOGUE[key].build()
    x = make_input(model, 4)
    space = vpf.describe(model)
    exact = vpf.upvits_scores(model, x, progress=False)
    spec = vpf.PlanSpec(flops=0.5, allocation="global")
    ref, _ = allocate(model, exact, spec)
    plan, report = vpf.upvits_select(model, x, spec, progress=False)
    assert plan.kept_sizes(space) == ref.kept_sizes(space) and plan.heads == ref.heads
    assert not selection_differences(space, exact, plan, ref, vpf.PlanSpec(**report["plan"]))
    assert report["allocation"]["achieved_frac"] <= 0.5 and report["scored_exactly"] < report["candidates"]


def test_progressive_global_allocation_spends_the_budget_in_steps():
    model = CATALOGUE["deit"].build()
    x = make_input(model, 4)
    spec = vpf.PlanSpec(flops=0.5, allocation="global")
    plan, report = vpf.upvits_progressive(model, x, spec, steps=2, engine="exact", progress=False)
    dense = CostModel(model, "flops").dense
    assert exact_cost(model, plan, "flops") <= 0.5 * dense
    assert [round(s["budget_of_dense"], 6) for s in report["per_step"]] == [0.75, 0.5]
    one = vpf.upvits_scores(model, x, progress=False)  # step 1 is the one-shot allocation of its share
    first, _ = allocate(model, one, vpf.PlanSpec(flops=0.75, allocation="global"))
    assert vpf.Plan.from_dict(report["per_step"][0]["plan"]).kept_sizes(vpf.describe(model)) == \
        first.kept_sizes(vpf.describe(model))
    screened, _ = vpf.upvits_progressive(model, x, spec, steps=2, engine="screened", progress=False)
    assert screened.kept_sizes(vpf.describe(model)) == plan.kept_sizes(vpf.describe(model))
    space = vpf.describe(model)  # a floor holds for the unpruned model's groups over all steps
    assert min(k / space.groups[n].size for n, k in plan.kept_sizes(space).items()) < 0.6
    floored, _ = vpf.upvits_progressive(model, x, dataclasses.replace(spec, min_keep=0.6), steps=2, engine="exact",
                                        progress=False)
    assert all(k >= 0.6 * space.groups[n].size for n, k in floored.kept_sizes(space).items())
    assert exact_cost(model, floored, "flops") <= 0.5 * dense


def test_methods_allocate_globally_as_their_registry_entry_says():
    from vitprune_fast.methods import MethodData, get_method

    model = CATALOGUE["deit"].build()
    x = make_input(model, 4)
    space = vpf.describe(model)
    spec = vpf.PlanSpec(flops=0.5, allocation="global")
    data = MethodData(images=x, chunk=4, progress=False)
    up = get_method("upvits").plan(model, data, spec)  # KL: comparable as it is
    assert up.plan.kept_sizes(space) == allocate(model, vpf.upvits_scores(model, x, batch_size=4,
                                                                          progress=False), spec)[0].kept_sizes(space)
    mag = get_method("magnitude").plan(model, data, spec)  # a weight norm: divided by its group's mean
    raw = vpf.score.magnitude_scores(model)
    normalised = {n: s / s.mean() for n, s in raw.items()}
    assert mag.plan.kept_sizes(space) == allocate(model, normalised, spec)[0].kept_sizes(space)
    assert "allocation" in mag.report and mag.notes[0].startswith("global allocation:")
    with pytest.raises(vpf.PlanError, match="cannot allocate widths globally"):
        get_method("dimap").plan(model, data, spec)


# ------------------------------------------------------------------------------------------------------ latency
def test_latency_model_is_built_cached_reused_and_refused_elsewhere(tmp_path, monkeypatch):
    from vitprune_fast import latency

    model = TINY["vit"].build(torch.float32)
    lm = latency.LatencyModel.build(model, batch=2, cache_dir=tmp_path, repeats=2)
    files = list(tmp_path.glob("latency-*.json"))
    assert len(files) == 1 and lm.dense == pytest.approx(lm.predict({})) == pytest.approx(lm.measured_dense)
    assert set(lm.table["tables"]["stages"]["0"]) == {str(c) for c in (8, 6, 4, 2)}  # the residual grid
    calls = []
    monkeypatch.setattr(latency, "_measure", lambda *a, **k: calls.append(a) or {})
    again = latency.LatencyModel.build(model, batch=2, cache_dir=tmp_path)  # the cache, not a new measurement
    assert not calls and again.table == lm.table
    with pytest.raises(vpf.CheckpointError, match="another batch"):
        latency.LatencyModel.load(model, files[0], batch=3)
    table = {**lm.table, "device": "another GPU"}
    other = tmp_path / "other.json"
    other.write_text(json.dumps(table))
    with pytest.raises(vpf.CheckpointError, match="another device"):
        latency.LatencyModel.load(model, other, batch=2)


def test_latency_model_prices_every_block_from_its_own_time():
    """Swin's shifted-window blocks take longer than the unshifted first block of their stage, whose table prices
    the stage: each block is scaled by its measured time, so the unpruned prediction is the measured latency."""
    from vitprune_fast import latency

    lm = latency.LatencyModel.build(TINY["swin"].build(torch.float32), batch=1, repeats=1)
    full = lm.table["tables"]["blocks_full"]
    assert len(full) == len(lm._blocks) and len(set(full)) > 1
    assert lm.predict({}) == pytest.approx(lm.measured_dense, rel=1e-12)


@pytest.fixture
def flop_clock(monkeypatch):
    """A clock by which a forward takes 1e-12 s per FLOP: latency tables that do not depend on the load of the
    machine running the suite (a tiny model's measured times are mostly noise, so a budget may be unreachable)."""
    from torch.utils.flop_counter import FlopCounterMode

    from vitprune_fast import metrics

    def seconds(fn, *args, **kwargs):
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            fn()
        return 1e-12 * counter.get_total_flops()

    monkeypatch.setattr(metrics, "time_call", seconds)  # every timing: the tables, forward_seconds, measure_latency


def test_latency_budget_is_met_on_the_model_s_table(flop_clock):
    from vitprune_fast import latency

    model = TINY["vit"].build(torch.float32)
    lm = latency.LatencyModel.build(model, batch=2)
    plan, rep = allocate(model, _scores(vpf.describe(model)), vpf.PlanSpec(latency=0.6, allocation="global"),
                         latency_model=lm)
    assert rep["achieved"] == pytest.approx(lm.predict_plan(plan)) and rep["achieved"] <= 0.6 * lm.dense + 1e-12
    # on a clock that adds up (FLOPs are linear in each width), the model predicts what the pruned model takes
    pruned = vpf.prune_(copy.deepcopy(model), plan)
    assert rep["achieved"] == pytest.approx(latency.forward_seconds(pruned, 2), rel=1e-9)


# ---------------------------------------------------------------------------------------------------------- CLI
CLI_MODEL = ["--model", "deit_tiny_patch16_224", "--model-args",
             json.dumps({"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8})]


def test_cli_global_allocation(tmp_path, capsys, monkeypatch, flop_clock):
    from vitprune_fast import cli

    monkeypatch.setenv("VITPRUNE_FAST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "g"
    assert cli.main(["prune", *CLI_MODEL, "--data", "digits", "--method", "upvits", "--proxy", "4", "--quiet",
                     "--allocation", "global", "--flops", "0.5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "note: global allocation:" in printed and "note: upvits engine: screened" in printed
    report = json.loads((out / "screened.json").read_text())["allocation"]
    assert report["achieved_frac"] <= 0.5 and float(printed.split("FLOPs ")[-1].split(" %")[0]) <= 50.0
    arch = json.loads((out / "architecture.json").read_text())
    plan = vpf.Plan.from_dict(json.loads((out / "plan.json").read_text()))
    for name, kept in plan.keep.items():  # every block's own width is recorded
        assert arch["groups"][name]["size"] == len(kept)
    lat = tmp_path / "lat"
    assert cli.main(["prune", *CLI_MODEL, "--data", "digits", "--method", "magnitude", "--quiet", "--allocation",
                     "global", "--latency", "0.95", "--min-keep", "0.5", "--out", str(lat)]) == 0
    printed = capsys.readouterr().out
    assert "predicted" in printed and "measured" in printed and list((tmp_path / "cache" / "latency").glob("*.json"))
    space = vpf.describe(cli.load_model(CLI_MODEL[1], json.loads(CLI_MODEL[3])))
    lat_plan = vpf.Plan.from_dict(json.loads((lat / "plan.json").read_text()))
    assert all(k >= space.groups[n].size / 2 for n, k in lat_plan.kept_sizes(space).items())


@pytest.mark.parametrize("args,needle", [
    (["--allocation", "global"], "give exactly one of --keep, --flops, --params, --latency, --target"),
    (["--allocation", "global", "--flops", "0.5", "--params", "0.5"], "give exactly one of"),
    (["--allocation", "global", "--flops", "0"], "ratio must be in (0, 1]"),
    (["--allocation", "global", "--flops", "1.5"], "ratio must be in (0, 1]"),
    (["--allocation", "global", "--flops", "0.0001"], "unreachable"),
    (["--allocation", "global", "--keep", "0.5"], "--allocation global spends one budget"),
    (["--latency", "0.5"], "--latency needs --allocation global"),
    (["--flops", "0.5", "--min-keep", "0.2"], "--min-keep bounds a global allocation"),
    (["--allocation", "global", "--flops", "0.5", "--min-keep", "1.5"], "fraction must be in [0, 1]"),
    (["--allocation", "global", "--flops", "0.5", "--method", "dimap"], "cannot allocate widths globally"),
])
def test_cli_bad_budgets_give_one_line_and_write_nothing(tmp_path, capsys, args, needle):
    from vitprune_fast import cli

    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        cli.main(["prune", *CLI_MODEL, "--data", "digits", "--quiet", *args, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and needle in err[0], err
    assert not out.exists()
