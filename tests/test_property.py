"""Property test: for random small configs and random plans, removal == masking (float64)."""
import copy
import functools
import json

import timm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import randomize_, rel_err

import vitprune_fast as vpf
from vitprune_fast.masked import masked_copy
from vitprune_fast.plan import Plan


@st.composite
def vit_configs(draw):
    heads, hd = draw(st.integers(1, 3)), draw(st.sampled_from([2, 4, 6]))
    kw = dict(img_size=16, patch_size=8, num_classes=draw(st.integers(2, 5)), depth=draw(st.integers(1, 2)),
              embed_dim=heads * hd * draw(st.integers(1, 2)), num_heads=heads, mlp_ratio=draw(st.sampled_from([1, 2])))
    name = draw(st.sampled_from(["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "vit_small_patch16_224"]))
    if name == "vit_small_patch16_224":
        kw["init_values"] = draw(st.sampled_from([None, 0.1]))
        if draw(st.booleans()):
            kw.update(class_token=False, global_pool="avg")
    return name, kw


@st.composite
def swin_configs(draw):
    heads = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    kw = dict(img_size=16, patch_size=2, window_size=2, embed_dim=4 * draw(st.integers(1, 2)),
              depths=(draw(st.integers(1, 2)), draw(st.integers(1, 2))), num_heads=heads,
              mlp_ratio=draw(st.sampled_from([1, 2])), num_classes=3)
    return "swin_tiny_patch4_window7_224", kw


def _subset(draw, n: int, min_size: int = 1) -> torch.Tensor:
    k = draw(st.integers(min_size, n))
    return torch.tensor(sorted(draw(st.permutations(range(n)))[:k]))


@st.composite
def plans(draw, space):
    keep, heads = {}, {}
    for name, g in space.groups.items():
        if not draw(st.booleans()):
            continue
        if g.kind != "attn":
            keep[name] = _subset(draw, g.size)
            continue
        mode = draw(st.sampled_from(["dims", "heads", "merge"]))
        if mode == "dims":  # same number of dims in every head, different dims per head
            k = draw(st.integers(1, g.head_dim))
            keep[name] = torch.cat([_subset_k(draw, g.head_dim, k) + h * g.head_dim for h in range(g.num_heads)])
        elif mode == "heads":
            hs = _subset(draw, g.num_heads)
            keep[name] = (hs[:, None] * g.head_dim + torch.arange(g.head_dim)).flatten()
            heads[name] = len(hs)
        else:
            divisors = [d for d in range(1, g.num_heads + 1) if g.num_heads % d == 0]
            h_t = draw(st.sampled_from(divisors))
            width = g.size // h_t
            k = draw(st.integers(1, width))
            keep[name] = torch.cat([_subset_k(draw, width, k) + i * width for i in range(h_t)])
            heads[name] = h_t
    return Plan.from_space(space, keep, heads)


def _subset_k(draw, n: int, k: int) -> torch.Tensor:
    return torch.tensor(sorted(draw(st.permutations(range(n)))[:k]))


@functools.cache
def _cached(name: str, kw: str) -> torch.nn.Module:
    return timm.create_model(name, **json.loads(kw)).double()


def _build(name: str, kw: str) -> torch.nn.Module:
    return copy.deepcopy(_cached(name, kw))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data(), arch=st.sampled_from(["vit", "swin"]))
def test_random_plans_removal_equals_masking(data, arch):
    name, kw = data.draw(vit_configs() if arch == "vit" else swin_configs())
    model = randomize_(_build(name, json.dumps(kw)), seed=data.draw(st.integers(0, 1000))).eval()
    space = vpf.describe(model)
    plan = data.draw(plans(space))
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        ref = masked_copy(model, plan)(x)
        vpf.prune_(model, plan)
        out = model(x)
    assert rel_err(out, ref) < 1e-9
    for g in vpf.describe(model).groups.values():
        assert g.size == (len(plan.keep[g.name]) if g.name in plan.keep else space.groups[g.name].size)
