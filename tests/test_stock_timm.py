"""The stock-timm hand-off: a pruned model with uniform widths is a stock timm model, and save_pruned says which."""
import json

import pytest
import timm
import torch
from models import make_input, make_model, random_scores, rel_err
from safetensors.torch import load_file

import vitprune_fast as vpf
from vitprune_fast.io import ARCH_FILE, WEIGHTS, stock_call, stock_model


def _stock(tmp_path, model):
    vpf.save_pruned(model, tmp_path)
    return json.loads((tmp_path / ARCH_FILE).read_text())["timm_stock"]


def _same_logits(stock: torch.nn.Module, path, x) -> float:
    stock.load_state_dict(load_file(str(path / WEIGHTS)), strict=True)
    with torch.no_grad():
        return rel_err(stock.eval()(x), vpf.load_pruned(path)(x))


def test_deit_b_pruned_to_the_deit_s_shape_loads_into_stock_deit_s(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("deit_base_patch16_224").double().eval()
    space = vpf.describe(model)
    vpf.prune_(model, vpf.make_plan(space, random_scores(space), keep=0.5, heads=6))
    stock = _stock(tmp_path, model)
    assert stock["registered"] == "deit_small_patch16_224"
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    assert _same_logits(timm.create_model("deit_small_patch16_224").double(), tmp_path, x) < 1e-12
    # timm's own loader takes the file as it is (float32 model: float32 tolerance)
    ckpt = timm.create_model("deit_small_patch16_224", checkpoint_path=str(tmp_path / WEIGHTS)).eval()
    with torch.no_grad():
        assert rel_err(ckpt(x.float()).double(), vpf.load_pruned(tmp_path)(x)) < 1e-4
    assert stock_call(stock, tmp_path / WEIGHTS).startswith("timm.create_model('deit_small_patch16_224'")


@pytest.mark.parametrize("key, keep", [
    ("swin", 0.5),  # widths 16/32 -> 8/16: still embed_dim * 2**stage
    ("deit", {"residual": 0.75, "attn": 0.75, "mlp": 0.5}),  # embed 36 = attention width; MLP 96 (ratio 2.67)
])
def test_uniform_non_standard_widths_round_trip_through_create_model_kwargs(tmp_path, key, keep):
    model = make_model(key)
    space = vpf.describe(model)
    vpf.prune_(model, vpf.make_plan(space, random_scores(space), keep=keep))
    stock = _stock(tmp_path, model)
    assert stock["registered"] is None and "reason" not in stock
    built = timm.create_model(stock["model_name"], pretrained=False, **stock["kwargs"]).double()
    assert _same_logits(built, tmp_path, make_input(model)) < 1e-12
    call = stock_call(stock, tmp_path / WEIGHTS)
    assert call.startswith(f"timm.create_model({stock['model_name']!r}, ") and "checkpoint_path=" in call


@pytest.mark.parametrize("key, plan_kw, why", [
    ("deit", dict(keep={"blocks.0.mlp": 0.5}), "blocks differ"),  # one block narrower than the others
    ("deit", dict(keep={"attn": 0.5}), "attention width 24 differs from embed_dim 48"),
    ("swin3", dict(keep={"layers.1.residual": 0.5}), "not embed_dim * 2**stage"),
])
def test_a_non_stock_shape_says_why(key, plan_kw, why):
    model = make_model(key)
    space = vpf.describe(model)
    vpf.prune_(model, vpf.make_plan(space, random_scores(space), **plan_kw))
    stock = stock_model(model)
    assert why in stock["reason"] and stock_call(stock, "w").startswith("not a stock timm shape")


def test_an_unpruned_timm_model_is_its_own_registered_name():
    with torch.device("meta"):
        model = timm.create_model("deit_tiny_patch16_224")
    assert stock_model(model)["registered"] == "deit_tiny_patch16_224"
