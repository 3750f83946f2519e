"""Save/load round trip (README, 'Python API') (safetensors + JSON, nothing pickled), clear errors, ONNX parity."""
import json

import numpy as np
import pytest
import torch
from models import SWIN_KEYS, VIT_KEYS, make_input, make_model, random_scores

import vitprune_fast as vpf
from vitprune_fast.arch import model_output
from vitprune_fast.io import load_pruned, save_pruned


def _pruned(key, dtype=torch.float32, **plan_kw):
    model = make_model(key, dtype=dtype)
    space = vpf.describe(model)
    plan = vpf.make_plan(space, random_scores(space), keep={"residual": 0.75, "attn": 0.5, "mlp": 0.4}, **plan_kw)
    return vpf.prune_(model, plan)


@pytest.mark.parametrize("key", VIT_KEYS + SWIN_KEYS)
@pytest.mark.parametrize("attn_mode", ["dims", "heads"])
def test_round_trip_bit_identical(tmp_path, key, attn_mode):
    model = _pruned(key, attn_mode=attn_mode)
    save_pruned(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["architecture.json", "model.safetensors"]
    loaded = load_pruned(tmp_path)
    assert type(loaded) is type(model)
    x = make_input(model)
    assert torch.equal(loaded(x), model(x))
    for (n, a), (m, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert n == m and torch.equal(a, b)
    assert vpf.describe(loaded).groups.keys() == vpf.describe(model).groups.keys()


def test_round_trip_float64_and_merged_heads(tmp_path):
    model = _pruned("swin", dtype=torch.float64, heads=1)
    save_pruned(model, tmp_path)
    loaded = load_pruned(tmp_path)
    x = make_input(model)
    assert loaded(x).dtype == torch.float64 and torch.equal(loaded(x), model(x))


def test_nothing_is_pickled(tmp_path):
    save_pruned(_pruned("deit"), tmp_path)
    raw = (tmp_path / "model.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    assert header["__metadata__"]["format"].startswith("vitprune_fast")
    assert b"\x80\x04" not in raw[:2] and not raw.startswith(b"PK")  # no pickle protocol / zip (torch.save)
    json.loads((tmp_path / "architecture.json").read_text())


def _corrupt(tmp_path, how):
    save_pruned(_pruned("deit"), tmp_path)
    arch, weights = tmp_path / "architecture.json", tmp_path / "model.safetensors"
    if how == "missing weights":
        weights.unlink()
    elif how == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif how == "garbage weights":
        weights.write_bytes(b"\x00" * 64)
    elif how == "bad json":
        arch.write_text("{not json")
    elif how == "wrong format":
        arch.write_text(json.dumps({"format": "something else"}))
    elif how == "mismatched shapes":
        d = json.loads(arch.read_text())
        d["tensors"]["blocks.0.mlp.fc1.weight"][0] += 1
        arch.write_text(json.dumps(d))
    elif how == "other model":
        other = tmp_path / "other"
        save_pruned(_pruned("swin"), other)
        arch.write_text((other / "architecture.json").read_text())
    elif how == "unknown timm model":
        d = json.loads(arch.read_text())
        d["model_name"] = "no_such_model_xyz"
        arch.write_text(json.dumps(d))


@pytest.mark.parametrize("how", ["missing weights", "truncated weights", "garbage weights", "bad json",
                                 "wrong format", "mismatched shapes", "other model", "unknown timm model"])
def test_corrupt_or_mismatched_files_raise(tmp_path, how):
    _corrupt(tmp_path, how)
    with pytest.raises(vpf.CheckpointError):
        load_pruned(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(vpf.CheckpointError, match="does not exist"):
        load_pruned(tmp_path / "nope")


@pytest.mark.parametrize("key", ["deit_distilled", "swin", "hf_vit", "hf_clip", "hf_swin", "tv_vit", "tv_swin"])
def test_onnx_export_matches_onnxruntime(tmp_path, key):
    """Pruned timm, transformers (its output object's first tensor: the logits) and torchvision models export."""
    import onnxruntime as ort  # in the [test] extra: a missing install fails loudly
    model = _pruned(key)
    x = make_input(model, batch=2)
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["logits"], dynamo=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x.numpy()})[0]
    want = model_output(model, x).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
