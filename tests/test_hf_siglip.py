"""transformers SigLIP vision tower (``SiglipVisionModel`` with its attention-pool head, SDPA; without it, eager)
beyond the per-family suite of test_families.py (removal == masking for every group kind, save / load, UP-ViTs fast
== reference with the features objective, DIMAP, DAP): the pooling head's parts and attributes, its written-out
attention, the ``from_pretrained`` round trip, the group names, in-place slicing with optimizer state."""
import copy

import pytest
import torch

import vitprune_fast as vpf
from tests.models import (
    assert_not_written_for_pretrained,
    assert_pretrained_round_trip,
    make_input,
    random_scores,
    rel_err,
)
from vitprune_fast.arch import adapter_for, model_output
from vitprune_fast.arch.tv_vit import explicit_attention
from vitprune_fast.masked import masked_copy
from vitprune_fast.testing import CATALOGUE

pytestmark = pytest.mark.usefixtures("one_thread")


def test_group_names_are_the_library_module_paths():
    model = CATALOGUE["hf_siglip"].build()
    names = set(vpf.describe(model).groups)
    b = "vision_model." if hasattr(model, "vision_model") else ""
    layers = {f"{b}encoder.layers.{i}.{p}" for i in range(2) for p in ("self_attn", "mlp")}
    assert names == {"residual", f"{b}head.attention", f"{b}head.mlp"} | layers
    assert all(model.get_submodule(n) is not None for n in names - {"residual"})
    assert vpf.describe(model).groups[f"{b}head.attention"].tied_to == "residual"
    assert set(vpf.describe(CATALOGUE["hf_siglip_nohead"].build()).groups) == {"residual"} | layers


def test_the_pooling_head_follows_the_residual_and_its_attributes_the_tensors():
    """The probe, the pooling attention (tied: its width is the residual's kept count, q scaled by sqrt(new/old)
    head size) and the head's stream; the pooled output keeps the residual's channels."""
    model = CATALOGUE["hf_siglip"].build()
    space = vpf.describe(model)
    plan = vpf.make_plan(space, random_scores(space), keep={"residual": 0.5, "mlp": 0.5})
    x = make_input(model, 2)
    with torch.no_grad():
        want = model_output(masked_copy(model, plan), x)[:, plan.keep["residual"]]
    vpf.prune_(model, plan)
    pool = adapter_for(model)._pool
    att = pool.attention
    assert (att.embed_dim, att.kdim, att.vdim, att.num_heads, att.head_dim) == (16, 16, 16, 4, 4)
    assert pool.probe.shape == (1, 1, 16) and tuple(att.in_proj_weight.shape) == (48, 16)
    assert pool.layernorm.normalized_shape == (16,) and pool.mlp.fc1.weight.shape == (32, 16)
    with torch.no_grad():
        assert rel_err(model_output(model, x), want) < 1e-9


def test_the_written_out_pooling_attention_equals_multihead_attention():
    """Probe query, token keys and values (cross-attention), as the head calls it."""
    model = CATALOGUE["hf_siglip"].build()
    att = adapter_for(model)._pool.attention
    g = torch.Generator().manual_seed(3)
    q, kv = (torch.randn(3, n, 32, dtype=torch.float64, generator=g) for n in (1, 5))
    with torch.no_grad():
        assert rel_err(explicit_attention(att)(q, kv, kv)[0], att(q, kv, kv)[0]) < 1e-12


def test_the_pooling_attention_keeps_every_head_and_a_merge_is_refused():
    """heads=2 merges the layers' heads (where they are not tied); the tied pooling attention keeps its 4 (every
    head, fewer dims each). A plan
    that merges them anyway is refused, the model untouched."""
    model = CATALOGUE["hf_siglip"].build()
    space = vpf.describe(model)
    pool = next(n for n in space.groups if n.endswith("head.attention"))
    plan = vpf.make_plan(space, random_scores(space), keep=0.5, heads=2)
    layers_tied = {g.tied_to for n, g in space.groups.items() if g.kind == "attn" and n != pool} == {"residual"}
    assert plan.heads[pool] == 4  # transformers 5.0's layer attentions are tied too (module docstring): all kept
    assert {h for n, h in plan.heads.items() if n != pool} == ({4} if layers_tied else {2})
    plan.heads[pool] = 2
    before = copy.deepcopy(model.state_dict())
    for apply, error, says in ((masked_copy, vpf.UnsupportedModelError, "computes its scale from its head size"),
                               (vpf.prune_, vpf.PlanError, "tied to residual.*the same number in each of its 4")):
        with pytest.raises(error, match=says):
            apply(model, plan)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("key", ["hf_siglip", "hf_siglip_nohead"])
def test_uniform_pruned_model_loads_with_from_pretrained(key, tmp_path):
    """keep=0.5 everywhere: one shape for the layers and the head, which SiglipVisionConfig expresses."""
    model = CATALOGUE[key].build()
    space = vpf.describe(model)
    vpf.prune_(model, vpf.make_plan(space, random_scores(space), keep=0.5))
    assert model.config.hidden_size == 16 and model.config.intermediate_size == 32
    assert_pretrained_round_trip(model, tmp_path / "m")


def test_a_head_mlp_of_another_width_is_not_written_for_from_pretrained(tmp_path):
    model = CATALOGUE["hf_siglip"].build()
    space = vpf.describe(model)
    head_mlp = next(n for n in space.groups if n.endswith("head.mlp"))
    vpf.prune_(model, vpf.make_plan(space, random_scores(space), keep={head_mlp: 0.5}))
    assert_not_written_for_pretrained(model, tmp_path / "m", "layers differ")
