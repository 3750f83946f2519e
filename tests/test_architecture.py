"""The package's architecture: adapters as the one owner of model structure, no import cycle, triton optional."""
import ast
import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from models import make_input, randomize_, rel_err
from timm.models.vision_transformer import VisionTransformer

import vitprune_fast as vpf
from vitprune_fast.arch import ViTAdapter, adapter_for, register_adapter, unregister_adapter
from vitprune_fast.dap import DAP, Schedule
from vitprune_fast.masked import masked_copy

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- a toy family
class StackViT(VisionTransformer):
    """A timm ViT whose block list is called ``stack``: nothing outside its adapter may assume ``model.blocks``."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.stack = self.blocks
        del self.blocks

    def forward_features(self, x, **_):
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        return self.norm(self.stack(x))


class StackViTAdapter(ViTAdapter):
    """The toy family's adapter: the ViT contract with the block list renamed."""

    arch = "stack_vit"
    blocks_attr = "stack"

    @classmethod
    def matches(cls, model):
        return isinstance(model, StackViT)


def _stack_vit(dtype=torch.float64):
    torch.manual_seed(0)
    model = StackViT(img_size=32, patch_size=8, depth=3, embed_dim=48, num_heads=3, num_classes=10,
                     init_values=1e-5)
    return randomize_(model.to(dtype)).eval()


@pytest.fixture
def stack_adapter():
    register_adapter(StackViTAdapter)
    try:
        yield StackViTAdapter
    finally:
        unregister_adapter(StackViTAdapter)


def test_unregistered_family_gets_a_clear_error():
    with pytest.raises(vpf.UnsupportedModelError, match="register_adapter"):
        vpf.describe(_stack_vit())


def test_toy_adapter_describe_and_prune_equals_masking(stack_adapter):
    model = _stack_vit()
    assert isinstance(adapter_for(model), stack_adapter)
    space = vpf.describe(model)
    assert space.arch == "stack_vit"
    assert [g.name for g in space.of_kind("attn")] == [f"stack.{i}.attn" for i in range(3)]
    g = torch.Generator().manual_seed(1)
    scores = {n: torch.rand(gr.size, generator=g) for n, gr in space.groups.items()}
    x = make_input(model, 4)
    for plan in (vpf.make_plan(space, scores, keep={"residual": 0.75, "attn": 0.5, "mlp": 0.5}),
                 vpf.make_plan(space, scores, keep=0.5, attn_mode="heads")):
        with torch.no_grad():
            want = masked_copy(model, plan)(x)
            pruned = vpf.prune_(copy.deepcopy(model), plan)
            assert rel_err(pruned(x), want) < 1e-9
        width = len(plan.keep["residual"]) if "residual" in plan.keep else space.groups["residual"].size
        assert pruned.stack[0].attn.qkv.in_features == pruned.embed_dim == width


def test_toy_adapter_upvits_fast_equals_reference(stack_adapter):
    model = _stack_vit()
    x = make_input(model, 3)
    comps = ("residual", "attn", "mlp", "blocks")
    fast = vpf.upvits_scores(model, x, components=comps, max_rows=16, progress=False)
    ref = vpf.upvits_scores(model, x, components=comps, engine="reference", progress=False)
    assert set(fast) == set(ref) and "units.hybrid" in fast
    for name in fast:
        assert rel_err(fast[name], ref[name]) < 1e-6, name


def test_toy_adapter_dimap_structured_plan(stack_adapter):
    model = _stack_vit()
    plan = vpf.dimap_structured_plan(model, flops=0.7)
    assert plan.keep and all(n.startswith("stack.") for n in plan.keep)
    x = make_input(model, 2)
    with torch.no_grad():
        want = masked_copy(model, plan)(x)
        assert rel_err(vpf.prune_(copy.deepcopy(model), plan)(x), want) < 1e-9


def test_toy_adapter_dap_steps_and_finalize(stack_adapter):
    model = _stack_vit(torch.float32).train()
    dap = DAP(model, target=0.3, schedule=Schedule(0, 2, 3, update_every=1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(4, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (4,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x), y) + dap.loss(y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        dap.step()
    assert [b.name for b in dap.blocks][:2] == ["stack.0.attn", "stack.0.mlp"] and len(dap.history) == 3
    kept = dap.kept_params()
    dap.finalize(opt)
    assert sum(p.numel() for p in model.parameters()) == kept
    assert abs(kept - dap.target_params) <= dap.tolerance
    model(torch.randn(2, 3, 32, 32))


# ------------------------------------------------------------------------------ overrides restore exactly
def test_engine_restores_instance_forwards_it_overrides():
    model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32,
                              num_heads=2, num_classes=5)
    model = randomize_(model.double()).eval()
    norm = model.blocks[1].norm1  # the engine replaces its forward for MLP candidates of block 0 and for residuals
    calls = []

    def bound_elsewhere(x):  # what another library might have bound on the instance
        calls.append(1)
        return type(norm).forward(norm, x)

    norm.forward = bound_elsewhere
    x = make_input(model, 2)
    vpf.upvits_scores(model, x, components=("residual", "mlp"), max_rows=8, progress=False)
    assert norm.__dict__["forward"] is bound_elsewhere
    calls.clear()
    model(x)
    assert calls == [1]


# ------------------------------------------------------------------------------------- the import graph
COMPILED = {"vitprune_fast._C"}  # the C++ extension: a submodule without a .py file


def _modules() -> dict[str, Path]:
    """Module name -> file for the package and the kernels installed as ``vitprune_fast.kernels``."""
    out = {}
    for base, pkg in ((ROOT / "vitprune_fast", "vitprune_fast"), (ROOT / "kernels", "vitprune_fast.kernels")):
        for f in base.rglob("*.py"):
            parts = list(f.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = f
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules imported by ``name`` anywhere in its file (module level or inside functions)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            subs = [f"{mod}.{a.name}" for a in node.names]  # `from pkg import sub` imports a submodule when one exists
            targets = [t if t in modules or t in COMPILED else mod for t in subs]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def test_import_graph_has_no_cycle():
    modules = _modules()
    assert {"vitprune_fast.arch.base", "vitprune_fast.dap.pruner", "vitprune_fast.kernels.kl_div"} <= set(modules)
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert "vitprune_fast.methods" in graph["vitprune_fast.cli"]  # the parser sees real edges
    state = {}  # name -> 1 while on the DFS stack, 2 when done

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


# -------------------------------------------------------------------------------------- without triton
NO_TRITON = textwrap.dedent('''
    import sys

    for name in ("triton", "triton.language"):  # None in sys.modules: `import` raises ImportError, find_spec says
        sys.modules[name] = None                # absent (torch probes it that way), as on a machine without triton
    sys.path.insert(0, __TESTS__)
    import timm, torch
    import vitprune_fast as vpf
    from models import make_input, random_scores, rel_err
    from vitprune_fast.masked import masked_copy
    from vitprune_fast.kernels.kl_div import kl_per_candidate
    from vitprune_fast.testing import Representative

    TINY = (  # the torch paths do not depend on the width: the smallest ViT and Swin that still have every part
        Representative("deit_1", "vit", "deit_tiny_patch16_224",
                       dict(img_size=32, patch_size=8, depth=1, embed_dim=16, num_heads=2, num_classes=10)),
        Representative("swin_11", "swin", "swin_tiny_patch4_window7_224",
                       dict(img_size=32, patch_size=4, window_size=4, embed_dim=8, depths=(1, 1), num_heads=(1, 2),
                            num_classes=10)),
    )
    for rep in TINY:
        model = rep.build()
        x = make_input(model, 2)
        space = vpf.describe(model)
        plan = vpf.make_plan(space, random_scores(space), keep=0.5)
        with torch.no_grad():
            assert rel_err(vpf.prune_(rep.build(), plan)(x), masked_copy(model, plan)(x)) < 1e-9
        fast = vpf.upvits_scores(model, x, max_rows=16, progress=False)
        ref = vpf.upvits_scores(model, x, engine="reference", progress=False)
        assert all(rel_err(fast[n], ref[n]) < 1e-6 for n in fast)
        vpf.dimap_structured_plan(model, flops=0.7)
    for call in (lambda: vpf.upvits_scores(model, x, use_kernels=True, progress=False),
                 lambda: kl_per_candidate(torch.randn(2, 5), torch.randn(4, 5), 2, backend="triton"),
                 lambda: vpf.dimap_scores(model, backend="triton")):
        try:
            call()
        except vpf.KernelUnavailableError as e:
            assert "triton" in str(e)
        else:
            raise AssertionError("a kernel asked for explicitly must fail clearly without triton")
    from vitprune_fast.kernels.utils import HAS_TRITON
    assert not HAS_TRITON and sys.modules["triton"] is None
    print("ok")
''')


def test_works_without_triton():
    env = dict(os.environ, TRITON_INTERPRET="1")  # even with the interpreter asked for: no triton, torch paths
    script = NO_TRITON.replace("__TESTS__", repr(str(ROOT / "tests")))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
