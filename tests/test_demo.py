"""The demo's fast mode end to end (through the CLI), its cache, and its helpers. Quality is reported, not asserted."""
import json

import pytest
import torch

import vitprune_fast as vpf
from vitprune_fast import cli
from vitprune_fast.demo import METHODS, proxy_subset


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_demo_fast_mode(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VITPRUNE_FAST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert cli.main(["demo", "--fast", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "total wall time" in printed and "top-1 fine-tuned" in printed and "bench/fidelity.py" in printed
    rec = json.loads((out / "demo.json").read_text())
    rows = rec["table"]
    assert [(r["model"], r["method"]) for r in rows] == [(m, x) for m in ("deit", "swin")
                                                         for x in ("unpruned",) + METHODS]
    for key, res in rec["results"].items():
        pruned = {r["method"]: r for r in res["rows"][1:]}
        # one keep ratio for every method: identical shapes for the score-based ones, ~50 % FLOPs for all
        assert len({pruned[m]["params"] for m in ("upvits", "magnitude", "random")}) == 1
        for m, r in pruned.items():
            assert 0.45 <= r["flops_frac"] <= 0.55, (key, m)
            assert 0 <= r["acc_pruned"] <= 100 and 0 <= r["acc_finetuned"] <= 100
            assert r["latency_ms"] > 0
            model = vpf.load_pruned(out / "models" / f"{key}-{m}")
            assert {n: g.size for n, g in vpf.describe(model).groups.items()} == res["widths"][m]
            assert vpf.metrics.count_flops(model) == r["flops"]
        assert not res["base_cached"]
    assert rec["config"]["fast"] and rec["wall_s"] > 0
    pngs = {p.name for p in out.glob("*.png")}
    pytest.importorskip("matplotlib")
    assert {"accuracy.png", "deit-widths.png", "swin-scores.png"} <= pngs

    # a second run loads the trained models from the cache and gets the same unpruned accuracy
    out2 = tmp_path / "out2"
    assert cli.main(["demo", "--fast", "--quiet", "--methods", "random", "--out", str(out2)]) == 0
    rec2 = json.loads((out2 / "demo.json").read_text())
    for key, res in rec2["results"].items():
        assert res["base_cached"]
        assert res["rows"][0]["acc_pruned"] == rec["results"][key]["rows"][0]["acc_pruned"]
        assert [r["method"] for r in res["rows"]] == ["unpruned", "random"]


def test_demo_rejects_unknown_methods(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--fast", "--methods", "upvits,bogus", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "--methods must be distinct names" in capsys.readouterr().err


def test_proxy_subset_is_class_balanced_and_seeded():
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 5)
    x = torch.arange(len(y)).float().view(-1, 1, 1, 1)
    got = proxy_subset(x, y, 12, seed=0).flatten().long()
    counts = torch.bincount(y[got], minlength=3)
    assert counts.tolist() == [4, 4, 4] and len(set(got.tolist())) == 12
    assert torch.equal(got, proxy_subset(x, y, 12, seed=0).flatten().long())
    assert torch.bincount(y[proxy_subset(x, y, 20).flatten().long()]).tolist() == [8, 7, 5]  # class 2 runs out


def test_demo_screened_upvits_prunes_like_the_exact_engine(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VITPRUNE_FAST_CACHE", str(tmp_path / "cache"))
    recs = {}
    for flag in ([], ["--screened"]):
        out = tmp_path / ("screened" if flag else "exact")
        assert cli.main(["demo", "--fast", "--quiet", "--methods", "upvits", *flag, "--out", str(out)]) == 0
        recs[bool(flag)] = json.loads((out / "demo.json").read_text())
    assert "screened UP-ViTs:" in capsys.readouterr().out
    for key, res in recs[True]["results"].items():
        exact, screened = recs[False]["results"][key], res
        assert screened["widths"] == exact["widths"]
        row = screened["rows"][1]
        assert row["screened"]["scored_exactly"] <= row["screened"]["candidates"]
        # the same channels kept: the same pruned model before fine-tuning (fine-tuning itself is not bit-identical
        # between runs; its accuracies are not compared)
        assert row["acc_pruned"] == exact["rows"][1]["acc_pruned"]
    assert recs[True]["config"]["upvits_engine"] == "screened"
