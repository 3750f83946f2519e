"""DIMAP's view of a model: every block's attention and MLP, and the weights of its three modules.

Asked of the model's adapter (:mod:`vitprune_fast.arch`), the one owner of model structure.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...arch import adapter_for
from ...errors import UnsupportedModelError
from ...space import Group, tensor_of

MODULES = ("qkv", "proj", "mlp")  # QKV-M, PRJ-M, MLP-M


@dataclass(frozen=True)
class DimapBlock:
    """The prunable parts of one transformer block.

    Attributes:
        attn: module path of the attention (also its structured group name).
        mlp: module path of the MLP (also its structured group name).
        num_heads: attention heads.
        head_dim: channels per head (attention channel ``d`` belongs to head ``d // head_dim``).
        hidden: MLP hidden units.
        qkv, proj, fc1, fc2: module paths of the block's main Linears (see :class:`vitprune_fast.arch.BlockRef`).
        attn_linears / mlp_linears: ``(weight name, dim, repeats, stride, offset, extent)`` of every Linear weight
            slice of the group (qkv rows ``repeats=3``, proj columns; fc1 rows -- both halves of a GLU, both SwiGLU
            inputs -- and fc2 columns; a parallel block's in_proj rows from ``offset``), ``extent`` the weight's
            size along ``dim``: a unit's weights, whatever the MLP's form.
        attn_tied: the attention's width is tied to the residual (EVA): structured plans leave it whole.
    """

    attn: str
    mlp: str
    num_heads: int
    head_dim: int
    hidden: int
    qkv: str
    proj: str
    fc1: str
    fc2: str
    attn_linears: tuple[tuple[str, int, int, int, int, int], ...] = ()
    mlp_linears: tuple[tuple[str, int, int, int, int, int], ...] = ()
    attn_tied: bool = False

    @property
    def attn_dim(self) -> int:
        return self.num_heads * self.head_dim


def find_blocks(model: nn.Module) -> list[DimapBlock]:
    """Every transformer block's attention and MLP, in forward order, from the model's adapter.

    Raises:
        UnsupportedModelError: a model no adapter supports (the error names what is missing).
    """
    adapter = adapter_for(model)
    groups = adapter.describe().groups
    out = []
    for b in (br for blk in adapter.blocks() for br in blk.branches()):  # every pair of a parallel block
        attn, mlp = groups[b.attn], groups[b.mlp]
        out.append(DimapBlock(b.attn, b.mlp, attn.num_heads, attn.head_dim, mlp.size, b.qkv, b.proj, b.fc1, b.fc2,
                              _linear_weights(model, attn), _linear_weights(model, mlp), attn.tied_to is not None))
    return out


def _linear_weights(model: nn.Module, group: Group) -> tuple[tuple[str, int, int, int, int, int], ...]:
    out = []
    for sl in group.slices:  # a Linear's weight, or a matrix applied with F.linear (MultiheadAttention's in_proj)
        path, _, pname = sl.name.rpartition(".")
        w = tensor_of(model, sl.name)
        if (pname == "weight" and isinstance(model.get_submodule(path), nn.Linear)) or (
                pname.endswith("_weight") and w.dim() == 2):
            out.append((sl.name, sl.dim, sl.repeats, sl.stride, sl.offset, w.shape[sl.dim]))
    return tuple(out)


def prunable_weights(model: nn.Module) -> dict[str, list[str]]:
    """DIMAP's modules: ``{"qkv": [...], "proj": [...], "mlp": [...]}`` -> weight parameter names (MLP-M holds
    the MLP's Linears -- fc1 (SwiGLU: fc1_g, fc1_x) and fc2 -- of every block, in block order)."""
    out: dict[str, list[str]] = {m: [] for m in MODULES}
    for b in find_blocks(model):
        out["qkv"] += [name for name, dim, *_ in b.attn_linears if dim == 0]
        out["proj"] += [name for name, dim, *_ in b.attn_linears if dim == 1]
        out["mlp"] += [name for name, *_ in b.mlp_linears]
    names = [n for module in out.values() for n in module]
    shared = sorted({n for n in names if names.count(n) > 1})
    if shared:  # one weight in two modules would get two thresholds
        raise UnsupportedModelError(f"{shared[0]} holds rows of both the attention and the MLP (a parallel block's "
                                    "fused in_proj): DIMAP's per-module weight pools cannot split it; use the "
                                    "structured DIMAP plan (dimap_structured_plan)")
    return out
