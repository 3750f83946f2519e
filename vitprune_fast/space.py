"""PruningSpace: a timm model described as groups of channels that are removed together."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

KINDS = ("residual", "attn", "mlp")


@dataclass(frozen=True)
class TensorSlice:
    """One tensor touched by a group: channel ``c`` of the group maps to indices along ``dim``.

    Index map: ``{offset + r * stride + c for r in range(repeats)}`` (``repeats=1, offset=0`` is the identity).
    qkv rows use ``repeats=3, stride=attn_dim``; Swin PatchMerging inputs use ``repeats=4, stride=C``; a Linear
    shared by two groups maps each to its own rows (a parallel block's ``in_proj``: MLP rows from 0, q/k/v rows from
    ``offset=hidden``). Entries of a tensor no slice of a group covers are never removed by that group.
    ``per_head`` marks a tensor indexed by head (Swin ``relative_position_bias_table`` columns, XCiT's temperature):
    it is sliced by kept heads.
    """

    name: str  # parameter or buffer name in model.named_parameters()/named_buffers()
    dim: int
    repeats: int = 1
    stride: int = 0
    per_head: bool = False
    offset: int = 0

    def indices(self, keep: torch.Tensor) -> torch.Tensor:
        """Indices along ``dim`` of channels ``keep`` (sorted in, sorted out); per-head maps take kept heads."""
        if self.repeats == 1:
            return keep + self.offset if self.offset else keep
        return torch.cat([keep + (self.offset + r * self.stride) for r in range(self.repeats)])


@dataclass
class Group:
    """Channels that must be removed together.

    Attributes:
        name: group name, e.g. ``blocks.3.attn``, ``blocks.3.mlp``, ``residual``, ``layers.2.residual``.
        kind: ``residual`` | ``attn`` | ``mlp``.
        size: number of channels in the group now.
        slices: every tensor slice the group implies.
        num_heads / head_dim: head layout of an ``attn`` group (channel d belongs to head ``d // head_dim``).
        module: module path of the timm module the group belongs to (Attention / Mlp / the model or stage).
        whole_heads: an ``attn`` group whose channels can only go as whole heads, keeping head_dim (per-head
            q/k norms: one weight per position in a head, shared by all heads). Plans that split a head are refused.
        tied_to: the group whose kept count this ``attn`` group must keep too (an attention pool whose class ties its
            attention width to its input width: timm's ``AttentionPoolLatent``); planned with that group, every
            head keeping the same number of dims (whole heads when it is ``whole_heads``).
        multiple_of: a residual whose kept count must be a multiple of this (rotary embeddings sized from
            ``embed_dim / num_heads`` when the model is rebuilt: EVA).
    """

    name: str
    kind: str
    size: int
    slices: list[TensorSlice] = field(default_factory=list)
    num_heads: int | None = None
    head_dim: int | None = None
    module: str = ""
    whole_heads: bool = False
    tied_to: str | None = None
    multiple_of: int = 1

    def __repr__(self) -> str:
        heads = f", heads={self.num_heads}x{self.head_dim}" if self.kind == "attn" else ""
        heads += ", whole heads only" if self.whole_heads else ""
        heads += f", width tied to {self.tied_to}" if self.tied_to else ""
        return f"Group({self.name!r}, kind={self.kind}, size={self.size}{heads}, tensors={len(self.slices)})"


@dataclass
class PruningSpace:
    """All prunable groups of one model, plus what is needed to rebuild it."""

    arch: str  # the adapter's family name: "vit" | "swin"
    groups: dict[str, Group]

    def of_kind(self, kind: str) -> list[Group]:
        return [g for g in self.groups.values() if g.kind == kind]

    def __repr__(self) -> str:
        counts = {k: len(self.of_kind(k)) for k in KINDS}
        return f"PruningSpace(arch={self.arch}, groups={counts})"


def tensor_of(model: nn.Module, name: str) -> torch.Tensor:
    """The parameter or buffer ``name`` of ``model`` (what a :class:`TensorSlice` names)."""
    try:
        return model.get_parameter(name)
    except AttributeError:
        return model.get_buffer(name)
