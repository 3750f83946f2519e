"""The adapter contract's q declaration (``Adapter.q_rows``): the attention-scale fold comes from the adapter.

When a head's dim shrinks from hd to hd', ``prune_`` multiplies the rows that make q by ``sqrt(hd' / hd)`` so that an
attention with SDPA's default scale computes what the masked model computes. Which rows make q is family knowledge:
an adapter declares them, and ``prune_`` refuses a plan that needs them from an adapter that does not (before any
tensor moves). Float64, every weight, bias and norm weight randomised.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import vitprune_fast as vpf
from tests.models import CONFIGS, make_input, make_model, random_scores, randomize_, rel_err
from tests.test_families import FAMILIES
from vitprune_fast.arch import Adapter, ViTAdapter, adapter_for, register_adapter, unregister_adapter
from vitprune_fast.arch.common import (
    linear_q_rows,
    linear_slices,
    mlp_group,
    norm_slices,
    patch_embed_slices,
    prenorm_residual_slices,
    sync_generic_attributes,
    sync_single_stage_width,
    token_slices,
)
from vitprune_fast.masked import masked_copy
from vitprune_fast.space import Group, PruningSpace


# ------------------------------------------------------------------------------------------- a toy family
class ToQKVAttention(nn.Module):
    """Multi-head attention whose q comes from ``to_q`` and k, v from ``to_kv``; SDPA with its default scale, so a
    shrunk head needs the scale fold."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None, is_causal=False):
        b, n, _ = x.shape
        q = self.to_q(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.to_kv(x).reshape(b, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj(x.transpose(1, 2).reshape(b, n, -1))


class ToQViT(VisionTransformer):
    """A timm ViT whose attentions are :class:`ToQKVAttention` (no fused ``qkv``, no ``q_proj``)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for blk in self.blocks:
            blk.attn = ToQKVAttention(self.embed_dim, kwargs["num_heads"])


class UndeclaredAdapter(ViTAdapter):
    """The toy family's adapter without a q declaration: its groups and sizes, and the contract's default q_rows."""

    arch = "to_q_vit"
    q_rows = Adapter.q_rows  # the contract's default: nothing declared

    @classmethod
    def matches(cls, model):
        return isinstance(model, ToQViT)

    def describe(self) -> PruningSpace:
        m = self.model
        res = patch_embed_slices(m) + token_slices(m, ("cls_token", "pos_embed"))
        groups = {}
        for i, blk in enumerate(m.blocks):
            p, at = f"blocks.{i}", f"blocks.{i}.attn"
            res += prenorm_residual_slices(m, p, inputs=("attn.to_q", "attn.to_kv"))
            a = blk.attn.to_q.out_features
            rows = linear_slices(m, f"{at}.to_q", "out") + linear_slices(m, f"{at}.to_kv", "out", 2, a)
            groups[at] = Group(at, "attn", a, rows + linear_slices(m, f"{at}.proj", "in"),
                               num_heads=blk.attn.num_heads, head_dim=blk.attn.head_dim, module=at)
            groups[f"{p}.mlp"] = mlp_group(m, f"{p}.mlp")
        res += norm_slices(m, "norm") + linear_slices(m, "head", "in")
        return PruningSpace(self.arch, {"residual": Group("residual", "residual", m.embed_dim, res)} | groups)

    def sync_attributes(self) -> None:
        m = self.model
        sync_generic_attributes(m)
        sync_single_stage_width(m, m.patch_embed.proj.weight.shape[0])
        for blk in m.blocks:
            blk.attn.head_dim = blk.attn.to_q.out_features // blk.attn.num_heads


class DeclaredAdapter(UndeclaredAdapter):
    """The toy family's adapter: q is ``to_q``."""

    def q_rows(self, group):
        return linear_q_rows(self.model, f"{group.module}.to_q")


class NoFoldAdapter(UndeclaredAdapter):
    """Declares no tensor: the fold is skipped (what a silent probe that finds nothing did)."""

    def q_rows(self, group):
        return []


def _to_q_vit():
    torch.manual_seed(0)
    model = ToQViT(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3, num_classes=10)
    return randomize_(model.to(torch.float64)).eval()


@pytest.fixture
def registered():
    """Register one adapter class for the test (``registered(cls)``); unregistered afterwards."""
    added = []

    def add(cls):
        register_adapter(cls)
        added.append(cls)
        return cls

    try:
        yield add
    finally:
        for cls in added:
            unregister_adapter(cls)


def _dims_plan(model):
    space = vpf.describe(model)
    return vpf.make_plan(space, random_scores(space, 1), keep={"residual": 0.75, "attn": 0.5, "mlp": 0.5},
                         attn_mode="dims")


def _removal_error(model, plan) -> float:
    x = make_input(model, 3)
    with torch.no_grad():
        want = masked_copy(model, plan)(x)
        pruned = vpf.prune_(copy.deepcopy(model), plan)
        assert pruned.blocks[0].attn.head_dim == 8  # 16 -> 8: the fold matters
        return rel_err(pruned(x), want)


def test_declared_q_projection_gets_the_scale_fold(registered):
    registered(DeclaredAdapter)
    model = _to_q_vit()
    assert isinstance(adapter_for(model), DeclaredAdapter)
    assert _removal_error(model, _dims_plan(model)) < 1e-9


def test_the_fold_is_what_makes_removal_equal_masking(registered):
    registered(NoFoldAdapter)
    model = _to_q_vit()
    assert _removal_error(model, _dims_plan(model)) > 1e-4


def test_undeclared_q_projection_is_refused_before_anything_moves(registered):
    registered(UndeclaredAdapter)
    model = _to_q_vit()
    plan = _dims_plan(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(vpf.UnsupportedModelError, match=r"UndeclaredAdapter does not declare the q projection of "
                                                        r"blocks\.0\.attn"):
        vpf.prune_(model, plan)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(after[k].shape == v.shape and torch.equal(after[k], v) for k, v in before.items())
    assert model.blocks[0].attn.num_heads == 3 and model.blocks[0].attn.head_dim == 16


def test_undeclared_q_projection_is_not_needed_when_head_dims_stay(registered):
    registered(UndeclaredAdapter)
    model = _to_q_vit()
    space = vpf.describe(model)
    plan = vpf.make_plan(space, random_scores(space, 2), keep={"residual": 0.75, "mlp": 0.5})
    x = make_input(model, 3)
    with torch.no_grad():
        assert rel_err(vpf.prune_(copy.deepcopy(model), plan)(x), masked_copy(model, plan)(x)) < 1e-9


# ------------------------------------------------------------------------------------- the built-in families
def _legacy_q_tensors(attn: nn.Module, q_rows: int) -> list:
    """What ``prune_`` probed before the adapters declared q (attribute names), kept as the reference."""
    fused = getattr(attn, "qkv", None)
    start = 0
    if isinstance(fused, nn.Linear):
        q = [fused.weight, fused.bias]
    elif isinstance(getattr(attn, "in_proj", None), nn.Linear):
        start = attn.in_split[0]
        q = [attn.in_proj.weight, attn.in_proj.bias]
    else:
        lin = getattr(attn, "q_proj", None) or attn.q
        q = [lin.weight, lin.bias]
    q.append(getattr(attn, "q_bias", None))
    return [(t, slice(start, start + q_rows)) for t in q if t is not None]


def _family_model(key):
    if key in CONFIGS:
        return make_model(key)
    return FAMILIES[key].build()


def _assert_q_rows(model, space, widths):
    adapter = adapter_for(model)
    for g in space.of_kind("attn"):
        got, want = adapter.q_rows(g), _legacy_q_tensors(model.get_submodule(g.module), widths[g.name])
        assert len(got) == len(want) > 0, g.name
        for (t, rows), (t_want, rows_want) in zip(got, want, strict=True):
            assert t is t_want and rows == rows_want, g.name
            assert rows.stop - rows.start == widths[g.name] and rows.stop <= t.shape[0], g.name


@pytest.mark.parametrize("key", [*CONFIGS, *(k for k, r in FAMILIES.items() if r.library == "timm")])
def test_builtin_q_rows_are_the_rows_that_make_q(key):
    model = _family_model(key)
    space = vpf.describe(model)
    _assert_q_rows(model, space, {g.name: g.size for g in space.of_kind("attn")})
    mode = "heads" if any(g.whole_heads for g in space.of_kind("attn")) else "dims"
    plan = vpf.make_plan(space, random_scores(space, 3), keep=0.5, attn_mode=mode)
    vpf.prune_(model, plan)
    _assert_q_rows(model, space, {g.name: len(plan.keep.get(g.name, range(g.size))) for g in space.of_kind("attn")})
