"""A timm ViT/Swin as a flat sequence: prefix -> blocks[0..L) -> head, so a pass can start at any block.

Swin stages are flattened: the PatchMerging of stage s runs right before that stage's first block.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..arch import adapter_for


@dataclass
class Trunk:
    """Callables that reproduce ``model(images)`` step by step (eval mode)."""

    model: nn.Module
    arch: str
    blocks: list[nn.Module]
    names: list[str]  # module path of each block
    stage_start: dict[int, nn.Module] = field(default_factory=dict)  # block index -> PatchMerging before it
    stage_of: list[int] = field(default_factory=list)  # block index -> stage index

    @classmethod
    def of(cls, model: nn.Module) -> Trunk:
        arch = adapter_for(model).ARCH
        if arch == "vit":
            blocks = list(model.blocks)
            return cls(model, arch, blocks, [f"blocks.{i}" for i in range(len(blocks))], {}, [0] * len(blocks))
        blocks, names, starts, stage_of = [], [], {}, []
        for s, stage in enumerate(model.layers):
            if not isinstance(stage.downsample, nn.Identity):
                starts[len(blocks)] = stage.downsample
            for b, blk in enumerate(stage.blocks):
                blocks.append(blk)
                names.append(f"layers.{s}.blocks.{b}")
                stage_of.append(s)
        return cls(model, arch, blocks, names, starts, stage_of)

    def prefix(self, images: torch.Tensor) -> torch.Tensor:
        """Embedding: images -> input of block 0 (before a stage-0 downsample, if any)."""
        m = self.model
        if self.arch == "vit":
            x = m.patch_embed(images)
            x = m._pos_embed(x)
            x = m.patch_drop(x)
            return m.norm_pre(x)
        return m.patch_embed(images)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Output of the last block -> logits."""
        m = self.model
        return m.forward_head(m.norm(x))

    def run(self, x: torch.Tensor, start: int, end: int | None = None) -> torch.Tensor:
        """Run blocks ``start..end-1`` (with the PatchMergings in between), then the head when ``end`` is None.

        Args:
            x: input of block ``start``, before the PatchMerging that begins its stage (if any).
        """
        stop = len(self.blocks) if end is None else end
        for i in range(start, stop):
            x = self.enter(x, i)
            x = self.blocks[i](x)
        return self.head(x) if end is None else x

    def enter(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Apply the PatchMerging that precedes block ``i`` (identity inside a stage)."""
        merge = self.stage_start.get(i)
        return merge(x) if merge is not None else x

    def block_index(self, module_path: str) -> int:
        """Index of the block that owns ``module_path`` (e.g. ``blocks.3.attn`` -> 3)."""
        for i, name in enumerate(self.names):
            if module_path == name or module_path.startswith(name + "."):
                return i
        raise KeyError(module_path)

    def teacher(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Inputs of every block (before any PatchMerging at a stage start) and the logits."""
        x = self.prefix(images)
        inputs = []
        for i, blk in enumerate(self.blocks):
            inputs.append(x)
            x = blk(self.enter(x, i))
        return inputs, self.head(x)
