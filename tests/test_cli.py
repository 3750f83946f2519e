"""CLI: score -> prune -> save -> load -> finetune -> eval round trip; prune-to-shape; one-line errors."""
import json
import subprocess
import sys

import pytest
import torch

import vitprune_fast as vpf
from vitprune_fast import cli

TINY = json.dumps({"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8})  # + img_size 32 from digits
MODEL = "deit_tiny_patch16_224"


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(argv, capsys):
    assert cli.main(argv) == 0
    return capsys.readouterr().out


def test_round_trip_score_prune_load_finetune_eval(tmp_path, capsys):
    scores = tmp_path / "scores.safetensors"
    out = _run(["score", "--model", MODEL, "--model-args", TINY, "--data", "digits", "--method", "upvits",
                "--proxy", "4", "--quiet", "--out", str(scores)], capsys)
    assert "upvits scores of 5 groups" in out
    loaded = cli.load_scores(scores)
    assert set(loaded) == {"residual", "blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"}
    assert loaded["blocks.1.mlp"].shape == (128,) and (loaded["blocks.1.mlp"] > -1e-5).all()  # KL, up to fp32 rounding

    pruned = tmp_path / "pruned"
    out = _run(["prune", "--model", MODEL, "--model-args", TINY, "--data", "digits", "--scores", str(scores),
                "--keep", "residual=0.75,attn=0.5,mlp=0.5", "--quiet", "--out", str(pruned)], capsys)
    assert "kept channels: residual 24/32, attn 32/64, mlp 128/256" in out
    model = vpf.load_pruned(pruned)
    assert model.embed_dim == 24 and model.blocks[1].mlp.fc1.out_features == 64
    assert model.blocks[0].attn.num_heads == 2 and model.blocks[0].attn.head_dim == 8
    plan = json.loads((pruned / "plan.json").read_text())
    top = torch.argsort(loaded["blocks.1.mlp"], descending=True, stable=True)[:64].sort().values
    assert plan["keep"]["blocks.1.mlp"] == top.tolist()  # the highest-scoring units were kept

    # the same name + args + seed rebuilds the same random-init teacher the scores were computed on
    teacher = cli.load_model(MODEL, json.loads(TINY), defaults={"num_classes": 10, "img_size": 32})
    x = torch.randn(2, 3, 32, 32)
    masked_ref = vpf.prune_(teacher, vpf.Plan.from_dict(plan))
    assert torch.allclose(masked_ref(x), model(x), atol=1e-5)

    tuned = tmp_path / "tuned"
    out = _run(["finetune", "--model", str(pruned), "--teacher", MODEL, "--teacher-args", TINY, "--data", "digits",
                "--random-teacher", "--steps", "3", "--quiet", "--out", str(tuned)], capsys)
    assert "distill: 3 steps" in out
    out = _run(["eval", "--model", str(tuned), "--data", "digits", "--quiet"], capsys)
    assert "on 450 test images of digits" in out
    acc = float(out.split("top-1 ")[-1].split(" %")[0])
    assert 0 <= acc <= 100
    again = vpf.load_pruned(tuned)
    assert again.embed_dim == 24
    assert not all(torch.equal(a, b) for a, b in zip(again.parameters(), model.parameters(), strict=True))


def test_prune_by_flops_and_dimap(tmp_path, capsys):
    out = _run(["prune", "--model", MODEL, "--model-args", TINY, "--data", "digits", "--flops", "0.5",
                "--method", "random", "--quiet", "--out", str(tmp_path / "a")], capsys)
    pct = float(out.split("FLOPs ")[-1].split(" %")[0])
    assert 45 <= pct <= 55
    out = _run(["prune", "--model", MODEL, "--model-args", TINY, "--data", "digits", "--flops", "0.6",
                "--method", "dimap", "--quiet", "--out", str(tmp_path / "b")], capsys)
    assert "residual 32/32" in out  # DIMAP's structured plan leaves the residual width alone
    assert 55 <= float(out.split("FLOPs ")[-1].split(" %")[0]) <= 65


def test_prune_to_target_shape_merges_heads(tmp_path, capsys):
    # a 1-block DeiT-S (384 wide, 6 heads, MLP 1536) pruned to DeiT-Ti widths (192, 3 heads, 768)
    args = json.dumps({"depth": 1, "img_size": 32})
    _run(["prune", "--model", "deit_small_patch16_224", "--model-args", args, "--target", "deit_tiny_patch16_224",
          "--quiet", "--out", str(tmp_path / "ti")], capsys)
    m = vpf.load_pruned(tmp_path / "ti")
    attn = m.blocks[0].attn
    assert (m.embed_dim, attn.num_heads, attn.head_dim, m.blocks[0].mlp.fc1.out_features) == (192, 3, 64, 768)


@pytest.mark.parametrize("mode", [["--keep", "0.5"], ["--flops", "0.6"], ["--target", "deit_tiny_patch16_224"]])
def test_prune_screened_gives_the_exact_upvits_selection(tmp_path, capsys, mode):
    from vitprune_fast.score.screened import selection_differences

    small = {"depth": 2, "embed_dim": 48, "num_heads": 6, "patch_size": 8, "mlp_ratio": 2}
    model_args = json.dumps({"depth": 1, "patch_size": 8} if mode[0] == "--target" else small)  # target: 384 wide
    common = ["prune", "--model", "vit_small_patch16_224", "--model-args", model_args, "--data", "digits",
              "--method", "upvits", "--proxy", "8", "--quiet", *mode]
    out = _run([*common, "--screened", "--out", str(tmp_path / "s")], capsys)
    assert "screened UP-ViTs:" in out and "candidates scored exactly" in out
    report = json.loads((tmp_path / "s" / "screened.json").read_text())
    assert 0 < report["scored_exactly"] <= report["candidates"] and report["flips"] >= 0
    _run([*common, "--exact", "--out", str(tmp_path / "e")], capsys)
    a, b = (vpf.Plan.from_dict(json.loads((tmp_path / d / "plan.json").read_text())) for d in "se")
    # the exact scores of the same model (same name, args and seed) and proxy images, for the tie rule
    from vitprune_fast.data import digits

    teacher = cli.load_model("vit_small_patch16_224", json.loads(model_args), defaults={"num_classes": 10,
                                                                                       "img_size": 32})
    x = digits().proxy(8, seed=0)[0]  # the CLI's proxy draw (--proxy 8, --seed 0)
    exact = vpf.upvits_scores(teacher, x, progress=False)
    if mode[0] == "--target":
        assert a.heads and all(h == 3 for h in a.heads.values())  # 6 heads merged into DeiT-Ti's 3
    assert not selection_differences(vpf.describe(teacher), exact, a, b, vpf.PlanSpec(**report["plan"]))


def test_prune_progressive(tmp_path, capsys):
    """--progressive T: the API's progressive plan on the same proxy images; T = 1 is the one-shot plan; the FLOPs
    target is met as by one-shot."""
    from vitprune_fast.data import digits
    from vitprune_fast.progressive import upvits_progressive

    common = ["prune", "--model", MODEL, "--model-args", TINY, "--data", "digits", "--method", "upvits",
              "--proxy", "4", "--quiet", "--flops", "0.5", "--exact"]
    plans = {}
    for name, extra in {"one": [], "p1": ["--progressive", "1"], "p2": ["--progressive", "2"]}.items():
        out = _run([*common, *extra, "--out", str(tmp_path / name)], capsys)
        plans[name] = vpf.Plan.from_dict(json.loads((tmp_path / name / "plan.json").read_text()))
        if extra:
            assert "progressive UP-ViTs:" in out and (tmp_path / name / "progressive.json").is_file()
        pct = float(out.split("FLOPs ")[-1].split(" %")[0])
        assert pct == pytest.approx(float(out.split("reaches ")[-1].split(" %")[0]), abs=0.05)
    same = [torch.equal(plans["one"].keep[k], plans["p1"].keep[k]) for k in plans["one"].keep]
    assert all(same) and plans["one"].keep.keys() == plans["p1"].keep.keys()
    teacher = cli.load_model(MODEL, json.loads(TINY), defaults={"num_classes": 10, "img_size": 32})
    x = digits().proxy(4, seed=0)[0]  # the CLI's proxy draw (--proxy 4, --seed 0)
    ratio = json.loads((tmp_path / "p2" / "progressive.json").read_text())
    assert ratio["steps"] == 2 and ratio["engine"] == "exact"
    space = vpf.describe(teacher)
    assert plans["p2"].kept_sizes(space) == plans["one"].kept_sizes(space)
    keep = {k: len(v) / space.groups[k].size for k, v in plans["one"].keep.items()}
    api, _ = upvits_progressive(teacher, x, keep, steps=2, engine="exact", progress=False)
    assert all(torch.equal(api.keep[k], plans["p2"].keep[k]) for k in api.keep)


def test_progressive_needs_upvits(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["prune", "--model", MODEL, "--model-args", TINY, "--data", "digits", "--keep", "0.5",
                  "--progressive", "2", "--out", str(tmp_path)])
    assert "--progressive re-scores the model between steps" in capsys.readouterr().err


def test_screened_needs_upvits(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["prune", "--model", MODEL, "--model-args", TINY, "--data", "digits", "--keep", "0.5",
                  "--screened", "--out", str(tmp_path)])
    assert "--screened is the UP-ViTs selection engine" in capsys.readouterr().err


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "vitprune_fast.cli", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("args,needle", [
    (["eval", "--model", "no_such_model_xyz", "--data", "digits"], "unknown model 'no_such_model_xyz'"),
    (["eval", "--model", MODEL, "--data", "/no/such/dir"], "does not exist"),
    (["prune", "--model", MODEL, "--keep", "1.5", "--out", "x"], "ratio must be in (0, 1]"),
    (["prune", "--model", MODEL, "--flops", "0", "--out", "x"], "ratio must be in (0, 1]"),
    (["prune", "--model", MODEL, "--method", "random", "--flops", "0.0001", "--out", "x"],
     "below the smallest reachable fraction"),  # PlanError from vitprune_fast.targets
    (["prune", "--model", MODEL, "--method", "random", "--target", "deit_small_patch16_224", "--out", "x"],
     "would grow from 192 to 384 channels"),
    (["score", "--model", MODEL, "--method", "nope", "--out", "x"], "invalid choice: 'nope'"),
    (["prune", "--model", MODEL, "--model-args", "{bad", "--keep", "0.5", "--out", "x"], "not valid JSON"),
    (["score", "--model", MODEL, "--method", "taylor", "--out", "x"], "--data is required"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_arguments_give_one_line_and_exit_2(args, needle, capsys):
    """In process (``cli.main``, what the console script calls): an uncaught exception would fail the test here, as
    a traceback would on the command line; ``test_the_console_entry_point_gives_one_line`` runs one case as a
    process."""
    with pytest.raises(SystemExit) as e:
        cli.main(args)
    stderr = capsys.readouterr().err
    lines = stderr.strip().splitlines()
    assert e.value.code == 2, stderr
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith("vitprune-fast") and needle in lines[0], lines[0]


def test_the_console_entry_point_gives_one_line():
    r = _cli("prune", "--model", MODEL, "--method", "random", "--target", "deit_small_patch16_224", "--out", "x")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert lines[0].startswith("vitprune-fast") and "would grow from 192 to 384 channels" in lines[0], lines[0]


def test_export_onnx_matches_torch(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    pruned = tmp_path / "pruned"
    _run(["prune", "--model", MODEL, "--model-args", TINY, "--data", "digits", "--keep", "0.5", "--quiet",
          "--out", str(pruned)], capsys)
    out = _run(["export", "--model", str(pruned), "--out", str(tmp_path / "m.onnx")], capsys)
    assert "onnxruntime matches torch" in out and (tmp_path / "m.onnx").stat().st_size > 0


def test_bench_lists_the_scripts(capsys):
    out = _run(["bench", "--list"], capsys)
    assert "kl_engine" in out and "common" not in out
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "no_such_bench"])
    assert e.value.code == 2 and "unknown benchmark" in capsys.readouterr().err


def test_finetune_method_dap_prunes_while_training(tmp_path, capsys):
    out = _run(["finetune", "--method", "dap", "--model", MODEL, "--model-args", TINY, "--data", "digits",
                "--steps", "4", "--batch-size", "16", "--dap-target", "0.3", "--quiet", "--out", str(tmp_path / "d")],
               capsys)
    assert "DAP: params" in out and "dap: 4 steps" in out
    before, after = (int(r.split()[1].replace(",", "")) for r in out.splitlines() if r.startswith(("before", "after")))
    assert after < before
    assert sum(p.numel() for p in vpf.load_pruned(tmp_path / "d").parameters()) == after


def test_finetune_dap_checkpoint_resumes_to_the_same_model(tmp_path, capsys):
    ckpt = tmp_path / "dap.pt"
    args = ["finetune", "--method", "dap", "--model", MODEL, "--model-args", TINY, "--data", "digits",
            "--steps", "6", "--batch-size", "16", "--dap-target", "0.3", "--quiet",
            "--checkpoint", str(ckpt), "--checkpoint-every", "3"]
    _run(args + ["--out", str(tmp_path / "a")], capsys)
    assert torch.load(ckpt, weights_only=True)["step"] == 6
    _run(args + ["--out", str(tmp_path / "b")], capsys)  # resumes at the end: no step left, same pruned model
    a, b = (vpf.load_pruned(tmp_path / d).state_dict() for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit) as e:  # a DAP checkpoint is not a distillation run's checkpoint
        cli.main(["finetune", "--model", MODEL, "--model-args", TINY, "--data", "digits", "--alpha", "0",
                  "--checkpoint", str(ckpt), "--out", str(tmp_path / "c")])
    assert e.value.code == 2 and "is not a vitprune_fast.finetune.train checkpoint" in capsys.readouterr().err


def test_finetune_distill_checkpoint_resumes_to_the_same_model(tmp_path, capsys):
    ckpt = tmp_path / "ft.pt"
    args = ["finetune", "--model", MODEL, "--model-args", TINY, "--data", "digits", "--alpha", "0", "--steps", "4",
            "--batch-size", "16", "--accum-steps", "2", "--quiet", "--checkpoint", str(ckpt), "--checkpoint-every", "2"]
    _run(args + ["--out", str(tmp_path / "a")], capsys)
    assert torch.load(ckpt, weights_only=True)["step"] == 4
    _run(args + ["--out", str(tmp_path / "b")], capsys)  # resumes at the end: the same model
    a, b = (vpf.load_pruned(tmp_path / d).state_dict() for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_timm_teacher_without_weights_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["finetune", "--model", MODEL, "--model-args", TINY, "--data", "digits", "--teacher", MODEL,
                  "--steps", "1", "--out", "x"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--pretrained-teacher" in err and len(err.strip().splitlines()) == 1
