"""UP-ViTs head-merge rule: DeiT-B pruned to 6 / 3 heads has exactly timm's deit_small / deit_tiny shape."""
import pytest
import timm
import torch

import vitprune_fast as vpf
from vitprune_fast.metrics import count_params


@pytest.fixture(scope="module")
def deit_b_state():
    torch.manual_seed(0)
    return timm.create_model("deit_base_patch16_224").state_dict()


@pytest.mark.parametrize("target,heads,keep,expected", [
    ("deit_small_patch16_224", 6, 0.5, 22_050_664),
    ("deit_tiny_patch16_224", 3, 0.25, 5_717_416),
])
def test_deit_base_to_stock_shapes(deit_b_state, target, heads, keep, expected):
    model = timm.create_model("deit_base_patch16_224")
    model.load_state_dict(deit_b_state)
    space = vpf.describe(model)
    scores = {n: torch.rand(g.size) for n, g in space.groups.items()}
    vpf.prune_(model, vpf.make_plan(space, scores, keep=keep, heads=heads))
    assert count_params(model) == expected
    stock = timm.create_model(target)
    assert count_params(stock) == expected
    shapes = {k: v.shape for k, v in stock.state_dict().items()}
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    assert all(b.attn.num_heads == heads and b.attn.head_dim == 64 for b in model.blocks)
    model.eval()(torch.randn(1, 3, 224, 224))
