"""Same command, same result: one seed for every generator, clean proxy images, clear errors for bad images,
progress that names its stages, files written with the user's umask."""
from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
from models import make_input, make_model
from PIL import Image

import vitprune_fast as vpf
from vitprune_fast import cli
from vitprune_fast.dap import finetune_dap
from vitprune_fast.errors import InputError

TINY = json.dumps({"depth": 1, "embed_dim": 32, "num_heads": 2, "img_size": 32, "patch_size": 8})
MODEL = "deit_tiny_patch16_224"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A 3-class ImageFolder (train/ and val/) of random 40x48 RGB images: timm's training transforms crop, flip and
    jitter them, drawing from Python's random and torch."""
    root = tmp_path_factory.mktemp("folder")
    g = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for c in ("a", "b", "c"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(g.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def _scramble():
    """Move every global generator, so a run that does not seed them all from --seed gives another result."""
    random.random()
    np.random.rand()
    torch.rand(3)


def _twice(argv, out_root):
    outs = []
    for run in ("a", "b"):
        _scramble()
        out = out_root / run
        assert cli.main([*argv, "--out", str(out)]) == 0
        outs.append(out)
    return outs


def _same_files(a, b, names):
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("method", [["--method", "upvits", "--proxy", "4", "--exact"],
                                    ["--method", "upvits", "--proxy", "4", "--screened"],
                                    ["--method", "taylor", "--batches", "1"]], ids=["upvits", "screened", "taylor"])
def test_two_identical_prune_runs_are_byte_identical(folder, tmp_path, method, capsys):
    argv = ["prune", "--model", MODEL, "--model-args", TINY, "--data", str(folder), "--batch-size", "4", *method,
            "--keep", "0.5", "--quiet"]
    a, b = _twice(argv, tmp_path)
    _same_files(a, b, ["plan.json", "model.safetensors"])


def test_two_identical_finetune_runs_are_byte_identical_and_the_seed_matters(folder, tmp_path, capsys):
    argv = ["finetune", "--model", MODEL, "--model-args", TINY, "--data", str(folder), "--batch-size", "4",
            "--steps", "3", "--alpha", "0", "--quiet"]
    a, b = _twice(argv, tmp_path)
    _same_files(a, b, ["model.safetensors"])
    other = tmp_path / "seed1"
    assert cli.main([*argv, "--seed", "1", "--out", str(other)]) == 0
    assert (other / "model.safetensors").read_bytes() != (a / "model.safetensors").read_bytes()


def test_proxy_images_are_evaluation_transformed_training_images(folder):
    from timm.data import create_transform, resolve_data_config

    from vitprune_fast.data import image_folder

    model = cli.load_model(MODEL, json.loads(TINY), defaults={"num_classes": 3})
    bundle = image_folder(folder, model)
    x, y, idx = bundle.proxy(5, seed=3)
    cfg = resolve_data_config({}, model=model)
    cfg["input_size"] = (3, 32, 32)
    plain = create_transform(**cfg, is_training=False)  # timm's evaluation transform, built here independently
    paths = [bundle.train.samples[int(i)] for i in idx]
    want = torch.stack([plain(Image.open(p).convert("RGB")) for p, _ in paths])
    assert torch.equal(x, want) and y.tolist() == [c for _, c in paths]
    again, _, idx2 = bundle.proxy(5, seed=3)
    assert torch.equal(again, x) and torch.equal(idx2, idx)  # a seeded draw
    assert not torch.equal(bundle.proxy(5, seed=4)[2], idx)
    augmented = torch.stack([bundle.train[int(i)][0] for i in idx])
    assert not torch.equal(augmented, x)  # the training transform would have augmented them


def test_the_cli_scores_on_the_proxy_draw(folder, tmp_path, capsys):
    from vitprune_fast.data import image_folder

    out = tmp_path / "s.safetensors"
    assert cli.main(["score", "--model", MODEL, "--model-args", TINY, "--data", str(folder), "--method", "upvits",
                     "--proxy", "4", "--seed", "2", "--quiet", "--out", str(out)]) == 0
    assert "UP-ViTs exact engine: " in capsys.readouterr().err  # says how many candidates, once, also under --quiet
    model = cli.load_model(MODEL, json.loads(TINY), defaults={"num_classes": 3}, seed=2)
    x = image_folder(folder, model).proxy(4, seed=2)[0]
    want = vpf.upvits_scores(model, x, progress=False)
    got = cli.load_scores(out)
    assert all(torch.equal(got[k], want[k].double()) for k in want)


# --------------------------------------------------------------------------------------------------- bad images
def _bad_images(model):
    x = make_input(model, 2)
    return {
        "size": x[:, :, :16, :16],
        "channels": x[:, :1],
        "dtype": x.float(),
        "integer": (x * 100).to(torch.uint8),
        "empty": x[:0],
        "3-d": x[0],
    }


ENTRY_POINTS = {
    "upvits_scores": lambda m, x: vpf.upvits_scores(m, x, progress=False),
    "upvits_select": lambda m, x: vpf.upvits_select(m, x, 0.5, progress=False),
    "upvits_progressive": lambda m, x: vpf.upvits_progressive(m, x, 0.5, steps=2, engine="exact", progress=False),
    "finetune_dap": lambda m, x: finetune_dap(m, [(x, torch.zeros(len(x), dtype=torch.long))] * 3, 0.3, steps=3),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_bad_images_raise_input_error_and_leave_the_model_untouched(entry):
    model = make_model("deit")
    if entry == "finetune_dap":  # DAP trains in float32
        model = model.float()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    for what, x in _bad_images(model).items():
        if entry == "finetune_dap" and what == "dtype":
            continue  # the training loop casts each batch to the model's dtype, as any loader's batch
        with pytest.raises(InputError) as e:
            ENTRY_POINTS[entry](model, x)
        assert "\n" not in str(e.value), (what, str(e.value))
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), what
        assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks


def test_bad_image_messages_say_what_the_model_takes():
    model = make_model("deit")
    msgs = {}
    for what, x in _bad_images(model).items():
        with pytest.raises(InputError) as e:
            vpf.upvits_scores(model, x, progress=False)
        msgs[what] = str(e.value)
    assert "are 16x16, the model takes 32x32" in msgs["size"]
    assert "have 1 channels, the model takes 3" in msgs["channels"]
    assert "float32" in msgs["dtype"] and "float64" in msgs["dtype"]
    assert "floating point" in msgs["integer"] and "empty" in msgs["empty"] and "4-D" in msgs["3-d"]


def test_the_cli_reports_bad_images_in_one_line(capsys):
    args = json.dumps({"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 8, "in_chans": 1})
    with pytest.raises(SystemExit) as e:  # digits images are RGB; this model takes one channel
        cli.main(["prune", "--model", MODEL, "--model-args", args, "--data", "digits", "--method", "upvits",
                  "--proxy", "4", "--keep", "0.5", "--quiet", "--out", "never-written"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("vitprune-fast") and "the model takes 1" in err[-1]
    assert not os.path.exists("never-written")


# ----------------------------------------------------------------------------------------------------- progress
def test_the_screened_engine_reports_every_stage(capsys):
    model = make_model("deit")
    x = make_input(model, 4)
    events = []
    vpf.upvits_select(model, x, {"residual": 0.75, "attn": 0.5, "mlp": 0.5},
                      progress=lambda stage, done, total: events.append((stage, done, total)))
    stages = list(dict.fromkeys(s for s, _, _ in events))
    assert stages[:3] == ["exact residual", "screen", "calibration"]
    assert stages[3:5] == ["band 1", "audit 1"]
    for name in stages:  # each stage starts at 0 and moves, unless it had nothing to do (a band: size unknown)
        mine = [(d, t) for s, d, t in events if s == name]
        assert mine[0][0] == 0 and (len(mine) > 1 or mine[0][1] in (0, None)), name
    screen = [(d, t) for s, d, t in events if s == "screen"]
    assert screen[-1] == (4, 4)  # the screen counts images, not the exact evaluations it does not make
    vpf.upvits_select(model, x, 0.5, progress="lines")
    lines = capsys.readouterr().err.splitlines()
    assert [ln.split(": ")[1].split(" (")[0] for ln in lines][:3] == ["exact residual", "screen", "calibration"]
    assert all(ln.startswith("UP-ViTs screened: ") for ln in lines)


def test_quiet_cli_prints_one_line_per_stage(capsys, tmp_path):
    model_args = json.dumps({"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 8})
    assert cli.main(["prune", "--model", MODEL, "--model-args", model_args, "--data", "digits", "--method", "upvits",
                     "--proxy", "4", "--keep", "0.5", "--screened", "--quiet", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    for name in ("exact residual", "screen", "calibration", "band 1", "audit 1"):
        assert f"UP-ViTs screened: {name}" in err, name


# -------------------------------------------------------------------------------------------------------- umask
@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_saved_files_get_the_users_umask(tmp_path, mask):
    from vitprune_fast.score.store import ScoreStore

    old = os.umask(mask)
    try:
        model = make_model("deit")
        out = vpf.save_pruned(model, tmp_path / "m")
        scores = cli.save_scores({"residual": torch.rand(4)}, tmp_path / "s.safetensors", {})
        store = ScoreStore(tmp_path / "ck", "job", {})
        store.save("00000.residual", torch.rand(3))
        files = [out / "model.safetensors", out / "architecture.json", scores, *(tmp_path / "ck").iterdir()]
    finally:
        os.umask(old)
    want = 0o666 & ~mask
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: oct(want) for f in files}
